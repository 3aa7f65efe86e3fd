"""The shard merger: finds shards, validates every line (file:line errors), drops exact duplicates,
shuffles with a seed, replaces the output atomically and reports missing / incomplete shards.

    PYTHONPATH=. python -m pytest -q tests/utils/data/test_merge.py
"""

import json

import pytest

from recipes.merge import MergeConfig, merge
from utils.data.merge import find_shards, format_summary, summary
from utils.data.shards import write_meta
from utils.io import JsonlError, read_jsonl


def _record(start, greedy_len=3, n=5):
    ids = [start] + list(range(10, 10 + n - 1))
    return {"text": f"text {start} {greedy_len}", "token_ids": ids, "start_id": start, "greedy_len": greedy_len,
            "n_tokens": n, "finish": "length"}


def _shard(folder, index, records, tail=""):
    path = folder / f"gen.chunk.{index:02d}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture
def shards(tmp_path):
    _shard(tmp_path, 0, [_record(i) for i in range(3, 13)])
    _shard(tmp_path, 1, [_record(i, n=i) for i in range(20, 40)])
    return tmp_path


def test_merge_keeps_every_record_once_and_shuffles_with_the_seed(shards):
    _shard(shards, 2, [_record(3), _record(3), _record(50)])  # two exact copies of a shard-0 record
    stats = merge(MergeConfig(in_dir=str(shards), seed=1))
    out = read_jsonl(shards / "all_gen.jsonl")
    inputs = [r for p in find_shards(shards) for r in read_jsonl(p)]
    unique = {json.dumps(r, sort_keys=True) for r in inputs}
    assert sorted(json.dumps(r, sort_keys=True) for r in out) == sorted(unique)
    assert stats.records == len(out) == 31 and stats.duplicates == 2
    assert stats.tokens == sum(len(r["token_ids"]) for r in out)
    assert sum(stats.lengths.values()) == stats.records
    first = [r["start_id"] for r in out]
    assert first != sorted(first)  # shuffled
    merge(MergeConfig(in_dir=str(shards), seed=1))
    assert [r["start_id"] for r in read_jsonl(shards / "all_gen.jsonl")] == first  # same seed, same order
    merge(MergeConfig(in_dir=str(shards), seed=2))
    assert [r["start_id"] for r in read_jsonl(shards / "all_gen.jsonl")] != first


def test_output_is_replaced_never_appended(shards):
    output = shards / "out" / "merged.jsonl"
    output.parent.mkdir()
    output.write_text('{"old": "junk"}\n' * 100)
    merge(MergeConfig(in_dir=str(shards), output=str(output)))
    rows = read_jsonl(output)
    assert len(rows) == 30 and all("old" not in r for r in rows)
    assert json.loads((shards / "out" / "merged.stats.json").read_text())["records"] == 30


@pytest.mark.parametrize("bad,reason", [
    ("not json\n", "bad record"),
    ('["a list"]\n', "not a JSON object"),
    ('{"token_ids": [1, 2]}\n', "no 'text' string"),
    ('{"text": "x", "token_ids": []}\n', "non-empty 'token_ids'"),
    ('{"text": "x", "token_ids": [1, -2]}\n', "non-negative integers"),
    ('{"text": "x", "token_ids": [1, "2"]}\n', "non-negative integers"),
    ('{"text": "x", "token_ids": [1, 2]', "partial last line"),
])
def test_a_bad_line_fails_with_file_and_line_and_leaves_the_output_alone(shards, bad, reason):
    _shard(shards, 1, [_record(i) for i in range(20, 23)], tail=bad)
    old = shards / "all_gen.jsonl"
    old.write_text("previous output\n")
    with pytest.raises(JsonlError, match=rf"gen\.chunk\.01\.jsonl:4: .*{reason}"):
        merge(MergeConfig(in_dir=str(shards)))
    assert old.read_text() == "previous output\n"
    assert not list(shards.glob("*.tmp"))


def test_skip_bad_skips_and_counts(shards):
    _shard(shards, 1, [_record(20)], tail="not json\n" + json.dumps(_record(21)) + "\n")
    stats = merge(MergeConfig(in_dir=str(shards), skip_bad=True))
    assert stats.bad_lines == 1 and stats.records == 12


def test_missing_and_incomplete_shards_are_reported(shards, capsys):
    _shard(shards, 3, [_record(60)])
    write_meta(shards / "gen.chunk.03.jsonl", {"vocab_size": 300, "n_vocab": 50}, n_expected=4, complete=False)
    stats = merge(MergeConfig(in_dir=str(shards)))
    assert stats.missing_shards == [2, 4, 5]  # 300 ids / 50 per shard = shards 0..5
    assert stats.incomplete_shards == {"gen.chunk.03.jsonl": "1/4"}
    text = format_summary(summary(stats, shards / "all_gen.jsonl"))
    assert "missing shards: 2, 4-5" in text and "31 records" in text


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard files"):
        merge(MergeConfig(in_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        merge(MergeConfig(in_dir=str(tmp_path / "nope")))
