"""quant/compressed_tensors.py: packing, codes and scales, the config dict, the schemes it refuses.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_compressed_tensors.py

The layout is checked against the installed `compressed-tensors` package (its packer, its config
schema, its format inference); the round trip through transformers is tests/recipes/test_export.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import compressed_tensors as ct
from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import quantize_codes, quantize_dequantize

ct_pkg = pytest.importorskip("compressed_tensors")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", [64, 40, 7])
def test_pack_int32_is_compressed_tensors_packing(bits, in_features):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax - 1, qmax + 1, (5, in_features), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(bits))
    packed = ct.pack_int32(codes, bits)
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(ct.unpack_int32(packed, bits, in_features), codes)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(codes.shape)), codes)


SPECS = [QuantSpec(4), QuantSpec(4, granularity="per_group", group_size=32), QuantSpec(8)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"w{s.bits}-{s.granularity}")
@pytest.mark.parametrize("seed", range(5))
def test_stored_codes_are_the_fake_quant_codes(spec, seed):
    """Codes bit for bit; the float32 scale is our compute-dtype scale rounded once."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed))
    tensors = ct.compress_weight(w, spec, ct.PACK_QUANTIZED)
    q, scale, _ = quantize_codes(w, spec)
    codes = ct.unpack_int32(tensors["weight_packed"], spec.bits, 64)
    assert torch.equal(codes.to(q.dtype), q.reshape(w.shape))
    assert tensors["weight_scale"].dtype == torch.float32
    assert torch.equal(tensors["weight_scale"], scale.squeeze(-1).float())
    assert tensors["weight_shape"].tolist() == [48, 64]
    dequantized = (codes.float().unflatten(-1, (scale.shape[-2], -1)) * tensors["weight_scale"].unsqueeze(-1))
    torch.testing.assert_close(dequantized.reshape(w.shape), quantize_dequantize(w, spec), rtol=1e-6, atol=0)


def test_int_quantized_stores_int8_weights():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    tensors = ct.compress_weight(w, QuantSpec(8), ct.INT_QUANTIZED)
    assert set(tensors) == {"weight", "weight_scale"}
    assert tensors["weight"].dtype == torch.int8 and tensors["weight_scale"].shape == (16, 1)


@pytest.mark.parametrize("qcfg, fmt", [
    (QuantConfig(w_bits=4), "pack-quantized"),
    (QuantConfig(w_bits=4, w_granularity="per_group", w_group_size=32), "pack-quantized"),
    (QuantConfig(w_bits=8), "pack-quantized"),
    (QuantConfig(w_bits=8, a_bits=8), "int-quantized"),
])
def test_config_is_valid_and_its_format_is_the_one_compressed_tensors_infers(qcfg, fmt):
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    qc = ct.quantization_config(qcfg, ["lm_head"])
    parsed = QuantizationConfig.model_validate(qc)
    scheme = parsed.config_groups["group_0"]
    assert qc["format"] == fmt and parsed.ignore == ["lm_head"]
    assert infer_module_format(nn.Linear, scheme.model_copy(update={"format": None})).value == fmt
    assert scheme.weights.num_bits == qcfg.w_bits and scheme.weights.symmetric
    assert (scheme.input_activations is None) == (qcfg.a_bits == 16)


@pytest.mark.parametrize("qcfg, words", [
    (QuantConfig(w_bits=4, w_symmetric=False), "asymmetric"),
    (QuantConfig(w_bits=4, weight_format="gguf_q4_0"), "gguf_q4_0"),
    (QuantConfig(w_bits=3), "w_bits=3"),
    (QuantConfig(w_bits=4, w_granularity="per_tensor"), "per_tensor"),
    (QuantConfig(w_bits=4, a_bits=8), "8-bit per_channel weights"),
    (QuantConfig(w_bits=8, a_bits=8, a_symmetric=False), "a_symmetric=False"),
    (QuantConfig(w_bits=8, a_bits=4), "a_bits=4"),
    (QuantConfig(a_bits=8), "not quantized"),
])
def test_unsupported_schemes_name_the_reason(qcfg, words):
    assert words in ct.unsupported_reason(qcfg)


def test_kv_quantization_is_reported_not_exported():
    assert ct.unsupported_reason(QuantConfig(w_bits=4, kv_bits=8)) is None
    assert "kv_bits=8" in ct.kv_cache_note(QuantConfig(w_bits=4, kv_bits=8))
    assert ct.kv_cache_note(QuantConfig(w_bits=4)) is None
