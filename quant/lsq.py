"""Stored-scale weight grids: LSQ, ParetoQ's stretched 2-bit grid, ternary, and the MSE clip search.

    qmin, qmax, zp = grid(spec)                      # codes q in [qmin, qmax], value (q - zp) * s
    s = init_scale(w, spec)                          # [..., S, 1] from MinMax or an MSE search
    q, s_eff, zp = lsq_codes(w, s, spec)             # the codes export writes
    w_hat = lsq_fake_quantize(w, s, spec)            # forward value, LSQ gradients for w and s

One scale per slice of `group_view(w)` (per output channel, per group, per GGUF block), held by the
quantizer (quant/quantizer.py): a Parameter for "lsq" / "ternary", a fixed buffer for minmax with
init "mse". Codes are q = clamp(round(w / s + zp), qmin, qmax), values (q - zp) * s:
  * lsq, 3..8 bits: the symmetric narrow range +-(2^(b-1) - 1), zp 0 (MinMax init starts on the
    MinMax grid, up to float32 rounding: LSQ arithmetic is float32, MinMax's float64);
  * lsq, 2 bits: ParetoQ's SEQ grid, q in -2..1 with zp -0.5: levels {-1.5, -0.5, 0.5, 1.5} * s;
  * ternary: q in -1..1, zp 0: levels {-s, 0, s}, s fp16 in the forward (llama.cpp's TQ1_0 / TQ2_0
    store one fp16 d per 256 weights: quant/export_gguf.py writes such a student exactly);
  * GGUF formats: the format's codes (Q4_0: 0..15 with zp 8; Q8_0: -128..127) and the scale
    rounded to fp16 in the forward pass (straight-through), so the file stores exactly what trained.
SEQ and ternary start at s = 2 max|w| / levels (ParetoQ): the levels then split [-max, max] into
equal bins, a balanced grid.

Gradients (LSQ, Esser et al. 2020): with v = w / s and u = v + zp, inside = qmin <= u <= qmax,
    dL/dw = dL/dy * inside                      (straight-through rounding, zero where clamped)
    dL/ds = sum_slice dL/dy * ((q - zp) - v * inside) * g,   g = 1 / sqrt(L * (qmax - zp)),
L the slice length, (qmax - zp) the largest positive level in steps.

Learned clipping of activations and K/V (`a_clip` / `kv_clip = learned`, `clipped_fake_quantize`):
the dynamic symmetric MinMax scale of each token (or slice) times one learned ratio c per quantizer,
s = c * max|x| / qmax (max|x| taken as a constant, as MinMax's straight-through estimator does);
values clamp(round(x / s), -qmax, qmax) * s. Gradients by autograd through a straight-through round:
x gets 1 inside the clip range and 0 where clamped; c gets sum dL/dy * (q - v * inside) * max|x| / qmax
(LSQ's step-size gradient, without its g: one ratio per quantizer, trained by Adam). With c = 1 the
values are MinMax's (float32 arithmetic: up to rounding of the float64 MinMax path).
"""

from __future__ import annotations

import math

import torch

from quant.config import GGUF_FORMATS, QuantSpec
from quant.fake_quant import group_view, int_range, quantize_codes
from quant.gguf_formats import CODE_RANGES, ZERO_POINTS

MSE_RATIOS = torch.linspace(1.0, 0.2, 81).tolist()  # clip ratios of the MinMax scale tried by the search


def grid(spec: QuantSpec) -> tuple[int, int, float]:
    """(qmin, qmax, zero point) of the stored-scale grid of `spec` (see the module docstring)."""
    if spec.quantizer == "ternary":
        return -1, 1, 0.0
    if spec.format in GGUF_FORMATS:
        return (*CODE_RANGES[spec.format], ZERO_POINTS[spec.format])
    if spec.quantizer == "lsq" and spec.bits == 2:
        return -2, 1, -0.5
    return (*int_range(spec.bits, True), 0.0)


def arith_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`x` [..., N] as [..., S, L] in the arithmetic dtype."""
    return group_view(x.to(arith_dtype(x.dtype)), spec.granularity, spec.group_size)


def effective_scale(scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """The scale the forward uses: fp16-rounded (straight-through) for GGUF formats and ternary, the
    precision of the files they export to (Q4_0 / Q8_0, TQ1_0 / TQ2_0)."""
    s = scale.to(dtype)
    if spec.format in GGUF_FORMATS or spec.quantizer == "ternary":
        s = s + (s.to(torch.float16).to(dtype) - s).detach()
    return s


def lsq_codes(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [..., S, L], effective scale [..., S, 1], zero point) of `x` [..., N] on the stored scale.

    `dequantize(q, s, zp)` reshaped to x.shape and cast to x.dtype is the fake-quantized `x`.
    """
    xg = grouped(x.detach(), spec)
    s = effective_scale(scale.detach(), spec, xg.dtype)
    qmin, qmax, zp = grid(spec)
    q = torch.clamp(torch.round(xg / s + zp), qmin, qmax)
    return q, s, torch.full_like(s, zp)


def lsq_grad_factor(slice_len: int, spec: QuantSpec) -> float:
    """LSQ's gradient scale g = 1 / sqrt(L * top level)."""
    _, qmax, zp = grid(spec)
    return 1.0 / math.sqrt(slice_len * (qmax - zp))


def _codes_minus_zp(v: torch.Tensor, qmin: int, qmax: int, zp: float, out=None) -> torch.Tensor:
    """clamp(round(v + zp), qmin, qmax) - zp in a fresh buffer (or `out`); with zp = 0 (every
    symmetric grid) the add and subtract, two weight-sized passes, are skipped."""
    if zp == 0:
        return torch.round(v, out=out).clamp_(qmin, qmax)
    return torch.add(v, zp, out=out).round_().clamp_(qmin, qmax).sub_(zp)


