"""Write the real-text training sets of the data ablation (docs/RESULTS.md sections 2b and 11.5).

    python scripts/ablation_texts.py [--data-dir ../shared/data] [--out runs/ablation]

Two JSONL files of {"text": ...} rows, about the size of the 35k-token generated set:
  wikitext2_val.jsonl  the first 368 non-empty rows of the WikiText-2 *validation* split (test is evaluated)
  c4_short.jsonl       the first 106 documents under 4,000 characters of the C4 validation subset
An existing file is kept only if it holds exactly these rows; otherwise the script refuses (a stale
set would silently change the ablation).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.eval.datasets import c4_texts, wikitext2_rows
from utils.io import atomic_write_text

WIKI_ROWS = 368
C4_DOCS = 106
C4_MAX_CHARS = 4000


def ablation_sets(data_dir: str | None) -> dict[str, list[str]]:
    """The two sets, by file stem."""
    wiki = [r for r in wikitext2_rows("validation", data_dir) if r.strip()][:WIKI_ROWS]
    c4 = [t for t in c4_texts(data_dir) if len(t) < C4_MAX_CHARS][:C4_DOCS]
    return {"wikitext2_val": wiki, "c4_short": c4}


def jsonl_text(rows: list[str]) -> str:
    return "".join(json.dumps({"text": t}) + "\n" for t in rows)


def write_sets(out: Path, data_dir: str | None) -> list[str]:
    """Write (or verify) each set under `out`; returns one summary line per file."""
    lines = []
    for name, rows in ablation_sets(data_dir).items():
        path = out / f"{name}.jsonl"
        text = jsonl_text(rows)
        if path.is_file():
            if path.read_text(encoding="utf-8") != text:
                raise SystemExit(f"{path} exists with other rows than this script writes: move it away first")
            state = "kept"
        else:
            atomic_write_text(path, text)
            state = "written"
        lines.append(f"{path}: {len(rows)} rows, {sum(map(len, rows))} characters ({state})")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="local data folder (default: $LLMQAT_DATA_DIR or the hub)")
    ap.add_argument("--out", default="runs/ablation", help="output folder (default: runs/ablation)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for line in write_sets(out, args.data_dir):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
