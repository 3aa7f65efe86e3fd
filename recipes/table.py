"""The paper's results table: methods x W-A-KV settings -> 8 zero-shot tasks, average, perplexities.

    bash run_table.sh eval.limit=200 settings=[4-8-8,8-8-8] methods=[fp,rtn,smoothquant,gptq]
    bash run_table.sh config=configs/grid.yaml qat=[runs/w4a8kv8/student]

Sections: `eval` is evaluate.py's schema (tasks, limit, seqlen, data_dir, ...) and `ptq` is
quantize_ptq.py's (calibration, SmoothQuant alpha, GPTQ options); the table sets their model,
output and quant per row. Each row is an evaluate.py run whose results JSON lives in
`cache_dir/results/<row>.json` (or `results_dir/<row>.json`), reused task by task under the same key
(the evaluation settings and the model's content fingerprint: utils/eval/cache.py). PTQ students are built once
per PTQ config under `cache_dir/students/<method>-<tag>-<hash of the PTQ config>`. QAT rows come
from given student folders, at their saved setting. Accuracy per task: acc_norm where the harness
defines it (`prefer_acc_norm`), else acc. "recovered %" of a QAT / SmoothQuant / GPTQ row =
(row - RTN) / (FP - RTN) at the same setting (utils/eval/report.py). SmoothQuant rows are only made
where activations are quantized (A < 16).

Row labels say what made each row (`row_label`): a PTQ row its calibration source and the method's
choices ("GPTQ (data-free)", "GPTQ (wikitext2, act-order)", "SmoothQuant (data-free, alpha=0.8
(auto))", "+down" for SmoothQuant's down_proj variant), a QAT row its straight-through estimator
("QAT (run, identity STE)" or "QAT (run, ste_clip)"). Two rows of one method (e.g. GPTQ calibrated
on generated text and on WikiText-2) come from a named variant: `ptq_overrides: {gptq_wikitext2:
{method: gptq, calib: wikitext2}}` with `methods=[..., gptq, gptq_wikitext2]`.

Long file: the schema, its checks and how each kind of row (FP, PTQ, QAT, and a row whose student is
not on this machine, taken from its committed results file) is found stay together.
"""

from __future__ import annotations

import logging
import operator
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from models import read_quant_config
from quant.config import QuantConfig
from quant.errors import InputFileError, UserError
from recipes import evaluate, ptq
from recipes.evaluate import EvalConfig
from recipes.ptq import PTQConfig
from utils.cli import run_entry_point
from utils.config import to_dict, with_overrides
from utils.eval.cache import read_payload
from utils.eval.report import add_recovered, source_labels, table_row, write_table
from utils.provenance import config_hash

logger = logging.getLogger(__name__)

DEFAULT_SETTINGS = ["4-8-4", "4-8-8", "4-6-16", "4-8-16", "4-16-16", "8-8-4", "8-8-8", "8-8-16"]
PTQ_METHODS = ("rtn", "smoothquant", "gptq")
LABELS = {"rtn": "RTN", "smoothquant": "SmoothQuant", "gptq": "GPTQ"}
# Section fields the table sets per row.
WIRED = {"eval": ("model", "output", "quant"), "ptq": ("method", "model", "output_dir", "quant")}


