"""`data.text_bos=true` (recipe=original): each row's text re-encoded with BOS first, no EOS added,
as the original LLM-QAT code's `tokenizer(text)` with LLaMA's tokenizer.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/data/test_blocks_text_bos.py
"""

import json

import pytest

from quant.errors import UserError
from tests.conftest import make_byte_tokenizer
from utils.data.blocks import DataConfig, load_blocks, read_text_bos_rows


def test_text_bos_re_encodes_the_text_with_bos_and_no_eos(tmp_path):
    tok = make_byte_tokenizer()
    path = tmp_path / "gen.jsonl"
    rows = [{"text": "abc", "token_ids": [9, 9, 9, 9]}, {"text": "de", "token_ids": [8]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    encode = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    bos = tok.bos_token_id
    assert read_text_bos_rows(str(path), tok) == [[bos] + encode("abc"), [bos] + encode("de")]
    stream = [bos] + encode("abc") + [bos] + encode("de")
    blocks = load_blocks(DataConfig(train=str(path), text_bos=True, cache_dir=str(tmp_path / "c")), tok, 3)
    assert blocks["input_ids"].flatten().tolist() == stream[: len(stream) // 3 * 3]
    default = load_blocks(DataConfig(train=str(path), cache_dir=str(tmp_path / "c")), tok, 3)
    assert default["input_ids"].flatten().tolist()[:5] == [9, 9, 9, 9, tok.eos_token_id]  # a separate cache entry
    path.write_text(json.dumps({"token_ids": [5, 6]}) + "\n")
    with pytest.raises(UserError, match="text_bos"):
        read_text_bos_rows(str(path), tok)
