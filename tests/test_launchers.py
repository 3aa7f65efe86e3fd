"""The launchers without a GPU or a cluster: run_generate.sh's one-process-per-GPU lanes (a fake
`nvidia-smi` and a fake python that records what it was started with), run_train.sh's dry-run launch
commands for torchrun, srun and deepspeed, and the Slurm rank variables.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_launchers.py
"""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from recipes.generate import resolve_shard
from utils.distributed import Ranks, process_ranks

ROOT = Path(__file__).resolve().parent.parent
CLEAN = ("CUDA_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC", "NPROC_CPU", "NNODES", "LAUNCHER",
         "DRY_RUN", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "HOSTFILE", "SHARD_OFFSET")

# A stand-in for python: `generate_data.py SHARD ...` writes {shard, device, argv, start, end} to
# $RECORD_DIR/SHARD.json after sleeping $STUB_SLEEP s, and fails (exit 3) for shard $FAIL_SHARD;
# `train.py --launch-plan ...` prints $STUB_PLAN (what the real train.py prints: "BACKEND NPROC").
FAKE_PYTHON = """#!/usr/bin/env python3
import json, os, sys, time
if sys.argv[1] == "train.py" and "--launch-plan" in sys.argv:
    print(os.environ["STUB_PLAN"]); sys.exit(0)
shard, start = sys.argv[2], time.time()
time.sleep(float(os.environ.get("STUB_SLEEP", "0.4")))
record = {"shard": int(shard), "device": os.environ.get("CUDA_VISIBLE_DEVICES"), "argv": sys.argv[3:],
          "start": start, "end": time.time()}
open(os.path.join(os.environ["RECORD_DIR"], shard + ".json"), "w").write(json.dumps(record))
sys.exit(3 if shard == os.environ.get("FAIL_SHARD") else 0)
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
i=0; while [ $i -lt $FAKE_GPUS ]; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; i=$((i+1)); done
"""


def _executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture
def stubs(tmp_path):
    """(env, record dir): a fake python as $PYTHON and a fake nvidia-smi on PATH."""
    bin_dir, records = tmp_path / "bin", tmp_path / "records"
    bin_dir.mkdir()
    records.mkdir()
    _executable(bin_dir / "nvidia-smi", FAKE_NVIDIA_SMI)
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(PYTHON=_executable(tmp_path / "python", FAKE_PYTHON), RECORD_DIR=str(records), FAKE_GPUS="0",
               PATH=f"{bin_dir}:{env['PATH']}")
    return env, records