@dataclass
class TableConfig:
    """Args:
    model: the full-precision model (FP and RTN rows, PTQ students' start).
    settings: W-A-KV triples for the PTQ methods; methods: fp, rtn, smoothquant, gptq.
    qat: trained student folders (one QAT row each, at their saved setting).
    prefer_acc_norm: acc_norm where a task defines it, else acc.
    cache_dir: students and per-row results; output: the markdown table (beside it: its rows as JSON and
        <output>.sources.json, what it was made from: scripts/sync_results.py rebuilds the table from it).
    results_dir: where the per-row results JSONs live (null: cache_dir/results); point it into a committed
        results/ folder to keep the rows (and their reuse by key) beside the documents that quote them.
    only_cached: leave out (with a log line) every row not yet in the cache instead of computing it.
        (Either way, a row whose student is not on this machine is taken from its results file when that
        file is complete under the key it records: `recorded_row`.)
    quant: base grid of the settings (granularity, kv_position, ...); bits come from `settings`.
    eval, ptq: evaluate.py's and quantize_ptq.py's schemas; `WIRED` fields are set per row.
    ptq_overrides: method -> PTQ keys that differ for that method, e.g. {gptq: {calib: wikitext2}};
        a key that is not a method names a variant row with its own `method`, listed in `methods`.
    """

    model: str = "smollm2-135m"
    settings: List[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    methods: List[str] = field(default_factory=lambda: ["fp", *PTQ_METHODS])
    qat: List[str] = field(default_factory=list)
    prefer_acc_norm: bool = True
    cache_dir: str = "runs/table"
    output: str = "runs/table/table.md"
    results_dir: Optional[str] = None
    only_cached: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ptq: PTQConfig = field(default_factory=PTQConfig)
    ptq_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in ("fp", *PTQ_METHODS, *self.ptq_overrides)]
        if bad:
            raise UserError(f"unknown method(s) {bad}; use fp, rtn, smoothquant, gptq (QAT rows: qat=[folders])")
        for setting in self.settings:
            parse_setting(setting, self.quant)
        for method, keys in self.ptq_overrides.items():
            if base_method(self, method) not in PTQ_METHODS[1:]:
                raise UserError(f"ptq_overrides.{method}: not a PTQ method with settings (use smoothquant, gptq, "
                                f"or a variant name with `method: smoothquant|gptq`)")
            ptq_config(self, method, QuantConfig())  # validates the keys and values
        for section, names in WIRED.items():
            value, default = getattr(self, section), type(getattr(self, section))()
            for name in names:
                if operator.attrgetter(name)(value) != operator.attrgetter(name)(default):
                    raise UserError(f"{section}.{name} is set by the table for each row; leave it out")


def parse_setting(text: str, base: QuantConfig) -> QuantConfig:
    """'4-8-8' -> base with w_bits=4, a_bits=8, kv_bits=8."""
    try:
        w, a, kv = (int(v) for v in text.split("-"))
    except ValueError:
        raise UserError(f"setting {text!r} is not W-A-KV, e.g. 4-8-8") from None
    return replace(base, w_bits=w, a_bits=a, kv_bits=kv)


def setting_of(qcfg: QuantConfig) -> str:
    return f"{qcfg.w_bits}-{qcfg.a_bits}-{qcfg.kv_bits}"


def rows_dir(cfg: TableConfig) -> Path:
    """The folder of the per-row results JSONs."""
    return Path(cfg.results_dir) if cfg.results_dir else Path(cfg.cache_dir) / "results"


def row_file(row: str) -> str:
    """The results file of row `row` (under `rows_dir`)."""
    return f"{row}.json"


def results_row(cfg: TableConfig, label: str, setting: str, row: str, payload: dict) -> dict:
    """The table row of row `row`'s results, naming its results file (`_source`, for the sources record)."""
    return {**table_row(label, setting, payload["results"], cfg.eval.tasks, cfg.prefer_acc_norm),
            "_source": row_file(row)}


def row_results(cfg: TableConfig, row: str, model: str, quant: QuantConfig) -> Optional[dict]:
    """One row's results JSON (evaluate.py, reusing what is cached under the same key); None when it
    is not all cached and `cfg.only_cached`."""
    ecfg = replace(cfg.eval, model=model, quant=quant, output=str(rows_dir(cfg) / row_file(row)))
    payload = evaluate.cached_payload(ecfg)
    if payload is None and cfg.only_cached:
        logger.info("%s: not cached for %s, left out (only_cached)", row, ecfg.tasks)
    return payload if payload is not None or cfg.only_cached else evaluate.run(ecfg)


def recorded_row(cfg: TableConfig, row: str, model: str, quant: QuantConfig) -> Optional[dict]:
    """Row `row`'s results file, complete, when its student `model` is not on this machine (students are
    not committed; their rows are): evaluate.recorded_payload checks the path, the tasks and the key (the
    evaluation settings with the model fingerprint the file records), never the weights. None otherwise."""
    ecfg = replace(cfg.eval, model=model, quant=quant, output=str(rows_dir(cfg) / row_file(row)))
    payload = evaluate.recorded_payload(ecfg)
    if payload is not None:
        logger.info("%s: student %s is not on this machine; row taken from %s (complete under its recorded "
                    "key, model fingerprint %s)", row, model, ecfg.output, payload["provenance"]["inputs"]["model"])
    return payload


def base_method(cfg: TableConfig, method: str) -> str:
    """The PTQ method of a `methods` entry: itself, or a variant's `ptq_overrides.<name>.method`."""
    return str(cfg.ptq_overrides.get(method, {}).get("method", method))


