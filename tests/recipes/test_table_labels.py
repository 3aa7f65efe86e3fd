"""Table row labels (recipes/table.py `row_label`): each row says what made it, and one table can
hold two rows of a method (GPTQ calibrated on generated text and on WikiText-2).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_table_labels.py
"""

from __future__ import annotations

import json

import pytest

from quant.config import QuantConfig
from recipes.ptq import PTQConfig
from utils.config import ConfigError, load_config


def test_qat_rows_name_their_straight_through_estimator():
    from recipes.table import row_label

    assert row_label("qat", QuantConfig(w_bits=4, a_bits=8, kv_bits=8), name="w4a8kv8") == "QAT (w4a8kv8, identity STE)"
    assert row_label("qat", QuantConfig(w_bits=4, ste_clip=True), name="orig") == "QAT (orig, ste_clip)"


def test_rows_name_their_weight_quantizer():
    from recipes.table import row_label

    lsq = QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_quantizer="lsq")
    assert row_label("qat", lsq, name="lsq") == "QAT-LSQ (lsq, identity STE)"
    assert row_label("qat", QuantConfig(w_bits=4, w_quantizer="ternary"), name="t") == "QAT-ternary (t, identity STE)"
    assert row_label("rtn", QuantConfig(w_bits=4, w_quantizer="ternary")) == "RTN-ternary"
    assert row_label("rtn", QuantConfig(w_bits=4, w_init="mse")) == "RTN-MSE"
    assert row_label("rtn", QuantConfig(w_bits=4)) == "RTN"


def test_smoothquant_rows_name_the_variant_and_the_chosen_alpha(tmp_path):
    from recipes.ptq import read_ptq_meta
    from recipes.table import row_label

    q = QuantConfig(w_bits=8, a_bits=8, kv_bits=8)
    (tmp_path / "llmqat_meta.json").write_text(json.dumps({"smoothquant": {"alpha": 0.7},
                                                           "calibration": {"source": "data-free"}}))
    meta = read_ptq_meta(tmp_path)
    assert row_label("smoothquant", q, PTQConfig(method="smoothquant"), meta=meta) == \
        "SmoothQuant (data-free, alpha=0.7 (auto))"
    assert row_label("smoothquant", q, PTQConfig(method="smoothquant", smooth_down=True, alpha="0.5", calib="c4")) \
        == "SmoothQuant (c4, +down, alpha=0.5)"
    assert row_label("rtn", q) == "RTN" and read_ptq_meta(tmp_path / "none") == {}


def test_a_table_holds_data_free_and_wikitext2_gptq_rows(tmp_path, monkeypatch):
    import recipes.table as tables

    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"text": "x", "token_ids": [5], "start_id": 5}) + "\n")
    evaluated, built = [], []
    monkeypatch.setattr(tables, "row_results", lambda cfg, row, model, quant: evaluated.append(row) or
                        {"results": {"wikitext2": {"ppl": 30.0}}})
    monkeypatch.setattr(tables.ptq, "run", lambda pcfg: built.append(pcfg))
    cfg = load_config(tables.TableConfig, [
        "settings=[4-16-16]", "methods=[fp,rtn,gptq,gptq_wikitext2]", f"ptq.calib={gen}", f"cache_dir={tmp_path}",
        "ptq_overrides={gptq_wikitext2: {method: gptq, calib: wikitext2, calib_samples: 64}}",
        "eval.tasks=[wikitext2]", f"output={tmp_path / 'table.md'}"])
    rows = tables.run(cfg)
    assert [r["method"] for r in rows] == ["FP", "RTN", "GPTQ (data-free)", "GPTQ (wikitext2)"]
    assert [(p.method, p.calib, p.calib_samples) for p in built] == [("gptq", str(gen), 128), ("gptq", "wikitext2", 64)]
    assert evaluated == ["fp", "rtn-W4A16KV16", "gptq-W4A16KV16", "gptq_wikitext2-W4A16KV16"]
    with pytest.raises(ConfigError, match="variant"):
        load_config(tables.TableConfig, ["methods=[fp,gptq2]", "ptq_overrides={gptq2: {calib: c4}}"])


def test_table_notes_name_only_what_the_tasks_use():
    from recipes.evaluate import EvalConfig
    from recipes.table import TableConfig, notes

    ppl_only = notes(TableConfig(eval=EvalConfig(tasks=["wikitext2_val"], ppl_limit=32)))[0]
    assert "ppl_limit=32 windows, seqlen=2048" in ppl_only
    assert "examples per task" not in ppl_only and "accuracy" not in ppl_only

    mixed = TableConfig(eval=EvalConfig(tasks=["piqa", "hellaswag", "wikitext2"], limit=None,
                                        task_limits={"hellaswag": 1000, "siqa": 1000}))
    text = notes(mixed)[0]
    assert "limit=None examples per task, hellaswag 1000;" in text  # siqa is not in this table
    assert "ppl_limit=" in text and "acc_norm where defined" in text

    zero_shot = notes(TableConfig(eval=EvalConfig(tasks=["piqa"], limit=50)))[0]
    assert "limit=50 examples per task;" in zero_shot and "ppl_limit" not in zero_shot