def _generate(env, n=5, *args):
    return subprocess.run(["sh", str(ROOT / "run_generate.sh"), str(n), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def _records(records: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in records.glob("*.json")), key=lambda r: r["shard"])


def _max_concurrent(runs: list[dict]) -> int:
    return max(sum(r["start"] <= s["start"] < r["end"] for r in runs) for s in runs)


def test_five_shards_on_two_gpus_run_in_lanes_of_one_process_per_gpu(stubs):
    env, records = stubs
    env["FAKE_GPUS"] = "2"
    proc = _generate(env, 5, "n_vocab=10")
    assert proc.returncode == 0, proc.stderr
    runs = _records(records)
    assert [r["shard"] for r in runs] == [0, 1, 2, 3, 4]
    assert [r["device"] for r in runs] == ["0", "1", "0", "1", "0"]
    assert all(r["argv"] == ["n_vocab=10"] for r in runs)
    assert _max_concurrent(runs) == 2  # never 3 at once
    for device in ("0", "1"):  # each GPU runs its shards one after another
        mine = [r for r in runs if r["device"] == device]
        assert all(a["end"] <= b["start"] for a, b in zip(mine, mine[1:]))
    # with equal shards the lanes advance together: waves {0, 1}, {2, 3}, {4}
    waves = [{0, 1}, {2, 3}, {4}]
    for earlier, later in zip(waves, waves[1:]):
        assert max(runs[i]["start"] for i in earlier) < min(runs[i]["start"] for i in later)


def test_cuda_visible_devices_chooses_the_gpus_and_their_ids(stubs):
    env, records = stubs
    env.update(FAKE_GPUS="8", CUDA_VISIBLE_DEVICES="5,7,2", SHARD_OFFSET="10")
    assert _generate(env, 4).returncode == 0
    runs = _records(records)
    assert [(r["shard"], r["device"]) for r in runs] == [(10, "5"), (11, "7"), (12, "2"), (13, "5")]
    assert _max_concurrent(runs) == 3


def test_a_cpu_machine_runs_one_shard_at_a_time_by_default(stubs):
    env, records = stubs
    env["STUB_SLEEP"] = "0.1"
    assert _generate(env, 3).returncode == 0
    runs = _records(records)
    assert _max_concurrent(runs) == 1 and all(r["device"] is None and r["argv"] == [] for r in runs)


def test_nproc_cpu_runs_lanes_that_split_the_cores(stubs):
    env, records = stubs
    env.update(NPROC_CPU="2", CUDA_VISIBLE_DEVICES="")  # "" hides every GPU, whatever nvidia-smi says
    assert _generate(env, 4, "seed=1").returncode == 0
    runs = _records(records)
    threads = max(1, os.cpu_count() // 2)
    assert _max_concurrent(runs) == 2
    assert all(r["argv"] == [f"num_threads={threads}", "seed=1"] for r in runs)  # the user's keys come last


def test_a_failed_shard_fails_the_run_naming_it_and_the_others_finish(stubs):
    env, records = stubs
    env.update(FAKE_GPUS="2", FAIL_SHARD="2")
    proc = _generate(env, 5)
    assert proc.returncode == 1
    assert "shard 2 failed on GPU 0" in proc.stderr and "1 of 5 shards failed: 2;" in proc.stderr
    assert [r["shard"] for r in _records(records)] == [0, 1, 2, 3, 4]


def _train_dry_run(env, plan, *args, **extra_env):
    env = {**env, "STUB_PLAN": plan, "DRY_RUN": "1", **extra_env}
    proc = subprocess.run(["sh", str(ROOT / "run_train.sh"), "4", "8", "8", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    return proc.returncode, shlex.split(proc.stdout.strip()) if proc.returncode == 0 else proc.stderr


QUANT = ["quant.w_bits=4", "quant.a_bits=8", "quant.kv_bits=8"]


def test_dry_run_torchrun_single_node_and_one_process(stubs):
    env, _ = stubs
    rc, cmd = _train_dry_run(env, "fsdp 2", "backend=fsdp", "nproc=2")
    assert rc == 0 and cmd == [env["PYTHON"], "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "train.py", *QUANT, "backend=fsdp", "nproc=2"]
    rc, cmd = _train_dry_run(env, "none 1", "max_steps=2")
    assert rc == 0 and cmd == [env["PYTHON"], "train.py", *QUANT, "max_steps=2"]


def test_dry_run_torchrun_two_nodes_with_c10d_rendezvous(stubs):
    env, _ = stubs
    rc, cmd = _train_dry_run(env, "fsdp 16", "backend=fsdp", "nproc=16", NNODES="2", RDZV_ENDPOINT="node0:29400")
    assert rc == 0 and cmd == [env["PYTHON"], "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "llmqat",
                               "train.py", *QUANT, "backend=fsdp", "nproc=16"]
    rc, err = _train_dry_run(env, "fsdp 16", NNODES="2")
    assert rc == 2 and "RDZV_ENDPOINT" in err
    rc, err = _train_dry_run(env, "fsdp 15", NNODES="2", RDZV_ENDPOINT="node0:29400")
    assert rc == 2 and "do not split evenly" in err


def test_dry_run_srun_two_nodes(stubs, tmp_path):
    env, _ = stubs
    _executable(Path(env["PATH"].split(":")[0]) / "scontrol", "#!/bin/sh\necho gpu-a01; echo gpu-a02\n")
    rc, cmd = _train_dry_run(env, "ddp 16", "backend=ddp", LAUNCHER="srun", NNODES="2", SLURM_JOB_NODELIST="gpu-a[01-02]")
    assert rc == 0 and cmd == ["env", "MASTER_ADDR=gpu-a01", "MASTER_PORT=29500", "srun", "--nodes", "2", "--ntasks",
                               "16", "--ntasks-per-node", "8", env["PYTHON"], "train.py", *QUANT, "backend=ddp"]
    rc, err = _train_dry_run(env, "ddp 16", LAUNCHER="srun", NNODES="2")
    assert rc != 0 and "Slurm allocation" in err


def test_dry_run_deepspeed_with_a_hostfile(stubs):
    env, _ = stubs
    rc, cmd = _train_dry_run(env, "deepspeed 16", "backend=deepspeed", LAUNCHER="deepspeed", NNODES="2",
                             HOSTFILE="hosts.txt")
    assert rc == 0 and cmd[1:] == ["--hostfile", "hosts.txt", "--num_nodes", "2", "--num_gpus", "8", "--master_port",
                                   "29500", "--no_local_rank", "train.py", *QUANT, "backend=deepspeed"]
    assert cmd[0].endswith("deepspeed")
    rc, err = _train_dry_run(env, "deepspeed 16", LAUNCHER="deepspeed", NNODES="2")
    assert rc == 2 and "HOSTFILE" in err


@pytest.mark.slow  # the real train.py --launch-plan (imports torch and transformers)
def test_dry_run_asks_the_real_config_for_nproc(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(PYTHON=sys.executable, DRY_RUN="1", NPROC="4")
    proc = subprocess.run(["sh", str(ROOT / "run_train.sh"), "4", "8", "8", "backend=ddp"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout)[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]


SLURM = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}


def test_slurm_variables_give_rank_world_and_local_rank():
    assert process_ranks(SLURM) == Ranks(3, 8, 1, "slurm")
    assert process_ranks({**SLURM, "SLURM_STEP_NUM_TASKS": "4"}).world_size == 4  # the srun step's own count


def test_torchrun_variables_win_over_slurms():
    env = {**SLURM, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    assert process_ranks(env) == Ranks(5, 16, 5, "torchrun")
    assert process_ranks({}) == Ranks(0, 1, 0, "single")


def test_generation_shard_follows_slurm_procid(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert resolve_shard(None) == 3 and resolve_shard(7) == 7


def test_setup_runtime_exports_slurm_ranks_under_torchruns_names(monkeypatch):
    """An srun task of a 2-task DDP run: the process group would start, so only the export is run."""
    from utils import distributed

    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}
    monkeypatch.setattr(distributed.os, "environ", env)  # a private copy: nothing leaks into other tests
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed._export_slurm_ranks(process_ranks())
    env["MASTER_ADDR"] = "node0"
    distributed._export_slurm_ranks(process_ranks())
    assert [env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")] == ["1", "2", "1", "29500"]
    assert process_ranks(env) == Ranks(1, 2, 1, "torchrun")


def test_a_finished_run_ends_its_process_group(monkeypatch):
    """shutdown_runtime (the end of recipes.train.run) destroys the group it started; backend none is a no-op.
    Left to interpreter exit, a DeepSpeed CPU rank could die with SIGABRT while gloo was torn down."""
    import torch.distributed as dist

    from utils.distributed import setup_runtime, shutdown_runtime

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)  # also undoes what setup_runtime sets for its one-process group
    rt = setup_runtime("ddp", seed=0)
    assert dist.is_initialized() and rt.world_size == 1
    shutdown_runtime(rt)
    assert not dist.is_initialized()
    shutdown_runtime(setup_runtime("none", seed=0))  # nothing started, nothing to end
    assert not dist.is_initialized()


EXIT_SCRIPT = """
import atexit, logging, os, sys
from utils.distributed import exit_process, setup_runtime, shutdown_runtime
logging.basicConfig(level=logging.INFO, format="%(message)s")
atexit.register(lambda: print("finalized", flush=True))
if sys.argv[1] == "ddp":
    shutdown_runtime(setup_runtime("ddp", seed=0))
logging.getLogger("x").info("logged before exit")
sys.stdout.write("buffered, not flushed")
exit_process(3)
"""


@pytest.mark.parametrize("backend", ["ddp", "none"])
def test_exit_process_skips_finalization_only_after_a_process_group(backend):
    """train.py ends with exit_process: after a distributed run it flushes the logs and std streams and
    leaves with os._exit (no interpreter finalization, where a still-referenced gloo group could abort a
    finished rank); otherwise it is sys.exit. Either way the exit code and every written line survive."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, backend], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "buffered, not flushed" in proc.stdout and "logged before exit" in proc.stderr
    assert ("finalized" in proc.stdout) == (backend == "none")


def test_run_reproduction_names_its_stages_and_refuses_another():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "run_reproduction.sh"), "everything"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "data|recipe|students|headline|ablations|grid|all" in proc.stderr
