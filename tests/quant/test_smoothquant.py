"""SmoothQuant (quant/smoothquant.py): the published Llama groups by default, the down_proj variant
as an option, full-precision outputs unchanged.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_smoothquant.py
"""

from __future__ import annotations

import pytest
import torch

from quant.smoothquant import activation_absmax, smooth_model, smoothed_tensors
from tests.conftest import make_tiny_llama

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _outlier_model():
    model = make_tiny_llama()
    with torch.no_grad():  # outlier channels, as in real LLM activations
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[7] = 20.0
    return model


def _changed(before: dict, model) -> set:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p)}


@pytest.mark.parametrize("smooth_down", [False, True])
def test_default_smooths_qkv_and_gate_up_inputs_and_down_only_when_asked(smooth_down):
    model = _outlier_model()
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(ids).logits
        kwargs = {"smooth_down": True} if smooth_down else {}  # the default must be the published recipe
        smooth_model(model, activation_absmax(model, ids), alpha=0.8, **kwargs)
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
    smoothed = {"input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"} | ({"mlp.down_proj"} if smooth_down else set())
    expected = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in smoothed}
    assert _changed(before, model) == expected  # o_proj, embeddings, lm_head, final norm untouched


def test_smoothed_tensors_are_exactly_what_smoothing_writes():
    for smooth_down in (False, True):
        model = _outlier_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            smooth_model(model, activation_absmax(model, ids), 0.5, smooth_down)
        written = {t.data_ptr() for t in smoothed_tensors(model, smooth_down)}
        params = {p.data_ptr(): n for n, p in model.named_parameters()}
        assert {params[i] for i in written} == _changed(before, model)
