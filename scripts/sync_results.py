"""Copy committed result tables into the documents that quote them, or check that they agree.

    python scripts/sync_results.py            # rewrite every quoted block from its file
    python scripts/sync_results.py --check    # exit 1 naming each block that differs (tests/test_results_docs.py)

A document quotes a result file between two markers, the file's path (under results/) in the first:

    <!-- results: results/2026-12-03-lsq/table.md -->
    ...the file's text, written here by this script...
    <!-- /results -->

The tables themselves are written by `run_table.sh` (utils/eval/report.py, the one table writer) from
the per-row result JSONs beside them, which hold every example's outcome and the provenance of the
model, data and code that made them; this script only carries them into README.md / docs/*.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def main(argv) -> int:
    check, stale = "--check" in argv, []
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
