"""The one writer of result tables: rows of metrics -> a markdown table + the rows as JSON.

    rows = [table_row("FP", "16-16-16", fp["results"], tasks), table_row("RTN", "4-8-8", rtn["results"], tasks)]
    add_recovered(rows)
    write_table(rows, tasks, "runs/table/table.md", notes=["smollm2-135m; first 50 examples per task"])

A row holds accuracy in % per zero-shot task (acc_norm where the harness defines it, unless
`prefer_acc_norm=False`) with its standard error (`<task>_stderr`), their average `avg`
(`avg_stderr`: tasks independent), perplexity per perplexity task with its bootstrap interval over
windows (`<task>_ci95`), and `n` (task -> examples or windows). Used by evaluate.py, run_table.sh
and the main job.

Comparisons (`add_recovered`): every row but FP gets `vs_fp` (metric -> {"diff": row - FP,
"ci95"}), and every row that is neither FP nor RTN `vs_rtn` (against the RTN row of the same
setting) and the "recovered %" of the FP -> RTN gap (`recovered` on the average, `recovered_ppl` on
WikiText-2 perplexity) with `recovered_ci95` / `recovered_ppl_ci95`. The intervals are paired
bootstraps over the same examples / windows (utils/eval/stats.py), from the per-example outcomes
and per-window NLLs of the results JSONs; a row whose results lack them (cached by older code) or
whose examples differ (another n) gets no interval rather than a wrong one. The markdown prints
"recovered %" only with its interval, marked "n.s." where the interval spans 0.

Long file: `write_table` and `rebuild_table` (a committed table recomputed from its sources record,
scripts/sync_results.py) must make the same text from the same rows, so both stay beside `markdown`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from utils.eval import stats
from utils.eval.tasks import PPL_TASKS, TASKS, ZERO_SHOT_TASKS
from utils.io import atomic_write_text, write_json

NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "siqa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "avg": "Avg",
         "wikitext2": "Wiki2 ppl", "c4": "C4 ppl", "wikitext2_val": "Wiki2-val ppl", "recovered": "recovered % (Avg)",
         "recovered_ppl": "recovered % (Wiki2 ppl)"}
STRATA = (*ZERO_SHOT_TASKS, *PPL_TASKS)  # a task's place here seeds its resamples (stats.resample_counts)
RECOVERED = (("recovered", "avg", True), ("recovered_ppl", "wikitext2", False))  # key, metric, higher is better
LEGEND = (f"±: standard error (binomial, over the n examples); [lo, hi]: 95 % bootstrap interval "
          f"({stats.RESAMPLES} resamples, seed {stats.SEED}; perplexity: windows resampled); differences and "
          f"recovered %: paired bootstrap on the same examples; n.s.: the interval spans 0.")


# ---- rows ----------------------------------------------------------------------------------------


def _zero_shot_cells(row: dict, samples: dict, results: dict, tasks: Sequence[str], prefer_acc_norm: bool) -> None:
    """Accuracy (%), its stderr and the per-example outcomes of each zero-shot task; then `avg`."""
    done = [t for t in ZERO_SHOT_TASKS if t in tasks and t in results]
    for task in done:
        res = results[task]
        metric = "acc_norm" if prefer_acc_norm and TASKS[task].acc_norm else "acc"
        row[task] = 100 * res[metric]
        if f"{metric}_stderr" in res:
            row[f"{task}_stderr"] = 100 * res[f"{metric}_stderr"]
        if metric in res.get("per_example", {}):
            samples[task] = res["per_example"][metric]
    if done:
        row["avg"] = sum(row[t] for t in done) / len(done)
        if all(f"{t}_stderr" in row for t in done):
            row["avg_stderr"] = math.sqrt(sum(row[f"{t}_stderr"] ** 2 for t in done)) / len(done)


def _ppl_cells(row: dict, samples: dict, results: dict, tasks: Sequence[str]) -> None:
    for task in (t for t in PPL_TASKS if t in tasks and t in results):
        res = results[task]
        row[task] = res["ppl"]
        if "ppl_ci95" in res:
            row[f"{task}_ci95"] = res["ppl_ci95"]
        if "per_window" in res:
            samples[task] = res["per_window"]


def table_row(method: str, setting: str, results: dict, tasks: Sequence[str], prefer_acc_norm: bool = True) -> dict:
    """One table row from an evaluation's `results` (task -> metrics), for the tasks in `tasks`.
    Per-example data ride along under `_samples` (for `add_recovered`; not written to JSON)."""
    row, samples = {"method": method, "setting": setting}, {}
    _zero_shot_cells(row, samples, results, tasks, prefer_acc_norm)
    _ppl_cells(row, samples, results, tasks)
    n = {t: results[t]["n"] for t in tasks if t in results and "n" in results[t]}
    if n:
        row["n"] = n
    if samples:
        row["_samples"] = samples
    return row


# ---- paired comparisons ----------------------------------------------------------------------------


def _outcomes(row: dict, task: str) -> Optional[np.ndarray]:
    """0/1 outcomes of a zero-shot task (stored as a '0'/'1' string, or a list)."""
    value = row.get("_samples", {}).get(task)
    return None if value is None else np.array([int(v) for v in value], dtype=np.int8)


class Bootstrap:
    """Bootstrap samples [R] of each row's metrics on shared resamples: one draw per (task, n), the
    same for every row (so comparisons are paired), each row's samples computed once."""

    def __init__(self):
        self._counts, self._samples = {}, {}

    def _draw(self, task: str, n: int) -> np.ndarray:
        if (task, n) not in self._counts:
            self._counts[task, n] = stats.resample_counts(n, stratum=STRATA.index(task))
        return self._counts[task, n]

    def samples(self, row: dict, metric: str) -> Optional[np.ndarray]:
        """[R] samples of `metric` ("avg": the mean of the tasks' samples), None without the data."""
        if (id(row), metric) not in self._samples:
            self._samples[id(row), metric] = self._compute(row, metric)
        return self._samples[id(row), metric]

    def _compute(self, row: dict, metric: str) -> Optional[np.ndarray]:
        if metric == "avg":
            per_task = [self.samples(row, t) for t in ZERO_SHOT_TASKS if t in row]
            return None if not per_task or any(x is None for x in per_task) else np.mean(per_task, axis=0)
        data = row.get("_samples", {}).get(metric)
        if data is None:
            return None
        if metric in PPL_TASKS:
            return stats.resampled_ppl(data["nll"], data["tokens"], self._draw(metric, len(data["nll"])))
        correct = _outcomes(row, metric)
        return stats.resampled_accuracy(correct, self._draw(metric, len(correct)))


