"""Evaluation / calibration text sources: a local data directory or the Hugging Face hub.

The local directory (config key `data_dir`, else the environment variable `LLMQAT_DATA_DIR`) is laid
out like `shared/data` (see its README.md): `wikitext2/test.jsonl`, `piqa/validation.jsonl`, ...
Without either, the Hugging Face `datasets` names are used (needs internet).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from quant.errors import InputFileError
from utils.io import read_jsonl

DATA_DIR_ENV = "LLMQAT_DATA_DIR"
C4_LOCAL_SUBSET = "c4/validation_subset_2000.jsonl"
C4_HUB = ("allenai/c4", "en/c4-validation.00000-of-00008.json.gz")  # (dataset, the validation file read)


def resolve_data_dir(data_dir: Optional[str]) -> Optional[Path]:
    """The local data directory to use, or None for the Hugging Face hub.

    Raises:
        FileNotFoundError: the configured / environment directory does not exist.
    """
    value = data_dir or os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        source = "data_dir" if data_dir else DATA_DIR_ENV
        raise InputFileError(f"{source}={value}: no such data directory")
    return path


def local_file(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise InputFileError(f"evaluation data file not found: looked for {path} (data_dir={data_dir})")
    return path


def wikitext2_rows(split: str = "test", data_dir: Optional[str] = None) -> list[str]:
    """The rows of WikiText-2 raw v1 (`test` or `validation`; `train` only from the hub)."""
    local = resolve_data_dir(data_dir)
    if local is not None:
        return [row["text"] for row in read_jsonl(local_file(local, f"wikitext2/{split}.jsonl"))]
    from datasets import load_dataset

    return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def wikitext2_text(split: str = "test", data_dir: Optional[str] = None) -> str:
    """The GPTQ / LLM-QAT perplexity text: rows joined with "\\n\\n"."""
    return "\n\n".join(wikitext2_rows(split, data_dir))


def c4_texts(data_dir: Optional[str] = None) -> list[str]:
    """C4 (en) validation documents (local: the 2000-document subset of shared/data)."""
    local = resolve_data_dir(data_dir)
    if local is not None:
        return [row["text"] for row in read_jsonl(local_file(local, C4_LOCAL_SUBSET))]
    from datasets import load_dataset

    return list(load_dataset(C4_HUB[0], data_files={"validation": C4_HUB[1]}, split="validation")["text"])
