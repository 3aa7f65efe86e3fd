"""Export benchmark: sizes, load time / memory, and fidelity of each artifact vs the fake-quant student.

    flock /tmp/llmqat_heavy.lock env PYTHONPATH=. LLMQAT_DATA_DIR=/work/shared/data \
        .venv/bin/python benchmarks/bench_export.py [student=runs/q4_0/student] [windows=8] [seqlen=512]

Students: two round-to-nearest W4 (A16 KV16) students of `model` built here (MinMax per-channel, the
paper's grid, and GGUF-faithful gguf_q4_0), plus `student=DIR` (e.g. a QAT student) and
`students=[DIR,...]` if given (each named by its folder's parent when the folder is called `student`).
Each is exported with `recipes.export.run` (what export.py calls) to packed (dense tensors float32 and
bf16), gguf_q4_0 and gguf_q8_0 (a ternary student: gguf_tq2_0 and gguf_tq1_0, zero-padded to whole
256-blocks where its widths are not, quant/gguf_pad.py). On WikiText-2 test windows it reports perplexity and next-token
(argmax) agreement with the fake-quant student: packed is reloaded with `models.convert.load_packed`,
GGUF runs in llama.cpp (llama-cpp-python, if installed; it quantizes activations to 8 bits inside
its matmuls). The llama.cpp baseline is the full-precision model written as an F32 GGUF and
quantized to Q4_0 by llama.cpp's own `llama_model_quantize` (embeddings forced to Q8_0, as ours), and
the decoder tensors of that file are compared byte for byte with our gguf_q4_0 export. Every GGUF's
decoder linears are also read back (gguf.GGUFReader), dequantized and compared with the student's
fake-quant weights ("k/N" exact: N/N for a student trained on that grid, ternary ones padded included).
load_mem_mb: packed = bytes of the rebuilt (dense) model's tensors; llama.cpp = process RSS added by
loading (the file is mmap'ed). Results: printed as a Markdown table and written to `out_dir/results.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import gguf
import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import load_model, quantize_model, read_quant_config, save_model  # noqa: E402
from models.convert import load_packed  # noqa: E402
from quant.config import QuantConfig  # noqa: E402
from quant.export_gguf import gguf_layout, padding_for, write_gguf  # noqa: E402
from recipes.export import ExportConfig, artifact_bytes, tokenizer_source  # noqa: E402
from recipes.export import run as export  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.eval.datasets import wikitext2_text  # noqa: E402
from utils.eval.perplexity import make_windows, tokenize_stream  # noqa: E402
from utils.logging import setup_logging  # noqa: E402

logger = logging.getLogger("bench_export")
RTN_STUDENTS = {"rtn_w4_minmax": dict(w_bits=4), "rtn_w4_gguf_q4_0": dict(w_bits=4, weight_format="gguf_q4_0")}


@dataclass
class BenchExportConfig:
    model: str = "smollm2-135m"
    student: str = ""
    students: List[str] = field(default_factory=list)
    out_dir: str = "runs/bench_export"
    seqlen: int = 512
    windows: int = 8
    threads: int = 2
    data_dir: str = ""


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_mb(model) -> float:
    """Memory of a model's parameters and buffers (tied ones once): the loaded packed model is dense."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6