def _size(row: dict, task: str):
    """What must match for two rows to be on the same examples: n, or each window's token count."""
    data = row.get("_samples", {}).get(task)
    return None if data is None else tuple(data["tokens"]) if task in PPL_TASKS else len(data)


def _paired_samples(rows: Sequence[dict], metric: str, boot: Bootstrap) -> Optional[list]:
    """Bootstrap samples [R] of `metric` for each of the rows, on the same resampled examples; None
    when a row lacks per-example data or the rows' examples differ (n, or the averaged tasks)."""
    tasks = [t for t in ZERO_SHOT_TASKS if t in rows[0]] if metric == "avg" else [metric]
    if metric == "avg" and any([t for t in ZERO_SHOT_TASKS if t in r] != tasks for r in rows):
        return None
    if any(len({_size(r, t) for r in rows}) > 1 for t in tasks):
        return None
    samples = [boot.samples(r, metric) for r in rows]
    return None if any(x is None for x in samples) else samples


def _comparable(row: dict, ref: dict) -> list[str]:
    metrics = [*ZERO_SHOT_TASKS, "avg", *PPL_TASKS]
    return [m for m in metrics if m in row and m in ref]


def _add_diffs(row: dict, ref: dict, key: str, boot: Bootstrap) -> None:
    """row[key] = {metric: {"diff": row - ref, "ci95": paired interval}} (no ci95 without the data)."""
    diffs = {}
    for metric in _comparable(row, ref):
        diffs[metric] = {"diff": row[metric] - ref[metric]}
        samples = _paired_samples([row, ref], metric, boot)
        if samples is not None:
            diffs[metric]["ci95"] = stats.interval(samples[0] - samples[1])
    if diffs:
        row[key] = diffs


