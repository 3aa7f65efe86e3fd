"""train.py / recipes.train on a tiny random Llama: a run_train.sh run whose artifacts reload, only the
student learns, kill + resume == uninterrupted, bad inputs fail before any compute.
Resume and provenance (refusing a changed config, a failed run or save losing nothing) are in
tests/recipes/test_train_resume.py.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_train.py
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_model
from recipes import train as trainer
from recipes.train import TrainConfig, build_models, run
from utils.config import ConfigError, load_config
from utils.data.merge import provenance_path
from utils.distributed import Runtime
from utils.io import write_json
from utils.provenance import data_fingerprint
from utils.train import loop
from utils.train.checkpoint import complete_checkpoints, find_checkpoint
from utils.train.distill import DistillStudent, KDLoss
from utils.train.loop import setup_training, train_step

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the quick brown fox jumps over a lazy dog while seven cats sleep in warm sun".split()


def write_text_jsonl(path, rows=40, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(16))}) + "\n")
    return str(path)


@pytest.fixture
def setup(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    data = write_text_jsonl(tmp_path / "data.jsonl")
    return tiny_model_dir, data, tmp_path


def _cfg(model, data, out, *extra):
    argv = [f"model={model}", f"data.train={data}", f"output_dir={out}", "model_max_length=32", "max_steps=4",
            "logging_steps=1", "learning_rate=1e-3", "loss_chunk_size=24", "per_device_batch_size=2", *extra]
    return load_config(TrainConfig, argv)


@pytest.mark.slow  # subprocesses
def test_run_train_sh_artifacts_reload(setup):
    model, data, tmp = setup
    out = tmp / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    cmd = ["sh", str(ROOT / "run_train.sh"), "4", "8", "8", f"model={model}", f"data.train={data}",
           f"output_dir={out}", "max_steps=3", "model_max_length=32", "save_steps=2", "backend=none", "nproc=1",
           "resume=auto", "learning_rate=1e-3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 3 and torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert "w_bits: 4" in (out / "train_config.yaml").read_text()
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]  # the last step too
    student, _ = load_model(str(out / "student"))
    assert student.llmqat_quant_config.tag() == "W4A8KV8"
    with torch.no_grad():
        assert torch.isfinite(student(torch.tensor([[5, 6, 7]])).logits).all()


def test_one_step_changes_only_student(setup):
    model, data, tmp = setup
    cfg = _cfg(model, data, tmp / "run")
    rt = Runtime(0, 1, 0, torch.device("cpu"), "none")
    student, teacher, _ = build_models(cfg, rt, torch.float32, torch.float32)
    wrapped = DistillStudent(student, KDLoss(chunk_size=cfg.loss_chunk_size))
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in wrapped.parameters()}
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    wrapped, optimizer, scheduler = setup_training(cfg, wrapped, rt)
    blocks = {"input_ids": torch.randint(3, 200, (4, 32)), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
    out = train_step(wrapped, teacher, optimizer, scheduler, blocks, cfg, 0, rt, autocast=False)
    assert out["loss"] > 0 and out["grad_norm"] > 0
    assert all(torch.equal(v, before_t[k]) for k, v in teacher.state_dict().items())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before_s[k])]
    assert any("layers.0.self_attn.q_proj" in k for k in changed)
    assert all(p.grad is None for p in teacher.parameters())


def test_kill_and_resume_matches_uninterrupted(setup, monkeypatch):
    model, data, tmp = setup
    full = run(_cfg(model, data, tmp / "full"))
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4, after checkpoint-2 (and step 3) were done
            raise KeyboardInterrupt
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(model, data, tmp / "killed", "save_steps=2"))
    assert find_checkpoint(tmp / "killed", "auto").name == "checkpoint-2"
    resumed = run(_cfg(model, data, tmp / "killed", "save_steps=2", "resume=auto"))
    assert resumed["steps_this_run"] == 2
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=1e-6, abs=1e-9)
    a, _ = load_model(str(tmp / "full" / "student"))
    b, _ = load_model(str(tmp / "killed" / "student"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7, msg=name)


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    (tmp_path / "checkpoint-8").mkdir()  # no trainer_state.json: half written
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path, "auto").name == "checkpoint-4"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-8"))


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the input check")

    monkeypatch.setattr(trainer, "load_model", fail)


@pytest.mark.parametrize("case, error, match", [
    ("missing_data", FileNotFoundError, "training data not found"),
    ("empty_data", ValueError, "empty"),
    ("missing_model", FileNotFoundError, "model not found"),
    ("world_size", ValueError, "WORLD_SIZE=1"),
    ("context", ValueError, r"model_max_length=512 exceeds the model's context \(max_position_embeddings=256\)"),
    ("other_tokenizer", ValueError, r"tokenizer tok:0123456789abcdef .* student's tokenizer is tok:"),
    ("cuda", ValueError, "device=cuda but torch sees no CUDA GPU"),
])
def test_bad_inputs_fail_before_compute(setup, no_model_load, case, error, match):
    model, data, tmp = setup
    if case == "missing_data":
        data = str(tmp / "nope.jsonl")
    elif case == "empty_data":
        data = str(tmp / "empty.jsonl")
        Path(data).write_text("")
    elif case == "missing_model":
        model = str(tmp / "no-such-model")
    elif case == "other_tokenizer":  # a merged file whose provenance names another tokenizer
        write_json(provenance_path(data), {"tokenizer": "tok:0123456789abcdef", "output": data_fingerprint(data)})
    elif case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    extra = {"world_size": ["backend=fsdp", "nproc=2"], "context": ["model_max_length=512"],
             "cuda": ["device=cuda"]}.get(case, [])
    with pytest.raises(error, match=match):
        run(_cfg(model, data, tmp / "run", *extra))


@pytest.mark.parametrize("argv, match", [
    (["w_bits=9"], "w_bits=9"), (["nproc=2"], "backend=none"), (["backend=zero"], "backend"),
    (["kd_reduction=sum"], "reduction"), (["max_steps=0"], "max_steps"),
    (["max_grad_norm=-1"], r"max_grad_norm=-1.0: must be >= 0 \(0 or null: no clipping\)"),
    (["save_total_limit=-1"], r"save_total_limit=-1: must be >= 1 \(0 or null: keep every"),
    (["warmup_steps=-5"], "warmup_steps=-5"), (["min_lr_ratio=5"], r"min_lr_ratio=5.0: must be in \[0, 1\]"),
    (["logging_steps=0"], "logging_steps=0"), (["eval_steps=-1"], "eval_steps=-1"), (["save_steps=-2"], "save_steps"),
    (["learning_rate=0"], "learning_rate=0.0: must be > 0"), (["learning_rate=nan"], "learning_rate"),
    (["weight_decay=-0.1"], "weight_decay"), (["device=tpu"], "device='tpu'"),
    (["attn_implementation=fast"], "attn_implementation='fast'"), (["data.val_fraction=1"], "val_fraction"),
])
def test_bad_config_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, argv)


@pytest.mark.parametrize("argv", [["max_grad_norm=0"], ["max_grad_norm=null"], ["save_total_limit=0"],
                                  ["save_total_limit=null"], ["attn_implementation=eager"],
                                  ["attn_implementation=sdpa"], ["min_lr_ratio=1"], ["warmup_steps=0"]])
def test_boundary_values_are_valid(argv):
    load_config(TrainConfig, argv)


def _one_step(cfg, blocks):
    rt = Runtime(0, 1, 0, torch.device("cpu"), "none")
    student, teacher, _ = build_models(cfg, rt, torch.float32, torch.float32)
    wrapped, optimizer, scheduler = setup_training(cfg, DistillStudent(student, KDLoss(chunk_size=24)), rt)
    out = train_step(wrapped, teacher, optimizer, scheduler, blocks, cfg, 0, rt, autocast=False)
    return out, student


def test_max_grad_norm_zero_means_no_clipping(setup):
    """HF's meaning: 0 does not clip (before: every gradient times 0, and the student stayed RTN)."""
    model, data, tmp = setup
    blocks = {"input_ids": torch.randint(3, 200, (4, 32)), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
    start, _ = load_model(model)
    results = {limit: _one_step(_cfg(model, data, tmp / "run", f"max_grad_norm={limit}"), blocks)
               for limit in ("0", "null", "1e9")}
    (out0, s0), (_, s_none), (_, s_big) = results.values()
    assert out0["grad_norm"] > 0
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(s0.state_dict()[q_proj], start.state_dict()[q_proj])  # it learned
    for name, value in s0.state_dict().items():
        assert torch.equal(value, s_big.state_dict()[name]) and torch.equal(value, s_none.state_dict()[name]), name


def test_attn_implementation_reaches_student_and_teacher(setup):
    model, data, tmp = setup
    cfg = _cfg(model, data, tmp / "run", "attn_implementation=eager")
    student, teacher, _ = build_models(cfg, Runtime(0, 1, 0, torch.device("cpu"), "none"), torch.float32,
                                       torch.float32)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"


def test_malformed_line_names_file_and_line(setup):
    model, data, tmp = setup
    with open(data, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"data.jsonl:41"):
        run(_cfg(model, data, tmp / "run"))
