"""utils/eval/report.py: table rows, recovered %, the one markdown + JSON writer.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/utils/eval/test_report.py
"""

from __future__ import annotations

import json

import pytest

from utils.eval.report import add_recovered, table_row, write_table


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
