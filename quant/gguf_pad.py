"""Zero-padding a Llama's widths to whole GGUF blocks, computing the same function.

    padding = block_padding(model.config, 256)       # None when the widths are already whole blocks
    weight = padding.tensor("model.layers.0.self_attn.q_proj.weight", weight)

llama.cpp's ternary types (TQ1_0 / TQ2_0) store rows in blocks of 256 weights, so every linear's
in_features must be a multiple of 256. SmolLM2-135M has hidden_size 576 (= 9 heads x 64), which is
not. The padded model has hidden H' (the next multiple of the block), intermediate I' likewise, and
H' / head_dim query heads; it computes exactly the original function:
  * the residual stream's extra H' - H dimensions stay zero: the embeddings, o_proj and down_proj
    write zeros there, and every linear reads them through zero columns;
  * query heads move so that each KV group keeps its own heads (llama.cpp maps query head h to KV
    head h // (heads / kv_heads)): original head j of group g goes to g * heads' / kv_heads + j; the
    added heads have zero q_proj rows and zero o_proj columns, so they add nothing;
  * the extra intermediate units have zero gate / up rows (silu(0) * 0 = 0) and zero down columns;
  * RMSNorm averages over H' instead of H: with eps' = eps * H / H' and norm weights times
    sqrt(H / H'), x / sqrt(mean'(x^2) + eps') * w' equals x / sqrt(mean(x^2) + eps) * w.
Zero rows are zero blocks (d = 0) and zero columns complete blocks, so a ternary linear's padded
blocks still hold codes -1 / 0 / 1 times the trained fp16 scale.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch

from quant.errors import UserError


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@dataclass(frozen=True)
class BlockPadding:
    """Original and padded widths of a Llama (module docstring)."""

    hidden: int
    hidden_to: int
    inter: int
    inter_to: int
    heads: int
    heads_to: int
    kv_heads: int
    head_dim: int

    def head_index(self) -> torch.Tensor:
        """Padded position of each original query head (its KV group keeps it)."""
        per, per_to = self.heads // self.kv_heads, self.heads_to // self.kv_heads
        return torch.tensor([(h // per) * per_to + h % per for h in range(self.heads)])

    def _place_heads(self, w: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(w.shape)
        shape[dim] = self.heads_to * self.head_dim
        out = w.new_zeros(shape)
        rows = (self.head_index()[:, None] * self.head_dim + torch.arange(self.head_dim)).flatten()
        out.index_copy_(dim, rows, w)
        return out

    def tensor(self, key: str, w: torch.Tensor) -> torch.Tensor:
        """The padded version of state-dict tensor `key` (a Llama's names; biases are not covered)."""
        leaf = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
        if w.dim() == 1:  # RMSNorm weights
            if w.shape[0] != self.hidden:
                raise UserError(f"cannot pad {key} of shape {tuple(w.shape)}: not a hidden-size norm")
            return _pad(w * math.sqrt(self.hidden / self.hidden_to), (self.hidden_to,))
        if leaf == "q_proj":
            return _pad(self._place_heads(w, 0), (self.heads_to * self.head_dim, self.hidden_to))
        if leaf in ("k_proj", "v_proj"):
            return _pad(w, (w.shape[0], self.hidden_to))
        if leaf == "o_proj":
            return _pad(self._place_heads(w, 1), (self.hidden_to, self.heads_to * self.head_dim))
        if leaf in ("gate_proj", "up_proj"):
            return _pad(w, (self.inter_to, self.hidden_to))
        if leaf == "down_proj":
            return _pad(w, (self.hidden_to, self.inter_to))
        if leaf in ("embed_tokens", "lm_head"):
            return _pad(w, (w.shape[0], self.hidden_to))
        raise UserError(f"cannot pad tensor {key}: not a Llama decoder tensor this padding knows")

    def config(self, config):
        """A copy of the HF config with the padded widths (and eps' of the module docstring)."""
        out = copy.deepcopy(config)
        out.hidden_size, out.intermediate_size = self.hidden_to, self.inter_to
        out.num_attention_heads, out.head_dim = self.heads_to, self.head_dim
        out.rms_norm_eps = config.rms_norm_eps * self.hidden / self.hidden_to
        return out


def _pad(w: torch.Tensor, shape: tuple) -> torch.Tensor:
    out = w.new_zeros(shape)
    out[tuple(slice(0, n) for n in w.shape)] = w
    return out


def block_padding(config, block: int) -> Optional[BlockPadding]:
    """The padding that makes every linear's in_features a multiple of `block`; None if none is needed.

    Raises:
        UserError: a geometry the padding cannot keep exact (query width != hidden size, or the padded
            head count not a multiple of the KV head count).
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if hidden % block == 0 and inter % block == 0 and (heads * head_dim) % block == 0:
        return None
    hidden_to, inter_to = _round_up(hidden, block), _round_up(inter, block)
    if heads * head_dim != hidden or hidden_to % head_dim or (hidden_to // head_dim) % kv_heads:
        raise UserError(f"cannot pad this Llama to blocks of {block}: hidden {hidden}, {heads} heads of {head_dim}, "
                        f"{kv_heads} KV heads (needs heads x head_dim = hidden and {hidden_to} / {head_dim} heads "
                        f"a multiple of {kv_heads})")
    return BlockPadding(hidden, hidden_to, inter, inter_to, heads, hidden_to // head_dim, kv_heads, head_dim)
