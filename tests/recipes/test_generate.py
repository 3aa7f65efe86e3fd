"""generate_data.py / run_generate.sh / merge_gen_data.py as users run them, on a tiny random Llama:
a shard killed with SIGKILL mid-run (and left with a half-written line) resumes to exactly the records
of an uninterrupted run; a finished shard is left unchanged; bad settings fail with the key named.

    PYTHONPATH=. python -m pytest -q tests/recipes/test_generate.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import generate_data
import merge_gen_data
from recipes.generate import GenerateConfig, run
from utils.config import load_config
from utils.io import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLMQAT_NO_PROGRESS": "1",
       "HF_HUB_OFFLINE": "1"}


def _settings(model_dir, out_dir, n_vocab=40, max_length=48):
    return [f"model={model_dir}", f"n_vocab={n_vocab}", f"max_length={max_length}", "batch_size=2", "seed=3",
            f"out_dir={out_dir}"]


def _cli(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "generate_data.py"), *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def _canonical(path):
    return sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(path))


def _lines(path):
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@pytest.mark.slow  # subprocesses
def test_killed_shard_resumes_to_the_uninterrupted_records(tiny_model_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run(load_config(GenerateConfig, _settings(tiny_model_dir, tmp_path / "ref"), None))
    finally:
        torch.set_num_threads(threads)
    expected = _lines(reference)
    shard = tmp_path / "killed" / "gen.chunk.00.jsonl"
    proc = _cli(["0", *_settings(tiny_model_dir, tmp_path / "killed")])
    deadline = time.monotonic() + 120
    while _lines(shard) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = _lines(shard)
    assert 3 <= written < expected, "the shard must be killed mid-run"
    with shard.open("ab") as f:  # as if the kill had landed inside a write
        f.write(b'{"text": "a half-written rec')
    resumed = _cli(["0", *_settings(tiny_model_dir, tmp_path / "killed")])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert _canonical(shard) == _canonical(reference)
    keys = [(r["start_id"], r["greedy_len"]) for r in read_jsonl(shard)]
    assert len(keys) == len(set(keys)) == expected

    before = shard.read_bytes()
    again = _cli(["0", *_settings(tiny_model_dir, tmp_path / "killed")])
    assert again.wait(timeout=300) == 0
    assert shard.read_bytes() == before


@pytest.mark.slow  # subprocesses
def test_run_generate_sh_then_merge(tiny_model_dir, tmp_path):
    out = tmp_path / "gen"
    settings = _settings(tiny_model_dir, out, n_vocab=6, max_length=16)
    proc = subprocess.run(["bash", str(ROOT / "run_generate.sh"), "2", *settings], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shards = sorted(p.name for p in out.glob("gen.chunk.*.jsonl"))
    assert shards == ["gen.chunk.00.jsonl", "gen.chunk.01.jsonl"]
    records = [r for name in shards for r in read_jsonl(out / name)]
    assert {(r["start_id"], r["greedy_len"]) for r in records} == {(i, j) for i in range(3, 12) for j in (3, 4, 5)}
    assert all(r["token_ids"][0] == r["start_id"] and r["n_tokens"] == len(r["token_ids"]) <= 16 for r in records)
    assert merge_gen_data.main([f"in_dir={out}", "seed=5"]) == 0
    assert _canonical(out / "all_gen.jsonl") == sorted(json.dumps(r, sort_keys=True) for r in records)


@pytest.mark.parametrize("argv,match", [(["nope=1"], "nope"), (["max_length=1"], "max_length"),
                                        (["top_p=0"], "top_p"), (["batch_size=x"], "batch_size")])
def test_bad_settings_name_the_key(argv, match, capsys):
    assert generate_data.main(argv) == 2
    assert match in capsys.readouterr().err


def test_shard_past_the_vocabulary_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    assert generate_data.main(["99", *_settings(tiny_model_dir, tmp_path)]) == 2
    assert "past the vocabulary" in capsys.readouterr().err


def test_shard_comes_from_the_distributed_rank(monkeypatch):
    from recipes.generate import resolve_shard

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert resolve_shard(None) == 5
    monkeypatch.setenv("RANK", "3")
    assert resolve_shard(None) == 3 and resolve_shard(1) == 1
