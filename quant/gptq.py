"""GPTQ (Frantar et al., 2022): Hessian-aware rounding of weights onto our fake-quant weight grid.

    gptq_model(model, QuantConfig(w_bits=4), calib_ids)   # in place, layer by layer; then quantize_model

For each decoder layer in turn, H = 2/N * sum x x^T of every target linear's input is gathered over
the calibration tokens (inputs produced by the already-quantized earlier layers, quantizers off),
then each weight is rounded column by column, the rounding error of a column being spread over the
columns not yet rounded through the Cholesky factor of H^-1 (blocks of `block_size`, dampening
`percdamp * mean(diag H)`, optional act-order: columns by decreasing diag H).

Within a layer, `true_sequential=True` (the default) rounds the linears in the order of the
reference implementation's `--true-sequential` (IST-DASLab/gptq `llama.py`, AutoGPTQ's default):
q/k/v, then o, then gate/up, then down, re-collecting each group's Hessians with the earlier groups
already rounded, so each sublayer compensates the error of those before it. Target linears outside
these four groups are rounded last, together. `true_sequential=False` collects all Hessians of a
layer in one pass from its full-precision sublayers (cheaper: 2 layer passes instead of 5).

The grid is the weight quantizer's (`QuantConfig.weight_spec()`: per_channel / per_group /
per_tensor MinMax), with scales from the original weights. Our quantizer recomputes its scale from
the weights it sees, so the element that sets each slice's scale (its max |w|; min and max when
asymmetric) keeps its round-to-nearest code: the stored weights then re-quantize to themselves and
`quantize_model` reproduces the GPTQ rounding exactly (tested; bit-exact for symmetric grids).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from quant.config import GGUF_FORMATS, QuantConfig, QuantSpec
from quant.errors import UserError
from quant.fake_quant import compute_qparams, group_view, int_range, quantize, quantize_dequantize

logger = logging.getLogger(__name__)


def _full(t: torch.Tensor, xg: torch.Tensor, shape) -> torch.Tensor:
    """Broadcast per-slice qparams [..., S, 1] over the grouped view, back to the weight's shape."""
    return (torch.zeros_like(xg) + t).reshape(shape)


def weight_grid(weight: torch.Tensor, spec: QuantSpec):
    """Per-element scale, zero point, pinned mask and pinned values of `weight` [O, I] (float64).

    Pinned: the elements that set each slice's scale, with their round-to-nearest values.
    """
    if spec.format in GGUF_FORMATS:
        raise UserError(f"GPTQ supports the MinMax weight grid only, not weight_format={spec.format}")
    w = weight.double()
    xg = group_view(w, spec.granularity, spec.group_size)
    scale, zero = compute_qparams(xg, spec.bits, spec.symmetric)
    rtn = (quantize(xg, scale, zero, *int_range(spec.bits, spec.symmetric)) - zero) * scale
    pin = torch.zeros_like(xg, dtype=torch.bool)
    ends = [xg.abs().argmax(-1, keepdim=True)] if spec.symmetric else [xg.argmin(-1, keepdim=True),
                                                                        xg.argmax(-1, keepdim=True)]
    for idx in ends:
        pin.scatter_(-1, idx, True)
    return _full(scale, xg, w.shape), _full(zero, xg, w.shape), pin.reshape(w.shape), rtn.reshape(w.shape)


def _round_column(w, scale, zero, pin, pinned, qmin, qmax):
    q = (torch.clamp(torch.round(w / scale) + zero, qmin, qmax) - zero) * scale
    return torch.where(pin, pinned, q)


