"""Which answer a model picks on a two-choice task: the share of one choice, from committed result files.

    record = choices_record("boolq", gold=[1, 0, ...], rows=["fp.json", "rtn-W4A8KV8.json"], source=...)
    text = choices_markdown(record, lambda name: json.loads((folder / name).read_text()))

A result file keeps each example's outcome (`per_example[metric]`, a '0'/'1' string), not the
choice the model picked; on a two-choice task the two are the same information given the gold
labels: a correct example picked the gold choice, a wrong one the other. So the share of a choice
(BoolQ: "yes") is computed from the row files and the gold labels, which the record keeps with the
data file's fingerprint: a table of choice shares (X.md beside X.choices.json, written by
scripts/choice_shares.py) is recomputed and checked by scripts/sync_results.py without the data.

Why: on BoolQ the accuracy of a 135M model mostly measures its yes/no bias (docs/RESULTS.md
§11.3), and every quantizer moves that bias its own way, so the shares belong next to the accuracies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from utils.eval import stats
from utils.eval.tasks import ZERO_SHOT_TASKS

CHOICES_SUFFIX = ".choices.json"
BINARY_TASKS = {"boolq": ("no", "yes"), "piqa": ("sol1", "sol2"), "winogrande": ("option1", "option2")}


def picked(correct: Sequence[int], gold: Sequence[int]) -> np.ndarray:
    """The choice (0 or 1) picked on each example of a two-choice task: gold where correct, else the other."""
    correct, gold = np.asarray(correct, dtype=np.int8), np.asarray(gold, dtype=np.int8)
    if correct.shape != gold.shape:
        raise ValueError(f"{correct.size} outcomes but {gold.size} gold labels: not the same examples")
    if np.any((gold != 0) & (gold != 1)):
        raise ValueError("gold labels of a two-choice task must be 0 or 1")
    return np.where(correct == 1, gold, 1 - gold)


def share(indicator: np.ndarray, task: str) -> dict:
    """{"pct", "stderr", "ci95", "n"} of a 0/1 indicator [n]: its mean in %, binomial standard error and
    95 % bootstrap interval (the task's own resample stream, as the accuracy tables draw it)."""
    indicator = np.asarray(indicator, dtype=float)
    n = indicator.size
    counts = stats.resample_counts(n, stratum=ZERO_SHOT_TASKS.index(task))
    return {"pct": 100 * float(indicator.mean()), "stderr": 100 * stats.binomial_stderr(float(indicator.mean()), n),
            "ci95": stats.interval(stats.resampled_accuracy(indicator, counts)), "n": n}


def choices_record(task: str, gold: Sequence[int], rows: Sequence[str], source: dict, choice: int = 1,
                   metric: str = "acc") -> dict:
    """What a choice-share table is made from: the task, the choice counted, the metric whose outcomes
    give the pick, the gold labels (a '0'/'1' string), where they came from, and the row files."""
    if task not in BINARY_TASKS:
        raise ValueError(f"{task}: choice shares need a two-choice task ({', '.join(BINARY_TASKS)})")
    if choice not in (0, 1):
        raise ValueError(f"choice must be 0 or 1, got {choice}")
    return {"task": task, "choice": choice, "choice_name": BINARY_TASKS[task][choice], "metric": metric,
            "gold": "".join(str(int(g)) for g in gold), "source": source, "rows": list(rows)}


def _label(payload: dict, name: str) -> str:
    """'stem | W-A-KV' of a row file (an FP row has no quant section: 16-16-16)."""
    quant = payload.get("quant") or {}
    bits = [quant.get(key) for key in ("w_bits", "a_bits", "kv_bits")]
    return f"{Path(name).stem} | {'16-16-16' if None in bits else '-'.join(map(str, bits))}"


def choices_markdown(record: dict, load_results: Callable[[str], dict]) -> str:
    """The table of a choices record: per row file its accuracy and the share of the counted choice,
    and the share of that choice among the gold labels."""
    task, choice, metric = record["task"], record["choice"], record["metric"]
    gold = np.array([int(c) for c in record["gold"]], dtype=np.int8)
    name = f'"{record["choice_name"]}"'
    lines = [f"| row | W-A-KV | n | {metric} % | {name} share % ± se [95 %] |", "|---|---|---:|---:|---:|"]
    for row in record["rows"]:
        payload = load_results(row)
        outcomes = payload["results"][task]["per_example"][metric]
        correct = np.array([int(c) for c in outcomes], dtype=np.int8)
        if len(correct) > len(gold):
            raise ValueError(f"{row}: {len(correct)} {task} examples, more than the record's {len(gold)} labels")
        s = share(picked(correct, gold[: len(correct)]) == choice, task)
        lines.append(f"| {_label(payload, row)} | {s['n']} | {100 * correct.mean():.1f} "
                     f"| {s['pct']:.1f} ± {s['stderr']:.1f} [{s['ci95'][0]:.1f}, {s['ci95'][1]:.1f}] |")
    g = share(gold == choice, task)
    lines.append(f"| gold labels | | {g['n']} | | {g['pct']:.1f} |")
    source = record["source"]
    return "\n".join(lines) + (
        f"\n\n{task}: the choice a row picked is the gold one where its "
        f"{metric} outcome is 1, the other one where it is 0; gold labels from {source.get('where', '?')} "
        f"({source.get('fingerprint', '?')}), the first n of them for a row on n examples. ±: binomial standard "
        f"error; [lo, hi]: 95 % bootstrap interval ({stats.RESAMPLES} resamples, seed {stats.SEED}).\n")


def choices_table(record_path) -> Path:
    """The table `X.md` of a `X.choices.json` record."""
    record_path = Path(record_path)
    return record_path.with_name(record_path.name[: -len(CHOICES_SUFFIX)] + ".md")


def rebuild_choices(record_path) -> tuple[Path, str]:
    """(table path, its text recomputed) of a `X.choices.json` record; row files are named relative to it."""
    record_path = Path(record_path)
    record = json.loads(record_path.read_text())
    return choices_table(record_path), choices_markdown(
        record, lambda name: json.loads((record_path.parent / name).read_text()))
