"""The paths only a GPU takes, on a tiny random Llama; skipped without CUDA. scripts/gpu_check.sh runs them.

    PYTHONPATH=. .venv/bin/python -m pytest -q -m gpu tests/test_cuda_paths.py

bf16 autocast training with fake quantizers (finite loss, STE gradients), the teacher in bf16,
generation and evaluation on cuda:LOCAL_RANK against the CPU, the fake quantizer's float64 and
fast_math arithmetic on CUDA, and FSDP2 over NCCL (two GPUs or more).
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from models import load_model, quantize_model
from quant.config import QuantConfig, QuantSpec
from quant.fake_quant import quantize_dequantize
from quant.linear import QuantLinear
from quant.quantizer import FakeQuantizer
from recipes import evaluate as evaluate_recipe
from recipes.evaluate import EvalConfig, evaluate_task, load_eval_model
from recipes.generate import resolve_device
from recipes.train import TrainConfig, _dtypes, build_models
from tests.conftest import ROOT, make_tiny_llama
from tests.recipes.test_train import write_text_jsonl
from utils.data.generation import Sampling, generate_sequences
from utils.distributed import Runtime
from utils.eval.perplexity import perplexity
from utils.eval.tasks import MCDoc
from utils.eval.zeroshot import evaluate_docs
from utils.train.distill import DistillStudent, KDLoss, teacher_hidden_states

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

W4A8KV8 = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)


def cuda() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def tiny_student(device, quant=W4A8KV8):
    return quantize_model(make_tiny_llama(0), quant).to(device)


def test_bf16_autocast_forward_backward_of_a_fake_quant_student_is_finite():
    model = tiny_student(cuda()).train()
    ids = torch.randint(3, 256, (2, 32), device=cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [m.weight.grad for m in model.modules() if isinstance(m, QuantLinear)]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_gradient_is_straight_through_on_cuda(dtype):
    x = torch.randn(16, 64, device=cuda(), dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    FakeQuantizer(QuantSpec(4, granularity="per_token"))(x).backward(grad)
    assert torch.equal(x.grad, grad)


def test_quant_linear_under_autocast_uses_the_fake_quantized_weight():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 32).to(cuda()), weight_spec=QuantSpec(4))
    x = torch.randn(8, 64, device=cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    expected = torch.nn.functional.linear(x, quantize_dequantize(layer.weight.detach(), QuantSpec(4)), layer.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 matmul rounding


def test_teacher_in_bf16_on_cuda_gives_a_kd_loss_close_to_float32(tiny_model_dir):
    cfg = TrainConfig(model=tiny_model_dir, loss_chunk_size=16)
    rt = Runtime(0, 1, cuda().index, cuda(), "none")
    student_dtype, teacher_dtype, autocast = _dtypes(cfg, rt)
    assert (student_dtype, teacher_dtype, autocast) == (torch.float32, torch.bfloat16, True)
    student, teacher, _ = build_models(cfg, rt, student_dtype, teacher_dtype)
    assert next(teacher.parameters()).dtype == torch.bfloat16 and next(student.parameters()).device == cuda()
    ids = torch.randint(3, 256, (2, 32), device=cuda())
    mask = torch.ones_like(ids)
    model = DistillStudent(student, KDLoss(chunk_size=16))
    losses = {}
    for dtype in (torch.bfloat16, torch.float32):
        teacher.to(dtype)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[dtype] = model(ids, mask, teacher_hidden_states(teacher, ids, mask),
                                  teacher.get_output_embeddings())["loss"]
    assert torch.isfinite(losses[torch.bfloat16])
    losses[torch.bfloat16].backward()
    torch.testing.assert_close(losses[torch.bfloat16].detach(), losses[torch.float32].detach(), rtol=0.1, atol=1e-3)


def _generate(model, jobs):
    records = generate_sequences(model, jobs, max_length=24, batch_size=8, seed=0, eos_ids=[2],
                                 sampling=Sampling(1.0, 50, 1.0))
    return {(r["start_id"], r["greedy_len"]): r["token_ids"] for r in records}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generation_on_cuda_local_rank_matches_the_cpu(attn):
    """Greedy tokens equal exactly (float32 on both; TF32 matmuls are off by default in torch: logits
    differ by ~1e-6, far below the random model's top-2 gaps). Sampled tokens can differ where a
    record's uniform falls within rounding of a CDF boundary, after which that record diverges, so
    90% of records must be equal."""
    assert resolve_device("auto") == cuda()
    assert not torch.backends.cuda.matmul.allow_tf32
    jobs = [(i, j) for j in (3, 4, 5) for i in range(3, 23)]
    cpu_model = make_tiny_llama(0, attn_implementation=attn)
    on_cpu = _generate(cpu_model, jobs)
    on_cuda = _generate(cpu_model.to(resolve_device("auto")), jobs)
    assert on_cpu.keys() == on_cuda.keys()
    for (start, greedy_len), tokens in on_cpu.items():
        assert on_cuda[(start, greedy_len)][:greedy_len] == tokens[:greedy_len]
    same = sum(on_cuda[k] == v for k, v in on_cpu.items()) / len(on_cpu)
    assert same >= 0.9, same


WORDS = "the quick brown fox jumps over a lazy dog while seven cats sleep in warm sun".split()


def synthetic_docs(n=16):
    """Two-choice examples from a fixed word list: no data files needed."""
    docs = []
    for i in range(n):
        context = "Question: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(6)) + "\nAnswer:"
        choices = [" " + " ".join(WORDS[(i * c + k) % len(WORDS)] for k in range(3 + c)) for c in (1, 2)]
        docs.append(MCDoc([context] * 2, choices, [c.strip() for c in choices], i % 2))
    return docs


@pytest.mark.parametrize("quant, atol", [(QuantConfig(), 1e-3), (W4A8KV8, 5e-2)])
def test_zero_shot_scores_on_cuda_match_the_cpu(tiny_model_dir, quant, atol):
    """Full precision: float rounding only. W4A8KV8: an activation code may move by one step where
    x / scale is within rounding of a .5 tie, which moves a log-likelihood by a few 1e-2 at most."""
    scores = {}
    for device in ("cpu", str(cuda())):
        model, tok = load_eval_model(EvalConfig(model=tiny_model_dir, device=device, quant=quant))
        evaluate_docs(model, tok, synthetic_docs(), scores_out=scores.setdefault(device, []))
    torch.testing.assert_close(torch.tensor(scores[str(cuda())]), torch.tensor(scores["cpu"]), rtol=1e-4, atol=atol)


def test_evaluate_task_on_cuda_matches_the_cpu(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(evaluate_recipe, "load_task", lambda task, data_dir, limit: synthetic_docs()[:limit])
    results = {}
    for device in ("cpu", str(cuda())):
        cfg = EvalConfig(model=tiny_model_dir, tasks=["piqa"], limit=16, device=device, quant=W4A8KV8)
        model, tok = load_eval_model(cfg)
        results[device] = evaluate_task(model, tok, "piqa", cfg)
    cpu, gpu = results["cpu"], results[str(cuda())]
    assert gpu["n"] == cpu["n"] == 16
    assert abs(gpu["acc"] - cpu["acc"]) <= 1 / 16  # at most one near-tie flips (see the scores test)


def test_perplexity_on_cuda_matches_the_cpu(tiny_model_dir):
    text = " ".join(WORDS * 40)
    ppl = {}
    for device in ("cpu", cuda()):
        model, tok = load_model(tiny_model_dir, device=device)
        ppl[str(device)] = perplexity(model.eval(), tok, text, seqlen=64, limit=4)["ppl"]
    assert ppl[str(cuda())] == pytest.approx(ppl["cpu"], rel=1e-4)


SPECS = [QuantSpec(4), QuantSpec(8, False, "per_token"), QuantSpec(4, True, "per_group", 32),
         QuantSpec(8, False, "per_group", 32)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_fake_quant_on_cuda_equals_the_cpu_and_fast_math_stays_within_ulps(spec):
    """Every op (min/max, IEEE division, round, clamp, multiply) is exactly rounded on both devices,
    so each arithmetic mode gives the CPU's bits. fast_math against float64: symmetric within one
    float32 ulp; asymmetric within two (the float32 scale and the product (q - z) * scale each
    round), measured up to 1.8 on the CPU; a code moves by one step only at rare .5 ties."""
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    fast = dataclasses.replace(spec, fast_math=True)
    for s in (spec, fast):
        assert torch.equal(quantize_dequantize(x.to(cuda()), s).cpu(), quantize_dequantize(x, s))
    exact, approx = quantize_dequantize(x.to(cuda()), spec), quantize_dequantize(x.to(cuda()), fast)
    diff = (approx - exact).abs()
    moved = diff > 1e-4  # a step is >= 1e-2 here; rounding differences are < 1e-6
    assert moved.float().mean() < 1e-3
    ulps = diff / (torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30))
    assert ulps[~moved].max() <= (1 if spec.symmetric else 2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 over NCCL needs 2 GPUs")
def test_fsdp2_over_nccl_on_two_gpus(tiny_model_dir, tmp_path):
    data, out = write_text_jsonl(tmp_path / "data.jsonl"), tmp_path / "fsdp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "LLMQAT_NO_PROGRESS": "1"}
    cmd = ["bash", str(ROOT / "run_train.sh"), "4", "8", "8", f"model={tiny_model_dir}", f"data.train={data}",
           f"output_dir={out}", "backend=fsdp", "nproc=2", "max_steps=3", "model_max_length=32",
           f"data.cache_dir={tmp_path / 'cache'}", "loss_chunk_size=24"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and metrics["final_loss"] == metrics["final_loss"]
    student, _ = load_model(str(out / "student"))
    assert student.llmqat_quant_config.tag() == "W4A8KV8"
