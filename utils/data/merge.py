"""Merging generated shards: validate every line, drop exact duplicates, shuffle, write atomically.

Every line of every shard is checked (a JSON object with a `text` string and a non-empty
`token_ids` list of non-negative ints; a bad line stops the merge with its file:line unless
`skip_bad`). Exact duplicates are dropped, the rest shuffled with `seed` and written through a
temporary file and a rename. The shards are streamed twice (check, then copy by byte offset).
Before any line is read, the shards' metadata (`gen.chunk.XX.meta.json`) must agree on everything
that made their records (model and its fingerprint, tokenizer fingerprint, max_length, sampling,
seed, ...; only `shard` may differ), else the merge is refused, naming the keys and the shards,
unless `allow_mixed` (then the mix is recorded). Top-K sidecars (teacher_topk=K) are checked block
by block and copied in the shuffled order to `all_gen.topk.bin` (utils/data/topk.py). Zero records
are refused (an existing output stays). `*.provenance.json` records the merge config, each shard's
fingerprint, the shards' common model and tokenizer fingerprints, `teacher_topk` (0: none) and the
output's fingerprint; training reads it to refuse another tokenizer's data. Recipe: recipes/merge.py.
The statistics (lengths, EOS share, distinct start ids and n-grams) are counted in the same pass.
Long file: the checks, the copy and the statistics of the one pass over the shards stay together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from quant.errors import InputFileError, UserError
from utils.data.shards import SHARD_GLOB, read_meta
from utils.data.stats_report import ngram_text
from utils.data.topk import SidecarReader, shards_topk, write_merged
from utils.io import JsonlError, atomic_open, write_json
from utils.logging import progress_disabled
from utils.provenance import data_fingerprint, differing_keys, provenance

logger = logging.getLogger(__name__)

_SHARD_INDEX = re.compile(r"gen\.chunk\.(\d+)\.jsonl$")

NGRAM_SIZES = (1, 2, 4)  # the data statistics report distinct n-grams / n-grams for these n
SAMPLES, SAMPLE_CHARS = 3, 400  # the statistics quote the first records of the shuffled output


@dataclass
class _Entry:
    shard: int  # index into the list of shard files
    offset: int
    length: int


@dataclass
class MergeStats:
    shards: list = field(default_factory=list)
    records: int = 0
    tokens: int = 0
    duplicates: int = 0
    bad_lines: int = 0
    lengths: Counter = field(default_factory=Counter)
    finish: Counter = field(default_factory=Counter)
    missing_shards: list = field(default_factory=list)
    incomplete_shards: dict = field(default_factory=dict)
    mixed: dict = field(default_factory=dict)  # differing key -> {shard: value}; "no_metadata" -> shards
    start_ids: set = field(default_factory=set)
    ngrams: dict = field(default_factory=lambda: {n: set() for n in NGRAM_SIZES})  # n -> hashes of distinct n-grams
    ngram_count: Counter = field(default_factory=Counter)  # n -> n-grams seen


def find_shards(in_dir) -> list[Path]:
    """The shard files in `in_dir`, by shard index.

    Raises:
        FileNotFoundError: no such directory, or no `gen.chunk.*.jsonl` in it.
    """
    folder = Path(in_dir)
    if not folder.is_dir():
        raise InputFileError(f"in_dir={in_dir}: no such directory")
    shards = [p for p in folder.glob(SHARD_GLOB) if _SHARD_INDEX.search(p.name)]
    if not shards:
        raise InputFileError(f"no shard files ({SHARD_GLOB}) in {folder}")
    return sorted(shards, key=lambda p: int(_SHARD_INDEX.search(p.name).group(1)))


def check_record(line: bytes) -> dict:
    """Parse and validate one line; raise ValueError saying what is wrong."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not isinstance(record.get("text"), str):
        raise ValueError("no 'text' string")
    ids = record.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise ValueError("no non-empty 'token_ids' list")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError("'token_ids' must hold non-negative integers")
    return record


def _scan(paths: list[Path], skip_bad: bool, stats: MergeStats, blocks: SidecarReader) -> list[_Entry]:
    """Validate every line (and top-K block); return each distinct record's first occurrence ("topk" ignored)."""
    seen, entries = set(), []
    for index, path in enumerate(tqdm(paths, desc="check shards", unit="shard", disable=progress_disabled())):
        offset, counts = 0, Counter()
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("partial last line (an interrupted shard: run it again to repair)")
                    record = check_record(line)
                    blocks.check(index, record, f"{path}:{lineno}")
                except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                    if not skip_bad:
                        raise JsonlError(f"{path}:{lineno}: bad record ({err}); fix it or merge with "
                                         f"skip_bad=true") from None
                    logger.warning("%s:%d: skipping bad record (%s)", path, lineno, err)
                    stats.bad_lines += 1
                    continue
                counts["lines"] += 1
                unique = {k: v for k, v in record.items() if k != "topk"}
                digest = hashlib.sha1(json.dumps(unique, sort_keys=True).encode()).digest()
                if digest in seen:
                    stats.duplicates += 1
                    continue
                seen.add(digest)
                entries.append(_Entry(index, start, len(line)))
                _count(record, stats)
        _check_complete(path, counts["lines"], stats)
    return entries


