"""GPTQ's true-sequential order (quant/gptq.py): q/k/v, then o, then gate/up, then down per layer.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_gptq.py
"""

from __future__ import annotations

import torch

from quant.config import QuantConfig
from quant.gptq import gptq_model, sequential_groups
from tests.conftest import make_tiny_llama


def test_sequential_groups_follow_the_reference_order():
    model = make_tiny_llama()
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = [sorted(g) for g in sequential_groups(linears, true_sequential=True)]
    assert groups == [["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert sequential_groups(linears, true_sequential=False) == [linears]
    extra = {**linears, "mlp.extra_proj": torch.nn.Linear(4, 4)}  # outside the four groups: rounded last
    assert list(sequential_groups(extra, True)[-1]) == ["mlp.extra_proj"]


def _outlier_model():
    model = make_tiny_llama(0)
    with torch.no_grad():  # outlier channels give the inputs structure that error compensation can use
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 8.0
            layer.post_attention_layernorm.weight[7] = 6.0
    return model


def test_true_sequential_differs_from_one_pass_and_is_no_worse_on_held_out_tokens():
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(3, 256, (32, 64), generator=g), torch.randint(3, 256, (16, 64), generator=g)
    fp = _outlier_model()
    errors, weights = {}, {}
    for true_sequential in (True, False):
        model = _outlier_model()
        gptq_model(model, QuantConfig(w_bits=2), calib, block_size=32, batch_size=16, progress=False,
                   true_sequential=true_sequential)
        with torch.no_grad():
            errors[true_sequential] = (model(held).logits - fp(held).logits).pow(2).mean().item()
        weights[true_sequential] = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    assert not torch.equal(weights[True], weights[False])  # o_proj saw quantized q/k/v inputs
    assert errors[True] <= errors[False]
