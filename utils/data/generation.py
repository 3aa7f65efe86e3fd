"""The decoding engine of data-free generation: many independent sequences at once, one slot each.

The original runs `generate` once per sequence. Here one batch of `batch_size` rows decodes
one token per row per step through the stock HF forward with a slot KV cache (`SlotCache`): each
row owns a cache row and its own position, and a 4D mask hides everything past it. Because every
sequence starts from a single token there is no prefill: a finished row is refilled at once with
the next start token at position 0 (continuous batching), and when no work is left the idle rows
are dropped from the batch. Each record samples from its own `torch.Generator`, seeded from
(seed, start token, greedy length), so what a record contains does not depend on which other
sequences shared its batch (up to float rounding: see the README, "Data-free data").

The mask is built in the form the model's attention implementation takes (transformers' mask
interface says which): a bool mask for sdpa, an additive float mask (0 visible, the dtype's min
elsewhere) for eager, which adds its mask to the scores; a bool mask there would leave stale cache
slots visible. Implementations that take no dense 4D mask (flash attention variants, flex) are
refused. Ids past `vocab_limit` (padded vocabularies wider than the tokenizer) are never emitted.

Used by recipes/generate.py (one shard of `generate_data.py`) and benchmarks/bench_generate.py.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from quant.errors import UserError
from utils.data.topk import topk_targets

_INITIAL_CAPACITY = 128  # cache positions allocated first; doubled on demand up to max_length


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
    topk: list = field(default_factory=list)  # per position: (ids [K], logprobs [K + 1]) with teacher_topk


def record_seed(seed: int, start_id: int, greedy_len: int) -> int:
    """A 63-bit seed for one record, the same whatever batch or shard generates it."""
    digest = hashlib.sha256(f"{seed}:{start_id}:{greedy_len}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mask_dtype(implementation: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the 4D mask `implementation` takes: bool (sdpa) or `dtype` (eager: added to scores).

    Decided by the mask function transformers registers for it, so registered wrappers (such as the
    KV fake-quant attention of models/patch.py) are served like the implementation they wrap.

    Raises:
        UserError: an implementation that takes no dense 4D mask (flash attention variants, flex).
    """
    builder = ALL_MASK_ATTENTION_FUNCTIONS.get(implementation)
    if builder is sdpa_mask:
        return torch.bool
    if builder is eager_mask:
        return dtype
    raise UserError(f"attn_implementation={implementation}: the slot-cache decoder needs an attention that takes "
                    f"a 4D mask per row; use attn_implementation=eager or attn_implementation=sdpa")


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

    def prepare_step(self, positions: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Set this step's positions ([B]); return the [B, 1, 1, window] attention mask: bool (True:
        visible), or of a float `dtype`, additive (0 where visible, the dtype's min elsewhere)."""
        self.state.positions = positions
        self.state.window = int(positions.max()) + 1
        while self.state.capacity < self.state.window:
            self.state.capacity = min(2 * self.state.capacity, self.state.max_length)
        slots = torch.arange(self.state.window, device=positions.device)
        visible = (slots[None, :] <= positions[:, None])[:, None, None, :]
        if dtype == torch.bool:
            return visible
        return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(~visible,
                                                                                        torch.finfo(dtype).min)

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


@dataclass(frozen=True)
class _Decoding:
    """What every step of one `generate_sequences` call shares."""

    sampling: Sampling
    mask_dtype: torch.dtype
    vocab_limit: Optional[int]
    device: torch.device
    teacher_topk: int = 0


@torch.inference_mode()
def _step(model, cache: SlotCache, rows: list, how: _Decoding) -> tuple[list[int], Optional[tuple]]:
    """One decode step for every row (an idle row, None, feeds token 0 at position 0): the next tokens,
    and with `teacher_topk` the logits' top-K targets (ids [B, K], log-probs [B, K + 1], on the CPU)."""
    device = how.device
    tokens = torch.tensor([[r.token_ids[-1]] if r else [0] for r in rows], device=device)
    positions = torch.tensor([len(r.token_ids) - 1 if r else 0 for r in rows], device=device)
    mask = cache.prepare_step(positions, how.mask_dtype)
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions[:, None],
                   past_key_values=cache, use_cache=True).logits[:, -1, :how.vocab_limit]  # [B, V']
    greedy = [r is None or len(r.token_ids) < r.greedy_len for r in rows]
    uniforms = [0.0 if g else torch.rand(1, generator=r.generator).item() for g, r in zip(greedy, rows)]
    targets = None
    if how.teacher_topk:  # from the logits this step computed anyway: no extra forward
        targets = tuple(t.cpu() for t in topk_targets(logits, how.teacher_topk))
    tokens = sample_next(logits, torch.tensor(greedy, device=device), torch.tensor(uniforms), how.sampling)
    return tokens.tolist(), targets


def _finished(row: _Row, reason: str) -> dict:
    seq = {"start_id": row.start_id, "greedy_len": row.greedy_len, "token_ids": row.token_ids, "finish": reason}
    if row.topk:
        seq["topk_ids"] = torch.stack([ids for ids, _ in row.topk])  # [T, K]
        seq["topk_logprobs"] = torch.stack([lps for _, lps in row.topk])  # [T, K + 1]
    return seq


def generate_sequences(model, jobs: Iterable[tuple[int, int]], *, max_length: int, batch_size: int, seed: int,
                       eos_ids: Iterable[int], sampling: Sampling = Sampling(),
                       vocab_limit: Optional[int] = None, teacher_topk: int = 0) -> Iterator[dict]:
    """Yield one dict per finished job (start_id, greedy_len): token_ids (start first) and finish; with
    `teacher_topk` also topk_ids [T, K] and topk_logprobs [T, K + 1] (T = tokens - 1, layout:
    utils/data/topk.py), the model's distribution at every position, before the sampling warpers.

    Records come out in the order they finish. Finished rows are refilled from the queue; once it is
    empty, idle rows are dropped from the batch (a quarter idle at a time, so the cache copy is rare).

    Args:
        vocab_limit: only ids below it are emitted (the tokenizer's length, when the model's logits
            are wider: padded vocabularies); None: every logit.
    Raises:
        UserError: the model's attention implementation takes no 4D mask (see `mask_dtype`).
    """
    queue = deque(jobs)
    device = next(model.parameters()).device
    masks = mask_dtype(model.config._attn_implementation or "eager", model.dtype)
    how = _Decoding(sampling, masks, vocab_limit, device, teacher_topk)
    eos = set(int(e) for e in eos_ids)
    cache = SlotCache(model.config.num_hidden_layers, max_length)
    rows: list = [_new_row(queue.popleft(), seed) for _ in range(min(batch_size, len(queue)))]
    while rows:
        tokens, targets = _step(model, cache, rows, how)
        for i, token in enumerate(tokens):
            row = rows[i]
            if row is None:
                continue
            row.token_ids.append(token)
            if targets is not None:
                row.topk.append((targets[0][i], targets[1][i]))
            reason = _finish_reason(row, eos, max_length)
            if reason:
                yield _finished(row, reason)
                rows[i] = _new_row(queue.popleft(), seed) if queue else None
        idle = [i for i, r in enumerate(rows) if r is None]
        if idle and len(idle) >= max(1, len(rows) // 4):
            keep = [i for i, r in enumerate(rows) if r is not None]
            cache.keep_rows(torch.tensor(keep, dtype=torch.long, device=device))
            rows = [rows[i] for i in keep]
