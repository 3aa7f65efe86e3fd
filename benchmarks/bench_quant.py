"""Cost of fake quantization next to the matmuls: SmolLM2-135M forward(+backward) at W4A8KV8 vs FP.

    python benchmarks/bench_quant.py [model=smollm2-135m batch=4 seqlen=256 repeats=3]

Prints the time of a stock forward, a W4A8KV8 fake-quant forward, the same with backward, and
their ratios (quantized / stock), measured in this one process.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import models  # noqa: E402
from quant import QuantConfig  # noqa: E402


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
    for label, qcfg in [("stock", None), ("W4A8KV8", QuantConfig(w_bits=4, a_bits=8, kv_bits=8))]:
        if qcfg is not None:
            models.quantize_model(model, qcfg)
        results[label] = (best_time(fwd, repeats), best_time(fwd_bwd, repeats))
    (f0, b0), (f1, b1) = results["stock"], results["W4A8KV8"]
    print(f"model {name}, batch {batch} x seqlen {seqlen}, {torch.get_num_threads()} threads, best of {repeats}")
    print(f"forward:            stock {f0:.3f} s   W4A8KV8 {f1:.3f} s   ratio {f1 / f0:.2f}x")
    print(f"forward + backward: stock {b0:.3f} s   W4A8KV8 {b1:.3f} s   ratio {b1 / b0:.2f}x")


if __name__ == "__main__":
    main()
