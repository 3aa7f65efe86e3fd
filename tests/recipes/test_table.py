"""run_table.sh / recipes.table: rows per setting, the evaluation cache, PTQ students keyed by their config.

    PYTHONPATH=. LLMQAT_DATA_DIR=../shared/data .venv/bin/python -m pytest -q tests/recipes/test_table.py
"""

from __future__ import annotations

import json
import math

import pytest

from models import load_model, quantize_model, save_model
from quant.config import QuantConfig
from utils.config import ConfigError, load_config


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
    assert [r["method"] for r in rows] == ["FP", "RTN", "GPTQ (gen.jsonl)", "QAT (qat-student, identity STE)"]
    assert all({"piqa", "boolq", "avg", "wikitext2"} <= set(r) for r in rows)
    assert "recovered" in rows[3] or rows[0]["avg"] == rows[1]["avg"]
    assert all("ci95" in d for r in rows[1:] for d in r["vs_fp"].values())  # paired on the same examples
    assert rows[0]["piqa_stderr"] >= 0 and rows[0]["n"] == {"wikitext2": rows[0]["n"]["wikitext2"], "piqa": 2,
                                                            "boolq": 2}
    assert "| GPTQ (gen.jsonl) | 4-8-8 |" in (tmp_path / "table.md").read_text()
    monkeypatch.setattr(recipes.evaluate, "run", lambda cfg: pytest.fail("cached rows must be reused"))
    assert run_table(cfg) == rows


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
        nll = [math.log(ppl[row]) * 31 * f for f in (0.9, 1.0, 1.1, 1.0)]  # 4 windows of 32 tokens, mean = ppl
        return {"results": {"wikitext2": {"ppl": ppl[row], "n": 4, "per_window": {"nll": nll, "tokens": [31] * 4}}}}

    monkeypatch.setattr(tables, "row_results", fake_results)
    monkeypatch.setattr(tables, "ptq_student", lambda cfg, method, qcfg, build=True: f"students/{method}")
    monkeypatch.setattr(tables, "read_quant_config", lambda folder: saved[folder])
    cfg = load_config(tables.TableConfig, ["settings=[4-16-16,8-8-8]", "methods=[fp,rtn,smoothquant,gptq]",
                                           f"qat=[{','.join(saved)}]", "eval.tasks=[wikitext2]",
                                           "ptq.calib=wikitext2", f"output={tmp_path / 'table.md'}"])
    rows = tables.run(cfg)
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("FP", "16-16-16"), ("RTN", "4-16-16"), ("GPTQ (wikitext2)", "4-16-16"), ("QAT (a, identity STE)", "4-16-16"),
        ("QAT (b, identity STE)", "4-16-16"), ("RTN", "8-8-8"), ("SmoothQuant (wikitext2, alpha=auto)", "8-8-8"),
        ("GPTQ (wikitext2)", "8-8-8"), ("QAT (c, identity STE)", "8-8-8"), ("QAT (d, identity STE)", "2-16-16")]
    assert "smoothquant-W4A16KV16" not in evaluated and len(set(evaluated)) == len(evaluated)
    by = {(r["method"], r["setting"]): r for r in rows}
    assert by[("QAT (a, identity STE)", "4-16-16")]["recovered_ppl"] == pytest.approx(75.0)  # (60 - 30) / (60 - 20)
    assert by[("GPTQ (wikitext2)", "4-16-16")]["recovered_ppl"] == pytest.approx(25.0)
    assert by[("SmoothQuant (wikitext2, alpha=auto)", "8-8-8")]["recovered_ppl"] == pytest.approx(50.0)
    assert "recovered_ppl" not in by[("RTN", "8-8-8")]
    assert "recovered_ppl" not in by[("QAT (d, identity STE)", "2-16-16")]
    lo, hi = by[("QAT (a, identity STE)", "4-16-16")]["recovered_ppl_ci95"]  # paired over the same 4 windows
    assert lo <= 75.0 <= hi and by[("QAT (c, identity STE)", "8-8-8")]["vs_rtn"]["wikitext2"]["ci95"][1] < 0
    text = (tmp_path / "table.md").read_text()
    assert "recovered % (Wiki2 ppl)" in text and f"| 75 [{lo:.0f}, {hi:.0f}] |" in text
    assert "n per task: Wiki2 ppl 4 windows" in text


