"""compressed-tensors layout of a fake-quant student: the checkpoint format vLLM serves.

Writing the folder (config.json, model.safetensors, tokenizer) is models/convert.py:
    convert(model, "compressed_tensors", tokenizer, "out/w4a16-ct")
    AutoModelForCausalLM.from_pretrained("out/w4a16-ct")   # needs the `compressed-tensors` package

Schemes (one config group, targets ["Linear"], every other linear, lm_head included, in `ignore`):
    W4A16 / W8A16  format "pack-quantized": <name>.weight_packed int32 [out, in * bits / 32] (codes
                   + 2^(bits-1), element i of each 32 at bit i * bits), <name>.weight_shape int64
                   [2], <name>.weight_scale float32 [out, 1] (per_channel) or [out, in / G] (per_group);
    W8A8           format "int-quantized": <name>.weight int8 [out, in], <name>.weight_scale float32
                   [out, 1], input activations int8 per token, dynamic (computed at run time).
Weights are symmetric, so there is no zero point: dequantized = code * scale. Codes and scales come
from `quant.fake_quant.quantize_codes`, the function fake-quant runs, so the stored codes are the
student's; only the scale is rounded, from the fake-quant compute dtype (float64 for float32
students) to float32, the dtype vLLM's int8 kernels take (its W4A16 kernels cast it to the model
dtype). Our symmetric grid is the narrow one (+-(2^(b-1) - 1)), a subset of compressed-tensors'
full signed range, so every code fits.

What the format cannot hold, `unsupported_reason` names: asymmetric weights (our zero point is an
unbounded integer, the range need not contain 0; compressed-tensors packs zero points in `bits`
bits), the GGUF grids, per_tensor weights, bits other than 4 / 8, activations other than 8-bit
symmetric per token with 8-bit per-channel weights. KV-cache quantization is not written
(`kv_cache_note`): compressed-tensors' KV scheme is static scales and vLLM's KV cache is fp8, not
our dynamic int grid; the export serves the KV cache unquantized and says so.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quant.config import GGUF_FORMATS, QuantConfig, QuantSpec, is_off
from quant.lsq import weight_codes
from quant.packed import encoded_state_dict, quantized_linears

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED, INT_QUANTIZED = "pack-quantized", "int-quantized"
LAYOUT_VERSION = "0.20.1"  # the compressed-tensors release this layout was checked against
WEIGHT_BITS = (4, 8)
_STRATEGIES = {"per_channel": "channel", "per_group": "group"}


def unsupported_reason(qcfg: QuantConfig) -> Optional[str]:
    """Why `qcfg`'s student cannot be written as compressed-tensors, or None if it can."""
    if is_off(qcfg.w_bits):
        return f"the weights are not quantized (w_bits={qcfg.w_bits})"
    if qcfg.w_quantizer == "ternary":
        return "ternary weights: compressed-tensors int weights here are 4 or 8 bits"
    if qcfg.weight_format in GGUF_FORMATS:
        return (f"weight_format={qcfg.weight_format} is llama.cpp's grid (offset codes, fp16 block scales), "
                f"which this export does not map: use format={qcfg.weight_format}")
    if not qcfg.w_symmetric:
        return ("asymmetric weights (w_symmetric=False): our zero point is an unbounded integer, "
                "compressed-tensors packs zero points in w_bits bits")
    if qcfg.w_bits not in WEIGHT_BITS:
        return f"w_bits={qcfg.w_bits}: compressed-tensors int weights here are 4 or 8 bits"
    if qcfg.w_granularity not in _STRATEGIES:
        return f"w_granularity={qcfg.w_granularity}: only per_channel or per_group weights are exported"
    if is_off(qcfg.a_bits):
        return None
    if (qcfg.a_bits, qcfg.a_symmetric, qcfg.a_granularity) != (8, True, "per_token"):
        return (f"activations a_bits={qcfg.a_bits} a_symmetric={qcfg.a_symmetric} {qcfg.a_granularity}: "
                f"only 8-bit symmetric per_token (vLLM's dynamic int8) are exported")
    if (qcfg.w_bits, qcfg.w_granularity) != (8, "per_channel"):
        return (f"W{qcfg.w_bits}A8 {qcfg.w_granularity}: 8-bit activations need 8-bit per_channel weights "
                f"(vLLM's int8 W8A8)")
    return None


