"""Merge generated shards into one shuffled training file.

    python merge_gen_data.py                                  # gen_data/gen.chunk.*.jsonl -> gen_data/all_gen.jsonl
    python merge_gen_data.py in_dir=gen_data output=gen_data/all_gen.jsonl seed=42 skip_bad=true

Every line of every shard is checked (a JSON object with a `text` string and a non-empty
`token_ids` list of non-negative ints); a bad line stops the merge with its file and line number
unless `skip_bad=true`. Exact duplicate records are dropped, the rest shuffled with `seed` and
written through a temporary file and a rename, so the output is all new or untouched. The shards
are streamed twice (check, then copy by byte offset): memory holds offsets, not texts.
Shards made with different settings (model, tokenizer, max_length, sampling, seed, ...) or without
metadata are refused unless `allow_mixed=true`; the merged file's provenance (this config, the
shards' fingerprints, their model and tokenizer fingerprints) goes next to it, `*.provenance.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.config import to_dict
from utils.data.merge import MergeStats, find_shards, format_summary, merge_shards, provenance_path, summary
from utils.io import newer
from utils.logging import print0
from utils.provenance import config_hash, data_fingerprint


@dataclass
class MergeConfig:
    """Settings of `merge_gen_data.py`.

    Args:
        output: the merged file; None: `{in_dir}/all_gen.jsonl`. Statistics go next to it
            (`*.stats.json`).
        skip_bad: skip (and count) malformed lines instead of failing.
        allow_mixed: merge shards whose metadata differ (or is missing) instead of refusing; the
            differences are recorded in the statistics and the provenance (`mixed`).
    """

    in_dir: str = "gen_data"
    output: Optional[str] = None
    seed: int = 42
    skip_bad: bool = False
    allow_mixed: bool = False


def output_path(cfg: MergeConfig) -> Path:
    return Path(cfg.output) if cfg.output else Path(cfg.in_dir) / "all_gen.jsonl"


def merge(cfg: MergeConfig) -> MergeStats:
    """Check, dedup, shuffle and write the shards of `cfg.in_dir` (utils/data/merge.py)."""
    return merge_shards(cfg.in_dir, output_path(cfg), cfg.seed, cfg.skip_bad, cfg.allow_mixed, to_dict(cfg))


def is_current(cfg: MergeConfig) -> bool:
    """The merged file, its provenance and statistics exist, the provenance records this config and
    the shards' present content, and the file was written after every shard."""
    output = output_path(cfg)
    try:
        shards = find_shards(cfg.in_dir)
    except FileNotFoundError:
        return False
    if not (output.with_suffix(".stats.json").is_file() and provenance_path(output).is_file()):
        return False
    prov = json.loads(provenance_path(output).read_text())
    fingerprints = {p.name: data_fingerprint(p) for p in shards}
    return (prov.get("config_hash") == config_hash(cfg) and prov["inputs"].get("shards") == fingerprints
            and newer(output, *shards))


def run(cfg: MergeConfig) -> MergeStats:
    stats = merge(cfg)
    print0(format_summary(summary(stats, output_path(cfg))))
    return stats
