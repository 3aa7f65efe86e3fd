"""The shard merger: finds shards, validates every line (file:line errors), drops exact duplicates,
shuffles with a seed, replaces the output atomically and reports missing / incomplete shards;
refuses shards made alike only in name (settings, model / tokenizer fingerprints, no metadata)
unless allow_mixed, never writes an empty output, and records the merged file's provenance.

    PYTHONPATH=. python -m pytest -q tests/utils/data/test_merge.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quant.errors import UserError
from recipes.merge import MergeConfig, is_current, merge
from utils.data.merge import find_shards, format_summary, provenance_path, summary
from utils.data.shards import read_meta, write_meta
from utils.io import JsonlError, read_jsonl
from utils.provenance import data_fingerprint

ROOT = Path(__file__).resolve().parents[3]
SETTINGS = {"model": "tiny", "n_vocab": 50, "greedy_lengths": [3], "max_length": 64, "temperature": 1.0, "top_k": 50,
            "top_p": 1.0, "seed": 0, "dtype": "float32", "vocab_size": 300, "eos_ids": [2]}
PROVENANCE = {"inputs": {"model": "files:aaaa"}, "tokenizer": "tok:1111"}


def _record(start, greedy_len=3, n=5):
    ids = [start] + list(range(10, 10 + n - 1))
    return {"text": f"text {start} {greedy_len}", "token_ids": ids, "start_id": start, "greedy_len": greedy_len,
            "n_tokens": n, "finish": "length"}


def _shard(folder, index, records, tail="", meta=True, provenance=PROVENANCE, **changes):
    """A shard file with its metadata (`changes` override settings; meta=False: none)."""
    path = folder / f"gen.chunk.{index:02d}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    if meta:
        write_meta(path, {**SETTINGS, **changes, "shard": index}, provenance=provenance, complete=True)
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
    write_meta(shards / "gen.chunk.03.jsonl", {**SETTINGS, "shard": 3}, provenance=PROVENANCE, n_expected=4,
               complete=False)
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


@pytest.mark.parametrize("changes, key", [
    ({"max_length": 128}, "max_length"), ({"seed": 1}, "seed"), ({"temperature": 0.7}, "temperature"),
    ({"model": "other", "provenance": None}, "model"), ({"provenance": {"inputs": {"model": "files:bbbb"}, "tokenizer": "tok:1111"}},
                                    "inputs.model"),
    ({"provenance": {"inputs": {"model": "files:aaaa"}, "tokenizer": "tok:2222"}}, "tokenizer"),
])
def test_shards_made_differently_are_refused_unless_allow_mixed(shards, changes, key):
    old = shards / "all_gen.jsonl"
    old.write_text("previous output\n")
    _shard(shards, 2, [_record(70)], **changes)
    with pytest.raises(UserError, match=rf"{key} differs \(gen\.chunk\.00\.jsonl: .*gen\.chunk\.02\.jsonl: .*allow_mixed"):
        merge(MergeConfig(in_dir=str(shards)))
    assert old.read_text() == "previous output\n"
    stats = merge(MergeConfig(in_dir=str(shards), allow_mixed=True))
    assert stats.records == 31 and key in stats.mixed
    prov = json.loads(provenance_path(old).read_text())
    stats_file = json.loads(old.with_suffix(".stats.json").read_text())
    assert key in prov["mixed"] and key in stats_file["mixed"]
    assert "MIXED" in format_summary(stats_file)


def test_a_moved_model_folder_with_the_same_fingerprint_is_not_a_difference(shards):
    _shard(shards, 2, [_record(70)], model="/elsewhere/tiny")
    assert merge(MergeConfig(in_dir=str(shards))).mixed == {}


def test_shards_without_metadata_are_refused_unless_allow_mixed(shards):
    _shard(shards, 2, [_record(70)], meta=False)
    with pytest.raises(UserError, match=r"no metadata .*gen\.chunk\.02\.jsonl.*allow_mixed=true"):
        merge(MergeConfig(in_dir=str(shards)))
    stats = merge(MergeConfig(in_dir=str(shards), allow_mixed=True))
    assert stats.mixed == {"no_metadata": ["gen.chunk.02.jsonl"]}
    prov = json.loads(provenance_path(shards / "all_gen.jsonl").read_text())
    assert prov["tokenizer"] is None and prov["inputs"]["model"] is None  # not known for every shard


def test_provenance_records_config_shards_model_and_tokenizer(shards):
    cfg = MergeConfig(in_dir=str(shards), seed=7)
    merge(cfg)
    out = shards / "all_gen.jsonl"
    prov = json.loads(provenance_path(out).read_text())
    assert prov["config"]["seed"] == 7 and prov["config"]["allow_mixed"] is False
    assert prov["inputs"]["shards"] == {p.name: data_fingerprint(p) for p in find_shards(shards)}
    assert prov["inputs"]["model"] == "files:aaaa" and prov["tokenizer"] == "tok:1111"
    assert prov["output"] == data_fingerprint(out) and prov["mixed"] == {}
    assert prov["settings"]["max_length"] == 64 and "shard" not in prov["settings"]
    assert is_current(cfg) and not is_current(MergeConfig(in_dir=str(shards), seed=8))
    _shard(shards, 1, [_record(i, n=i) for i in range(20, 41)])  # a shard's content changed
    assert not is_current(cfg)


@pytest.mark.parametrize("case", ["empty_shards", "all_bad_skipped"])
def test_zero_records_never_replace_the_output(shards, case):
    for index in (0, 1):
        _shard(shards, index, [], tail="" if case == "empty_shards" else "not json\n")
    old = shards / "all_gen.jsonl"
    old.write_text('{"text": "kept", "token_ids": [1]}\n')
    with pytest.raises(UserError, match="no records"):
        merge(MergeConfig(in_dir=str(shards), skip_bad=True))
    assert old.read_text() == '{"text": "kept", "token_ids": [1]}\n'


def test_merge_gen_data_exits_2_naming_the_key(shards):
    _shard(shards, 2, [_record(70)], seed=5)
    cmd = [sys.executable, str(ROOT / "merge_gen_data.py"), f"in_dir={shards}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "seed differs" in proc.stderr and "Traceback" not in proc.stderr
    assert read_meta(shards / "gen.chunk.02.jsonl")["settings"]["seed"] == 5


def test_statistics_count_start_ids_eos_share_and_distinct_ngrams(tmp_path):
    records = [_record(3, n=4), _record(4, n=4), {**_record(5, n=2), "finish": "eos"}]
    _shard(tmp_path, 0, records)  # token ids: 3 10 11 12 / 4 10 11 12 / 5 10
    info = summary(merge(MergeConfig(in_dir=str(tmp_path))), tmp_path / "all_gen.jsonl")
    assert info["distinct_start_ids"] == 3 and info["eos_share"] == pytest.approx(1 / 3, abs=1e-4)
    # 1-grams: 10 tokens, distinct {3, 4, 5, 10, 11, 12}; 2-grams: 7, distinct {3-10, 4-10, 5-10, 10-11, 11-12}
    # 4-grams: 2, both distinct
    assert info["distinct_ngrams"] == {"1": 0.6, "2": round(5 / 7, 4), "4": 1.0}
    assert info["distinct_tokens"] == 6 and "3 distinct start ids, 6 distinct tokens" in format_summary(info)
    saved = json.loads((tmp_path / "all_gen.stats.json").read_text())
    assert len(saved["samples"]) == 3 and {s["start_id"] for s in saved["samples"]} == {3, 4, 5}
    assert {s["n_tokens"] for s in saved["samples"]} == {4, 2}
