"""utils/eval/report.py: table rows, recovered % and paired intervals, the one markdown + JSON writer.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/eval/test_report.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from utils.eval import stats
from utils.eval.report import add_recovered, markdown, table_row, write_table
from utils.eval.stats import binomial_stderr as stderr


def test_no_recovered_share_where_rtn_lost_nothing():

    rows = [{"method": "FP", "setting": "16-16-16", "avg": 41.8, "wikitext2": 24.0},
            {"method": "RTN", "setting": "4-8-4", "avg": 42.8, "wikitext2": 106.0},  # noise: above FP
            {"method": "QAT (x)", "setting": "4-8-4", "avg": 40.5, "wikitext2": 49.0}]
    add_recovered(rows)
    assert "recovered" not in rows[2] and rows[2]["recovered_ppl"] == pytest.approx(100 * 57 / 82)


def test_write_table_shows_only_present_columns_and_writes_rows_json(tmp_path):
    results = {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "wikitext2": {"ppl": 30.0}}
    rows = [table_row("FP", "16-16-16", results, ["piqa", "wikitext2"])]
    assert rows[0]["piqa"] == pytest.approx(70.0) and rows[0]["avg"] == pytest.approx(70.0)
    text = write_table(rows, ["piqa", "wikitext2"], tmp_path / "t.md", notes=["a note"])
    assert text.splitlines()[0] == "| Method | W-A-KV | PIQA | Avg | Wiki2 ppl |"
    assert "| FP | 16-16-16 | 70.0 | 70.0 | 30.00 |" in text and text.rstrip().endswith("a note")
    assert json.loads((tmp_path / "t.json").read_text()) == rows


def _results(acc: str, nll: list, n_windows_tokens: int = 31) -> dict:
    """Results of one evaluation with per-example outcomes (a '0'/'1' string) and per-window NLLs."""
    p, n = acc.count("1") / len(acc), len(acc)
    return {"piqa": {"acc": p, "acc_norm": p, "acc_norm_stderr": stderr(p, n), "n": n,
                     "per_example": {"acc": acc, "acc_norm": acc}},
            "wikitext2": {"ppl": math.exp(sum(nll) / (n_windows_tokens * len(nll))), "ppl_ci95": [1.0, 2.0],
                          "n": len(nll), "per_window": {"nll": nll, "tokens": [n_windows_tokens] * len(nll)}}}


def _rows(fp: dict, rtn: dict, qat: dict) -> list:
    tasks = ["piqa", "wikitext2"]
    rows = [table_row("FP", "16-16-16", fp, tasks), table_row("RTN", "4-8-8", rtn, tasks),
            table_row("QAT", "4-8-8", qat, tasks)]
    add_recovered(rows)
    return rows


def test_recovered_carries_a_paired_interval_and_tables_show_it_with_n(tmp_path):
    fp = _results("1" * 180 + "0" * 20, [100.0, 110.0, 120.0, 130.0] * 4)
    rtn = _results("1" * 100 + "0" * 100, [130.0, 140.0, 150.0, 160.0] * 4)
    qat = _results("1" * 160 + "0" * 40, [106.0, 116.0, 127.0, 136.0] * 4)
    rows = _rows(fp, rtn, qat)
    qat_row = rows[2]
    lo, hi = qat_row["recovered_ci95"]
    assert qat_row["recovered"] == pytest.approx(75.0) and 0 < lo <= 75.0 <= hi
    assert qat_row["vs_rtn"]["avg"]["diff"] == pytest.approx(30.0) and qat_row["vs_rtn"]["avg"]["ci95"][0] > 0
    assert "ci95" in rows[1]["vs_fp"]["wikitext2"] and "recovered_ci95" not in rows[1]
    text = write_table(rows, ["piqa", "wikitext2"], tmp_path / "t.md")
    assert f"| {qat_row['recovered']:.0f} [{lo:.0f}, {hi:.0f}] |" in text and " n.s. |" not in text
    assert "n per task: PIQA 200, Wiki2 ppl 16 windows" in text and "| QAT | 4-8-8 | RTN | +30.0 [" in text
    assert "90.0 ± 2.1" in text  # accuracy ± its binomial standard error
    assert all("_samples" not in r for r in json.loads((tmp_path / "t.json").read_text()))


def test_recovered_is_not_significant_where_its_interval_spans_zero():
    rng = np.random.default_rng(0)
    flips = "".join(rng.choice(["0", "1"], 50))
    fp = _results("1" * 30 + "0" * 20, [100.0] * 4)
    rtn = _results("1" * 27 + "0" * 23, [101.0] * 4)  # at n = 50, 3 points of gap are noise
    qat = _results(flips, [100.5] * 4)
    rows = _rows(fp, rtn, qat)
    assert stats.spans_zero(rows[2]["recovered_ci95"])
    assert f"{rows[2]['recovered']:.0f} [" in markdown(rows, ["piqa"]) and " n.s. |" in markdown(rows, ["piqa"])


def test_paired_interval_of_identical_rows_is_zero():
    same = _results("1100101110" * 5, [100.0, 120.0, 90.0])
    rows = [table_row("FP", "16-16-16", same, ["piqa", "wikitext2"]),
            table_row("RTN", "4-8-8", same, ["piqa", "wikitext2"])]
    add_recovered(rows)
    assert rows[1]["vs_fp"]["piqa"] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    assert rows[1]["vs_fp"]["wikitext2"] == {"diff": 0.0, "ci95": [0.0, 0.0]}


def test_rows_without_per_example_data_show_no_interval_and_no_recovered():
    """Old cached results (no per_example / per_window) and rows on other examples: no interval
    rather than a wrong one, so no recovered % in the markdown (the point stays in the JSON row)."""
    old = {"piqa": {"acc": 0.5, "acc_norm": 0.5}, "wikitext2": {"ppl": 80.0}}
    fp = _results("1" * 35 + "0" * 15, [100.0] * 4)
    rows = _rows(fp, old, _results("1" * 30 + "0" * 20, [102.0] * 4))
    assert rows[2]["recovered"] == pytest.approx(50.0) and "recovered_ci95" not in rows[2]
    assert "ci95" not in rows[2]["vs_rtn"]["avg"] and "ci95" in rows[2]["vs_fp"]["avg"]
    text = markdown(rows, ["piqa", "wikitext2"])
    assert "recovered %" not in text.splitlines()[0] and "No paired interval" in text and "RTN 4-8-8" in text
    other_n = _rows(fp, _results("1" * 20 + "0" * 20, [110.0] * 4), _results("1" * 30 + "0" * 20, [102.0] * 4))
    assert "recovered_ci95" not in other_n[2] and "ci95" in other_n[2]["vs_rtn"]["wikitext2"]
