"""evaluate.py: `model=... tasks=[...] limit=N seqlen=L w_bits= ... output=FILE` and its bad inputs.

    PYTHONPATH=. LLMQAT_DATA_DIR=../shared/data .venv/bin/python -m pytest -q tests/recipes/test_evaluate.py
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import evaluate
from models import load_model, model_fingerprint, quantize_model, save_model
from quant.config import QuantConfig
from recipes.evaluate import EvalConfig
from tests.conftest import TINY_VOCAB, make_byte_tokenizer
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


# ---- strict coverage, merged overrides, provenance, resume, safe output (issue 14) ----

def save_tiny_phi3_dir(path) -> str:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2, tie_word_embeddings=False))
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return str(path)


def test_phi3_is_quantized_completely_and_reports_coverage(data_dir, tmp_path):
    phi = save_tiny_phi3_dir(tmp_path / "phi3")
    got = run_cli([f"model={phi}", "tasks=[piqa]", "limit=2", "w_bits=4", "a_bits=8", "kv_bits=4",
                   f"data_dir={data_dir}", f"output={tmp_path / 'r.json'}"])
    assert got["coverage"] == {"linears": [8, 8], "kv_layers": [2, 2]}  # was 4 of 8 linears, no KV
    assert got["quant"]["w_bits"] == 4 and got["quant"]["kv_bits"] == 4


def test_incomplete_quantization_exits_2_naming_the_modules(data_dir, tmp_path, capsys):
    phi = save_tiny_phi3_dir(tmp_path / "phi3")
    out = tmp_path / "r.json"
    args = [f"model={phi}", "tasks=[piqa]", "limit=2", "kv_bits=4", f"data_dir={data_dir}", f"output={out}"]
    assert evaluate.main([*args, "targets=[o_proj,down_proj]"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0" in err and "K/V would not be quantized" in err and "qkv_proj" in err and "targets=" in err
    assert evaluate.main([*args, "targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,dense]"]) == 2
    assert "model.layers.0 has no dense" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def student_w8a8kv8(tiny_model_dir, tmp_path):
    model, tok = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=8, a_bits=8, kv_bits=8, w_granularity="per_group", w_group_size=32))
    return str(save_model(model, tok, tmp_path / "student"))


@pytest.mark.parametrize("override,expect", [
    (["kv_bits=4"], dict(w_bits=8, a_bits=8, kv_bits=4, w_granularity="per_group", w_group_size=32)),
    (["kv_bits=32"], dict(w_bits=8, a_bits=8, kv_bits=32, w_granularity="per_group", w_group_size=32)),
    (["kv_bits=4", "use_saved_quant=false"], dict(kv_bits=4)),
])
def test_an_override_changes_only_its_key_of_the_saved_quant_config(student_w8a8kv8, data_dir, tmp_path, override,
                                                                    expect):
    got = run_cli([f"model={student_w8a8kv8}", "tasks=[wikitext2]", "limit=2", "seqlen=32", *override,
                   f"data_dir={data_dir}", f"output={tmp_path / 'r.json'}"])
    assert got["quant"] == QuantConfig(**expect).to_dict()
    assert got["tag"] == QuantConfig(**expect).tag()


def test_merged_student_equals_the_explicit_config(student_w8a8kv8, data_dir, tmp_path):
    common = [f"model={student_w8a8kv8}", "tasks=[wikitext2]", "limit=2", "seqlen=32", f"data_dir={data_dir}"]
    merged = run_cli([*common, "kv_bits=4", f"output={tmp_path / 'a.json'}"])
    explicit = run_cli([*common, "use_saved_quant=false", "w_bits=8", "a_bits=8", "kv_bits=4", "w_group_size=32",
                        "w_granularity=per_group", f"output={tmp_path / 'b.json'}"])
    assert merged["results"]["wikitext2"]["ppl"] == explicit["results"]["wikitext2"]["ppl"]
    assert merged["coverage"] == {"linears": [14, 14], "kv_layers": [2, 2]}


def test_result_json_carries_quant_coverage_and_provenance(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from recipes import evaluate as recipe

    seen = {}
    real = recipe.load_model
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: seen.update(k) or real(*a, **k))
    out = tmp_path / "r.json"
    args = [f"model={tiny_model_dir}", "tasks=[wikitext2]", "limit=1", "seqlen=32", "w_bits=4",
            "attn_implementation=eager", f"data_dir={data_dir}", f"output={out}"]
    got = run_cli(args)
    assert seen["attn_implementation"] == "eager"
    prov = got["provenance"]
    assert prov["config_hash"] == recipe.cache_key(load_config(EvalConfig, args))
    assert prov["inputs"]["model"] == model_fingerprint(tiny_model_dir) and prov["tokenizer"].startswith("tok:")
    assert set(prov["code"]) == {"commit", "dirty"} and prov["env"]["torch"] and prov["env"]["device"] == "cpu"
    assert got["coverage"] == {"linears": [14, 14], "kv_layers": [0, 2]}
    again = run_cli(args)  # all cached: the saved record comes back unchanged
    assert again["provenance"] == prov and again["coverage"] == got["coverage"]
    fp = run_cli([f"model={tiny_model_dir}", "tasks=[wikitext2]", "limit=1", "seqlen=32", f"data_dir={data_dir}",
                  f"output={tmp_path / 'fp.json'}"])
    assert fp["quant"] is None and fp["coverage"] is None and fp["tag"] == "FP"


def test_bad_attn_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="attn_implementation='nope'"):
        load_config(EvalConfig, ["attn_implementation=nope"])


def _copy_task(data_dir, dest, task_file, lines=None, append=""):
    src = (data_dir / task_file).read_text().splitlines()[:3]
    (dest / task_file).parent.mkdir(parents=True, exist_ok=True)
    (dest / task_file).write_text("\n".join(lines if lines is not None else src) + "\n" + append)


def test_a_task_failing_mid_run_keeps_the_finished_ones_and_a_rerun_reuses_them(tiny_model_dir, data_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    from recipes import evaluate as recipe

    local = tmp_path / "data"
    _copy_task(data_dir, local, "piqa/validation.jsonl")
    _copy_task(data_dir, local, "arc_easy/test.jsonl", append="{not json\n")
    out = tmp_path / "r.json"
    args = [f"model={tiny_model_dir}", "tasks=[piqa,arc_easy]", "limit=5", f"data_dir={local}", f"output={out}"]
    assert evaluate.main(args) == 2
    assert "arc_easy/test.jsonl:4" in capsys.readouterr().err
    assert set(json.loads(out.read_text())["results"]) == {"piqa"}
    _copy_task(data_dir, local, "arc_easy/test.jsonl")
    ran = []
    real = recipe.evaluate_task
    monkeypatch.setattr(recipe, "evaluate_task", lambda m, t, task, c: ran.append(task) or real(m, t, task, c))
    assert set(run_cli(args)["results"]) == {"piqa", "arc_easy"} and ran == ["arc_easy"]


@pytest.mark.parametrize("label", ["5", "-1"])
def test_invalid_gold_label_is_an_error_naming_file_and_line(tiny_model_dir, data_dir, tmp_path, capsys, label):
    local = tmp_path / "data"
    rows = (data_dir / "piqa/validation.jsonl").read_text().splitlines()[:3]
    bad = json.loads(rows[1])
    bad["label"] = int(label)
    _copy_task(data_dir, local, "piqa/validation.jsonl", lines=[rows[0], json.dumps(bad), rows[2]])
    args = [f"model={tiny_model_dir}", "tasks=[piqa]", f"data_dir={local}", f"output={tmp_path / 'r.json'}"]
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err
    assert "piqa/validation.jsonl:2" in err and f"gold label {label}" in err


def test_output_never_replaces_a_file_the_project_did_not_write(tiny_model_dir, data_dir, tmp_path, capsys):
    common = [f"model={tiny_model_dir}", "tasks=[wikitext2]", "limit=1", "seqlen=32", f"data_dir={data_dir}"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}\n')
    assert evaluate.main([*common, f"output={notes}"]) == 2
    assert "not an llm-qat results JSON" in capsys.readouterr().err and notes.read_text() == '{"my": "notes"}\n'
    (tmp_path / "paper.md").write_text("# my paper\n")
    assert evaluate.main([*common, f"output={tmp_path / 'paper.json'}"]) == 2
    assert (tmp_path / "paper.md").read_text() == "# my paper\n" and not (tmp_path / "paper.json").exists()
    ours = tmp_path / "ours.json"
    run_cli([*common, f"output={ours}"])
    run_cli([*common, "w_bits=4", f"output={ours}"])  # our own results: replaced
    assert json.loads(ours.read_text())["tag"] == "W4A16KV16"


def test_results_get_the_users_umask(tiny_model_dir, data_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run_cli([f"model={tiny_model_dir}", "tasks=[wikitext2]", "limit=1", "seqlen=32", f"data_dir={data_dir}",
                 f"output={tmp_path / 'r.json'}"])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o644


def test_task_limits_override_limit_per_task_and_validation_split_is_its_own_task(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "res.json"
    got = run_cli([f"model={tiny_model_dir}", "tasks=[wikitext2,wikitext2_val,piqa,arc_easy]", "limit=2",
                   "seqlen=64", "task_limits={piqa: 3, wikitext2_val: 1}", f"data_dir={data_dir}", f"output={out}"])
    res = got["results"]
    assert res["piqa"]["n"] == 3 and res["arc_easy"]["n"] == 2  # piqa's own limit, arc_easy the global one
    assert res["wikitext2"]["windows"] == 2 and res["wikitext2_val"]["windows"] == 1
    assert res["wikitext2_val"]["ppl"] != res["wikitext2"]["ppl"]  # another split, another text
    assert "Wiki2-val ppl" in out.with_suffix(".md").read_text()


def test_task_limits_keep_the_key_of_results_saved_without_them_and_change_it_when_set():
    from recipes.evaluate import cache_key

    plain = EvalConfig(model="smollm2-135m", limit=5)
    assert cache_key(plain) == cache_key(EvalConfig(model="smollm2-135m", limit=5, task_limits={}))
    assert cache_key(plain) != cache_key(EvalConfig(model="smollm2-135m", limit=5, task_limits={"piqa": 9}))


@pytest.mark.parametrize("value,match", [("{mmlu: 3}", "unknown task"), ("{piqa: 0}", "positive")])
def test_bad_task_limits_are_clear_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(EvalConfig, [f"task_limits={value}"])
