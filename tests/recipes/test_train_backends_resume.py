"""Every distributed backend (DDP, FSDP2, DeepSpeed ZeRO-3; 2 CPU processes, gloo) with the two
features that carry extra state: an LSQ student (learned scales in their own optimizer group) trained
on cached teacher targets (teacher=cached, the teacher never loaded). Each run is killed like
`kill -9` at step 3, after checkpoint-2, resumed with resume=auto, and must end where the same
2-process run without the kill ends (loss and learned scales). That the 2-process run equals a
one-process run on the same samples is tests/recipes/test_train_distributed.py's check.

    PYTHONPATH=. .venv/bin/python -m pytest -q -m slow tests/recipes/test_train_backends_resume.py
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
from tests.recipes.test_train_cached import cached_data  # noqa: F401  (the fixture: tiny model + K=8 targets)

pytestmark = pytest.mark.slow  # multi-process (torchrun, gloo / DeepSpeed CPU)

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["max_steps=4", "save_steps=2", "model_max_length=16", "learning_rate=1e-3", "logging_steps=1",
        "loss_chunk_size=24", "teacher=cached", "data.pack=false", "quant.w_bits=4", "quant.a_bits=8",
        "quant.kv_bits=8", "w_quantizer=lsq", "w_granularity=per_group", "w_group_size=16", "scale_lr=1e-2"]


def _scales(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight_quantizer.scale")}


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_killed_and_resumed_run_ends_where_the_uninterrupted_run_ends(cached_data, backend):  # noqa: F811
    if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    model, data, tmp = cached_data
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "LLMQAT_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", "LLMQAT_TEST_DIE_AT": "3"}

    def args(out):
        return [f"model={model}", f"data.train={data}", f"output_dir={out}", f"backend={backend}", "nproc=2",
                "per_device_batch_size=1", *ARGS]

    def train(out, *extra):
        proc = subprocess.run(["sh", str(ROOT / "run_train.sh"), "4", "8", "8", *args(out), *extra],
                              env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads((out / "train_metrics.json").read_text()), load_model(str(out / "student"))[0]

    whole, whole_student = train(tmp / f"whole-{backend}")
    out = tmp / f"killed-{backend}"
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(ROOT / "tests" / "recipes" / "dying_train.py"), *args(out)],
                            env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode != 0 and not (out / "train_metrics.json").exists(), killed.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-3").exists()
    metrics, student = train(out, "resume=auto")
    assert metrics["world_size"] == 2 and metrics["teacher"] == "cached" and metrics["backend"] == backend
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps_this_run"] == 2
    assert metrics["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-5)
    assert student.llmqat_quant_config.w_quantizer == "lsq"
    mine, ref = _scales(student), _scales(whole_student)
    start = _scales(load_model(model, quant=student.llmqat_quant_config)[0])
    assert ref and mine.keys() == ref.keys() == start.keys()
    assert any(not torch.equal(ref[k], start[k]) for k in ref)  # the scales learned
    for name, s in ref.items():
        torch.testing.assert_close(mine[name], s, rtol=1e-5, atol=1e-7, msg=name)