@pytest.mark.parametrize("results_dir", [None, "committed/rows"])
def test_only_cached_reports_the_evaluated_rows_and_computes_nothing(tiny_model_dir, tmp_path, monkeypatch,
                                                                      results_dir):
    """Rows are found by their key (evaluation settings + model fingerprint), not by their file name:
    a result file written under another key is left out, not reported. `results_dir` moves the rows
    (e.g. into a committed results/ folder) away from the students under cache_dir."""
    from dataclasses import replace

    import recipes.evaluate
    import recipes.table as tables

    cfg = load_config(tables.TableConfig, [f"model={tiny_model_dir}", "settings=[4-8-8,8-8-8]", "methods=[fp,rtn,gptq]",
                                           "eval.tasks=[wikitext2]", "only_cached=true", f"cache_dir={tmp_path}",
                                           f"output={tmp_path / 'table.md'}"]
                      + ([f"results_dir={tmp_path / results_dir}"] if results_dir else []))
    rows_dir = tmp_path / (results_dir or "results")
    rows_dir.mkdir(parents=True)
    for row, ppl, quant in (("fp", 20.0, QuantConfig()), ("rtn-W4A8KV8", 60.0, QuantConfig(w_bits=4, a_bits=8, kv_bits=8)),
                            ("rtn-W8A8KV8", 30.0, QuantConfig(w_bits=4, a_bits=8, kv_bits=8))):  # wrong key
        key = recipes.evaluate.cache_key(replace(cfg.eval, model=tiny_model_dir, quant=quant))
        (rows_dir / f"{row}.json").write_text(json.dumps({"provenance": {"config_hash": key},
                                                                      "results": {"wikitext2": {"ppl": ppl}}}))
    monkeypatch.setattr(recipes.evaluate, "run", lambda cfg: pytest.fail("only_cached must not evaluate"))
    monkeypatch.setattr(tables.ptq, "run", lambda *a: pytest.fail("only_cached must not build students"))
    rows = tables.run(cfg)
    assert [(r["method"], r["setting"], r["wikitext2"]) for r in rows] == [("FP", "16-16-16", 20.0),
                                                                        ("RTN", "4-8-8", 60.0)]


def test_ptq_overrides_apply_to_their_method_only_and_key_its_student(tmp_path, monkeypatch):
    import recipes.table as tables

    built = []
    monkeypatch.setattr(tables.ptq, "run", lambda pcfg: built.append(pcfg) or (tmp_path / "x"))
    cfg = load_config(tables.TableConfig, [f"cache_dir={tmp_path}", "config=configs/grid.yaml"])
    q = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)
    gptq, sq = tables.ptq_config(cfg, "gptq", q), tables.ptq_config(cfg, "smoothquant", q)
    assert (gptq.calib, gptq.calib_samples, gptq.gptq_percdamp) == ("wikitext2", 64, 0.1)
    assert (sq.calib, sq.calib_samples) == ("gen_data/all_gen.jsonl", 32)
    a, b = tables.ptq_student(cfg, "gptq", q), tables.ptq_student(cfg, "smoothquant", q)
    assert a.rsplit("-", 1)[-1] != b.rsplit("-", 1)[-1] and len(built) == 2
    assert tables.ptq_student(cfg, "gptq", QuantConfig(w_bits=8, a_bits=8, kv_bits=8), build=False) is None
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(tables.TableConfig, ["ptq_overrides={gptq: {nonsense: 1}}"])


def _record_row(cfg, path, model, quant, fingerprint="files:0123456789abcdef", ppl=40.0, **eval_changes):
    """A results file as evaluate.py writes it for `model` (not on this machine), under the key of
    cfg.eval (with `eval_changes`) and the fingerprint it records."""
    from dataclasses import replace

    import recipes.evaluate

    ecfg = replace(cfg.eval, model=model, quant=quant, **eval_changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "model": model, "quant": quant.to_dict(), "coverage": None,
        "results": {"wikitext2": {"ppl": ppl, "n": 3}},
        "provenance": {"config_hash": recipes.evaluate.cache_key(ecfg, fingerprint),
                       "inputs": {"model": fingerprint}}}))


