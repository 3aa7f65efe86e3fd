"""Resume and provenance of recipes.train on a tiny random Llama: a checkpoint made with another config
or other inputs is refused (naming the keys) and its evidence kept, a failed run never rewrites
train_config.yaml, the last step is always checkpointed so a failed student save loses nothing, and
the student / metrics / checkpoints record what made them.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_train_resume.py
"""

import json

import pytest
import torch

from models import load_model
from quant.errors import UserError
from recipes import train as trainer
from recipes.train import is_trained, run
from tests.recipes.test_train import _cfg, write_text_jsonl
from utils.provenance import data_fingerprint
from utils.train import checkpoint, loop
from utils.train.checkpoint import complete_checkpoints

NO_LOAD = AssertionError("a model was loaded before the resume check")


@pytest.fixture
def trained(tmp_path, tiny_model_dir, monkeypatch):
    """A finished 4-step run with save_steps=2: (model, data, output dir, metrics)."""
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    data = write_text_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    return tiny_model_dir, data, out, run(_cfg(tiny_model_dir, data, out, "save_steps=2"))


def _evidence(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.yaml")) + sorted(out.rglob("*.json"))
            if p.is_file()}


def test_run_records_provenance_everywhere(trained):
    model, data, out, metrics = trained
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    prov = metrics["provenance"]
    assert prov["inputs"]["data"] == data_fingerprint(data) and prov["inputs"]["model"].startswith("files:")
    assert prov["tokenizer"].startswith("tok:") and prov["config"]["max_steps"] == 4
    assert json.loads((out / "train_metrics.json").read_text())["provenance"] == prov
    assert json.loads((out / "student" / "llmqat_meta.json").read_text())["provenance"] == prov
    ckpt = out / "checkpoint-4"
    assert json.loads((ckpt / "provenance.json").read_text()) == prov
    assert "max_steps: 4" in (ckpt / "train_config.yaml").read_text()
    cfg = _cfg(model, data, out, "save_steps=2")
    assert is_trained(cfg) and not is_trained(_cfg(model, data, out, "save_steps=2", "learning_rate=2e-3"))
    with open(data, "a") as f:
        f.write(json.dumps({"text": "new words"}) + "\n")
    assert not is_trained(cfg)  # same file name, other content


@pytest.mark.parametrize("change, match", [
    (["learning_rate=2e-3"], r"learning_rate: 0\.001 -> 0\.002"),
    (["quant.w_bits=2"], r"quant\.w_bits: 4 -> 2"),
    (["kd_temperature=2", "seed=1"], r"kd_temperature: 1\.0 -> 2\.0, seed: 42 -> 1"),
    (["data"], r"inputs\.data: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"),
    (["max_steps=3"], r"at step 4, past max_steps=3"),
])
def test_resume_with_another_config_is_refused_and_keeps_the_evidence(trained, monkeypatch, change, match):
    model, data, out, _ = trained
    if change == ["data"]:
        with open(data, "a") as f:
            f.write(json.dumps({"text": "new words"}) + "\n")
        change = []
    before = _evidence(out)
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: (_ for _ in ()).throw(NO_LOAD))
    with pytest.raises(UserError, match=match):
        run(_cfg(model, data, out, "save_steps=2", "resume=auto", *change))
    with pytest.raises(UserError, match=match):
        run(_cfg(model, data, out, "save_steps=2", f"resume={out / 'checkpoint-4'}", *change))
    assert _evidence(out) == before


def test_resume_may_extend_and_change_logging(trained):
    model, data, out, first = trained
    again = run(_cfg(model, data, out, "save_steps=2", "resume=auto"))  # at max_steps already: no step to run
    assert again["steps_this_run"] == 0 and again["final_loss"] == first["final_loss"]
    more = run(_cfg(model, data, out, "resume=auto", "max_steps=6", "logging_steps=2", "save_steps=0",
                    "save_total_limit=null", "loss_chunk_size=8"))
    assert more["steps_this_run"] == 2 and torch.isfinite(torch.tensor(more["final_loss"]))
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_failed_run_leaves_train_config_and_metrics_alone(trained, monkeypatch):
    model, data, out, _ = trained
    before = {name: (out / name).read_text() for name in ("train_config.yaml", "train_metrics.json")}

    def dying_step(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(model, data, out, "learning_rate=5e-3"))
    assert {name: (out / name).read_text() for name in before} == before


def test_a_failed_student_save_loses_nothing(trained, monkeypatch, tmp_path):
    model, data, _, full = trained
    out = tmp_path / "failing"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_model", full_disk)
    with pytest.raises(OSError):
        run(_cfg(model, data, out, "save_steps=2"))
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()  # the last step, before the student
    assert not (out / "train_config.yaml").exists()
    monkeypatch.undo()
    resumed = run(_cfg(model, data, out, "save_steps=2", "resume=auto"))
    assert resumed["steps_this_run"] == 0 and resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-6)
    a, _ = load_model(str(out.parent / "run" / "student"))
    b, _ = load_model(str(out / "student"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoints_without_provenance_are_not_resumed_blindly(trained, monkeypatch):
    model, data, out, _ = trained
    for ckpt in complete_checkpoints(out):
        (ckpt / "provenance.json").unlink()
    with pytest.raises(UserError, match="records no training config"):
        run(_cfg(model, data, out, "save_steps=2", "resume=auto"))
