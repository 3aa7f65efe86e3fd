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

Strict coverage: before anything is swapped, every decoder layer must hold every target projection
and, when K/V are quantized, K and V of every layer must be reachable; otherwise a UserError names
the missing modules (a model with other names needs `targets=[...]`). Fused projections (Phi-3's
`qkv_proj`, `gate_up_proj`) are handled, not refused: the fused linear stands for all of its parts
when they are all targets, and pre-RoPE K/V are quantized on the K and V slices of its output, per
token, exactly as separate k_proj / v_proj outputs would be (per-row weight scales and per-token
input scales do not mix the parts, so this equals quantizing the parts one by one). A per_tensor
weight scale would mix them, so it is refused on fused projections. `quant_coverage(model)` counts
what is quantized: {"linears": [quantized, total], "kv_layers": [quantized, total]}.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Optional

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from quant.config import QuantConfig, is_off
from quant.errors import UserError
from quant.linear import QuantLinear
from quant.quantizer import FakeQuantizer

logger = logging.getLogger(__name__)

CONFIG_ATTR = "llmqat_quant"  # key under which the QuantConfig is kept in the HF config.json
_ATTN_PREFIX = "llmqat_kv_"
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # Phi-3


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def patch_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module],
                  filter_fn: Callable[[str, nn.Module], bool]) -> int:
    """Replace every submodule for which `filter_fn(name, module)` holds by `make(name, module)`."""
    todo = [(name, mod) for name, mod in model.named_modules() if filter_fn(name, mod)]
    for name, mod in todo:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, make(name, mod))
    return len(todo)


def _is_attention(module: nn.Module) -> bool:
    return (hasattr(module, "k_proj") and hasattr(module, "v_proj")) or hasattr(module, "qkv_proj")


def _attention_modules(model: nn.Module):
    return [m for m in model.modules() if _is_attention(m)]


