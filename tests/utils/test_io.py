"""utils/io.py: atomic writes give the final file the user's umask (not mkstemp's 0600) and leave
no temporary file behind on failure.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/test_io.py
"""

import os
import stat

import pytest

from utils.io import atomic_open, atomic_write_text, default_mode, write_json


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_writes_get_the_users_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_text(tmp_path / "b.txt", "text")
    with atomic_open(tmp_path / "c.bin", "wb") as f:
        f.write(b"\0")
    for name in ("a.json", "b.txt", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert default_mode() == mode and default_mode(directory=True) == 0o777 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == '{\n  "old": true\n}\n' and os.listdir(tmp_path) == ["r.json"]