def _recovered(value, rtn, fp, higher_is_better: bool) -> Optional[float]:
    """(value - rtn) / (fp - rtn) in %, or None when RTN lost nothing to recover (at n = 50 examples
    per task RTN's zero-shot average can sit above FP's: the ratio would then be noise with a sign)."""
    if None in (value, rtn, fp) or (fp <= rtn if higher_is_better else fp >= rtn):
        return None
    return 100 * (value - rtn) / (fp - rtn)


def _add_recovered_share(row: dict, rtn: dict, fp: dict, boot: Bootstrap) -> None:
    for key, metric, higher in RECOVERED:
        value = _recovered(row.get(metric), rtn.get(metric), fp.get(metric), higher)
        if value is None:
            continue
        row[key] = value
        samples = _paired_samples([row, rtn, fp], metric, boot)
        if samples is not None:
            row[f"{key}_ci95"] = stats.interval(stats.recovered(*samples))


def add_recovered(rows: list) -> None:
    """Paired differences vs FP for every row but FP; vs RTN at the same setting and recovered % of
    the FP -> RTN gap for every row that is neither FP nor RTN (none where RTN is not worse than FP)."""
    fp, boot = next((r for r in rows if r["method"] == "FP"), None), Bootstrap()
    for row in rows:
        if row["method"] == "FP":
            continue
        if fp is not None:
            _add_diffs(row, fp, "vs_fp", boot)
        rtn = next((r for r in rows if r["method"] == "RTN" and r["setting"] == row["setting"]), None)
        if row["method"] == "RTN" or rtn is None:
            continue
        _add_diffs(row, rtn, "vs_rtn", boot)
        _add_recovered_share(row, rtn, fp or {}, boot)


# ---- markdown --------------------------------------------------------------------------------------


def columns(rows: list, tasks: Sequence[str]) -> list[str]:
    """Zero-shot tasks, Avg (if any), perplexity tasks, then recovered % columns some row has an
    interval for (recovered % is printed only with its interval)."""
    zero_shot = [t for t in ZERO_SHOT_TASKS if t in tasks]
    cols = zero_shot + (["avg"] if zero_shot else []) + [t for t in PPL_TASKS if t in tasks]
    return cols + [k for k, _, _ in RECOVERED if any(f"{k}_ci95" in r for r in rows)]


def _interval(ci: Sequence[float], fmt: str) -> str:
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]" + (" n.s." if stats.spans_zero(ci) else "")


def cell(row: dict, col: str) -> str:
    """`62.3 ± 4.1` (accuracy ± stderr), `30.12 [28.40, 32.05]` (ppl, 95 % interval), `75 [40, 110]`
    (recovered %, only with its interval; `n.s.` where it spans 0)."""
    if col not in row:
        return ""
    if col in ("recovered", "recovered_ppl"):
        ci = row.get(f"{col}_ci95")
        return f"{row[col]:.0f} {_interval(ci, '.0f')}" if ci else ""
    if col in PPL_TASKS:
        ci = row.get(f"{col}_ci95")
        return f"{row[col]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    se = row.get(f"{col}_stderr")
    return f"{row[col]:.1f}" + (f" ± {se:.1f}" if se is not None else "")


def _diff_cell(diff: Optional[dict], col: str) -> str:
    if diff is None:
        return ""
    fmt = "+.2f" if col in PPL_TASKS else "+.1f"
    return f"{diff['diff']:{fmt}}" + (f" {_interval(diff['ci95'], fmt)}" if diff.get("ci95") else "")


