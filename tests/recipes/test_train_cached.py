"""train.py teacher=cached on data a tiny random Llama generated with teacher_topk: the teacher is never
loaded, train_metrics.json says "teacher": "cached", the student reloads, kill-free resume equals an
uninterrupted run, bad combinations fail before compute, and (slow) a 2-process FSDP2 run matches
the one-process run.

    PYTHONPATH=. python -m pytest -q -m "slow or not slow" tests/recipes/test_train_cached.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_model
from quant.errors import InputFileError, UserError
from recipes import train as trainer
from recipes.generate import GenerateConfig
from recipes.generate import run as generate
from recipes.merge import MergeConfig, merge
from recipes.train import TrainConfig, run
from utils.config import load_config
from utils.train import loop
from utils.train.loop import train_step

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["max_steps=3", "model_max_length=16", "learning_rate=1e-3", "logging_steps=1", "loss_chunk_size=24",
          "teacher=cached", "data.pack=false"]


@pytest.fixture(scope="module")
def cached_data(tmp_path_factory):
    """(model dir, merged data with K=8 targets; documents up to 20 tokens, so some are truncated)."""
    from tests.conftest import save_tiny_model_dir

    tmp = tmp_path_factory.mktemp("cached")
    model = save_tiny_model_dir(tmp / "tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(load_config(GenerateConfig, [f"model={model}", "n_vocab=6", "max_length=20", "batch_size=4",
                                              "teacher_topk=8", f"out_dir={tmp / 'gen'}", "shard=0"], None))
    finally:
        torch.set_num_threads(threads)
    merge(MergeConfig(in_dir=str(tmp / "gen")))
    return model, str(tmp / "gen" / "all_gen.jsonl"), tmp


def _cfg(model, data, out, *extra):
    return load_config(TrainConfig, [f"model={model}", f"data.train={data}", f"output_dir={out}",
                                     "per_device_batch_size=2", *COMMON, *extra])


def test_cached_run_never_loads_the_teacher_and_says_so(cached_data, monkeypatch):
    model, data, tmp = cached_data
    loads = []
    real = trainer.load_model
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append(k.get("quant")) or real(*a, **k))
    metrics = run(_cfg(model, data, tmp / "run"))
    assert len(loads) == 1 and loads[0] is not None  # the student only
    assert metrics["teacher"] == "cached" and torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert json.loads((tmp / "run" / "train_metrics.json").read_text())["teacher"] == "cached"
    assert metrics["train_blocks"] + metrics["val_blocks"] == 18  # one block per document
    student, _ = load_model(str(tmp / "run" / "student"))
    assert student.llmqat_quant_config.tag() == "W4A8KV8"


def test_kill_and_resume_matches_the_uninterrupted_run(cached_data, monkeypatch):
    model, data, tmp = cached_data
    whole = run(_cfg(model, data, tmp / "whole", "max_steps=4"))
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed during step 4, after checkpoint-2
            raise KeyboardInterrupt
        return train_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(model, data, tmp / "killed", "max_steps=4", "save_steps=2"))
    resumed = run(_cfg(model, data, tmp / "killed", "max_steps=4", "save_steps=2", "resume=auto"))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["steps_this_run"] == 2
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("extra,match", [(["data.pack=true"], "data.pack=false"),
                                         (["kd_temperature=2.0"], "kd_temperature=1.0"),
                                         (["data.text_bos=true"], "data.text_bos=false"),
                                         (["teacher=offline"], "teacher")])
def test_bad_combinations_are_refused(cached_data, extra, match):
    model, data, tmp = cached_data
    with pytest.raises(UserError, match=match):
        _cfg(model, data, tmp / "bad", *extra)


def test_data_without_targets_is_refused_before_compute(cached_data, tmp_path):
    model, data, _ = cached_data
    plain = tmp_path / "plain.jsonl"
    plain.write_text(Path(data).read_text())
    with pytest.raises(InputFileError, match="teacher_topk"):
        trainer.check_inputs(_cfg(model, plain, tmp_path / "out"))


@pytest.mark.slow  # multi-process (torchrun, gloo)
def test_two_process_fsdp_matches_one_process(cached_data):
    model, data, tmp = cached_data
    single = run(_cfg(model, data, tmp / "single"))
    out = tmp / "fsdp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "LLMQAT_NO_PROGRESS": "1"}
    cmd = ["sh", str(ROOT / "run_train.sh"), "4", "8", "8", f"model={model}", f"data.train={data}",
           f"output_dir={out}", "backend=fsdp", "nproc=2", "per_device_batch_size=1", *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["teacher"] == "cached"
    assert metrics["final_loss"] == pytest.approx(single["final_loss"], rel=1e-3)
