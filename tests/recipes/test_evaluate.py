"""evaluate.py: `model=... tasks=[...] limit=N seqlen=L w_bits= ... output=FILE` and its bad inputs.

    PYTHONPATH=. LLMQAT_DATA_DIR=../shared/data .venv/bin/python -m pytest -q tests/recipes/test_evaluate.py
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
