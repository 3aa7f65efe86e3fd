"""Training data for distillation: JSONL rows -> token blocks [N, model_max_length], cached.

    blocks = load_blocks(cfg.data, tokenizer, model_max_length=1024)   # tokenized once, cached
    train, val = split_blocks(blocks, cfg.data.val_fraction, cfg.data.val_max_blocks, seed)
    ids = batch_indices(len(train["input_ids"]), batch_size, micro_step, rank, world, seed)

Each JSONL row has `token_ids` (a list of ints, e.g. `gen_data/all_gen.jsonl`) or `text`. With
`pack=True` every row ends with EOS and all rows are concatenated and cut into full blocks (the tail
is dropped); with `pack=False` each row is truncated / right-padded to one block. The result is
cached under `cache_dir` keyed by the file's SHA-256, the tokenizer's vocabulary, the block length
and the packing mode. Batches are a pure function of (seed, micro step, rank): a seeded permutation
per epoch, so resuming only needs the step count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from quant.errors import InputFileError, UserError
from utils.io import iter_jsonl

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Args:
    train: JSONL file with `text` or `token_ids` rows.
    val_fraction: share of blocks held out for validation (at least one block when > 0).
    val_max_blocks: cap on held-out blocks.
    pack: concatenate rows into full blocks (else one padded block per row).
    cache_dir: tokenized-cache folder (default: $LLMQAT_CACHE/train_data).
    """

    train: str = "gen_data/all_gen.jsonl"
    val_fraction: float = 0.05
    val_max_blocks: int = 32
    pack: bool = True
    cache_dir: Optional[str] = None


def check_data_file(path: str) -> Path:
    """Raise FileNotFoundError / ValueError for a missing or empty data file."""
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"training data not found: {path} (set data.train=...)")
    if file.stat().st_size == 0:
        raise UserError(f"training data file is empty: {path}")
    return file


def _row_ids(path: Path, lineno: int, row: dict, vocab_size: int) -> Optional[list]:
    if "token_ids" in row:
        ids = row["token_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise UserError(f"{path}:{lineno}: token_ids must be a list of ints in [0, {vocab_size})")
        return ids
    if isinstance(row.get("text"), str):
        return None  # tokenized in one batch later
    raise UserError(f"{path}:{lineno}: row has neither a 'text' string nor 'token_ids'")


def read_token_rows(path: str, tokenizer) -> list[list[int]]:
    """Token ids of every row of a JSONL file (text rows tokenized with the tokenizer's defaults).

    Raises:
        FileNotFoundError, ValueError: missing / empty file, malformed line (file:line), bad row.
    """
    file = check_data_file(path)
    rows, texts = [], []
    for lineno, row in iter_jsonl(file):
        ids = _row_ids(file, lineno, row, len(tokenizer))
        rows.append(ids)
        if ids is None:
            texts.append((len(rows) - 1, row["text"]))
    if texts:
        encoded = tokenizer([t for _, t in texts]).input_ids
        for (i, _), ids in zip(texts, encoded):
            rows[i] = ids
    rows = [r for r in rows if r]
    if not rows:
        raise UserError(f"{path}: no non-empty rows to train on")
    return rows


def pack_rows(rows: list[list[int]], length: int, eos_id: int) -> dict:
    """Concatenate rows (each ending with EOS) and cut into full blocks [N, length]."""
    stream = []
    for ids in rows:
        stream.extend(ids if ids[-1] == eos_id else ids + [eos_id])
    n = len(stream) // length
    if n == 0:
        raise UserError(f"the data holds {len(stream)} tokens, fewer than one block of model_max_length={length}")
    ids = torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pad_rows(rows: list[list[int]], length: int, pad_id: int) -> dict:
    """One block per row, truncated or right-padded to `length` (attention_mask 0 on padding)."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        row = row[:length]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(path: str, tokenizer, length: int, pack: bool) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [file_sha256(path), hashlib.sha256(vocab.encode()).hexdigest(), str(tokenizer.eos_token_id),
             str(tokenizer.pad_token_id), str(length), "pack" if pack else "pad"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("LLMQAT_CACHE", Path.home() / ".cache" / "llmqat")) / "train_data"


def load_blocks(cfg: DataConfig, tokenizer, model_max_length: int) -> dict:
    """Token blocks {"input_ids", "attention_mask"} [N, model_max_length], from cache when possible."""
    check_data_file(cfg.train)
    cache = _cache_dir(cfg) / f"{cache_key(cfg.train, tokenizer, model_max_length, cfg.pack)}.pt"
    if cache.is_file():
        logger.info("tokenized data from cache %s", cache)
        return torch.load(cache)
    rows = read_token_rows(cfg.train, tokenizer)
    if cfg.pack:
        blocks = pack_rows(rows, model_max_length, tokenizer.eos_token_id)
    else:
        blocks = pad_rows(rows, model_max_length, tokenizer.pad_token_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
    os.close(fd)
    torch.save(blocks, tmp)
    os.replace(tmp, cache)  # atomic: concurrent ranks never read a half-written cache
    logger.info("tokenized %d rows of %s into %d blocks of %d (cached at %s)", len(rows), cfg.train,
                len(blocks["input_ids"]), model_max_length, cache)
    return blocks


def split_blocks(blocks: dict, val_fraction: float, val_max_blocks: int, seed: int) -> tuple[dict, dict]:
    """Seeded split into (train, held-out validation) blocks.

    Raises:
        ValueError: a fraction outside [0, 1) or too few blocks to hold any out.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n = len(blocks["input_ids"])
    n_val = 0 if val_fraction == 0 else min(max(1, round(n * val_fraction)), val_max_blocks)
    if n - n_val < 1:
        raise UserError(f"only {n} blocks: too few to hold out {n_val} for validation")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    take = lambda idx: {k: v[idx] for k, v in blocks.items()}  # noqa: E731
    return take(order[n_val:]), take(order[:n_val])


def batch_indices(n: int, batch_size: int, micro_step: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Block indices of one micro batch: a fresh seeded permutation of all n blocks each epoch."""
    start = (micro_step * world + rank) * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        sel = epochs == epoch
        out[sel] = perm[positions[sel] % n]
    return out
