"""KD loss: hand-computed reference, reductions, CE mixing, chunked == plain (loss and gradients).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/train/test_distill.py
"""

import math

import pytest
import torch
from torch import nn

from utils.train.distill import IGNORE_INDEX, KDLoss, next_token_labels, token_kl


def _kl_by_hand(s_row, t_row, temp):
    zs = [x / temp for x in s_row]
    zt = [x / temp for x in t_row]
    ls = math.log(sum(math.exp(z) for z in zs))
    lt = math.log(sum(math.exp(z) for z in zt))
    return temp**2 * sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_token_kl_matches_hand_computation(temp):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    got = token_kl(s, t, temp)
    want = torch.tensor([_kl_by_hand(s[i].tolist(), t[i].tolist(), temp) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert token_kl(s, s, temp).abs().max() < 1e-6


def _setup(seed=0, b=2, t=7, h=8, v=11):
    torch.manual_seed(seed)
    head_s, head_t = nn.Linear(h, v, bias=False), nn.Linear(h, v, bias=False)
    hid_s = torch.randn(b, t, h, requires_grad=True)
    hid_t = torch.randn(b, t, h)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -3:] = 0  # padding at the end of the second row
    ids = torch.randint(0, v, (b, t))
    return head_s, head_t, hid_s, hid_t, next_token_labels(ids, mask), mask


def test_reductions_and_ce_match_reference():
    head_s, head_t, hid_s, hid_t, labels, mask = _setup()
    per_token = token_kl(head_s(hid_s), head_t(hid_t)).detach() * mask
    ce = nn.functional.cross_entropy(head_s(hid_s).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    out = KDLoss(ce_loss_scale=0.5)(hid_s, head_s, hid_t, head_t, labels, mask)
    torch.testing.assert_close(out["kd"], per_token.sum() / mask.sum())
    torch.testing.assert_close(out["ce"], ce.detach())
    torch.testing.assert_close(out["loss"].detach(), out["kd"] + 0.5 * out["ce"])
    orig = KDLoss(reduction="batchmean_sequence")(hid_s, head_s, hid_t, head_t, labels, mask)
    torch.testing.assert_close(orig["kd"], per_token.sum() / 2)


def test_zero_weight_term_skipped_in_training_but_reported_held_out():
    """A CE-only run (kd_loss_scale=0) trains on CE alone, yet its held-out evaluation (no grad)
    reports the true KD loss, not 0; likewise the CE term of a KD-only run."""
    head_s, head_t, hid_s, hid_t, labels, mask = _setup()
    kd_ref = (token_kl(head_s(hid_s), head_t(hid_t)).detach() * mask).sum() / mask.sum()
    ce_only = KDLoss(kd_loss_scale=0, ce_loss_scale=1)
    train = ce_only(hid_s, head_s, hid_t, head_t, labels, mask)
    assert float(train["kd"]) == 0.0  # not computed while training
    torch.testing.assert_close(train["loss"].detach(), train["ce"])
    with torch.no_grad():
        held_out = ce_only(hid_s, head_s, hid_t, head_t, labels, mask)
        kd_only = KDLoss()(hid_s, head_s, hid_t, head_t, labels, mask)
    torch.testing.assert_close(held_out["kd"], kd_ref)
    torch.testing.assert_close(held_out["loss"], held_out["ce"])  # the weights still apply to the loss
    torch.testing.assert_close(kd_only["ce"], train["ce"].detach())
    torch.testing.assert_close(kd_only["loss"], kd_ref)


def test_labels_shift_and_ignore_padding():
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = next_token_labels(ids, torch.tensor([[1, 1, 1, 0]]))
    assert labels.tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("chunk", [1, 3, 5, 100])
def test_chunked_equals_plain_with_gradients(chunk):
    grads = []
    for size in (0, chunk):
        head_s, head_t, hid_s, hid_t, labels, mask = _setup(seed=1)
        out = KDLoss(temperature=1.5, ce_loss_scale=0.3, chunk_size=size)(hid_s, head_s, hid_t, head_t, labels, mask)
        out["loss"].backward()
        grads.append((out["loss"].detach(), hid_s.grad.clone(), head_s.weight.grad.clone()))
        assert head_t.weight.grad is None  # the teacher never gets a gradient
    for plain, chunked in zip(*grads):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(reduction="sum"), dict(chunk_size=-1),
                                    dict(kd_loss_scale=0, ce_loss_scale=0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        KDLoss(**kwargs)


def _token_kl_plain(s, t, temp=1.0):
    """The formula before the 0 log 0 = 0 guard (NaN at a -inf teacher logit)."""
    log_s = nn.functional.log_softmax(s.float() / temp, dim=-1)
    log_t = nn.functional.log_softmax(t.float() / temp, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * temp**2


@pytest.mark.parametrize("temp", [1.0, 1.5])
def test_token_kl_is_bit_identical_to_the_plain_formula_on_finite_logits(temp):
    torch.manual_seed(3)
    s, t = torch.randn(64, 301) * 4, torch.randn(64, 301) * 4
    assert torch.equal(token_kl(s, t, temp), _token_kl_plain(s, t, temp))


def test_minus_inf_teacher_logits_give_a_finite_loss_and_gradient():
    torch.manual_seed(0)
    s, t = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6)
    t[:, 4:] = float("-inf")  # tokens the teacher can never emit
    t[2, 0] = float("-inf")
    assert torch.isnan(_token_kl_plain(s.detach(), t)).all()  # what the plain formula gives
    got = token_kl(s, t)
    want = torch.tensor([_kl_by_hand(s[i, :4].tolist(), t[i, :4].tolist(), 1.0) for i in range(2)])
    torch.testing.assert_close(got[:2], want + _logsumexp_gap(s[:2], 4), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(s.grad).all()
    head_s, head_t, hid_s, hid_t, labels, mask = _setup()
    masked_head = lambda h: head_t(h).masked_fill(torch.arange(11) >= 9, float("-inf"))  # noqa: E731
    out = KDLoss(chunk_size=4)(hid_s, head_s, hid_t, masked_head, labels, mask)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(hid_s.grad).all()


def _logsumexp_gap(s, k):
    """KL over all V student classes minus KL over the first k: the student's mass outside them."""
    return torch.logsumexp(s.detach(), -1) - torch.logsumexp(s.detach()[:, :k], -1)
