"""evaluate.py's work: perplexity and zero-shot accuracy of a (fake-quantized) model.

    python evaluate.py model=smollm2-135m w_bits=4 a_bits=8 kv_bits=8 tasks=[wikitext2,piqa] limit=200

`model=` is an alias, a HF folder or a saved student (its `quant_config.json` is applied unless
quant settings are given on the command line). Results: `output` (JSON, top-level `results`:
task -> {ppl | acc[, acc_norm], n, seconds, examples_per_s}) and the same path with `.md` (a table).
Perplexity and zero-shot protocols: utils/eval/perplexity.py, utils/eval/zeroshot.py, utils/eval/tasks.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from quant.config import QuantConfig
from utils.config import to_dict
from utils.eval.datasets import resolve_data_dir
from utils.io import atomic_write_text, write_json
from utils.logging import print0
from utils.eval.tasks import TASKS, ZERO_SHOT_TASKS

logger = logging.getLogger(__name__)

PPL_TASKS = ("wikitext2", "c4")
ALL_TASKS = PPL_TASKS + ZERO_SHOT_TASKS


@dataclass
class EvalConfig:
    """Args:
    model: alias, HF folder, .gguf file or saved student folder.
    tasks: any of wikitext2, c4 (perplexity) and the eight zero-shot tasks.
    limit: first N examples of each zero-shot task / first N windows of each perplexity task.
    ppl_limit: if set, the first N windows of each perplexity task instead of `limit`.
    seqlen: perplexity window length (tokens).
    c4_windows, seed: GPTQ-style C4 sampling (number of random windows, random seed).
    ppl_batch_size: windows per forward for perplexity.
    prefix_reuse: run each example's shared prefix once (utils/eval/zeroshot.py).
    use_saved_quant: for a student folder, apply its saved quant config when `quant` is left at
        its defaults (all 16 bits).
    data_dir: local data directory (else $LLMQAT_DATA_DIR, else the Hugging Face hub).
    dtype, device: model weights' dtype; "auto" device = cuda when available, else cpu (or e.g. cuda:1).
    output: results JSON; the markdown table goes next to it with suffix .md.
    harness_tasks: extra lm-evaluation-harness task names, run through lm_eval if installed.
    """

    model: str = "smollm2-135m"
    tasks: List[str] = field(default_factory=lambda: list(ALL_TASKS))
    limit: Optional[int] = None
    ppl_limit: Optional[int] = None
    seqlen: int = 2048
    c4_windows: int = 256
    seed: int = 0
    ppl_batch_size: int = 1
    prefix_reuse: bool = True
    use_saved_quant: bool = True
    dtype: str = "float32"
    device: str = "auto"
    data_dir: Optional[str] = None
    output: str = "runs/eval/results.json"
    harness_tasks: List[str] = field(default_factory=list)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; choose from {', '.join(ALL_TASKS)}")
        if not self.tasks and not self.harness_tasks:
            raise ValueError("tasks is empty: name at least one task")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")


@torch.no_grad()
def freeze_weight_quantizers(model) -> int:
    """Store each QuantLinear's fake-quantized weight once and switch its weight quantizer off.

    The forward then multiplies by exactly the tensor the quantizer would have produced on every
    call (bit-identical logits), without re-quantizing ~100M weights per forward. Evaluation only:
    the model must not be trained or saved afterwards.
    """
    from quant.linear import QuantLinear

    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer.enabled:
            module.weight.data = module.weight_quantizer(module.weight).detach()
            module.weight_quantizer.enabled = False
            count += 1
    return count


def load_eval_model(cfg: EvalConfig):
    """(model, tokenizer): a saved student keeps its own quantizers unless quant is given."""
    from models import get_quant_config, load_model

    explicit = cfg.quant != QuantConfig() or not cfg.use_saved_quant
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tok = load_model(cfg.model, dtype=cfg.dtype, device=device, quant=cfg.quant if explicit else None)
    freeze_weight_quantizers(model)
    qcfg = get_quant_config(model)
    logger.info("evaluating %s at %s", cfg.model, qcfg.tag() if qcfg else "full precision")
    return model.eval(), tok


def evaluate_task(model, tok, task: str, cfg: EvalConfig) -> dict:
    """Metrics of one task, plus n, seconds and examples_per_s."""
    from utils.eval.datasets import c4_texts, wikitext2_text
    from utils.eval.perplexity import c4_windows, perplexity, perplexity_of_windows
    from utils.eval.tasks import load_task
    from utils.eval.zeroshot import evaluate_docs

    start, ppl_limit = time.time(), cfg.ppl_limit if cfg.ppl_limit is not None else cfg.limit
    if task == "wikitext2":
        res = perplexity(model, tok, wikitext2_text("test", cfg.data_dir), cfg.seqlen, ppl_limit, cfg.ppl_batch_size)
    elif task == "c4":
        windows = c4_windows(tok, c4_texts(cfg.data_dir), cfg.seqlen, cfg.c4_windows, cfg.seed, ppl_limit)
        res = perplexity_of_windows(model, windows, cfg.ppl_batch_size)
    else:
        docs = load_task(task, cfg.data_dir, cfg.limit)
        res = evaluate_docs(model, tok, docs, TASKS[task].acc_norm, cfg.prefix_reuse, desc=task)
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
        raise ValueError("harness_tasks needs lm-evaluation-harness: pip install lm_eval") from None
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok), tasks=list(cfg.harness_tasks),
                          limit=cfg.limit)
    return out["results"]


def markdown(results: dict, title: str) -> str:
    lines = [f"**{title}**", "", "| task | metric | value | n | examples/s |", "|---|---|---:|---:|---:|"]
    for task, res in results.items():
        for metric in ("ppl", "acc", "acc_norm"):
            if metric in res:
                value = f"{res[metric]:.3f}" if metric == "ppl" else f"{100 * res[metric]:.1f}"
                lines.append(f"| {task} | {metric} | {value} | {res['n']} | {res['examples_per_s']} |")
    return "\n".join(lines) + "\n"


def run(cfg: EvalConfig) -> dict:
    """Evaluate `cfg.model` on `cfg.tasks`; write the JSON and markdown files; return the JSON."""
    from models import get_quant_config

    if resolve_data_dir(cfg.data_dir) is None:
        logger.warning("no data_dir / LLMQAT_DATA_DIR: evaluation data comes from the Hugging Face hub")
    model, tok = load_eval_model(cfg)
    qcfg = get_quant_config(model)
    results = {}
    for task in cfg.tasks:
        results[task] = evaluate_task(model, tok, task, cfg)
        logger.info("%s: %s", task, {k: v for k, v in results[task].items() if not k.endswith("stderr")})
    tag = qcfg.tag() if qcfg else "FP"
    payload = {"model": cfg.model, "tag": tag, "quant": qcfg.to_dict() if qcfg else None,
               "config": to_dict(cfg), "results": results}
    if cfg.harness_tasks:
        payload["harness"] = run_harness(model, tok, cfg)
    out = Path(cfg.output)
    write_json(out, payload)
    title = f"{cfg.model} at {tag} (limit={cfg.limit}, ppl_limit={cfg.ppl_limit}, seqlen={cfg.seqlen})"
    table = markdown(results, title)
    atomic_write_text(out.with_suffix(".md"), table)
    print0(table)
    return payload
