"""Packed safetensors export: integers + scales that rebuild the fake-quant student bit for bit.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_packed.py
"""

from __future__ import annotations

import json

import pytest
import torch

from models import quantize_model
from models.convert import load_packed, save_packed
from quant.config import QuantConfig
from quant.fake_quant import quantize_dequantize
from quant.packed import PACKED_FILE, pack_codes, pack_weight, unpack_codes, unpack_weight
from tests.conftest import TINY_VOCAB, make_byte_tokenizer, make_tiny_llama

CONFIGS = {
    "w4_sym_channel": dict(w_bits=4),
    "w4_asym_group32": dict(w_bits=4, w_symmetric=False, w_granularity="per_group", w_group_size=32),
    "w8_sym_channel": dict(w_bits=8),
    "w2_asym_channel": dict(w_bits=2, w_symmetric=False),
    "w3_sym_tensor": dict(w_bits=3, w_granularity="per_tensor"),
    "w6_sym_group64": dict(w_bits=6, w_granularity="per_group", w_group_size=64),
    "gguf_q4_0": dict(w_bits=4, weight_format="gguf_q4_0"),
    "gguf_q8_0": dict(w_bits=8, weight_format="gguf_q8_0"),
}


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_codes_round_trip(bits):
    codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.shape == ((5, 32) if bits <= 4 else (5, 64)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_weight_equals_fake_quant_over_many_seeds(name, dtype):
    spec = QuantConfig(**CONFIGS[name]).weight_spec()
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(24, 128, generator=g) * torch.rand(24, 1, generator=g) * 3).to(dtype)
        w[seed % 24] = 0.0  # an all-zero row
        rebuilt = unpack_weight(pack_weight(w, spec), spec, dtype)
        assert torch.equal(rebuilt, quantize_dequantize(w, spec)), (name, seed)


def test_packed_tensors_are_small_integers():
    spec = QuantConfig(w_bits=4).weight_spec()
    tensors = pack_weight(torch.randn(32, 64), spec)
    assert tensors["qweight"].dtype == torch.uint8 and tensors["qweight"].shape == (32, 32)
    assert tensors["scale"].shape == (32, 1) and "zero_point" not in tensors


def _student(quant: dict, seed: int = 0, **overrides):
    model = make_tiny_llama(seed, vocab_size=TINY_VOCAB, **overrides)
    return quantize_model(model, QuantConfig(**quant))


def _logits(model, seed: int = 0):
    ids = torch.randint(0, TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("quant", [
    dict(w_bits=4, a_bits=8, kv_bits=8),
    dict(w_bits=4, a_bits=8, kv_bits=4, kv_position="post_rope", w_symmetric=False,
         w_granularity="per_group", w_group_size=32),
    dict(w_bits=4, a_bits=8, weight_format="gguf_q4_0"),
    dict(w_bits=8, weight_format="gguf_q8_0"),
], ids=["w4a8kv8", "w4g32a8kv4_post_rope", "gguf_q4_0", "gguf_q8_0"])
def test_load_packed_logits_equal_fake_quant_student(tmp_path, quant):
    """Activations / KV are fake-quantized by the same functions in both: logits match with atol=0."""
    model = _student(quant)
    save_packed(model, make_byte_tokenizer(), tmp_path)
    rebuilt, tok = load_packed(tmp_path)
    assert tok is not None and rebuilt.llmqat_quant_config == model.llmqat_quant_config
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_tied_embeddings_are_written_once_and_retied(tmp_path):
    model = _student(dict(w_bits=4), tie_word_embeddings=True)
    save_packed(model, None, tmp_path)
    rebuilt, _ = load_packed(tmp_path)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    assert torch.equal(_logits(rebuilt), _logits(model))


def test_packed_file_is_smaller_and_has_a_quantization_config(tmp_path):
    model = _student(dict(w_bits=4))
    save_packed(model, None, tmp_path, dense_dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "llmqat_packed" and config["quant"]["w_bits"] == 4
    linear_params = sum(m.weight.numel() for m in model.modules() if hasattr(m, "weight_quantizer"))
    dense_bf16 = 2 * sum(p.numel() for p in model.parameters())
    assert (tmp_path / PACKED_FILE).stat().st_size < dense_bf16 - linear_params  # 4 bits, not 16
    rebuilt, _ = load_packed(tmp_path)
    assert rebuilt.model.embed_tokens.weight.dtype == torch.bfloat16


def test_unquantized_model_cannot_be_packed(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        save_packed(make_tiny_llama(0), None, tmp_path)
    with pytest.raises(ValueError, match="no weight-quantized linear"):
        save_packed(_student(dict(a_bits=8)), None, tmp_path)


def test_load_packed_rejects_other_folders(tmp_path):
    make_tiny_llama(0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llmqat_packed"):
        load_packed(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_packed(tmp_path / "missing")
