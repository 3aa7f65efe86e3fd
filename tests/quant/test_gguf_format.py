"""GGUF-faithful weight grids (Q4_0 / Q8_0) and the GGUF writer, against the `gguf` package.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_gguf_format.py
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from models import load_model, quantize_model, save_model
from quant.config import QuantConfig, QuantSpec
from quant.errors import UserError
from quant.export_gguf import MARKER, MARKER_KEY, permute_rope, write_gguf
from quant.fake_quant import apply_spec, dequantize, quantize_dequantize
from quant.gguf_formats import gguf_quantize_codes
from tests.conftest import TINY_VOCAB, make_byte_tokenizer, make_tiny_llama

GGML = {"gguf_q4_0": gguf.GGMLQuantizationType.Q4_0, "gguf_q8_0": gguf.GGMLQuantizationType.Q8_0}
BITS = {"gguf_q4_0": 4, "gguf_q8_0": 8}


def random_weight(seed: int, rows: int = 16, cols: int = 256) -> torch.Tensor:
    """Random rows over 5 decades of scale, plus an all-zero, a tied-extremes and a half-step block."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 10 ** torch.empty(rows, 1).uniform_(-4, 1, generator=g)
    w[0, :32] = 0.0
    w[1, :32] = 3.0
    w[1, 5] = -3.0  # |max| tie of opposite signs: the first one sets Q4_0's sign
    w[2, :32] = torch.arange(32) / 4 - 4  # exact multiples of d / 2
    return w


def reference(w: torch.Tensor, fmt: str) -> np.ndarray:
    return gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), GGML[fmt]), GGML[fmt])


@pytest.mark.parametrize("fmt", list(GGML))
@pytest.mark.parametrize("seed", range(12))
def test_fake_quant_equals_gguf_reference_quantizer(fmt, seed):
    w = random_weight(seed)
    spec = QuantConfig(w_bits=BITS[fmt], weight_format=fmt).weight_spec()
    assert np.array_equal(quantize_dequantize(w, spec).numpy(), reference(w, fmt))


@pytest.mark.parametrize("fmt", list(GGML))
def test_block_bytes_equal_gguf_reference(fmt):
    from quant.export_gguf import encode_blocks

    w = random_weight(99)
    codes, scale, _ = gguf_quantize_codes(w, fmt)
    ours = encode_blocks(codes, scale, fmt.removeprefix("gguf_"))
    assert np.array_equal(ours, gguf.quants.quantize(w.numpy(), GGML[fmt]))


@pytest.mark.parametrize("fmt", list(GGML))
def test_grid_is_idempotent(fmt):
    """Quantizing decoded weights again gives the same codes: GGUF export of a trained model is lossless."""
    w = random_weight(7)
    codes, scale, zero_point = gguf_quantize_codes(w, fmt)
    again = gguf_quantize_codes(dequantize(codes, scale, zero_point).reshape(w.shape), fmt)
    assert torch.equal(again[0], codes) and torch.equal(again[1], scale)


@pytest.mark.parametrize("fmt", list(GGML))
def test_bf16_weights_use_the_float32_grid(fmt):
    w = random_weight(3).to(torch.bfloat16)
    spec = QuantConfig(w_bits=BITS[fmt], weight_format=fmt).weight_spec()
    expected = torch.from_numpy(reference(w.float(), fmt)).to(torch.bfloat16)
    assert torch.equal(quantize_dequantize(w, spec), expected)


@pytest.mark.parametrize("fmt", list(GGML))
def test_ste_gradient_is_identity(fmt):
    w = random_weight(5).requires_grad_()
    spec = QuantConfig(w_bits=BITS[fmt], weight_format=fmt).weight_spec()
    grad = torch.randn_like(w)
    apply_spec(w, spec).backward(grad)
    assert torch.equal(w.grad, grad)


def test_quant_config_gguf_format_fixes_the_grid():
    spec = QuantConfig(w_bits=4, weight_format="gguf_q4_0").weight_spec()
    assert (spec.bits, spec.granularity, spec.group_size, spec.format) == (4, "per_group", 32, "gguf_q4_0")
    assert QuantConfig(w_bits=4, weight_format="gguf_q4_0", w_granularity="per_group", w_group_size=32)
    assert QuantSpec(4).format == "minmax"  # positional callers unchanged


