"""Share of one answer (BoolQ: "yes") per evaluated row of a two-choice task, from its result files.

    python scripts/choice_shares.py results/X/boolq-yes.md fp.json rtn-W4A8KV8.json ... [--task boolq] [--choice 1]

Result files are named relative to the output's folder. Reads the task's gold labels (the local data
directory, LLMQAT_DATA_DIR or `--data-dir`, else the hub), as many as the largest row has examples,
and writes OUT.choices.json (task, labels, the data file's fingerprint, rows) and OUT.md; from then on
scripts/sync_results.py recomputes and checks OUT.md from the record and the row files alone
(utils/eval/choices.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant.errors import UserError  # noqa: E402
from utils.eval.choices import BINARY_TASKS, CHOICES_SUFFIX, choices_record, rebuild_choices  # noqa: E402
from utils.eval.datasets import local_file, resolve_data_dir  # noqa: E402
from utils.eval.tasks import TASKS, load_task  # noqa: E402
from utils.io import atomic_write_text, write_json  # noqa: E402
from utils.provenance import data_fingerprint  # noqa: E402


def gold_labels(task: str, n: int, data_dir) -> tuple[list, dict]:
    """The first n gold labels of `task` and where they came from ({"where", "fingerprint"})."""
    local = resolve_data_dir(data_dir)
    if local is not None:
        path = local_file(local, TASKS[task].local)
        source = {"where": str(Path(TASKS[task].local)), "fingerprint": data_fingerprint(path)}
    else:
        source = {"where": "/".join(str(p) for p in TASKS[task].hub if p), "fingerprint": "hub"}
    return [doc.gold for doc in load_task(task, data_dir, n)], source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the table to write, X.md (its record: X.choices.json)")
    parser.add_argument("rows", nargs="+", help="result files, relative to the output's folder")
    parser.add_argument("--task", default="boolq", choices=sorted(BINARY_TASKS))
    parser.add_argument("--choice", type=int, default=1, help="the choice counted: 0 or 1 (BoolQ: 1 = yes)")
    parser.add_argument("--metric", default="acc", help="the outcomes that give the pick (acc, or acc_norm)")
    parser.add_argument("--data-dir", default=None, help="local data directory (default: LLMQAT_DATA_DIR)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".md":
        raise SystemExit(f"{args.out}: the table is markdown, name it X.md")
    sizes = []
    for row in args.rows:
        path = args.out.parent / row
        if not path.is_file():
            raise SystemExit(f"{path}: no such result file (names are relative to {args.out.parent})")
        results = json.loads(path.read_text()).get("results", {})
        outcomes = results.get(args.task, {}).get("per_example", {}).get(args.metric)
        if outcomes is None:
            raise SystemExit(f"{path}: no per-example {args.metric} outcomes of {args.task}")
        sizes.append(len(outcomes))
    try:
        gold, source = gold_labels(args.task, max(sizes), args.data_dir)
        record = choices_record(args.task, gold, args.rows, source, args.choice, args.metric)
    except (UserError, ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    if len(gold) < max(sizes):
        raise SystemExit(f"{args.task} has {len(gold)} examples, a row has {max(sizes)}")
    record_path = args.out.with_name(args.out.stem + CHOICES_SUFFIX)
    write_json(record_path, record)
    table, text = rebuild_choices(record_path)
    atomic_write_text(table, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
