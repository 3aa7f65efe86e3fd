"""The one writer of result tables: rows of metrics -> a markdown table + the rows as JSON.

    rows = [table_row("FP", "16-16-16", fp["results"], tasks), table_row("RTN", "4-8-8", rtn["results"], tasks)]
    add_recovered(rows)
    write_table(rows, tasks, "runs/table/table.md", notes=["smollm2-135m; first 50 examples per task"])

A row holds accuracy in % per zero-shot task (acc_norm where the harness defines it, unless
`prefer_acc_norm=False`), their average `avg`, perplexity per perplexity task, and for rows that are
neither FP nor RTN the "recovered %" of the FP -> RTN gap at the same setting (`recovered` on the
average, `recovered_ppl` on WikiText-2 perplexity). Used by evaluate.py, run_table.sh and the main job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from utils.eval.tasks import PPL_TASKS, TASKS, ZERO_SHOT_TASKS
from utils.io import atomic_write_text, write_json

NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "siqa": "SIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
         "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "avg": "Avg",
         "wikitext2": "Wiki2 ppl", "c4": "C4 ppl", "recovered": "recovered % (Avg)",
         "recovered_ppl": "recovered % (Wiki2 ppl)"}


def table_row(method: str, setting: str, results: dict, tasks: Sequence[str], prefer_acc_norm: bool = True) -> dict:
    """One table row from an evaluation's `results` (task -> metrics), for the tasks in `tasks`."""
    row, accs = {"method": method, "setting": setting}, []
    for task in (t for t in ZERO_SHOT_TASKS if t in tasks and t in results):
        metric = "acc_norm" if prefer_acc_norm and TASKS[task].acc_norm else "acc"
        row[task] = 100 * results[task][metric]
        accs.append(row[task])
    if accs:
        row["avg"] = sum(accs) / len(accs)
    for task in (t for t in PPL_TASKS if t in tasks and t in results):
        row[task] = results[task]["ppl"]
    return row


def _recovered(value, rtn, fp, higher_is_better: bool) -> Optional[float]:
    """(value - rtn) / (fp - rtn) in %, or None when RTN lost nothing to recover (at n = 50 examples
    per task RTN's zero-shot average can sit above FP's: the ratio would then be noise with a sign)."""
    if None in (value, rtn, fp) or (fp <= rtn if higher_is_better else fp >= rtn):
        return None
    return 100 * (value - rtn) / (fp - rtn)


def add_recovered(rows: list) -> None:
    """Recovered % of the FP -> RTN gap for every row that is neither FP nor RTN, against the RTN row
    of the same setting; none where RTN is not worse than FP."""
    fp = next((r for r in rows if r["method"] == "FP"), {})
    for row in rows:
        if row["method"] in ("FP", "RTN"):
            continue
        rtn = next((r for r in rows if r["method"] == "RTN" and r["setting"] == row["setting"]), {})
        for key, metric, higher in (("recovered", "avg", True), ("recovered_ppl", "wikitext2", False)):
            value = _recovered(row.get(metric), rtn.get(metric), fp.get(metric), higher)
            if value is not None:
                row[key] = value


def columns(rows: list, tasks: Sequence[str]) -> list[str]:
    """Zero-shot tasks, Avg (if any), perplexity tasks, then recovered % columns any row has."""
    zero_shot = [t for t in ZERO_SHOT_TASKS if t in tasks]
    cols = zero_shot + (["avg"] if zero_shot else []) + [t for t in PPL_TASKS if t in tasks]
    return cols + [k for k in ("recovered", "recovered_ppl") if any(k in r for r in rows)]


def markdown(rows: list, tasks: Sequence[str], notes: Sequence[str] = ()) -> str:
    cols = columns(rows, tasks)
    lines = ["| Method | W-A-KV | " + " | ".join(NAMES.get(c, c) for c in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [(f"{r[c]:.2f}" if c in PPL_TASKS else f"{r[c]:.1f}") if c in r else "" for c in cols]
        lines.append(f"| {r['method']} | {r['setting']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n" if rows else "No evaluation ran: the table has no rows.\n"
    return table + ("\n" + "\n".join(notes) + "\n" if notes else "")


def write_table(rows: list, tasks: Sequence[str], path, notes: Sequence[str] = (), rows_json: bool = True) -> str:
    """Write the markdown table to `path` and, if `rows_json`, the rows to `path` with suffix .json."""
    text = markdown(rows, tasks, notes)
    atomic_write_text(Path(path), text)
    if rows_json:
        write_json(Path(path).with_suffix(".json"), rows)
    return text
