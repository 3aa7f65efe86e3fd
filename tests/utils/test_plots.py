"""Plots render real PNGs from a run's files, and refuse empty input."""

import json

import pytest

from utils.plots import main, save_results_plot, save_training_curve


def _is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_training_curve_from_metrics_jsonl(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0 / s, "lr": 1e-4} for s in (10, 20, 30)] + [{"step": 30, "val_kd_loss": 0.2}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _is_png(save_training_curve(metrics, tmp_path / "curve.png"))
    metrics.write_text(json.dumps({"step": 1, "lr": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no 'loss'"):
        save_training_curve(metrics, tmp_path / "empty.png")


def test_table_cli_and_results_plot(tmp_path):
    rows = [{"method": "FP", "setting": "16-16-16", "piqa": 70.0, "avg": 50.0, "wikitext2": 24.1},
            {"method": "RTN", "setting": "4-8-8", "piqa": 60.0, "avg": 45.0, "wikitext2": 58.3}]
    table = tmp_path / "table.json"
    table.write_text(json.dumps(rows))
    assert main(["table", str(table), str(tmp_path / "t.png")]) == 0
    assert _is_png(tmp_path / "t.png")
    assert main(["nonsense"]) == 2
    with pytest.raises(ValueError, match="nothing to plot"):
        save_results_plot([{"method": "x"}], ["piqa"], tmp_path / "n.png", title="t")
