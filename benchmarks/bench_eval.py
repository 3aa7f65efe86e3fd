"""Evaluation speed: zero-shot scorers (naive / per example / packed) and the quantized / FP time ratio.

    flock /tmp/llmqat_heavy.lock .venv/bin/python benchmarks/bench_eval.py --n 40 --batch-tokens 1024

(1) Zero-shot examples/s on the first `--n` examples of each of `--tasks` (SmolLM2-135M, float32, FP),
three scorers in one run on the same examples: naive (one forward per choice over the whole
sequence, all logits: `score_pairs` with batch size 1, how a simple evaluator scores), per example
(shared prefix run once, the choices batched: `score_doc`), and packed (many examples per forward,
logits only where scored: `score_packed` with `--batch-tokens`). Prints each scorer's examples/s and
its ratio to naive, and the largest score difference to naive (float rounding only).
(2) The quantized / FP time ratio of what evaluate.py runs: the packed zero-shot scorer and 2048-token
perplexity windows, FP vs W4A8KV8 (weights folded, as evaluate.py loads a quantized model).
Each timing is the best of `--repeats` runs, FP and quantized alternating.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import load_model  # noqa: E402
from models.convert import convert  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from utils.eval.datasets import resolve_data_dir, wikitext2_text  # noqa: E402
from utils.eval.perplexity import make_windows, perplexity_of_windows, tokenize_stream  # noqa: E402
from utils.eval.tasks import load_task  # noqa: E402
from utils.eval.zeroshot import doc_batches, encode_doc, score_doc, score_packed, score_pairs  # noqa: E402


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def scorers(model, docs_pairs, batch_tokens: int) -> dict:
    """name -> function returning every example's choice scores."""
    return {
        "naive": lambda: [[score_pairs(model, [p], batch_size=1)[0] for p in pairs] for pairs in docs_pairs],
        "per_example": lambda: [score_doc(model, pairs) for pairs in docs_pairs],
        "packed": lambda: packed_in_order(model, docs_pairs, batch_tokens),
    }


def packed_in_order(model, docs_pairs, batch_tokens: int) -> list:
    """`score_packed` over `doc_batches` (shortest first), returned in the examples' order."""
    found = {}
    for group in doc_batches(docs_pairs, batch_tokens):
        found.update(zip(group, score_packed(model, [docs_pairs[d] for d in group])))
    return [found[d] for d in range(len(docs_pairs))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="piqa,arc_easy,hellaswag")
    parser.add_argument("--n", type=int, default=40, help="first N examples per task")
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--ppl-windows", type=int, default=2, help="2048-token WikiText-2 windows for (2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    data_dir = str(resolve_data_dir(args.data_dir))

    fp, tok = load_model(args.model)
    fp.eval()
    report = {"model": args.model, "n_per_task": args.n, "batch_tokens": args.batch_tokens, "tasks": {}}
    all_pairs = []
    print(f"(1) zero-shot scorers, FP, first {args.n} examples per task, examples/s (ratio to naive; max |score diff|)")
    for task in args.tasks.split(","):
        docs_pairs = [encode_doc(tok, doc) for doc in load_task(task, data_dir, args.n)]
        all_pairs += docs_pairs
        row, ref = {}, None
        for name, fn in scorers(fp, docs_pairs, args.batch_tokens).items():
            seconds, scores = _best(fn, args.repeats)
            flat = [x for s in scores for x in s]
            ref = flat if ref is None else ref
            row[name] = {"examples_per_s": round(len(docs_pairs) / seconds, 2),
                         "max_abs_diff_vs_naive": max(abs(a - b) for a, b in zip(flat, ref))}
        for name in row:
            row[name]["ratio_vs_naive"] = round(row[name]["examples_per_s"] / row["naive"]["examples_per_s"], 2)
            print(f"  {task:10s} {name:12s} {row[name]['examples_per_s']:7.2f} ex/s  "
                  f"({row[name]['ratio_vs_naive']:.2f}x; {row[name]['max_abs_diff_vs_naive']:.1e})")
        report["tasks"][task] = row

    quant, _ = load_model(args.model, quant=QuantConfig(w_bits=4, a_bits=8, kv_bits=8))
    convert(quant, "folded")
    quant.eval()
    windows = make_windows(tokenize_stream(tok, wikitext2_text("test", data_dir)), 2048, args.ppl_windows)
    times = {}
    for name, model in (("fp", fp), ("w4a8kv8", quant)):
        zs = scorers(model, all_pairs, args.batch_tokens)["packed"]
        times[name] = {"zero_shot_s": _best(zs, args.repeats)[0],
                       "ppl_s": _best(lambda: perplexity_of_windows(model, windows), args.repeats)[0]}
    ratio = {k: round(times["w4a8kv8"][k] / times["fp"][k], 3) for k in ("zero_shot_s", "ppl_s")}
    n_tok = 2048 * args.ppl_windows
    print(f"(2) W4A8KV8 / FP time: zero-shot (packed, {len(all_pairs)} examples) {ratio['zero_shot_s']:.2f}x "
          f"({len(all_pairs) / times['fp']['zero_shot_s']:.2f} vs {len(all_pairs) / times['w4a8kv8']['zero_shot_s']:.2f}"
          f" ex/s); perplexity {ratio['ppl_s']:.2f}x ({n_tok / times['fp']['ppl_s']:.0f} vs "
          f"{n_tok / times['w4a8kv8']['ppl_s']:.0f} tokens/s)")
    report.update(times=times, quant_over_fp=ratio)
    packed = [report["tasks"][t]["packed"]["ratio_vs_naive"] for t in report["tasks"]]
    print(f"packed vs naive: {min(packed):.2f}-{max(packed):.2f}x (target >= 3x); "
          f"quantized / FP: {max(ratio.values()):.2f}x at most (target <= 1.3x)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
