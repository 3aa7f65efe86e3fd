"""The paper's results table: methods x W-A-KV settings -> 8 zero-shot tasks, average, perplexities.

    bash run_table.sh limit=200 settings=[4-8-8,8-8-8] methods=[fp,rtn,smoothquant,gptq]
    python -m recipes.table qat=[runs/w4a8kv8/student] limit=200        # what run_table.sh runs

For every (method, setting) the table needs, a cached result file `cache_dir/results/<row>.json`
is reused; only missing tasks are evaluated (same limit / seqlen / c4_windows, else re-run). PTQ
students are built once under `cache_dir/students/` (recipes/ptq.py). QAT rows come from given
student folders; their setting is their saved quant config. Accuracy per task: acc_norm where the
harness defines it (`prefer_acc_norm`), else acc. "recovered %" of a QAT / SmoothQuant / GPTQ row =
(row - RTN) / (FP - RTN) at the same setting, on the zero-shot average and on WikiText-2 perplexity.
SmoothQuant rows are only made where activations are quantized (A < 16).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import List, Optional

from quant.config import QuantConfig
from utils.io import atomic_write_text, write_json
from utils.eval.tasks import TASKS, ZERO_SHOT_TASKS

logger = logging.getLogger(__name__)

DEFAULT_SETTINGS = ["4-8-4", "4-8-8", "4-6-16", "4-8-16", "4-16-16", "8-8-4", "8-8-8", "8-8-16"]
PTQ_METHODS = ("rtn", "smoothquant", "gptq")
NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "siqa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


@dataclass
class TableConfig:
    """Args:
    settings: W-A-KV triples for the PTQ methods; methods: fp, rtn, smoothquant, gptq.
    qat: trained student folders (one QAT row each, at their saved setting).
    tasks, limit, ppl_limit, seqlen, c4_windows, data_dir, prefix_reuse: as in evaluate.py.
    calib, calib_samples, calib_seqlen, alpha, gptq_act_order, gptq_percdamp: PTQ settings (recipes/ptq.py).
    cache_dir: students and per-row results; output: the markdown table (JSON rows beside it).
    only_cached: leave out (with a log line) every row not yet in the cache instead of computing it.
    """

    model: str = "smollm2-135m"
    settings: List[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    methods: List[str] = field(default_factory=lambda: ["fp", *PTQ_METHODS])
    qat: List[str] = field(default_factory=list)
    tasks: List[str] = field(default_factory=lambda: ["wikitext2", "c4", *ZERO_SHOT_TASKS])
    limit: Optional[int] = None
    ppl_limit: Optional[int] = None
    seqlen: int = 2048
    c4_windows: int = 256
    prefix_reuse: bool = True
    prefer_acc_norm: bool = True
    data_dir: Optional[str] = None
    calib: str = "gen_data/all_gen.jsonl"
    calib_samples: int = 128
    calib_seqlen: int = 512
    alpha: float = 0.5
    gptq_act_order: bool = False
    gptq_percdamp: float = 0.01
    cache_dir: str = "runs/table"
    output: str = "runs/table/table.md"
    only_cached: bool = False  # report the rows already evaluated for `tasks`: build and evaluate nothing
    quant: QuantConfig = field(default_factory=QuantConfig)  # base grid (granularity, kv_position, ...)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in ("fp", *PTQ_METHODS)]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; use fp, rtn, smoothquant, gptq (QAT rows: qat=[folders])")
        for setting in self.settings:
            parse_setting(setting, self.quant)


def parse_setting(text: str, base: QuantConfig) -> QuantConfig:
    """'4-8-8' -> base with w_bits=4, a_bits=8, kv_bits=8."""
    try:
        w, a, kv = (int(v) for v in text.split("-"))
    except ValueError:
        raise ValueError(f"setting {text!r} is not W-A-KV, e.g. 4-8-8") from None
    return replace(base, w_bits=w, a_bits=a, kv_bits=kv)


def _eval_config(cfg: TableConfig, model: str, quant: QuantConfig, tasks: list, output: Path):
    from recipes.evaluate import EvalConfig

    return EvalConfig(model=model, tasks=tasks, limit=cfg.limit, ppl_limit=cfg.ppl_limit, seqlen=cfg.seqlen,
                      c4_windows=cfg.c4_windows, prefix_reuse=cfg.prefix_reuse, data_dir=cfg.data_dir,
                      output=str(output), quant=quant)


def cached_results(cfg: TableConfig, row: str, model: str, quant: QuantConfig) -> Optional[dict]:
    """Results of one row for `cfg.tasks`, evaluating only the tasks not cached yet (None: not all
    cached and `cfg.only_cached`)."""
    import json

    from recipes.evaluate import run as evaluate

    path = Path(cfg.cache_dir) / "results" / f"{row}.json"
    cached = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    keys = ("limit", "ppl_limit", "seqlen", "c4_windows")
    same = all(cached.get("config", {}).get(k) == getattr(cfg, k) for k in keys)
    results = cached["results"] if same else {}
    missing = [t for t in cfg.tasks if t not in results]
    if missing and cfg.only_cached:
        logger.info("%s: not cached for %s, left out (only_cached)", row, missing)
        return None
    if missing:
        logger.info("%s: evaluating %s", row, missing)
        fresh = evaluate(_eval_config(cfg, model, quant, missing, path))
        cached = {**fresh, "results": {**results, **fresh["results"]}}
        write_json(path, cached)
    return cached


def ptq_student(cfg: TableConfig, method: str, qcfg: QuantConfig) -> str:
    """The PTQ student folder for (method, setting), built once."""
    from recipes.ptq import PTQConfig
    from recipes.ptq import run as build

    out = Path(cfg.cache_dir) / "students" / f"{method}-{qcfg.tag()}"
    if not (out / "config.json").is_file():
        build(PTQConfig(method=method, model=cfg.model, output_dir=str(out), calib=cfg.calib,
                        calib_samples=cfg.calib_samples, calib_seqlen=cfg.calib_seqlen, alpha=cfg.alpha,
                        gptq_act_order=cfg.gptq_act_order, gptq_percdamp=cfg.gptq_percdamp, data_dir=cfg.data_dir, quant=qcfg))
    return str(out)


def table_row(cfg: TableConfig, method: str, tag: str, payload: dict) -> dict:
    res, row = payload["results"], {"method": method, "setting": tag}
    accs = []
    for task in (t for t in ZERO_SHOT_TASKS if t in cfg.tasks):
        metric = "acc_norm" if cfg.prefer_acc_norm and TASKS[task].acc_norm else "acc"
        row[task] = 100 * res[task][metric]
        accs.append(row[task])
    if accs:
        row["avg"] = sum(accs) / len(accs)
    for task in ("wikitext2", "c4"):
        if task in res:
            row[task] = res[task]["ppl"]
    return row


def _recovered(value, rtn, fp, higher_is_better: bool):
    """(value - rtn) / (fp - rtn) in %, or None when RTN lost nothing to recover (at n = 50 examples
    per task RTN's zero-shot average can sit above FP's: the ratio would then be noise with a sign)."""
    if None in (value, rtn, fp) or (fp <= rtn if higher_is_better else fp >= rtn):
        return None
    return 100 * (value - rtn) / (fp - rtn)


def add_recovered(rows: list) -> None:
    """Recovered % of the FP -> RTN gap, for every row that is neither FP nor RTN (QAT, SmoothQuant,
    GPTQ), against the RTN row of the same setting: `recovered` on the zero-shot average,
    `recovered_ppl` on WikiText-2 perplexity, both (row - RTN) / (FP - RTN); none where RTN is not
    worse than FP."""
    fp = next((r for r in rows if r["method"] == "FP"), {})
    for row in rows:
        if row["method"] in ("FP", "RTN"):
            continue
        rtn = next((r for r in rows if r["method"] == "RTN" and r["setting"] == row["setting"]), {})
        for key, metric, higher in (("recovered", "avg", True), ("recovered_ppl", "wikitext2", False)):
            value = _recovered(row.get(metric), rtn.get(metric), fp.get(metric), higher)
            if value is not None:
                row[key] = value


def markdown(rows: list, cfg: TableConfig) -> str:
    cols = [t for t in ZERO_SHOT_TASKS if t in cfg.tasks] + ["avg", "wikitext2", "c4", "recovered", "recovered_ppl"]
    heads = [NAMES.get(c, c) for c in cols[:-5]] + ["Avg", "Wiki2 ppl", "C4 ppl", "recovered % (Avg)",
                                                    "recovered % (Wiki2 ppl)"]
    lines = ["| Method | W-A-KV | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for r in rows:
        cells = [f"{r[c]:.1f}" if c in r and c not in ("wikitext2", "c4") else
                 (f"{r[c]:.2f}" if c in r else "") for c in cols]
        lines.append(f"| {r['method']} | {r['setting']} | " + " | ".join(cells) + " |")
    note = (f"\n{cfg.model}; limit={cfg.limit} examples per task, ppl_limit={cfg.ppl_limit} windows, "
            f"seqlen={cfg.seqlen}; "
            f"accuracy in %, {'acc_norm where defined' if cfg.prefer_acc_norm else 'acc'}; "
            f"recovered % = (row - RTN) / (FP - RTN) at the same setting.\n")
    return "\n".join(lines) + "\n" + note


def applies(method: str, qcfg: QuantConfig) -> bool:
    """SmoothQuant moves activation outliers into the weights: it needs quantized activations."""
    return not (method == "smoothquant" and qcfg.a_bits >= 16)


def _student_name(folder: str) -> str:
    """Row name of a QAT student: its folder, or the run folder above it for `<run>/student`
    (so runs/w4a8kv8/student and runs/ce/student get distinct rows and cache entries)."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "student" else path.name


