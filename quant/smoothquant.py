"""SmoothQuant (Xiao et al., 2022): move activation outliers into the weights, then quantize W and A.

    scales = activation_absmax(model, calib_ids)          # max |x_j| of each linear's input channel j
    smooth_model(model, scales, alpha=0.8)                # in place; FP outputs unchanged
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8, kv_bits=8))

For input channel j shared by a group of linears: s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) (max
over the group's weights); X_j / s_j is folded into the op producing X, W_:,j * s_j into the linears.
The published Llama recipe (mit-han-lab/smoothquant `smooth.py`, `smooth_lm`) smooths two groups
per decoder layer, and so does `smooth_model` by default:
  * q/k/v_proj: divide input_layernorm.weight (RMSNorm is elementwise after normalization);
  * gate/up_proj: divide post_attention_layernorm.weight.
`smooth_down=True` adds a third group, not in the published recipe (labelled "+down" in tables):
  * down_proj: divide the rows of up_proj, since act(gate) * up is linear in up.
o_proj is left alone (folding into v_proj must respect grouped-query heads). The model stays a
stock HF model with different numbers, so `quantize_model` and `save_model` work unchanged.
Choosing alpha (a grid searched on calibration data) is the PTQ recipe's job: recipes/ptq.py.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.errors import UserError

SMOOTH_EPS = 1e-5
SCALED_INPUTS = ("q_proj", "gate_proj", "down_proj")  # one linear per group: its input is the group's input


@torch.no_grad()
def activation_absmax(model: nn.Module, calib_ids: torch.Tensor, batch_size: int = 8) -> dict:
    """{linear name: max |input| per input channel [I]} over the calibration tokens (float32)."""
    scales, handles = {}, []

    def hook(name):
        def fn(module, args, output):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            scales[name] = torch.maximum(scales[name], amax) if name in scales else amax
        return fn

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in SCALED_INPUTS:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        for start in range(0, len(calib_ids), batch_size):
            model(calib_ids[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return scales


def smoothing_factors(act_absmax: torch.Tensor, weights: list, alpha: float) -> torch.Tensor:
    """s [I] = act^alpha / w^(1 - alpha), w = max |W[:, j]| over `weights` [O_k, I]."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = act_absmax.clamp(min=SMOOTH_EPS).pow(alpha) / w_absmax.clamp(min=SMOOTH_EPS).pow(1 - alpha)
    return s.clamp(min=SMOOTH_EPS)


@torch.no_grad()
def _fold(source_weight: torch.Tensor, linears: list, s: torch.Tensor) -> None:
    """source_weight[j(, :)] /= s_j (norm weight [I] or up_proj rows [I, H]); linear.weight[:, j] *= s_j."""
    shape = (-1,) + (1,) * (source_weight.dim() - 1)
    source_weight.div_(s.to(source_weight.dtype).view(shape))
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))


def smoothing_groups(layer: nn.Module, smooth_down: bool = False) -> list:
    """[(source weight, linears, name of the linear whose input scales the group)] of one decoder layer.

    Raises:
        AttributeError: a layer without the Llama-style modules.
    """
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm.weight, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj"),
              (layer.post_attention_layernorm.weight, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj")]
    if smooth_down:
        groups.append((mlp.up_proj.weight, [mlp.down_proj], "mlp.down_proj"))
    return groups


def smoothed_tensors(model: nn.Module, smooth_down: bool = False) -> list:
    """Every tensor `smooth_model` writes (norm weights, the smoothed linears' weights), in a fixed
    order: what to snapshot to undo a smoothing exactly."""
    tensors = []
    for layer in model.model.layers:
        for source, linears, _ in smoothing_groups(layer, smooth_down):
            tensors += [source.data] + [m.weight.data for m in linears]
    return tensors


def smooth_model(model: nn.Module, act_scales: dict, alpha: float = 0.5, smooth_down: bool = False) -> nn.Module:
    """Apply SmoothQuant in place to every decoder layer of a Llama-style model (see module doc).

    Raises:
        UserError: alpha outside [0, 1], or a layer without the expected modules / scales.
    """
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    for i, layer in enumerate(model.model.layers):
        try:
            groups = [(source, linears, act_scales[f"model.layers.{i}.{name}"])
                      for source, linears, name in smoothing_groups(layer, smooth_down)]
        except (AttributeError, KeyError) as err:
            raise UserError(f"SmoothQuant needs a Llama-style layer {i} with calibration scales: {err}") from None
        for source, linears, act in groups:
            _fold(source.data, linears, smoothing_factors(act, [m.weight for m in linears], alpha))
    return model
