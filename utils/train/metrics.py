"""Metrics sinks for training: a JSONL file always, plus TensorBoard or wandb when asked.

    logger = make_metrics_logger("tensorboard", "runs/x", config_dict)   # "none" | "tensorboard" | "wandb"
    logger.log({"loss": 1.2, "lr": 2e-5}, step=10)
    logger.close()

wandb runs offline unless WANDB_MODE is set (e.g. `WANDB_MODE=online` after `wandb login`). A sink
whose package is not installed becomes a null sink with a warning, never an import error mid-run.
Only rank 0 should build one (`NullLogger` elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from quant.errors import UserError

logger = logging.getLogger(__name__)

REPORT_TO = ("none", "tensorboard", "wandb")


class NullLogger:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(NullLogger):
    """Appends one JSON object per logging step to `metrics.jsonl`."""

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def log(self, metrics: dict, step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger(NullLogger):
    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger(NullLogger):
    """A wandb run under `out_dir/wandb/`; quiet, and it leaves stdout alone (console capture off)."""

    def __init__(self, out_dir, config: dict):
        import wandb

        # An explicit mode beats a stray `wandb online` settings file; only WANDB_MODE opts into the network.
        mode = os.environ.get("WANDB_MODE", "offline")
        settings = wandb.Settings(silent=True, console="off")
        self._run = wandb.init(project="llm-qat", dir=str(out_dir), config=config, name=Path(out_dir).name,
                               mode=mode, settings=settings)
        logger.info("wandb run (%s) in %s", mode, self._run.settings.sync_dir)

    def log(self, metrics: dict, step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiLogger(NullLogger):
    def __init__(self, sinks):
        self._sinks = list(sinks)

    def log(self, metrics: dict, step: int) -> None:
        for sink in self._sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


def make_metrics_logger(report_to: str, out_dir, config: dict) -> NullLogger:
    """JSONL in `out_dir/metrics.jsonl` plus the `report_to` sink (null if its package is missing)."""
    if report_to not in REPORT_TO:
        raise UserError(f"unknown report_to {report_to!r}; use one of {REPORT_TO}")
    sinks = [JsonlLogger(Path(out_dir) / "metrics.jsonl")]
    try:
        if report_to == "tensorboard":
            sinks.append(TensorBoardLogger(Path(out_dir) / "tensorboard"))
        elif report_to == "wandb":
            sinks.append(WandbLogger(out_dir, config))
    except ImportError as err:
        logger.warning("report_to=%s needs a package that is not installed (%s); not logging there", report_to, err)
    return MultiLogger(sinks)
