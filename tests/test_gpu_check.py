"""scripts/gpu_check.sh in its CPU mode (tiny random Llama): exit 0 and the full report; and the
step runner's statuses (a failing step never stops the report).

    PYTHONPATH=. .venv/bin/python -m pytest -q -m "slow or not slow" tests/test_gpu_check.py
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

STEPS = ["tests", "generation", "train_step", "evaluation", "fsdp", "export", "vllm"]


def _data_dir():
    value = os.environ.get("LLMQAT_DATA_DIR") or (str(SHARED_DATA) if SHARED_DATA.is_dir() else "")
    return value if value and os.path.isdir(value) else ""


@pytest.mark.slow  # about a minute: a pytest and a torchrun subprocess, seven steps
def test_cpu_mode_writes_the_full_report_and_exits_0(tmp_path):
    out, data = tmp_path / "report.json", _data_dir()
    env = {k: v for k, v in os.environ.items() if k != "LLMQAT_DATA_DIR"}
    env.update(LLMQAT_CACHE=str(tmp_path / "cache"), PYTHON=sys.executable)
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), f"output={out}", *([f"data_dir={data}"] if data else [])]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["scale"] == "tiny" and report["status"] == "ok"
    assert {"torch", "transformers", "cuda", "gpus", "model", "command", "scale_settings", "wall_s"} <= set(report)
    assert list(report["steps"]) == STEPS
    steps = report["steps"]
    assert steps["tests"]["status"].startswith("skipped: all") and steps["tests"]["counts"]["skipped"] > 0
    expected_ok = ["generation", "train_step", "fsdp", "export"] + (["evaluation"] if data else [])
    for name in expected_ok:
        assert steps[name]["status"] == "ok", (name, steps[name])
        assert steps[name]["settings"] and steps[name]["wall_s"] >= 0
        assert all(set(m) == {"value", "unit"} for m in steps[name]["measurements"].values())
    if not data:
        assert steps["evaluation"]["status"].startswith("skipped: no evaluation data")
    assert steps["generation"]["measurements"]["speedup"]["value"] > 0
    assert steps["fsdp"]["measurements"]["world_size"]["value"] == 1
    assert steps["export"]["measurements"]["gguf_q4_0_bytes"]["value"] > 0
    assert steps["vllm"]["status"] == "skipped: vLLM needs a GPU"


def _ctx(tmp_path):
    return gpu_check.Context(gpu_check.torch.device("cpu"), "tiny", gpu_check.SCALES["tiny"], "unused", tmp_path, 10,
                             "unused")


def test_a_failing_step_is_reported_not_raised(tmp_path):
    def broken(ctx):
        raise ZeroDivisionError("boom")

    result = gpu_check.run_step(broken, _ctx(tmp_path))
    assert result["status"] == "failed: ZeroDivisionError: boom" and "wall_s" in result


def test_a_step_that_cannot_run_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMQAT_DATA_DIR", raising=False)
    result = gpu_check.run_step(gpu_check.step_evaluation, _ctx(tmp_path))
    assert result["status"] == "skipped: no evaluation data: set LLMQAT_DATA_DIR or data_dir="


def test_a_step_failure_keeps_what_it_measured(tmp_path):
    def partial(ctx):
        raise gpu_check.StepFailed("exit code 1", {"settings": {"nproc": 2}}, "log")

    result = gpu_check.run_step(partial, _ctx(tmp_path))
    assert result["status"] == "failed: exit code 1" and result["settings"] == {"nproc": 2}


def test_unknown_options_are_refused():
    with pytest.raises(SystemExit, match="unknown option"):
        gpu_check.parse_options(["outptu=x.json"])
    assert gpu_check.parse_options(["output=x.json"])["output"] == "x.json"


def test_single_process_fsdp_goes_through_torchrun():
    """run_train.sh starts train.py without a process group for one process, which fully_shard needs."""
    assert gpu_check.fsdp_command(1, ["backend=fsdp"])[1:3] == ["-m", "torch.distributed.run"]
    assert gpu_check.fsdp_command(2, ["backend=fsdp"])[1].endswith("run_train.sh")


def test_measurements_keep_integers_and_six_significant_digits():
    assert gpu_check.measure(3, "processes") == {"value": 3, "unit": "processes"}
    assert gpu_check.measure(0.000123456789, "KD loss")["value"] == 0.000123457
