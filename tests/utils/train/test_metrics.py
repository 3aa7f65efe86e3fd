"""Metrics sinks write real files: TensorBoard events and an offline wandb run, read back here.

    PYTHONPATH=. pytest -q tests/utils/train/test_metrics.py
"""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pytest

from utils.train.metrics import MultiLogger, TensorBoardLogger, WandbLogger, make_metrics_logger

LINES = [({"loss": 2.0, "lr": 0.5}, 1), ({"loss": 1.5, "lr": 0.25}, 2), ({"loss": 0.75, "lr": 0.125}, 3)]  # exact in fp32


def _log_lines(sink) -> None:
    for metrics, step in LINES:
        sink.log(metrics, step)
    sink.close()


def _tensorboard_scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list(Path(log_dir).glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(out_dir, timeout_s: float = 30.0) -> dict:
    """`{step: {key: value}}` from the one offline run's .wandb file, waiting up to `timeout_s` for
    wandb's service process to flush it (it writes asynchronously; slow on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        history = _read_wandb_history(out_dir)
        if history or time.monotonic() > deadline:
            return history
        time.sleep(0.5)


def _read_wandb_history(out_dir) -> dict:
    """The history records of the .wandb file (LevelDB-style log of protobuf records)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = Path(out_dir).glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunk, history = path.read_bytes(), 7, b"", {}
    assert data[:7] == b":W&B\xe1\xbe\x00"  # magic, 0xBEE1, version 0
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            record, chunk = Record.FromString(chunk), b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No WANDB_MODE and no API key; any HTTP(S) attempt, from Python or wandb-core, reaches a local trap."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    trap = socket.create_server(("127.0.0.1", 0))
    trap.setblocking(False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{trap.getsockname()[1]}")
    wandb.teardown()  # a wandb-core left by an earlier test would not see this environment
    yield
    wandb.teardown()
    with pytest.raises(BlockingIOError):
        trap.accept()
    trap.close()


def test_tensorboard_writes_events_that_read_back(tmp_path):
    _log_lines(make_metrics_logger("tensorboard", tmp_path, {}))
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars == {key: [(step, m[key]) for m, step in LINES] for key in ("loss", "lr")}
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == [{"step": step, **m} for m, step in LINES]


def test_wandb_runs_offline_under_out_dir(tmp_path, offline_wandb, capsys):
    _log_lines(make_metrics_logger("wandb", tmp_path / "run", {"lr": 0.5}))
    assert _wandb_history(tmp_path / "run") == {step: m for m, step in LINES}
    assert "wandb:" not in capsys.readouterr().err  # silent: no banner, no prompt

    import wandb

    assert wandb.run is None  # close() finished the run


def test_multi_logger_feeds_tensorboard_and_wandb(tmp_path, offline_wandb):
    _log_lines(MultiLogger([TensorBoardLogger(tmp_path / "tensorboard"), WandbLogger(tmp_path, {})]))
    assert _tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(step, m["loss"]) for m, step in LINES]
    assert _wandb_history(tmp_path) == {step: m for m, step in LINES}


def test_missing_package_becomes_a_null_sink(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # `import wandb` raises ImportError
    _log_lines(make_metrics_logger("wandb", tmp_path, {}))
    assert "not installed" in caplog.text
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(LINES)
    assert not (tmp_path / "wandb").exists()
