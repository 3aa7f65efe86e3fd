"""Data generation throughput: the original one-sequence-at-a-time procedure vs our batched decoder.

    flock /tmp/llmqat_heavy.lock python benchmarks/bench_generate.py [model=smollm2-135m max_length=128
        base_starts=2 ours_starts=256 batch_size=256 threads=0]

Both use the same settings and length budget: greedy lengths 3, 4, 5, then top_k 50 / T 1.0 sampling to
EOS or `max_length`. The original (LLM-QAT `generate_data.py`) calls HF `generate(do_sample=False,
max_length=j)` and then `generate(do_sample=True, max_length=max_length)` per sequence; ours runs
`utils.data.generation.generate_sequences` over more start tokens (throughput needs a full batch). Only
real tokens are counted (generated tokens, no padding, the start token excluded). Also prints the
matmul roofline: measured float32 matmul FLOP/s over 2 x parameters FLOPs per token.

`compile=true` instead times our decoder eager and then with torch.compiled decoder layers (what
generate_data.py compile=true does), same jobs, and prints the tokens/s ratio:

    flock /tmp/llmqat_heavy.lock python benchmarks/bench_generate.py compile=true ours_starts=32 batch_size=32 max_length=64
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models import load_model  # noqa: E402
from recipes.generate import eos_ids_of, skipped_ids  # noqa: E402
from utils.data.generation import Sampling, generate_sequences  # noqa: E402
from utils.distributed import compile_layers  # noqa: E402

GREEDY = (3, 4, 5)


def _args(argv):
    opts = {"model": "smollm2-135m", "max_length": "128", "base_starts": "2", "ours_starts": "256",
            "batch_size": "256", "threads": "0", "compile": "false"}
    for item in argv:
        key, _, value = item.partition("=")
        if key not in opts:
            raise SystemExit(f"unknown option {key!r}; options: {sorted(opts)}")
        opts[key] = value
    return opts


def start_ids(tokenizer, n, first=1000):
    skip = skipped_ids(tokenizer)
    return [i for i in range(first, len(tokenizer)) if i not in skip][:n]


@torch.inference_mode()
def bench_original(model, starts, max_length, eos):
    """One sequence at a time, exactly as the original script: greedy generate, then sampling generate."""
    tokens, t0 = 0, time.perf_counter()
    for j in GREEDY:
        for i in starts:
            out = model.generate(torch.tensor([[i]], device=model.device), do_sample=False, max_length=j,
                                 eos_token_id=eos, pad_token_id=eos[0])
            out = model.generate(out, do_sample=True, max_length=max_length, top_k=50, temperature=1.0,
                                 top_p=1.0, eos_token_id=eos, pad_token_id=eos[0])
            tokens += out.shape[1] - 1  # batch of one: no padding
    return tokens, time.perf_counter() - t0


def bench_ours(model, starts, max_length, batch_size, eos):
    jobs = [(i, j) for j in GREEDY for i in starts]
    tokens, t0 = 0, time.perf_counter()
    for seq in generate_sequences(model, jobs, max_length=max_length, batch_size=batch_size, seed=0, eos_ids=eos,
                                  sampling=Sampling(1.0, 50, 1.0)):
        tokens += len(seq["token_ids"]) - 1
    return tokens, time.perf_counter() - t0


def compare(model, tokenizer, base_starts: int, ours_starts: int, max_length: int, batch_size: int,
            first: int = 1000) -> dict:
    """Tokens and seconds of both procedures on `model` (on its device), and tokens/s of each.

    `first`: start ids are taken from this id up (skipping special ones), as `start_ids` does.
    """
    eos = eos_ids_of(model, tokenizer, None)
    base = bench_original(model, start_ids(tokenizer, base_starts, first), max_length, eos)
    ours = bench_ours(model, start_ids(tokenizer, ours_starts, first), max_length, batch_size, eos)
    out = {name: {"tokens": tok, "seconds": sec, "tokens_per_s": tok / sec}
           for name, (tok, sec) in (("original", base), ("ours", ours))}
    out["speedup"] = out["ours"]["tokens_per_s"] / out["original"]["tokens_per_s"]
    return out


def compare_compile(model, tokenizer, starts: int, max_length: int, batch_size: int) -> dict:
    """Tokens/s of our decoder eager, then with compiled decoder layers (the compile, a short probe
    generation, timed apart; the compiled run is the second call, after shape recompiles)."""
    eos, ids = eos_ids_of(model, tokenizer, None), start_ids(tokenizer, starts, min(1000, len(tokenizer) // 2))
    out = {"eager": bench_ours(model, ids, max_length, batch_size, eos)}
    t0 = time.perf_counter()
    ok = compile_layers(model, lambda: bench_ours(model, ids[:batch_size], max_length, batch_size, eos))
    out["compile_s"], out["compiled_ok"] = time.perf_counter() - t0, ok
    out["compiled"] = bench_ours(model, ids, max_length, batch_size, eos)
    rates = {k: out[k][0] / out[k][1] for k in ("eager", "compiled")}
    out["ratio"] = rates["compiled"] / rates["eager"]
    return {**out, "tokens_per_s": rates}


def matmul_flops(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    opts = _args(sys.argv[1:])
    if int(opts["threads"]):
        torch.set_num_threads(int(opts["threads"]))
    model, tok = load_model(opts["model"])
    model.eval()
    max_length = int(opts["max_length"])
    params = sum(p.numel() for p in model.parameters())
    print(f"model {opts['model']}: {params / 1e6:.1f}M params, torch threads {torch.get_num_threads()}, "
          f"max_length {max_length}, greedy {GREEDY}, top_k 50, T 1.0")
    if opts["compile"] == "true":
        res = compare_compile(model, tok, int(opts["ours_starts"]), max_length, int(opts["batch_size"]))
        print(f"ours eager {res['tokens_per_s']['eager']:.1f} tok/s, compiled (ok={res['compiled_ok']}) "
              f"{res['tokens_per_s']['compiled']:.1f} tok/s: ratio compiled/eager {res['ratio']:.2f}x "
              f"(compile + probe {res['compile_s']:.0f} s)")
        return
    res = compare(model, tok, int(opts["base_starts"]), int(opts["ours_starts"]), max_length, int(opts["batch_size"]))
    base, ours = res["original"], res["ours"]
    print(f"original (HF generate, 1 sequence at a time): {base['tokens']} tokens in {base['seconds']:.1f} s = "
          f"{base['tokens_per_s']:.1f} tok/s")
    print(f"ours (batch {opts['batch_size']}, slot KV cache, refill): {ours['tokens']} tokens in "
          f"{ours['seconds']:.1f} s = {ours['tokens_per_s']:.1f} tok/s")
    print(f"speed-up: {res['speedup']:.1f}x")
    flops = matmul_flops()
    roofline = flops / (2 * params)
    print(f"matmul: {flops / 1e9:.1f} GFLOP/s (2048^3 float32) -> roofline {roofline:.0f} tok/s at 2 x params "
          f"FLOPs/token; ours reaches {100 * ours['tokens_per_s'] / roofline:.0f}%")


if __name__ == "__main__":
    main()
