"""Benchmark of one QAT-KD training step on SmolLM2-135M, one process, one fixed batch.

    flock /tmp/llmqat_heavy.lock .venv/bin/python benchmarks/bench_train.py --seqlen 256 --steps 4 --rounds 2

Prints (1) step time of the W4A8KV8 fake-quant KD step vs the same KD step with the quantizers off
(target ratio <= 1.3), with tokens/s; (2) peak memory of the KD loss + backward from fixed hidden
states: our chunked loss vs the naive full-logits KL. On CPU the peak is the growth of the process's
peak RSS over the RSS once the inputs exist (VmHWM reset through /proc/self/clear_refs), each variant
in a fresh subprocess that loads no model, with glibc's mmap threshold pinned at 64 KiB: otherwise
malloc keeps freed chunk-sized blocks on its heap and the chunked loss's RSS grows by what the
allocator holds (about 2.4 GiB over 4,096 tokens), not by its live tensors (about 0.35 GiB).

`--compile` instead times the W4A8KV8 QAT-KD step with the student's decoder layers torch.compiled
(what train.py compile=true does) against eager, in alternating blocks, and prints the ratio:

    flock /tmp/llmqat_heavy.lock .venv/bin/python benchmarks/bench_train.py --compile --seqlen 128 --steps 3 --rounds 2

`--lsq` times the W4A8KV8 QAT-KD step with learned weight scales (w_quantizer=lsq, quant/lsq.py)
against MinMax (the default), in alternating blocks, and prints the ratio lsq / minmax:

    flock /tmp/llmqat_heavy.lock .venv/bin/python benchmarks/bench_train.py --lsq --seqlen 256 --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import dequantize_model, load_model, set_quantizers_enabled  # noqa: E402
from models.loading import convert_gguf, resolve_model  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from utils.distributed import compile_layers, decoder_layers  # noqa: E402
from utils.eval.datasets import wikitext2_text  # noqa: E402
from utils.train.distill import DistillStudent, KDLoss, next_token_labels, teacher_hidden_states, token_kl  # noqa: E402


def fixed_batch(tokenizer, batch: int, seqlen: int) -> torch.Tensor:
    ids = tokenizer(wikitext2_text("validation")[:200_000], return_tensors="pt").input_ids[0]
    return ids[: batch * seqlen].view(batch, seqlen)


def _sync(ids: torch.Tensor) -> None:
    if ids.is_cuda:  # CUDA kernels run asynchronously: time only finished work
        torch.cuda.synchronize(ids.device)


def train_step(model, teacher, optimizer, ids, autocast: bool = False) -> float:
    """Seconds of one full KD step: teacher forward, student forward + loss, backward, AdamW.

    `autocast`: the student's forward and loss under bf16 autocast, as train.py runs on a GPU.
    """
    mask = torch.ones_like(ids)
    _sync(ids)
    t0 = time.perf_counter()
    hidden = teacher_hidden_states(teacher, ids, mask)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids, mask, hidden, teacher.get_output_embeddings())["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(ids)
    return time.perf_counter() - t0


VARIANTS = (("kd_fp", False), ("qat_kd_w4a8kv8", True))


def bench_step(args) -> dict:
    """Median step time of each variant over blocks of `steps` steps (each after one warm-up step),
    the blocks alternating `rounds` times (A B A B) so that a neighbour's load on the shared cores
    falls on both alike. Not alternating step by step: a step right after the other variant inherits
    that variant's allocator state (page faults are a large part of a CPU step here), which measured
    1.77x where blocks measured 1.12x."""
    model, teacher, optimizer, tok = build_kd(args.model, args.chunk, args.fp32_quant)
    return time_variants(model, teacher, optimizer, fixed_batch(tok, args.batch, args.seqlen), args.steps,
                         args.rounds)


def build_kd(model_name: str, chunk: int, fast_math: bool = False, device="cpu", teacher_dtype=torch.float32,
             w_quantizer: str = "minmax"):
    """(DistillStudent at W4A8KV8, frozen teacher, AdamW at lr 0, tokenizer) on `device`.

    lr 0 keeps the same weights (and learned scales) in every timing.
    """
    torch.manual_seed(0)
    quant = QuantConfig(w_bits=4, a_bits=8, kv_bits=8, fast_math=fast_math, w_quantizer=w_quantizer)
    student, tok = load_model(model_name, device=device, quant=quant)
    teacher, _ = load_model(model_name, dtype=teacher_dtype, device=device)
    dequantize_model(teacher)
    teacher.eval().requires_grad_(False)
    model = DistillStudent(student.train(), KDLoss(chunk_size=chunk))
    return model, teacher, torch.optim.AdamW(model.parameters(), lr=0.0), tok


def time_variants(model, teacher, optimizer, ids, steps: int, rounds: int, autocast: bool = False) -> dict:
    """Median step time and tokens/s of each of VARIANTS, and their ratio (see `bench_step`)."""
    times = {name: [] for name, _ in VARIANTS}
    for _ in range(rounds):
        for name, enabled in VARIANTS:
            set_quantizers_enabled(model.lm, enabled)
            block = [train_step(model, teacher, optimizer, ids, autocast) for _ in range(steps + 1)]
            times[name] += block[1:]
    result = {}
    for name, _ in VARIANTS:
        median = statistics.median(times[name])
        result[name] = {"median_s": median, "tokens_per_s": ids.numel() / median, "times_s": times[name]}
    result["ratio"] = result["qat_kd_w4a8kv8"]["median_s"] / result["kd_fp"]["median_s"]
    return result


def _set_forwards(layers, forwards) -> None:
    """Each layer's forward: the given (compiled) function, or None for its class's eager forward."""
    for layer, forward in zip(layers, forwards):
        if forward is None:
            vars(layer).pop("forward", None)
        else:
            layer.forward = forward


def bench_compile(args) -> dict:
    """Median W4A8KV8 QAT-KD step time, decoder layers torch.compiled vs eager, in blocks of `steps`
    (each after one warm-up step) alternating `rounds` times; the compile (its probe step) timed apart."""
    model, teacher, optimizer, tok = build_kd(args.model, args.chunk, args.fp32_quant)
    ids, layers = fixed_batch(tok, args.batch, args.seqlen), decoder_layers(model.lm)
    t0 = time.perf_counter()
    ok = compile_layers(model.lm, lambda: train_step(model, teacher, optimizer, ids))
    result = {"compiled": ok, "compile_s": time.perf_counter() - t0}
    if not ok:
        return result
    variants = {"eager": [None] * len(layers), "compiled": [vars(layer)["forward"] for layer in layers]}
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, forwards in variants.items():
            _set_forwards(layers, forwards)
            times[name] += [train_step(model, teacher, optimizer, ids) for _ in range(args.steps + 1)][1:]
    for name in variants:
        result[name] = {"median_s": statistics.median(times[name]), "times_s": times[name]}
    result["ratio_compiled_over_eager"] = result["compiled"]["median_s"] / result["eager"]["median_s"]
    return result


def bench_lsq(args) -> dict:
    """Median W4A8KV8 QAT-KD step time, w_quantizer=lsq vs minmax (two students, one teacher), in
    blocks of `steps` (each after one warm-up step) alternating `rounds` times."""
    minmax, teacher, opt_minmax, tok = build_kd(args.model, args.chunk, args.fp32_quant)
    lsq, _, opt_lsq, _ = build_kd(args.model, args.chunk, args.fp32_quant, w_quantizer="lsq")
    ids = fixed_batch(tok, args.batch, args.seqlen)
    variants = {"minmax": (minmax, opt_minmax), "lsq": (lsq, opt_lsq)}
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, optimizer) in variants.items():
            times[name] += [train_step(model, teacher, optimizer, ids) for _ in range(args.steps + 1)][1:]
    result = {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}
    result["ratio_lsq_over_minmax"] = result["lsq"]["median_s"] / result["minmax"]["median_s"]
    return result


def naive_kd(hidden_s, head_s, hidden_t, head_t) -> torch.Tensor:
    """Full [B, T, V] logits and KL at once (what the chunked loss avoids)."""
    with torch.no_grad():
        teacher_logits = head_t(hidden_t).float()
    return token_kl(head_s(hidden_s).flatten(0, 1), teacher_logits.flatten(0, 1)).mean()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss_kib() -> int:
    """Reset the peak RSS to the current RSS (Linux: `5` > /proc/self/clear_refs) and return it (KiB).

    Without the reset, the peak of imports and setup can hide the loss's own peak (growth 0).
    Elsewhere falls back to ru_maxrss, which only shows growth above the earlier peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_kib() -> int:
    try:
        return _status_kib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory_child(args) -> dict:
    """Peak memory growth of loss + backward (run in a fresh process per variant on CPU)."""


    folder, gguf = resolve_model(args.model)
    config = AutoConfig.from_pretrained(convert_gguf(Path(folder) / gguf) if gguf else folder)
    vocab, width = config.vocab_size, config.hidden_size
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False)  # the model's head shape; no model load (its peak would hide ours)
    hidden_s = torch.randn(args.batch, args.seqlen, width, requires_grad=True)
    hidden_t = torch.randn(args.batch, args.seqlen, width)
    labels = next_token_labels(torch.randint(0, vocab, (args.batch, args.seqlen)), torch.ones(args.batch, args.seqlen))
    base = _reset_peak_rss_kib()
    t0 = time.perf_counter()
    if args.memory_child == "naive":
        loss = naive_kd(hidden_s, head, hidden_t, head)
    else:
        loss = KDLoss(chunk_size=args.chunk)(hidden_s, head, hidden_t, head, labels)["loss"]
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"peak_growth_mib": (_peak_rss_kib() - base) / 1024, "seconds": seconds, "loss": loss.item()}


