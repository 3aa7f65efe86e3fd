"""Training data for distillation: JSONL rows -> token blocks [N, model_max_length], cached.

    blocks = load_blocks(cfg.data, tokenizer, model_max_length=1024)   # tokenized once, cached
    train, val = split_blocks(blocks, cfg.data.val_fraction, cfg.data.val_max_blocks, seed)
    ids = batch_indices(len(train["input_ids"]), batch_size, micro_step, rank, world, seed)

Each JSONL row has `token_ids` (a list of ints, e.g. `gen_data/all_gen.jsonl`) or `text`. With
`pack=True` every row ends with EOS and all rows are concatenated and cut into full blocks (the tail
is dropped); with `pack=False` each row is truncated / right-padded to one block. The result is
cached under `cache_dir` keyed by the file's content fingerprint, the tokenizer's fingerprint (and
the ids it gives a probe text), its EOS / pad ids, the block length and the packing mode; the key's
parts are written beside the entry. Batches are a pure function of (seed, micro step, rank): a
seeded permutation per epoch, so resuming only needs the step count.

Data tied to its tokenizer: a merged file's provenance (`all_gen.provenance.json`, written by
utils/data/merge.py) names the tokenizer whose ids it holds; another tokenizer is refused
(`check_data_tokenizer`). Without provenance, `text` rows are tokenized here (fine for any corpus)
and `token_ids` rows are only range-checked, with a warning.
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

from models.loading import tokenizer_fingerprint
from quant.errors import InputFileError, UserError
from utils.data.merge import provenance_path
from utils.io import iter_jsonl, write_json
from utils.provenance import data_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Args:
    train: JSONL file with `text` or `token_ids` rows.
    val_fraction: share of blocks held out for validation (at least one block when > 0).
    val_max_blocks: cap on held-out blocks.
    pack: concatenate rows into full blocks (else one padded block per row).
    cache_dir: tokenized-cache folder (default: $LLMQAT_CACHE/train_data).
    text_bos: train on every row's `text` re-encoded, BOS first and no EOS added (`read_text_bos_rows`:
        the original LLM-QAT code), instead of its `token_ids` with EOS after each row.
    """

    train: str = "gen_data/all_gen.jsonl"
    val_fraction: float = 0.05
    val_max_blocks: int = 32
    pack: bool = True
    cache_dir: Optional[str] = None
    text_bos: bool = False

    def __post_init__(self):
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_max_blocks < 0:
            raise UserError(f"data.val_max_blocks must be >= 0, got {self.val_max_blocks}")


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


def data_provenance(path) -> Optional[dict]:
    """The provenance record of a merged data file, or None (none there, or it describes another
    content: the file was changed after the merge, so the record says nothing about it)."""
    record = provenance_path(path)
    if not record.is_file():
        return None
    prov = json.loads(record.read_text())
    if prov.get("output") != data_fingerprint(path):
        logger.warning("%s does not describe the present %s (changed after the merge): ignored", record, path)
        return None
    return prov


def check_data_tokenizer(path, tokenizer) -> bool:
    """True when the data's provenance names this tokenizer; False when there is no provenance.

    Raises:
        UserError: the data was made with another tokenizer (names both fingerprints).
    """
    prov = data_provenance(path)
    made_with = (prov or {}).get("tokenizer")
    if made_with is None:
        return False
    ours = tokenizer_fingerprint(tokenizer)
    if made_with != ours:
        raise UserError(f"{path} holds token ids of tokenizer {made_with} ({provenance_path(path)}), but the "
                        f"student's tokenizer is {ours}: its ids would be meaningless; generate data with this "
                        f"model, or train the model that made it")
    return True


