"""generate_data.py / run_generate.sh / merge_gen_data.py as users run them, on a tiny random Llama:
a shard killed with SIGKILL mid-run (and left with a half-written line) resumes to exactly the records
of an uninterrupted run; a finished shard is left unchanged; bad settings fail with the key named;
a padded vocabulary never leaks ids the tokenizer lacks; a saved student generates from its
full-precision weights unless quantized=true; the shard metadata records provenance and start ids,
and a resume from another model (retrained into the same folder) or start-id mode is refused.

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
from models import load_model, model_fingerprint, quantize_model, save_model
from quant.config import QuantConfig
from quant.errors import UserError
from recipes.generate import GenerateConfig, is_complete, run, start_order
from tests.conftest import TINY_VOCAB, make_byte_tokenizer, make_tiny_llama, save_tiny_model_dir
from utils.config import load_config
from utils.data.shards import read_meta
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
    first_12 = start_order(len(make_byte_tokenizer()), {0, 1, 2}, "random", 3)[:12]  # 2 shards x 6, seed 3
    assert {(r["start_id"], r["greedy_len"]) for r in records} == {(i, j) for i in first_12 for j in (3, 4, 5)}
    assert all(r["token_ids"][0] == r["start_id"] and r["n_tokens"] == len(r["token_ids"]) <= 16 for r in records)
    assert merge_gen_data.main([f"in_dir={out}", "seed=5"]) == 0
    assert _canonical(out / "all_gen.jsonl") == sorted(json.dumps(r, sort_keys=True) for r in records)


@pytest.mark.parametrize("argv,match", [(["nope=1"], "nope"), (["max_length=1"], "max_length"),
                                        (["top_p=0"], "top_p"), (["batch_size=x"], "batch_size"),
                                        (["start_ids=first"], "start_ids"),
                                        (["attn_implementation=nope"], "attn_implementation='nope'"),
                                        (["attn_implementation=flash_attention_2"], "attn_implementation=flash")])
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


def _run(model_dir, out_dir, *extra, n_vocab=6, max_length=12):
    return run(load_config(GenerateConfig, [*_settings(model_dir, out_dir, n_vocab, max_length), *extra], None))


def test_padded_vocabulary_never_emits_ids_the_tokenizer_lacks(tmp_path, one_thread):
    """Logits 272 wide, tokenizer 259 ids; the padded logits are made the largest."""
    model, tok = make_tiny_llama(vocab_size=TINY_VOCAB), make_byte_tokenizer()
    with torch.no_grad():
        model.lm_head.weight[len(tok):] = model.lm_head.weight[:len(tok)].abs().max() * 50
    model.save_pretrained(tmp_path / "padded")
    tok.save_pretrained(tmp_path / "padded")
    records = read_jsonl(_run(tmp_path / "padded", tmp_path / "gen", "greedy_lengths=[1,3]"))
    assert len(records) > 0 and all(t < len(tok) for r in records for t in r["token_ids"])


def test_shard_meta_records_provenance_and_random_start_ids(tiny_model_dir, tmp_path, one_thread):
    path = _run(tiny_model_dir, tmp_path / "gen", "shard=1", "batch_size=4")
    meta = read_meta(path)
    assert set(meta) == {"settings", "provenance", "start_ids", "runtime", "n_expected", "complete"}
    prov = meta["provenance"]
    assert prov["inputs"] == {"model": model_fingerprint(tiny_model_dir)} and prov["tokenizer"].startswith("tok:")
    assert {"shard", "out_dir", "batch_size", "device"}.isdisjoint(prov["config"])
    assert prov["config"]["start_ids"] == meta["settings"]["start_ids"] == meta["start_ids"]["mode"] == "random"
    assert meta["runtime"]["shard"] == 1 and meta["runtime"]["batch_size"] == 4 and meta["complete"] is True
    ids = meta["start_ids"]["ids"]
    assert len(ids) == 6 and ids != list(range(6, 12))  # not the walk's slice
    assert sorted({r["start_id"] for r in read_jsonl(path)}) == sorted(ids)
    other = _run(tiny_model_dir, tmp_path / "gen", "shard=0", "batch_size=2")
    assert read_meta(other)["provenance"]["config_hash"] == prov["config_hash"]  # shards of one run agree
    assert not set(ids) & set(read_meta(other)["start_ids"]["ids"])


def test_resume_with_another_start_ids_mode_is_refused(tiny_model_dir, tmp_path, one_thread):
    _run(tiny_model_dir, tmp_path / "gen", "start_ids=walk")
    with pytest.raises(UserError, match="start_ids: 'walk' -> 'random'"):
        _run(tiny_model_dir, tmp_path / "gen")


def test_a_model_retrained_into_the_same_folder_is_refused_on_resume(tmp_path, one_thread):
    model_dir = save_tiny_model_dir(tmp_path / "model", seed=0)
    _run(model_dir, tmp_path / "gen")
    cfg = load_config(GenerateConfig, _settings(model_dir, tmp_path / "gen", 6, 12), None)
    assert is_complete(cfg)
    save_tiny_model_dir(tmp_path / "model", seed=1)  # same path, same settings, other weights
    assert not is_complete(cfg)
    with pytest.raises(UserError, match=r"inputs.model: .*new out_dir"):
        run(cfg)


def test_a_student_generates_from_its_full_precision_weights_unless_quantized(tiny_model_dir, tmp_path, one_thread):
    model, tok = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=2, a_bits=4, kv_bits=4))
    student = str(save_model(model, tok, tmp_path / "student"))

    def tokens(model_dir, out, *extra):
        return _canonical_tokens(_run(model_dir, tmp_path / out, "start_ids=walk", *extra))

    teacher = tokens(tiny_model_dir, "teacher")
    assert tokens(student, "float") == teacher
    assert tokens(student, "quantized", "quantized=true") != teacher
    with pytest.raises(UserError, match="not a quantized student"):
        _run(tiny_model_dir, tmp_path / "plain", "quantized=true")


def _canonical_tokens(path):
    return sorted((r["start_id"], r["greedy_len"], r["token_ids"]) for r in read_jsonl(path))
