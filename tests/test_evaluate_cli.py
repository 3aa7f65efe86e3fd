"""evaluate.py: `model=... tasks=[...] limit=N seqlen=L w_bits= ... output=FILE` and its bad inputs.

    PYTHONPATH=. LLMQAT_DATA_DIR=../shared/data .venv/bin/python -m pytest -q tests/test_evaluate_cli.py
"""

from __future__ import annotations

import json

import pytest

import evaluate
from models import load_model, quantize_model, save_model
from quant.config import QuantConfig
from recipes.evaluate import EvalConfig
from utils.config import ConfigError, load_config


def run_cli(args) -> dict:
    assert evaluate.main(args) == 0
    out = next(a.split("=", 1)[1] for a in args if a.startswith("output="))
    return json.loads(open(out).read())


def test_cli_writes_results_json_and_table(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "res.json"
    got = run_cli([f"model={tiny_model_dir}", "tasks=[wikitext2,c4,piqa,winogrande]", "limit=2", "seqlen=64",
                   "w_bits=4", "a_bits=8", "kv_bits=8", f"data_dir={data_dir}", f"output={out}"])
    res = got["results"]
    assert set(res) == {"wikitext2", "c4", "piqa", "winogrande"} and got["tag"] == "W4A8KV8"
    assert res["wikitext2"]["ppl"] > 1 and res["wikitext2"]["windows"] == 2 and res["c4"]["windows"] == 2
    assert {"acc", "acc_norm"} <= set(res["piqa"]) and "acc_norm" not in res["winogrande"]
    assert res["piqa"]["n"] == 2 and 0 <= res["piqa"]["acc"] <= 1
    table = out.with_suffix(".md").read_text()
    assert "| W4A8KV8 | 4-8-8 |" in table and "PIQA" in table and "Wiki2 ppl" in table and "piqa 2" in table


def test_student_folder_uses_its_saved_quant_config(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    model, tok = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8, kv_bits=16))
    student = save_model(model, tok, tmp_path / "student")
    monkeypatch.setenv("LLMQAT_DATA_DIR", str(data_dir))  # data from the environment variable
    got = run_cli([f"model={student}", "tasks=[arc_easy]", "limit=2", f"output={tmp_path / 'r.json'}"])
    assert got["tag"] == "W8A8KV16" and set(got["results"]["arc_easy"]) >= {"acc", "acc_norm"}


@pytest.mark.parametrize("argv,match", [
    (["tasks=[wikitext2,mmlu]"], "mmlu"),
    (["limit=0"], "limit"),
    (["w_bits=9"], "w_bits"),
    (["seqlen=abc"], "seqlen"),
])
def test_bad_config_is_a_clear_error(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(EvalConfig, argv)


def test_missing_data_file_names_what_was_looked_for(tiny_model_dir, tmp_path, capsys):
    args = [f"model={tiny_model_dir}", "tasks=[boolq]", f"data_dir={tmp_path}", f"output={tmp_path / 'r.json'}"]
    assert evaluate.main(args) == 2
    assert "boolq/validation.jsonl" in capsys.readouterr().err
    assert evaluate.main(["model=/no/such/model", f"output={tmp_path / 'r.json'}"]) == 2


def test_table_builds_rows_caches_them_and_reports_recovery(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    import recipes.evaluate
    from recipes.table import TableConfig
    from recipes.table import run as run_table

    model, tok = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8))
    qat = str(save_model(model, tok, tmp_path / "qat-student"))  # stands in for a trained student
    calib = tmp_path / "gen.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"calibration text number {i}"}) for i in range(30)) + "\n")
    cfg = load_config(TableConfig, [f"model={tiny_model_dir}", "settings=[4-8-8]", "methods=[fp,rtn,gptq]",
                                    f"qat=[{qat}]", "eval.tasks=[wikitext2,piqa,boolq]", "eval.limit=2",
                                    "eval.seqlen=32", f"ptq.calib={calib}", "ptq.calib_samples=2",
                                    "ptq.calib_seqlen=16", f"eval.data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}",
                                    f"output={tmp_path / 'table.md'}"])
    rows = run_table(cfg)
    assert [r["method"] for r in rows] == ["FP", "RTN", "GPTQ", "QAT (qat-student)"]
    assert all({"piqa", "boolq", "avg", "wikitext2"} <= set(r) for r in rows)
    assert "recovered" in rows[3] or rows[0]["avg"] == rows[1]["avg"]
    assert "| GPTQ | 4-8-8 |" in (tmp_path / "table.md").read_text()
    monkeypatch.setattr(recipes.evaluate, "run", lambda cfg: pytest.fail("cached rows must be reused"))
    assert run_table(cfg) == rows


def test_frozen_weight_quantizers_give_identical_logits(tiny_model_dir):
    import torch

    from models.convert import fold_weights

    model, _ = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_symmetric=False))
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        assert fold_weights(model) == 14
        assert torch.equal(model(ids).logits, before)