def _count(record: dict, stats: MergeStats) -> None:
    ids = record["token_ids"]
    n = len(ids)
    if "start_id" in record:
        stats.start_ids.add(record["start_id"])
    for size in NGRAM_SIZES:  # diversity: distinct n-grams / n-grams, over the whole set
        grams = [hash(tuple(ids[i : i + size])) for i in range(n - size + 1)]
        stats.ngrams[size].update(grams)
        stats.ngram_count[size] += len(grams)
    stats.records += 1
    stats.tokens += n
    stats.lengths[1 << (n - 1).bit_length()] += 1  # bucket: the next power of two >= n
    stats.finish[record.get("finish", "?")] += 1


def _check_complete(path: Path, lines: int, stats: MergeStats) -> None:
    meta = read_meta(path) or {}
    expected = meta.get("n_expected")
    if expected is not None and lines < expected:
        stats.incomplete_shards[path.name] = f"{lines}/{expected}"


def missing_shards(paths: list[Path]) -> list[int]:
    """Shard indices absent from `paths`: gaps, and past the last one when the metadata says how
    many shards cover the vocabulary (ceil(vocab_size / n_vocab))."""
    present = {int(_SHARD_INDEX.search(p.name).group(1)) for p in paths}
    total = max(present) + 1
    for p in paths:
        settings = (read_meta(p) or {}).get("settings", {})
        if settings.get("vocab_size") and settings.get("n_vocab"):
            total = max(total, -(-settings["vocab_size"] // settings["n_vocab"]))
    return sorted(set(range(total)) - present)


def _write(paths: list[Path], entries: list[_Entry], output: Path) -> None:
    """Copy the entries' lines, in order, into a temporary file, then rename it to `output`."""
    files = [p.open("rb") for p in paths]
    try:
        with atomic_open(output, "wb") as out:
            for e in tqdm(entries, desc="write", unit="rec", disable=progress_disabled()):
                files[e.shard].seek(e.offset)
                out.write(files[e.shard].read(e.length))
    finally:
        for f in files:
            f.close()


def merge_shards(in_dir, output: Path, seed: int, skip_bad: bool, allow_mixed: bool = False,
                 config: Optional[dict] = None) -> MergeStats:
    """Check, dedup, shuffle and write the shards of `in_dir` to `output`; return the statistics.
    Writes `output`'s statistics (`*.stats.json`) and provenance (`*.provenance.json`, with `config`).

    Raises:
        FileNotFoundError: no shards. JsonlError: a bad line (file:line) without skip_bad.
        UserError: shards made with different settings, or without metadata (unless allow_mixed);
            no record at all.
    """
    paths = find_shards(in_dir)
    stats = MergeStats(shards=[p.name for p in paths])
    metas = {p.name: read_meta(p) for p in paths}
    stats.mixed, k = check_settings(metas, allow_mixed), shards_topk(paths, metas)
    with SidecarReader(paths if k else []) as blocks:
        entries = _scan(paths, skip_bad, stats, blocks)
    if not entries:
        raise UserError(f"no records in the shards of {in_dir}: nothing to merge ({output} left as it was)")
    random.Random(seed).shuffle(entries)
    (write_merged if k else _write)(paths, entries, output)
    stats.missing_shards = missing_shards(paths)
    write_json(provenance_path(output), {**merge_provenance(config or {}, paths, metas, stats.mixed, output),
                                         "teacher_topk": k})
    info = {**summary(stats, output), "samples": samples(output)}
    write_json(output.with_suffix(".stats.json"), info)  # last: recipes.merge.is_current
    return stats


def _identity(meta: dict) -> dict:
    """What made a shard's records: its settings (but `shard`), its inputs' and tokenizer's fingerprints."""
    prov = meta.get("provenance") or {}
    return {**meta.get("settings", {}), "inputs": prov.get("inputs") or {}, "tokenizer": prov.get("tokenizer")}


def check_settings(metas: dict, allow_mixed: bool) -> dict:
    """{} when every shard has metadata with the same settings; else, with `allow_mixed`, what
    differs ({key: {shard: value}}, "no_metadata": [shards]).

    Raises:
        UserError: differing settings or shards without metadata, without allow_mixed (names them).
    """
    mixed: dict = {}
    known = {name: _identity(meta) for name, meta in metas.items() if meta}
    if len(known) < len(metas):
        mixed["no_metadata"] = sorted(set(metas) - set(known))
    first = next(iter(known.values()), {})
    # the model's name may differ (a moved or copied folder) when its content fingerprint is known
    ignore = ("shard", "model") if all(_get(i, "inputs.model") for i in known.values()) else ("shard",)
    for key in sorted({k for ident in known.values() for k in differing_keys(first, ident, ignore)}):
        mixed[key] = {name: _get(ident, key) for name, ident in known.items()}
    if mixed and not allow_mixed:
        raise UserError(f"the shards were not made alike: {_describe(mixed)}; regenerate them, or merge them "
                        f"anyway with allow_mixed=true (recorded in the provenance)")
    if mixed:
        logger.warning("merging shards made with different settings (allow_mixed=true): %s", _describe(mixed))
    return mixed


def _get(ident: dict, dotted: str):
    for part in dotted.split("."):
        ident = ident.get(part) if isinstance(ident, dict) else None
    return ident


def _describe(mixed: dict) -> str:
    parts = [f"{key} differs ({', '.join(f'{n}: {v!r}' for n, v in values.items())})"
             for key, values in mixed.items() if key != "no_metadata"]
    if "no_metadata" in mixed:
        parts.append(f"no metadata (*.meta.json), so unknown settings: {', '.join(mixed['no_metadata'])}")
    return "; ".join(parts)


def provenance_path(data_file) -> Path:
    """Where a merged data file's provenance record lives: all_gen.jsonl -> all_gen.provenance.json."""
    return Path(data_file).with_suffix(".provenance.json")


def _common(metas: dict, key: str):
    """The value of `key` (dotted) in every shard's identity if they all agree, else None."""
    values = [_get(_identity(m), key) if m else None for m in metas.values()]
    return values[0] if all(v == values[0] for v in values) else None


def merge_provenance(config: dict, paths: list[Path], metas: dict, mixed: dict, output: Path) -> dict:
    """The merged file's provenance: merge config, shard fingerprints, the shards' common model and
    tokenizer fingerprints (None when mixed or unknown), what was mixed, and the output's fingerprint."""
    inputs = {"model": _common(metas, "inputs.model"),
              "shards": {p.name: data_fingerprint(p) for p in paths}}
    record = provenance(config, inputs=inputs)
    record.update(tokenizer=_common(metas, "tokenizer"), settings=_shared_settings(metas), mixed=mixed,
                  output=data_fingerprint(output))
    return record


def _shared_settings(metas: dict) -> dict:
    """The generation settings every shard shares (`shard` and differing keys left out)."""
    settings = [(m or {}).get("settings", {}) for m in metas.values()]
    return {k: v for k, v in settings[0].items() if k != "shard" and all(s.get(k) == v for s in settings)}


def summary(stats: MergeStats, output: Path) -> dict:
    return {"output": str(output), "shards": len(stats.shards), "records": stats.records, "tokens": stats.tokens,
            "mean_tokens": round(stats.tokens / max(stats.records, 1), 1), "duplicates_dropped": stats.duplicates,
            "bad_lines_skipped": stats.bad_lines, "finish": dict(stats.finish),
            "length_histogram": {f"<={k}": v for k, v in sorted(stats.lengths.items())},
            "missing_shards": stats.missing_shards, "incomplete_shards": stats.incomplete_shards,
            "mixed": stats.mixed, "distinct_start_ids": len(stats.start_ids),
            "distinct_tokens": len(stats.ngrams.get(1, ())),
            "eos_share": round(stats.finish.get("eos", 0) / max(stats.records, 1), 4),
            "distinct_ngrams": {str(k): round(len(v) / max(stats.ngram_count[k], 1), 4) for k, v in stats.ngrams.items()}}


def samples(output: Path, count: int = SAMPLES, chars: int = SAMPLE_CHARS) -> list[dict]:
    """The first `count` records of the merged (shuffled) file, their text cut at `chars` characters."""
    found = []
    with output.open() as f:
        for line in f:
            if len(found) == count:
                break
            record = json.loads(line)
            found.append({**{k: record[k] for k in ("start_id", "greedy_len", "finish") if k in record},
                          "n_tokens": len(record["token_ids"]), "text": record["text"][:chars]})
    return found


def format_summary(info: dict) -> str:
    peak = max(info["length_histogram"].values(), default=1)
    lines = [f"merged {info['records']} records, {info['tokens']} tokens (mean {info['mean_tokens']}) from "
             f"{info['shards']} shards into {info['output']}",
             f"dropped {info['duplicates_dropped']} exact duplicates, skipped {info['bad_lines_skipped']} bad lines; "
             f"finish: {info['finish']}",
             f"{info['distinct_start_ids']} distinct start ids, {info['distinct_tokens']} distinct tokens; "
             f"EOS share {info['eos_share']:.1%}; distinct n-grams / n-grams: {ngram_text(info['distinct_ngrams'])}",
             "length histogram (tokens per record):"]
    lines += [f"  {k:>7} {v:8d} {'#' * max(1, round(40 * v / peak))}" for k, v in info["length_histogram"].items()]
    lines.append(f"missing shards: {_ranges(info['missing_shards']) or 'none'}")
    lines.append(f"incomplete shards: {info['incomplete_shards'] or 'none'}")
    if info.get("mixed"):
        lines.append(f"MIXED settings (allow_mixed=true): {_describe(info['mixed'])}")
    return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    """[2, 3, 4, 7] -> "2-4, 7"."""
    spans: list = []
    for i in indices:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
