"""Stored-scale weight quantizers (quant/lsq.py): LSQ gradients, ternary / stretched 2-bit grids, MSE init,
and the quantizer module that holds the scale.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_lsq.py
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from quant.config import QuantConfig, QuantSpec
from quant.errors import UserError
from quant.fake_quant import dequantize, quantize_dequantize
from quant.linear import QuantLinear
from quant.lsq import grid, init_scale, lsq_codes, lsq_fake_quantize, lsq_grad_factor


def spec(**kw) -> QuantSpec:
    return QuantConfig(**{"w_bits": 4, "w_quantizer": "lsq", **kw}).weight_spec()


def reference_lsq(x, s, qmin, qmax, zp, g):
    """The LSQ paper's formulation, autograd through round_pass / grad_scale tricks."""
    s = (s - s * g).detach() + s * g
    u = torch.clamp(x / s + zp, qmin, qmax)
    u = (u.round() - u).detach() + u
    return (u - zp) * s


def test_gradients_match_the_closed_form_on_a_tiny_tensor():
    sp = spec(w_bits=3)  # codes -3..3, zp 0, g = 1 / sqrt(4 * 3)
    x = torch.tensor([[0.26, -0.74, 1.9, -5.0]], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[[0.5]]], dtype=torch.float64, requires_grad=True)
    y = lsq_fake_quantize(x, s, sp)
    assert y.tolist() == [[0.5, -0.5, 1.5, -1.5]]  # round(0.52)=1, round(-1.48)=-1, clamp(3.8)=3, clamp(-10)=-3
    y.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64))
    assert x.grad.tolist() == [[1.0, 2.0, 0.0, 0.0]]  # straight through inside, zero where clamped
    # ds = sum g_i * ((q - zp) - v * inside): 1 * (1 - 0.52) + 2 * (-1 + 1.48) + 3 * 3 + 4 * -3
    expected = (0.48 + 2 * 0.48 + 9 - 12) / math.sqrt(4 * 3)
    assert s.grad.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kw", [dict(w_bits=4), dict(w_bits=2), dict(w_quantizer="ternary"),
                                dict(w_bits=3, w_granularity="per_group", w_group_size=8),
                                dict(w_bits=4, weight_format="gguf_q4_0"), dict(w_bits=8, weight_format="gguf_q8_0")])
def test_gradients_equal_the_reference_lsq_implementation(kw):
    sp = spec(**kw)
    torch.manual_seed(0)
    x = torch.randn(6, 64, dtype=torch.float64)
    s0 = init_scale(x, sp) * 0.8  # some elements clamp
    if sp.format.startswith("gguf") or sp.quantizer == "ternary":
        s0 = s0.to(torch.float16).to(torch.float64)  # fp16-exact: the forward's rounding is then the identity
    xa, sa = x.clone().requires_grad_(), s0.clone().requires_grad_()
    xb, sb = x.clone().requires_grad_(), s0.clone().requires_grad_()
    grad = torch.randn(6, 64, dtype=torch.float64)
    lsq_fake_quantize(xa, sa, sp).backward(grad)
    qmin, qmax, zp = grid(sp)
    L = x.shape[-1] // sa.shape[-2]
    xg = xb.unflatten(-1, (sa.shape[-2], L))
    reference_lsq(xg, sb, qmin, qmax, zp, lsq_grad_factor(L, sp)).reshape(x.shape).backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)  # the reference rounds s * (1 / s)
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw, bounds", [(dict(w_bits=3), (-3.0, 3.0)),                 # symmetric: |v| <= 3
                                         (dict(w_bits=4, weight_format="gguf_q4_0"), (-8.0, 7.0))])  # codes 0..15, zp 8
def test_a_weight_exactly_on_the_range_edge_passes_its_gradient(kw, bounds):
    """inside = lo <= w / s <= hi, edges included, whichever way the mask is computed."""
    lo, hi = bounds
    edges = [lo * 0.5, hi * 0.5, lo * 0.5 - 1e-3, hi * 0.5 + 1e-3]
    x = torch.tensor([edges + [0.0] * 28], requires_grad=True)  # one Q4_0 block of 32
    s = torch.tensor([[[0.5]]])
    lsq_fake_quantize(x, s, spec(**kw)).backward(torch.ones(1, 32))
    assert x.grad[0, :4].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_weight_gradient_matches_finite_differences_between_rounding_steps():
    """Where no code changes, y is linear in x with slope 1 inside the range: central differences agree."""
    sp = spec(w_bits=8)
    x = torch.tensor([[0.3001, -0.7]], dtype=torch.float64)
    s = torch.tensor([[[1.0]]], dtype=torch.float64)
    eps = 1e-6
    # dy/ds with x fixed and codes fixed is (q - zp); LSQ adds the straight-through term -v: check the sum
    fd = (lsq_fake_quantize(x, s + eps, sp) - lsq_fake_quantize(x, s - eps, sp)) / (2 * eps)
    q, _, _ = lsq_codes(x, s, sp)
    torch.testing.assert_close(fd, q.reshape(x.shape))


