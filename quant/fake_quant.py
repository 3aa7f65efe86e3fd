"""Fake quantization: small pure functions and the one straight-through estimator.

    scale, zero_point = compute_qparams(x, spec)        # one scale per slice / group / tensor
    q = quantize(x, scale, zero_point, qmin, qmax)      # integers stored in a float tensor
    y = dequantize(q, scale, zero_point)                # the same float grid export writes
    y = fake_quantize(x, 4, granularity="per_channel")  # all of the above, with STE gradients

Symmetric (the paper's MinMax): scale = max|slice| / (2^(b-1) - 1), q in [-(2^(b-1)-1), 2^(b-1)-1].
Asymmetric: scale = (max - min) / (2^b - 1), z = round(-min / scale), q in [0, 2^b - 1].
An all-zero slice gets scale 1, so it quantizes to zeros, never NaN.

Arithmetic dtype (`compute_dtype`): float64 for float32/float64 inputs, float32 for bfloat16 /
float16 inputs; the result is cast back to the input dtype. In float64 the product q * scale rounds
back to a float32 input's exact maximum, so the element of largest magnitude is reproduced exactly.
Half inputs: float32 arithmetic is far finer than their grid, so the maximum is reproduced too and
the result equals the float32 path's on the upcast input, cast down, except at rare .5 ties where
the code moves by one step (tests/quant/test_fake_quant.py).
`spec.fast_math` runs float32 inputs in float32 (GPUs whose float64 is slow): scale and products
then round in float32, so outputs differ from the float64 path by at most one float32 ulp
(two for asymmetric grids, whose zero point adds a rounding), except
where x / scale falls within rounding of a .5 tie and the code itself moves by one step (rare;
benchmarks/bench_quant.py reports the measured share). Either way export calls these same
functions with the same spec, so exported weights equal the fake-quant ones bit for bit.

Weight formats "gguf_q4_0" / "gguf_q8_0" (`spec.format`) swap the MinMax grid for llama.cpp's
(`quant/gguf_formats.py`, float32 arithmetic); `quantize_codes` dispatches, the STE is shared.

Gradient: identity straight-through, also at the slice maximum (no clamp gradient; the trap in
pytorch/ao #4806). `ste_clip=True` zeroes the gradient where |x| >= 2, as the original LLM-QAT code.
"""

from __future__ import annotations

from typing import Optional

import torch

from quant.config import GGUF_FORMATS, QuantSpec
from quant.gguf_formats import CODE_RANGES, gguf_quantize_codes

STE_CLIP_VAL = 2.0


