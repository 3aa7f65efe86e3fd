"""evaluate.py's work: perplexity and zero-shot accuracy of a (fake-quantized) model.

    python evaluate.py model=smollm2-135m w_bits=4 a_bits=8 kv_bits=8 tasks=[wikitext2,piqa] limit=200

`model=` is an alias, a HF folder or a saved student. A student is evaluated at its saved quant
config (`quant_config.json`) with the quant fields given on the command line merged in: a field that
differs from its `QuantConfig()` default overrides the saved value, the others keep it, so
`model=STUDENT kv_bits=4` is the student at KV4 with its own weights / activations settings. A
default cannot be told from "given", so a saved quantizer is switched off with 32 bits (`kv_bits=32`:
off, and not the default); `use_saved_quant=false` evaluates exactly `quant`, ignoring the saved one.

Results: `output` (JSON: `results` task -> {ppl | acc[, acc_norm], n, seconds, examples_per_s, ...};
`quant`, the evaluated QuantConfig as a dict or null for full precision; `coverage`, what the fake
quantizers reach, {"linears": [quantized, total], "kv_layers": [quantized, total]}; `provenance`,
with `config_hash` (the cache key) and utils.provenance's record: code version, environment, model
and tokenizer fingerprints) and the same path with `.md` (a table). An existing `output` is only
replaced if it is an llm-qat results JSON (and its `.md` an llm-qat table).
Perplexity and zero-shot protocols: utils/eval/perplexity.py, utils/eval/zeroshot.py, utils/eval/tasks.py.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from models import get_quant_config, load_model, model_fingerprint, read_quant_config
from models.convert import convert
from models.loading import check_attn_implementation
from models.patch import quant_coverage
from quant.config import QuantConfig
from quant.errors import UserError
from utils.config import to_dict
from utils.eval.cache import cached_results, read_payload, recorded_results
from utils.eval.datasets import c4_texts, resolve_data_dir, wikitext2_text
from utils.eval.perplexity import c4_windows, perplexity, perplexity_of_windows
from utils.eval.report import table_row, write_table
from utils.eval.tasks import ALL_TASKS, PPL_TASKS, TASKS, WIKITEXT2_SPLITS, load_task
from utils.eval.zeroshot import evaluate_docs
from utils.io import write_json
from utils.logging import print0
from utils.provenance import config_hash, provenance

logger = logging.getLogger(__name__)

# Fields that do not change a number: where results go, which tasks this call runs, extra harness tasks.
_NOT_IN_KEY = ("output", "tasks", "harness_tasks", "fresh")
_TABLE_HEADER = "| Method | W-A-KV |"  # first row of utils/eval/report.py's markdown: how we know our own table


@dataclass
class EvalConfig:
    """Args:
    model: alias, HF folder, .gguf file or saved student folder.
    tasks: any of wikitext2, c4, wikitext2_val (perplexity; wikitext2_val is the validation split, for
        choosing recipes, never for reporting) and the eight zero-shot tasks.
    limit: first N examples of each zero-shot task / first N windows of each perplexity task.
    ppl_limit: if set, the first N windows of each perplexity task instead of `limit`.
    task_limits: task -> its own limit (examples or windows; null: all), over `limit` / `ppl_limit`,
        e.g. {hellaswag: 1000} with limit=null: every example of the other tasks, 1000 of HellaSwag.
    seqlen: perplexity window length (tokens).
    c4_windows, seed: GPTQ-style C4 sampling (number of random windows, random seed).
    ppl_batch_size: windows per forward for perplexity.
    prefix_reuse: run each example's shared prefix once (utils/eval/zeroshot.py).
    batch_tokens: zero-shot examples packed into forwards of up to this many tokens (block mask,
        logits only where scored; utils/eval/zeroshot.py); 0: one example per forward.
    use_saved_quant: for a student folder, evaluate its saved quant config with the `quant` fields
        that differ from their defaults merged in (module docstring); false: exactly `quant`.
    attn_implementation: eager / sdpa / ... (what transformers offers); None: its default.
    data_dir: local data directory (else $LLMQAT_DATA_DIR, else the Hugging Face hub).
    dtype, device: model weights' dtype; "auto" device = cuda when available, else cpu (or e.g. cuda:1).
    output: results JSON; the markdown table goes next to it with suffix .md.
    harness_tasks: extra lm-evaluation-harness task names, run through lm_eval if installed.
    fresh: evaluate every task again even if `output` holds its result under the same key.
    """

    model: str = "smollm2-135m"
    tasks: List[str] = field(default_factory=lambda: list(ALL_TASKS))
    limit: Optional[int] = None
    ppl_limit: Optional[int] = None
    task_limits: Dict[str, Optional[int]] = field(default_factory=dict)
    seqlen: int = 2048
    c4_windows: int = 256
    seed: int = 0
    ppl_batch_size: int = 1
    prefix_reuse: bool = True
    batch_tokens: int = 1024
    use_saved_quant: bool = True
    attn_implementation: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    data_dir: Optional[str] = None
    output: str = "runs/eval/results.json"
    harness_tasks: List[str] = field(default_factory=list)
    fresh: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise UserError(f"unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}")
        if not self.tasks and not self.harness_tasks:
            raise UserError("tasks is empty: name at least one task")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"limit must be positive, got {self.limit}")
        for task, n in self.task_limits.items():
            if task not in ALL_TASKS:
                raise UserError(f"task_limits: unknown task {task!r}; choose from {', '.join(ALL_TASKS)}")
            if n is not None and n <= 0:
                raise UserError(f"task_limits.{task} must be positive or null, got {n}")
        if self.batch_tokens < 0:
            raise UserError(f"batch_tokens must be >= 0 (0: one example per forward), got {self.batch_tokens}")
        if self.seqlen < 2:
            raise UserError(f"seqlen must be at least 2, got {self.seqlen}")
        check_attn_implementation(self.attn_implementation)


def evaluated_quant(cfg: EvalConfig) -> Optional[QuantConfig]:
    """The QuantConfig the model is evaluated at (None: full precision), without loading it: a
    student's saved config with the non-default fields of `cfg.quant` merged in (module docstring).

    Raises:
        UserError: the merged config is invalid (e.g. w_bits=8 on a gguf_q4_0 student).
    """
    saved = read_quant_config(cfg.model) if cfg.use_saved_quant and Path(cfg.model).is_dir() else None
    if saved is None:
        explicit = cfg.quant != QuantConfig() or not cfg.use_saved_quant
        return cfg.quant if explicit else None
    defaults = QuantConfig().to_dict()
    given = {k: v for k, v in cfg.quant.to_dict().items() if v != defaults[k]}
    return QuantConfig.from_dict({**saved.to_dict(), **given})


def _device(cfg: EvalConfig) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device


def load_eval_model(cfg: EvalConfig):
    """(model, tokenizer) at `evaluated_quant(cfg)`; quantize_model refuses an incomplete quantization."""
    # quant=None only when there is no saved config either: the model stays full precision
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=_device(cfg), quant=evaluated_quant(cfg),
                            attn_implementation=cfg.attn_implementation)
    convert(model, "folded")  # weights quantized once: bit-identical logits, faster forwards
    qcfg = get_quant_config(model)
    logger.info("evaluating %s at %s", cfg.model, qcfg.tag() if qcfg else "full precision")
    return model.eval(), tok


def task_limit(cfg: EvalConfig, task: str) -> Optional[int]:
    """How many examples (zero-shot) or windows (perplexity) of `task` are evaluated; None: all."""
    if task in cfg.task_limits:
        return cfg.task_limits[task]
    return cfg.ppl_limit if task in PPL_TASKS and cfg.ppl_limit is not None else cfg.limit


def evaluate_task(model, tok, task: str, cfg: EvalConfig) -> dict:
    """Metrics of one task, plus n, seconds and examples_per_s."""
    start, limit = time.time(), task_limit(cfg, task)
    if task in WIKITEXT2_SPLITS:
        res = perplexity(model, tok, wikitext2_text(WIKITEXT2_SPLITS[task], cfg.data_dir), cfg.seqlen, limit,
                         cfg.ppl_batch_size)
    elif task == "c4":
        windows = c4_windows(tok, c4_texts(cfg.data_dir), cfg.seqlen, cfg.c4_windows, cfg.seed, limit)
        res = perplexity_of_windows(model, windows, cfg.ppl_batch_size)
    else:
        docs = load_task(task, cfg.data_dir, limit)
        res = evaluate_docs(model, tok, docs, TASKS[task].acc_norm, cfg.prefix_reuse, desc=task,
                            batch_tokens=cfg.batch_tokens)
    seconds = time.time() - start
    n = res.get("n", res.get("windows"))
    res.update(n=n, seconds=round(seconds, 2), examples_per_s=round(n / seconds, 3))
    return res


def run_harness(model, tok, cfg: EvalConfig) -> dict:
    """Optional bridge: lm-evaluation-harness tasks on our (quantized) model via its HFLM class."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("harness_tasks needs lm-evaluation-harness: pip install lm_eval") from None
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=list(cfg.harness_tasks),
                          limit=cfg.limit)
    return out["results"]


