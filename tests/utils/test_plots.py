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


def test_recovered_plot_is_written_and_refuses_rows_without_it(tmp_path):
    from utils.plots import save_recovered_plot

    rows = [{"method": "QAT (w4a8kv8)", "setting": "4-8-8", "recovered_ppl": 60.0},
            {"method": "GPTQ", "setting": "4-8-8", "recovered_ppl": 35.0},
            {"method": "QAT (w4a8kv4)", "setting": "4-8-4", "recovered_ppl": 66.0}]
    path = save_recovered_plot(rows, tmp_path / "rec.png", "recovered")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="recovered_ppl"):
        save_recovered_plot([{"method": "FP", "setting": "16-16-16"}], tmp_path / "none.png", "x")


def test_training_curves_plot_one_line_per_run(tmp_path):
    from utils.plots import save_training_curves

    runs = {}
    for name, losses in (("4-8-8", [0.6, 0.3, 0.28]), ("4-8-4", [1.0, 0.5, 0.44]), ("no-eval", None)):
        rows = [{"step": 10 * i, **({"val_kd_loss": v} if losses else {"loss": 1.0})}
                for i, v in enumerate(losses or [1, 2])]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = tmp_path / f"{name}.jsonl"
    path = save_training_curves(runs, tmp_path / "curves.png", "held-out")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="val_kd_loss"):
        save_training_curves({"no-eval": runs["no-eval"]}, tmp_path / "none.png", "x")
