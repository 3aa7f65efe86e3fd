"""Export a fake-quant student folder to a deployable artifact: packed safetensors, GGUF or compressed-tensors.

    python export.py student=runs/w4a8kv8/student format=packed output=exports/w4-packed
    python export.py student=runs/q4_0/student format=gguf_q4_0 output=exports/student.Q4_0.gguf
    python export.py student=runs/w4/student format=compressed_tensors output=exports/w4-ct   # vLLM

All settings: `ExportConfig` below, `key=value`. The conversion itself is models/convert.py.
The student folder must hold a `quant_config.json` (written by models.save_model / train.py): it
says which grid the weights were trained on. Everything is checked before the model is loaded, and
the artifact is written under a temporary name and renamed, so a failure leaves no partial output.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from models.convert import check_replaceable, convert, read_packed_config
from models.loading import DTYPES, QUANT_CONFIG_FILE, load_model, read_quant_config, resolve_model, to_dtype
from quant import compressed_tensors as ct
from quant.config import GGUF_FORMATS, QuantConfig, is_off
from quant.errors import InputFileError, UserError
from quant.export_gguf import EMBED_TYPES, check_gguf_replaceable

logger = logging.getLogger(__name__)

GGUF_TERNARY = ("gguf_tq1_0", "gguf_tq2_0")  # llama.cpp's ternary types, for w_quantizer=ternary students
GGUF_EXPORTS = (*GGUF_FORMATS, *GGUF_TERNARY)
EXPORT_FORMATS = ("packed", *GGUF_EXPORTS, "compressed_tensors")


@dataclass
class ExportConfig:
    """Args:
        student: folder of a fake-quant student (HF folder + quant_config.json).
        format: packed (int4/int8 safetensors + scales, reloaded by models.convert.load_packed),
            gguf_q4_0 or gguf_q8_0 (llama.cpp), gguf_tq1_0 / gguf_tq2_0 (llama.cpp's ternary types, exact
            for a w_quantizer=ternary student with scale slices of whole 256-blocks), compressed_tensors (vLLM / transformers; W4A16, W8A16
            per channel or group, W8A8 per channel; quant/compressed_tensors.py).
        output: a folder for packed and compressed_tensors, a .gguf file for the GGUF formats.
        dtype: dtype the student is loaded in (its fake-quant arithmetic follows it).
        dense_dtype: packed, compressed_tensors: dtype of the unquantized tensors; "auto" keeps
            `dtype` (packed: bit-exact logits), bfloat16 halves them.
        embed_type: GGUF: type of token_embd / an untied output tensor: q8_0, f16 or f32.
        tokenizer_from: GGUF: a .gguf file or alias (smollm2-135m) whose tokenizer metadata to
            copy; empty builds it from the student's HF tokenizer (gpt2-style byte-level BPE).
    """

    student: str = ""
    format: str = "packed"
    output: str = ""
    dtype: str = "float32"
    dense_dtype: str = "auto"
    embed_type: str = "q8_0"
    tokenizer_from: str = ""

    def __post_init__(self):
        if self.format not in EXPORT_FORMATS:
            raise UserError(f"unknown format {self.format!r}; use one of {EXPORT_FORMATS}")
        if self.embed_type not in EMBED_TYPES:
            raise UserError(f"unknown embed_type {self.embed_type!r}; use one of {EMBED_TYPES}")
        for name in ("dtype", "dense_dtype"):
            value = getattr(self, name)
            if value not in DTYPES and not (name == "dense_dtype" and value == "auto"):
                raise UserError(f"unknown {name} {value!r}; use one of {sorted(DTYPES)}")


def check_student(student: str, fmt: str) -> QuantConfig:
    """The student's QuantConfig, after checking it can be exported to `fmt`.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: no quant_config.json, weights not quantized, or more bits than `fmt` holds.
    """
    folder = Path(student)
    if not student or not (folder / "config.json").is_file():
        raise InputFileError(f"student={student!r} is not a model folder (no config.json)")
    qcfg = read_quant_config(folder)
    if qcfg is None:
        raise UserError(f"{folder} has no {QUANT_CONFIG_FILE}: export needs a quantized student "
                         f"(models.save_model of a models.quantize_model'd model, or a train.py output)")
    if is_off(qcfg.w_bits):
        raise UserError(f"the student's weights are not quantized (w_bits={qcfg.w_bits}): nothing to export low-bit")
    if fmt in GGUF_FORMATS and qcfg.w_bits > GGUF_FORMATS[fmt]:
        raise UserError(f"format={fmt} holds {GGUF_FORMATS[fmt]}-bit weights; the student has w_bits={qcfg.w_bits} "
                         f"(unsupported bit width for this format)")
    if fmt in GGUF_TERNARY and qcfg.w_quantizer != "ternary":
        raise UserError(f"format={fmt} holds ternary weights: the student has w_quantizer={qcfg.w_quantizer} "
                        f"(train it with w_quantizer=ternary)")
    learned = [k for k in ("a_clip", "kv_clip") if getattr(qcfg, k) == "learned"]
    if learned:
        raise UserError(f"the student has {', '.join(f'{k}=learned' for k in learned)}: no export format stores "
                        f"learned activation / KV clip ratios yet (runtimes compute these scales per token), so the "
                        f"export would not compute what the student computes")
    if fmt == "compressed_tensors" and ct.unsupported_reason(qcfg):
        raise UserError(f"format=compressed_tensors cannot hold the student ({qcfg.tag()}): "
                         f"{ct.unsupported_reason(qcfg)}")
    return qcfg


def check_output(output: str, fmt: str) -> Path:
    """Path to write; an existing output is only replaced if it is an artifact of the same kind."""
    if not output:
        raise UserError("output= is required")
    path = Path(output)
    if fmt in GGUF_EXPORTS and path.suffix != ".gguf":
        raise UserError(f"output={output!r}: a GGUF export is a file ending in .gguf")
    if path.exists():
        if fmt == "packed" and path.is_dir() and any(path.iterdir()):
            read_packed_config(path)  # raises unless it is a previous packed export
        elif fmt in GGUF_EXPORTS:
            check_gguf_replaceable(path)  # raises unless it is a GGUF this project wrote
        elif fmt == "compressed_tensors":
            check_replaceable(path, ct.QUANT_METHOD)  # raises unless it is a previous compressed-tensors export
    return path


def tokenizer_source(name: str) -> str:
    """The .gguf file behind a path or alias (`smollm2-135m`), for its tokenizer metadata."""
    folder, gguf = resolve_model(name)
    if gguf is None:
        raise UserError(f"tokenizer_from={name!r} is not a .gguf file or a GGUF alias")
    return str(Path(folder) / gguf)


def _write_packed(model, tokenizer, path: Path, dense_dtype: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        convert(model, "packed", tokenizer, tmp, dense_dtype=None if dense_dtype == "auto" else to_dtype(dense_dtype))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def artifact_bytes(path: Path) -> int:
    """Size on disk of a file, or of all files in a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(cfg: ExportConfig) -> dict:
    """Check inputs, load the student, write the artifact; returns {'output', 'format', 'bytes'}."""
    qcfg = check_student(cfg.student, cfg.format)
    path = check_output(cfg.output, cfg.format)
    tokenizer_from = tokenizer_source(cfg.tokenizer_from) if cfg.tokenizer_from else None
    logger.info("exporting %s (%s, weight_format=%s) to %s as %s", cfg.student, qcfg.tag(), qcfg.weight_format,
                path, cfg.format)
    model, tokenizer = load_model(cfg.student, dtype=cfg.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.format == "packed":
        _write_packed(model, tokenizer, path, cfg.dense_dtype)
    elif cfg.format == "compressed_tensors":
        dense_dtype = None if cfg.dense_dtype == "auto" else to_dtype(cfg.dense_dtype)
        convert(model, cfg.format, tokenizer, path, dense_dtype=dense_dtype)
    else:
        convert(model, cfg.format, tokenizer, path, embed_type=cfg.embed_type, tokenizer_from=tokenizer_from,
                name=Path(cfg.student).name)
    size = artifact_bytes(path)
    logger.info("wrote %s: %.1f MB", path, size / 1e6)
    result = {"output": str(path), "format": cfg.format, "bytes": size}
    if cfg.format == "compressed_tensors":  # what the artifact leaves out (KV quantization), also logged
        result["warnings"] = [note for note in (ct.kv_cache_note(qcfg),) if note]
    return result
