"""Packed weights: a fake-quant student's linears as integer codes + scales (the tensors and their layout).

Writing and reading a packed folder (config.json, safetensors, tokenizer) is models/convert.py:
    convert(model, "packed", tokenizer, "out/w4-packed")   # model: a student from models.quantize_model
    model, tok = load_packed("out/w4-packed")               # same logits as the fake-quant student

Each quantized linear `<name>` is stored as
    <name>.qweight     uint8 [out, in / 2] (bits <= 4: two codes a byte, even column in the low
                       nibble) or [out, in] (5..8 bits), codes shifted to start at 0 (q - qmin);
    <name>.scale       [out, S] per slice / group / block: float64 for float32 MinMax students (the
                       fake-quant arithmetic dtype), float16 for the GGUF formats (their stored d);
    <name>.zero_point  int32 [out, S], asymmetric MinMax only.
A stored-scale student (w_quantizer lsq / ternary, w_init mse; quant/lsq.py) writes its own scale
(float32; fp16 for the GGUF formats), codes from `quant.lsq.lsq_codes` on that scale; the grid's
fixed zero point (-0.5 for the 2-bit stretched grid) follows from the spec.
Codes and scales come from `quant.fake_quant.quantize_codes`, the function fake-quant runs, so the
loader's `dequantize(q, scale, zero_point)` rebuilds the fake-quantized weights bit for bit. Other
tensors (embeddings, norms, lm_head) stay dense, in `dense_dtype` (default: the student's dtype,
which keeps logits bit-exact; bfloat16 halves their size). config.json gets a `quantization_config`
(quant_method "llmqat_packed", the student's QuantConfig and weight spec), which stock
`from_pretrained` refuses instead of loading garbage. The loader re-applies the activation / KV
fake quantizers (weight quantizers off: the weights are already on the grid), so logits equal the
fake-quant student's exactly, activation quantization included (same functions, same inputs).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Optional

import torch
from torch import nn

from quant.config import GGUF_FORMATS, QuantConfig, QuantSpec
from quant.errors import UserError
from quant.fake_quant import code_range, dequantize, group_view
from quant.gguf_formats import ZERO_POINTS
from quant.linear import QuantLinear
from quant.lsq import grid, weight_codes

PACKED_FILE = "model.safetensors"
QUANT_METHOD = "llmqat_packed"
FORMAT_VERSION = 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., N] in 0..2^bits-1 -> [..., N/2] two per byte (bits <= 4) or unchanged."""
    if bits > 4:
        return codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        raise UserError(f"packing two 4-bit codes per byte needs an even last dimension, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., N]."""
    if bits > 4:
        return packed
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def _code_min(spec: QuantSpec) -> int:
    return grid(spec)[0] if spec.stored_scale else code_range(spec)[0]


def pack_weight(weight: torch.Tensor, spec: QuantSpec, scale: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """{"qweight", "scale"[, "zero_point"]} of a weight [out, in] on `spec`'s grid (`scale`: the
    quantizer's stored scale, for specs that hold one)."""
    q, scale, zero_point = weight_codes(weight.detach(), spec, scale)
    qmin = _code_min(spec)
    tensors = {"qweight": pack_codes((q - qmin).reshape(weight.shape), spec.bits)}
    tensors["scale"] = scale.squeeze(-1).to(torch.float16 if spec.format in GGUF_FORMATS else scale.dtype)
    if spec.format not in GGUF_FORMATS and not spec.symmetric:
        zp = zero_point.squeeze(-1).to(torch.int32)
        if not torch.equal(zp.to(zero_point.dtype), zero_point.squeeze(-1)):
            raise UserError("a zero point does not fit int32")  # only for degenerate near-constant slices
        tensors["zero_point"] = zp
    return tensors


def unpack_weight(tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Weight [out, in] in `dtype` from `pack_weight`'s tensors: the fake-quantized weight, exactly."""
    scale = tensors["scale"].unsqueeze(-1)
    if spec.format in GGUF_FORMATS:
        scale = scale.to(torch.float32)
        zero_point = torch.tensor(ZERO_POINTS[spec.format])
    elif spec.stored_scale:
        zero_point = torch.tensor(grid(spec)[2], dtype=scale.dtype)
    elif "zero_point" in tensors:
        zero_point = tensors["zero_point"].unsqueeze(-1).to(scale.dtype)
    else:
        zero_point = torch.zeros((), dtype=scale.dtype)
    codes = unpack_codes(tensors["qweight"], spec.bits)
    q = codes.to(scale.dtype) + _code_min(spec)
    return dequantize(group_view(q, spec.granularity, spec.group_size), scale, zero_point).reshape(q.shape).to(dtype)


def quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.weight_quantizer.spec.enabled}


def encoded_state_dict(model: nn.Module, encode: Callable[..., dict],
                       dense_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """`encode(weight, spec, scale)`'s tensors of every weight-quantized linear (as `<name>.<key>`;
    `scale` the quantizer's stored one or None) + the other tensors, dense in `dense_dtype` (tied
    ones once; stored scales are inside the encoding). Shared by packed and compressed-tensors."""
    linears = quantized_linears(model)
    if not linears:
        raise UserError("the model has no weight-quantized linear (w_bits is 16/32?): nothing to pack")
    state, seen = {}, set()
    for name, module in linears.items():
        quantizer = module.weight_quantizer
        for key, tensor in encode(module.weight, quantizer.spec, quantizer.learned_scale()).items():
            state[f"{name}.{key}"] = tensor.contiguous()
        seen.add(module.weight.data_ptr())
        if quantizer.learned_scale() is not None:
            seen.add(quantizer.scale.data_ptr())
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # an encoded weight, or a tied copy of a tensor already written
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().to(dense_dtype or tensor.dtype).contiguous()
    return state


def packed_state_dict(model: nn.Module, dense_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Packed tensors of every weight-quantized linear + the other tensors, dense (tied ones once)."""
    return encoded_state_dict(model, pack_weight, dense_dtype)


def quantization_config(qcfg: QuantConfig, spec: QuantSpec, dense_dtype: torch.dtype) -> dict:
    return {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "quant": qcfg.to_dict(),
            "weight_spec": asdict(spec), "dense_dtype": str(dense_dtype).removeprefix("torch.")}
