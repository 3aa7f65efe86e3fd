"""Small, safe file I/O: JSONL reading with line numbers, atomic writes.

Atomic writes go through a temporary file beside the target (removed on any failure) and a rename;
the final file gets the mode a plain `open(path, "w")` would give it (0666 less the user's umask),
not mkstemp's private 0600, so a shared cluster group can read what a run wrote.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from quant.errors import InputFileError, UserError

PathLike = Union[str, os.PathLike]


class JsonlError(UserError):
    """A malformed JSONL line; the message names the file and the 1-based line number."""


def iter_jsonl(path: PathLike, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-empty line of a JSONL file.

    Raises:
        FileNotFoundError: no such file.
        JsonlError: a line that is not a JSON object (unless `skip_bad`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"file not found: {path}")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                if skip_bad:
                    continue
                raise JsonlError(f"{path}:{lineno}: malformed JSONL line ({err}): {line[:80]!r}") from None
            yield lineno, obj


def read_jsonl(path: PathLike, skip_bad: bool = False) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, skip_bad)]


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode `open()` / `mkdir()` would give a new file / folder: 0666 / 0777 less the umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


@contextmanager
def atomic_open(path: PathLike, mode: str = "w"):
    """Open a temporary file beside `path` for writing; on success fsync and rename it to `path`,
    on any error remove it: readers see the old file or the complete new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            os.fchmod(f.fileno(), default_mode())  # mkstemp makes it 0600
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: never a half-written file."""
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def newer(path: PathLike, *deps: PathLike) -> bool:
    """`path` exists and was written no earlier than every existing dependency."""
    path = Path(path)
    return path.is_file() and all(path.stat().st_mtime_ns >= Path(d).stat().st_mtime_ns
                                  for d in deps if Path(d).exists())
