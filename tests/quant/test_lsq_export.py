"""Export of stored-scale students (lsq / ternary / mse): packed and GGUF files hold the trained scales and
dequantize to exactly the fake-quant weights.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_lsq_export.py
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from models import quantize_model
from models.convert import load_packed, save_packed
from quant.config import QuantConfig
from quant.export_gguf import permute_rope, write_gguf
from quant.packed import pack_weight, unpack_weight
from tests.conftest import TINY_VOCAB, make_byte_tokenizer, make_tiny_llama

CONFIGS = {
    "lsq_w4_channel": dict(w_bits=4, w_quantizer="lsq"),
    "lsq_w3_group32": dict(w_bits=3, w_quantizer="lsq", w_granularity="per_group", w_group_size=32),
    "lsq_w2_seq": dict(w_bits=2, w_quantizer="lsq"),
    "ternary_group32": dict(w_bits=2, w_quantizer="ternary", w_granularity="per_group", w_group_size=32),
    "lsq_w8_mse": dict(w_bits=8, w_quantizer="lsq", w_init="mse"),
    "minmax_w4_mse": dict(w_bits=4, w_init="mse"),
    "lsq_gguf_q4_0": dict(w_bits=4, w_quantizer="lsq", weight_format="gguf_q4_0"),
    "lsq_gguf_q8_0": dict(w_bits=8, w_quantizer="lsq", weight_format="gguf_q8_0", w_init="mse"),
}


def trained_student(kw: dict, seed: int = 0):
    """A tiny student whose stored scales moved away from their init, as training would move them."""
    model = quantize_model(make_tiny_llama(seed, vocab_size=TINY_VOCAB), QuantConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("weight_quantizer.scale"):
                buf.mul_(torch.empty_like(buf).uniform_(0.7, 1.2, generator=g))
    return model


def _quantized(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.enabled}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("seed", range(3))
def test_packed_weight_round_trips_the_fake_quant_weight_exactly(name, seed):
    model = trained_student(CONFIGS[name], seed)
    for key, module in _quantized(model).items():
        quantizer = module.weight_quantizer
        tensors = pack_weight(module.weight, quantizer.spec, quantizer.learned_scale())
        expected = quantizer(module.weight).detach()
        assert torch.equal(unpack_weight(tensors, quantizer.spec, module.weight.dtype), expected), key


@pytest.mark.parametrize("name", ["lsq_w4_channel", "ternary_group32", "lsq_w2_seq", "lsq_gguf_q4_0"])
def test_packed_folder_reloads_to_the_same_logits(tmp_path, name):
    model = trained_student({**CONFIGS[name], "a_bits": 8})
    ids = torch.randint(3, TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    save_packed(model, make_byte_tokenizer(), tmp_path / "packed")
    again, _ = load_packed(tmp_path / "packed")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


def _exported_and_expected(model, path, kind: str):
    """(name, GGUF tensor, expected fake-quant weight in GGUF's row order) of every quantized linear,
    after writing `model` as `kind`; checks each tensor's type."""
    reader = gguf.GGUFReader(write_gguf(model, make_byte_tokenizer(), path, kind, "q8_0"))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    heads = {"q_proj": 4, "k_proj": 2}
    for key, module in _quantized(model).items():
        expected = module.weight_quantizer(module.weight).detach()
        leaf = key.rsplit(".", 1)[-1]
        if leaf in heads:
            expected = permute_rope(expected, heads[leaf])
        t = tensors[names.get_name(key + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind.upper())
        yield key, t, expected


@pytest.mark.parametrize("name", ["lsq_gguf_q4_0", "lsq_gguf_q8_0"])
def test_gguf_tensors_dequantize_to_the_learned_fake_quant_weights(tmp_path, name):
    model = trained_student(CONFIGS[name], seed=1)
    kind = CONFIGS[name]["weight_format"].removeprefix("gguf_")
    for key, t, expected in _exported_and_expected(model, tmp_path / "m.gguf", kind):
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), expected.numpy()), key
    assert not any("scale" in t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors)


def test_learned_gguf_block_scales_are_fp16_in_the_forward():
    model = trained_student(CONFIGS["lsq_gguf_q4_0"])
    module = next(iter(_quantized(model).values()))
    _, scale, _ = module.weight_quantizer.codes(module.weight)
    assert torch.equal(scale, scale.to(torch.float16).to(scale.dtype))
    assert not torch.equal(module.weight_quantizer.scale, scale)  # the parameter itself stays float32


@pytest.mark.parametrize("kind", ["tq1_0", "tq2_0"])
@pytest.mark.parametrize("granularity", [dict(w_granularity="per_channel"),
                                         dict(w_granularity="per_group", w_group_size=256)])
def test_ternary_student_exports_to_llama_cpp_ternary_types_exactly(tmp_path, kind, granularity):
    cfg = QuantConfig(w_bits=2, w_quantizer="ternary", **granularity)
    model = quantize_model(make_tiny_llama(3, vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512,
                                           num_attention_heads=4, num_key_value_heads=2), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_quantizer.scale"):
                p.mul_(0.8)
    for key, t, expected in _exported_and_expected(model, tmp_path / "t.gguf", kind):
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        assert np.array_equal(got, expected.numpy()), key


def test_ternary_types_refuse_widths_that_cannot_be_padded_to_256(tmp_path):
    from quant.errors import UserError

    # hidden 72 = 9 heads of 8 -> 256 = 32 heads: not a multiple of the 3 KV heads (quant/gguf_pad.py)
    shape = dict(hidden_size=72, intermediate_size=128, num_attention_heads=9, num_key_value_heads=3)
    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB, **shape),
                           QuantConfig(w_bits=2, w_quantizer="ternary"))
    with pytest.raises(UserError, match="blocks of 256"):
        write_gguf(model, make_byte_tokenizer(), tmp_path / "t.gguf", "tq2_0", "q8_0")
    assert not (tmp_path / "t.gguf").exists()


@pytest.mark.parametrize("shape", [dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                        num_key_value_heads=2),
                                   dict(hidden_size=192, intermediate_size=320, num_attention_heads=3,
                                        num_key_value_heads=1)])  # zero-padded to 256 / 512 (quant/gguf_pad.py)
def test_llama_cpp_runs_a_ternary_student(tmp_path, shape):
    """Optional (pip install llama-cpp-python): llama.cpp loads the TQ2_0 file and its logits follow
    the fake-quant ternary student (llama.cpp quantizes activations to 8 bits in its TQ2_0 matmuls)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tests.quant.test_gguf_format import _tokenizer_with_a_merge

    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB, **shape),
                           QuantConfig(w_bits=2, w_quantizer="ternary"))
    path = write_gguf(model, _tokenizer_with_a_merge(), tmp_path / "t.gguf", "tq2_0", embed_type="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    ids = list(range(5, 25))
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    llm.close()
    assert torch.allclose(ours, expected, atol=0.05 * expected.abs().max().item())