@pytest.mark.parametrize("kwargs, match", [
    (dict(w_bits=8, weight_format="gguf_q4_0"), "w_bits=4"),
    (dict(w_bits=4, weight_format="gguf_q8_0"), "w_bits=8"),
    (dict(w_bits=16, weight_format="gguf_q4_0"), "w_bits=4"),
    (dict(w_bits=4, weight_format="gguf_q4_0", w_symmetric=False), "w_symmetric"),
    (dict(w_bits=4, weight_format="gguf_q4_0", w_granularity="per_group", w_group_size=64), "blocks of 32"),
    (dict(w_bits=4, weight_format="gguf_q4_0", w_granularity="per_tensor"), "blocks of 32"),
    (dict(w_bits=4, weight_format="gguf_q5_0"), "unknown weight_format"),
])
def test_quant_config_rejects_mismatched_gguf_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_quant_spec_rejects_a_gguf_format_with_another_grid():
    with pytest.raises(ValueError, match="needs bits=4"):
        QuantSpec(4, True, "per_channel", None, False, "gguf_q4_0")


def test_gguf_student_round_trips_through_quant_config_json(tmp_path):
    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB), QuantConfig(w_bits=4, weight_format="gguf_q4_0"))
    save_model(model, make_byte_tokenizer(), tmp_path / "student")
    reloaded, _ = load_model(str(tmp_path / "student"))
    layer = reloaded.model.layers[0].mlp.up_proj
    assert layer.weight_quantizer.spec.format == "gguf_q4_0"
    expected = reference(layer.weight.detach(), "gguf_q4_0")
    assert np.array_equal(layer.weight_quantizer(layer.weight).detach().numpy(), expected)


def _write(model, path, weight_type, embed_type="q8_0"):
    return gguf.GGUFReader(write_gguf(model, make_byte_tokenizer(), path, weight_type, embed_type))


@pytest.mark.parametrize("fmt", list(GGML))
def test_gguf_tensors_dequantize_to_the_fake_quant_weights(tmp_path, fmt):
    model = make_tiny_llama(1, vocab_size=TINY_VOCAB)
    quantize_model(model, QuantConfig(w_bits=BITS[fmt], weight_format=fmt))
    reader = _write(model, tmp_path / "m.gguf", fmt.removeprefix("gguf_"))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    heads = {"q_proj": 4, "k_proj": 2}
    for key, module in model.named_modules():
        if not hasattr(module, "weight_quantizer"):
            continue
        expected = module.weight_quantizer(module.weight).detach()
        if key.rsplit(".", 1)[-1] in heads:
            expected = permute_rope(expected, heads[key.rsplit(".", 1)[-1]])
        t = tensors[names.get_name(key + ".weight", try_suffixes=(".weight",))]
        assert t.tensor_type == GGML[fmt]
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), expected.numpy()), key


