"""A stored-scale student (lsq / ternary / mse) saves and reloads with its scales: same logits.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/models/test_lsq_student.py
"""

from __future__ import annotations

import json

import pytest
import torch

import models
from quant.config import QuantConfig
from quant.errors import UserError
from tests.conftest import save_tiny_model_dir
from tests.quant.test_lsq_export import CONFIGS


def _scales(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight_quantizer.scale")}


@pytest.mark.parametrize("name", ["lsq_w4_channel", "ternary_group32", "lsq_gguf_q4_0", "minmax_w4_mse"])
def test_saved_student_reloads_its_scales_and_logits(tmp_path, name):
    model, tok = models.load_model(save_tiny_model_dir(tmp_path / "base"))
    qcfg = QuantConfig(**CONFIGS[name], a_bits=8, kv_bits=8)
    models.quantize_model(model, qcfg)
    with torch.no_grad():
        for scale in _scales(model).values():
            scale.mul_(1.17)  # as training moves them: the reload must not re-initialise from the weights
    x = tok("learned scales", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(x).logits
    out = models.save_model(model, tok, tmp_path / "student")
    saved = json.loads((out / "quant_config.json").read_text())
    assert saved["w_quantizer"] == qcfg.w_quantizer and saved["w_init"] == qcfg.w_init
    again, _ = models.load_model(str(out))
    assert _scales(again).keys() == _scales(model).keys() and _scales(again)
    for key, value in _scales(model).items():
        assert torch.equal(_scales(again)[key], value), key
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref)


def test_a_folder_missing_its_scales_is_refused(tmp_path):
    model, tok = models.load_model(save_tiny_model_dir(tmp_path / "base"))
    plain = models.save_model(model, tok, tmp_path / "plain")
    (plain / "quant_config.json").write_text(json.dumps(QuantConfig(w_bits=4, w_quantizer="lsq").to_dict()))
    with pytest.raises(UserError, match="lacks 14 stored weight scales"):
        models.load_model(str(plain))
