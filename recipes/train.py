"""Distillation-based QAT: the `train.py` schema (`TrainConfig`) and its one `run(cfg)`.

    sh run_train.sh 4 8 8 data.train=gen_data/all_gen.jsonl max_steps=100   # see run_train.sh

Steps of `run`: check inputs before any model loads (value ranges, data file and its tokenizer,
model path and context, world size, device, a resumed checkpoint's config: `RESUME_MAY_CHANGE` lists
what may differ) -> start processes -> teacher (full precision, frozen, eval, no grad, *not* inside
the student) and student (`quantize_model` at `quant`) from the same weights -> token blocks (cached)
with a held-out slice -> wrap for the backend (none / ddp / fsdp / deepspeed) -> AdamW and cosine
schedule with warmup -> optional resume -> train (accumulation, clipping, atomic checkpoints, always
one of the last step) -> save `student/` (provenance in its `llmqat_meta.json`), and only then
`train_config.yaml` and `train_metrics.json`: a failed run never rewrites them next to an older student.

`teacher=cached` never loads the teacher: the loss is the sparse KD of utils/train/distill.py against
the top-K targets that `generate_data.py teacher_topk=K` stored, on one document per block
(utils/data/targets.py: no packing, positions from 0, long documents truncated; data.pack=false).
Long file: the schema, its checks and the run's named steps stay together.

Precision (`precision`): `auto` = bf16 autocast over fp32 weights on GPU, plain fp32 on CPU (CPU
bf16 autocast is slower than fp32 on most CPUs and the fake quantizers compute in fp32/fp64 anyway);
`bf16_autocast`, `fp32`, or `bf16` (bf16 weights, as the original code). Under DeepSpeed, bf16 means
DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the optimizer). FSDP2 reduces gradients in
fp32 and gathers bf16 only for bf16 weights (utils/distributed.py `fsdp_mp_policy`).

`compile=true` torch.compiles the student's decoder layers (fake quantizers included), checked with
one forward and backward at the training shape; where torch.compile fails it warns and runs eager
(also under DeepSpeed, whose engine hooks the layers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig

from models import dequantize_model, load_model, resolve_model
from models.loading import attn_implementations, convert_gguf, load_tokenizer, model_fingerprint
from quant.config import QuantConfig
from quant.errors import InputFileError, UserError
from utils.config import to_dict, to_yaml
from utils.data.blocks import DataConfig, check_data_file, check_data_tokenizer, load_blocks, split_blocks
from utils.data.targets import check_cached_settings, check_targets, load_target_blocks
from utils.distributed import (
    BACKENDS,
    DEVICES,
    Runtime,
    barrier,
    check_device,
    check_world_size,
    env_world_size,
    process_ranks,
    setup_runtime,
    shutdown_runtime,
)
from utils.io import atomic_write_text, write_json
from utils.provenance import config_hash, data_fingerprint, provenance
from utils.train.checkpoint import check_resume, find_checkpoint, load_checkpoint, save_student
from utils.train.distill import DistillStudent, KDLoss
from utils.train.loop import compile_student, resolve_precision, setup_training, train_loop
from utils.train.metrics import REPORT_TO, NullLogger, make_metrics_logger

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16_autocast", "bf16")
TEACHER_DTYPES = ("auto", "float32", "bfloat16")
TEACHERS = ("online", "cached")
# keys a resumed run may change: they do not change what is computed (max_steps extends the run)
RESUME_MAY_CHANGE = ("max_steps", "save_steps", "save_total_limit", "logging_steps", "eval_steps", "report_to",
                     "resume", "output_dir", "data.cache_dir", "gradient_checkpointing", "loss_chunk_size", "compile")


def _at_least(low, strict: bool = False, none_ok: bool = False):
    """A check: a finite number >= low (> low if strict); None passes when none_ok."""
    return lambda v: none_ok if v is None else math.isfinite(v) and (v > low if strict else v >= low)


# (field, check, what a valid value is): the schema's ranges, checked when a config is built
RANGES = (
    *((name, _at_least(1), ">= 1") for name in ("model_max_length", "per_device_batch_size",
                                                 "gradient_accumulation_steps", "max_steps", "nproc",
                                                 "logging_steps")),
    ("learning_rate", _at_least(0, strict=True), "> 0"),
    ("min_lr_ratio", lambda v: math.isfinite(v) and 0 <= v <= 1, "in [0, 1]"),
    ("warmup_steps", _at_least(0), ">= 0"),
    ("weight_decay", _at_least(0), ">= 0"),
    ("scale_lr", _at_least(0, strict=True, none_ok=True), "> 0 (null: learning_rate)"),
    ("max_grad_norm", _at_least(0, none_ok=True), ">= 0 (0 or null: no clipping)"),
    ("save_steps", _at_least(0), ">= 0 (0: only the last step's checkpoint)"),
    ("save_total_limit", _at_least(0, none_ok=True), ">= 1 (0 or null: keep every checkpoint)"),
    ("eval_steps", _at_least(0), ">= 0 (0: at the start and end only)"),
    ("seed", _at_least(0), ">= 0"),
    ("precision", lambda v: v in PRECISIONS, f"one of {PRECISIONS}"),
    ("backend", lambda v: v in BACKENDS, f"one of {BACKENDS}"),
    ("teacher_dtype", lambda v: v in TEACHER_DTYPES, f"one of {TEACHER_DTYPES}"),
    ("teacher", lambda v: v in TEACHERS, f"one of {TEACHERS}"),
    ("report_to", lambda v: v in REPORT_TO, f"one of {REPORT_TO}"),
    ("device", lambda v: v in DEVICES, f"one of {DEVICES}"),
    ("attn_implementation", lambda v: v is None or v in attn_implementations(),
     "null (transformers' default) or one of transformers' attention implementations"),
)


@dataclass
class TrainConfig:
    """Schema of train.py / run_train.sh (every field is a `key=value` on the command line).

    Args (besides the sections `quant` and `data`):
        model: HF folder, .gguf file, alias (smollm2-135m) or hub id; teacher and student start from it.
        per_device_batch_size, gradient_accumulation_steps: blocks per process per micro step, and
            micro steps per optimizer step.
        max_steps: optimizer steps; warmup_steps linear warmup, then cosine decay to
            learning_rate * min_lr_ratio.
        loss_chunk_size: tokens per chunk of the KD loss (0 = whole batch at once).
        backend / nproc: none | ddp | fsdp | deepspeed, with nproc processes (run_train.sh launches them).
        max_grad_norm: clip the gradient norm to it; 0 or null: no clipping (HF's meaning).
        save_steps: checkpoint every N steps (0 = only the last step's, which is always written);
            save_total_limit: keep the newest N (0 or null: all); resume: none | auto | a checkpoint folder.
        logging_steps / eval_steps: metrics line / held-out KD loss every N steps (eval 0: start and end only).
        attn_implementation: eager | sdpa | ... for student and teacher (null: transformers' default).
        compile: torch.compile the student's decoder layers (module docstring; eager where it fails).
        teacher: online (the frozen full-precision model, run every step) or cached (the data's top-K
            targets from generate_data.py teacher_topk=K; the teacher is never loaded; module docstring).
        scale_lr: peak learning rate of learned weight scales (quant.w_quantizer=lsq / ternary; same
            schedule, never weight decay); null: learning_rate.
    Valid ranges: `RANGES`, checked here, before anything is loaded.
    """

    model: str = "smollm2-135m"
    output_dir: str = "runs/train"
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(w_bits=4, a_bits=8, kv_bits=8))
    data: DataConfig = field(default_factory=DataConfig)
    model_max_length: int = 1024
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    learning_rate: float = 2e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    scale_lr: Optional[float] = None
    max_grad_norm: Optional[float] = 1.0
    kd_temperature: float = 1.0
    kd_loss_scale: float = 1.0
    ce_loss_scale: float = 0.0
    kd_reduction: str = "mean"
    loss_chunk_size: int = 1024
    precision: str = "auto"
    teacher_dtype: str = "auto"
    gradient_checkpointing: bool = False
    backend: str = "none"
    nproc: int = 1
    deepspeed_config: str = "configs/deepspeed/zero3.json"
    device: str = "auto"
    seed: int = 42
    save_steps: int = 0
    save_total_limit: Optional[int] = 2
    resume: str = "none"
    logging_steps: int = 10
    eval_steps: int = 0
    report_to: str = "none"
    attn_implementation: Optional[str] = None
    compile: bool = False
    teacher: str = "online"

    def __post_init__(self):
        for name, check, valid in RANGES:
            if not check(getattr(self, name)):
                raise UserError(f"{name}={getattr(self, name)!r}: must be {valid}")
        if self.backend == "none" and self.nproc > 1:
            raise UserError(f"nproc={self.nproc} needs backend=ddp, fsdp or deepspeed (backend=none is one process)")
        if self.teacher == "cached":
            check_cached_settings(self.kd_temperature, self.data.pack, self.data.text_bos)
        KDLoss(self.kd_temperature, self.kd_loss_scale, self.ce_loss_scale, self.kd_reduction, self.loss_chunk_size)


def check_inputs(cfg: TrainConfig) -> dict:
    """Fail fast, before any model is loaded: data file, model path and context length, world size,
    device, DeepSpeed config, the data's tokenizer, a resumed checkpoint. Returns the run's provenance.

    Raises:
        FileNotFoundError, ValueError: with a message naming the bad input.
    """
    check_data_file(cfg.data.train)
    resolve_model(cfg.model)
    world = env_world_size()
    check_world_size(cfg.backend, world)
    if world != cfg.nproc:
        source = "SLURM_NTASKS" if process_ranks().source == "slurm" else "WORLD_SIZE"
        raise UserError(f"nproc={cfg.nproc} but this run has {source}={world}: launch with run_train.sh "
                         f"(or torchrun --nproc_per_node {cfg.nproc})")
    check_device(cfg.device)
    if cfg.backend == "deepspeed" and not Path(cfg.deepspeed_config).is_file():
        raise InputFileError(f"deepspeed_config not found: {cfg.deepspeed_config}")
    tokenizer = load_tokenizer(_checked_model_folder(cfg))
    if cfg.teacher == "cached":
        check_targets(cfg.data.train, model_fingerprint(cfg.model))
    if not cfg.data.text_bos:  # text_bos re-encodes the text with this tokenizer: any data fits
        check_data_tokenizer(cfg.data.train, tokenizer)
    prov = provenance(cfg, inputs={"model": model_fingerprint(cfg.model), "data": data_fingerprint(cfg.data.train)},
                      tokenizer=tokenizer, device=cfg.device)
    ckpt = find_checkpoint(cfg.output_dir, cfg.resume)
    if ckpt:
        check_resume(ckpt, prov, cfg.max_steps, RESUME_MAY_CHANGE)
    return prov


def _checked_model_folder(cfg: TrainConfig) -> str:
    """The model's HF folder (a GGUF file converted once, cached), once model_max_length is known to
    fit its context (max_position_embeddings)."""
    folder, gguf = resolve_model(cfg.model)
    folder = convert_gguf(Path(folder) / gguf) if gguf else folder
    try:
        limit = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    except OSError as err:
        raise InputFileError(f"model not found: {cfg.model!r} ({err})") from err
    if limit is not None and cfg.model_max_length > limit:
        raise UserError(f"model_max_length={cfg.model_max_length} exceeds the model's context "
                        f"(max_position_embeddings={limit})")
    return folder


def _dtypes(cfg: TrainConfig, rt: Runtime) -> tuple[torch.dtype, torch.dtype, bool]:
    """(student weight dtype, teacher dtype, use bf16 autocast)."""
    gpu = rt.device.type == "cuda"
    precision = resolve_precision(cfg.precision, rt.device.type)
    teacher = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else ("bfloat16" if gpu else "float32")
    student = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = precision == "bf16_autocast" and cfg.backend != "deepspeed"
    return student, getattr(torch, teacher), autocast


def build_models(cfg: TrainConfig, rt: Runtime, student_dtype, teacher_dtype):
    """(student, teacher, tokenizer); the teacher is frozen full precision, never a student submodule
    (None with teacher=cached)."""
    attn = cfg.attn_implementation
    student, tokenizer = load_model(cfg.model, dtype=student_dtype, quant=cfg.quant, attn_implementation=attn)
    teacher = None  # teacher=cached: never loaded
    if cfg.teacher == "online":
        teacher, _ = load_model(cfg.model, dtype=teacher_dtype, attn_implementation=attn)
        dequantize_model(teacher)  # a saved student as `model` still gives a full-precision teacher
        teacher.eval().requires_grad_(False).to(rt.device)
    if cfg.backend != "deepspeed":
        student.to(rt.device)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    return student.train(), teacher, tokenizer


def build_data(cfg: TrainConfig, tokenizer, rt: Runtime) -> tuple[dict, dict]:
    """Train / held-out blocks; rank 0 tokenizes and fills the cache first."""
    if not rt.is_main:
        barrier(rt)
    if cfg.teacher == "cached":
        blocks = load_target_blocks(cfg.data.train, tokenizer, cfg.model_max_length)
    else:
        blocks = load_blocks(cfg.data, tokenizer, cfg.model_max_length)
    if rt.is_main:
        barrier(rt)
    train, val = split_blocks(blocks, cfg.data.val_fraction, cfg.data.val_max_blocks, cfg.seed)
    need = rt.world_size * cfg.per_device_batch_size
    if len(train["input_ids"]) < need:
        raise UserError(f"{len(train['input_ids'])} training blocks cannot fill one step of {rt.world_size} "
                         f"processes x per_device_batch_size={cfg.per_device_batch_size}")
    return train, val


def is_trained(cfg: TrainConfig) -> bool:
    """`output_dir` holds a finished student whose provenance records exactly this config and the
    present content of its model and data (fingerprints, not names or file ages)."""
    out, student = Path(cfg.output_dir), Path(cfg.output_dir) / "student"
    meta = student / "llmqat_meta.json"
    needed = (student / "config.json", student / "quant_config.json", meta, out / "train_metrics.json")
    if not all(f.is_file() for f in needed) or not Path(cfg.data.train).is_file():
        return False
    prov = json.loads(meta.read_text()).get("provenance") or {}
    inputs = {"model": model_fingerprint(cfg.model), "data": data_fingerprint(cfg.data.train)}
    return prov.get("config_hash") == config_hash(cfg) and prov.get("inputs") == inputs


def run(cfg: TrainConfig) -> dict:
    """Train a W/A/KV fake-quantized student by distillation from its full-precision self."""
    prov = check_inputs(cfg)
    rt = setup_runtime(cfg.backend, cfg.seed, cfg.device)
    out = Path(cfg.output_dir)
    if rt.is_main:
        logger.info("resolved config:\n%s", to_yaml(cfg))
    student_dtype, teacher_dtype, autocast = _dtypes(cfg, rt)
    student, teacher, tokenizer = build_models(cfg, rt, student_dtype, teacher_dtype)
    compiled = compile_student(cfg, student, rt, autocast)
    train, val = build_data(cfg, tokenizer, rt)
    loss = KDLoss(cfg.kd_temperature, cfg.kd_loss_scale, cfg.ce_loss_scale, cfg.kd_reduction, cfg.loss_chunk_size)
    model, optimizer, scheduler = setup_training(cfg, DistillStudent(student, loss), rt)
    ckpt = find_checkpoint(out, cfg.resume)
    start, last = load_checkpoint(ckpt, model, optimizer, scheduler, rt) if ckpt else (0, None)
    sink = make_metrics_logger(cfg.report_to, out, to_dict(cfg)) if rt.is_main else NullLogger()
    files = {"train_config.yaml": to_yaml(cfg), "provenance.json": json.dumps(prov, indent=2, default=str)}
    with contextlib.closing(sink):  # each checkpoint carries the config and provenance a resume is checked against
        metrics = train_loop(cfg, model, teacher, optimizer, scheduler, train, val, rt, autocast, start, sink,
                             files, last)
    save_student(cfg, model, tokenizer, rt, prov)  # after the last step's checkpoint: a failed save loses nothing
    metrics.update(quant=cfg.quant.tag(), backend=cfg.backend, world_size=rt.world_size,
                   train_blocks=len(train["input_ids"]), val_blocks=len(val["input_ids"]), resumed_from=str(ckpt),
                   compiled=compiled, teacher=cfg.teacher, provenance=prov)
    if rt.is_main:  # only now: a failed run leaves the previous student's config and metrics as they were
        atomic_write_text(out / "train_config.yaml", to_yaml(cfg))
        write_json(out / "train_metrics.json", metrics)
        logger.info("done: %s", {k: v for k, v in metrics.items() if k not in ("resumed_from", "provenance")})
    shutdown_runtime(rt)
    return metrics

