"""Data-free training data: the teacher writes its own text, many sequences at once.

    python generate_data.py 0 n_vocab=500 max_length=2048 batch_size=32   # shard 0 -> gen_data/gen.chunk.00.jsonl

The LLM-QAT recipe (arXiv 2305.17888, its `generate_data.py`): every vocabulary id is a start token,
fed alone (no BOS); for each total greedy length j (default 3, 4, 5) the first j tokens of the
sequence (start token included) are top-1, the rest are sampled from the softmax (top_k 50, T 1.0:
Hugging Face `generate`'s defaults then) until EOS or `max_length` tokens in total.

Design. The original runs `generate` once per sequence. Here one batch of `batch_size` rows decodes
one token per row per step through the stock HF forward with a slot KV cache (`SlotCache`): each
row owns a cache row and its own position, and a 4D mask hides everything past it. Because every
sequence starts from a single token there is no prefill: a finished row is refilled at once with
the next start token at position 0 (continuous batching), and when no work is left the idle rows
are dropped from the batch. Each record samples from its own `torch.Generator`, seeded from
(seed, start token, greedy length), so what a record contains does not depend on which other
sequences shared its batch (up to float rounding: see the README, "Data-free data").
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional

import torch
from tqdm import tqdm
from transformers.cache_utils import Cache, CacheLayerMixin

logger = logging.getLogger(__name__)

_INITIAL_CAPACITY = 128  # cache positions allocated first; doubled on demand up to max_length


@dataclass
class GenerateConfig:
    """Settings of `generate_data.py` (values in configs/generate.yaml).

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
                raise ValueError(message)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0


@dataclass
class _Row:
    start_id: int
    greedy_len: int
    generator: torch.Generator
    token_ids: List[int]


def record_seed(seed: int, start_id: int, greedy_len: int) -> int:
    """A 63-bit seed for one record, the same whatever batch or shard generates it."""
    digest = hashlib.sha256(f"{seed}:{start_id}:{greedy_len}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_next(logits: torch.Tensor, greedy: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Next token per row: argmax where `greedy`, else an inverse-CDF draw at `uniforms`.

    The draw follows HF generate's warpers (temperature, then top_k, then top_p) on the sorted top
    candidates; one uniform per row makes the result independent of the other rows.

    Args:
        logits: [B, V] last-position logits.
        greedy: [B] bool, rows that take the argmax.
        uniforms: [B] floats in [0, 1) (ignored on greedy rows).
    """
    if bool(greedy.all()):
        return logits.argmax(-1)
    scores = logits.float()
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    k = sampling.top_k if 0 < sampling.top_k < scores.shape[-1] else scores.shape[-1]
    values, indices = scores.topk(k, dim=-1)  # [B, k], sorted descending
    probs = values.softmax(-1)
    if sampling.top_p < 1.0:  # keep a token while the mass ranked above it is < top_p (HF TopPLogitsWarper)
        probs = probs * ((probs.cumsum(-1) - probs) < sampling.top_p)
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cdf, target, right=True).clamp_max(k - 1)
    picked = indices.gather(-1, pick).squeeze(-1)
    rows = greedy.nonzero().squeeze(-1)  # the argmax only where it is needed (a few fresh rows)
    return picked.index_copy(0, rows, logits[rows].argmax(-1)) if rows.numel() else picked


class _SlotState:
    """What all layers of a `SlotCache` share: each row's write position and the visible window."""

    def __init__(self, capacity: int, max_length: int):
        self.capacity, self.max_length = capacity, max_length
        self.positions: Optional[torch.Tensor] = None  # [B] position of this step's token per row
        self.window = 1  # cache positions visible this step: max(positions) + 1


class _SlotLayer(CacheLayerMixin):
    """One layer's KV cache: [B, H, capacity, D], row b written at its own position."""

    is_sliding = False

    def __init__(self, state: _SlotState):
        super().__init__()
        self.state = state

    def lazy_initialization(self, key_states, value_states) -> None:
        batch, heads, _, _ = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.state.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.state.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys.shape[2] < self.state.capacity:
            grow = self.state.capacity - self.keys.shape[2]
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, grow))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, grow))
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.keys[rows, :, self.state.positions] = key_states[:, :, 0]  # [B, H, D]
        self.values[rows, :, self.state.positions] = value_states[:, :, 0]
        window = self.state.window
        return self.keys[:, :, :window], self.values[:, :, :window]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.window, 0

    def get_seq_length(self) -> int:
        return self.state.window

    def get_max_length(self) -> int:
        return self.state.max_length

    def keep_rows(self, rows: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[rows], self.values[rows]


class SlotCache(Cache):
    """A KV cache whose rows are independent sequences at their own positions (see module docstring)."""

    def __init__(self, num_layers: int, max_length: int):
        self.state = _SlotState(min(_INITIAL_CAPACITY, max_length), max_length)
        super().__init__(layers=[_SlotLayer(self.state) for _ in range(num_layers)])

    def prepare_step(self, positions: torch.Tensor) -> torch.Tensor:
        """Set this step's positions ([B]); return the [B, 1, 1, window] bool attention mask."""
        self.state.positions = positions
        self.state.window = int(positions.max()) + 1
        while self.state.capacity < self.state.window:
            self.state.capacity = min(2 * self.state.capacity, self.state.max_length)
        visible = torch.arange(self.state.window, device=positions.device)
        return (visible[None, :] <= positions[:, None])[:, None, None, :]

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_rows(rows)


def _new_row(job: tuple[int, int], seed: int) -> _Row:
    start_id, greedy_len = job
    generator = torch.Generator().manual_seed(record_seed(seed, start_id, greedy_len))
    return _Row(start_id, greedy_len, generator, [start_id])


def _finish_reason(row: _Row, eos_ids: set, max_length: int) -> Optional[str]:
    if row.token_ids[-1] in eos_ids and len(row.token_ids) > 1:
        return "eos"
    return "length" if len(row.token_ids) >= max_length else None


@torch.inference_mode()
def _step(model, cache: SlotCache, rows: list, sampling: Sampling, device) -> list[int]:
    """One decode step for every row (an idle row, None, feeds token 0 at position 0)."""
    tokens = torch.tensor([[r.token_ids[-1]] if r else [0] for r in rows], device=device)
    positions = torch.tensor([len(r.token_ids) - 1 if r else 0 for r in rows], device=device)
    mask = cache.prepare_step(positions)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions[:, None],
                   past_key_values=cache, use_cache=True).logits[:, -1]
    greedy = [r is None or len(r.token_ids) < r.greedy_len for r in rows]
    uniforms = [0.0 if g else torch.rand(1, generator=r.generator).item() for g, r in zip(greedy, rows)]
    return sample_next(logits, torch.tensor(greedy, device=device), torch.tensor(uniforms), sampling).tolist()