def test_rows_of_students_not_on_this_machine_come_from_their_complete_results_files(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """Students are not committed, their rows are: a PTQ or QAT row whose student is missing is taken from its
    results file when that file is complete under the key it records (same evaluation settings, same student
    path), with the label of the table's previous sources record; a file under another key is not, and the
    student is built (or, only_cached, the row left out); a QAT folder with neither is an error."""
    import recipes.evaluate
    import recipes.table as tables
    from quant.errors import InputFileError

    q = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)
    args = [f"model={tiny_model_dir}", "settings=[4-8-8]", "methods=[rtn,smoothquant,gptq]", "eval.tasks=[wikitext2]",
            f"cache_dir={tmp_path / 'cache'}", f"results_dir={tmp_path / 'rows'}", f"output={tmp_path / 'table.md'}",
            f"qat=[{tmp_path / 'gone' / 'student'}]"]
    cfg = load_config(tables.TableConfig, args + ["only_cached=true"])
    rows = tmp_path / "rows"
    _record_row(cfg, rows / "rtn-W4A8KV8.json", tiny_model_dir, q, ppl=60.0)  # wrong fingerprint: RTN's model is here
    sq_dir = str(tables.ptq_student_dir(cfg, "smoothquant", q))
    _record_row(cfg, rows / "smoothquant-W4A8KV8.json", sq_dir, q, ppl=45.0)
    _record_row(cfg, rows / "gptq-W4A8KV8.json", str(tables.ptq_student_dir(cfg, "gptq", q)), q, seqlen=64)  # other key
    _record_row(cfg, rows / "qat-gone-W4A8KV8.json", str(tmp_path / "gone" / "student"), q, ppl=30.0)
    (tmp_path / "table.sources.json").write_text(json.dumps(
        {"rows": [{"method": "SmoothQuant (data-free, alpha=0.4 (auto))", "setting": "4-8-8",
                   "source": "smoothquant-W4A8KV8.json"}]}))
    monkeypatch.setattr(recipes.evaluate, "run", lambda cfg: pytest.fail("only_cached must not evaluate"))
    monkeypatch.setattr(tables.ptq, "run", lambda *a: pytest.fail("only_cached must not build students"))
    got = tables.run(cfg)
    assert [(r["method"], r["wikitext2"]) for r in got] == [("SmoothQuant (data-free, alpha=0.4 (auto))", 45.0),
                                                            ("QAT (gone, identity STE)", 30.0)]
    built = []

    class Built(Exception):
        pass

    def build(pcfg):
        built.append(pcfg.method)
        raise Built

    monkeypatch.setattr(tables.ptq, "run", build)
    with pytest.raises(Built):  # not only_cached: the GPTQ row (wrong key) is built again ...
        tables.run(load_config(tables.TableConfig, args + ["methods=[smoothquant,gptq]"]))
    assert built == ["gptq"]  # ... and the recorded SmoothQuant row is not
    (rows / "qat-gone-W4A8KV8.json").unlink()
    with pytest.raises(InputFileError, match="no complete results file"):
        tables.run(cfg)


def test_a_cached_ptq_student_is_reused_only_while_built_from_the_same_inputs(tiny_model_dir, data_dir, tmp_path,
                                                                              monkeypatch):
    """A PTQ student folder is named by its PTQ config; its llmqat_meta records what it was made from (model
    fingerprint, calibration record). New calibration data under the same path rebuilds it (only_cached:
    not used); a student saved before calibration records (a JSONL's sha256) is reused when that matches;
    a WikiText-2-calibrated one from then records no split, so it is stale."""
    import shutil

    import recipes.table as tables
    from utils.provenance import data_fingerprint

    calib = tmp_path / "gen.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"calibration text number {i}", "start_id": i})
                               for i in range(30)) + "\n")
    cfg = load_config(tables.TableConfig, [f"model={tiny_model_dir}", f"ptq.calib={calib}", "ptq.calib_samples=2",
                                           "ptq.calib_seqlen=16", f"eval.data_dir={data_dir}",
                                           f"cache_dir={tmp_path / 'cache'}", f"output={tmp_path / 'table.md'}"])
    q, built, real_run = QuantConfig(w_bits=4, a_bits=8, kv_bits=8), [], tables.ptq.run
    monkeypatch.setattr(tables.ptq, "run", lambda pcfg: built.append(pcfg.output_dir) or real_run(pcfg))
    folder = tables.ptq_student(cfg, "gptq", q)
    assert tables.ptq_student(cfg, "gptq", q) == folder and len(built) == 1  # reused
    meta_file = tables.Path(folder) / "llmqat_meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta["calibration"]["source"] == "data-free" and meta["provenance"]["inputs"]["calibration"]["data"]
    meta["provenance"]["inputs"]["calibration"] = data_fingerprint(calib)  # as saved before calibration records
    meta_file.write_text(json.dumps(meta))
    assert tables.ptq_student(cfg, "gptq", q) == folder and len(built) == 1
    calib.write_text(calib.read_text().replace("number", "no."))  # other data under the same path
    assert tables.ptq.stale_inputs(folder, tables.ptq_config(cfg, "gptq", q)) == ["calibration"]
    assert tables.ptq_student(cfg, "gptq", q, build=False) is None
    assert tables.ptq_student(cfg, "gptq", q) == folder and len(built) == 2  # rebuilt in place
    assert tables.ptq.stale_inputs(folder, tables.ptq_config(cfg, "gptq", q)) == []

    wiki = load_config(tables.TableConfig, [f"model={tiny_model_dir}", "ptq.calib=wikitext2",
                                            f"eval.data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}"])
    old = tables.ptq_student_dir(wiki, "gptq", q)
    shutil.copytree(folder, old)
    meta = json.loads((old / "llmqat_meta.json").read_text())
    meta["calibration"] = {"source": "wikitext2"}
    del meta["provenance"]["inputs"]["calibration"]  # Path("wikitext2") was no file: nothing was recorded
    (old / "llmqat_meta.json").write_text(json.dumps(meta))
    assert tables.ptq.stale_inputs(old, tables.ptq_config(wiki, "gptq", q)) == ["calibration"]
    assert tables.ptq_student(wiki, "gptq", q, build=False) is None and len(built) == 2
