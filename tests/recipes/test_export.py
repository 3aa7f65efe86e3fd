"""export.py: `student=DIR format=packed|gguf_q4_0|gguf_q8_0 output=PATH`, and its bad inputs.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_export.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import pytest
import torch

import export
from models import load_model, quantize_model, save_model
from models.convert import load_packed
from quant.config import QuantConfig
from recipes.export import ExportConfig
from tests.conftest import ROOT, TINY_VOCAB, make_tiny_llama
from utils.config import ConfigError, load_config


def make_student(tiny_model_dir, out, **quant):
    model, tok = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(**quant))
    return str(save_model(model, tok, out)), model


def test_packed_export_reloads_as_the_student(tiny_model_dir, tmp_path, capsys):
    student, model = make_student(tiny_model_dir, tmp_path / "student", w_bits=4, a_bits=8, kv_bits=8)
    out = tmp_path / "packed"
    assert export.main([f"student={student}", "format=packed", f"output={out}"]) == 0
    assert "packed:" in capsys.readouterr().out
    rebuilt, _ = load_packed(out)
    ids = torch.randint(0, TINY_VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)
    assert export.main([f"student={student}", "format=packed", f"output={out}"]) == 0  # replaces its own export


@pytest.mark.parametrize("fmt, bits", [("gguf_q4_0", 4), ("gguf_q8_0", 8)])
def test_gguf_export_writes_a_readable_file(tiny_model_dir, tmp_path, fmt, bits):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=bits, weight_format=fmt)
    out = tmp_path / "m.gguf"
    assert export.main([f"student={student}", f"format={fmt}", f"output={out}", "embed_type=f16"]) == 0
    tensors = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert tensors["blk.0.attn_q.weight"].name == fmt.removeprefix("gguf_").upper()
    assert tensors["token_embd.weight"] == gguf.GGMLQuantizationType.F16


def test_folder_without_quant_config_fails_cleanly(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert export.main([f"student={tiny_model_dir}", "format=gguf_q4_0", f"output={out}"]) == 2
    assert "no quant_config.json" in capsys.readouterr().err
    assert not out.exists()


def test_unsupported_bit_width_fails_cleanly(tiny_model_dir, tmp_path, capsys):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=8)
    before = set(os.listdir(tmp_path))
    assert export.main([f"student={student}", "format=gguf_q4_0", f"output={tmp_path / 'out.gguf'}"]) == 2
    assert "unsupported bit width" in capsys.readouterr().err
    assert set(os.listdir(tmp_path)) == before


def test_unquantized_weights_fail_cleanly(tiny_model_dir, tmp_path, capsys):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", a_bits=8)
    assert export.main([f"student={student}", "format=packed", f"output={tmp_path / 'p'}"]) == 2
    assert "not quantized" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_foreign_output_folder_is_not_clobbered(tiny_model_dir, tmp_path):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=4)
    assert export.main([f"student={student}", "format=packed", f"output={tiny_model_dir}"]) == 2
    assert (tmp_path / "tiny-llama" / "config.json").is_file()


@pytest.mark.parametrize("argv", [["format=gguf_q2_k"], ["embed_type=q4_0"], ["dense_dtype=int3"], ["bits=4"]])
def test_bad_config_values_are_config_errors(argv):
    with pytest.raises(ConfigError):
        load_config(ExportConfig, argv)


@pytest.mark.slow  # subprocesses
def test_cli_subprocess(tiny_model_dir, tmp_path):
    """The interface outside scripts rely on, run as a process."""
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=4, weight_format="gguf_q4_0")
    out = tmp_path / "m.gguf"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "export.py", f"student={student}", "format=gguf_q4_0", f"output={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


@pytest.mark.slow
def test_bench_export_runs_on_a_tiny_model(tmp_path, data_dir):
    """benchmarks/bench_export.py end to end on a tiny Llama (GGUF rows need llama-cpp-python)."""
    from tests.quant.test_gguf_format import _tokenizer_with_a_merge

    model_dir = tmp_path / "tiny"
    make_tiny_llama(0, vocab_size=TINY_VOCAB, max_position_embeddings=512).save_pretrained(model_dir)
    _tokenizer_with_a_merge().save_pretrained(model_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LLMQAT_DATA_DIR=str(data_dir))
    cmd = [sys.executable, "benchmarks/bench_export.py", f"model={model_dir}", "windows=1", "seqlen=64",
           "threads=1", f"out_dir={tmp_path / 'bench'}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    rows = {row["artifact"]: row for row in results["rows"]}
    assert rows["rtn_w4_gguf_q4_0 packed"]["max_abs_logit_diff"] == 0.0
