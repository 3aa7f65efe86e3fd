"""PTQ baselines (quant/gptq.py, quant/smoothquant.py, recipes/ptq.py) on tiny problems.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_ptq.py
"""

from __future__ import annotations

import json

import pytest
import torch

import quantize_ptq
from models import load_model, quantize_model
from quant.config import QuantConfig, QuantSpec
from quant.errors import UserError
from quant.fake_quant import quantize_dequantize
from quant.gptq import gptq_model, gptq_quantize_weight
from quant.linear import QuantLinear
from quant.smoothquant import activation_absmax, smooth_model
from tests.conftest import TINY_VOCAB, make_tiny_llama
from utils.config import ConfigError, load_config

SPECS = [QuantSpec(4), QuantSpec(4, granularity="per_group", group_size=16), QuantSpec(3, granularity="per_tensor"),
         QuantSpec(4, symmetric=False)]


def layer_problem(seed: int = 0, out: int = 48, features: int = 64, tokens: int = 512):
    """A weight and correlated inputs (as real activations are), with one outlier channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, features, generator=g)
    x += 0.1 * torch.randn(tokens, features, generator=g)
    x[:, 3] *= 8
    w = torch.randn(out, features, generator=g) * 0.05
    return w, x, 2 * x.T.double() @ x.double() / tokens


def recon_error(x, w, q) -> float:
    return (x @ w.T - x @ q.T).pow(2).sum().item()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_and_its_weights_requantize_to_themselves(spec, act_order):
    w, x, h = layer_problem()
    q = gptq_quantize_weight(w, h, spec, block_size=16, act_order=act_order)
    assert recon_error(x, w, q) < 0.8 * recon_error(x, w, quantize_dequantize(w, spec))
    if spec.symmetric:
        assert torch.equal(quantize_dequantize(q, spec), q)  # the fake quantizer reproduces GPTQ exactly
    else:
        torch.testing.assert_close(quantize_dequantize(q, spec), q, rtol=0, atol=1e-6)


def test_gptq_rejects_gguf_grids():
    w, _, h = layer_problem()
    with pytest.raises(ValueError, match="MinMax"):
        gptq_quantize_weight(w, h, QuantSpec(4, True, "per_group", 32, format="gguf_q4_0"))


def test_gptq_model_is_reproduced_by_quantize_model():
    model = make_tiny_llama()
    calib = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    qcfg = QuantConfig(w_bits=4, w_granularity="per_group", w_group_size=16)
    gptq_model(model, qcfg, calib, block_size=32, act_order=True, batch_size=2)
    quantize_model(model, qcfg)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14
    for m in linears:
        assert torch.equal(m.weight_quantizer(m.weight), m.weight)


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_smoothquant_keeps_full_precision_outputs(alpha):
    model = make_tiny_llama()
    with torch.no_grad():  # an outlier channel, as in real LLM activations
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[7] = 20.0
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        quantize_model(model, QuantConfig(w_bits=8, a_bits=4))
        rtn_error = (model(ids).logits - before).abs().mean()
        from models import dequantize_model

        dequantize_model(model)
        old_norm = model.model.layers[0].input_layernorm.weight.clone()
        smooth_model(model, activation_absmax(model, ids), alpha=alpha)
        assert not torch.equal(model.model.layers[0].input_layernorm.weight, old_norm)
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
        quantize_model(model, QuantConfig(w_bits=8, a_bits=4))
        smooth_error = (model(ids).logits - before).abs().mean()
    assert smooth_error < rtn_error  # migrating the outlier helps per-token A4 quantization


def write_calib(path, n=20):
    rows = [{"text": f"Calibration sentence {i} about quantization and language models."} for i in range(n)]
    rows.append({"token_ids": list(range(3, 40))})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "gptq"])
def test_ptq_cli_saves_a_student_that_loads_with_its_quant_config(tiny_model_dir, tmp_path, method):
    calib, out = write_calib(tmp_path / "gen.jsonl"), tmp_path / method
    args = [f"method={method}", f"model={tiny_model_dir}", "w_bits=4", "a_bits=8", "kv_bits=8", f"calib={calib}",
            "calib_samples=4", "calib_seqlen=32", f"output_dir={out}"]
    assert quantize_ptq.main(args) == 0
    student, _ = load_model(str(out))
    assert student.llmqat_quant_config.tag() == "W4A8KV8"
    meta = json.loads((out / "llmqat_meta.json").read_text())
    assert meta["method"] == method and meta["provenance"]["inputs"]["model"].startswith("files:")
    assert meta["provenance"]["tokenizer"].startswith("tok:") and meta["provenance"]["config"]["method"] == method
    assert ("calibration" in meta["provenance"]["inputs"]) == (method != "rtn")
    ids = torch.randint(3, TINY_VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()
    if method == "gptq":
        for m in student.modules():
            if isinstance(m, QuantLinear):
                assert torch.equal(m.weight_quantizer(m.weight), m.weight)


def test_ptq_bad_inputs_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    from recipes.ptq import PTQConfig

    with pytest.raises(ConfigError, match="method"):
        load_config(PTQConfig, ["method=awq"])
    args = ["method=gptq", f"model={tiny_model_dir}", "w_bits=4", f"calib={tmp_path / 'nope.jsonl'}",
            f"output_dir={tmp_path / 'o'}"]
    assert quantize_ptq.main(args) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert quantize_ptq.main([f"model={tiny_model_dir}", f"output_dir={tmp_path / 'o'}"]) == 2  # all 16 bits


def _draw_inputs(mix: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """Inputs of one fixed distribution (low-rank mix + noise, one outlier channel), fresh samples per seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, mix.shape[0], generator=g) @ mix + 0.1 * torch.randn(tokens, mix.shape[1], generator=g)
    x[:, 3] *= 8
    return x