# Large blocks are mmapped and unmapped on free, so peak RSS follows the live tensors (glibc only).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def bench_memory(args) -> dict:
    out = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--memory-child", variant, "--model", args.model, "--batch", "1",
               "--seqlen", str(args.mem_seqlen), "--chunk", str(args.chunk)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **MALLOC_ENV})
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="blocks per variant, alternating")
    parser.add_argument("--mem-seqlen", type=int, default=4096,
                        help="tokens of the memory benchmark (one sequence, whatever --batch)")
    parser.add_argument("--fp32-quant", action="store_true",
                        help="fast_math=true: the fake quantizer's arithmetic in float32 instead of float64")
    parser.add_argument("--compile", action="store_true",
                        help="time the QAT-KD step with torch.compiled decoder layers against eager (only that)")
    parser.add_argument("--lsq", action="store_true", help="time the LSQ vs MinMax QAT-KD step instead")
    parser.add_argument("--memory-child", choices=("naive", "chunked"))
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(bench_memory_child(args)))
        return
    result = {"batch": args.batch, "seqlen": args.seqlen, "chunk": args.chunk, "steps": args.steps,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "fp32_quant": args.fp32_quant,
              "mem_seqlen": args.mem_seqlen}
    if args.lsq:
        result["lsq"] = r = bench_lsq(args)
        print(f"lsq: QAT-KD W4A8KV8 step minmax {r['minmax']['median_s']:.3f} s, lsq {r['lsq']['median_s']:.3f} s, "
              f"ratio lsq/minmax {r['ratio_lsq_over_minmax']:.2f}x (target <= 1.15x)", flush=True)
        print(json.dumps(result, indent=2))
        return
    if args.compile:
        result["compile"] = c = bench_compile(args)
        if c["compiled"]:
            print(f"compile: QAT-KD W4A8KV8 step eager {c['eager']['median_s']:.3f} s, compiled "
                  f"{c['compiled']['median_s']:.3f} s, ratio compiled/eager {c['ratio_compiled_over_eager']:.2f}x "
                  f"(compile {c['compile_s']:.0f} s)", flush=True)
        print(json.dumps(result, indent=2))
        return
    if not args.skip_step:
        result["step"] = bench_step(args)
        print(f"step: KD fp {result['step']['kd_fp']['median_s']:.3f} s, QAT-KD W4A8KV8 "
              f"{result['step']['qat_kd_w4a8kv8']['median_s']:.3f} s, ratio {result['step']['ratio']:.2f}x "
              f"(target <= 1.3x); {result['step']['qat_kd_w4a8kv8']['tokens_per_s']:.0f} tokens/s", flush=True)
    if not args.skip_memory:
        result["memory"] = mem = bench_memory(args)
        print(f"loss memory (peak RSS growth, loss+backward, [1x{args.mem_seqlen}] tokens): "
              f"naive {mem['naive']['peak_growth_mib']:.0f} MiB vs chunked {mem['chunked']['peak_growth_mib']:.0f} MiB "
              f"({mem['naive']['peak_growth_mib'] / mem['chunked']['peak_growth_mib']:.1f}x lower)")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
