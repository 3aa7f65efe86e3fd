"""Fake quantizer values, grid, zero slices, gradients and dtypes against a float64 reference."""

import itertools

import pytest
import torch

import quant
from quant.fake_quant import quantize_dequantize

SHAPES = [(8, 32), (3, 5, 64), (2, 2, 4, 16)]
GRANULARITIES = ["per_channel", "per_token", "per_group", "per_tensor"]


def reference(x: torch.Tensor, bits: int, symmetric: bool, granularity: str, group_size=None) -> torch.Tensor:
    """Independent float64 reference: loop over slices, formulas straight from the spec."""
    x64 = x.double()
    if granularity == "per_tensor":
        slices = x64.reshape(1, -1)
    elif granularity == "per_group":
        slices = x64.reshape(-1, group_size)
    else:
        slices = x64.reshape(-1, x.shape[-1])
    out = torch.empty_like(slices)
    for i, s in enumerate(slices):
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = s.abs().max() / qmax
            scale = scale if scale != 0 else torch.tensor(1.0, dtype=torch.float64)
            out[i] = torch.clamp(torch.round(s / scale), -qmax, qmax) * scale
        else:
            lo, hi = s.min(), s.max()
            scale = (hi - lo) / (2**bits - 1)
            if scale == 0:
                scale = hi.abs() / (2**bits - 1) if hi != 0 else torch.tensor(1.0, dtype=torch.float64)
            z = torch.round(-lo / scale)
            out[i] = (torch.clamp(torch.round(s / scale) + z, 0, 2**bits - 1) - z) * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("shape,bits,symmetric,granularity",
                         list(itertools.product(SHAPES, [2, 3, 4, 8], [True, False], GRANULARITIES)))
def test_matches_float64_reference(shape, bits, symmetric, granularity):
    torch.manual_seed(hash((shape, bits, symmetric, granularity)) % 2**31)
    x = torch.randn(shape, dtype=torch.float64) * 3
    y = quant.fake_quantize(x, bits, symmetric=symmetric, granularity=granularity, group_size=16)
    ref = reference(x, bits, symmetric, granularity, 16)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    # float32 input: computed in float64 and rounded once, so it equals the reference rounded to float32
    y32 = quant.fake_quantize(x.float(), bits, symmetric=symmetric, granularity=granularity, group_size=16)
    assert y32.dtype == torch.float32
    assert torch.equal(y32, reference(x.float(), bits, symmetric, granularity, 16).float())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_levels_and_max_reproduced(bits, symmetric):
    torch.manual_seed(bits)
    x = torch.randn(64, 256) * torch.rand(64, 1) * 10
    y = quant.fake_quantize(x, bits, symmetric=symmetric)
    for row in y:
        assert row.unique().numel() <= 2**bits
    if symmetric:
        assert all(row.unique().numel() <= 2**bits - 1 for row in y)
        # the element of largest magnitude is reproduced exactly
        idx = x.abs().argmax(dim=-1, keepdim=True)
        assert torch.equal(y.gather(-1, idx), x.gather(-1, idx))
    else:
        # the integer zero point shifts the grid by < 1/2 step; the ends may clamp by one more step
        step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
        assert ((y - x).abs() <= step * 1.0001).all()
        inner = (x - x.amin(-1, keepdim=True) > step) & (x.amax(-1, keepdim=True) - x > step)
        assert ((y - x).abs()[inner] <= (step / 2 * 1.0001).expand_as(x)[inner]).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_and_constant_slices(symmetric, granularity):
    x = torch.zeros(4, 32)
    y = quant.fake_quantize(x, 4, symmetric=symmetric, granularity=granularity, group_size=8)
    assert torch.equal(y, x) and not torch.isnan(y).any()
    c = torch.full((3, 32), -0.37)
    y = quant.fake_quantize(c, 4, symmetric=symmetric, granularity=granularity, group_size=8)
    assert torch.equal(y, c)


def test_mixed_zero_rows_no_nan():
    x = torch.randn(6, 16)
    x[2] = 0
    y = quant.fake_quantize(x, 3, granularity="per_token")
    assert torch.isfinite(y).all() and torch.equal(y[2], torch.zeros(16))


@pytest.mark.parametrize("bits", [16, 32])
def test_off_bits_return_input_unchanged(bits):
    x = torch.randn(4, 8, requires_grad=True)
    assert quant.fake_quantize(x, bits) is x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_identity_straight_through_gradient(symmetric, granularity):
    x = (torch.randn(8, 32) * 3).requires_grad_()
    g = torch.randn(8, 32)
    quant.fake_quantize(x, 4, symmetric=symmetric, granularity=granularity, group_size=8).backward(g)
    # identity everywhere, including at each slice's maximum (no clamp-gradient trap)
    assert torch.equal(x.grad, g)


