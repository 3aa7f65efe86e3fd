"""2-process CPU (gloo) runs of run_train.sh with DDP, FSDP2 and DeepSpeed ZeRO-3 on a tiny random Llama.

Each run trains 3 steps with a checkpoint, saves a reloadable student, and matches a one-process run
that sees the same samples (2 processes x batch 1 == 1 process x batch 2).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_train_distributed.py
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_model
from recipes.train import TrainConfig, run
from tests.recipes.test_train import write_text_jsonl
from utils.config import load_config

pytestmark = pytest.mark.slow  # multi-process (torchrun, gloo / DeepSpeed CPU)

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["max_steps=3", "model_max_length=32", "learning_rate=1e-3", "logging_steps=1", "loss_chunk_size=24"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Model dir, data file, and the one-process run's final loss and student."""
    from tests.conftest import save_tiny_model_dir

    tmp = tmp_path_factory.mktemp("dist")
    model, data = save_tiny_model_dir(tmp / "tiny"), write_text_jsonl(tmp / "data.jsonl")
    argv = [f"model={model}", f"data.train={data}", f"output_dir={tmp / 'single'}", "per_device_batch_size=2",
            f"data.cache_dir={tmp / 'cache'}", *COMMON]
    metrics = run(load_config(TrainConfig, argv))
    return model, data, tmp, metrics


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_two_process_run_saves_reloadable_student(reference, backend):
    if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    model, data, tmp, single = reference
    out = tmp / backend
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "LLMQAT_NO_PROGRESS": "1"}
    cmd = ["sh", str(ROOT / "run_train.sh"), "4", "8", "8", f"model={model}", f"data.train={data}",
           f"output_dir={out}", f"backend={backend}", "nproc=2", "save_steps=2", f"data.cache_dir={tmp / 'cache'}",
           *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert metrics["final_loss"] == pytest.approx(single["final_loss"], rel=1e-3)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    dist_student, _ = load_model(str(out / "student"))
    one_student, _ = load_model(str(tmp / "single" / "student"))
    assert dist_student.llmqat_quant_config.tag() == "W4A8KV8"
    for (name, x), y in zip(one_student.state_dict().items(), dist_student.state_dict().values()):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_one_process_fsdp_and_ddp_start_their_own_process_group(reference, backend):
    """`train.py backend=fsdp nproc=1` without torchrun (one GPU, or a CPU) used to fail with
    "RANK expected": setup_runtime now starts a one-process group itself."""
    model, data, tmp, single = reference
    out = tmp / f"{backend}-1"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), LLMQAT_NO_PROGRESS="1")
    cmd = [sys.executable, str(ROOT / "train.py"), f"model={model}", f"data.train={data}", f"output_dir={out}",
           f"backend={backend}", "nproc=1", "per_device_batch_size=2", f"data.cache_dir={tmp / 'cache'}", *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["final_loss"] == pytest.approx(single["final_loss"], rel=1e-4)
