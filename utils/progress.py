"""Stage headers with elapsed time and an ETA, for multi-stage jobs (the main job, recipes/pipeline.py).

    clock = StageClock({"generate": 120.0, "train": 400.0})     # rough seconds per stage
    with clock.stage("generate", "2 shards -> gen_data") as stage:
        if done_already:
            stage.skip("all shards complete")

ETA = the estimates of the stages not finished yet, times (seconds taken / estimate) of the stages
that ran so far, so a faster or slower machine corrects it after one stage.
"""

from __future__ import annotations

import contextlib
import logging
import time

logger = logging.getLogger(__name__)


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class _Stage:
    def __init__(self):
        self.skipped = False

    def skip(self, reason: str) -> None:
        self.skipped = True
        logger.info("skip: %s", reason)


class StageClock:
    """Logs `stage i/n name` headers, elapsed time and ETA; records each stage's seconds in `timings`."""

    def __init__(self, estimates: dict[str, float]):
        self.estimates, self.start = estimates, time.perf_counter()
        self.spent = self.planned = 0.0
        self.timings: dict[str, dict] = {}

    def eta(self) -> float:
        left = sum(v for k, v in self.estimates.items() if k not in self.timings)
        return left * (self.spent / self.planned if self.planned else 1.0)

    @contextlib.contextmanager
    def stage(self, name: str, what: str):
        names = list(self.estimates)
        head = f"stage {names.index(name) + 1}/{len(names)} {name}"
        logger.info("==== %s: %s", head, what)
        logger.info("elapsed %s | ETA ~%s (rough)", hms(time.perf_counter() - self.start), hms(self.eta()))
        stage, t0 = _Stage(), time.perf_counter()
        yield stage
        seconds = time.perf_counter() - t0
        if not stage.skipped:
            self.spent, self.planned = self.spent + seconds, self.planned + self.estimates[name]
        self.timings[name] = {"seconds": round(seconds, 1), "skipped": stage.skipped}
        logger.info("==== %s %s in %s", head, "skipped" if stage.skipped else "done", hms(seconds))
