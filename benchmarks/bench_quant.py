"""Cost of fake quantization next to the matmuls: SmolLM2-135M forward(+backward) at W4A8KV8 vs FP.

    python benchmarks/bench_quant.py [model=smollm2-135m batch=4 seqlen=256 repeats=3]

Prints the time of a stock forward, a W4A8KV8 fake-quant forward, the same with backward, and
their ratios (quantized / stock), measured in this one process; then the same W4A8KV8 model with
`fast_math=true` (float32 fake-quant arithmetic instead of float64) against the default, and how
many weight elements the two arithmetics put on different grid points.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import models  # noqa: E402
from quant import QuantConfig  # noqa: E402
from quant.fake_quant import quantize_dequantize  # noqa: E402
from quant.linear import QuantLinear  # noqa: E402


def _args(argv):
    opts = {"model": "smollm2-135m", "batch": "4", "seqlen": "256", "repeats": "3"}
    opts.update(a.split("=", 1) for a in argv)
    return opts["model"], int(opts["batch"]), int(opts["seqlen"]), int(opts["repeats"])


def best_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    name, batch, seqlen, repeats = _args(sys.argv[1:])
    model, _ = models.load_model(name)
    ids = torch.randint(100, 40000, (batch, seqlen), generator=torch.Generator().manual_seed(0))

    def fwd():
        with torch.no_grad():
            model(ids, use_cache=False)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(ids, use_cache=False).logits.float().mean().backward()

    results = {}
    for label, qcfg in [("stock", None), ("W4A8KV8", QuantConfig(w_bits=4, a_bits=8, kv_bits=8)),
                        ("W4A8KV8 fast_math", QuantConfig(w_bits=4, a_bits=8, kv_bits=8, fast_math=True))]:
        if qcfg is not None:
            models.dequantize_model(model)
            models.quantize_model(model, qcfg)
        results[label] = (best_time(fwd, repeats), best_time(fwd_bwd, repeats))
    (f0, b0), (f1, b1), (f2, b2) = results["stock"], results["W4A8KV8"], results["W4A8KV8 fast_math"]
    print(f"model {name}, batch {batch} x seqlen {seqlen}, {torch.get_num_threads()} threads, best of {repeats}")
    print(f"forward:            stock {f0:.3f} s   W4A8KV8 {f1:.3f} s   ratio {f1 / f0:.2f}x")
    print(f"forward + backward: stock {b0:.3f} s   W4A8KV8 {b1:.3f} s   ratio {b1 / b0:.2f}x")
    print(f"fast_math (float32 arithmetic) / default (float64): forward {f2 / f1:.2f}x, "
          f"forward + backward {b2 / b1:.2f}x")
    ulp = moved = total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            w = module.weight.detach()
            exact = quantize_dequantize(w, QuantConfig(w_bits=4).weight_spec())
            fast = quantize_dequantize(w, QuantConfig(w_bits=4, fast_math=True).weight_spec())
            step = w.abs().amax(-1, keepdim=True) / 7
            diff = (exact - fast).abs()
            moved, ulp = moved + int((diff > step / 2).sum()), ulp + int(((diff > 0) & (diff <= step / 2)).sum())
            total += w.numel()
    print(f"W4 weights, fast_math vs default: {ulp} of {total} ({100 * ulp / total:.3f} %) differ by float32 "
          f"rounding (<= 1 ulp), {moved} ({100 * moved / total:.5f} %) by a whole grid step (.5 ties)")


if __name__ == "__main__":
    main()
