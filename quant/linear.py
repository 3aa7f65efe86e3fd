"""`QuantLinear`: an `nn.Linear` whose weight, input and (optionally) output are fake-quantized.

`QuantLinear.from_linear(linear, ...)` reuses the very same Parameters (no copy; works on meta and
under FSDP / DeepSpeed, where the weight is gathered before forward); `to_linear()` undoes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from quant.config import QuantSpec
from quant.quantizer import FakeQuantizer

_OFF = QuantSpec(16)


class QuantLinear(nn.Linear):
    """y = out_q( linear(act_q(x), weight_q(W), b) ).

    `output_quantizer` is used for K and V quantized before RoPE (the original code), per token
    over the whole k_proj / v_proj output.
    """

    def __init__(self, in_features, out_features, bias=True, *, weight_spec=_OFF, act_spec=_OFF,
                 output_spec=_OFF, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        weight_spec.check_last_dim(in_features, "weight (in_features)")
        act_spec.check_last_dim(in_features, "input activation")
        output_spec.check_last_dim(out_features, "output (out_features)")
        self.weight_quantizer = FakeQuantizer(weight_spec, (out_features, in_features), device=device)
        self.act_quantizer = FakeQuantizer(act_spec)
        self.output_quantizer = FakeQuantizer(output_spec)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, weight_spec=_OFF, act_spec=_OFF,
                    output_spec: Optional[QuantSpec] = None) -> "QuantLinear":
        """Wrap `linear`, sharing its weight and bias Parameters."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  weight_spec=weight_spec, act_spec=act_spec, output_spec=output_spec or _OFF,
                  device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.weight_quantizer.reset_scale(linear.weight)  # a stored scale: from the weight, deterministic
        return new

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` sharing this module's Parameters."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(self.act_quantizer(x), self.weight_quantizer(self.weight), self.bias)
        return self.output_quantizer(out)
