"""The main job (pipeline.py / recipes.pipeline) end to end on a tiny random Llama: every stage's outputs,
a finite table and a PNG; a second run skips every stage and rewrites none of their outputs; without
evaluation data it still generates, merges and trains, and names the evaluations it skipped.

    PYTHONPATH=. LLMQAT_DATA_DIR=../shared/data .venv/bin/python -m pytest -q tests/recipes/test_pipeline.py
"""

from __future__ import annotations

import json
import logging
import math

import pytest

import pipeline
from recipes.pipeline import PipelineConfig, run
from tests.conftest import make_byte_tokenizer, make_tiny_llama
from utils.config import ConfigError, load_config
from utils.eval.report import add_recovered, table_row

TASKS = ["wikitext2", "piqa", "arc_easy"]


def _argv(model, out, data):
    return [f"model={model}", f"out_dir={out}", f"data_dir={data}", "shards=2", "generate.n_vocab=8",
            "generate.greedy_lengths=[3]", "generate.max_length=32", "generate.batch_size=8",
            "train.model_max_length=32", "train.max_steps=2", "train.logging_steps=1", "train.learning_rate=1e-3",
            f"eval.tasks=[{','.join(TASKS)}]", "eval.limit=2", "eval.ppl_limit=2", "eval.seqlen=32"]


def _cfg(*argv):
    return load_config(PipelineConfig, list(argv), default_yaml="configs/main_job.yaml")


def _stage_outputs(out):
    keep = {"pipeline_config.yaml", "table.md", "table.json", "pipeline.png", "timings.json"}
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name not in keep}


@pytest.fixture
def model_dir(tmp_path):
    """The tiny Llama with exactly the tokenizer's vocabulary: its generated ids must be valid training
    ids (save_model_dir rounds the embedding up to 272 > the tokenizer's 259)."""
    tokenizer, path = make_byte_tokenizer(), tmp_path / "tiny-llama"
    make_tiny_llama(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def env(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    caplog.set_level(logging.INFO)
    return tmp_path


def test_full_run_then_rerun_skips_every_stage(env, model_dir, data_dir, caplog, monkeypatch):
    out = env / "run"
    result = run(_cfg(*_argv(model_dir, out, data_dir)))
    assert result["skipped"] == {}
    assert len(list((out / "gen_data").glob("gen.chunk.*.jsonl"))) == 2
    assert (out / "gen_data" / "all_gen.jsonl").stat().st_size > 0
    student = out / "qat-W4A8KV8" / "student"
    assert (student / "config.json").is_file() and (student / "quant_config.json").is_file()
    assert math.isfinite(json.loads((out / "qat-W4A8KV8" / "train_metrics.json").read_text())["final_loss"])
    assert sorted(p.name for p in (out / "eval").glob("*.json")) == ["fp.json", "qat-W4A8KV8.json",
                                                                    "rtn-W4A8KV8.json"]
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["FP", "RTN", "QAT"]
    assert all(math.isfinite(r[k]) for r in rows for k in ("piqa", "arc_easy", "avg", "wikitext2"))
    table = (out / "table.md").read_text()
    assert "| QAT | 4-8-8 |" in table and "recovered %" in table and "Wiki2 ppl" in table
    assert all("ci95" in d for r in rows[1:] for d in r["vs_fp"].values()) and "ci95" in rows[2]["vs_rtn"]["avg"]
    assert "| QAT | 4-8-8 | RTN |" in table and "n per task: PIQA 2, ARC-e 2, Wiki2 ppl 2 windows" in table
    assert all("_samples" not in r for r in json.loads((out / "table.json").read_text()))
    assert (out / "pipeline.png").read_bytes()[:4] == b"\x89PNG"
    timings = json.loads((out / "timings.json").read_text())
    assert {"generate", "merge", "train", "eval FP", "eval RTN", "eval QAT", "report"} <= set(timings)
    assert "stage 3/7 train" in caplog.text and "ETA" in caplog.text

    before = _stage_outputs(out)
    caplog.clear()
    for module in ("recipes.generate", "recipes.merge", "recipes.train", "recipes.evaluate"):
        monkeypatch.setattr(f"{module}.run", lambda *a, **k: pytest.fail("a finished stage ran again"))
    again = run(_cfg(*_argv(model_dir, out, data_dir)))
    assert caplog.text.count("skip: ") == 6
    assert all(again["timings"][s]["skipped"] for s in ("generate", "merge", "train", "eval FP", "eval QAT"))
    assert _stage_outputs(out) == before
    assert [r["wikitext2"] for r in again["rows"]] == [r["wikitext2"] for r in rows]


def test_without_evaluation_data_it_trains_and_names_skipped_evaluations(env, model_dir, caplog):
    out, empty = env / "run", env / "no-data"
    empty.mkdir()
    result = run(_cfg(*_argv(model_dir, out, empty)))
    assert set(result["skipped"]) == set(TASKS)
    assert (out / "gen_data" / "all_gen.jsonl").is_file()
    assert (out / "qat-W4A8KV8" / "student" / "quant_config.json").is_file()
    assert not (out / "pipeline.png").exists() and not list(out.glob("eval/*.json"))
    table = (out / "table.md").read_text()
    assert "No evaluation ran" in table and "Skipped (no evaluation data): piqa" in table
    assert "skipped evaluations (no data): wikitext2, piqa, arc_easy" in caplog.text


def test_recovered_is_the_share_of_the_fp_rtn_gap():
    def payload(acc, ppl):
        return {"results": {"piqa": {"acc": acc, "acc_norm": acc}, "wikitext2": {"ppl": ppl}}}

    tasks = ["wikitext2", "piqa"]
    rows = [table_row("FP", "16-16-16", payload(0.70, 30.0)["results"], tasks),
            table_row("RTN", "4-8-8", payload(0.50, 80.0)["results"], tasks),
            table_row("QAT", "4-8-8", payload(0.65, 40.0)["results"], tasks)]
    add_recovered(rows)
    qat = rows[-1]
    assert qat["recovered"] == pytest.approx(75.0) and qat["recovered_ppl"] == pytest.approx(80.0)


@pytest.mark.parametrize("argv, match", [(["train.output_dir=x"], "set by the pipeline"),
                                         (["eval.quant.w_bits=4"], "set by the pipeline"),
                                         (["shards=0"], "shards"), (["generate.n_vocabs=3"], "n_vocabs")])
def test_bad_config_is_a_clear_error(argv, match, capsys):
    with pytest.raises(ConfigError, match=match):
        _cfg(*argv)
    assert pipeline.main(argv) == 2
