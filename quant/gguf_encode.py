"""GGUF tensor data of a student's decoder linears: block bytes, RoPE row order, and which weight to write.

    data = encode_tensor(weight, "q4_0")                # uint8 block bytes (or floats for f16 / f32)
    codes = linear_codes_for_export(module, "q4_0")     # a stored-scale gguf_q4_0 student's own codes

Used by quant/export_gguf.py, which names the tensors and writes the file. Q4_0 / Q8_0 blocks come
from `quant.gguf_formats` (the functions the GGUF-faithful fake quantizer runs) or, for a student
with stored (learned / searched) block scales, from its own codes and fp16 scales. TQ1_0 / TQ2_0
(llama.cpp's ternary types: blocks of 256 along the row, one fp16 d each, codes -1 / 0 / 1) are
written by the `gguf` package's reference quantizer from the fake-quant weights: for a ternary
student whose scale slices hold whole 256-blocks, each block's max is its fp16 scale s, so that
quantizer finds d = s and codes w / s exactly, and the file dequantizes to the trained weights.
"""

from __future__ import annotations

from typing import Optional

import gguf
import numpy as np
import torch
from torch import nn

from quant.gguf_formats import gguf_quantize_codes
from quant.linear import QuantLinear

TERNARY_TYPES = ("tq1_0", "tq2_0")  # llama.cpp's ternary: blocks of 256, one fp16 d, codes -1 / 0 / 1
TERNARY_BLOCK = 256


def ggml_type(kind: str):
    return {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "tq1_0": gguf.GGMLQuantizationType.TQ1_0, "tq2_0": gguf.GGMLQuantizationType.TQ2_0,
            "f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32}[kind]


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, kind: str) -> np.ndarray:
    """GGUF block bytes uint8 [rows, S * block_bytes] of codes [rows, S, 32] and scales [rows, S, 1].

    Q4_0 block: fp16 d, then 16 bytes; byte j holds code j (low nibble) and code j + 16 (high).
    Q8_0 block: fp16 d, then 32 int8 codes.
    """
    d = scale.to(torch.float16).view(torch.uint8)  # [rows, S, 2], little-endian fp16
    if kind == "q4_0":
        q = codes.to(torch.uint8)
        qs = q[..., :16] | (q[..., 16:] << 4)
    else:
        qs = codes.to(torch.int8).view(torch.uint8)
    return torch.cat((d, qs), dim=-1).flatten(1).numpy()


def permute_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of q_proj / k_proj [n_head * D, in] from HF's half-split RoPE order to GGUF's pairs."""
    pairs = weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def rope_heads(name: str, config) -> Optional[int]:
    leaf = name.rsplit(".", 2)[-2]
    if leaf == "q_proj":
        return config.num_attention_heads
    if leaf == "k_proj":
        return config.num_key_value_heads
    return None


def linear_codes_for_export(module: nn.Module, kind: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(codes [out, S, 32], fp16-exact scale [out, S, 1]) of a stored-scale student trained in
    gguf_`kind` (learned or searched block scales: its own codes, exactly the forward's); else None."""
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is None or quantizer.learned_scale() is None or quantizer.spec.format != f"gguf_{kind}":
        return None
    codes, scale, _ = quantizer.codes(module.weight)
    return codes, scale


def linear_weight_for_export(module: nn.Module, kind: str) -> tuple[torch.Tensor, bool]:
    """(weight to write [out, in], lossless?) of a decoder linear for GGUF type `kind`.

    The latent weight when the student's own grid is `kind` (its codes are the fake-quant codes),
    else the weight the student computes with: fake-quantized if it has a weight quantizer.
    """
    if not isinstance(module, QuantLinear) or not module.weight_quantizer.spec.enabled:
        return module.weight.detach(), kind in ("f16", "f32")
    spec = module.weight_quantizer.spec
    if spec.format == f"gguf_{kind}" and not spec.stored_scale:
        return module.weight.detach(), True
    with torch.no_grad():
        return module.weight_quantizer(module.weight), kind == "f32" or _ternary_exact(spec, kind)


def _ternary_exact(spec, kind: str) -> bool:
    """A ternary student's weights are TQ1_0 / TQ2_0 values when each 256-block lies in one scale slice:
    its block max is then s (fp16 in the forward), so llama.cpp's own quantizer finds d = s, codes -1/0/1."""
    per_block = spec.granularity != "per_group" or spec.group_size % TERNARY_BLOCK == 0
    return kind in TERNARY_TYPES and spec.quantizer == "ternary" and per_block


def encode_tensor(weight: torch.Tensor, kind: str) -> np.ndarray:
    """numpy data for GGUFWriter.add_tensor: block bytes for q4_0 / q8_0, floats for f16 / f32."""
    if kind in ("f16", "f32"):
        return weight.detach().to(torch.float16 if kind == "f16" else torch.float32).numpy()
    if kind in TERNARY_TYPES:
        return gguf.quants.quantize(weight.detach().to(torch.float32).numpy(), ggml_type(kind))
    codes, scale, _ = gguf_quantize_codes(weight.detach(), f"gguf_{kind}")
    return encode_blocks(codes, scale, kind)


def encode_codes(codes: torch.Tensor, scale: torch.Tensor, key: str, config, kind: str) -> np.ndarray:
    """Block bytes of a stored-scale linear's own codes, rows permuted for RoPE like the weights."""
    heads = rope_heads(key, config)
    if heads is not None:  # rows are whole blocks: permute codes and scales alike
        codes, scale = permute_rope(codes, heads), permute_rope(scale, heads)
    return encode_blocks(codes, scale, kind)
