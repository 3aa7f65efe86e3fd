"""`FakeQuantizer`: a thin module around `apply_spec`, holding a frozen spec and an on/off flag."""

from __future__ import annotations

import torch
from torch import nn

from quant.config import QuantSpec
from quant.fake_quant import apply_spec


class FakeQuantizer(nn.Module):
    """Fake-quantizes its input as `spec` says; `enabled=False` (or 16/32 bits) is the identity."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.enabled = spec.enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_spec(x, self.spec) if self.enabled else x

    def extra_repr(self) -> str:
        s = self.spec
        if not s.enabled:
            return "off"
        group = f", group_size={s.group_size}" if s.granularity == "per_group" else ""
        sym = "sym" if s.symmetric else "asym"
        return f"bits={s.bits}, {sym}, {s.granularity}{group}, enabled={self.enabled}"
