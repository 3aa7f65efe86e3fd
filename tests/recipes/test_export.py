"""export.py: `student=DIR format=packed|gguf_q4_0|gguf_q8_0|compressed_tensors output=PATH`, and its bad inputs.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_export.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import gguf
import pytest
import torch
from torch import nn

import export
from models import load_model, quantize_model, save_model
from models.convert import convert, load_packed
from quant.config import QuantConfig
from quant.errors import UserError
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
    # a student trained on the Q4_0 grid is written exactly; the MinMax one is re-gridded
    exact = re.search(r"fake-quant weights: (\d+)/(\d+)", rows["rtn_w4_gguf_q4_0 gguf_q4_0"]["note"])
    assert exact and exact[1] == exact[2] and int(exact[2]) > 0
    regridded = re.search(r"fake-quant weights: (\d+)/(\d+)", rows["rtn_w4_minmax gguf_q4_0"]["note"])
    assert regridded and int(regridded[1]) < int(regridded[2])


# compressed-tensors (vLLM): the round trip through transformers' own loader


def _rel_err(ref: torch.Tensor, other: torch.Tensor) -> float:
    return ((ref - other.float()).norm() / ref.norm()).item()


def _export_ct(tiny_model_dir, tmp_path, capsys=None, **quant):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", **quant)
    out = tmp_path / "ct"
    assert export.main([f"student={student}", "format=compressed_tensors", f"output={out}"]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    return load_model(student)[0], hf, out


IDS = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("quant", [dict(w_bits=4), dict(w_bits=4, w_granularity="per_group", w_group_size=32),
                                   dict(w_bits=8)], ids=["w4a16-channel", "w4a16-group32", "w8a16-channel"])
def test_compressed_tensors_weight_only_loads_in_transformers_with_the_students_logits(tiny_model_dir, tmp_path,
                                                                                       quant):
    """The stored codes are the student's; only the scale is rounded to float32 (from float64),
    which moves a dequantized weight by at most an ulp: measured relative logit error ~2e-7."""
    pytest.importorskip("compressed_tensors")
    student, hf, out = _export_ct(tiny_model_dir, tmp_path, **quant)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    with torch.no_grad():
        assert _rel_err(student(IDS).logits, hf(IDS).logits) < 1e-5  # the issue asks < 1e-2


class _CompressedTensorsActGrid(nn.Module):
    """compressed-tensors' own dynamic int8 per-token fake quant: max|x| / 127.5, codes -128..127."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize
        from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

        args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
        return fake_quantize(x, scale, zero_point, args)


def test_compressed_tensors_w8a8_weights_match_and_activations_follow_compressed_tensors_grid(tiny_model_dir,
                                                                                              tmp_path):
    """transformers runs W8A8 on CPU as dense weights plus compressed-tensors' activation fake quant,
    whose per-token grid is max|x| / 127.5 (ours and vLLM's int8 kernel: max|x| / 127). So: weights
    alone match to ~2e-7; with that grid swapped into the student the logits match again; as loaded
    the two grids differ by ~7e-3 relative on the tiny model."""
    pytest.importorskip("compressed_tensors")
    from quant.linear import QuantLinear

    student, hf, out = _export_ct(tiny_model_dir, tmp_path, w_bits=8, a_bits=8)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    linears = [m for m in student.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        as_loaded = _rel_err(student(IDS).logits, hf(IDS).logits)
        for module in linears:
            module.act_quantizer = _CompressedTensorsActGrid()
        assert _rel_err(student(IDS).logits, hf(IDS).logits) < 1e-5
        for module in hf.modules():
            module.quantization_enabled = False
        for module in linears:
            module.act_quantizer = nn.Identity()
        assert _rel_err(student(IDS).logits, hf(IDS).logits) < 1e-5
    assert 0 < as_loaded < 3e-2


def test_compressed_tensors_drops_kv_quantization_with_a_warning(tiny_model_dir, tmp_path, capsys):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=4, kv_bits=8)
    cfg = ExportConfig(student=student, format="compressed_tensors", output=str(tmp_path / "ct"))
    from recipes.export import run

    assert "kv_bits=8" in run(cfg)["warnings"][0]
    assert export.main([f"student={student}", "format=compressed_tensors", f"output={tmp_path / 'ct'}"]) == 0
    assert "warning: kv_bits=8" in capsys.readouterr().out  # and it replaced its own earlier export


@pytest.mark.parametrize("quant, why", [(dict(w_bits=4, w_symmetric=False), "asymmetric"),
                                        (dict(w_bits=4, weight_format="gguf_q4_0"), "llama.cpp's grid")])
def test_compressed_tensors_refuses_schemes_it_cannot_hold(tiny_model_dir, tmp_path, capsys, quant, why):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", **quant)
    before = set(os.listdir(tmp_path))
    assert export.main([f"student={student}", "format=compressed_tensors", f"output={tmp_path / 'ct'}"]) == 2
    err = capsys.readouterr().err
    assert "format=compressed_tensors cannot hold" in err and why in err
    assert set(os.listdir(tmp_path)) == before
    with pytest.raises(UserError, match=why):  # the library refuses too, not only the recipe
        convert(load_model(student)[0], "compressed_tensors", None, tmp_path / "ct")
    assert set(os.listdir(tmp_path)) == before


def test_compressed_tensors_does_not_clobber_a_foreign_folder(tiny_model_dir, tmp_path):
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=4)
    assert export.main([f"student={student}", "format=compressed_tensors", f"output={tiny_model_dir}"]) == 2
    assert (tmp_path / "tiny-llama" / "model.safetensors").is_file()


def test_gguf_export_does_not_clobber_a_foreign_gguf(tiny_model_dir, tmp_path, capsys):
    """Issue 14: an existing .gguf is replaced only if llm-qat's exporter wrote it."""
    student, _ = make_student(tiny_model_dir, tmp_path / "student", w_bits=4, weight_format="gguf_q4_0")
    theirs = tmp_path / "theirs.gguf"
    theirs.write_bytes(b"GGUF someone else's model")
    assert export.main([f"student={student}", "format=gguf_q4_0", f"output={theirs}"]) == 2
    assert "not written by llm-qat" in capsys.readouterr().err
    assert theirs.read_bytes() == b"GGUF someone else's model"
    ours = tmp_path / "ours.gguf"
    for _ in range(2):  # the second run replaces its own file
        assert export.main([f"student={student}", "format=gguf_q4_0", f"output={ours}"]) == 0
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
