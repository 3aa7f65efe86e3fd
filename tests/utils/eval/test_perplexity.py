"""Perplexity (utils/eval/perplexity.py) against a direct token-by-token computation, on a tiny Llama.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/eval/test_perplexity.py
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.nn import functional as F

from models import load_model
from tests.conftest import save_tiny_model_dir
from utils.eval.perplexity import c4_windows, make_windows, perplexity, perplexity_of_windows, tokenize_stream

TEXT = "\n\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(40))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_model_dir(tmp_path_factory.mktemp("ppl") / "tiny"))


@torch.no_grad()
def direct_ppl(model, ids: torch.Tensor, seqlen: int, limit=None) -> float:
    """Each non-overlapping window on its own, one forward each, NLL summed in float64."""
    n = ids.numel() // seqlen if limit is None else min(limit, ids.numel() // seqlen)
    nll, count = 0.0, 0
    for w in range(n):
        window = ids[w * seqlen : (w + 1) * seqlen]
        logp = F.log_softmax(model(window[None]).logits[0].double(), dim=-1)
        nll -= logp[torch.arange(seqlen - 1), window[1:]].sum().item()
        count += seqlen - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("limit,batch_size", [(None, 1), (3, 2), (None, 4)])
def test_perplexity_matches_direct_computation(tiny, limit, batch_size):
    model, tok = tiny
    ids = tokenize_stream(tok, TEXT)
    got = perplexity(model, tok, TEXT, seqlen=64, limit=limit, batch_size=batch_size)
    assert got["ppl"] == pytest.approx(direct_ppl(model, ids, 64, limit), rel=1e-5)
    n_windows = ids.numel() // 64 if limit is None else limit
    assert got["windows"] == n_windows and got["tokens"] == n_windows * 63


def test_windows_drop_the_tail_and_too_short_text_is_an_error():
    ids = torch.arange(10)
    assert make_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(ids, 11)


def test_c4_windows_follow_the_gptq_sampling(tiny):
    model, tok = tiny
    docs = ["short doc", "x" * 50 + " long document number one " * 3, "tiny", "another long text, " * 6]
    windows = c4_windows(tok, docs, seqlen=32, n_windows=5, seed=0)
    rng, encoded = random.Random(0), [tokenize_stream(tok, d) for d in docs]
    for window in windows:  # the same draws, replayed by hand
        while True:
            ids = encoded[rng.randint(0, len(docs) - 1)]
            if ids.numel() > 32:
                break
        start = rng.randint(0, ids.numel() - 33)
        assert torch.equal(window, ids[start : start + 32])
    assert c4_windows(tok, docs, seqlen=32, n_windows=5, seed=0, limit=2).shape == (2, 32)
    assert perplexity_of_windows(model, windows)["windows"] == 5
    with pytest.raises(ValueError, match="more than seqlen"):
        c4_windows(tok, ["a", "b"], seqlen=32)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_window_nll_and_bootstrap_interval(tiny, batch_size):
    """Each window's summed NLL is kept (as a direct forward gives it), the ppl is the one of the
    batch totals, bit for bit, and its 95 % interval over windows contains it."""
    from utils.eval.perplexity import window_nll
    from utils.eval.stats import ppl_ci95

    model, tok = tiny
    windows = make_windows(tokenize_stream(tok, TEXT), 32)
    got = perplexity_of_windows(model, windows, batch_size)
    total, count = window_nll(model, windows, batch_size)  # the path without per-window data
    assert got["ppl"] == math.exp(total / count)
    per = got["per_window"]
    assert len(per["nll"]) == len(windows) and per["tokens"] == [31] * len(windows)
    for i in (0, len(windows) - 1):
        want = math.log(direct_ppl(model, windows[i], 32)) * 31
        assert per["nll"][i] == pytest.approx(want, rel=1e-5)
    assert sum(per["nll"]) == pytest.approx(total, rel=1e-6)
    lo, hi = got["ppl_ci95"]
    assert lo < got["ppl"] < hi and got["ppl_ci95"] == ppl_ci95(per["nll"], per["tokens"])
