"""What happens to a fake-quant student after training: one verb, `convert(model, to, ...)`.

    convert(model, "folded")                          # evaluation: weights quantized once, in place
    convert(model, "packed", tokenizer, "out/w4")     # integer codes + scales (reload: load_packed)
    convert(model, "gguf_q4_0", tokenizer, "m.gguf")  # llama.cpp's Q4_0 / Q8_0 (quant/export_gguf.py)
    convert(model, "compressed_tensors", tokenizer, "out/ct")  # vLLM / transformers (quant/compressed_tensors.py)
    convert(model, "float")                           # unpatch: plain nn.Linear, original attention

"folded" stores each QuantLinear's fake-quantized weight once and switches its weight quantizer
off: the forward multiplies by exactly the tensor the quantizer would produce on every call
(bit-identical logits) without re-quantizing every weight per forward; for evaluation only (the
model must not be trained or saved afterwards). "packed" writes config.json (+ a
`quantization_config`, quant_method "llmqat_packed", that stock `from_pretrained` refuses instead of
loading garbage), model.safetensors (layout: quant/packed.py) and the tokenizer; `load_packed`
rebuilds the model with the activation / KV fake quantizers re-applied (weight quantizers off: the
weights are on the grid already), so its logits equal the fake-quant student's exactly. "float"
is `models.patch.dequantize_model` (same Parameters, no copy). "compressed_tensors" writes the
same three files with compressed-tensors' tensors and `quantization_config` (quant_method
"compressed-tensors"), into a temporary folder renamed at the end; stock `from_pretrained` loads it
(with the `compressed-tensors` package) and so does vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models.patch import CONFIG_ATTR, dequantize_model, get_quant_config, quantize_model
from quant import compressed_tensors as ct
from quant.config import GGUF_FORMATS, QuantConfig
from quant.errors import InputFileError, UserError
from quant.export_gguf import write_gguf
from quant.linear import QuantLinear
from quant.packed import (
    PACKED_FILE,
    QUANT_METHOD,
    packed_state_dict,
    quantization_config,
    quantized_linears,
    unpack_weight,
)

logger = logging.getLogger(__name__)

TARGETS = ("folded", "packed", *GGUF_FORMATS, "gguf_tq1_0", "gguf_tq2_0", "compressed_tensors", "float")


def convert(model: nn.Module, to: str, tokenizer=None, output: Union[str, Path, None] = None, **options):
    """Turn a fake-quant student into `to` (see the module docstring); returns the model or the path.

    Args:
        options: packed, compressed_tensors: `dense_dtype`; GGUF: `embed_type`, `tokenizer_from`, `name`
            (quant/export_gguf.py).

    Raises:
        UserError: unknown target, or an artifact target without `output`.
    """
    if to not in TARGETS:
        raise UserError(f"unknown conversion {to!r}; use one of {TARGETS}")
    if to == "folded":
        fold_weights(model)
        return model
    if to == "float":
        return dequantize_model(model)
    if output is None:
        raise UserError(f"convert(..., {to!r}) writes a file: give output=")
    if to == "packed":
        return save_packed(model, tokenizer, output, **options)
    if to == "compressed_tensors":
        return save_compressed_tensors(model, tokenizer, output, **options)
    write_gguf(model, tokenizer, output, to.removeprefix("gguf_"), **options)
    return Path(output)


@torch.no_grad()
def fold_weights(model: nn.Module) -> int:
    """Store each QuantLinear's fake-quantized weight once and switch its weight quantizer off."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer.enabled:
            module.weight.data = module.weight_quantizer(module.weight).detach()
            module.weight_quantizer.enabled = False
            count += 1
    return count


def save_packed(model: nn.Module, tokenizer, out_dir: Union[str, Path],
                dense_dtype: Optional[torch.dtype] = None) -> Path:
    """Write config.json (+ quantization_config), model.safetensors and the tokenizer into `out_dir`.

    Raises:
        ValueError: the model is not a fake-quant student with quantized weights.
    """
    qcfg = get_quant_config(model)
    if qcfg is None:
        raise UserError("the model is not quantized (no QuantConfig): quantize it with models.quantize_model")
    dense_dtype = dense_dtype or next(model.parameters()).dtype
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(packed_state_dict(model, dense_dtype), str(out / PACKED_FILE), metadata={"format": "pt"})
    config = _hf_config(model, dense_dtype, quantization_config(qcfg, qcfg.weight_spec(), dense_dtype))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _hf_config(model: nn.Module, dense_dtype: torch.dtype, quant_section: dict) -> dict:
    config = model.config.to_dict()
    config.pop(CONFIG_ATTR, None)
    config["dtype"] = str(dense_dtype).removeprefix("torch.")
    config["quantization_config"] = quant_section
    return config


