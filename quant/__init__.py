"""Fake quantization for QAT: pure functions (`fake_quant`), settings (`config`), modules."""

from quant.config import QuantConfig, QuantSpec, check_bits, is_off
from quant.fake_quant import compute_qparams, dequantize, fake_quantize, group_view, int_range, quantize
from quant.linear import QuantLinear
from quant.quantizer import FakeQuantizer

__all__ = [
    "QuantConfig", "QuantSpec", "check_bits", "is_off", "fake_quantize", "compute_qparams",
    "quantize", "dequantize", "group_view", "int_range", "QuantLinear", "FakeQuantizer",
]