def quantizer_suffix(qcfg: QuantConfig) -> str:
    """"-LSQ", "-ternary", "-MSE" (searched clipping), "-clip" (learned activation / KV clip ratios) or ""
    (MinMax, the paper's): the quantizers in a row's label and cache name, so that rows of different
    quantizers never share either."""
    names = {"lsq": "-LSQ", "ternary": "-ternary"}
    clip = "-clip" if "learned" in (qcfg.a_clip, qcfg.kv_clip) else ""
    return names.get(qcfg.w_quantizer, "") + ("-MSE" if qcfg.w_init == "mse" else "") + clip


def row_label(method: str, qcfg: QuantConfig, pcfg: Optional[PTQConfig] = None, name: str = "",
              meta: Optional[dict] = None) -> str:
    """The table's name of a row: FP, RTN, "<PTQ method> (<ptq.label_notes>)" from the student's PTQ
    config and metadata, or "QAT (<name>, <STE>)" from the student's quant config."""
    if method == "qat":
        return f"QAT{quantizer_suffix(qcfg)} ({name}, {'ste_clip' if qcfg.ste_clip else 'identity STE'})"
    if pcfg is None or method in ("fp", "rtn"):
        return "FP" if method == "fp" else LABELS[method] + quantizer_suffix(qcfg)
    return f"{LABELS[pcfg.method]} ({', '.join(ptq.label_notes(pcfg, meta))})"


def ptq_config(cfg: TableConfig, method: str, qcfg: QuantConfig) -> PTQConfig:
    """`cfg.ptq` with this row's method, model and setting, and the method's `ptq_overrides`."""
    pcfg = replace(cfg.ptq, method=base_method(cfg, method), model=cfg.model, quant=qcfg,
                   data_dir=cfg.ptq.data_dir if cfg.ptq.data_dir is not None else cfg.eval.data_dir)
    return with_overrides(pcfg, cfg.ptq_overrides[method]) if method in cfg.ptq_overrides else pcfg


def ptq_student_dir(cfg: TableConfig, method: str, qcfg: QuantConfig) -> Path:
    """Where the PTQ student for (method, setting, PTQ config) lives: named by a hash of its PTQ config."""
    pcfg = ptq_config(cfg, method, qcfg)
    key = config_hash({k: v for k, v in to_dict(pcfg).items() if k != "output_dir"})[:8]
    return Path(cfg.cache_dir) / "students" / f"{method}-{qcfg.tag()}-{key}"


def ptq_student(cfg: TableConfig, method: str, qcfg: QuantConfig, build: bool = True) -> Optional[str]:
    """The PTQ student folder for (method, setting, PTQ config), built once and reused while it was built
    from the inputs used now (model fingerprint, calibration record: ptq.stale_inputs); a stale one is
    rebuilt, or not used when not `build` (None: missing or stale, and not `build`)."""
    pcfg, out = ptq_config(cfg, method, qcfg), ptq_student_dir(cfg, method, qcfg)
    if (out / "config.json").is_file():
        stale = ptq.stale_inputs(out, pcfg)
        if not stale:
            return str(out)
        logger.warning("%s was built from other inputs than now (%s differ): %s", out, ", ".join(stale),
                       "rebuilding it" if build else "not used")
    if not build:
        return None
    shutil.rmtree(out, ignore_errors=True)  # a stale or half-written folder (no meta counts as stale)
    ptq.run(replace(pcfg, output_dir=str(out)))
    return str(out)


def applies(method: str, qcfg: QuantConfig) -> bool:
    """SmoothQuant moves activation outliers into the weights: it needs quantized activations."""
    return not (method == "smoothquant" and qcfg.a_bits >= 16)