def _inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1."""
    h = hessian.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True)


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                         percdamp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """GPTQ-rounded copy of `weight` [O, I] (same dtype), on `spec`'s grid; `hessian` [I, I].

    Raises:
        ValueError: a GGUF weight format, or a weight whose last dim the group size does not divide.
    """
    spec.check_last_dim(weight.shape[-1], "weight (in_features)")
    scale, zero, pin, pinned = weight_grid(weight, spec)
    w, h = weight.double().clone(), hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, perm], h[perm][:, perm]
    scale, zero, pin, pinned = scale[:, perm], zero[:, perm], pin[:, perm], pinned[:, perm]
    hinv = _inverse_hessian_factor(h, percdamp)
    qmin, qmax = int_range(spec.bits, spec.symmetric)
    out = torch.zeros_like(w)
    for i1 in range(0, w.shape[1], block_size):
        i2 = min(i1 + block_size, w.shape[1])
        block, err = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            c = i1 + i
            q = _round_column(block[:, i], scale[:, c], zero[:, c], pin[:, c], pinned[:, c], qmin, qmax)
            out[:, c] = q
            err[:, i] = (block[:, i] - q) / hinv[c, c]
            block[:, i:] -= err[:, i : i + 1] @ hinv[c : c + 1, i1 + i : i2]
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    out = out[:, torch.argsort(perm)].to(weight.dtype)
    return quantize_dequantize(out, spec)  # a no-op for symmetric grids; snaps asymmetric ones onto the grid


class _HessianHook:
    """Forward hook accumulating H = 2/N * sum x x^T over the inputs of one linear."""

    def __init__(self, features: int):
        self.h, self.n = torch.zeros(features, features, dtype=torch.float64), 0

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total).add_((x.T @ x).double(), alpha=2.0 / total)
        self.n = total


class _Stop(Exception):
    pass


def capture_layer_inputs(model: nn.Module, calib_ids: torch.Tensor, batch_size: int) -> list:
    """[(hidden_states, kwargs)] entering the first decoder layer, one entry per calibration batch."""
    layer0, captured = model.model.layers[0], []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, len(calib_ids), batch_size):
            try:
                model(calib_ids[start : start + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, inputs: list) -> list:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outs


SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def sequential_groups(linears: dict, true_sequential: bool) -> list:
    """{name: linear} of one layer -> the groups rounded in turn (see the module docstring)."""
    if not true_sequential:
        return [linears]
    leaf = lambda name: name.rsplit(".", 1)[-1]  # noqa: E731
    groups = [{n: m for n, m in linears.items() if leaf(n) in names} for names in SEQUENTIAL_GROUPS]
    rest = {n: m for n, m in linears.items() if not any(leaf(n) in names for names in SEQUENTIAL_GROUPS)}
    return [g for g in groups + [rest] if g]


def _round_group(layer, inputs: list, group: dict, spec: QuantSpec, block_size, percdamp, act_order) -> None:
    """Collect the Hessians of `group`'s inputs over one layer pass, then GPTQ-round its weights."""
    hooks = {n: _HessianHook(m.in_features) for n, m in group.items()}
    handles = [group[n].register_forward_hook(hooks[n]) for n in group]
    try:
        _run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name, linear in group.items():
        linear.weight.data = gptq_quantize_weight(linear.weight.data, hooks[name].h, spec, block_size,
                                                  percdamp, act_order)


@torch.no_grad()
def gptq_model(model: nn.Module, qcfg: QuantConfig, calib_ids: torch.Tensor, block_size: int = 128,
               percdamp: float = 0.01, act_order: bool = False, batch_size: int = 8,
               progress: bool = True, true_sequential: bool = True) -> nn.Module:
    """GPTQ-round every target linear of a plain (unpatched) HF decoder model in place (`progress`: a tqdm bar)."""
    spec = qcfg.weight_spec()
    if not spec.enabled:
        raise UserError("GPTQ needs quantized weights: set w_bits to 2..8")
    inputs = capture_layer_inputs(model, calib_ids.to(next(model.parameters()).device), batch_size)
    layers = model.model.layers
    for index in tqdm(range(len(layers)), desc="gptq", disable=not progress):
        layer = layers[index]
        linears = {n: m for n, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in qcfg.targets}
        for group in sequential_groups(linears, true_sequential):
            _round_group(layer, inputs, group, spec, block_size, percdamp, act_order)
        inputs = _run_layer(layer, inputs)  # the next layer sees this layer's quantized outputs
    logger.info("GPTQ rounded %d layers at w_bits=%d (%s, %s)", len(layers), spec.bits, spec.granularity,
                "true-sequential" if true_sequential else "one pass per layer")
    return model
