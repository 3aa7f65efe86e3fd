"""The merger with top-K sidecars (generate_data.py teacher_topk=K): every record keeps its own block
in the merged sidecar, in the shuffled order; a corrupt block stops the merge with file:line;
shards with different K are refused; the provenance records K.

    PYTHONPATH=. python -m pytest -q tests/utils/data/test_merge_topk.py
"""

import json

import pytest
import torch

from quant.errors import UserError
from recipes.generate import GenerateConfig, run
from recipes.merge import MergeConfig, merge
from tests.recipes.test_generate_topk import _blocks
from utils.config import load_config
from utils.data.merge import provenance_path
from utils.data.topk import read_header, sidecar_path
from utils.io import JsonlError, read_jsonl


def _generate(model_dir, out_dir, shard, *extra):
    settings = [f"model={model_dir}", "n_vocab=3", "max_length=10", "batch_size=2", "seed=3", f"out_dir={out_dir}",
                f"shard={shard}", *extra]
    return run(load_config(GenerateConfig, settings, None))


@pytest.fixture
def topk_shards(tiny_model_dir, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    paths = [_generate(tiny_model_dir, tmp_path, i, "teacher_topk=4") for i in (0, 1)]
    torch.set_num_threads(before)
    return paths


def test_merged_sidecar_carries_every_block_in_the_shuffled_order(topk_shards, tmp_path):
    stats = merge(MergeConfig(in_dir=str(tmp_path), seed=7))
    out = tmp_path / "all_gen.jsonl"
    source = {**_blocks(topk_shards[0]), **_blocks(topk_shards[1])}
    merged = _blocks(out)  # checks each block's crc32 against its line
    assert merged == source and stats.records == len(source)
    order = [(r["start_id"], r["greedy_len"]) for r in read_jsonl(out)]
    assert order != sorted(order, key=list(source).index)  # shuffled, blocks with it
    offsets = [r["topk"]["offset"] for r in read_jsonl(out)]
    assert offsets == sorted(offsets)  # the merged sidecar follows the merged file's order
    assert read_header(sidecar_path(out)) == (4, 2, 2)
    assert json.loads(provenance_path(out).read_text())["teacher_topk"] == 4


def test_a_corrupt_block_stops_the_merge_with_file_and_line(topk_shards, tmp_path):
    side = sidecar_path(topk_shards[1])
    data = bytearray(side.read_bytes())
    data[-3] ^= 0xFF
    side.write_bytes(bytes(data))
    with pytest.raises(JsonlError, match=r"gen.chunk.01.jsonl:\d+: .*corrupt"):
        merge(MergeConfig(in_dir=str(tmp_path)))
    assert not (tmp_path / "all_gen.jsonl").exists()


def test_shards_with_another_k_are_refused_even_with_allow_mixed(tiny_model_dir, tmp_path):
    _generate(tiny_model_dir, tmp_path, 0, "teacher_topk=4")
    _generate(tiny_model_dir, tmp_path, 1, "teacher_topk=2")
    with pytest.raises(UserError, match="teacher_topk"):
        merge(MergeConfig(in_dir=str(tmp_path)))
    with pytest.raises(UserError, match="different K"):
        merge(MergeConfig(in_dir=str(tmp_path), allow_mixed=True))


def test_shards_without_targets_merge_as_before(tiny_model_dir, tmp_path):
    _generate(tiny_model_dir, tmp_path, 0)
    merge(MergeConfig(in_dir=str(tmp_path)))
    assert not sidecar_path(tmp_path / "all_gen.jsonl").exists()
    assert json.loads(provenance_path(tmp_path / "all_gen.jsonl").read_text())["teacher_topk"] == 0
