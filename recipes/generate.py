"""Data-free training data: the teacher writes its own text, many sequences at once.

    python generate_data.py 0 n_vocab=500 max_length=2048 batch_size=32   # shard 0 -> gen_data/gen.chunk.00.jsonl

The LLM-QAT recipe (arXiv 2305.17888, its `generate_data.py`): every vocabulary id is a start token,
fed alone (no BOS); for each total greedy length j (default 3, 4, 5) the first j tokens of the
sequence (start token included) are top-1, the rest are sampled from the softmax (top_k 50, T 1.0:
Hugging Face `generate`'s defaults then) until EOS or `max_length` tokens in total.

The decoding engine (slot KV cache, continuous batching, per-record seeds) is utils/data/generation.py;
shard files and their metadata are utils/data/shards.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

from models import load_model
from quant.errors import UserError
from utils.data.generation import Sampling, generate_sequences
from utils.data.shards import ShardWriter, check_meta, done_keys, read_meta, repair_shard, shard_path, write_meta
from utils.logging import progress_disabled

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """Settings of `generate_data.py`.

    Args:
        shard: which `n_vocab` consecutive start ids to use; None: $RANK, else $SLURM_PROCID, else 0.
        n_vocab: start ids per shard (the original: 500 x 64 shards = LLaMA's 32k vocabulary).
        greedy_lengths: total greedy lengths j (start token included).
        max_length: total tokens per sequence, start token included (HF `max_length`).
        temperature, top_k, top_p: sampling after the greedy prefix (top_k 0 or top_p 1.0: off).
        eos_ids: tokens that end a sequence; None: the model's generation_config (what HF generate uses).
        device: "auto" (cuda:$LOCAL_RANK if CUDA is available, else cpu), or a torch device.
        num_threads: CPU threads for torch (0: torch's default).
    """

    model: str = "smollm2-135m"
    shard: Optional[int] = None
    n_vocab: int = 500
    greedy_lengths: List[int] = field(default_factory=lambda: [3, 4, 5])
    max_length: int = 2048
    batch_size: int = 32
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    eos_ids: Optional[List[int]] = None
    out_dir: str = "gen_data"
    dtype: str = "float32"
    device: str = "auto"
    num_threads: int = 0

    def __post_init__(self):
        checks = [(self.n_vocab >= 1, "n_vocab must be >= 1"), (self.max_length >= 2, "max_length must be >= 2"),
                  (self.batch_size >= 1, "batch_size must be >= 1"), (self.temperature > 0, "temperature must be > 0"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (len(self.greedy_lengths) > 0, "greedy_lengths must not be empty"),
                  (self.shard is None or self.shard >= 0, "shard must be >= 0"),
                  (self.num_threads >= 0, "num_threads must be >= 0")]
        checks += [(1 <= j <= self.max_length, f"greedy_lengths: {j} is not in [1, max_length={self.max_length}]")
                   for j in self.greedy_lengths]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def resolve_shard(shard: Optional[int]) -> int:
    """The shard index: the config's, else torchrun's $RANK, else Slurm's $SLURM_PROCID, else 0."""
    if shard is not None:
        return shard
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def skipped_ids(tokenizer) -> set[int]:
    """Start ids never used: special tokens and added (control) tokens such as SmolLM2's <filename>."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def shard_jobs(shard: int, n_vocab: int, greedy_lengths: List[int], vocab_size: int,
               skip: set = frozenset()) -> list[tuple[int, int]]:
    """(start_id, greedy_len) owned by `shard`: ids [shard * n_vocab, (shard + 1) * n_vocab) of the
    vocabulary minus `skip`, for each greedy length (greedy length outer, as the original loops).

    Raises:
        ValueError: the shard starts past the end of the vocabulary.
    """
    first = shard * n_vocab
    if first >= vocab_size:
        raise UserError(f"shard {shard} starts at id {first}, past the vocabulary ({vocab_size} ids, "
                         f"{-(-vocab_size // n_vocab)} shards of n_vocab={n_vocab})")
    ids = [i for i in range(first, min(first + n_vocab, vocab_size)) if i not in skip]
    return [(i, j) for j in greedy_lengths for i in ids]


def eos_ids_of(model, tokenizer, eos_ids: Optional[List[int]]) -> list[int]:
    if eos_ids is not None:
        return list(eos_ids)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos or [])


def to_record(seq: dict, tokenizer) -> dict:
    return {"text": tokenizer.decode(seq["token_ids"], skip_special_tokens=True), "token_ids": seq["token_ids"],
            "start_id": seq["start_id"], "greedy_len": seq["greedy_len"], "n_tokens": len(seq["token_ids"]),
            "finish": seq["finish"]}


def record_settings(cfg: GenerateConfig, shard: int, vocab_size: int, eos: list[int]) -> dict:
    """What decides a shard's records (batch_size, device and threads do not: see the README)."""
    keys = ("model", "n_vocab", "greedy_lengths", "max_length", "temperature", "top_k", "top_p", "seed", "dtype")
    return {**{k: getattr(cfg, k) for k in keys}, "shard": shard, "vocab_size": vocab_size, "eos_ids": eos}


def is_complete(cfg: GenerateConfig) -> bool:
    """The shard's metadata says complete and was made with these settings."""
    shard = resolve_shard(cfg.shard)
    path = shard_path(cfg.out_dir, shard)
    meta = read_meta(path) if path.is_file() else None
    if not meta or meta.get("complete") is not True:
        return False
    old = meta.get("settings", {})
    eos = cfg.eos_ids if cfg.eos_ids is not None else old.get("eos_ids")
    return record_settings(cfg, shard, old.get("vocab_size"), eos) == old


def run(cfg: GenerateConfig) -> Path:
    """Generate (or finish) one shard; return its file. Records already in the file are kept."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    shard, device = resolve_shard(cfg.shard), resolve_device(cfg.device)
    logger.info("config: %s", cfg)
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device)
    model.eval()
    vocab_size, eos = len(tokenizer), eos_ids_of(model, tokenizer, cfg.eos_ids)
    jobs = shard_jobs(shard, cfg.n_vocab, cfg.greedy_lengths, vocab_size, skipped_ids(tokenizer))
    path = shard_path(cfg.out_dir, shard)
    repair_shard(path)
    done = done_keys(path)
    settings = record_settings(cfg, shard, vocab_size, eos)
    check_meta(path, settings, has_records=bool(done), n_expected=len(jobs), complete=False)
    todo = [job for job in jobs if job not in done]
    logger.info("shard %d -> %s: %d sequences, %d already written, %d to generate on %s (batch %d)",
                shard, path, len(jobs), len(jobs) - len(todo), len(todo), device, cfg.batch_size)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    tokens, new, start = 0, 0, time.perf_counter()
    with ShardWriter(path) as writer, tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="seq",
                                           desc=f"shard {shard:02d}", disable=progress_disabled()) as bar:
        for seq in generate_sequences(model, todo, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                      seed=cfg.seed, eos_ids=eos, sampling=sampling):
            writer.write(to_record(seq, tokenizer))
            tokens, new = tokens + len(seq["token_ids"]) - 1, new + 1
            elapsed = time.perf_counter() - start
            bar.set_postfix(seq_s=f"{new / elapsed:.2f}", tok_s=f"{tokens / elapsed:.1f}", refresh=False)
            bar.update(1)
    elapsed = time.perf_counter() - start
    write_meta(path, settings, n_expected=len(jobs), complete=True)
    logger.info("shard %d done: %d new sequences, %d new tokens in %.1f s (%.1f tok/s)", shard, len(todo), tokens,
                elapsed, tokens / max(elapsed, 1e-9))
    return path