def _layer_attention(layer: nn.Module) -> Optional[nn.Module]:
    return next((m for m in layer.modules() if _is_attention(m)), None)


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


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of each decoder layer: the ModuleList of `num_hidden_layers` blocks with linears.

    Raises:
        UserError: no such list (not a decoder-only transformer this patcher knows how to walk).
    """
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count and \
                any(isinstance(m, nn.Linear) for m in module[0].modules()):
            return [(f"{name}.{i}", layer) for i, layer in enumerate(module)]
    raise UserError(f"cannot find the {count} decoder layers of {type(model).__name__}: nothing to quantize")


def _layer_targets(layer: nn.Module, targets) -> tuple[list[str], list[str]]:
    """(names of the linears of `layer` to patch, target names it lacks), fused projections resolved."""
    by_leaf: dict[str, list[str]] = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    chosen, missing = [], []
    for target in targets:
        fused = next((f for f, parts in FUSED.items() if target in parts and f in by_leaf), None)
        if target in by_leaf or fused in targets:
            chosen += by_leaf.get(target, [])
        elif fused is None:
            missing.append(target)
        elif not set(FUSED[fused]) <= set(targets):
            raise UserError(f"{target} is fused into {fused} with {', '.join(FUSED[fused])}: "
                            f"target all of them (or {fused}), or none")
        else:
            chosen += by_leaf[fused]
    return sorted(set(chosen)), missing


def _kv_reachable(layer: nn.Module, chosen: list[str], qcfg: QuantConfig) -> bool:
    """K and V of `layer` get quantized: by the attention function (post_rope) or on patched outputs."""
    leaves = {n.rsplit(".", 1)[-1] for n in chosen}
    pre_rope = {"k_proj", "v_proj"} <= leaves or "qkv_proj" in leaves
    return _layer_attention(layer) is not None and (qcfg.kv_position == "post_rope" or pre_rope)


def _plan(model: nn.Module, qcfg: QuantConfig, kv_on: bool) -> list[str]:
    """Full names of the linears to patch; raises a UserError naming what a complete quantization lacks."""
    chosen, missing, no_kv = [], {}, []
    for prefix, layer in decoder_layers(model):
        names, lacks = _layer_targets(layer, qcfg.targets)
        chosen += [f"{prefix}.{n}" for n in names]
        if lacks:
            missing[prefix] = lacks
        if kv_on and not _kv_reachable(layer, names, qcfg):
            no_kv.append(prefix)
    if missing or no_kv:
        raise UserError(_coverage_error(model, missing, no_kv, qcfg))
    fused = [n for n in chosen if n.rsplit(".", 1)[-1] in FUSED]
    if fused and qcfg.w_granularity == "per_tensor" and not is_off(qcfg.w_bits):
        raise UserError(f"w_granularity=per_tensor would share one scale across the parts of {fused[0]}: "
                        "use per_channel or per_group")
    return chosen


def _coverage_error(model: nn.Module, missing: dict, no_kv: list, qcfg: QuantConfig) -> str:
    _, first = decoder_layers(model)[0]
    present = sorted({n.rsplit(".", 1)[-1] for n, m in first.named_modules() if isinstance(m, nn.Linear)})
    lines = [f"incomplete quantization of {type(model).__name__} at {qcfg.tag()}:"]
    lines += [f"{layer} has no {', '.join(lacks)}" for layer, lacks in list(missing.items())[:4]]
    lines += [f"... and {len(missing) - 4} more layers"] * (len(missing) > 4)
    if no_kv:
        lines.append(f"kv_bits={qcfg.kv_bits} but K/V would not be quantized in {', '.join(no_kv[:4])}"
                     f"{' ...' if len(no_kv) > 4 else ''} (kv_position={qcfg.kv_position} needs k_proj and "
                     f"v_proj, or qkv_proj, among the targets)")
    lines.append(f"its decoder linears are named {', '.join(present)}: pass targets=[...] with those names")
    return "; ".join(lines)


class KVSliceQuantizer(nn.Module):
    """Output quantizer of a fused qkv projection [..., Q + 2 * KV]: the K and V slices are
    fake-quantized per token as separate k_proj / v_proj outputs would be; Q passes unchanged."""

    def __init__(self, spec, q_size: int, kv_size: int):
        super().__init__()
        spec.check_last_dim(kv_size, "K/V slice of qkv_proj")
        self.sizes = [q_size, kv_size, kv_size]
        self.k_quantizer, self.v_quantizer = FakeQuantizer(spec), FakeQuantizer(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x.split(self.sizes, dim=-1)
        return torch.cat((q, self.k_quantizer(k), self.v_quantizer(v)), dim=-1)


def _make_quant_linear(name: str, linear: nn.Linear, qcfg: QuantConfig, kv_spec, config) -> QuantLinear:
    leaf = name.rsplit(".", 1)[-1]
    kv_out = kv_spec.enabled and qcfg.kv_position == "pre_rope"
    out_spec = kv_spec if kv_out and leaf in ("k_proj", "v_proj") else None
    new = QuantLinear.from_linear(linear, weight_spec=qcfg.weight_spec(), act_spec=qcfg.act_spec(),
                                  output_spec=out_spec)
    if kv_out and leaf == "qkv_proj":
        head_dim = head_dim_of(config)
        q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        if linear.out_features != q_size + 2 * kv_size:
            raise UserError(f"{name} has {linear.out_features} outputs, not Q + K + V = {q_size + 2 * kv_size}")
        new.output_quantizer = KVSliceQuantizer(kv_spec, q_size, kv_size)
    return new


def quantize_model(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Fake-quantize a stock HF causal LM in place (see module docstring) and return it.

    Calling it again replaces the previous quantization; at 16 bits the logits equal stock HF's.

    Raises:
        UserError: a decoder layer lacks a target projection, kv_bits < 16 but K/V of some layer
            cannot be quantized, no target at all, or a group size that does not divide in_features.
    """
    if not isinstance(qcfg, QuantConfig):
        raise TypeError(f"quantize_model expects a QuantConfig, got {type(qcfg).__name__}")
    dequantize_model(model)
    config = model.config
    kv_spec = qcfg.kv_spec(head_dim_of(config))
    chosen = set(_plan(model, qcfg, kv_spec.enabled))
    if not chosen:
        raise UserError(f"no linear named one of {qcfg.targets} in {type(model).__name__}")
    patch_linears(model, lambda n, m: _make_quant_linear(n, m, qcfg, kv_spec, config), lambda n, m: n in chosen)
    if qcfg.kv_position == "post_rope" and kv_spec.enabled:
        for attn in _attention_modules(model):
            attn.k_quantizer = FakeQuantizer(kv_spec)
            attn.v_quantizer = FakeQuantizer(kv_spec)
        base = config._attn_implementation or "eager"
        _set_attn_implementation(model, _register_post_rope_attention(base))
    setattr(config, CONFIG_ATTR, qcfg.to_dict())
    model.llmqat_quant_config = qcfg
    logger.info("quantized %s of %s at %s (kv %s): coverage %s", qcfg.targets, type(model).__name__, qcfg.tag(),
                qcfg.kv_position, quant_coverage(model))
    return model


def _on(quantizer) -> bool:
    return isinstance(quantizer, FakeQuantizer) and quantizer.spec.enabled


def _kv_quantized(attn: nn.Module, post_rope_active: bool) -> bool:
    if post_rope_active and _on(getattr(attn, "k_quantizer", None)) and _on(getattr(attn, "v_quantizer", None)):
        return True
    outs = [getattr(getattr(attn, p, None), "output_quantizer", None) for p in ("k_proj", "v_proj", "qkv_proj")]
    if isinstance(outs[2], KVSliceQuantizer):
        outs = [outs[2].k_quantizer, outs[2].v_quantizer]
    return _on(outs[0]) and _on(outs[1])


def quant_coverage(model: nn.Module) -> dict:
    """{"linears": [quantized, total], "kv_layers": [quantized, total]} over the decoder layers; a
    linear counts as quantized when its weight or its input is fake-quantized (the spec, so a
    folded weight or a disabled quantizer still counts), a layer when both its K and V are."""
    layers = [layer for _, layer in decoder_layers(model)]
    linears = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    quantized = sum(isinstance(m, QuantLinear) and (_on(m.weight_quantizer) or _on(m.act_quantizer)) for m in linears)
    post = (getattr(model.config, "_attn_implementation", None) or "").startswith(_ATTN_PREFIX)
    attns = [a for a in map(_layer_attention, layers) if a is not None]
    kv = sum(_kv_quantized(a, post) for a in attns)
    return {"linears": [quantized, len(linears)], "kv_layers": [kv, len(attns)]}


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
