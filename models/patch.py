"""Turn a stock Hugging Face causal LM into a fake-quantized student, without forking its code.

`quantize_model(model, QuantConfig)` swaps each decoder projection (q, k, v, o, gate, up, down) for
a `QuantLinear` sharing the same Parameters: weights fake-quantized per output channel (or group),
input activations per token. K and V are fake-quantized per token over all KV heads together:
  * pre_rope (default, the original LLM-QAT code): on the k_proj / v_proj outputs, so the values
    rotated by RoPE and stored in the KV cache are already on the grid;
  * post_rope (what a serving KV cache stores): inside a registered attention function that wraps
    the model's own one (sdpa / eager / ...), on the rotated keys and the values.
Embeddings, norms and lm_head stay in full precision (only names in `QuantConfig.targets` match).
Works for Llama and any model with the same projection names (Mistral, Qwen2), GQA included.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from quant.config import QuantConfig
from quant.errors import UserError
from quant.linear import QuantLinear
from quant.quantizer import FakeQuantizer

logger = logging.getLogger(__name__)

CONFIG_ATTR = "llmqat_quant"  # key under which the QuantConfig is kept in the HF config.json
_ATTN_PREFIX = "llmqat_kv_"


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _is_target(name: str, module: nn.Module, targets) -> bool:
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets


def patch_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module],
                  filter_fn: Callable[[str, nn.Module], bool]) -> int:
    """Replace every submodule for which `filter_fn(name, module)` holds by `make(name, module)`."""
    todo = [(name, mod) for name, mod in model.named_modules() if filter_fn(name, mod)]
    for name, mod in todo:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(name, mod))
    return len(todo)


def _attention_modules(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj")]


def _kv_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H * D], so one scale covers a token over all KV heads."""
    return x.transpose(1, 2).flatten(-2)


def _quantize_kv(quantizer: FakeQuantizer, x: torch.Tensor) -> torch.Tensor:
    heads = x.shape[1]
    return quantizer(_kv_to_tokens(x)).unflatten(-1, (heads, -1)).transpose(1, 2)


def _base_attention(module: nn.Module, name: str) -> Callable:
    if name in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[name]
    # "eager" lives in each modeling file, not in the registry.
    return sys.modules[type(module).__module__].eager_attention_forward


def _register_post_rope_attention(base: str) -> str:
    """Register (once) an attention function that quantizes K, V after RoPE, then calls `base`."""
    name = _ATTN_PREFIX + base

    def attention(module, query, key, value, attention_mask, **kwargs):
        key = _quantize_kv(module.k_quantizer, key)  # [B, H_kv, T, D]
        value = _quantize_kv(module.v_quantizer, value)
        return _base_attention(module, base)(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
    if mask_fn is not None:
        AttentionMaskInterface.register(name, mask_fn)
    return name


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def quantize_model(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Fake-quantize a stock HF causal LM in place (see module docstring) and return it.

    Calling it again replaces the previous quantization. With all bits at 16 the logits equal the
    stock model's exactly.

    Raises:
        ValueError: no target linear found, or a group size that does not divide in_features.
    """
    if not isinstance(qcfg, QuantConfig):
        raise TypeError(f"quantize_model expects a QuantConfig, got {type(qcfg).__name__}")
    dequantize_model(model)
    config = model.config
    kv_spec = qcfg.kv_spec(head_dim_of(config))
    kv_on_outputs = qcfg.kv_position == "pre_rope"

    def make(name: str, linear: nn.Linear) -> QuantLinear:
        leaf = name.rsplit(".", 1)[-1]
        out_spec = kv_spec if kv_on_outputs and leaf in ("k_proj", "v_proj") else None
        return QuantLinear.from_linear(linear, weight_spec=qcfg.weight_spec(), act_spec=qcfg.act_spec(),
                                       output_spec=out_spec)

    count = patch_linears(model, make, lambda n, m: _is_target(n, m, qcfg.targets))
    if count == 0:
        raise UserError(f"no linear named one of {qcfg.targets} in {type(model).__name__}")
    if qcfg.kv_position == "post_rope" and kv_spec.enabled:
        for attn in _attention_modules(model):
            attn.k_quantizer = FakeQuantizer(kv_spec)
            attn.v_quantizer = FakeQuantizer(kv_spec)
        base = config._attn_implementation or "eager"
        _set_attn_implementation(model, _register_post_rope_attention(base))
    setattr(config, CONFIG_ATTR, qcfg.to_dict())
    model.llmqat_quant_config = qcfg
    logger.info("quantized %d linears of %s at %s (kv %s)", count, type(model).__name__, qcfg.tag(),
                qcfg.kv_position)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo `quantize_model`: plain nn.Linear back (same Parameters), original attention."""
    patch_linears(model, lambda n, m: m.to_linear(), lambda n, m: isinstance(m, QuantLinear))
    for attn in _attention_modules(model):
        for attr in ("k_quantizer", "v_quantizer"):
            if hasattr(attn, attr):
                delattr(attn, attr)
    impl = getattr(model.config, "_attn_implementation", None) or ""
    if impl.startswith(_ATTN_PREFIX):
        _set_attn_implementation(model, impl[len(_ATTN_PREFIX):])
    if hasattr(model.config, CONFIG_ATTR):
        delattr(model.config, CONFIG_ATTR)
    model.__dict__.pop("llmqat_quant_config", None)
    return model


def get_quant_config(model: nn.Module) -> Optional[QuantConfig]:
    """The QuantConfig a model was quantized with, or None."""
    return model.__dict__.get("llmqat_quant_config")


def set_quantizers_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every fake quantizer of `model` on or off (e.g. to run it as the FP teacher)."""
    for module in model.modules():
        if isinstance(module, FakeQuantizer):
            module.enabled = enabled and module.spec.enabled