def generate_sequences(model, jobs: Iterable[tuple[int, int]], *, max_length: int, batch_size: int, seed: int,
                       eos_ids: Iterable[int], sampling: Sampling = Sampling()) -> Iterator[dict]:
    """Yield one dict per finished job (start_id, greedy_len): token_ids (start first) and finish.

    Records come out in the order they finish. Finished rows are refilled from the queue; once it is
    empty, idle rows are dropped from the batch (a quarter idle at a time, so the cache copy is rare).
    """
    queue = deque(jobs)
    device = next(model.parameters()).device
    eos = set(int(e) for e in eos_ids)
    cache = SlotCache(model.config.num_hidden_layers, max_length)
    rows: list = [_new_row(queue.popleft(), seed) for _ in range(min(batch_size, len(queue)))]
    while rows:
        for i, token in enumerate(_step(model, cache, rows, sampling, device)):
            row = rows[i]
            if row is None:
                continue
            row.token_ids.append(token)
            reason = _finish_reason(row, eos, max_length)
            if reason:
                yield {"start_id": row.start_id, "greedy_len": row.greedy_len, "token_ids": row.token_ids,
                       "finish": reason}
                rows[i] = _new_row(queue.popleft(), seed) if queue else None
        idle = [i for i, r in enumerate(rows) if r is None]
        if idle and len(idle) >= max(1, len(rows) // 4):
            keep = [i for i, r in enumerate(rows) if r is not None]
            cache.keep_rows(torch.tensor(keep, dtype=torch.long, device=device))
            rows = [rows[i] for i in keep]


# ---- one shard, end to end ------------------------------------------------------------------------


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
        raise ValueError(f"shard {shard} starts at id {first}, past the vocabulary ({vocab_size} ids, "
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


def run(cfg: GenerateConfig) -> Path:
    """Generate (or finish) one shard; return its file. Records already in the file are kept."""
    from models import load_model
    from utils.data.shards import ShardWriter, check_meta, done_keys, repair_shard, shard_path, write_meta
    from utils.logging import progress_disabled

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
