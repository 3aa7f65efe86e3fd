"""The GPU precision paths, run on the CPU: bf16 autocast training of a fake-quantized student, the
teacher in bf16, evaluation in bf16, FSDP2 / DeepSpeed mixed-precision settings, compile=true.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/recipes/test_autocast.py

CPU autocast runs the same dtype rules as CUDA autocast (matmuls in bf16, the fake quantizers and
the KD softmaxes in float32), so what a GPU run computes is checked here, apart from the kernels.
"""

import logging

import pytest
import torch

from quant.config import QuantConfig
from quant.linear import QuantLinear
from quant.quantizer import FakeQuantizer
from recipes.evaluate import EvalConfig, load_eval_model
from recipes.train import TrainConfig, _dtypes, build_models, run
from tests.conftest import make_tiny_llama
from tests.recipes.test_train import _cfg, write_text_jsonl
from utils import distributed
from utils.distributed import Runtime, fsdp_mp_policy
from utils.eval.perplexity import perplexity
from utils.train.distill import DistillStudent, KDLoss, teacher_hidden_states
from utils.train.loop import _deepspeed_config, compile_student, resolve_precision

W4A8KV8 = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)
CPU = Runtime(0, 1, 0, torch.device("cpu"), "none")


def _student():
    from models import quantize_model

    return quantize_model(make_tiny_llama(0), W4A8KV8).train()


def _ids(seed=0):
    return torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(seed))


def _kd_loss(student, teacher, ids, autocast: bool):
    mask = torch.ones_like(ids)
    hidden = teacher_hidden_states(teacher, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return DistillStudent(student, KDLoss(chunk_size=16))(ids, mask, hidden, teacher.get_output_embeddings())


def test_autocast_kd_step_is_finite_and_ste_gradients_reach_every_quantized_weight():
    student, teacher = _student(), make_tiny_llama(0).requires_grad_(False)
    out = _kd_loss(student, teacher, _ids(), autocast=True)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])  # the KD softmaxes stay fp32
    out["loss"].backward()
    weights = [m.weight for m in student.modules() if isinstance(m, QuantLinear)]
    assert len(weights) == 14  # 7 per layer x 2 layers
    for w in weights:
        assert w.dtype == torch.float32 and w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_fake_quantizers_see_bf16_inputs_under_autocast_and_keep_their_dtype():
    """Inputs that come out of an autocast matmul (o_proj's, down_proj's, K and V) are bf16; the
    quantizer computes in float32 (quant/fake_quant.py) and returns the input's dtype."""
    student, seen = _student(), []

    def record(module, args, output):
        if module.enabled:
            seen.append((args[0].dtype, output.dtype))

    for m in student.modules():
        if isinstance(m, FakeQuantizer):
            m.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student(_ids())
    assert all(i == o for i, o in seen)
    assert {i for i, _ in seen} == {torch.bfloat16, torch.float32}  # norms hand q/k/v/gate/up float32
    # per layer: the inputs of o_proj and down_proj, and K and V (weights stay float32 masters)
    assert sum(i == torch.bfloat16 for i, _ in seen) == 4 * 2


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("quant, tol", [(QuantConfig(), 2e-2), (W4A8KV8, 5e-2)])
def test_student_logits_under_autocast_are_close_to_float32(quant, tol):
    """bf16 matmuls keep 8 mantissa bits: the relative logit error (norm of the difference over the
    norm) measured 0.39% at full precision and 0.81% at W4A8KV8, whose activation codes also move
    by one step where bf16 rounding crosses a .5 tie. Tolerances 2% and 5%."""
    from models import quantize_model

    student = quantize_model(make_tiny_llama(0), quant).eval()
    ids = _ids(1)
    with torch.no_grad():
        exact = student(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = student(ids).logits
    assert _rel(mixed, exact) < tol


def test_teacher_in_bf16_gives_a_kd_loss_close_to_the_float32_teachers(tiny_model_dir):
    cfg = TrainConfig(model=tiny_model_dir, teacher_dtype="bfloat16", precision="bf16_autocast", loss_chunk_size=16)
    student_dtype, teacher_dtype, autocast = _dtypes(cfg, CPU)
    assert (student_dtype, teacher_dtype, autocast) == (torch.float32, torch.bfloat16, True)
    student, teacher, _ = build_models(cfg, CPU, student_dtype, teacher_dtype)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    ids = _ids(2) % 200 + 3
    loss_bf16 = _kd_loss(student, teacher, ids, autocast)["loss"]
    loss_fp32 = _kd_loss(student, teacher.float(), ids, autocast)["loss"]
    assert torch.isfinite(loss_bf16)
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=0.05, atol=1e-3)


