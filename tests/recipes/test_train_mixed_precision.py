"""2-process CPU (gloo) runs of run_train.sh in bf16: FSDP2 with its mixed-precision policy
(utils/distributed.py `fsdp_mp_policy`) and DeepSpeed's bf16 mode, on a tiny random Llama.

    PYTHONPATH=. .venv/bin/python -m pytest -q -m slow tests/recipes/test_train_mixed_precision.py
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from recipes.train import TrainConfig, run
from tests.recipes.test_train import write_text_jsonl
from tests.recipes.test_train_distributed import COMMON, ROOT
from utils.config import load_config

pytestmark = pytest.mark.slow  # multi-process (torchrun, gloo / DeepSpeed CPU)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Model dir, data file, and a one-process bf16-autocast run's metrics (batch 2 = 2 x 1)."""
    from tests.conftest import save_tiny_model_dir

    tmp = tmp_path_factory.mktemp("mixed")
    model, data = save_tiny_model_dir(tmp / "tiny"), write_text_jsonl(tmp / "data.jsonl")
    argv = [f"model={model}", f"data.train={data}", f"output_dir={tmp / 'single'}", "per_device_batch_size=2",
            f"data.cache_dir={tmp / 'cache'}", "precision=bf16_autocast", *COMMON]
    return model, data, tmp, run(load_config(TrainConfig, argv))


@pytest.mark.parametrize("backend, precision", [("fsdp", "bf16_autocast"), ("fsdp", "bf16"),
                                                ("deepspeed", "bf16_autocast")])
def test_two_process_bf16_run(reference, backend, precision):
    if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    model, data, tmp, single = reference
    out = tmp / f"{backend}-{precision}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "LLMQAT_NO_PROGRESS": "1"}
    cmd = ["sh", str(ROOT / "run_train.sh"), "4", "8", "8", f"model={model}", f"data.train={data}",
           f"output_dir={out}", f"backend={backend}", "nproc=2", f"precision={precision}",
           f"data.cache_dir={tmp / 'cache'}", *COMMON]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and math.isfinite(metrics["final_loss"])
    if (backend, precision) == ("fsdp", "bf16_autocast"):  # fp32 weights, fp32 reduction: the 1-process run
        assert metrics["final_loss"] == pytest.approx(single["final_loss"], rel=2e-2)