def _student_name(folder: str) -> str:
    """Row name of a QAT student: its folder, or the run folder above it for `<run>/student`
    (so runs/w4a8kv8/student and runs/ce/student get distinct rows and cache entries)."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "student" else path.name


def _recorded_students(cfg: TableConfig, folder: str) -> list:
    """(folder, quant config, payload) of each complete results file `qat-<name>-<tag>.json` recorded for
    the QAT student `folder`, which is not on this machine."""
    found, name = [], _student_name(folder)
    for path in sorted(rows_dir(cfg).glob(f"qat-{name}-*.json")):
        quant = read_payload(path).get("quant")
        qcfg = QuantConfig.from_dict(quant) if isinstance(quant, dict) else None
        if qcfg is not None and path.name == row_file(f"qat-{name}-{qcfg.tag()}"):
            payload = recorded_row(cfg, path.stem, folder, qcfg)
            found += [(folder, qcfg, payload)] if payload is not None else []
    return found


def _students(cfg: TableConfig) -> list:
    """(folder, quant config, recorded payload or None) of each QAT student: read from its folder, or,
    for a folder not on this machine, from its complete results files (`_recorded_students`)."""
    students = []
    for folder in cfg.qat:
        if not Path(folder).exists() and (recorded := _recorded_students(cfg, folder)):
            students += recorded
            continue
        qcfg = read_quant_config(folder)
        if qcfg is None:
            raise InputFileError(f"QAT student {folder} has no quant_config.json (and no complete results file "
                                 f"qat-{_student_name(folder)}-<tag>.json in {rows_dir(cfg)})")
        students.append((folder, qcfg, None))
    return students


def _qat_rows(cfg: TableConfig, students: list, setting: Optional[str]) -> list:
    """QAT rows at `setting` (None: those at no setting of cfg.settings)."""
    rows = []
    for folder, qcfg, recorded in students:
        tag = setting_of(qcfg)
        if tag == setting or (setting is None and tag not in cfg.settings):
            name = _student_name(folder)
            row = f"qat-{name}-{qcfg.tag()}"
            payload = recorded if recorded is not None else row_results(cfg, row, folder, qcfg)
            if payload is not None:
                rows.append(results_row(cfg, row_label("qat", qcfg, name=name), tag, row, payload))
    return rows


def _ptq_rows(cfg: TableConfig, setting: str) -> list:
    rows, qcfg, labels = [], parse_setting(setting, cfg.quant), source_labels(cfg.output)
    for method in (m for m in cfg.methods if m != "fp"):
        if not applies(base_method(cfg, method), qcfg):
            logger.info("%s does not apply at %s (activations not quantized): no row", method, setting)
            continue
        row = f"{method}{quantizer_suffix(qcfg).lower()}-{qcfg.tag()}"
        model = cfg.model if method == "rtn" else ptq_student(cfg, method, qcfg, build=False)
        pcfg = None if method == "rtn" else ptq_config(cfg, method, qcfg)
        if model is None:  # not on this machine: its committed results file, else build it (not only_cached)
            folder = str(ptq_student_dir(cfg, method, qcfg))
            payload = recorded_row(cfg, row, folder, qcfg)
            if payload is not None:
                label = labels.get(row_file(row)) or row_label(method, qcfg, pcfg)
                rows.append(results_row(cfg, label, setting, row, payload))
                continue
            if cfg.only_cached:
                logger.info("%s: no student built with this PTQ config, left out (only_cached)", row)
                continue
            model = ptq_student(cfg, method, qcfg)
        payload = row_results(cfg, row, model, qcfg)
        if payload is not None:
            label = row_label(method, qcfg, pcfg, meta=None if pcfg is None else ptq.read_ptq_meta(model))
            rows.append(results_row(cfg, label, setting, row, payload))
    return rows


def notes(cfg: TableConfig) -> list[str]:
    """The table's footnote: what was evaluated (only the parts that apply to its tasks) and how to read it."""
    e = cfg.eval
    zero_shot = [t for t in e.tasks if t not in evaluate.PPL_TASKS]
    parts = [cfg.model]
    if zero_shot:
        limits = [f"limit={e.limit} examples per task"]
        limits += [f"{task} {n}" for task, n in sorted(e.task_limits.items()) if task in zero_shot]
        parts.append(", ".join(limits))
    if len(zero_shot) < len(e.tasks):
        parts.append(f"ppl_limit={e.ppl_limit} windows, seqlen={e.seqlen}")
    text = "; ".join(parts) + "; "
    if zero_shot:
        text += f"accuracy in %, {'acc_norm where defined' if cfg.prefer_acc_norm else 'acc'}; "
    return [text + "recovered % = (row - RTN) / (FP - RTN) at the same setting, with its paired 95 % interval."]


def run(cfg: TableConfig) -> list:
    """Evaluate every missing row and write the table (markdown) and its rows (JSON)."""
    students, rows = _students(cfg), []
    if "fp" in cfg.methods:
        payload = row_results(cfg, "fp", cfg.model, QuantConfig())
        if payload is not None:
            rows.append(results_row(cfg, "FP", "16-16-16", "fp", payload))
    for setting in cfg.settings:
        rows += _ptq_rows(cfg, setting) + _qat_rows(cfg, students, setting)
    rows += _qat_rows(cfg, students, None)
    add_recovered(rows)
    print(write_table(rows, cfg.eval.tasks, cfg.output, notes(cfg), prefer_acc_norm=cfg.prefer_acc_norm))
    return rows


if __name__ == "__main__":
    sys.exit(run_entry_point("run_table.sh", TableConfig, run, sys.argv[1:]))
