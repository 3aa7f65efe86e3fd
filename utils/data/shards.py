"""Shard files of generated data: one JSON record per line, written whole, flushed, resumable.

    gen_data/gen.chunk.03.jsonl      {"text", "token_ids", "start_id", "greedy_len", "n_tokens", "finish"}
    gen_data/gen.chunk.03.meta.json  the settings that made the records (checked on resume) + counts

A process killed at any point (kill -9 included) leaves at most one partial last line, since each
record is a single write ending in "\\n". `repair_shard` cuts that partial line off; `done_keys`
lists the records already there, so a restart generates only the rest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

from quant.errors import UserError
from utils.io import JsonlError, PathLike, iter_jsonl, read_jsonl, write_json

logger = logging.getLogger(__name__)

SHARD_GLOB = "gen.chunk.*.jsonl"


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


def check_meta(shard_file: PathLike, settings: dict, has_records: bool, **extra) -> None:
    """Write the settings next to the shard; refuse to add to records made with other settings.

    Raises:
        ValueError: the shard holds records made with different settings (names the keys).
    """
    path = meta_path(shard_file)
    if has_records and path.is_file():
        old = json.loads(path.read_text()).get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff)
            raise UserError(f"{shard_file} holds records made with other settings ({changes}); "
                             f"use another out_dir or delete the shard")
    write_meta(shard_file, settings, **extra)


def write_meta(shard_file: PathLike, settings: dict, **extra) -> None:
    write_json(meta_path(shard_file), {"settings": settings, **extra})


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