def comparisons(rows: list) -> list[str]:
    """Markdown lines: each row's differences vs FP and vs RTN (Avg and perplexities), with intervals."""
    pairs = [(r, ref) for r in rows for ref in ("vs_fp", "vs_rtn") if ref in r]
    cols = [c for c in ("avg", *PPL_TASKS) if any(c in r[ref] for r, ref in pairs)]
    if not cols:
        return []
    lines = ["", "Differences (row - reference; accuracy in points, perplexity in ppl; paired 95 % intervals):", "",
             "| Method | W-A-KV | vs | " + " | ".join(f"Δ {NAMES[c]}" for c in cols) + " |",
             "|---|---|---|" + "---:|" * len(cols)]
    for r, ref in pairs:
        cells = [r["method"], r["setting"], "FP" if ref == "vs_fp" else "RTN", *(_diff_cell(r[ref].get(c), c) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def auto_notes(rows: list, tasks: Sequence[str]) -> list[str]:
    """n per task (every distinct n across rows), the legend, and the rows compared without intervals."""
    ordered = [t for t in (*ZERO_SHOT_TASKS, *PPL_TASKS) if t in tasks]
    notes, ns = [], {t: sorted({r["n"][t] for r in rows if t in r.get("n", {})}) for t in ordered}
    if any(ns.values()):
        notes.append("n per task: " + ", ".join(f"{NAMES.get(t, t)} {'/'.join(map(str, v))}"
                                                + (" windows" if t in PPL_TASKS else "") for t, v in ns.items() if v))
    if any(k.endswith(("_stderr", "_ci95")) for r in rows for k in r):
        notes.append(LEGEND)
    bare = [f"{r['method']} {r['setting']}" for r in rows
            if any("ci95" not in d for ref in ("vs_fp", "vs_rtn") for d in r.get(ref, {}).values())]
    if bare:
        notes.append("No paired interval (and no recovered %) where results lack per-example data, e.g. cached by "
                     "older code (evaluate again with fresh=true), or rows differ in n: " + ", ".join(bare) + ".")
    return notes


def markdown(rows: list, tasks: Sequence[str], notes: Sequence[str] = ()) -> str:
    if not rows:
        table = ["No evaluation ran: the table has no rows."]
    else:
        cols = columns(rows, tasks)
        table = ["| Method | W-A-KV | " + " | ".join(NAMES.get(c, c) for c in cols) + " |",
                 "|---|---|" + "---:|" * len(cols)]
        table += [f"| {r['method']} | {r['setting']} | " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
        table += comparisons(rows)
    notes = [*notes, *auto_notes(rows, tasks)]
    return "\n".join(table) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def public(row: dict) -> dict:
    """The row without its private keys (`_samples`: per-example data)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def sources_path(path) -> Path:
    """Where `write_table` records what a table at `path` was made from (table.md -> table.sources.json)."""
    return Path(path).with_suffix(".sources.json")


def write_table(rows: list, tasks: Sequence[str], path, notes: Sequence[str] = (), rows_json: bool = True,
                prefer_acc_norm: bool = True) -> str:
    """Write the markdown table to `path` and, if `rows_json`, the rows (without per-example data) to
    `path` with suffix .json. Rows that name their results file (`_source`, a file name) are listed,
    with the tasks and notes, in `sources_path(path)`: `rebuild_table` makes the same text from it."""
    text = markdown(rows, tasks, notes)
    atomic_write_text(Path(path), text)
    if rows_json:
        write_json(Path(path).with_suffix(".json"), [public(r) for r in rows])
    if rows and all("_source" in r for r in rows):
        write_json(sources_path(path), {
            "tasks": list(tasks), "prefer_acc_norm": prefer_acc_norm, "notes": list(notes),
            "rows": [{"method": r["method"], "setting": r["setting"], "source": r["_source"]} for r in rows]})
    return text


def source_labels(path) -> dict:
    """results file -> row label in the sources record of the table at `path` ({} when it has none): the
    label of a row whose student (e.g. SmoothQuant's chosen alpha in its metadata) is not on this machine."""
    record = sources_path(path)
    rows = json.loads(record.read_text()).get("rows", []) if record.is_file() else []
    return {r["source"]: r["method"] for r in rows if "source" in r and "method" in r}


def rebuild_table(sources: dict, load_results: Callable[[str], dict]) -> str:
    """The markdown table `write_table` wrote, recomputed from its sources record (`sources_path`) and the
    results files it names (`load_results(file name)` -> the evaluation's JSON, with `results`)."""
    tasks = sources["tasks"]
    rows = [table_row(r["method"], r["setting"], load_results(r["source"])["results"], tasks,
                      sources["prefer_acc_norm"]) for r in sources["rows"]]
    add_recovered(rows)
    return markdown(rows, tasks, sources["notes"])


def paired_delta(a: dict, b: dict) -> dict:
    """Per task of two results sections, A - B on the same windows / examples: {"a", "b", "diff", "ci95"}, and
    for perplexity "rel_pct" / "rel_ci95" ((A - B) / B in %), for accuracy "n" and "metric" (acc_norm where
    both rows have it). Tasks in only one of them are left out; rows on different windows or examples are
    refused (ValueError)."""
    out = {}
    for task in (t for t in a if t in b):
        ra, rb = a[task], b[task]
        if "per_window" in ra and "per_window" in rb:
            if ra["per_window"]["tokens"] != rb["per_window"]["tokens"]:
                raise ValueError(f"{task}: the two rows were evaluated on different windows")
            s = stats.paired_ppl(np.array([ra["per_window"]["nll"], rb["per_window"]["nll"]]),
                                 np.array([ra["per_window"]["tokens"], rb["per_window"]["tokens"]]))
            out[task] = {"a": ra["ppl"], "b": rb["ppl"], "diff": ra["ppl"] - rb["ppl"],
                         "ci95": stats.interval(s[0] - s[1]), "rel_pct": 100 * (ra["ppl"] / rb["ppl"] - 1),
                         "rel_ci95": stats.interval(100 * (s[0] / s[1] - 1))}
        elif "per_example" in ra and "per_example" in rb:
            key = "acc_norm" if "acc_norm" in ra["per_example"] and "acc_norm" in rb["per_example"] else "acc"
            x, y = (np.array([int(c) for c in r["per_example"][key]]) for r in (ra, rb))
            if len(x) != len(y):
                raise ValueError(f"{task}: the two rows were evaluated on different examples")
            out[task] = {"a": 100 * x.mean(), "b": 100 * y.mean(), "diff": 100 * (x.mean() - y.mean()),
                         "ci95": stats.paired_diff_ci(x, y), "n": len(x), "metric": key}
    return out


PAIRED_LEGEND = ("A - B on the same windows / examples (perplexity in ppl, accuracy in points), with its paired "
                 "95 % bootstrap interval (1000 resamples, seed 0); n.s.: the interval spans 0.")


def paired_markdown(pairs: Sequence[Sequence[str]], load_results: Callable[[str], dict]) -> str:
    """One markdown table of paired differences, a row per (pair, task); `pairs` are (A, B) result-file
    names and `load_results(name)` returns such a file's parsed JSON."""
    lines = ["| A | B | task | A | B | A - B [95 %] | (A - B) / B |", "|---|---|---|---:|---:|---:|---:|"]
    for name_a, name_b in pairs:
        a, b = load_results(name_a), load_results(name_b)
        for task, d in paired_delta(a["results"], b["results"]).items():
            rel = f"{d['rel_pct']:+.1f} % [{d['rel_ci95'][0]:+.1f}, {d['rel_ci95'][1]:+.1f}]" if "rel_pct" in d else ""
            task_name = NAMES.get(task, task) + (f" ({d['metric']}, n={d['n']})" if "n" in d else "")
            lines.append(f"| {Path(name_a).stem} | {Path(name_b).stem} | {task_name} | {d['a']:.2f} | {d['b']:.2f} "
                         f"| {d['diff']:+.2f} {_interval(d['ci95'], '+.2f')} | {rel} |")
    return "\n".join(lines) + "\n\n" + PAIRED_LEGEND + "\n"


PAIRS_SUFFIX = ".pairs.json"


def pairs_record(table) -> Path:
    """The record of the pairs behind a paired-differences table `X.md`: `X.pairs.json` beside it."""
    table = Path(table)
    return table.with_name(table.stem + PAIRS_SUFFIX)


def rebuild_pairs(record) -> tuple[Path, str]:
    """(table path, its text recomputed from the result files) of a `X.pairs.json` record
    ({"pairs": [[A, B], ...]}, result files named relative to the record's folder)."""
    record = Path(record)
    pairs = json.loads(record.read_text())["pairs"]
    table = record.with_name(record.name[: -len(PAIRS_SUFFIX)] + ".md")
    return table, paired_markdown(pairs, lambda name: json.loads((record.parent / name).read_text()))
