"""Rebuild committed result tables from their result files, copy them into the documents that quote them,
or check that all of it agrees.

    python scripts/sync_results.py            # rebuild tables, rewrite every quoted block from its file
    python scripts/sync_results.py --check    # exit 1 naming each table / block that differs (tests/test_results_docs.py)

A table `results/DIR/X.md` with a `X.sources.json` beside it (written by run_table.sh: tasks, notes and
each row's results file) is recomputed from the per-row result JSONs in DIR (`row-<file>` as the
collected copies are named, or `<file>`) by utils/eval/report.py's `rebuild_table`, intervals included.
A data set's `X.stats.md` is recomputed from the `X.stats.json` the merge wrote (utils/data/stats_report.py).
A paired-differences table `X.md` with an `X.pairs.json` beside it (scripts/paired_delta.py --pairs) is
recomputed from the result files it names. A choice-share table `X.md` with an `X.choices.json` beside it
(scripts/choice_shares.py) is recomputed from its record (gold labels kept in it) and the result files.

A document quotes a result file between two markers, the file's path (under results/) in the first:

    <!-- results: results/2026-12-03-lsq/table.md -->
    ...the file's text, written here by this script...
    <!-- /results -->

The tables themselves are written by `run_table.sh` (utils/eval/report.py, the one table writer) from
the per-row result JSONs beside them, which hold every example's outcome and the provenance of the
model, data and code that made them.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.data.stats_report import stats_markdown  # noqa: E402
from utils.eval.choices import CHOICES_SUFFIX, rebuild_choices  # noqa: E402
from utils.eval.report import PAIRS_SUFFIX, rebuild_pairs, rebuild_table  # noqa: E402
DOCS = ("README.md", "docs/RESULTS.md")
BLOCK = re.compile(r"(<!-- results: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def quoted_blocks(text: str) -> list[tuple[str, str]]:
    """[(result file path, quoted text)] of a document."""
    return [(m["path"], m["body"]) for m in BLOCK.finditer(text)]


def source_text(path: str) -> str:
    """The text a block quoting `path` must hold (the file's text, ending in one newline)."""
    if not path.startswith("results/"):
        raise ValueError(f"{path}: quoted result files live under results/")
    return (ROOT / path).read_text().rstrip("\n") + "\n"


def synced(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + source_text(m["path"]) + m.group(4), text)


def _row_file(folder: Path, name: str) -> Path:
    for path in (folder / f"row-{name}", folder / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{folder}: no results file row-{name} or {name} (named in its sources record)")


def rebuilt(sources: Path) -> tuple[Path, str]:
    """(table path, its text recomputed from the results files) of a `<table>.sources.json` record."""
    folder = sources.parent
    record = json.loads(sources.read_text())
    text = rebuild_table(record, lambda name: json.loads(_row_file(folder, name).read_text()))
    return sources.with_name(sources.name[: -len(".sources.json")] + ".md"), text


def rebuilt_stats(stats: Path) -> tuple[Path, str]:
    """(`X.stats.md`, its text recomputed) of a data set's `X.stats.json`."""
    return stats.with_suffix(".md"), stats_markdown(json.loads(stats.read_text()))


def rebuild_tables(check: bool, root: Path = ROOT) -> list[str]:
    """Recompute every committed table that has a sources record, every data statistics table beside
    its statistics, every paired-differences table beside its pairs record and every choice-share table
    beside its choices record; rewrite them (unless
    `check`); the tables whose text differed."""
    stale = []
    made = [rebuilt(sources) for sources in sorted((root / "results").glob("*/*.sources.json"))]
    made += [rebuilt_stats(stats) for stats in sorted((root / "results").glob("*/*.stats.json"))
             if stats.with_suffix(".md").is_file()]
    made += [rebuild_pairs(record) for record in sorted((root / "results").glob(f"*/*{PAIRS_SUFFIX}"))]
    made += [rebuild_choices(record) for record in sorted((root / "results").glob(f"*/*{CHOICES_SUFFIX}"))]
    for table, text in made:
        if not table.is_file() or table.read_text() != text:
            stale.append(str(table.relative_to(root)))
            if not check:
                table.write_text(text)
    return stale


def main(argv) -> int:
    check = "--check" in argv
    stale = [f"{t} (from its results files)" for t in rebuild_tables(check)]
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        new = synced(text)
        if new != text:
            stale += [f"{doc}: {p}" for p, body in quoted_blocks(text) if body != source_text(p)]
            if not check:
                path.write_text(new)
    if stale:
        print(("out of date:\n  " if check else "updated:\n  ") + "\n  ".join(stale))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