def score(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(sum of next-token NLL, argmax predictions [T-1]) of logits [T, V] for ids [T]."""
    logits = logits[:-1].double()
    return F.cross_entropy(logits, ids[1:], reduction="sum").item(), logits.argmax(-1)


@torch.no_grad()
def hf_scores(model, windows: torch.Tensor) -> list[tuple[float, torch.Tensor]]:
    return [score(model(w[None], use_cache=False).logits[0], w) for w in windows]


def llama_cpp_scores(path: Path, windows: torch.Tensor, threads: int) -> tuple[list, float, float]:
    """(scores, load seconds, RSS MB added) of a GGUF run in llama.cpp."""
    from llama_cpp import Llama

    rss, start = rss_mb(), time.perf_counter()
    llm = Llama(str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], logits_all=True, n_threads=threads,
                verbose=False)
    load_s, load_mb = time.perf_counter() - start, rss_mb() - rss
    out = []
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        out.append(score(torch.from_numpy(np.array(llm.scores[: len(w)], dtype=np.float32)), w))
    llm.close()
    return out, load_s, load_mb


def summarize(scores, reference, tokens: int) -> dict:
    nll = sum(s for s, _ in scores) / tokens
    agree = sum((a == b).sum().item() for (_, a), (_, b) in zip(scores, reference)) / tokens
    return {"ppl": round(math.exp(nll), 3), "agreement": round(agree, 4)}


def build_students(cfg: BenchExportConfig, out: Path) -> dict[str, str]:
    students = {}
    for name, quant in RTN_STUDENTS.items():
        folder = out / "students" / name
        if not (folder / "quant_config.json").is_file():
            model, tok = load_model(cfg.model)
            save_model(quantize_model(model, QuantConfig(**quant)), tok, folder)
        students[name] = str(folder)
    for folder in ([cfg.student] if cfg.student else []) + list(cfg.students):
        path = Path(folder)
        name = path.parent.name if path.name == "student" else path.name
        if name in students:
            raise ValueError(f"two students are named {name!r}: {students[name]} and {folder}")
        students[name] = folder
    return students


def llama_cpp_own_q4_0(cfg: BenchExportConfig, out: Path, tokenizer_from: str) -> tuple[Path, Path]:
    """(F32 GGUF of the full-precision model, llama.cpp's own Q4_0 of it)."""
    import llama_cpp


    f32, q4 = out / "teacher.F32.gguf", out / "teacher.llamacpp-Q4_0.gguf"
    model, tok = load_model(cfg.model)
    source = tokenizer_source(tokenizer_from) if tokenizer_from else None
    write_gguf(model, tok, f32, "f32", "f32", tokenizer_from=source, name="teacher")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, cfg.threads
    params.token_embedding_type = params.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), params) != 0:
        raise RuntimeError("llama_model_quantize failed")
    return f32, q4


def same_decoder_tensors(ours: Path, theirs: Path) -> str:

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same = sum(np.array_equal(t.data, b[n].data) and t.tensor_type == b[n].tensor_type for n, t in a.items())
    return f"{same}/{len(a)}"


def dequantizes_to_student(path: Path, student, weight_type: str) -> str:
    """"k/N": how many of the student's quantized decoder linears, read back from the GGUF at `path` and
    dequantized by the gguf package, equal its fake-quant weights exactly (in GGUF's row order, padded
    to whole blocks as the export pads them)."""
    padding = padding_for(student.config, weight_type)
    config = padding.config(student.config) if padding else student.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    same = total = 0
    with torch.no_grad():
        for key, module in student.named_modules():
            quantizer = getattr(module, "weight_quantizer", None)
            if quantizer is None or not quantizer.spec.enabled or not key.startswith("model.layers."):
                continue
            expected = gguf_layout(key + ".weight", quantizer(module.weight).float(), config, padding)
            t = tensors[names.get_name(key + ".weight", try_suffixes=(".weight",))]
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected.shape)
            same += int(np.array_equal(got, expected.numpy()))
            total += 1
    return f"{same}/{total}"


def mb(path: Path) -> float:
    return round(artifact_bytes(path) / 1e6, 1)


def teacher_rows(cfg, out: Path, teacher, tok, windows, tokenizer_from: str, llama: bool):
    """Rows of the full-precision model (HF; F32 GGUF and llama.cpp's own Q4_0 in llama.cpp)."""
    tokens = windows[:, 1:].numel()
    scores = hf_scores(teacher, windows)
    save_model(teacher.to(torch.bfloat16), tok, out / "teacher-bf16")
    rows = [{"artifact": f"{cfg.model} full precision (HF)", "MB": mb(out / "teacher-bf16" / "model.safetensors"),
             "note": "size as bf16 safetensors", **summarize(scores, scores, tokens)}]
    q4 = None
    if llama:
        f32, q4 = llama_cpp_own_q4_0(cfg, out, tokenizer_from)
        for label, path in (("F32 GGUF, llama.cpp", f32), ("llama.cpp's own Q4_0 (RTN), llama.cpp", q4)):
            run_scores, load_s, load_mb = llama_cpp_scores(path, windows, cfg.threads)
            rows.append({"artifact": f"teacher {label}", "MB": mb(path), "load_s": round(load_s, 2),
                         "load_mem_mb": round(load_mb), **summarize(run_scores, scores, tokens)})
    return rows, q4


