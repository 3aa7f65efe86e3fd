"""Paired difference of two evaluated rows on the same windows / examples, with 95 % bootstrap intervals.

    python scripts/paired_delta.py runs/table/results/qat-lsq-W4A8KV8.json runs/table/results/qat-w4a8kv8-W4A8KV8.json

The table (run_table.sh) compares every row with FP and RTN; this compares any two result files that
evaluate.py / run_table.sh wrote (they hold each perplexity window's NLL and each example's outcome):
per task A - B, perplexity on the same windows (windows resampled together) and accuracy in points on
the same examples (utils/eval/stats.py), and for perplexity also (A - B) / B in %. Prints markdown rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.eval.stats import interval, paired_diff_ci, paired_ppl  # noqa: E402


def delta(a: dict, b: dict) -> dict:
    """Per task {"a", "b", "diff", "ci95", "rel_pct"?} of two result dicts (their "results" sections)."""
    out = {}
    for task in (t for t in a if t in b):
        ra, rb = a[task], b[task]
        if "per_window" in ra and "per_window" in rb:
            if ra["per_window"]["tokens"] != rb["per_window"]["tokens"]:
                raise ValueError(f"{task}: the two rows were evaluated on different windows")
            s = paired_ppl(np.array([ra["per_window"]["nll"], rb["per_window"]["nll"]]),
                           np.array([ra["per_window"]["tokens"], rb["per_window"]["tokens"]]))
            out[task] = {"a": ra["ppl"], "b": rb["ppl"], "diff": ra["ppl"] - rb["ppl"], "ci95": interval(s[0] - s[1]),
                         "rel_pct": 100 * (ra["ppl"] / rb["ppl"] - 1), "rel_ci95": interval(100 * (s[0] / s[1] - 1))}
        elif "per_example" in ra and "per_example" in rb:
            key = "acc_norm" if "acc_norm" in ra["per_example"] else "acc"
            x, y = (np.array([int(c) for c in r["per_example"][key]]) for r in (ra, rb))
            if len(x) != len(y):
                raise ValueError(f"{task}: the two rows were evaluated on different examples")
            out[task] = {"a": 100 * x.mean(), "b": 100 * y.mean(), "diff": 100 * (x.mean() - y.mean()),
                         "ci95": paired_diff_ci(x, y), "n": len(x), "metric": key}
    return out


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    a, b = (json.loads(Path(p).read_text()) for p in argv)
    print(f"A = {argv[0]}\nB = {argv[1]}\n\n| task | A | B | A - B [95 %] | (A - B) / B |\n|---|---:|---:|---:|---:|")
    for task, d in delta(a["results"], b["results"]).items():
        ci = "[{:+.2f}, {:+.2f}]".format(*d["ci95"])
        rel = "{:+.2f} % [{:+.2f}, {:+.2f}]".format(d["rel_pct"], *d["rel_ci95"]) if "rel_pct" in d else ""
        print(f"| {task} | {d['a']:.2f} | {d['b']:.2f} | {d['diff']:+.2f} {ci} | {rel} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
