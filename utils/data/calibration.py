"""Calibration windows for post-training quantization: random fixed-length slices of a token stream.

    ids = calibration_windows("gen_data/all_gen.jsonl", tokenizer, samples=128, seqlen=512, seed=0)

    fit, held_out = calibration_split("gen_data/all_gen.jsonl", tokenizer, 128, 512, seed=0, held_out=16)

`calib` is a generated-data JSONL (rows with `token_ids` or `text`; each row ends with EOS), or
`wikitext2` / `c4`. With a local data directory these are WikiText-2 *validation* (the local copy
has no train split) and the C4 validation subset, which the C4 perplexity also samples from.
`calibration_split` keeps the stream's last `held_out` x seqlen tokens apart as consecutive windows
(for choosing a hyperparameter such as SmoothQuant's alpha on text the fit never saw) and draws the
random windows from the rest. `calibration_source` names the data for table rows: `data-free` (a
JSONL of generated records, which carry `start_id`), `wikitext2`, `c4`, or the file's name.
`calibration_record` says what the stream is made of (source, split, the local file's content
fingerprint or the hub dataset): PTQ students record it, and a cached student whose record differs
from the current one is rebuilt (recipes/table.py), so a student calibrated on the hub's WikiText-2
*train* split is never reused where a local data directory gives *validation*.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import torch

from models.loading import file_fingerprint
from quant.errors import InputFileError, UserError
from utils.eval.datasets import C4_HUB, C4_LOCAL_SUBSET, c4_texts, local_file, resolve_data_dir, wikitext2_text
from utils.io import iter_jsonl

logger = logging.getLogger(__name__)

TEXT_SOURCES = ("wikitext2", "c4")
C4_HUB_FILE = ":".join(C4_HUB)


def _jsonl_stream(path: str, tokenizer) -> list:
    if not Path(path).is_file():
        raise InputFileError(f"calibration data not found: {path} (generate it, or set calib=wikitext2 / c4)")
    ids = []
    for lineno, row in iter_jsonl(path):
        if "token_ids" in row:
            ids += list(row["token_ids"])
        elif "text" in row:
            ids += tokenizer.encode(row["text"], add_special_tokens=False)
        else:
            raise UserError(f"{path}:{lineno}: a calibration row needs `token_ids` or `text`")
        ids.append(tokenizer.eos_token_id)
    return ids


def wikitext2_calibration_split(data_dir: Optional[str]) -> str:
    """`train` from the hub; `validation` with a local data directory (the local copy has no train split)."""
    return "validation" if resolve_data_dir(data_dir) is not None else "train"


def _text_stream(name: str, tokenizer, data_dir: Optional[str]) -> list:
    if name == "c4":
        return tokenizer.encode("\n\n".join(c4_texts(data_dir)), add_special_tokens=False)
    split = wikitext2_calibration_split(data_dir)
    logger.info("calibrating on WikiText-2 %s", split)
    return tokenizer.encode(wikitext2_text(split, data_dir), add_special_tokens=False)


def calibration_stream(calib: str, tokenizer, data_dir: Optional[str] = None) -> list:
    """The calibration token stream: a generated JSONL's rows (each + EOS), or WikiText-2 / C4 text."""
    return _text_stream(calib, tokenizer, data_dir) if calib in TEXT_SOURCES else _jsonl_stream(calib, tokenizer)


def calibration_source(calib: str) -> str:
    """`wikitext2` / `c4`, `data-free` for a JSONL of generated records, else the file's name."""
    if calib in TEXT_SOURCES:
        return calib
    try:
        first = next(iter_jsonl(calib), (0, {}))[1]
    except (OSError, ValueError):
        first = {}
    return "data-free" if "start_id" in first else Path(calib).name


def calibration_record(calib: str, data_dir: Optional[str] = None) -> dict:
    """What the calibration stream of `calib` is made of: {"source", "data"} for a JSONL (its content
    fingerprint), {"source", "split", "data"} for WikiText-2 / C4, where "data" is the local file's
    content fingerprint or `hub:<dataset>` (the data directory resolves as in utils/eval/datasets.py).

    Raises:
        InputFileError: the JSONL, the data directory or its file does not exist.
    """
    if calib not in TEXT_SOURCES:
        if not Path(calib).is_file():
            raise InputFileError(f"calibration data not found: {calib} (generate it, or set calib=wikitext2 / c4)")
        return {"source": calibration_source(calib), "data": "file:" + file_fingerprint(Path(calib))[:16]}
    local = resolve_data_dir(data_dir)
    if calib == "wikitext2":
        split = wikitext2_calibration_split(data_dir)
        where = f"wikitext2/{split}.jsonl" if local is not None else "wikitext:wikitext-2-raw-v1"
    else:
        split, where = "validation", C4_LOCAL_SUBSET if local is not None else C4_HUB_FILE
    data = "file:" + file_fingerprint(local_file(local, where))[:16] if local is not None else "hub:" + where
    return {"source": calib, "split": split, "data": data}


def _warn_coverage(ids: list, calib: str, samples: int, seqlen: int, min_tokens: int) -> None:
    covered = min(len(ids), samples * seqlen)
    logger.info("calibration: %d windows x %d tokens from %s (%d tokens)", samples, seqlen, calib, len(ids))
    if covered < min_tokens:
        logger.warning("calibration covers at most %d distinct tokens, fewer than %d: GPTQ's Hessians are then "
                       "poorly estimated and it can do worse than RTN on held-out text (measured on SmolLM2-135M "
                       "with 4k-16k tokens); use more data / calib_samples, or gptq_percdamp=0.1", covered,
                       min_tokens)


def _random_windows(ids: list, calib: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    if len(ids) <= seqlen:
        raise UserError(f"calibration data {calib} has {len(ids)} tokens, not more than calib_seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(samples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)


def calibration_windows(calib: str, tokenizer, samples: int, seqlen: int, seed: int,
                        data_dir: Optional[str] = None, min_tokens: int = 0) -> torch.Tensor:
    """[samples, seqlen] random windows of the calibration token stream (seeded).

    Warns when fewer than `min_tokens` distinct tokens can be covered (the stream or the windows
    are too short): see GPTQ in docs/evaluation.md.
    """
    ids = calibration_stream(calib, tokenizer, data_dir)
    _warn_coverage(ids, calib, samples, seqlen, min_tokens)
    return _random_windows(ids, calib, samples, seqlen, seed)


def calibration_split(calib: str, tokenizer, samples: int, seqlen: int, seed: int, data_dir: Optional[str] = None,
                      min_tokens: int = 0, held_out: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit [samples, seqlen] random windows, held-out [held_out, seqlen] windows): the held-out
    windows are the stream's last held_out x seqlen tokens, cut in order; the fit windows come from
    the tokens before them, so the two never overlap.

    Raises:
        UserError: the stream is too short to hold out that much and keep more than one window to fit.
    """
    ids = calibration_stream(calib, tokenizer, data_dir)
    cut = len(ids) - held_out * seqlen
    if held_out < 1 or cut <= seqlen:
        raise UserError(f"calibration data {calib} has {len(ids)} tokens: too few to hold out {held_out} windows "
                        f"of calib_seqlen={seqlen} and fit on the rest (lower alpha_holdout or calib_seqlen)")
    held = torch.tensor(ids[cut:], dtype=torch.long).view(held_out, seqlen)
    _warn_coverage(ids[:cut], calib, samples, seqlen, min_tokens)
    return _random_windows(ids[:cut], calib, samples, seqlen, seed), held
