"""Training an LSQ student: learned scales get their own AdamW group (scale_lr, no weight decay), move,
are checkpointed with the optimizer state, and kill + resume equals an uninterrupted run.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_train_lsq.py
"""

import pytest
import torch

from models import load_model, quantize_model
from quant.config import QuantConfig
from recipes.train import run
from tests.conftest import TINY_VOCAB, make_tiny_llama
from tests.recipes.test_train import _cfg, write_text_jsonl
from utils.train import loop
from utils.train.checkpoint import find_checkpoint
from utils.train.loop import param_groups, train_step

LSQ = ("w_quantizer=lsq", "w_bits=4", "w_granularity=per_group", "w_group_size=32")


@pytest.fixture
def setup(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    return tiny_model_dir, write_text_jsonl(tmp_path / "data.jsonl"), tmp_path


def _scales(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight_quantizer.scale")}


def test_scales_get_their_own_group_without_weight_decay(tmp_path):
    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB), QuantConfig(w_bits=4, w_quantizer="lsq"))
    cfg = _cfg("m", "d", tmp_path, "weight_decay=0.1", "scale_lr=5e-3")
    weights, scales = param_groups(cfg, model)
    assert len(scales["params"]) == 14 and scales["weight_decay"] == 0.0 and scales["lr"] == 5e-3
    assert len(weights["params"]) == len(list(model.parameters())) - 14 and "lr" not in weights


def test_minmax_student_keeps_one_group():
    model = quantize_model(make_tiny_llama(0, vocab_size=TINY_VOCAB), QuantConfig(w_bits=4))
    (group,) = param_groups(_cfg("m", "d", "o"), model)
    assert group["params"] == list(model.parameters())


def test_lsq_kill_and_resume_matches_uninterrupted(setup, monkeypatch):
    model, data, tmp = setup
    full = run(_cfg(model, data, tmp / "full", *LSQ, "scale_lr=1e-2"))
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(model, data, tmp / "killed", *LSQ, "scale_lr=1e-2", "save_steps=2"))
    assert find_checkpoint(tmp / "killed", "auto").name == "checkpoint-2"
    monkeypatch.undo()
    resumed = run(_cfg(model, data, tmp / "killed", *LSQ, "scale_lr=1e-2", "save_steps=2", "resume=auto"))
    assert resumed["steps_this_run"] == 2
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-6, abs=1e-9)
    a, _ = load_model(str(tmp / "full" / "student"))
    b, _ = load_model(str(tmp / "killed" / "student"))
    start = quantize_model(load_model(model)[0], a.llmqat_quant_config)
    assert _scales(a) and any(not torch.equal(v, _scales(start)[k]) for k, v in _scales(a).items())  # they learned
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7, msg=name)
