"""Shared fixtures: a tiny random Llama (2 layers, hidden 64, GQA 4/2 heads, vocab 256) on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LLMQAT_NO_PROGRESS", "1")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def data_dir():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def make_byte_tokenizer():
    """A real byte-level BPE tokenizer with no merges: ids 0..2 special, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


TINY_VOCAB = 272  # 3 specials + 256 bytes, rounded up


def save_tiny_model_dir(path, seed: int = 0, **overrides):
    """A tiny random Llama + byte tokenizer saved as a HF folder; returns the path as str."""
    model = make_tiny_llama(seed, vocab_size=TINY_VOCAB, pad_token_id=0, **overrides)
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model_dir(tmp_path / "tiny-llama")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (records generated with several threads can differ in rounding)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