def _inside_mask(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Float 1.0 where lo <= v <= hi, else 0.0 (exact: |v| <= hi when the range is symmetric,
    else clamp(v) == v)."""
    if lo == -hi:
        return v.abs().le_(hi)
    return torch.clamp(v, lo, hi).sub_(v).eq_(0)


class _LSQ(torch.autograd.Function):
    """Forward: (q - zp) * s, the values of `lsq_codes` (same operations); backward: LSQ's gradients.

    Only v = w / s is saved (q is recomputed from it), and the arithmetic runs in place on as few
    fresh buffers as possible: this runs on every weight at every training step.
    """

    @staticmethod
    def forward(ctx, x, scale, spec: QuantSpec):
        qmin, qmax, zp = grid(spec)
        s = effective_scale(scale.detach(), spec, arith_dtype(x.dtype))
        v = grouped(x.detach(), spec) / s
        y = _codes_minus_zp(v, qmin, qmax, zp).mul_(s)
        ctx.spec, ctx.shape, ctx.dtypes = spec, x.shape, (x.dtype, scale.dtype)
        ctx.save_for_backward(v)
        return y.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (v,) = ctx.saved_tensors
        qmin, qmax, zp = grid(ctx.spec)
        g = grouped(grad_out, ctx.spec)
        # On CPU, fresh weight-sized buffers (page faults) and bool-mask kernels (torch.where,
        # logical_and: ~10x a float multiply) are most of the cost: the mask is built as float 0/1
        # in place, gx = g * mask, and the codes reuse the mask's buffer. Per element of grad_s,
        # (q - zp) - v * inside, summed against g: sum g (q - zp) - sum gx v.
        buf = _inside_mask(v, qmin - zp, qmax - zp)
        gx = g * buf
        grad_s = torch.mul(v, gx, out=buf).sum(-1, keepdim=True)
        buf = _codes_minus_zp(v, qmin, qmax, zp, out=buf).mul_(g)
        grad_s = buf.sum(-1, keepdim=True).sub_(grad_s).mul_(lsq_grad_factor(v.shape[-1], ctx.spec))
        return gx.reshape(ctx.shape).to(ctx.dtypes[0]), grad_s.to(ctx.dtypes[1]), None


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize `x` [..., N] with the stored `scale` [..., S, 1]; LSQ gradients (module docstring).

    A fixed (searched, not learned) scale gets no gradient; the weight's is the same masked
    straight-through one (zero where clamped: with a fixed clip, pushing a clipped weight changes nothing).
    """
    return _LSQ.apply(x, scale, spec)


def _minmax_scale(xg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    qmin, qmax, zp = grid(spec)
    max_abs = xg.abs().amax(dim=-1, keepdim=True)
    if spec.quantizer == "ternary" or zp == -0.5:  # ParetoQ: levels split [-max, max] into equal bins
        scale = 2 * max_abs / (qmax - qmin + 1)
    elif spec.format == "gguf_q4_0":
        idx = xg.abs().argmax(dim=-1, keepdim=True)  # ggml's signed d = m / -8: the max lands on code 0
        scale = torch.gather(xg, -1, idx) / -8.0
    else:
        scale = max_abs / (qmax - zp)
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _qdq_error(xg: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    qmin, qmax, zp = grid(spec)
    s = effective_scale(scale, spec, xg.dtype)
    q = torch.clamp(torch.round(xg / s + zp), qmin, qmax)
    return ((q - zp) * s - xg).square().sum(-1, keepdim=True)


@torch.no_grad()
def mse_scale(xg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-slice scale minimising the squared quantization error over clip ratios `MSE_RATIOS` of the
    MinMax scale (ties keep the larger ratio, so the search is deterministic)."""
    base = _minmax_scale(xg, spec)
    best, best_err = base, _qdq_error(xg, base, spec)
    for ratio in MSE_RATIOS[1:]:
        candidate = base * ratio
        err = _qdq_error(xg, candidate, spec)
        better = err < best_err
        best, best_err = torch.where(better, candidate, best), torch.where(better, err, best_err)
    return best


@torch.no_grad()
def init_scale(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Starting scale [..., S, 1] of `x` [..., N] (float32, or float64 for float64 inputs)."""
    xg = grouped(x, spec)
    return mse_scale(xg, spec) if spec.init == "mse" else _minmax_scale(xg, spec)


def weight_codes(x: torch.Tensor, spec: QuantSpec, scale=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes export writes for `x` on `spec`'s grid: with the stored `scale` when the spec holds
    one, else `quantize_codes` (the MinMax / GGUF functions the fake quantizer runs)."""
    if spec.stored_scale:
        if scale is None:
            raise ValueError(f"quantizer={spec.quantizer} init={spec.init} needs its stored scale")
        return lsq_codes(x, scale, spec)
    return quantize_codes(x, spec)


def clipped_fake_quantize(x: torch.Tensor, clip: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize activations / K, V `x` [..., N] on the dynamic symmetric grid scaled by the learned
    ratio `clip` (module docstring); same shape and dtype as `x`."""
    qmax = int_range(spec.bits, True)[1]
    xg = group_view(x.to(arith_dtype(x.dtype)), spec.granularity, spec.group_size)
    max_abs = xg.detach().abs().amax(dim=-1, keepdim=True)
    s = (clip.to(xg.dtype) * max_abs / qmax).clamp_min(torch.finfo(xg.dtype).tiny)
    u = (xg / s).clamp(-qmax, qmax)
    y = (u + (torch.round(u) - u).detach()) * s
    return y.reshape(x.shape).to(x.dtype)