def test_tiny_gguf_has_what_llama_cpp_needs(tmp_path):
    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB), QuantConfig(w_bits=4, weight_format="gguf_q4_0"))
    reader = _write(model, tmp_path / "m.gguf", "q4_0")
    field = {k: f.contents() for k, f in reader.fields.items()}
    cfg = model.config
    assert field["general.architecture"] == "llama"
    assert field["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    for key, value in [("block_count", cfg.num_hidden_layers), ("embedding_length", cfg.hidden_size),
                       ("feed_forward_length", cfg.intermediate_size), ("context_length", cfg.max_position_embeddings),
                       ("attention.head_count", cfg.num_attention_heads), ("vocab_size", TINY_VOCAB),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("rope.dimension_count", cfg.head_dim)]:
        assert field[f"llama.{key}"] == value, key
    assert field["tokenizer.ggml.model"] == "gpt2"
    assert len(field["tokenizer.ggml.tokens"]) == len(field["tokenizer.ggml.token_type"]) == TINY_VOCAB
    assert field["tokenizer.ggml.tokens"][3:5] == ["!", '"']  # the byte-level alphabet, in id order
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.eos_token_id"]) == (1, 2)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * cfg.num_hidden_layers + 1  # embeddings, output norm, output, blocks
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [cfg.intermediate_size, cfg.hidden_size]  # ne0 = in
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_reads_the_gguf_back_as_the_fake_quant_model(tmp_path, tie):
    """An independent GGUF reader (transformers, which undoes the q/k RoPE permutation) gives the
    fake-quant student's logits exactly when embeddings are F32."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(2, vocab_size=TINY_VOCAB, tie_word_embeddings=tie)
    quantize_model(model, QuantConfig(w_bits=4, weight_format="gguf_q4_0"))
    reader = _write(model, tmp_path / "m.gguf", "q4_0", embed_type="f32")
    assert ("output.weight" in {t.name for t in reader.tensors}) is not tie
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_failed_write_leaves_no_file(tmp_path):
    model = make_tiny_llama(0, vocab_size=TINY_VOCAB, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    quantize_model(model, QuantConfig(w_bits=4))
    with pytest.raises(ValueError, match="block"):
        write_gguf(model, make_byte_tokenizer(), tmp_path / "m.gguf", "q4_0")
    assert list(tmp_path.iterdir()) == []


def _tokenizer_with_a_merge():
    """The byte tokenizer plus one merge (h e): llama.cpp needs a non-empty merge list."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["he"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_llama_cpp_runs_the_tiny_gguf(tmp_path):
    """Optional (pip install llama-cpp-python): llama.cpp loads the file, tokenizes like HF, and its
    logits follow the fake-quant model (llama.cpp quantizes activations to 8 bits in Q4_0 matmuls)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB), QuantConfig(w_bits=4, weight_format="gguf_q4_0"))
    tok = _tokenizer_with_a_merge()
    path = write_gguf(model, tok, tmp_path / "m.gguf", "q4_0", embed_type="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(b"hello world", add_bos=False) == tok("hello world").input_ids
    ids = list(range(5, 25))
    llm.eval(ids)
    ours = torch.tensor(np.array(llm.scores[: len(ids)]))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    llm.close()
    assert torch.allclose(ours, expected, atol=0.05 * expected.abs().max().item())


# ---- export safety: our own files only, vocabulary = embedding rows, user's umask (issue 14) ----

def _q4_model(vocab=TINY_VOCAB):
    return quantize_model(make_tiny_llama(0, vocab_size=vocab), QuantConfig(w_bits=4, weight_format="gguf_q4_0"))


@pytest.mark.parametrize("content", [b"my own model, not yours\n", b""])
def test_write_gguf_never_replaces_a_file_it_did_not_write(tmp_path, content):
    other = tmp_path / "theirs.gguf"
    other.write_bytes(content)
    with pytest.raises(UserError, match="not written by llm-qat"):
        write_gguf(_q4_model(), make_byte_tokenizer(), other, "q4_0")
    assert other.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["theirs.gguf"]


def test_write_gguf_replaces_its_own_file_and_marks_it(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(_q4_model(), make_byte_tokenizer(), path, "q4_0")
    assert gguf.GGUFReader(path).fields[MARKER_KEY].contents() == MARKER
    first = path.read_bytes()
    write_gguf(_q4_model(), make_byte_tokenizer(), path, "q8_0")  # ours: replaced
    assert path.read_bytes() != first


def test_a_foreign_gguf_is_refused_too(tmp_path):
    """A real GGUF file without our marker (e.g. a downloaded model) is not ours to replace."""
    path = tmp_path / "downloaded.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("someone else's model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    before = path.read_bytes()
    with pytest.raises(UserError, match="choose another output"):
        write_gguf(_q4_model(), make_byte_tokenizer(), path, "q4_0")
    assert path.read_bytes() == before


def test_a_smaller_hf_vocabulary_is_padded_to_the_embedding_rows(tmp_path):
    reader = _write(_q4_model(vocab=300), tmp_path / "m.gguf", "q4_0")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == 300 and tokens[-1] == "[PAD299]" and types[-1] == gguf.TokenType.UNUSED


def test_a_larger_hf_vocabulary_than_the_embedding_is_refused(tmp_path):
    with pytest.raises(UserError, match="embedding only 200 rows"):
        _write(_q4_model(vocab=200), tmp_path / "m.gguf", "q4_0")  # 259 tokens, 200 rows: was truncated
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_from_with_another_vocabulary_size_is_refused(tmp_path):
    source = write_gguf(_q4_model(), make_byte_tokenizer(), tmp_path / "source.gguf", "q4_0")
    with pytest.raises(UserError, match=f"has {TINY_VOCAB} tokens, the model's embedding 300 rows"):
        write_gguf(_q4_model(vocab=300), None, tmp_path / "m.gguf", "q4_0", tokenizer_from=source)
    assert not (tmp_path / "m.gguf").exists()
    write_gguf(_q4_model(), None, tmp_path / "m.gguf", "q4_0", tokenizer_from=source)  # same size: fine


def test_gguf_gets_the_users_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = write_gguf(_q4_model(), make_byte_tokenizer(), tmp_path / "m.gguf", "q4_0")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
