"""scripts/data_archive.py: the committed data set is restored byte for byte, or not at all."""

import importlib.util
import json
import lzma
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("data_archive", ROOT / "scripts" / "data_archive.py")
data_archive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(data_archive)

ROWS = [{"text": "a b", "token_ids": [1, 2]}, {"text": "c", "token_ids": [3]}]


@pytest.fixture
def merged(tmp_path):
    """A merged file and a results folder whose provenance names it (as the data stage leaves them)."""
    data = tmp_path / "gen_data" / "all_gen.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "data.provenance.json").write_text(json.dumps({"output": data_archive.data_fingerprint(data)}))
    (folder / "data.stats.json").write_text(json.dumps({"records": 2}))
    return data, folder


def test_pack_then_unpack_restores_the_same_bytes_with_their_records(merged, tmp_path):
    data, folder = merged
    archive = data_archive.pack(data, folder)
    assert archive == folder / "all_gen.jsonl.xz" and archive.is_file()
    out = tmp_path / "fresh" / "all_gen.jsonl"
    assert data_archive.main(["unpack", str(folder), str(out)]) == 0
    assert out.read_bytes() == data.read_bytes()
    assert json.loads(out.with_suffix(".provenance.json").read_text())["output"] == data_archive.data_fingerprint(out)
    assert json.loads(out.with_suffix(".stats.json").read_text()) == {"records": 2}
    assert data_archive.unpack(folder, out) is False  # already there: nothing rewritten


def test_pack_refuses_a_file_that_is_not_the_recorded_set(merged):
    data, folder = merged
    data.write_text(data.read_text() + '{"text": "extra"}\n')
    with pytest.raises(data_archive.ArchiveError, match="is not the data set"):
        data_archive.pack(data, folder)
    assert not (folder / "all_gen.jsonl.xz").exists()


def test_unpack_writes_nothing_from_an_archive_with_other_bytes(merged, tmp_path):
    data, folder = merged
    with lzma.open(folder / "all_gen.jsonl.xz", "wb") as f:
        f.write(b'{"text": "not it"}\n')
    out = tmp_path / "fresh" / "all_gen.jsonl"
    with pytest.raises(data_archive.ArchiveError, match="not the recorded"):
        data_archive.unpack(folder, out)
    assert list(out.parent.iterdir()) == []


def test_unpack_never_overwrites_a_different_existing_file(merged, capsys):
    data, folder = merged
    data_archive.pack(data, folder)
    data.write_text('{"text": "my own data"}\n')
    assert data_archive.main(["unpack", str(folder), str(data)]) == 2
    assert "not overwritten" in capsys.readouterr().err
    assert data.read_text() == '{"text": "my own data"}\n'


def test_a_folder_without_provenance_is_refused(tmp_path):
    with pytest.raises(data_archive.ArchiveError, match="no provenance"):
        data_archive.unpack(tmp_path, tmp_path / "all_gen.jsonl")
