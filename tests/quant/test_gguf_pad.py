"""Zero-padding a Llama to whole GGUF blocks (quant/gguf_pad.py) computes the same function, and a ternary
student whose widths are not multiples of 256 (as SmolLM2-135M's 576) exports to TQ1_0 / TQ2_0 exactly.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_gguf_pad.py
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from models import quantize_model
from quant.config import QuantConfig
from quant.errors import UserError
from quant.export_gguf import PADDED_KEY, write_gguf
from quant.gguf_pad import block_padding
from tests.conftest import TINY_VOCAB, make_byte_tokenizer, make_tiny_llama, tiny_llama_config

# SmolLM2-135M's shape in small: 9 query heads in 3 KV groups, hidden = 9 x head_dim not a whole block.
SMOLLM_LIKE = dict(hidden_size=72, intermediate_size=100, num_attention_heads=9, num_key_value_heads=3)


def _padded_model(model, block: int):
    padding = block_padding(model.config, block)
    padded = LlamaForCausalLM(padding.config(model.config)).to(model.dtype).eval()
    state = {k: padding.tensor(k, v) for k, v in model.state_dict().items()}
    padded.load_state_dict(state)
    return padded, padding


@pytest.mark.parametrize("shape, block", [(SMOLLM_LIKE, 32), (dict(hidden_size=96, intermediate_size=160,
                                                                  num_attention_heads=3, num_key_value_heads=1), 64)])
def test_padded_llama_computes_the_same_logits(shape, block):
    model = make_tiny_llama(0, dtype=torch.float64, **shape)
    padded, padding = _padded_model(model, block)
    assert padding.hidden_to % block == 0 and padding.inter_to % block == 0 and padding.heads_to > padding.heads
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(ids).logits, padded(ids).logits
        tol = 1e-6 * ref.abs().max().item()  # HF's RMSNorm runs in float32 even in a float64 model
        assert torch.allclose(got, ref, rtol=0, atol=tol)
        for module in padded.modules():  # the rescaled eps is what keeps the norms equal
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = model.config.rms_norm_eps
        assert not torch.allclose(padded(ids).logits, ref, rtol=0, atol=100 * tol)


def test_padding_keeps_each_query_head_in_its_kv_group():
    padding = block_padding(tiny_llama_config(**SMOLLM_LIKE), 32)  # 9 heads / 3 groups -> 12 heads / 3 groups
    assert (padding.heads_to, padding.kv_heads) == (12, 3)
    index = padding.head_index()
    assert index.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert torch.equal(index // 4, torch.arange(9) // 3)


def test_no_padding_when_widths_are_whole_blocks():
    assert block_padding(tiny_llama_config(hidden_size=256, intermediate_size=512), 256) is None


def test_a_geometry_that_cannot_stay_exact_is_refused():
    # hidden 72 -> 128 = 16 heads of 8: not a multiple of the 3 KV heads.
    with pytest.raises(UserError, match="cannot pad"):
        block_padding(tiny_llama_config(**SMOLLM_LIKE), 64)


def _unpermute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    pairs = weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def _model_from_gguf(path, config):
    """A float32 HF Llama built from every tensor of a GGUF file (dequantized, RoPE rows un-permuted)."""
    reader = gguf.GGUFReader(path)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    model = LlamaForCausalLM(config).eval()
    state = {}
    for key, ref in model.state_dict().items():
        t = next(t for t in reader.tensors if t.name == names.get_name(key, try_suffixes=(".weight",)))
        value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        leaf = key.rsplit(".", 2)[-2]
        if leaf in ("q_proj", "k_proj"):
            value = _unpermute_rope(value, config.num_attention_heads if leaf == "q_proj" else
                                    config.num_key_value_heads)
        state[key] = torch.from_numpy(np.array(value, dtype=np.float32))
    model.load_state_dict(state)
    return model, reader


@pytest.mark.parametrize("kind", ["tq2_0", "tq1_0"])
def test_ternary_student_of_odd_width_exports_padded_and_exact(tmp_path, kind):
    # hidden 192 = 3 heads of 64 -> 256 = 4 heads of 64 (one KV head); intermediate 320 -> 512.
    shape = dict(hidden_size=192, intermediate_size=320, num_attention_heads=3, num_key_value_heads=1)
    student = quantize_model(make_tiny_llama(1, vocab_size=TINY_VOCAB, **shape),
                             QuantConfig(w_bits=2, w_quantizer="ternary"))
    path = write_gguf(student, make_byte_tokenizer(), tmp_path / "t.gguf", kind, embed_type="f32")
    padding = block_padding(student.config, 256)
    config = padding.config(student.config)
    config.tie_word_embeddings = False
    rebuilt, reader = _model_from_gguf(path, config)
    assert reader.fields["llama.embedding_length"].contents() == 256
    assert reader.fields["llama.attention.head_count"].contents() == 4
    assert json.loads(reader.fields[PADDED_KEY].contents())["hidden_size"] == 192
    eps = reader.fields["llama.attention.layer_norm_rms_epsilon"].contents()
    assert eps == pytest.approx(student.config.rms_norm_eps * 192 / 256)
    ternary = [t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert ternary and all(t.tensor_type == getattr(gguf.GGMLQuantizationType, kind.upper()) for t in ternary)
    # Each padded linear holds exactly the fake-quant weights (zeros elsewhere) ...
    modules = dict(student.named_modules())
    for key, value in rebuilt.state_dict().items():
        module = modules.get(key.rsplit(".", 1)[0])
        if key.endswith(".weight") and hasattr(module, "weight_quantizer"):
            with torch.no_grad():
                expected = padding.tensor(key, module.weight_quantizer(module.weight))
            assert torch.equal(value, expected), key
    # ... so the file computes the student's logits.
    ids = torch.randint(3, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = student(ids).logits, rebuilt(ids).logits
    assert torch.allclose(got, ref, atol=1e-4 * ref.abs().max().item())
