"""Keep a merged data set in the repository as an xz archive beside its provenance, and restore it.

The §11.1 set (1.16M tokens) takes about an hour to generate on 2 CPU cores, and every QAT row of
issue 18 trains on it. The archive holds the merged file's exact bytes: `unpack` refuses to write
anything whose sha256 differs from the `output` fingerprint of the committed provenance record, so a
restored file is the file the committed results were keyed on, never a look-alike.

    python scripts/data_archive.py pack   gen_data/all_gen.jsonl results/2026-12-03-issue18-data
    python scripts/data_archive.py unpack results/2026-12-03-issue18-data gen_data/all_gen.jsonl

The folder holds `data.provenance.json` and `data.stats.json` (as the `data` stage of
scripts/run_reproduction.sh copies them) and `all_gen.jsonl.xz`. `unpack` writes the data file and,
beside it, `*.provenance.json` / `*.stats.json`, as merge_gen_data.py would have; an existing data
file is left alone when it is the same content and refused when it differs.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.provenance import data_fingerprint  # noqa: E402  (the definition behind the record's `output`)

ARCHIVE = "all_gen.jsonl.xz"
PROVENANCE = "data.provenance.json"
STATS = "data.stats.json"


class ArchiveError(Exception):
    """A missing record, or bytes that are not the recorded data set."""


def recorded_fingerprint(folder: Path) -> str:
    """The `output` fingerprint (sha256 of the merged file) in the folder's provenance record."""
    record = folder / PROVENANCE
    if not record.is_file():
        raise ArchiveError(f"{record} not found: the archive has no provenance to be checked against")
    output = json.loads(record.read_text()).get("output")
    if not output:
        raise ArchiveError(f"{record} has no 'output' fingerprint")
    return output


def pack(data: Path, folder: Path) -> Path:
    """Compress `data` into folder/all_gen.jsonl.xz if it is the data set the folder's provenance names."""
    if not data.is_file():
        raise ArchiveError(f"{data} not found")
    want, have = recorded_fingerprint(folder), data_fingerprint(data)
    if have != want:
        raise ArchiveError(f"{data} (sha256 {have[:16]}) is not the data set of {folder / PROVENANCE} "
                           f"({want[:16]}): not archived")
    out, tmp = folder / ARCHIVE, folder / (ARCHIVE + ".tmp")
    with open(data, "rb") as src, lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, out)
    return out


def unpack(folder: Path, data: Path) -> bool:
    """Restore folder's archive to `data` (with its provenance and statistics beside it).

    Returns False when `data` already holds the recorded content (nothing written), True when restored.

    Raises:
        ArchiveError: no archive / record; the archive's bytes are not the recorded data set; `data`
            exists with other content (it is not overwritten).
    """
    want = recorded_fingerprint(folder)
    archive = folder / ARCHIVE
    if data.is_file():
        if data_fingerprint(data) != want:
            raise ArchiveError(f"{data} exists and is not the data set of {folder / PROVENANCE}: move it away "
                               "first (it is not overwritten)")
        restored = False
    else:
        if not archive.is_file():
            raise ArchiveError(f"{archive} not found")
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = data.with_name(data.name + ".tmp")
        with lzma.open(archive, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        have = data_fingerprint(tmp)
        if have != want:
            tmp.unlink()
            raise ArchiveError(f"{archive} decompresses to sha256 {have[:16]}, not the recorded {want[:16]}: "
                               "nothing written")
        os.replace(tmp, data)
        restored = True
    shutil.copyfile(folder / PROVENANCE, data.with_suffix(".provenance.json"))
    if (folder / STATS).is_file():
        shutil.copyfile(folder / STATS, data.with_suffix(".stats.json"))
    return restored


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="DATA FOLDER: archive a merged data file into FOLDER")
    p.add_argument("data", type=Path)
    p.add_argument("folder", type=Path)
    u = sub.add_parser("unpack", help="FOLDER DATA: restore FOLDER's archive to DATA")
    u.add_argument("folder", type=Path)
    u.add_argument("data", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "pack":
            out = pack(args.data, args.folder)
            print(f"{args.data} ({args.data.stat().st_size:,} bytes) -> {out} ({out.stat().st_size:,} bytes)")
        else:
            restored = unpack(args.folder, args.data)
            print(f"{args.data}: {'restored from ' + str(args.folder / ARCHIVE) if restored else 'already there'}, "
                  "sha256 as recorded")
    except ArchiveError as err:
        print(f"data_archive.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
