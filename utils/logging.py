"""Logging helpers: one format everywhere, rank-0 printing, progress bars only on rank 0."""

from __future__ import annotations

import logging
import os
import sys


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def is_rank_zero() -> bool:
    return rank() == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Log `time level name: message` to stderr; other ranks only log warnings."""
    logging.basicConfig(
        level=level if is_rank_zero() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_rank_zero():
        print(*args, **kwargs, flush=True)


def progress_disabled() -> bool:
    """tqdm's `disable=` value: off on other ranks and when LLMQAT_NO_PROGRESS=1."""
    return not is_rank_zero() or os.environ.get("LLMQAT_NO_PROGRESS", "0") == "1"
