"""Training data: text / token_ids rows, packing, padding, cache (keyed on content and tokenizer),
data tied to its tokenizer through the merged file's provenance, seeded split and batches, bad input.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/data/test_blocks.py
"""

import json
import logging

import pytest
import torch
from tokenizers import normalizers

from models.loading import tokenizer_fingerprint
from quant.errors import UserError
from tests.conftest import make_byte_tokenizer
from utils.data.blocks import DataConfig, batch_indices, load_blocks, pack_rows, pad_rows, read_token_rows, split_blocks
from utils.data.merge import provenance_path
from utils.io import JsonlError, write_json
from utils.provenance import data_fingerprint


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_text_and_token_rows(tmp_path, tok):
    path = _write(tmp_path / "d.jsonl", [{"text": "ab"}, {"token_ids": [5, 6, 7]}, {"text": ""}])
    assert read_token_rows(path, tok) == [tok("ab").input_ids, [5, 6, 7]]


def test_pack_appends_eos_and_drops_tail():
    blocks = pack_rows([[5, 6, 2], [7, 8, 9]], length=3, eos_id=2)
    assert blocks["input_ids"].tolist() == [[5, 6, 2], [7, 8, 9]]  # [7, 8, 9, 2]: the tail "2" is dropped
    assert blocks["attention_mask"].all()
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_rows([[5]], length=8, eos_id=2)


def test_pad_rows_masks_padding():
    blocks = pad_rows([[5, 6], [7, 8, 9, 10]], length=3, pad_id=0)
    assert blocks["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert blocks["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("rows, error, match", [
    ([{"text": "ok"}, "{broken"], JsonlError, r"d.jsonl:2"),
    ([{"text": "ok"}, {"prompt": "x"}], ValueError, r"d.jsonl:2: row has neither"),
    ([{"token_ids": [1, 99999]}], ValueError, r"d.jsonl:1: token_ids"),
    ([{"text": ""}], ValueError, "no non-empty rows"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, rows, error, match):
    with pytest.raises(error, match=match):
        read_token_rows(_write(tmp_path / "d.jsonl", rows), tok)


def test_missing_and_empty_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="training data not found"):
        read_token_rows(str(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_token_rows(str(tmp_path / "e.jsonl"), tok)


def test_cache_is_reused_and_keyed_by_content(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    _write(path, [{"text": "hello world " * 4}] * 3)
    cfg = DataConfig(train=str(path), cache_dir=str(tmp_path / "cache"))
    first = load_blocks(cfg, tok, 8)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert torch.equal(load_blocks(cfg, tok, 8)["input_ids"], first["input_ids"])
    load_blocks(cfg, tok, 16)  # another length: another entry
    _write(path, [{"text": "other text " * 4}] * 3)  # another content: another entry
    assert not torch.equal(load_blocks(cfg, tok, 8)["input_ids"], first["input_ids"])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_split_is_seeded_and_disjoint():
    blocks = {"input_ids": torch.arange(20).view(20, 1), "attention_mask": torch.ones(20, 1)}
    train, val = split_blocks(blocks, 0.1, 10, seed=3)
    again, _ = split_blocks(blocks, 0.1, 10, seed=3)
    assert len(val["input_ids"]) == 2 and len(train["input_ids"]) == 18
    assert torch.equal(train["input_ids"], again["input_ids"])
    assert not set(train["input_ids"].flatten().tolist()) & set(val["input_ids"].flatten().tolist())
    with pytest.raises(ValueError, match="val_fraction"):
        split_blocks(blocks, 1.0, 10, seed=3)


def test_batches_cover_each_epoch_once_and_shard_ranks():
    n, world, bs = 10, 2, 1
    epoch = torch.cat([batch_indices(n, bs, m, r, world, seed=0) for m in range(5) for r in range(world)])
    assert sorted(epoch.tolist()) == list(range(n))
    assert epoch.tolist() != list(range(n))  # shuffled
    single = torch.cat([batch_indices(n, 2, m, 0, 1, seed=0) for m in range(5)])
    assert torch.equal(single, epoch)  # 2 ranks x batch 1 see what 1 rank x batch 2 sees
    nxt = torch.cat([batch_indices(n, bs, m, 0, 1, seed=0) for m in range(10, 20)])
    assert sorted(nxt.tolist()) == list(range(n)) and not torch.equal(nxt, torch.cat(
        [batch_indices(n, bs, m, 0, 1, seed=0) for m in range(10)]))


def test_cache_is_keyed_on_the_tokenizer_not_only_its_vocabulary(tmp_path, tok):
    """Same vocabulary, EOS and pad ids, another normalizer: other ids, so another cache entry."""
    path = _write(tmp_path / "d.jsonl", [{"text": "Hello World " * 4}] * 3)
    cfg = DataConfig(train=path, cache_dir=str(tmp_path / "cache"))
    lower = make_byte_tokenizer()
    lower._tokenizer.normalizer = normalizers.Lowercase()
    assert lower.get_vocab() == tok.get_vocab()
    first = load_blocks(cfg, tok, 8)
    want = pack_rows(read_token_rows(path, lower), 8, 2)["input_ids"]
    assert torch.equal(load_blocks(cfg, lower, 8)["input_ids"], want)
    assert not torch.equal(load_blocks(cfg, lower, 8)["input_ids"], first["input_ids"])
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # each entry says what made it


def _with_provenance(path, tokenizer_fp, output=None):
    write_json(provenance_path(path), {"tokenizer": tokenizer_fp, "output": output or data_fingerprint(path)})


def test_data_of_another_tokenizer_is_refused(tmp_path, tok):
    path = _write(tmp_path / "all_gen.jsonl", [{"text": "ab", "token_ids": [5, 6, 7, 8]}] * 40)
    _with_provenance(path, "tok:0123456789abcdef")
    cfg = DataConfig(train=path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=rf"tok:0123456789abcdef.*{tokenizer_fingerprint(tok)}"):
        load_blocks(cfg, tok, 8)


def test_token_ids_without_provenance_warn(tmp_path, tok, caplog):
    path = _write(tmp_path / "all_gen.jsonl", [{"text": "ab", "token_ids": [5, 6, 7, 8]}] * 4)
    with caplog.at_level(logging.WARNING):
        load_blocks(DataConfig(train=path, cache_dir=str(tmp_path / "c1")), tok, 8)
    assert "no provenance" in caplog.text
    caplog.clear()
    _with_provenance(path, tokenizer_fingerprint(tok))  # the merged file's record, same tokenizer: silent
    with caplog.at_level(logging.WARNING):
        blocks = load_blocks(DataConfig(train=path, cache_dir=str(tmp_path / "c2")), tok, 8)
    assert caplog.text == "" and blocks["input_ids"].shape == (2, 8)


def test_a_stale_provenance_is_ignored(tmp_path, tok, caplog):
    """A record written for another content (the file was edited after the merge) says nothing."""
    path = _write(tmp_path / "all_gen.jsonl", [{"text": "ab", "token_ids": [5, 6, 7, 8]}] * 4)
    _with_provenance(path, "tok:0123456789abcdef", output="0" * 64)
    with caplog.at_level(logging.WARNING):
        load_blocks(DataConfig(train=path, cache_dir=str(tmp_path / "cache")), tok, 8)
    assert "changed after the merge" in caplog.text


@pytest.mark.parametrize("kwargs", [dict(val_fraction=1.0), dict(val_fraction=-0.1), dict(val_max_blocks=-1)])
def test_bad_data_config_values(kwargs):
    with pytest.raises(UserError, match="data.val_"):
        DataConfig(**kwargs)
