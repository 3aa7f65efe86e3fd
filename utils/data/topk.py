"""The teacher's top-K targets of generated data: a binary sidecar next to each shard (teacher_topk=K).

    gen_data/gen.chunk.03.jsonl      one record per line, each with "topk": {"offset", "length", "crc32"}
    gen_data/gen.chunk.03.topk.bin   header, then one block of bytes per record (in the JSONL's order)

Layout (all little-endian). The header, 16 bytes:

    magic   8 bytes  b"LQTOPK01"
    k       uint32   K, the number of token ids kept per position
    id      uint8    bytes per token id: 2 (uint16, vocab_size <= 65536) or 4 (int32)
    lp      uint8    bytes per log-probability: 2 (float16, what generation writes) or 4 (float32)
    pad     2 bytes  zero

A record of n_tokens tokens has T = n_tokens - 1 positions (position t predicts token t + 1; the
last token is never a context). Its block, T * (K * id + (K + 1) * lp) bytes:

    ids       [T, K]      the teacher's K most likely next tokens at each position, most likely first
    logprobs  [T, K + 1]  their log-probabilities at temperature 1 before any sampling warper
                          (top_k/top_p), then log of the mass of every other token (-inf when K
                          covers the vocabulary)

At K = 32 with uint16 ids and float16 log-probs that is 64 + 66 = 130 bytes per token.

The JSONL line is the index: "topk" gives the block's byte offset in the sidecar, its length and
the zlib.crc32 of its bytes. The merger (utils/data/merge.py) writes all_gen.topk.bin next to
all_gen.jsonl the same way, blocks in the shuffled order, and checks every block on the way.
Kill safety: a block is written and flushed before its JSONL line, so
a record is complete in both files or in neither; `repair_sidecar` (after `repair_shard`) cuts the
sidecar back to the end of the last record's block.
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from quant.errors import InputFileError, UserError
from utils.io import PathLike, atomic_open, iter_jsonl

logger = logging.getLogger(__name__)

MAGIC = b"LQTOPK01"
_HEADER = struct.Struct("<8sIBB2x")
HEADER_SIZE = _HEADER.size


def sidecar_path(shard_file: PathLike) -> Path:
    """gen.chunk.03.jsonl -> gen.chunk.03.topk.bin (also all_gen.jsonl -> all_gen.topk.bin)."""
    return Path(shard_file).with_suffix(".topk.bin")


def id_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 65536 else 4


def _dtypes(ids: int, lp: int) -> tuple[np.dtype, np.dtype]:
    return np.dtype("<u2" if ids == 2 else "<i4"), np.dtype("<f2" if lp == 2 else "<f4")


def header(k: int, ids: int, lp: int = 2) -> bytes:
    return _HEADER.pack(MAGIC, k, ids, lp)


def read_header(path: PathLike) -> tuple[int, int, int]:
    """(K, id bytes, log-prob bytes) of a sidecar.

    Raises:
        InputFileError: missing, or not a top-K sidecar.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such top-K sidecar (the data was generated without teacher_topk?)")
    with path.open("rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise InputFileError(f"{path}: not a top-K sidecar (bad header)")
    _, k, ids, lp = _HEADER.unpack(raw)
    return k, ids, lp


def topk_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K of each row: ids [B, K] and log-probs [B, K + 1] (the last: the rest's mass).

    Args:
        logits: [B, V] raw logits (temperature 1, no warper).
    """
    logprobs = logits.float().log_softmax(-1)  # [B, V]
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    rest = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # exact, no 1 - sum
    return ids, torch.cat([values, rest], dim=-1)


def encode(ids: torch.Tensor, logprobs: torch.Tensor, id_size: int, lp_size: int = 2) -> bytes:
    """One record's block: ids [T, K] then log-probs [T, K + 1] (see the module docstring)."""
    id_dtype, lp_dtype = _dtypes(id_size, lp_size)
    return ids.cpu().numpy().astype(id_dtype).tobytes() + logprobs.cpu().float().numpy().astype(lp_dtype).tobytes()


def decode(block: bytes, k: int, id_size: int, lp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `encode`: ids [T, K] int64 and log-probs [T, K + 1] float32."""
    id_dtype, lp_dtype = _dtypes(id_size, lp_size)
    t = len(block) // (k * id_size + (k + 1) * lp_size)
    ids = np.frombuffer(block, id_dtype, count=t * k).reshape(t, k)
    lps = np.frombuffer(block, lp_dtype, offset=t * k * id_size).reshape(t, k + 1)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lps.astype(np.float32))


def block_entry(offset: int, block: bytes) -> dict:
    return {"offset": offset, "length": len(block), "crc32": zlib.crc32(block)}


def check_block(block: bytes, entry: dict, where: str) -> None:
    """Raises InputFileError when `block` is short or its checksum differs from the record's entry."""
    if len(block) != entry["length"] or zlib.crc32(block) != entry["crc32"]:
        raise InputFileError(f"{where}: the top-K block at offset {entry['offset']} is missing or corrupt "
                             f"(length or crc32 differs from the JSONL record)")


class SidecarWriter:
    """Append record blocks to a shard's sidecar (writing the header first when new), flushed at once;
    with k = 0 (teacher_topk off) it writes nothing and leaves records as they are."""

    def __init__(self, shard_file: PathLike, k: int, vocab_size: int, lp_size: int = 2):
        self.path, self.k, self.ids, self.lp = sidecar_path(shard_file), k, id_bytes(vocab_size), lp_size
        self._file = None

    def __enter__(self) -> "SidecarWriter":
        if not self.k:
            return self
        self._file = self.path.open("ab")
        if self._file.tell() == 0:
            self._file.write(header(self.k, self.ids, self.lp))
            self._file.flush()
        return self

    def write(self, ids: torch.Tensor, logprobs: torch.Tensor) -> dict:
        """Write one record's block; return its index entry for the JSONL line."""
        block = encode(ids, logprobs, self.ids, self.lp)
        entry = block_entry(self._file.tell(), block)
        self._file.write(block)
        self._file.flush()
        return entry

    def add(self, record: dict, seq: dict) -> dict:
        """`record` with the index entry of `seq`'s targets, written to the sidecar now (k > 0)."""
        if self.k:
            record["topk"] = self.write(seq["topk_ids"], seq["topk_logprobs"])
        return record

    def __exit__(self, *exc) -> None:
        if self._file:
            self._file.close()


def last_end(shard_file: PathLike) -> Optional[int]:
    """End of the last record's block in the (repaired) shard's sidecar; None when no record has one."""
    end = None
    if Path(shard_file).is_file():
        for _, rec in iter_jsonl(shard_file):
            entry = rec.get("topk")
            end = entry["offset"] + entry["length"] if entry else end
    return end


def repair_sidecar(shard_file: PathLike, k: int, vocab_size: int) -> int:
    """Cut blocks no JSONL record points to (a run killed between the two writes); return bytes removed.

    Raises:
        InputFileError: the sidecar is shorter than the records say, or has another K or id width.
    """
    if not k:
        return 0
    path = sidecar_path(shard_file)
    end = last_end(shard_file)
    if not path.is_file():
        if end is not None:
            raise InputFileError(f"{path}: missing, but {shard_file} has records that point into it")
        return 0
    size = path.stat().st_size
    if end is None:  # no record yet: start the sidecar afresh
        path.unlink()
        return size
    if read_header(path)[:2] != (k, id_bytes(vocab_size)):
        raise InputFileError(f"{path}: written with another K or id width than teacher_topk={k}; delete the shard")
    if size < end:
        raise InputFileError(f"{path}: {size} bytes, but the records of {shard_file} need {end}; delete the shard")
    if size > end:
        with path.open("rb+") as f:
            f.truncate(end)
        logger.warning("%s: removed %d bytes no record points to (an interrupted run)", path, size - end)
    return size - end


def shards_topk(paths: list[Path], metas: dict) -> int:
    """The K all shards were generated with (0: none has targets).

    Raises:
        UserError: some shards have targets and others none, or other K (even with allow_mixed: one
            sidecar holds one K).
        InputFileError: a shard's sidecar is missing or its header disagrees with its metadata.
    """
    ks = {p.name: ((metas.get(p.name) or {}).get("settings") or {}).get("teacher_topk", 0) for p in paths}
    if len(set(ks.values())) > 1:
        raise UserError(f"the shards hold top-K targets of different K ({ks}): they cannot share one sidecar")
    k = next(iter(ks.values()))
    for p in paths if k else []:
        if read_header(sidecar_path(p))[0] != k:
            raise InputFileError(f"{sidecar_path(p)}: K differs from its metadata's teacher_topk={k}")
    return k


class SidecarReader:
    """Read (and check) the blocks of records in some shards' sidecars; shard i: paths[i] (none: the
    shards have no targets, and `check` accepts every record)."""

    def __init__(self, paths: list[Path]):
        self.formats = [read_header(sidecar_path(p)) for p in paths]
        self.files = [sidecar_path(p).open("rb") for p in paths]

    def __enter__(self) -> "SidecarReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, shard: int, record: dict, where: str) -> None:
        if self.files:
            self.block(shard, record, where)

    def block(self, shard: int, record: dict, where: str) -> bytes:
        """The record's block, checked (length per position, crc32).

        Raises:
            ValueError: no "topk" entry, or a block that does not fit the record (where: file:line).
        """
        entry = record.get("topk")
        k, ids, lp = self.formats[shard]
        if not isinstance(entry, dict) or not {"offset", "length", "crc32"} <= set(entry):
            raise ValueError("no 'topk' entry (offset, length, crc32)")
        if entry["length"] != (len(record["token_ids"]) - 1) * (k * ids + (k + 1) * lp):
            raise ValueError("the 'topk' block's length does not fit the record's tokens")
        self.files[shard].seek(entry["offset"])
        block = self.files[shard].read(entry["length"])
        check_block(block, entry, where)
        return block

    def close(self) -> None:
        for f in self.files:
            f.close()


def write_merged(paths: list[Path], entries: list, output: Path) -> None:
    """Copy the entries' records (shard, offset, length of their lines) in order into `output` and
    their blocks into its sidecar, each record's "topk" entry pointing at its new place; the sidecar
    is renamed into place before the JSONL (both through temporary files)."""
    with SidecarReader(paths) as reader, ExitStack() as stack:
        lines = [stack.enter_context(p.open("rb")) for p in paths]
        with atomic_open(output, "wb") as out, atomic_open(sidecar_path(output), "wb") as side:
            side.write(header(*reader.formats[0]))
            for e in entries:
                lines[e.shard].seek(e.offset)
                record = json.loads(lines[e.shard].read(e.length))
                block = reader.block(e.shard, record, f"{paths[e.shard]}@{e.offset}")
                record["topk"] = block_entry(side.tell(), block)
                side.write(block)
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