def read_token_rows(path: str, tokenizer, verified: bool = False) -> list[list[int]]:
    """Token ids of every row of a JSONL file (text rows tokenized with the tokenizer's defaults).
    `verified`: the data's provenance names this tokenizer (else `token_ids` rows get a warning).

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
    if len(texts) < len(rows) and not verified:
        logger.warning("%s: %d rows give token_ids but no provenance says which tokenizer made them (only their "
                       "range is checked)", path, len(rows) - len(texts))
    if texts:
        encoded = tokenizer([t for _, t in texts]).input_ids
        for (i, _), ids in zip(texts, encoded):
            rows[i] = ids
    rows = [r for r in rows if r]
    if not rows:
        raise UserError(f"{path}: no non-empty rows to train on")
    return rows


def read_text_bos_rows(path: str, tokenizer) -> list[list[int]]:
    """[BOS] + the ids of each row's `text` (no other special token), as the original LLM-QAT code
    trains (`utils/datautils.py`: `tokenizer(text)` with LLaMA's tokenizer, which adds BOS only);
    the text is re-encoded whatever `token_ids` the row holds, so any tokenizer can read it.

    Raises:
        UserError: a tokenizer without BOS, or a row without a `text` string.
    """
    file = check_data_file(path)
    if tokenizer.bos_token_id is None:
        raise UserError("data.text_bos=true needs a tokenizer with a BOS token")
    texts = []
    for lineno, row in iter_jsonl(file):
        if not isinstance(row.get("text"), str):
            raise UserError(f"{file}:{lineno}: data.text_bos=true needs a 'text' string in every row")
        texts.append(row["text"])
    return [[tokenizer.bos_token_id] + ids for ids in tokenizer(texts, add_special_tokens=False).input_ids]


def pack_rows(rows: list[list[int]], length: int, eos_id: Optional[int]) -> dict:
    """Concatenate rows (each ending with EOS; `eos_id` None: as they are) and cut into full blocks [N, length]."""
    stream = []
    for ids in rows:
        stream.extend(ids if eos_id is None or ids[-1] == eos_id else ids + [eos_id])
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


PROBE_TEXT = "Hello, world! 123 <s> caf\u00e9"


def cache_key_parts(path: str, tokenizer, length: int, pack: bool) -> dict:
    """What decides the blocks: the data's content, the tokenizer (fingerprint, plus the ids of a
    probe text, which catch normalization / BOS settings the vocabulary does not show), the
    EOS / pad ids, the block length and the packing mode. Never a file name or a modification time."""
    return {"format": 2, "data": data_fingerprint(path), "tokenizer": tokenizer_fingerprint(tokenizer),
            "probe_ids": tokenizer(PROBE_TEXT).input_ids, "eos_id": tokenizer.eos_token_id,
            "pad_id": tokenizer.pad_token_id, "model_max_length": length, "pack": pack}


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("LLMQAT_CACHE", Path.home() / ".cache" / "llmqat")) / "train_data"


def load_blocks(cfg: DataConfig, tokenizer, model_max_length: int) -> dict:
    """Token blocks {"input_ids", "attention_mask"} [N, model_max_length], from cache when possible.

    Raises:
        UserError: the data's provenance names another tokenizer; bad rows (see read_token_rows).
    """
    check_data_file(cfg.train)
    verified = False if cfg.text_bos else check_data_tokenizer(cfg.train, tokenizer)  # text_bos re-encodes text
    parts = cache_key_parts(cfg.train, tokenizer, model_max_length, cfg.pack)
    parts.update({"text_bos": True} if cfg.text_bos else {})  # absent when off: existing cache keys stay valid
    cache = _cache_dir(cfg) / f"{cache_key(parts)}.pt"
    if cache.is_file():
        logger.info("tokenized data from cache %s", cache)
        return torch.load(cache)
    rows = read_text_bos_rows(cfg.train, tokenizer) if cfg.text_bos else read_token_rows(cfg.train, tokenizer, verified)
    if cfg.pack:
        blocks = pack_rows(rows, model_max_length, None if cfg.text_bos else tokenizer.eos_token_id)
    else:
        blocks = pad_rows(rows, model_max_length, tokenizer.pad_token_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache.with_suffix(".json"), {**parts, "source": str(cfg.train)})
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
