"""`export.py` of stored-scale students: an LSQ student's packed export reloads to its logits, its
gguf_q4_0 export dequantizes to its fake-quant weights, a ternary one writes llama.cpp's TQ2_0.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_export_lsq.py
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import export
from models import load_model, quantize_model, save_model
from models.convert import load_packed
from quant.config import QuantConfig
from quant.export_gguf import permute_rope
from tests.conftest import TINY_VOCAB, make_byte_tokenizer, make_tiny_llama


def lsq_student(out, seed=0, model_kw=None, **quant):
    """A saved student whose stored scales moved from their init (as after training)."""
    model = quantize_model(make_tiny_llama(seed, vocab_size=TINY_VOCAB, **(model_kw or {})), QuantConfig(**quant))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_quantizer.scale"):
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.1, generator=torch.Generator().manual_seed(seed)))
    save_model(model, make_byte_tokenizer(), out)
    return str(out), model


def test_lsq_packed_export_reloads_as_the_student(tmp_path):
    student, model = lsq_student(tmp_path / "s", w_bits=4, w_quantizer="lsq", a_bits=8,
                                 w_granularity="per_group", w_group_size=32)
    assert export.main([f"student={student}", "format=packed", f"output={tmp_path / 'p'}"]) == 0
    rebuilt, _ = load_packed(tmp_path / "p")
    ids = torch.randint(3, TINY_VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)


def _assert_gguf_equals_fake_quant(path, model, kind):
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for key, module in model.named_modules():
        if not hasattr(module, "weight_quantizer"):
            continue
        expected = module.weight_quantizer(module.weight).detach()
        leaf = key.rsplit(".", 1)[-1]
        expected = permute_rope(expected, heads[leaf]) if leaf in heads else expected
        t = tensors[names.get_name(key + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type.name == kind.upper()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
        assert np.array_equal(got, expected.numpy()), key


def test_lsq_gguf_q4_0_export_equals_the_fake_quant_weights(tmp_path):
    student, _ = lsq_student(tmp_path / "s", w_bits=4, w_quantizer="lsq", weight_format="gguf_q4_0", w_init="mse")
    out = tmp_path / "m.gguf"
    assert export.main([f"student={student}", "format=gguf_q4_0", f"output={out}"]) == 0
    reloaded, _ = load_model(student)  # what export loaded: the saved scales, not re-initialised ones
    _assert_gguf_equals_fake_quant(out, reloaded, "q4_0")


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_ternary_student_exports_to_tq_exactly(tmp_path, kind):
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    student, _ = lsq_student(tmp_path / "s", model_kw=shape, w_bits=2, w_quantizer="ternary")
    out = tmp_path / "t.gguf"
    assert export.main([f"student={student}", f"format=gguf_{kind}", f"output={out}"]) == 0
    reloaded, _ = load_model(student)
    _assert_gguf_equals_fake_quant(out, reloaded, kind)


def test_tq_export_of_a_non_ternary_student_fails_cleanly(tmp_path, capsys):
    student, _ = lsq_student(tmp_path / "s", w_bits=4, w_quantizer="lsq")
    assert export.main([f"student={student}", "format=gguf_tq2_0", f"output={tmp_path / 't.gguf'}"]) == 2
    assert "ternary" in capsys.readouterr().err