def compute_dtype(dtype: torch.dtype, fast_math: bool = False) -> torch.dtype:
    """The dtype quantization arithmetic runs in for inputs of `dtype` (see the module docstring)."""
    if dtype == torch.float64 or (dtype == torch.float32 and not fast_math):
        return torch.float64
    return torch.float32


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: symmetric is the narrow range +-(2^(b-1) - 1)."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def group_view(x: torch.Tensor, granularity: str, group_size: Optional[int] = None) -> torch.Tensor:
    """View `x` [..., N] as [..., S, L] so that each slice along the last dim has one scale.

    per_channel / per_token: [..., 1, N]; per_group: [..., N // G, G]; per_tensor: [1, numel].
    """
    if granularity in ("per_channel", "per_token"):
        return x.unsqueeze(-2)
    if granularity == "per_group":
        return x.unflatten(-1, (x.shape[-1] // group_size, group_size))
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    raise ValueError(f"unknown granularity {granularity!r}")


def compute_qparams(xg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each slice of a grouped tensor.

    Args:
        xg: [..., S, L] from `group_view`, in the compute dtype.
    Returns:
        scale, zero_point: [..., S, 1]; zero_point is all zeros when symmetric.
    """
    qmin, qmax = int_range(bits, symmetric)
    if symmetric:
        scale = xg.abs().amax(dim=-1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale)
    lo, hi = xg.amin(dim=-1, keepdim=True), xg.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / (qmax - qmin)
    # A constant slice c: scale |c| / (2^b - 1) still reproduces c exactly; an all-zero one gets 1.
    scale = torch.where(scale == 0, hi.abs() / (qmax - qmin), scale)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-lo / scale)


def quantize(xg: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes q = clamp(round(x / scale) + z, qmin, qmax), as floats of `xg`'s dtype."""
    return torch.clamp(torch.round(xg / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """(q - z) * scale."""
    return (q - zero_point) * scale


def code_range(spec: QuantSpec) -> tuple[int, int]:
    """(qmin, qmax) of the codes `quantize_codes` returns for `spec`."""
    if spec.format in GGUF_FORMATS:
        return CODE_RANGES[spec.format]
    return int_range(spec.bits, spec.symmetric)


def quantize_codes(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes and qparams of `x` [..., N]: the one function fake-quant and export share.

    Returns:
        q: [..., S, L] codes (floats) of `group_view(x)`; scale, zero_point: [..., S, 1], in the
        compute dtype (float32 for the GGUF formats). `dequantize(q, scale, zero_point)` reshaped
        to x.shape and cast to x.dtype is the fake-quantized `x`.
    """
    if spec.format in GGUF_FORMATS:
        return gguf_quantize_codes(x, spec.format)
    xg = group_view(x.to(compute_dtype(x.dtype, spec.fast_math)), spec.granularity, spec.group_size)
    scale, zero_point = compute_qparams(xg, spec.bits, spec.symmetric)
    return quantize(xg, scale, zero_point, *int_range(spec.bits, spec.symmetric)), scale, zero_point


def _symmetric_minmax_qdq(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`quantize_dequantize` for the symmetric MinMax grid with one temporary instead of six.

    The same values as `quantize_codes` + `dequantize`, bit for bit: max|x| is taken as
    max(-min, max) on `x` itself (exact, and casting to the compute dtype is exact and monotone);
    then x / scale, round, clamp, q * scale (the zero point is 0) in place on one compute-dtype copy.
    This runs on every weight and activation of every training step: on CPU `amax` + `amin` are
    about 8x faster than `aminmax` or `abs().amax`, and the in-place chain saves the temporaries.
    """
    qmax = 2 ** (spec.bits - 1) - 1
    xg = group_view(x, spec.granularity, spec.group_size)
    max_abs = torch.maximum(xg.amin(dim=-1, keepdim=True).neg_(), xg.amax(dim=-1, keepdim=True))
    scale = max_abs.to(compute_dtype(x.dtype, spec.fast_math)).div_(qmax)
    scale.masked_fill_(scale == 0, 1.0)
    q = group_view(x.to(scale.dtype, copy=True), spec.granularity, spec.group_size)
    return q.div_(scale).round_().clamp_(-qmax, qmax).mul_(scale).reshape(x.shape).to(x.dtype)


def quantize_dequantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Forward value of fake quantization (no autograd): same shape and dtype as `x`."""
    if spec.symmetric and spec.format not in GGUF_FORMATS:
        return _symmetric_minmax_qdq(x, spec)
    q, scale, zero_point = quantize_codes(x, spec)
    return dequantize(q, scale, zero_point).reshape(x.shape).to(x.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize forward; straight-through (optionally |x| < 2 clipped) backward."""

    @staticmethod
    def forward(ctx, x, spec: QuantSpec):
        ctx.ste_clip = spec.ste_clip
        if spec.ste_clip:
            ctx.save_for_backward(x)
        return quantize_dequantize(x, spec)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.ste_clip:
            return grad_out, None
        (x,) = ctx.saved_tensors
        return grad_out * (x.abs() < STE_CLIP_VAL).to(grad_out.dtype), None


def apply_spec(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize `x` as `spec` says, with STE gradients; identity when the spec is off."""
    if not spec.enabled:
        return x
    spec.check_last_dim(x.shape[-1])
    return _FakeQuantSTE.apply(x, spec)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = True,
    granularity: str = "per_channel",
    group_size: Optional[int] = None,
    ste_clip: bool = False,
) -> torch.Tensor:
    """Fake-quantize `x` (any shape [..., N]) and return a tensor of the same shape and dtype.

    Args:
        bits: 2..8; 16 or 32 return `x` unchanged.
        symmetric: symmetric MinMax (default) or asymmetric min/max with a zero point.
        granularity: per_channel / per_token (one scale per slice along the last dim),
            per_group (groups of `group_size` along the last dim) or per_tensor.
        group_size: size of each group for per_group; must divide N.
        ste_clip: zero the gradient where |x| >= 2 (original LLM-QAT) instead of pure identity.
    Raises:
        ValueError: unsupported bits, unknown granularity, or a group size that does not divide N.
    """
    return apply_spec(x, QuantSpec(bits, symmetric, granularity, group_size, ste_clip))
