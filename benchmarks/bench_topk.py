"""Teacher-free distillation (issue 16): QAT step time and peak memory with teacher=cached vs online, and
the generation slowdown from writing the top-K targets.

    flock /tmp/llmqat_heavy.lock .venv/bin/python benchmarks/bench_topk.py --seqlen 256 --steps 3 --k 32

(1) One W4A8KV8 KD step (student forward + backward + AdamW) on one fixed batch of `--batch` x
`--seqlen` tokens, each variant in a fresh subprocess: online (frozen teacher loaded and run each
step) vs cached (K top-K targets as a batch tensor, no teacher loaded); median step time after one
warm-up step, and the process's peak RSS (CPU) or max_memory_allocated (GPU). (2) Generation tokens/s
of `generate_sequences` with teacher_topk=0 vs K (same jobs, alternating rounds).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import load_model  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from utils.data.generation import Sampling, generate_sequences  # noqa: E402
from utils.data.topk import topk_targets  # noqa: E402
from utils.train.distill import DistillStudent, KDLoss, teacher_hidden_states  # noqa: E402


def _peak_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_child(args) -> dict:
    """Time `args.steps` KD steps of one variant (this process loads only what the variant needs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student, _ = load_model(args.model, quant=QuantConfig(w_bits=4, a_bits=8, kv_bits=8), device=device)
    student.train().config.use_cache = False
    ids = torch.randint(100, 20000, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    model = DistillStudent(student, KDLoss(chunk_size=args.chunk))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if args.child == "online":
        teacher, _ = load_model(args.model, device=device)
        teacher.eval().requires_grad_(False)
        forward = lambda: model(ids, mask, teacher_hidden_states(teacher, ids, mask),  # noqa: E731
                                teacher.get_output_embeddings())
    else:
        with torch.no_grad():  # stand-in targets of the right shape (made once, outside the timing)
            logits = student(input_ids=ids).logits.flatten(0, 1)
        top_ids, top_lps = (t.view(args.batch, args.seqlen, -1) for t in topk_targets(logits, args.k))
        top_ids, top_lps, target_mask = top_ids.int(), top_lps.half(), mask
        del logits
        forward = lambda: model(ids, mask, topk_ids=top_ids, topk_logprobs=top_lps, target_mask=target_mask)  # noqa
    times = []
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        forward()["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_gb": _peak_gb(device)}


def generation(args) -> dict:
    model, tok = load_model(args.model)
    model.eval()
    jobs = [(i, 3) for i in range(1000, 1000 + args.gen_starts)]
    rates = {0: [], args.k: []}
    for _ in range(args.rounds):
        for k in rates:
            t0 = time.perf_counter()
            seqs = list(generate_sequences(model, jobs, max_length=args.gen_length, batch_size=args.gen_starts,
                                           seed=0, eos_ids=[], sampling=Sampling(), vocab_limit=len(tok),
                                           teacher_topk=k))
            rates[k].append(sum(len(s["token_ids"]) - 1 for s in seqs) / (time.perf_counter() - t0))
    best = {k: max(v) for k, v in rates.items()}
    return {"tokens_per_s": best, "slowdown": 1 - best[args.k] / best[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gen-starts", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--child", choices=("online", "cached"))
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(step_child(args)))
        return
    res = {}
    for variant in ("online", "cached"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", variant], capture_output=True,
                             text=True, check=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"settings: {vars(args)}, torch threads {torch.get_num_threads()}")
    print(f"KD step: online {res['online']['step_s']:.3f} s, cached {res['cached']['step_s']:.3f} s: ratio "
          f"{res['cached']['step_s'] / res['online']['step_s']:.2f}x; peak memory online "
          f"{res['online']['peak_gb']:.2f} GB, cached {res['cached']['peak_gb']:.2f} GB")
    if not args.skip_generation:
        gen = generation(args)
        print(f"generation: {gen['tokens_per_s'][0]:.1f} tok/s without targets, {gen['tokens_per_s'][args.k]:.1f} "
              f"tok/s with teacher_topk={args.k}: slowdown {100 * gen['slowdown']:.1f} %")


if __name__ == "__main__":
    main()