def test_gptq_generalizes_to_held_out_inputs_given_enough_calibration_tokens():
    g = torch.Generator().manual_seed(1)
    mix, w = torch.randn(24, 64, generator=g), torch.randn(48, 64, generator=g) * 0.05
    spec, held_out = QuantSpec(4), _draw_inputs(mix, 4096, seed=99)
    calib = _draw_inputs(mix, 20 * 64, seed=5)  # GPTQ_TOKENS_PER_FEATURE tokens per input feature
    q = gptq_quantize_weight(w, 2 * calib.T.double() @ calib.double() / len(calib), spec, block_size=16)
    assert recon_error(held_out, w, q) < 0.8 * recon_error(held_out, w, quantize_dequantize(w, spec))


def test_too_little_calibration_data_for_gptq_is_a_warning(tiny_model_dir, tmp_path, caplog):
    from utils.data.calibration import calibration_windows

    _, tok = load_model(tiny_model_dir)
    calib = write_calib(tmp_path / "gen.jsonl")
    with caplog.at_level("WARNING"):
        ids = calibration_windows(calib, tok, samples=4, seqlen=32, seed=0, min_tokens=10_000)
    assert ids.shape == (4, 32)
    assert "GPTQ's Hessians" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        calibration_windows(calib, tok, samples=4, seqlen=32, seed=0, min_tokens=64)
    assert "GPTQ's Hessians" not in caplog.text


