"""The statistics of a merged data set (`all_gen.stats.json`, utils/data/merge.py) as markdown.

    text = stats_markdown(json.loads(Path("results/X/data.stats.json").read_text()))
    python -m utils.data.stats_report results/X/data.stats.json     # writes results/X/data.stats.md

scripts/sync_results.py rebuilds every committed `*.stats.md` from the `*.stats.json` beside it, so
the data section of docs/RESULTS.md quotes numbers that come from the file the merge wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SAMPLE_LINE = 160  # characters of each sample shown in the markdown (the JSON keeps more)


def ngram_text(distinct_ngrams: dict) -> str:
    """{"1": 0.021, "2": 0.24} -> "1-grams 2.1%, 2-grams 24.0%" (distinct / total n-grams)."""
    return ", ".join(f"{k}-grams {v:.1%}" for k, v in distinct_ngrams.items())


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ").strip()


def stats_markdown(info: dict) -> str:
    """Key numbers, the length histogram and the samples of one merged set, as a markdown block."""
    records, tokens = info["records"], info["tokens"]
    finish = info.get("finish", {})
    grams = ngram_text(info["distinct_ngrams"])
    lines = ["| statistic | value |", "|---|---:|",
             f"| records (sequences) | {records:,} |", f"| tokens | {tokens:,} |",
             f"| mean tokens per record | {info['mean_tokens']} |",
             f"| distinct start ids | {info['distinct_start_ids']:,} |",
             f"| distinct tokens (of the vocabulary) | {info.get('distinct_tokens', 0):,} |",
             f"| ended by EOS / by the length cap | {finish.get('eos', 0):,} / {finish.get('length', 0):,} "
             f"({info['eos_share']:.1%} EOS) |",
             f"| distinct n-grams / n-grams | {grams} |",
             f"| exact duplicates dropped / bad lines skipped | {info['duplicates_dropped']} / "
             f"{info['bad_lines_skipped']} |", "",
             "| tokens per record | records | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:,} | {v / max(records, 1):.1%} |" for k, v in info["length_histogram"].items()]
    samples = info.get("samples", [])
    if samples:
        lines += ["", "| start id | greedy | finish | tokens | text (first characters) |", "|---:|---:|---|---:|---|"]
        lines += [f"| {s.get('start_id', '')} | {s.get('greedy_len', '')} | {s.get('finish', '')} | {s['n_tokens']} | "
                  f"{_cell(s['text'][:SAMPLE_LINE])} |" for s in samples]
    return "\n".join(lines) + "\n"


def write_markdown(stats_json) -> Path:
    """Write `X.stats.md` beside a data set's `X.stats.json`; return its path."""
    stats_json = Path(stats_json)
    out = stats_json.with_suffix(".md")
    out.write_text(stats_markdown(json.loads(stats_json.read_text())))
    return out


if __name__ == "__main__":  # python -m utils.data.stats_report results/X/data.stats.json [...]
    for arg in sys.argv[1:]:
        print(write_markdown(arg))
