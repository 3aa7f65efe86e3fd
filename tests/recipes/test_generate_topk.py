"""generate_data.py teacher_topk=K on a tiny random Llama: every record's top-K block sits in the
sidecar at the offset its JSONL line names (checksum intact), holds the model's own log-softmax at
each position, a shard killed with SIGKILL mid-run (with a half-written line and an orphan block)
resumes to the same blocks, byte for byte, as an uninterrupted run, the metadata records K, and a
resume with another K is refused.

    PYTHONPATH=. python -m pytest -q -m "slow or not slow" tests/recipes/test_generate_topk.py
"""

import os
import signal
import time

import pytest
import torch

from models import load_model
from quant.errors import UserError
from recipes.generate import GenerateConfig, run
from tests.recipes.test_generate import _cli, _lines, _settings
from utils.config import load_config
from utils.data.shards import read_meta
from utils.data.topk import check_block, decode, read_header, sidecar_path
from utils.io import read_jsonl


def _blocks(shard):
    """{(start_id, greedy_len): the record's block bytes}, each checked against its JSONL entry."""
    data, blocks = sidecar_path(shard).read_bytes(), {}
    for rec in read_jsonl(shard):
        entry = rec["topk"]
        block = data[entry["offset"]:entry["offset"] + entry["length"]]
        check_block(block, entry, str(shard))
        blocks[(rec["start_id"], rec["greedy_len"])] = block
    return blocks


def _run(model_dir, out_dir, *extra, n_vocab=4, max_length=12):
    return run(load_config(GenerateConfig, [*_settings(model_dir, out_dir, n_vocab, max_length), *extra], None))


def test_blocks_hold_the_models_log_softmax(tiny_model_dir, tmp_path, one_thread):
    shard = _run(tiny_model_dir, tmp_path / "gen", "teacher_topk=5")
    k, ids_bytes, lp_bytes = read_header(sidecar_path(shard))
    assert (k, ids_bytes, lp_bytes) == (5, 2, 2)
    assert read_meta(shard)["settings"]["teacher_topk"] == 5
    assert read_meta(shard)["provenance"]["config"]["teacher_topk"] == 5
    model, tok = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    records, blocks = read_jsonl(shard), _blocks(shard)
    assert len(blocks) == len(records) > 0
    for rec in records[:3]:
        ids, lps = decode(blocks[(rec["start_id"], rec["greedy_len"])], k, ids_bytes, lp_bytes)
        assert ids.shape == (rec["n_tokens"] - 1, 5) and lps.shape == (rec["n_tokens"] - 1, 6)
        with torch.no_grad():
            ref = model(torch.tensor([rec["token_ids"][:-1]])).logits[0, :, :len(tok)].float().log_softmax(-1)
        torch.testing.assert_close(lps[:, :5], ref.gather(-1, ids), atol=2e-3, rtol=1e-3)  # float16 storage
        assert torch.equal(ids[:, 0], ref.argmax(-1))
        total = torch.cat([lps[:, :5], lps[:, 5:]], -1).exp().sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total), atol=5e-3, rtol=0)


def test_default_writes_no_sidecar_and_records_no_k(tiny_model_dir, tmp_path, one_thread):
    shard = _run(tiny_model_dir, tmp_path / "gen")
    assert not sidecar_path(shard).exists() and "topk" not in read_jsonl(shard)[0]
    assert "teacher_topk" not in read_meta(shard)["settings"]


def test_resume_with_another_k_is_refused(tiny_model_dir, tmp_path, one_thread):
    _run(tiny_model_dir, tmp_path / "gen", "teacher_topk=4")
    with pytest.raises(UserError, match="teacher_topk"):
        _run(tiny_model_dir, tmp_path / "gen", "teacher_topk=8")
    with pytest.raises(UserError, match="teacher_topk"):
        _run(tiny_model_dir, tmp_path / "gen")


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("batch_size", [1, 2])
def test_killed_shard_resumes_to_the_uninterrupted_sidecar(tiny_model_dir, tmp_path, one_thread, batch_size):
    """batch_size=1: the same bytes. batch_size=2: the resumed rows share batches with other partners
    than in the uninterrupted run, so (as for the records' tokens, README "Data-free data") a block may
    differ by float rounding: equal up to float16 resolution."""
    settings = ["teacher_topk=8", f"batch_size={batch_size}"]
    reference = run(load_config(GenerateConfig, [*_settings(tiny_model_dir, tmp_path / "ref"), *settings], None))
    expected = _lines(reference)
    shard = tmp_path / "killed" / "gen.chunk.00.jsonl"
    proc = _cli(["0", *_settings(tiny_model_dir, tmp_path / "killed"), *settings])
    deadline = time.monotonic() + 120
    while _lines(shard) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= _lines(shard) < expected, "the shard must be killed mid-run"
    with sidecar_path(shard).open("ab") as f:  # as if the kill had landed between the block and its line
        f.write(b"\x01" * 77)
    with shard.open("ab") as f:
        f.write(b'{"text": "a half-written rec')
    resumed = _cli(["0", *_settings(tiny_model_dir, tmp_path / "killed"), *settings])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    resumed_blocks, reference_blocks = _blocks(shard), _blocks(reference)
    assert len(resumed_blocks) == expected and resumed_blocks.keys() == reference_blocks.keys()
    if batch_size == 1:
        assert sidecar_path(shard).read_bytes() == sidecar_path(reference).read_bytes()
        assert shard.read_bytes() == reference.read_bytes()
    for key, block in resumed_blocks.items():
        ids, lps = decode(block, 8, 2, 2)
        ref_ids, ref_lps = decode(reference_blocks[key], 8, 2, 2)
        torch.testing.assert_close(lps, ref_lps, atol=1e-2, rtol=1e-3)
        assert (ids == ref_ids).float().mean() > 0.95  # near-ties may swap places
    end = max(r["topk"]["offset"] + r["topk"]["length"] for r in read_jsonl(shard))
    assert sidecar_path(shard).stat().st_size == end == sidecar_path(reference).stat().st_size