def write_generated(path, n=40):
    """Rows as the generator writes them (`start_id` marks generated records: calibration source data-free)."""
    rows = [{"text": f"Generated sentence {i} on quantized language models.", "start_id": 3 + i} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_smoothquant_alpha_auto_picks_the_grid_minimum_and_records_it(tiny_model_dir, tmp_path):
    from recipes.ptq import PTQConfig, label_notes, read_ptq_meta

    calib, out = write_generated(tmp_path / "gen.jsonl"), tmp_path / "sq"
    args = ["method=smoothquant", f"model={tiny_model_dir}", "w_bits=8", "a_bits=4", f"calib={calib}",
            "calib_samples=4", "calib_seqlen=32", "alpha_grid=[0.3,0.6,0.9]", "alpha_holdout=4", f"output_dir={out}"]
    assert quantize_ptq.main(args) == 0  # alpha=auto is the default
    meta = read_ptq_meta(out)
    chosen, search = meta["smoothquant"]["alpha"], meta["smoothquant"]["alpha_search"]
    assert set(search) == {"0.3", "0.6", "0.9"} and chosen in (0.3, 0.6, 0.9)
    assert search[f"{chosen:g}"] == min(search.values())
    assert meta["calibration"]["source"] == "data-free" and meta["smoothquant"]["smooth_down"] is False
    assert label_notes(load_config(PTQConfig, args[:-1]), meta) == ["data-free", f"alpha={chosen:g} (auto)"]


def test_alpha_search_restores_the_weights_and_takes_the_finite_minimum(monkeypatch):
    import recipes.ptq as ptq

    model = make_tiny_llama()
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = ptq.PTQConfig(method="smoothquant", alpha_grid=[0.4, 0.8], quant=QuantConfig(w_bits=8, a_bits=4))
    best, losses = ptq.search_alpha(model, activation_absmax(model, ids), ids, cfg)
    assert best in (0.4, 0.8) and losses[best] == min(losses.values())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # every grid point undone exactly
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    fake = {0.3: float("nan"), 0.5: 2.0, 0.7: 1.5, 0.9: 1.5}
    monkeypatch.setattr(ptq, "_smoothed_loss", lambda model, scales, alpha, cfg, held: fake[alpha])
    assert ptq.search_alpha(model, {}, ids, ptq.PTQConfig(alpha_grid=list(fake)))[0] == 0.7  # NaN never wins


@pytest.mark.parametrize("argv,match", [(["alpha=1.5"], "alpha"), (["alpha=strong"], "alpha"),
                                        (["alpha_grid=[]"], "alpha_grid"), (["alpha_holdout=0"], "alpha_holdout")])
def test_bad_alpha_settings_are_config_errors(argv, match):
    from recipes.ptq import PTQConfig

    with pytest.raises(ConfigError, match=match):
        load_config(PTQConfig, argv)
    assert load_config(PTQConfig, ["alpha=0.85"]).alpha == "0.85"


def test_calibration_split_holds_out_the_tail_and_fits_on_the_rest(tiny_model_dir, tmp_path):
    from utils.data.calibration import calibration_source, calibration_split, calibration_stream

    _, tok = load_model(tiny_model_dir)
    calib = write_generated(tmp_path / "gen.jsonl")
    stream = calibration_stream(calib, tok)
    fit, held = calibration_split(calib, tok, samples=8, seqlen=32, seed=0, held_out=3)
    assert held.flatten().tolist() == stream[-3 * 32:]
    cut = len(stream) - 3 * 32
    text = " ".join(map(str, stream[:cut]))
    assert fit.shape == (8, 32) and all(" ".join(map(str, row.tolist())) in text for row in fit)
    with pytest.raises(UserError, match="alpha_holdout"):
        calibration_split(calib, tok, samples=8, seqlen=32, seed=0, held_out=len(stream) // 32)
    assert calibration_source(calib) == "data-free"
    assert calibration_source(write_calib(tmp_path / "other.jsonl")) == "other.jsonl"
    assert calibration_source("wikitext2") == "wikitext2"


def test_gptq_cli_one_pass_option_and_its_label(tiny_model_dir, tmp_path):
    from recipes.ptq import PTQConfig, label_notes

    calib, out = write_generated(tmp_path / "gen.jsonl"), tmp_path / "g"
    args = ["method=gptq", f"model={tiny_model_dir}", "w_bits=4", f"calib={calib}", "calib_samples=4",
            "calib_seqlen=32", "gptq_true_sequential=false", "gptq_act_order=true"]
    assert quantize_ptq.main(args + [f"output_dir={out}"]) == 0
    assert json.loads((out / "llmqat_meta.json").read_text())["ptq"]["gptq_true_sequential"] is False
    assert label_notes(load_config(PTQConfig, args)) == ["data-free", "one-pass", "act-order"]
    assert label_notes(load_config(PTQConfig, ["method=gptq", "calib=wikitext2"])) == ["wikitext2"]


def test_calibration_record_names_split_and_data_and_follows_the_data_directory(tmp_path, monkeypatch, data_dir):
    """The record a PTQ student keeps of its calibration text: a JSONL's content fingerprint; WikiText-2's
    split, which is validation with a local data directory and train from the hub (so the two never
    share a cached student), and C4's file."""
    from quant.errors import InputFileError
    from utils.data.calibration import calibration_record
    from utils.eval.datasets import DATA_DIR_ENV

    calib = write_generated(tmp_path / "gen.jsonl")
    record = calibration_record(calib)
    assert record["source"] == "data-free" and record["data"].startswith("file:")
    write_generated(tmp_path / "gen.jsonl", n=3)
    assert calibration_record(calib)["data"] != record["data"]  # other content, other record
    with pytest.raises(InputFileError, match="calibration data not found"):
        calibration_record(str(tmp_path / "missing.jsonl"))
    local = calibration_record("wikitext2", str(data_dir))
    assert local["split"] == "validation" and local["data"].startswith("file:")
    assert calibration_record("c4", str(data_dir))["data"].startswith("file:")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert calibration_record("wikitext2") == {"source": "wikitext2", "split": "train",
                                               "data": "hub:wikitext:wikitext-2-raw-v1"}
    assert calibration_record("c4")["data"].startswith("hub:allenai/c4")
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert calibration_record("wikitext2") == local