@pytest.mark.parametrize("precision, teacher", [("bf16_autocast", "bfloat16"), ("bf16", "auto")])
def test_bf16_training_run_on_cpu_has_a_finite_loss(tmp_path, monkeypatch, tiny_model_dir, precision, teacher):
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    data = write_text_jsonl(tmp_path / "data.jsonl")
    metrics = run(_cfg(tiny_model_dir, data, tmp_path / "out", f"precision={precision}", f"teacher_dtype={teacher}",
                       "max_steps=2"))
    assert metrics["steps"] == 2 and all(torch.isfinite(torch.tensor(metrics[k])) for k in ("final_loss", "val_kd_loss_end"))
    assert metrics["compiled"] is False


def test_evaluation_in_bf16_is_close_to_float32(tiny_model_dir):
    """EvalConfig dtype=bfloat16 is the GPU's cheap evaluation (no autocast option is needed: there
    are no master weights to keep in float32): the fake-quant student's perplexity within 2%."""
    text = " ".join(["the quick brown fox jumps over a lazy dog"] * 40)
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_eval_model(EvalConfig(model=tiny_model_dir, dtype=dtype, device="cpu", quant=W4A8KV8))
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        ppl[dtype] = perplexity(model, tok, text, seqlen=64, limit=4)["ppl"]
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.02)


@pytest.mark.parametrize("precision, param, reduce", [("fp32", None, torch.float32),
                                                      ("bf16_autocast", None, torch.float32),
                                                      ("bf16", torch.bfloat16, torch.float32)])
def test_fsdp_mixed_precision_policy(precision, param, reduce):
    policy = fsdp_mp_policy(precision)
    assert (policy.param_dtype, policy.reduce_dtype, policy.cast_forward_inputs) == (param, reduce, False)


@pytest.mark.parametrize("precision, device, bf16", [("auto", "cpu", False), ("auto", "cuda", True),
                                                     ("bf16_autocast", "cpu", True), ("bf16", "cpu", True),
                                                     ("fp32", "cuda", False)])
def test_deepspeed_bf16_block_follows_the_precision_and_keeps_the_files_keys(tmp_path, precision, device, bf16):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text('{"zero_optimization": {"stage": 2}, "bf16": {"immediate_grad_update": true}}')
    cfg = TrainConfig(precision=precision, backend="deepspeed", deepspeed_config=str(ds_file))
    ds = _deepspeed_config(cfg, Runtime(0, 1, 0, torch.device(device), "deepspeed"))
    assert ds["bf16"] == {"immediate_grad_update": True, "enabled": bf16}
    assert resolve_precision(precision, device) in (("bf16", "bf16_autocast") if bf16 else ("fp32",))


def test_compile_falls_back_to_eager_with_a_warning_when_torch_compile_fails(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("backend compiler failed")
        return call

    monkeypatch.setattr(distributed.torch, "compile", broken_compile)
    student, cfg = _student(), TrainConfig(compile=True, per_device_batch_size=1, model_max_length=16)
    expected = student(_ids()).logits
    with caplog.at_level(logging.WARNING):
        assert compile_student(cfg, student, CPU, autocast=False) is False
    assert "running eager" in caplog.text and "backend compiler failed" in caplog.text
    assert all("forward" not in vars(layer) for layer in student.model.layers)
    torch.testing.assert_close(student(_ids()).logits, expected, rtol=0, atol=0)
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.slow  # torch.compile on the CPU takes about a minute
def test_compile_true_trains_like_eager(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    data = write_text_jsonl(tmp_path / "data.jsonl")
    eager = run(_cfg(tiny_model_dir, data, tmp_path / "eager", "max_steps=2"))
    compiled = run(_cfg(tiny_model_dir, data, tmp_path / "compiled", "max_steps=2", "compile=true"))
    assert compiled["compiled"] is True
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-3)
