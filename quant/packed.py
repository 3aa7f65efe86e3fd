"""Packed safetensors: a fake-quant student stored as integers + scales, and its loader.

    save_packed(model, tokenizer, "out/w4-packed")     # model: a student from models.quantize_model
    model, tok = load_packed("out/w4-packed")          # same logits as the fake-quant student

Each quantized linear `<name>` is stored as
    <name>.qweight     uint8 [out, in / 2] (bits <= 4: two codes a byte, even column in the low
                       nibble) or [out, in] (5..8 bits), codes shifted to start at 0 (q - qmin);
    <name>.scale       [out, S] per slice / group / block: float64 for float32 MinMax students (the
                       fake-quant arithmetic dtype), float16 for the GGUF formats (their stored d);
    <name>.zero_point  int32 [out, S], asymmetric MinMax only.
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

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from quant.config import GGUF_FORMATS, QuantConfig, QuantSpec
from quant.fake_quant import code_range, dequantize, group_view, quantize_codes
from quant.gguf_formats import ZERO_POINTS
from quant.linear import QuantLinear

PACKED_FILE = "model.safetensors"
QUANT_METHOD = "llmqat_packed"
FORMAT_VERSION = 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., N] in 0..2^bits-1 -> [..., N/2] two per byte (bits <= 4) or unchanged."""
    if bits > 4:
        return codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        raise ValueError(f"packing two 4-bit codes per byte needs an even last dimension, got {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., N]."""
    if bits > 4:
        return packed
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def pack_weight(weight: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """{"qweight", "scale"[, "zero_point"]} of a weight [out, in] on `spec`'s grid."""
    q, scale, zero_point = quantize_codes(weight.detach(), spec)
    qmin, _ = code_range(spec)
    tensors = {"qweight": pack_codes((q - qmin).reshape(weight.shape), spec.bits)}
    tensors["scale"] = scale.squeeze(-1).to(torch.float16 if spec.format in GGUF_FORMATS else scale.dtype)
    if spec.format not in GGUF_FORMATS and not spec.symmetric:
        zp = zero_point.squeeze(-1).to(torch.int32)
        if not torch.equal(zp.to(zero_point.dtype), zero_point.squeeze(-1)):
            raise ValueError("a zero point does not fit int32")  # only for degenerate near-constant slices
        tensors["zero_point"] = zp
    return tensors


def unpack_weight(tensors: dict[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """Weight [out, in] in `dtype` from `pack_weight`'s tensors: the fake-quantized weight, exactly."""
    scale = tensors["scale"].unsqueeze(-1)
    if spec.format in GGUF_FORMATS:
        scale = scale.to(torch.float32)
        zero_point = torch.tensor(ZERO_POINTS[spec.format])
    elif "zero_point" in tensors:
        zero_point = tensors["zero_point"].unsqueeze(-1).to(scale.dtype)
    else:
        zero_point = torch.zeros((), dtype=scale.dtype)
    codes = unpack_codes(tensors["qweight"], spec.bits)
    q = codes.to(scale.dtype) + code_range(spec)[0]
    return dequantize(group_view(q, spec.granularity, spec.group_size), scale, zero_point).reshape(q.shape).to(dtype)


def _quantized_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantLinear) and m.weight_quantizer.spec.enabled}


def packed_state_dict(model: nn.Module, dense_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Packed tensors of every weight-quantized linear + the other tensors, dense (tied ones once)."""
    linears = _quantized_linears(model)
    if not linears:
        raise ValueError("the model has no weight-quantized linear (w_bits is 16/32?): nothing to pack")
    state, seen = {}, set()
    for name, module in linears.items():
        for key, tensor in pack_weight(module.weight, module.weight_quantizer.spec).items():
            state[f"{name}.{key}"] = tensor.contiguous()
        seen.add(module.weight.data_ptr())
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # a packed weight, or a tied copy of a tensor already written
        seen.add(tensor.data_ptr())
        state[key] = tensor.detach().to(dense_dtype or tensor.dtype).contiguous()
    return state


def quantization_config(qcfg: QuantConfig, spec: QuantSpec, dense_dtype: torch.dtype) -> dict:
    return {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "quant": qcfg.to_dict(),
            "weight_spec": asdict(spec), "dense_dtype": str(dense_dtype).removeprefix("torch.")}


def save_packed(model: nn.Module, tokenizer, out_dir: Union[str, Path],
                dense_dtype: Optional[torch.dtype] = None) -> Path:
    """Write config.json (+ quantization_config), model.safetensors and the tokenizer into `out_dir`.

    Raises:
        ValueError: the model is not a fake-quant student with quantized weights.
    """
    from safetensors.torch import save_file

    from models.patch import CONFIG_ATTR, get_quant_config

    qcfg = get_quant_config(model)
    if qcfg is None:
        raise ValueError("the model is not quantized (no QuantConfig): quantize it with models.quantize_model")
    dense_dtype = dense_dtype or next(model.parameters()).dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed_state_dict(model, dense_dtype), str(out / PACKED_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop(CONFIG_ATTR, None)
    config["dtype"] = str(dense_dtype).removeprefix("torch.")
    config["quantization_config"] = quantization_config(qcfg, qcfg.weight_spec(), dense_dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def read_packed_config(folder: Union[str, Path]) -> tuple[dict, dict]:
    """(HF config dict without quantization_config, quantization_config) of a packed folder.

    Raises:
        FileNotFoundError / ValueError: not a folder written by `save_packed`.
    """
    path = Path(folder) / "config.json"
    if not path.is_file() or not (Path(folder) / PACKED_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not a packed export (needs config.json and {PACKED_FILE})")
    config = json.loads(path.read_text())
    qc = config.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path} has no quantization_config with quant_method={QUANT_METHOD!r}")
    return config, qc


def _build_model(config_dict: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**config_dict)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_packed(folder: Union[str, Path], device=None):
    """(model, tokenizer) rebuilt from a `save_packed` folder, fake act / KV quantizers re-applied.

    Raises:
        FileNotFoundError / ValueError: not a packed export, or tensors missing.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from models.patch import quantize_model

    config_dict, qc = read_packed_config(folder)
    qcfg, dtype = QuantConfig.from_dict(qc["quant"]), getattr(torch, qc["dense_dtype"])
    model = quantize_model(_build_model(config_dict, dtype), qcfg)
    state = load_file(str(Path(folder) / PACKED_FILE))
    linears = _quantized_linears(model)
    with torch.no_grad():
        for name, module in linears.items():
            tensors = {key: state.pop(f"{name}.{key}") for key in ("qweight", "scale", "zero_point")
                       if f"{name}.{key}" in state}
            module.weight.copy_(unpack_weight(tensors, module.weight_quantizer.spec, module.weight.dtype))
            module.weight_quantizer.enabled = False  # the weight is on the grid already
    missing, unexpected = model.load_state_dict(state, strict=False)
    _check_missing(model, missing, unexpected, set(state) | {f"{n}.weight" for n in linears})
    tok = AutoTokenizer.from_pretrained(folder) if (Path(folder) / "tokenizer_config.json").is_file() else None
    return (model.to(device) if device is not None else model), tok


def _check_missing(model: nn.Module, missing, unexpected, loaded: set) -> None:
    """Missing keys are fine only when they are tied to a loaded tensor (lm_head = embeddings)."""
    params = model.state_dict()
    loaded_ptrs = {params[k].data_ptr() for k in loaded if k in params}
    really_missing = [k for k in missing if k not in loaded and params[k].data_ptr() not in loaded_ptrs]
    if really_missing or unexpected:
        raise ValueError(f"packed checkpoint does not match the model: missing {really_missing}, "
                         f"unexpected {list(unexpected)}")
