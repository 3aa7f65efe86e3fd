"""Paired difference of two evaluated rows on the same windows / examples, with 95 % bootstrap intervals.

    python scripts/paired_delta.py runs/table/results/qat-lsq-W4A8KV8.json runs/table/results/qat-w4a8kv8-W4A8KV8.json
    python scripts/paired_delta.py --pairs results/X/paired.md A.json:B.json C.json:D.json ...

The table (run_table.sh) compares every row with FP and RTN; this compares any two result files that
evaluate.py / run_table.sh wrote (they hold each perplexity window's NLL and each example's outcome):
per task A - B, perplexity on the same windows (windows resampled together) and accuracy in points on
the same examples (utils/eval/stats.py), and for perplexity also (A - B) / B in %. Prints a markdown table.

With --pairs, the result files are named relative to the output's folder; it writes one table of every
pair (OUT) and the pairs it was made from (OUT with .pairs.json), from which scripts/sync_results.py
rebuilds and checks it like the other committed tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.eval.report import paired_delta, paired_markdown, pairs_record, rebuild_pairs  # noqa: E402
from utils.io import atomic_write_text, write_json  # noqa: E402

delta = paired_delta


def write_pairs(out: Path, specs: list[str]) -> str:
    pairs = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise SystemExit(f"--pairs wants A.json:B.json, got {spec!r}")
        for name in (a, b):
            if not (out.parent / name).is_file():
                raise SystemExit(f"{out.parent / name}: no such result file (names are relative to {out.parent})")
        pairs.append([a, b])
    write_json(pairs_record(out), {"pairs": pairs})
    table, text = rebuild_pairs(pairs_record(out))
    atomic_write_text(table, text)
    return text


def main(argv) -> int:
    if argv[:1] == ["--pairs"] and len(argv) >= 3:
        out = Path(argv[1])
        if out.suffix != ".md":
            raise SystemExit(f"--pairs writes a markdown table: {out} should end in .md")
        print(write_pairs(out, argv[2:]), end="")
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"A = {argv[0]}\nB = {argv[1]}\n")
    print(paired_markdown([argv], lambda path: json.loads(Path(path).read_text())), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
