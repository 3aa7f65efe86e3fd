"""utils/data/topk.py: the top-K sidecar's targets, encoding and repair, on hand-made tensors.

    PYTHONPATH=. python -m pytest -q tests/utils/data/test_topk.py
"""

import json
import math

import pytest
import torch

from quant.errors import InputFileError
from utils.data.topk import (
    HEADER_SIZE,
    SidecarWriter,
    decode,
    encode,
    id_bytes,
    repair_sidecar,
    sidecar_path,
    topk_targets,
)


def test_targets_are_the_top_k_log_probs_and_the_rest_mass():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    ids, lps = topk_targets(logits, 2)
    ref = logits.log_softmax(-1)[0]
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(lps[0, :2], ref[[0, 2]])
    torch.testing.assert_close(lps[0, 2], torch.logsumexp(ref[[1, 3]], 0))
    _, full = topk_targets(logits, 4)
    assert full[0, 4] == -math.inf  # K covers the vocabulary: no rest


@pytest.mark.parametrize("vocab,lp", [(300, 2), (70000, 2), (300, 4)])
def test_encode_decode_round_trip_at_130_bytes_per_token_for_k_32(vocab, lp):
    ids, lps = topk_targets(torch.randn(5, vocab), 32)
    block = encode(ids, lps, id_bytes(vocab), lp)
    assert len(block) == 5 * (32 * id_bytes(vocab) + 33 * lp)
    if (vocab, lp) == (300, 2):
        assert len(block) / 5 == 130
    back_ids, back_lps = decode(block, 32, id_bytes(vocab), lp)
    assert torch.equal(back_ids, ids)
    torch.testing.assert_close(back_lps, lps, atol=0 if lp == 4 else 1e-2, rtol=0 if lp == 4 else 1e-3)


def _shard_with_blocks(tmp_path, n):
    shard = tmp_path / "gen.chunk.00.jsonl"
    with SidecarWriter(shard, 3, 300) as sidecar, shard.open("w") as f:
        for i in range(n):
            ids, lps = topk_targets(torch.randn(4, 300), 3)
            f.write(json.dumps(sidecar.add({"start_id": i, "greedy_len": 3}, {"topk_ids": ids, "topk_logprobs": lps}))
                    + "\n")
    return shard


def test_repair_cuts_orphan_blocks_and_refuses_missing_bytes(tmp_path):
    shard = _shard_with_blocks(tmp_path, 2)
    size = sidecar_path(shard).stat().st_size
    with sidecar_path(shard).open("ab") as f:
        f.write(b"orphan")
    assert repair_sidecar(shard, 3, 300) == 6 and sidecar_path(shard).stat().st_size == size
    assert repair_sidecar(shard, 0, 300) == 0  # teacher_topk off: untouched
    with pytest.raises(InputFileError, match="another K"):
        repair_sidecar(shard, 4, 300)
    with sidecar_path(shard).open("rb+") as f:
        f.truncate(size - 1)
    with pytest.raises(InputFileError, match="need"):
        repair_sidecar(shard, 3, 300)
    sidecar_path(shard).unlink()
    with pytest.raises(InputFileError, match="missing"):
        repair_sidecar(shard, 3, 300)


def test_repair_without_records_starts_afresh(tmp_path):
    shard = tmp_path / "gen.chunk.00.jsonl"
    shard.write_text("")
    sidecar_path(shard).write_bytes(b"x" * (HEADER_SIZE + 3))
    repair_sidecar(shard, 3, 300)
    assert not sidecar_path(shard).exists()
