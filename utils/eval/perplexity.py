"""Perplexity with the protocol of GPTQ and the quantization literature.

The text is tokenized once; the token stream is cut into non-overlapping windows of `seqlen`
tokens (the remainder is dropped); each window is scored on its own (no context carried over);
PPL = exp(mean next-token NLL over all scored tokens). `limit` keeps the first N windows.

Error bar: each window's summed NLL and token count are kept (`per_window`), and `ppl_ci95` is a
95 % percentile bootstrap interval over windows (utils/eval/stats.py: 1000 resamples of the windows
with replacement, seed 0, ppl = exp(sum nll / sum tokens) of each resample). The same per-window
data give paired intervals between two models on the same windows (utils/eval/report.py).

C4 (`c4_windows`) follows GPTQ's `get_c4`: with `random.seed(seed)`, 256 times draw a document at
random until one is longer than `seqlen` tokens, then a random `seqlen`-token span of it. Locally
the documents are the 2000-document validation subset of shared/data, so the windows (and the
numbers) are not those of GPTQ's first validation shard.
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
from torch.nn import functional as F
from tqdm import tqdm

from quant.errors import UserError
from utils.eval.stats import ppl_ci95
from utils.logging import progress_disabled


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Token ids [N] of `text`, no special tokens added beyond what the tokenizer's call adds."""
    return tokenizer(text, return_tensors="pt").input_ids[0]


def make_windows(ids: torch.Tensor, seqlen: int, limit: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows [W, seqlen] of a token stream [N]; the tail shorter than seqlen is dropped."""
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise UserError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _row_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each window of a batch (logits [B, T-1, V], batch [B, T])."""
    return [F.cross_entropy(logits[i], batch[i, 1:], reduction="sum").double().item() for i in range(len(batch))]


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "ppl",
               per_window: Optional[list] = None) -> tuple[float, int]:
    """Sum of next-token NLL (float64) and number of predicted tokens over windows [W, T].

    Args:
        per_window: if a list, each window's summed NLL is appended to it (one forward per batch as
            before; the batch total, which gives the ppl, is summed exactly as without it).
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, disable=progress_disabled()):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += nll.double().item()
        count += batch[:, 1:].numel()
        if per_window is not None:
            per_window.extend([nll.double().item()] if len(batch) == 1 else _row_nll(logits, batch))
    return total, count


def c4_windows(tokenizer, documents: Sequence[str], seqlen: int = 2048, n_windows: int = 256,
               seed: int = 0, limit: Optional[int] = None) -> torch.Tensor:
    """GPTQ-style random windows [W, seqlen] from `documents` (see module docstring).

    Raises:
        ValueError: no document is longer than `seqlen` tokens.
    """
    encoded = tokenizer(list(documents)).input_ids  # the same ids as tokenize_stream, all at once
    if not any(len(ids) > seqlen for ids in encoded):
        raise UserError(f"no C4 document has more than seqlen={seqlen} tokens; use a smaller seqlen")
    rng, windows = random.Random(seed), []
    for _ in range(n_windows if limit is None else min(limit, n_windows)):
        while True:
            ids = encoded[rng.randint(0, len(encoded) - 1)]
            if len(ids) > seqlen:
                break
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(torch.tensor(ids[start : start + seqlen]))
    return torch.stack(windows)


def perplexity_of_windows(model, windows: torch.Tensor, batch_size: int = 1) -> dict:
    """{'ppl', 'nll', 'tokens', 'windows', 'ppl_ci95', 'per_window'} of token windows [W, T], each
    scored on its own; per_window = {'nll': [summed NLL of each window], 'tokens': [its count]}."""
    was_training, per_window = model.training, []
    model.eval()
    total, count = window_nll(model, windows, batch_size, per_window=per_window)
    model.train(was_training)
    nll, tokens = total / count, [windows.shape[1] - 1] * len(windows)
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "windows": len(windows),
            "ppl_ci95": ppl_ci95(per_window, tokens), "per_window": {"nll": per_window, "tokens": tokens}}


def perplexity(model, tokenizer, text: str, seqlen: int = 2048, limit: Optional[int] = None,
               batch_size: int = 1) -> dict:
    """`perplexity_of_windows` of `text` under `model` (see module docstring)."""
    return perplexity_of_windows(model, make_windows(tokenize_stream(tokenizer, text), seqlen, limit), batch_size)
