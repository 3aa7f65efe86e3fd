"""llama.cpp's Q4_0 and Q8_0 weight grids, in torch, bit for bit as its reference quantizer.

    q, scale, zero_point = gguf_quantize_codes(w, "gguf_q4_0")   # w [..., N], N % 32 == 0
    w_hat = (q - zero_point) * scale                              # what llama.cpp dequantizes

Both formats cut each row into blocks of 32 along the last dim (in_features) and store one fp16
scale `d` per block; all arithmetic is float32, as in ggml's `quantize_row_q4_0_ref` /
`quantize_row_q8_0_ref` (ggml-quants.c; the `gguf` package's quants.py mirrors them):

    Q4_0: m = the block's element of largest magnitude (the first one on ties), sign kept;
          d = m / -8; q = min(15, trunc(x * (1/d) + 8.5)) in 0..15; value = (q - 8) * fp16(d).
    Q8_0: d = max|x| / 127; q = roundf(x * (1/d)) (halves away from zero); value = q * fp16(d).

The codes use the float32 `d`, the value the fp16-rounded one: exactly what a llama.cpp file holds,
so fake-quant with these functions and GGUF export (which calls them) give the same weights. An
all-zero block has d = 0 and decodes to zeros. Both grids are idempotent: quantizing decoded weights
again gives the same codes, so a GGUF-faithful QAT model exports without loss.
"""

from __future__ import annotations

import torch

from quant.config import GGUF_BLOCK_SIZE, GGUF_FORMATS
from quant.errors import UserError

# format -> (qmin, qmax) of the stored codes and the fixed zero point
CODE_RANGES = {"gguf_q4_0": (0, 15), "gguf_q8_0": (-128, 127)}
ZERO_POINTS = {"gguf_q4_0": 8.0, "gguf_q8_0": 0.0}


def check_format(fmt: str) -> str:
    if fmt not in GGUF_FORMATS:
        raise UserError(f"unknown GGUF format {fmt!r}; use one of {tuple(GGUF_FORMATS)}")
    return fmt


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> float32 [..., N // 32, 32]."""
    if x.shape[-1] % GGUF_BLOCK_SIZE:
        raise UserError(f"GGUF blocks of {GGUF_BLOCK_SIZE} do not divide the last dimension {x.shape[-1]}")
    return x.to(torch.float32).unflatten(-1, (x.shape[-1] // GGUF_BLOCK_SIZE, GGUF_BLOCK_SIZE))


def _block_scale(xb: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 d [..., S, 1] of each block, before fp16 rounding."""
    if fmt == "gguf_q4_0":
        idx = xb.abs().argmax(dim=-1, keepdim=True)  # the first maximum, as ggml's strict `<` scan
        return torch.gather(xb, -1, idx) / -8.0
    return xb.abs().amax(dim=-1, keepdim=True) / 127.0


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero (torch.round goes to even). Exact for float32 inputs."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2.0 * (a - floored)))


def gguf_qparams(xb: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, inverse, zero_point) of each block of `xb` [..., S, 32] (float32).

    scale: fp16-rounded d as float32 [..., S, 1] (what the file stores and dequantization uses);
    inverse: float32 1/d [..., S, 1] with the unrounded d, 0 where d = 0 (what the codes use);
    zero_point: the format's fixed zero point, broadcastable.
    """
    d = _block_scale(xb, check_format(fmt))
    inverse = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    scale = d.to(torch.float16).to(torch.float32)
    return scale, inverse, torch.full_like(scale, ZERO_POINTS[fmt])


def gguf_quantize(xb: torch.Tensor, inverse: torch.Tensor, fmt: str) -> torch.Tensor:
    """Codes of `xb` [..., S, 32] as float32: 0..15 for Q4_0, -127..127 for Q8_0."""
    x = xb * inverse  # a separate product, rounded to float32 as in C (no fused multiply-add)
    if check_format(fmt) == "gguf_q4_0":
        return torch.clamp(torch.trunc(x + 8.5), 0.0, 15.0)
    return torch.clamp(_roundf(x), *CODE_RANGES[fmt])


def gguf_quantize_codes(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [..., S, 32], scale [..., S, 1], zero_point) of `x` [..., N] on `fmt`'s grid, float32."""
    xb = to_blocks(x)
    scale, inverse, zero_point = gguf_qparams(xb, fmt)
    return gguf_quantize(xb, inverse, fmt), scale, zero_point
