"""scripts/ablation_texts.py: the data ablation's real-text sets, written once and verified after."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablation_texts", ROOT / "scripts" / "ablation_texts.py")
at = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(at)


@pytest.fixture
def fake_sets(monkeypatch):
    sets = {"wikitext2_val": [" = Heading = \n", " a row \n"], "c4_short": ["doc one", "doc \"two\""]}
    monkeypatch.setattr(at, "ablation_sets", lambda data_dir: {k: list(v) for k, v in sets.items()})
    return sets


def test_writes_one_jsonl_row_per_text_then_keeps_it(tmp_path, fake_sets):
    lines = at.write_sets(tmp_path, None)
    assert [line.endswith("(written)") for line in lines] == [True, True]
    for name, rows in fake_sets.items():
        got = [json.loads(x)["text"] for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert got == rows
    assert all(line.endswith("(kept)") for line in at.write_sets(tmp_path, None))


def test_refuses_a_file_with_other_rows(tmp_path, fake_sets):
    (tmp_path / "c4_short.jsonl").write_text(json.dumps({"text": "stale"}) + "\n")
    with pytest.raises(SystemExit, match="exists with other rows"):
        at.write_sets(tmp_path, None)
    assert (tmp_path / "c4_short.jsonl").read_text() == json.dumps({"text": "stale"}) + "\n"


def test_real_sets_match_the_documented_sizes():
    data = ROOT.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip("no local data folder")
    sets = at.ablation_sets(str(data))
    assert len(sets["wikitext2_val"]) == at.WIKI_ROWS and len(sets["c4_short"]) == at.C4_DOCS
    assert all(r.strip() for r in sets["wikitext2_val"])
    assert all(len(t) < at.C4_MAX_CHARS for t in sets["c4_short"])