def compressed_tensors_qcfg(model: nn.Module) -> QuantConfig:
    """The student's QuantConfig, after checking compressed-tensors can hold it (warns about KV).

    Raises:
        UserError: not a quantized student, or a scheme compressed-tensors cannot express.
    """
    qcfg = get_quant_config(model)
    if qcfg is None:
        raise UserError("the model is not quantized (no QuantConfig): quantize it with models.quantize_model")
    reason = ct.unsupported_reason(qcfg)
    if reason:
        raise UserError(f"cannot export {qcfg.tag()} as compressed-tensors: {reason}")
    if ct.kv_cache_note(qcfg):
        logger.warning(ct.kv_cache_note(qcfg))
    return qcfg


def save_compressed_tensors(model: nn.Module, tokenizer, out_dir: Union[str, Path],
                            dense_dtype: Optional[torch.dtype] = None) -> Path:
    """Write a compressed-tensors folder (config.json, model.safetensors, tokenizer) at `out_dir`.

    Written into a temporary sibling and renamed, so a failure leaves no partial folder; an existing
    `out_dir` is replaced only if it is an earlier compressed-tensors export (or empty).

    Raises:
        UserError: the scheme cannot be expressed (`compressed_tensors_qcfg`), or `out_dir` is
            something else.
    """
    qcfg, out = compressed_tensors_qcfg(model), Path(out_dir)
    check_replaceable(out, ct.QUANT_METHOD)
    dense_dtype = dense_dtype or next(model.parameters()).dtype
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(ct.compressed_state_dict(model, qcfg, dense_dtype), str(tmp / PACKED_FILE), metadata={"format": "pt"})
        config = _hf_config(model, dense_dtype, ct.quantization_config(qcfg, ct.ignored_linears(model)))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_replaceable(out: Path, quant_method: str) -> None:
    """Raise unless `out` is absent, an empty folder, or a folder whose config has `quant_method`."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if _quant_method(out) != quant_method:
        raise UserError(f"{out} exists and is not a {quant_method} export: not replacing it")


def _quant_method(folder: Path) -> Optional[str]:
    """`quantization_config.quant_method` of a model folder's config.json, None if unreadable."""
    try:
        return json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_packed_config(folder: Union[str, Path]) -> tuple[dict, dict]:
    """(HF config dict without quantization_config, quantization_config) of a packed folder.

    Raises:
        FileNotFoundError / ValueError: not a folder written by `save_packed`.
    """
    path = Path(folder) / "config.json"
    if not path.is_file() or not (Path(folder) / PACKED_FILE).is_file():
        raise InputFileError(f"{folder} is not a packed export (needs config.json and {PACKED_FILE})")
    config = json.loads(path.read_text())
    qc = config.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != QUANT_METHOD:
        raise UserError(f"{path} has no quantization_config with quant_method={QUANT_METHOD!r}")
    return config, qc


def _build_model(config_dict: dict, dtype: torch.dtype) -> nn.Module:
    config = AutoConfig.for_model(**config_dict)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def load_packed(folder: Union[str, Path], device=None):
    """(model, tokenizer) rebuilt from a `save_packed` folder, fake act / KV quantizers re-applied.

    Raises:
        FileNotFoundError / ValueError: not a packed export, or tensors missing.
    """
    config_dict, qc = read_packed_config(folder)
    qcfg, dtype = QuantConfig.from_dict(qc["quant"]), getattr(torch, qc["dense_dtype"])
    model = quantize_model(_build_model(config_dict, dtype), qcfg)
    state = load_file(str(Path(folder) / PACKED_FILE))
    linears = quantized_linears(model)
    with torch.no_grad():
        for name, module in linears.items():
            tensors = {key: state.pop(f"{name}.{key}") for key in ("qweight", "scale", "zero_point")
                       if f"{name}.{key}" in state}
            module.weight.copy_(unpack_weight(tensors, module.weight_quantizer.spec, module.weight.dtype))
            module.weight_quantizer.enabled = False  # the weight is on the grid already
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a stored weight scale lives in the packed `scale`; the quantizer holding it is off after loading
    loaded = set(state) | {f"{n}.{k}" for n in linears for k in ("weight", "weight_quantizer.scale")}
    _check_missing(model, missing, unexpected, loaded)
    tok = AutoTokenizer.from_pretrained(folder) if (Path(folder) / "tokenizer_config.json").is_file() else None
    return (model.to(device) if device is not None else model), tok


def _check_missing(model: nn.Module, missing, unexpected, loaded: set) -> None:
    """Missing keys are fine only when they are tied to a loaded tensor (lm_head = embeddings)."""
    params = model.state_dict()
    loaded_ptrs = {params[k].data_ptr() for k in loaded if k in params}
    really_missing = [k for k in missing if k not in loaded and params[k].data_ptr() not in loaded_ptrs]
    if really_missing or unexpected:
        raise UserError(f"packed checkpoint does not match the model: missing {really_missing}, "
                         f"unexpected {list(unexpected)}")
