"""Distillation-based QAT: the `train.py` schema (`TrainConfig`) and its one `run(cfg)`.

    sh run_train.sh 4 8 8 data.train=gen_data/all_gen.jsonl max_steps=100   # see run_train.sh

Steps of `run`: check inputs (data file, model path, world size) -> start processes -> teacher
(full precision, frozen, eval, no grad, *not* inside the student) and student (`quantize_model` at
`quant`) from the same weights -> token blocks (cached) with a held-out slice -> wrap for the backend
(none / ddp / fsdp / deepspeed) -> optimizer (AdamW, fp32 master weights) and cosine schedule with
warmup -> optional resume -> train (gradient accumulation, clipping, periodic atomic checkpoints) ->
save `student/`, `train_metrics.json` and the resolved `train_config.yaml`.

Precision (`precision`): `auto` = bf16 autocast over fp32 weights on GPU, plain fp32 on CPU (CPU
bf16 autocast is slower than fp32 on most CPUs and the fake quantizers compute in fp32/fp64 anyway);
`bf16_autocast`, `fp32`, or `bf16` (bf16 weights, as the original code). Under DeepSpeed, bf16 means
DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the optimizer).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import dequantize_model, load_model, resolve_model, save_model
from quant.config import QuantConfig
from quant.errors import InputFileError, UserError
from utils.config import to_dict, to_yaml
from utils.data.blocks import DataConfig, check_data_file, load_blocks, split_blocks
from utils.distributed import (
    BACKENDS,
    Runtime,
    barrier,
    check_world_size,
    env_world_size,
    full_state_dict,
    setup_runtime,
    unwrap,
)
from utils.io import atomic_write_text, newer, write_json
from utils.train.checkpoint import find_checkpoint, load_checkpoint
from utils.train.distill import DistillStudent, KDLoss
from utils.train.loop import setup_training, train_loop
from utils.train.metrics import REPORT_TO, NullLogger, make_metrics_logger

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16_autocast", "bf16")
TEACHER_DTYPES = ("auto", "float32", "bfloat16")


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
        save_steps: checkpoint every N steps (0 = none); resume: none | auto | a checkpoint folder.
        logging_steps / eval_steps: metrics line / held-out KD loss every N steps (0: start and end only).
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
    max_grad_norm: float = 1.0
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
    save_total_limit: int = 2
    resume: str = "none"
    logging_steps: int = 10
    eval_steps: int = 0
    report_to: str = "none"

    def __post_init__(self):
        positive = ("model_max_length", "per_device_batch_size", "gradient_accumulation_steps", "max_steps", "nproc")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, value, allowed in (("precision", self.precision, PRECISIONS), ("backend", self.backend, BACKENDS),
                                     ("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES),
                                     ("report_to", self.report_to, REPORT_TO)):
            if value not in allowed:
                raise UserError(f"unknown {name} {value!r}; use one of {allowed}")
        if self.backend == "none" and self.nproc > 1:
            raise UserError(f"nproc={self.nproc} needs backend=ddp, fsdp or deepspeed (backend=none is one process)")
        KDLoss(self.kd_temperature, self.kd_loss_scale, self.ce_loss_scale, self.kd_reduction, self.loss_chunk_size)


def check_inputs(cfg: TrainConfig) -> None:
    """Fail fast, before any model is loaded: data file, model path, world size, DeepSpeed config.

    Raises:
        FileNotFoundError, ValueError: with a message naming the bad input.
    """
    check_data_file(cfg.data.train)
    resolve_model(cfg.model)
    world = env_world_size()
    check_world_size(cfg.backend, world)
    if world != cfg.nproc:
        raise UserError(f"nproc={cfg.nproc} but this run has WORLD_SIZE={world}: launch with run_train.sh "
                         f"(or torchrun --nproc_per_node {cfg.nproc})")
    if cfg.backend == "deepspeed" and not Path(cfg.deepspeed_config).is_file():
        raise InputFileError(f"deepspeed_config not found: {cfg.deepspeed_config}")


def _dtypes(cfg: TrainConfig, rt: Runtime) -> tuple[torch.dtype, torch.dtype, bool]:
    """(student weight dtype, teacher dtype, use bf16 autocast)."""
    gpu = rt.device.type == "cuda"
    precision = ("bf16_autocast" if gpu else "fp32") if cfg.precision == "auto" else cfg.precision
    teacher = cfg.teacher_dtype if cfg.teacher_dtype != "auto" else ("bfloat16" if gpu else "float32")
    student = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = precision == "bf16_autocast" and cfg.backend != "deepspeed"
    return student, getattr(torch, teacher), autocast


def build_models(cfg: TrainConfig, rt: Runtime, student_dtype, teacher_dtype):
    """(student, teacher, tokenizer); the teacher is frozen full precision, never a student submodule."""
    student, tokenizer = load_model(cfg.model, dtype=student_dtype, quant=cfg.quant)
    teacher, _ = load_model(cfg.model, dtype=teacher_dtype)
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
    blocks = load_blocks(cfg.data, tokenizer, cfg.model_max_length)
    if rt.is_main:
        barrier(rt)
    train, val = split_blocks(blocks, cfg.data.val_fraction, cfg.data.val_max_blocks, cfg.seed)
    need = rt.world_size * cfg.per_device_batch_size
    if len(train["input_ids"]) < need:
        raise UserError(f"{len(train['input_ids'])} training blocks cannot fill one step of {rt.world_size} "
                         f"processes x per_device_batch_size={cfg.per_device_batch_size}")
    return train, val


def save_student(cfg: TrainConfig, model, tokenizer, rt: Runtime) -> Path:
    """Write the final student to {output_dir}/student (atomically) as a `models.load_model` folder."""
    out = Path(cfg.output_dir) / "student"
    state = None if cfg.backend in ("none", "ddp") else full_state_dict(model, rt)  # collective
    if rt.is_main:
        if state is None:
            lm = unwrap(model).lm
        else:
            lm, _ = load_model(cfg.model, quant=cfg.quant)
            missing, unexpected = lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()},
                                                     strict=False)
            tied = ["lm_head.weight"] if lm.config.tie_word_embeddings else []
            if unexpected or set(missing) - set(tied):
                raise RuntimeError(f"student state dict mismatch: missing {missing}, unexpected {unexpected}")
        tmp = out.with_name("student.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(lm, tokenizer, tmp, extra={"train_config": to_dict(cfg)})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    barrier(rt)
    return out


def is_trained(cfg: TrainConfig) -> bool:
    """`output_dir` holds a student trained with exactly this config, after its data was written."""
    out = Path(cfg.output_dir)
    saved, student = out / "train_config.yaml", out / "student"
    files = (student / "config.json", student / "quant_config.json", saved)
    return (all(f.is_file() for f in files) and saved.read_text() == to_yaml(cfg)
            and newer(out / "train_metrics.json", saved, Path(cfg.data.train)))


def run(cfg: TrainConfig) -> dict:
    """Train a W/A/KV fake-quantized student by distillation from its full-precision self."""
    check_inputs(cfg)
    rt = setup_runtime(cfg.backend, cfg.seed, cfg.device)
    out = Path(cfg.output_dir)
    if rt.is_main:
        logger.info("resolved config:\n%s", to_yaml(cfg))
        atomic_write_text(out / "train_config.yaml", to_yaml(cfg))
    student_dtype, teacher_dtype, autocast = _dtypes(cfg, rt)
    student, teacher, tokenizer = build_models(cfg, rt, student_dtype, teacher_dtype)
    train, val = build_data(cfg, tokenizer, rt)
    loss = KDLoss(cfg.kd_temperature, cfg.kd_loss_scale, cfg.ce_loss_scale, cfg.kd_reduction, cfg.loss_chunk_size)
    model, optimizer, scheduler = setup_training(cfg, DistillStudent(student, loss), rt)
    ckpt = find_checkpoint(out, cfg.resume)
    start = load_checkpoint(ckpt, model, optimizer, scheduler, rt) if ckpt else 0
    sink = make_metrics_logger(cfg.report_to, out, to_dict(cfg)) if rt.is_main else NullLogger()
    with contextlib.closing(sink):
        metrics = train_loop(cfg, model, teacher, optimizer, scheduler, train, val, rt, autocast, start, sink)
    save_student(cfg, model, tokenizer, rt)
    metrics.update(quant=cfg.quant.tag(), backend=cfg.backend, world_size=rt.world_size,
                   train_blocks=len(train["input_ids"]), val_blocks=len(val["input_ids"]), resumed_from=str(ckpt))
    if rt.is_main:
        write_json(out / "train_metrics.json", metrics)
        logger.info("done: %s", {k: v for k, v in metrics.items() if k != "resumed_from"})
    return metrics