def artifact_row(cfg, fmt: str, path: Path, student, ref, windows, llama_q4) -> dict:
    """Size, load and fidelity of one exported artifact against the fake-quant student's `ref`."""
    tokens = windows[:, 1:].numel()
    row = {"MB": mb(path)}
    if fmt == "packed":
        start = time.perf_counter()
        model, _ = load_packed(path)
        row.update(load_s=round(time.perf_counter() - start, 2), load_mem_mb=round(tensor_mb(model)))
        with torch.no_grad():
            diff = max((model(w[None]).logits - student(w[None]).logits).abs().max().item() for w in windows[:2])
        row.update(summarize(hf_scores(model, windows), ref, tokens), max_abs_logit_diff=diff)
    else:
        notes = [f"decoder linears dequantize to the fake-quant weights: "
                 f"{dequantizes_to_student(path, student, fmt.removeprefix('gguf_'))}"]
        if llama_q4 is not None:
            scores, load_s, load_mb = llama_cpp_scores(path, windows, cfg.threads)
            row.update(load_s=round(load_s, 2), load_mem_mb=round(load_mb), **summarize(scores, ref, tokens))
            if fmt == "gguf_q4_0":
                notes.append(f"decoder tensors byte-identical to llama.cpp's Q4_0 of the teacher: "
                             f"{same_decoder_tensors(path, llama_q4)}")
        row["note"] = "; ".join(notes)
    return row


def student_rows(cfg, out: Path, name: str, folder: str, windows, tokenizer_from: str, llama_q4) -> list[dict]:
    """The fake-quant student, then each of its exports (via recipes.export.run, as export.py)."""
    start = time.perf_counter()
    student, _ = load_model(folder)
    load_s = time.perf_counter() - start
    ref = hf_scores(student, windows)
    rows = [{"artifact": f"{name} fake-quant (HF folder)", "MB": mb(Path(folder) / "model.safetensors"),
             "load_s": round(load_s, 2), **summarize(ref, ref, windows[:, 1:].numel())}]
    qcfg = read_quant_config(folder)
    ternary = qcfg is not None and qcfg.w_quantizer == "ternary"
    ggufs = ("gguf_tq2_0", "gguf_tq1_0") if ternary else ("gguf_q4_0", "gguf_q8_0")
    for fmt, extra in (("packed", {}), ("packed", {"dense_dtype": "bfloat16"}), *((f, {}) for f in ggufs)):
        label = f"{fmt}-bf16" if extra else fmt
        path = out / name / (label if fmt == "packed" else f"{name}.{fmt[5:].upper()}.gguf")
        try:
            export(ExportConfig(student=folder, format=fmt, output=str(path), tokenizer_from=tokenizer_from, **extra))
        except ValueError as err:
            rows.append({"artifact": f"{name} {label}", "note": f"not exportable: {err}"})
            continue
        rows.append({"artifact": f"{name} {label}", **artifact_row(cfg, fmt, path, student, ref, windows, llama_q4)})
    return rows


def print_table(header: str, rows: list[dict]) -> None:
    keys = ["artifact", "MB", "load_s", "load_mem_mb", "ppl", "agreement", "max_abs_logit_diff", "note"]
    print(header)
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


def has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        logger.warning("llama-cpp-python not installed: GGUF files are written and sized, not run")
        return False
    return True


def main(argv) -> int:
    setup_logging()
    cfg = load_config(BenchExportConfig, argv)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    teacher, tok = load_model(cfg.model)
    windows = make_windows(tokenize_stream(tok, wikitext2_text("test", cfg.data_dir or None)), cfg.seqlen, cfg.windows)
    tokenizer_from = cfg.model if cfg.model.lower().startswith("smollm2") else ""
    rows, llama_q4 = teacher_rows(cfg, out, teacher, tok, windows, tokenizer_from, has_llama_cpp())
    del teacher
    for name, folder in build_students(cfg, out).items():
        rows += student_rows(cfg, out, name, folder, windows, tokenizer_from, llama_q4)
    header = (f"WikiText-2 test, {cfg.windows} windows x {cfg.seqlen} tokens ({windows[:, 1:].numel()} predictions); "
              f"agreement = argmax equal to the fake-quant student's (teacher rows: to the teacher's)")
    print_table(header, rows)
    results = {"config": vars(cfg), "header": header, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LLMQAT_NO_PROGRESS", "1")
    sys.exit(main(sys.argv[1:]))