def run(cfg: TableConfig) -> list:
    """Evaluate every missing row and write the table (markdown) and its rows (JSON)."""
    from models import read_quant_config

    students = []
    for folder in cfg.qat:
        qcfg = read_quant_config(folder)
        if qcfg is None:
            raise FileNotFoundError(f"QAT student {folder} has no quant_config.json")
        students.append((folder, qcfg, f"{qcfg.w_bits}-{qcfg.a_bits}-{qcfg.kv_bits}"))

    def qat_rows(setting: Optional[str]) -> list:
        """QAT rows at `setting` (None: those at no setting of cfg.settings), after its PTQ rows."""
        out = []
        for folder, qcfg, tag in students:
            if tag == setting or (setting is None and tag not in cfg.settings):
                name = _student_name(folder)
                payload = cached_results(cfg, f"qat-{name}-{qcfg.tag()}", folder, qcfg)
                if payload is not None:
                    out.append(table_row(cfg, f"QAT ({name})", tag, payload))
        return out

    rows = []
    payload = cached_results(cfg, "fp", cfg.model, QuantConfig()) if "fp" in cfg.methods else None
    if payload is not None:
        rows.append(table_row(cfg, "FP", "16-16-16", payload))
    for setting in cfg.settings:
        qcfg = parse_setting(setting, cfg.quant)
        for method in (m for m in cfg.methods if m != "fp"):
            if not applies(method, qcfg):
                logger.info("%s does not apply at %s (activations not quantized): no row", method, setting)
                continue
            row = f"{method}-{qcfg.tag()}"
            if cfg.only_cached and not (Path(cfg.cache_dir) / "results" / f"{row}.json").is_file():
                logger.info("%s: not cached, left out (only_cached)", row)
                continue
            model = cfg.model if method == "rtn" else ptq_student(cfg, method, qcfg)
            payload = cached_results(cfg, row, model, qcfg)
            if payload is None:
                continue
            rows.append(table_row(cfg, {"rtn": "RTN", "smoothquant": "SmoothQuant", "gptq": "GPTQ"}[method],
                                  setting, payload))
        rows += qat_rows(setting)
    rows += qat_rows(None)
    add_recovered(rows)
    out = Path(cfg.output)
    atomic_write_text(out, markdown(rows, cfg))
    write_json(out.with_suffix(".json"), rows)
    print(markdown(rows, cfg))
    return rows


def main(argv) -> int:
    from utils.config import run_entry_point

    return run_entry_point("run_table.sh", TableConfig, run, argv)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