def test_minmax_init_starts_on_the_minmax_grid():
    sp, torch_spec = spec(w_bits=4), QuantSpec(4)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(lsq_fake_quantize(x, init_scale(x, sp), sp), quantize_dequantize(x, torch_spec))


def test_fake_quant_equals_codes_dequantized_exactly():
    sp = spec(w_bits=2, w_granularity="per_group", w_group_size=16)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    s = init_scale(x, sp) * 1.1
    q, s_eff, zp = lsq_codes(x, s, sp)
    assert torch.equal(lsq_fake_quantize(x, s, sp), dequantize(q, s_eff, zp).reshape(x.shape).to(x.dtype))


def test_stretched_2bit_grid_is_balanced():
    """ParetoQ's SEQ: 4 levels {-1.5, -0.5, 0.5, 1.5} * s with s = max / 2: equal bins over [-max, max]."""
    sp = spec(w_bits=2)
    x = torch.linspace(-1, 1, 4001).unsqueeze(0)  # max|x| = 1
    s = init_scale(x, sp)
    assert s.item() == 0.5
    y = lsq_fake_quantize(x, s, sp)
    levels, counts = y.unique(return_counts=True)
    assert levels.tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert counts.max() - counts.min() <= 2  # equal bins, up to the tie points


def test_ternary_values_are_minus_s_zero_s_per_slice_and_balanced():
    cfg = QuantConfig(w_bits=4, w_quantizer="ternary", w_granularity="per_group", w_group_size=16)
    sp = cfg.weight_spec()
    assert sp.bits == 2 and grid(sp) == (-1, 1, 0.0)  # ignores w_bits
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    s = init_scale(x, sp)
    torch.testing.assert_close(s, x.unflatten(-1, (4, 16)).abs().amax(-1, keepdim=True) * 2 / 3)
    y = lsq_fake_quantize(x, s, sp).unflatten(-1, (4, 16))
    s = s.half().float()  # fp16 in the forward: the precision TQ1_0 / TQ2_0 store
    ok = (y == 0) | (y == s) | (y == -s)
    assert ok.all()
    u, channel = torch.linspace(-1, 1, 3001).unsqueeze(0), QuantConfig(w_bits=4, w_quantizer="ternary").weight_spec()
    _, counts = lsq_fake_quantize(u, init_scale(u, channel), channel).unique(return_counts=True)
    assert counts.max() - counts.min() <= 2  # three equal bins over [-max, max]


@pytest.mark.parametrize("kw", [dict(w_bits=4), dict(w_bits=3, w_granularity="per_group", w_group_size=16),
                                dict(w_bits=2), dict(w_quantizer="ternary"), dict(w_quantizer="minmax")])
def test_mse_init_never_has_more_error_than_minmax(kw):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) ** 3  # heavy tails: clipping pays
    minmax, mse = spec(**kw), spec(**kw, w_init="mse")
    err = {name: (lsq_fake_quantize(x, init_scale(x, sp), sp) - x).square().sum(-1)
           for name, sp in (("minmax", minmax), ("mse", mse))}
    assert (err["mse"] <= err["minmax"] + 1e-6).all() and err["mse"].sum() < err["minmax"].sum()


def test_quantizer_holds_a_parameter_initialised_at_wrap_time():
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    sp = spec(w_bits=4, w_granularity="per_group", w_group_size=32)
    a = QuantLinear.from_linear(linear, weight_spec=sp)
    b = QuantLinear.from_linear(linear, weight_spec=sp)
    assert isinstance(a.weight_quantizer.scale, nn.Parameter) and a.weight_quantizer.scale.shape == (8, 2, 1)
    assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale)  # deterministic
    a(torch.randn(3, 64)).sum().backward()
    assert a.weight_quantizer.scale.grad is not None and a.weight.grad is not None


def test_minmax_with_mse_init_holds_a_fixed_buffer():
    linear = nn.Linear(64, 8)
    q = QuantLinear.from_linear(linear, weight_spec=spec(w_quantizer="minmax", w_init="mse"))
    assert "weight_quantizer.scale" in dict(q.named_buffers())
    assert "weight_quantizer.scale" not in dict(q.named_parameters())


def test_default_minmax_quantizer_holds_no_scale():
    q = QuantLinear.from_linear(nn.Linear(64, 8), weight_spec=QuantConfig(w_bits=4).weight_spec())
    assert list(q.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("kw, match", [
    (dict(w_quantizer="lsq", w_symmetric=False), "symmetric"),
    (dict(w_quantizer="adaround"), "unknown quantizer"),
    (dict(w_init="percentile"), "unknown init"),
    (dict(w_quantizer="ternary", w_bits=4, weight_format="gguf_q4_0"), "own grid"),
])
def test_bad_quantizer_settings_fail_at_config_time(kw, match):
    with pytest.raises(UserError, match=match):
        QuantConfig(**{"w_bits": 4, **kw})