def test_ste_clip_zeroes_gradient_outside_2():
    x = torch.tensor([[-3.0, -2.0, -1.999, 0.0, 1.5, 2.0, 5.0]], requires_grad=True)
    quant.fake_quantize(x, 4, ste_clip=True).sum().backward()
    assert x.grad.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_keeps_dtype_and_shape(dtype):
    x = torch.randn(5, 64).to(dtype)
    y = quant.fake_quantize(x, 4, granularity="per_group", group_size=32)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    ref = quantize_dequantize(x.float(), quant.QuantSpec(4, True, "per_group", 32)).to(dtype)
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=9), "bits=9"),
    (dict(bits=1), "bits=1"),
    (dict(bits=4, granularity="per_row"), "unknown granularity"),
    (dict(bits=4, granularity="per_group"), "group_size"),
    (dict(bits=4, granularity="per_group", group_size=24), "does not divide"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.fake_quantize(torch.randn(2, 64), **kwargs)


def test_pure_functions_compose_to_fake_quantize():
    x = torch.randn(4, 64, dtype=torch.float64)
    xg = quant.group_view(x, "per_group", 16)
    scale, zp = quant.compute_qparams(xg, 4, symmetric=False)
    q = quant.quantize(xg, scale, zp, *quant.int_range(4, False))
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 15
    y = quant.dequantize(q, scale, zp).reshape(x.shape)
    assert torch.equal(y, quant.fake_quantize(x, 4, symmetric=False, granularity="per_group", group_size=16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["per_channel", "per_group"])
def test_half_inputs_run_in_float32_reproduce_the_maximum_and_match_the_float32_path(dtype, granularity):
    """Half inputs: arithmetic in float32, cast back; each slice's largest-magnitude element comes back
    exactly, every output is on its slice's grid, and the values equal the float32 (float64
    arithmetic) path's on the upcast input, cast down, except at rare .5 ties where x / scale
    rounds the other way in float32 and the code moves by one step."""
    torch.manual_seed(0)
    x = (torch.randn(16, 64) * 3).to(dtype)
    spec = quant.QuantSpec(4, True, granularity, 16 if granularity == "per_group" else None)
    y = quantize_dequantize(x, spec)
    xg, yg = quant.group_view(x.float(), granularity, 16), quant.group_view(y.float(), granularity, 16)
    at_max = xg.abs() == xg.abs().amax(-1, keepdim=True)
    assert torch.equal(yg[at_max], xg[at_max])
    scale = xg.abs().amax(-1, keepdim=True) / 7
    codes = yg / scale
    assert (codes - codes.round()).abs().max() < 0.02 and codes.abs().max() <= 7 + 0.02
    ref = quant.group_view(quantize_dequantize(x.float(), spec).to(dtype).float(), granularity, 16)
    moved = yg != ref
    assert moved.float().mean() < 0.01
    assert torch.allclose(((yg - ref).abs() / scale)[moved], torch.ones(int(moved.sum())), atol=0.02)


def test_fast_math_is_float32_arithmetic_within_one_ulp_of_float64_except_rare_ties():
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    exact = quantize_dequantize(x, quant.QuantSpec(4))
    fast = quantize_dequantize(x, quant.QuantSpec(4, fast_math=True))
    assert quant.fake_quant.compute_dtype(torch.float32, fast_math=True) == torch.float32
    assert quant.fake_quant.compute_dtype(torch.float32) == torch.float64
    diff = (fast - exact).abs()
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30)
    step = x.abs().amax(-1, keepdim=True) / 7
    off_by_ulp, off_by_step = diff > ulp, diff > step / 2
    assert off_by_step.float().mean() < 1e-3  # a code moved by one step: only at .5 ties
    assert (off_by_ulp & ~off_by_step).sum() == 0  # everything else within one float32 ulp


def test_fast_math_export_matches_its_fake_quant_bit_for_bit():
    from quant.packed import pack_weight, unpack_weight

    torch.manual_seed(1)
    w = torch.randn(32, 64)
    for spec in (quant.QuantSpec(4, fast_math=True), quant.QuantSpec(8, True, "per_group", 32, fast_math=True)):
        assert torch.equal(unpack_weight(pack_weight(w, spec), spec, w.dtype), quantize_dequantize(w, spec))
