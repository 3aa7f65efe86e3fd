"""Shard files of generated data: one JSON record per line, written whole, flushed, resumable.

    gen_data/gen.chunk.03.jsonl      {"text", "token_ids", "start_id", "greedy_len", "n_tokens", "finish"}
    gen_data/gen.chunk.03.meta.json  what made the records (checked on resume), see below
    gen_data/gen.chunk.03.topk.bin   with teacher_topk=K only: the teacher's top-K targets, each
                                     record's "topk" entry points into it (layout: utils/data/topk.py)

A process killed at any point (kill -9 included) leaves at most one partial last line, since each
record is a single write ending in "\\n". `repair_shard` cuts that partial line off; `done_keys`
lists the records already there, so a restart generates only the rest.

The metadata (written by recipes/generate.py at the start and again at the end of every run):

    {"settings":   {what decides the records: model, n_vocab, greedy_lengths, max_length,
                    temperature, top_k, top_p, seed, dtype, start_ids, quantized, shard,
                    vocab_size, eos_ids, and teacher_topk when it is > 0},
     "provenance": utils.provenance.provenance(...) of the run: {"config" (GenerateConfig without
                    the runtime keys), "config_hash", "inputs": {"model": model fingerprint},
                    "tokenizer": tokenizer fingerprint, "code", "env"},
     "start_ids":  {"mode": "random" | "walk", "ids": [the shard's start ids, in order]},
     "runtime":    {"shard", "batch_size", "device", "num_threads", "attn_implementation"},
     "n_expected": records the shard holds when complete,
     "complete":   true once every record is written}

`check_meta` refuses to add records to a shard whose settings, `provenance.inputs` (the model) or
`provenance.tokenizer` differ from the new run's; the merger reads the same fields.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

from quant.errors import UserError
from utils.io import JsonlError, PathLike, iter_jsonl, read_jsonl, write_json
from utils.provenance import differing_keys

logger = logging.getLogger(__name__)

SHARD_GLOB = "gen.chunk.*.jsonl"
IDENTITY_KEYS = ("inputs", "tokenizer")  # the provenance fields a resumed shard must share


def shard_path(out_dir: PathLike, shard: int) -> Path:
    return Path(out_dir) / f"gen.chunk.{shard:02d}.jsonl"


def meta_path(shard_file: PathLike) -> Path:
    return Path(shard_file).with_suffix(".meta.json")


def repair_shard(path: PathLike) -> int:
    """Cut a partial last line (no final newline) off `path`; return the number of bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    size = path.stat().st_size
    with path.open("rb+") as f:
        tail = 0
        while tail < size:  # scan back for the last newline, 64 KiB at a time
            step = min(65536, size - tail)
            f.seek(size - tail - step)
            chunk = f.read(step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = size - tail - step + newline + 1
                break
            tail += step
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            logger.warning("%s: removed a partial last line (%d bytes) left by an interrupted run", path, size - keep)
    return size - keep


def done_keys(path: PathLike) -> set[tuple[int, int]]:
    """(start_id, greedy_len) of every record in a (repaired) shard file.

    Raises:
        JsonlError: a malformed line, or one without integer start_id / greedy_len (file:line).
    """
    if not Path(path).is_file():
        return set()
    keys: set = set()
    for lineno, rec in iter_jsonl(path):
        key = (rec.get("start_id"), rec.get("greedy_len"))
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in key):
            raise JsonlError(f"{path}:{lineno}: record without integer start_id / greedy_len")
        if key in keys:
            logger.warning("%s:%d: record %s appears twice (the merger drops exact duplicates)", path, lineno, key)
        keys.add(key)
    return keys


def check_meta(shard_file: PathLike, settings: dict, has_records: bool, provenance: Optional[dict] = None,
               **extra) -> None:
    """Write the metadata next to the shard; refuse to add to records made with other settings, or
    (given `provenance`) from another model or tokenizer.

    Raises:
        UserError: the shard holds records made otherwise (names the keys; use another out_dir).
    """
    path = meta_path(shard_file)
    if has_records and path.is_file():
        old = json.loads(path.read_text())
        _refuse_changes(shard_file, "other settings", old.get("settings", {}), settings)
        if provenance is not None:
            old_identity = {k: (old.get("provenance") or {}).get(k) for k in IDENTITY_KEYS}
            new_identity = {k: provenance.get(k) for k in IDENTITY_KEYS}
            _refuse_changes(shard_file, "another model or tokenizer", old_identity, new_identity)
    write_meta(shard_file, settings, provenance, **extra)


def _refuse_changes(shard_file: PathLike, what: str, old: dict, new: dict) -> None:
    diff = differing_keys(old, new)
    if diff:
        changes = ", ".join(f"{k}: {_dotted(old, k)!r} -> {_dotted(new, k)!r}" for k in diff)
        raise UserError(f"{shard_file} holds records made with {what} ({changes}); "
                        f"use a new out_dir or delete the shard")


def _dotted(tree: Optional[dict], key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def write_meta(shard_file: PathLike, settings: dict, provenance: Optional[dict] = None, **extra) -> None:
    write_json(meta_path(shard_file), {"settings": settings, **({"provenance": provenance} if provenance else {}),
                                       **extra})


def read_meta(shard_file: PathLike) -> Optional[dict]:
    path = meta_path(shard_file)
    return json.loads(path.read_text()) if path.is_file() else None


class ShardWriter:
    """Append records to a shard file, one whole line per record, flushed at once."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def __enter__(self) -> "ShardWriter":
        self._file = self.path.open("a", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def __exit__(self, *exc) -> None:
        self._file.close()


def read_records(paths: Iterable[PathLike]) -> list[dict]:
    """All records of some shard files (tests and small tools; the merger streams instead)."""
    return [rec for p in paths for rec in read_jsonl(p)]
