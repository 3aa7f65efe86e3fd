"""`FakeQuantizer`: a thin module around `apply_spec`, holding a frozen spec and an on/off flag.

A spec with a stored scale (w_quantizer lsq / ternary, or w_init mse; quant/lsq.py) makes the
quantizer hold `scale` [..., S, 1] (one per slice of `group_view(weight)`): a Parameter when learned,
a buffer when searched once; both are in the state dict, so they save, load and resume with the model.
A spec with clip="learned" (activations, K/V) makes it hold `clip` [1], the learned clip ratio of
its dynamic scale (starts at 1: MinMax), likewise in the state dict.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from quant.config import QuantSpec
from quant.fake_quant import apply_spec, group_view
from quant.lsq import clipped_fake_quantize, init_scale, lsq_fake_quantize, weight_codes


def is_stored_param(name: str) -> bool:
    """A state-dict / parameter name of a quantizer's own tensor (a weight scale or a learned clip
    ratio), whatever wrapper prefixes it: what save / load and the scale optimizer group look for."""
    return name.endswith("weight_quantizer.scale") or name.endswith("_quantizer.clip")


def scale_shape(shape: tuple, spec: QuantSpec) -> tuple:
    """Shape of the stored scale of a tensor of `shape` [..., N]: [..., S, 1]."""
    return (*group_view(torch.empty(shape, device="meta"), spec.granularity, spec.group_size).shape[:-1], 1)


class FakeQuantizer(nn.Module):
    """Fake-quantizes its input as `spec` says; `enabled=False` (or 16/32 bits) is the identity.

    Args:
        spec: the grid.
        shape: shape of the tensor it quantizes (a weight [out, in]); needed for a stored scale.
    """

    def __init__(self, spec: QuantSpec, shape: Optional[tuple] = None, device=None):
        super().__init__()
        self.spec = spec
        self.enabled = spec.enabled
        if spec.enabled and spec.stored_scale:
            if shape is None:
                raise ValueError(f"quantizer={spec.quantizer} init={spec.init} needs the quantized tensor's shape")
            scale = torch.ones(scale_shape(shape, spec), device=device)
            if spec.learned:
                self.scale = nn.Parameter(scale)
            else:
                self.register_buffer("scale", scale)
        if spec.enabled and spec.clip == "learned":
            self.clip = nn.Parameter(torch.ones(1, device=device))

    @torch.no_grad()
    def reset_scale(self, x: torch.Tensor) -> None:
        """Initialise the stored scale from `x` (MinMax or the MSE search, as the spec says); no-op without one."""
        if getattr(self, "scale", None) is None:
            return
        scale = init_scale(x, self.spec)
        self.scale = nn.Parameter(scale) if self.spec.learned else scale  # a buffer stays a buffer

    def learned_scale(self) -> Optional[torch.Tensor]:
        """The stored scale, or None for a MinMax quantizer (its scale comes from the tensor)."""
        return getattr(self, "scale", None)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes [..., S, L], scale [..., S, 1], zero point) of `x`: what export writes, exactly the forward."""
        return weight_codes(x, self.spec, self.learned_scale())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.learned_scale() is not None:
            return lsq_fake_quantize(x, self.scale, self.spec)
        if getattr(self, "clip", None) is not None:
            return clipped_fake_quantize(x, self.clip, self.spec)
        return apply_spec(x, self.spec)

    def extra_repr(self) -> str:
        s = self.spec
        if not s.enabled:
            return "off"
        group = f", group_size={s.group_size}" if s.granularity == "per_group" else ""
        sym = "sym" if s.symmetric else "asym"
        kind = f", {s.quantizer}, init={s.init}" if s.stored_scale else ""
        kind += ", learned clip" if s.clip == "learned" else ""
        return f"bits={s.bits}, {sym}, {s.granularity}{group}{kind}, enabled={self.enabled}"