def test_table_rows_per_setting_with_distinct_students_and_no_smoothquant_at_a16(tmp_path, monkeypatch):
    """QAT rows follow their setting's PTQ rows; two `<run>/student` folders at one setting are two
    rows (and two cache entries); SmoothQuant has no row where activations are not quantized."""
    import recipes.table as tables

    saved = {"runs/a/student": QuantConfig(w_bits=4, a_bits=16, kv_bits=16),
             "runs/b/student": QuantConfig(w_bits=4, a_bits=16, kv_bits=16),
             "runs/c/student": QuantConfig(w_bits=8, a_bits=8, kv_bits=8),
             "runs/d/student": QuantConfig(w_bits=2, a_bits=16, kv_bits=16)}
    ppl = {"fp": 20.0, "rtn-W4A16KV16": 60.0, "gptq-W4A16KV16": 50.0, "qat-a-W4A16KV16": 30.0,
           "qat-b-W4A16KV16": 40.0, "rtn-W8A8KV8": 22.0, "smoothquant-W8A8KV8": 21.0, "gptq-W8A8KV8": 22.0,
           "qat-c-W8A8KV8": 21.5, "qat-d-W2A16KV16": 90.0}
    evaluated = []

    def fake_results(cfg, row, model, quant):
        evaluated.append(row)
        return {"results": {"wikitext2": {"ppl": ppl[row]}}}

    monkeypatch.setattr(tables, "row_results", fake_results)
    monkeypatch.setattr(tables, "ptq_student", lambda cfg, method, qcfg: f"students/{method}")
    monkeypatch.setattr(tables, "read_quant_config", lambda folder: saved[folder])
    cfg = load_config(tables.TableConfig, ["settings=[4-16-16,8-8-8]", "methods=[fp,rtn,smoothquant,gptq]",
                                           f"qat=[{','.join(saved)}]", "eval.tasks=[wikitext2]",
                                           f"output={tmp_path / 'table.md'}"])
    rows = tables.run(cfg)
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("FP", "16-16-16"), ("RTN", "4-16-16"), ("GPTQ", "4-16-16"), ("QAT (a)", "4-16-16"), ("QAT (b)", "4-16-16"),
        ("RTN", "8-8-8"), ("SmoothQuant", "8-8-8"), ("GPTQ", "8-8-8"), ("QAT (c)", "8-8-8"), ("QAT (d)", "2-16-16")]
    assert "smoothquant-W4A16KV16" not in evaluated and len(set(evaluated)) == len(evaluated)
    by = {(r["method"], r["setting"]): r for r in rows}
    assert by[("QAT (a)", "4-16-16")]["recovered_ppl"] == pytest.approx(75.0)  # (60 - 30) / (60 - 20)
    assert by[("GPTQ", "4-16-16")]["recovered_ppl"] == pytest.approx(25.0)
    assert by[("SmoothQuant", "8-8-8")]["recovered_ppl"] == pytest.approx(50.0)
    assert "recovered_ppl" not in by[("RTN", "8-8-8")] and "recovered_ppl" not in by[("QAT (d)", "2-16-16")]
    assert "recovered % (Wiki2 ppl)" in (tmp_path / "table.md").read_text()


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


def test_only_cached_reports_the_evaluated_rows_and_computes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Rows are found by their key (evaluation settings + model fingerprint), not by their file name:
    a result file written under another key is left out, not reported."""
    from dataclasses import replace

    import recipes.evaluate
    import recipes.table as tables

    cfg = load_config(tables.TableConfig, [f"model={tiny_model_dir}", "settings=[4-8-8,8-8-8]", "methods=[fp,rtn,gptq]",
                                           "eval.tasks=[wikitext2]", "only_cached=true", f"cache_dir={tmp_path}",
                                           f"output={tmp_path / 'table.md'}"])
    (tmp_path / "results").mkdir()
    for row, ppl, quant in (("fp", 20.0, QuantConfig()), ("rtn-W4A8KV8", 60.0, QuantConfig(w_bits=4, a_bits=8, kv_bits=8)),
                            ("rtn-W8A8KV8", 30.0, QuantConfig(w_bits=4, a_bits=8, kv_bits=8))):  # wrong key
        key = recipes.evaluate.cache_key(replace(cfg.eval, model=tiny_model_dir, quant=quant))
        (tmp_path / "results" / f"{row}.json").write_text(json.dumps({"provenance": {"config_hash": key},
                                                                      "results": {"wikitext2": {"ppl": ppl}}}))
    monkeypatch.setattr(recipes.evaluate, "run", lambda cfg: pytest.fail("only_cached must not evaluate"))
    monkeypatch.setattr(tables, "ptq_student", lambda *a: pytest.fail("only_cached must not build students"))
    rows = tables.run(cfg)
    assert [(r["method"], r["setting"], r["wikitext2"]) for r in rows] == [("FP", "16-16-16", 20.0),
                                                                        ("RTN", "4-8-8", 60.0)]


def test_no_recovered_share_where_rtn_lost_nothing():
    from utils.eval.report import add_recovered

    rows = [{"method": "FP", "setting": "16-16-16", "avg": 41.8, "wikitext2": 24.0},
            {"method": "RTN", "setting": "4-8-4", "avg": 42.8, "wikitext2": 106.0},  # noise: above FP
            {"method": "QAT (x)", "setting": "4-8-4", "avg": 40.5, "wikitext2": 49.0}]
    add_recovered(rows)
    assert "recovered" not in rows[2] and rows[2]["recovered_ppl"] == pytest.approx(100 * 57 / 82)