def cache_key(cfg: EvalConfig, fingerprint: Optional[str] = None) -> str:
    """The key results are cached under: every setting that changes a number, and the model's
    content fingerprint (not its path; `fingerprint`: one given instead of computed); see utils/eval/cache.py."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_KEY}
    if not settings["task_limits"]:
        del settings["task_limits"]  # the key of every result saved before the field existed
    settings["data_dir"] = str(resolve_data_dir(cfg.data_dir))
    return config_hash({"eval": settings, "model": fingerprint or model_fingerprint(cfg.model)})


def cached_payload(cfg: EvalConfig) -> Optional[dict]:
    """The results JSON at `cfg.output` if it holds every task of `cfg` under its key, else None."""
    key = cache_key(cfg)
    done = cached_results(check_output(Path(cfg.output)), key)
    if cfg.fresh or any(t not in done for t in cfg.tasks):
        return None
    return _payload(cfg, get_quant_config_of(cfg), {t: done[t] for t in cfg.tasks}, _saved_record(cfg.output, key))


def recorded_payload(cfg: EvalConfig) -> Optional[dict]:
    """The results JSON at `cfg.output` of a model not on this machine (a student of another session, its
    rows committed) if it holds every task of `cfg` under its recorded key (utils/eval/cache.py), else None."""
    done, saved = recorded_results(check_output(Path(cfg.output)), cfg.model, lambda fp: cache_key(cfg, fp))
    if cfg.fresh or any(t not in done for t in cfg.tasks):
        return None
    record = {"coverage": saved.get("coverage"), "provenance": saved["provenance"]}
    return _payload(cfg, saved.get("quant"), {t: done[t] for t in cfg.tasks}, record)


def get_quant_config_of(cfg: EvalConfig) -> Optional[dict]:
    """The quant config the model is evaluated at (`evaluated_quant`) as a dict, or None."""
    qcfg = evaluated_quant(cfg)
    return qcfg.to_dict() if qcfg is not None else None


def _is_results_json(path: Path) -> bool:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("results"), dict) and \
        isinstance(payload.get("provenance"), dict) and "config_hash" in payload["provenance"]


def check_output(path: Path) -> Path:
    """`path`, after checking that writing it (and its .md table) replaces nothing but our own results.

    Raises:
        UserError: `path` exists and is not an llm-qat results JSON, or its .md is not our table.
    """
    if path.suffix == ".md":
        raise UserError(f"output={path}: the results JSON cannot end in .md (the table goes there)")
    if path.exists() and not _is_results_json(path):
        raise UserError(f"output={path} exists and is not an llm-qat results JSON (no results / "
                        "provenance.config_hash): choose another output, or delete it")
    table = path.with_suffix(".md")
    if table.exists() and not (path.exists() or _TABLE_HEADER in table.read_text(errors="replace")):
        raise UserError(f"{table} exists and is not an llm-qat results table: choose another output, or delete it")
    return path


def _saved_record(output, key: str) -> dict:
    """coverage and provenance of the results saved at `output` under `key` (else just the key)."""
    saved = read_payload(output) if cached_results(output, key) else {}
    return {"coverage": saved.get("coverage"), "provenance": saved.get("provenance", {"config_hash": key})}


def _run_record(cfg: EvalConfig, key: str, model, tok) -> dict:
    """coverage of the loaded model and the provenance of this evaluation, keyed by `key`."""
    coverage = quant_coverage(model) if get_quant_config(model) is not None else None
    prov = provenance(cfg, inputs={"model": model_fingerprint(cfg.model)}, tokenizer=tok, device=_device(cfg))
    return {"coverage": coverage, "provenance": {**prov, "config_hash": key}}


def _payload(cfg: EvalConfig, quant: Optional[dict], results: dict, record: dict) -> dict:
    tag = QuantConfig.from_dict(quant).tag() if quant else "FP"
    return {"model": cfg.model, "tag": tag, "quant": quant, "coverage": record["coverage"], "config": to_dict(cfg),
            "results": results, "provenance": record["provenance"]}


def run(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.tasks`, saving the JSON after each task (a task already saved
    under the same key is reused); write the markdown table next to it; return the JSON."""
    if resolve_data_dir(cfg.data_dir) is None:
        logger.warning("no data_dir / LLMQAT_DATA_DIR: evaluation data comes from the Hugging Face hub")
    key, out = cache_key(cfg), check_output(Path(cfg.output))
    results = {} if cfg.fresh else {t: r for t, r in cached_results(out, key).items() if t in cfg.tasks}
    if results:
        logger.info("reusing %s from %s (same config_hash %s; fresh=true evaluates again)", sorted(results), out, key)
    todo = [t for t in cfg.tasks if t not in results]
    quant, record = get_quant_config_of(cfg), _saved_record(out, key)
    model, tok = load_eval_model(cfg) if todo or cfg.harness_tasks else (None, None)
    record = _run_record(cfg, key, model, tok) if model is not None else record
    for task in todo:
        results[task] = evaluate_task(model, tok, task, cfg)
        logger.info("%s: %s", task, {k: v for k, v in results[task].items() if not k.endswith("stderr")
                                         and k not in ("per_example", "per_window")})
        write_json(out, _payload(cfg, quant, results, record))
    payload = _payload(cfg, quant, {t: results[t] for t in cfg.tasks}, record)
    if cfg.harness_tasks:
        payload["harness"] = run_harness(model, tok, cfg)
    write_json(out, payload)
    setting = "-".join(str(quant[k]) for k in ("w_bits", "a_bits", "kv_bits")) if quant else "16-16-16"
    notes = [f"{cfg.model} at {payload['tag']}: limit={cfg.limit}, ppl_limit={cfg.ppl_limit}, seqlen={cfg.seqlen}; "
             "n per task: " + ", ".join(f"{t} {results[t]['n']}" for t in cfg.tasks)]
    table = write_table([table_row(payload["tag"], setting, payload["results"], cfg.tasks)], cfg.tasks,
                        out.with_suffix(".md"), notes, rows_json=False)
    print0(table)
    return payload