def kv_cache_note(qcfg: QuantConfig) -> Optional[str]:
    """A warning when the student quantizes its KV cache, which the export leaves unquantized."""
    if is_off(qcfg.kv_bits):
        return None
    return (f"kv_bits={qcfg.kv_bits} is not exported: compressed-tensors' KV-cache scheme is static scales "
            f"(fp8 in vLLM), not the student's dynamic int grid; the KV cache runs unquantized")


def compression_format(qcfg: QuantConfig) -> str:
    return PACK_QUANTIZED if is_off(qcfg.a_bits) else INT_QUANTIZED


def _args(bits: int, strategy: str, group_size: Optional[int] = None, dynamic: bool = False) -> dict:
    """A compressed-tensors `QuantizationArgs` as a dict (symmetric int, min-max observer)."""
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy,
            "group_size": group_size, "dynamic": dynamic, "block_structure": None, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def quantization_config(qcfg: QuantConfig, ignore: list[str]) -> dict:
    """config.json's `quantization_config` (what transformers and vLLM read) for `qcfg`'s student."""
    spec, fmt = qcfg.weight_spec(), compression_format(qcfg)
    group = {"targets": ["Linear"], "format": fmt, "output_activations": None,
             "weights": _args(spec.bits, _STRATEGIES[spec.granularity], spec.group_size),
             "input_activations": None if is_off(qcfg.a_bits) else _args(8, "token", dynamic=True)}
    return {"quant_method": QUANT_METHOD, "version": LAYOUT_VERSION, "format": fmt,
            "quantization_status": "compressed", "config_groups": {"group_0": group},
            "kv_cache_scheme": None, "ignore": sorted(ignore), "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}}


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [out, in] of `bits` (4 or 8) -> int32 [out, ceil(in * bits / 32)].

    compressed-tensors' `pack_to_int32` for bits dividing 32: each code + 2^(bits-1) is stored
    unsigned, element i of a row at bit i * bits (little end first).
    """
    per_word = 32 // bits
    u = codes.to(torch.int64) + (1 << (bits - 1))
    u = nn.functional.pad(u, (0, -u.shape[-1] % per_word)).unflatten(-1, (-1, per_word))
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    words = (u << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int8 codes [out, in_features]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64, device=packed.device) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.flatten(-2)[..., :in_features] - (1 << (bits - 1))).to(torch.int8)


def compress_weight(weight: torch.Tensor, spec: QuantSpec, fmt: str, scale=None) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors (without the module prefix) of a weight [out, in] on `spec`'s
    grid (`scale`: the quantizer's stored scale, lsq / mse students)."""
    q, scale, _ = weight_codes(weight.detach(), spec, scale)  # symmetric: the zero point is 0
    codes = q.reshape(weight.shape).to(torch.int8)
    tensors = {"weight_scale": scale.squeeze(-1).to(torch.float32)}
    if fmt == INT_QUANTIZED:
        tensors["weight"] = codes
    else:
        tensors["weight_packed"] = pack_int32(codes, spec.bits)
        tensors["weight_shape"] = torch.tensor(weight.shape, dtype=torch.int64)
    return tensors


def ignored_linears(model: nn.Module) -> list[str]:
    """Names of the linears left dense (lm_head, non-target projections): the config's `ignore`."""
    quantized = quantized_linears(model)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]


def compressed_state_dict(model: nn.Module, qcfg: QuantConfig,
                          dense_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Compressed tensors of every weight-quantized linear + the other tensors, dense (tied ones once)."""
    fmt = compression_format(qcfg)
    return encoded_state_dict(model, lambda weight, spec, scale: compress_weight(weight, spec, fmt, scale), dense_dtype)
