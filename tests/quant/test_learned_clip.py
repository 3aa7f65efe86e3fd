"""Learned clip ratios of activation and K/V quantizers (quant.a_clip / kv_clip = learned; quant/lsq.py
`clipped_fake_quantize`): MinMax at ratio 1, autograd gradients against a closed form, the ratio in
its optimizer group, saved and reloaded with the student, refused by export.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/quant/test_learned_clip.py
"""

from __future__ import annotations

import pytest
import torch

from models import load_model, save_model
from quant.config import QuantConfig
from quant.errors import UserError
from quant.fake_quant import apply_spec
from quant.lsq import clipped_fake_quantize
from quant.quantizer import FakeQuantizer
from recipes.export import check_student
from tests.conftest import save_tiny_model_dir
from utils.train.loop import is_scale_param


def test_ratio_one_is_minmax_and_a_smaller_ratio_clips():
    spec = QuantConfig(a_bits=4, a_clip="learned").act_spec()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clipped_fake_quantize(x, torch.ones(1), spec),
                               apply_spec(x, QuantConfig(a_bits=4).act_spec()), rtol=1e-6, atol=1e-6)
    half = clipped_fake_quantize(x, torch.tensor([0.5]), spec)
    assert torch.allclose(half.abs().amax(-1), x.abs().amax(-1) * 0.5)  # the largest values clamp to the clip


def test_gradients_match_the_closed_form():
    spec = QuantConfig(a_bits=3, a_clip="learned").act_spec()  # qmax 3
    x = torch.tensor([[0.5, -1.0, 2.0, 4.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([0.75], dtype=torch.float64, requires_grad=True)
    y = clipped_fake_quantize(x, c, spec)  # s = 0.75 * 4 / 3 = 1: v = x, clamped at 3
    assert y.tolist() == [[0.0, -1.0, 2.0, 3.0]]  # round(0.5) = 0 (half to even)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    y.backward(g)
    assert x.grad.tolist() == [[1.0, 2.0, 3.0, 0.0]]  # straight through inside, 0 where clamped
    # dL/ds = sum g (q - v inside) = 1 (0 - 0.5) + 2 (-1 + 1) + 3 (2 - 2) + 4 * 3 = 11.5; ds/dc = 4 / 3
    assert c.grad.item() == pytest.approx(11.5 * 4 / 3, rel=1e-12)


def test_quantizers_hold_a_ratio_only_when_asked():
    on = FakeQuantizer(QuantConfig(a_bits=8, a_clip="learned").act_spec())
    assert isinstance(on.clip, torch.nn.Parameter) and on.clip.tolist() == [1.0]
    assert getattr(FakeQuantizer(QuantConfig(a_bits=8).act_spec()), "clip", None) is None
    assert getattr(FakeQuantizer(QuantConfig(a_clip="learned").act_spec()), "clip", None) is None  # 16 bits: off


def test_student_trains_saves_and_reloads_its_ratios(tmp_path):
    qcfg = QuantConfig(w_bits=4, a_bits=4, kv_bits=4, a_clip="learned", kv_clip="learned")
    model, tok = load_model(save_tiny_model_dir(tmp_path / "base"), quant=qcfg)
    ratios = {n: p for n, p in model.named_parameters() if is_scale_param(n)}
    assert any("k_proj.output_quantizer.clip" in n or "k_quantizer.clip" in n for n in ratios) and any("act_quantizer.clip" in n for n in ratios)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ratios.values())
    with torch.no_grad():
        for i, p in enumerate(ratios.values()):
            p.fill_(0.9 - 0.01 * (i % 7))
    save_model(model, tok, tmp_path / "student")
    loaded, _ = load_model(str(tmp_path / "student"))
    assert loaded.llmqat_quant_config.a_clip == "learned"
    for n, p in loaded.named_parameters():
        if is_scale_param(n):
            assert torch.equal(p, ratios[n]), n
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="clip ratios"):
        check_student(str(tmp_path / "student"), "packed")


@pytest.mark.parametrize("kw, match", [(dict(a_clip="pact"), "unknown a_clip"),
                                       (dict(a_bits=8, a_symmetric=False, a_clip="learned"), "a_symmetric=True"),
                                       (dict(kv_bits=8, kv_symmetric=False, kv_clip="learned"), "kv_symmetric=True")])
def test_bad_clip_settings_fail_at_config_time(kw, match):
    with pytest.raises(UserError, match=match):
        QuantConfig(**kw)
