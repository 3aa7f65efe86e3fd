"""The distillation training loop: optimizer and schedule per backend, one step, held-out KD loss, the loop.

The functions read their settings from a `recipes.train.TrainConfig` (`cfg`): batch size, gradient
accumulation, clipping (`max_grad_norm` 0 or None: none, as in HF), logging / eval / save steps.
The last step is always checkpointed, so the student saved after the loop can be rebuilt from it. The recipe builds the models and data and calls
`setup_training` then `train_loop`; checkpoints are utils/train/checkpoint.py, the loss
utils/train/distill.py.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import psutil
import torch
from tqdm import tqdm

from quant.quantizer import is_stored_param
from utils.data.blocks import batch_indices
from utils.distributed import Runtime, compile_layers, mean_across_ranks, wrap_model
from utils.logging import progress_disabled
from utils.train.checkpoint import save_checkpoint
from utils.train.distill import teacher_hidden_states

logger = logging.getLogger(__name__)


def cosine_schedule(optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float):
    """Linear warmup to the base lr, then cosine decay to base * min_lr_ratio at max_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_precision(precision: str, device_type: str) -> str:
    """`precision` with auto resolved: bf16 autocast over float32 weights on a GPU, float32 elsewhere."""
    if precision == "auto":
        return "bf16_autocast" if device_type == "cuda" else "fp32"
    return precision


def _deepspeed_config(cfg, rt: Runtime) -> dict:
    """The JSON at `deepspeed_config` with the run's batch, accumulation and clipping, and its `bf16`
    block enabled for precision bf16 / bf16_autocast (DeepSpeed's bf16 mode: bf16 weights and a
    float32 master copy; keys the file sets in that block, e.g. `immediate_grad_update`, stay)."""
    ds = json.loads(Path(cfg.deepspeed_config).read_text())
    ds.update(train_micro_batch_size_per_gpu=cfg.per_device_batch_size,
              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
              gradient_clipping=cfg.max_grad_norm or 0.0,  # DeepSpeed's 0: no clipping
              zero_allow_untested_optimizer=True, steps_per_print=10**9)
    use_bf16 = resolve_precision(cfg.precision, rt.device.type) in ("bf16", "bf16_autocast")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": use_bf16}
    return ds


def is_scale_param(name: str) -> bool:
    """A learned weight scale or clip ratio (quant/quantizer.py `FakeQuantizer.scale` / `.clip`),
    whatever wrapper prefixes it."""
    return is_stored_param(name)


def param_groups(cfg, model) -> list[dict]:
    """AdamW groups: the weights (learning_rate, weight_decay), then any learned weight scales and clip
    ratios (scale_lr or learning_rate, no weight decay: decaying a step size shrinks the grid)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if not is_scale_param(n)]}]
    scales = [p for n, p in named if is_scale_param(n)]
    if scales:
        groups.append({"params": scales, "lr": cfg.scale_lr or cfg.learning_rate, "weight_decay": 0.0})
    return groups


def setup_training(cfg, model, rt: Runtime):
    """(model or engine, optimizer, scheduler) for the backend."""
    model = wrap_model(model, cfg.backend, rt, resolve_precision(cfg.precision, rt.device.type))
    optimizer = torch.optim.AdamW(param_groups(cfg, model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    if cfg.backend == "deepspeed":
        import deepspeed

        model, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=_deepspeed_config(cfg, rt))
    return model, optimizer, scheduler


def compile_student(cfg, student, rt: Runtime, autocast: bool) -> bool:
    """compile=true: torch.compile the student's decoder layers, probed with one forward and backward
    at the training shape; False (eager) when off, under DeepSpeed, or where torch.compile fails."""
    if not cfg.compile:
        return False
    if cfg.backend == "deepspeed":
        logger.warning("compile=true is not supported with backend=deepspeed (its engine hooks the layers); "
                       "running eager")
        return False
    ids = torch.zeros(cfg.per_device_batch_size, cfg.model_max_length, dtype=torch.long, device=rt.device)

    def probe():
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = student.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        out.last_hidden_state.float().sum().backward()
        student.zero_grad(set_to_none=True)

    return compile_layers(student, probe)


def _batch(blocks: dict, cfg, micro_step: int, rt: Runtime) -> dict:
    """The micro batch's rows of every block tensor (ids, mask; with teacher=cached also the targets)."""
    idx = batch_indices(len(blocks["input_ids"]), cfg.per_device_batch_size, micro_step, rt.rank,
                        rt.world_size, cfg.seed)
    return {key: value[idx].to(rt.device) for key, value in blocks.items()}


def _loss(model, teacher, batch: dict, autocast: bool, device) -> dict:
    """The loss dict of one batch: against the teacher's hidden states, or (teacher None: teacher=cached)
    against the batch's cached top-K targets."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        if teacher is None:
            return model(ids, mask, topk_ids=batch["topk_ids"], topk_logprobs=batch["topk_logprobs"],
                         target_mask=batch["target_mask"])
    hidden = teacher_hidden_states(teacher, ids, mask)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(ids, mask, hidden, teacher.get_output_embeddings())


def _grad_norm(model, cfg) -> float:
    """The total gradient norm, after clipping it to max_grad_norm (0 / None: no clipping, HF's meaning;
    an infinite limit scales by exactly 1)."""
    limit = cfg.max_grad_norm or math.inf
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], limit)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def train_step(model, teacher, optimizer, scheduler, train: dict, cfg, step: int, rt: Runtime,
               autocast: bool) -> dict:
    """One optimizer step over `gradient_accumulation_steps` micro batches; returns local metrics."""
    accum, sums = cfg.gradient_accumulation_steps, {"loss": 0.0, "kd": 0.0, "ce": 0.0}
    for micro in range(accum):
        out = _loss(model, teacher, _batch(train, cfg, step * accum + micro, rt), autocast, rt.device)
        if rt.backend == "deepspeed":
            model.backward(out["loss"])
            model.step()  # DeepSpeed accumulates, clips and steps optimizer + scheduler at the boundary
        else:
            (out["loss"] / accum).backward()
        for key in sums:
            sums[key] += float(out[key].detach()) / accum
    if rt.backend == "deepspeed":
        sums["grad_norm"] = float(model.get_global_grad_norm() or 0.0)
    else:
        sums["grad_norm"] = _grad_norm(model, cfg)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return sums


@torch.no_grad()
def evaluate(model, teacher, val: dict, cfg, rt: Runtime, autocast: bool) -> float:
    """Token-weighted mean KD loss over the held-out blocks (every rank runs all of them)."""
    n = len(val["input_ids"])
    if n == 0:
        return float("nan")
    model.eval()
    total = tokens = 0.0
    for start in range(0, n, cfg.per_device_batch_size):
        batch = {key: value[start: start + cfg.per_device_batch_size].to(rt.device) for key, value in val.items()}
        mask = batch["target_mask" if teacher is None else "attention_mask"]
        weight = float(mask.sum()) if cfg.kd_reduction == "mean" else len(mask)
        total += float(_loss(model, teacher, batch, autocast, rt.device)["kd"]) * weight
        tokens += weight
    model.train()
    return total / tokens


def _memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def train_loop(cfg, model, teacher, optimizer, scheduler, train, val, rt, autocast, start: int, sink,
               files: Optional[dict] = None, last: Optional[dict] = None) -> dict:
    """Steps `start`..max_steps with logging, evaluation and checkpoints (every save_steps and the
    last step, each with `files`); returns the final metrics. `last`: the metrics of step `start`
    (from its checkpoint), reported when no step is left to run."""
    tokens_per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * rt.world_size * cfg.model_max_length
    metrics = {"val_kd_loss_start": evaluate(model, teacher, val, cfg, rt, autocast)}
    window, t0, t_start = [], time.perf_counter(), time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=start, desc="train", disable=progress_disabled())
    last = dict(last or {})
    for step in range(start, cfg.max_steps):
        last = train_step(model, teacher, optimizer, scheduler, train, cfg, step, rt, autocast)
        window.append(last["loss"])
        bar.update(1)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            dt = time.perf_counter() - t0
            line = {"loss": mean_across_ranks(sum(window) / len(window), rt), "kd": last["kd"], "ce": last["ce"],
                    "lr": scheduler.get_last_lr()[0], "grad_norm": last["grad_norm"],
                    "tokens_per_s": tokens_per_step * len(window) / dt, "mem_gb": _memory_gb(rt.device)}
            logger.info("step %d/%d | loss %.4f | kd %.4f | lr %.3g | %.0f tok/s | mem %.2f GB", done,
                        cfg.max_steps, line["loss"], line["kd"], line["lr"], line["tokens_per_s"], line["mem_gb"])
            sink.log(line, done)
            window, t0 = [], time.perf_counter()
        if cfg.eval_steps and done % cfg.eval_steps == 0 and done != cfg.max_steps:
            sink.log({"val_kd_loss": evaluate(model, teacher, val, cfg, rt, autocast)}, done)
        if done == cfg.max_steps or cfg.save_steps and done % cfg.save_steps == 0:
            step_metrics = {k: mean_across_ranks(last[k], rt) for k in ("loss", "kd")}
            save_checkpoint(cfg.output_dir, done, model, optimizer, scheduler, rt, cfg.save_total_limit, files,
                            step_metrics)
    bar.close()
    wall = time.perf_counter() - t_start
    metrics.update(steps=cfg.max_steps, steps_this_run=cfg.max_steps - start,
                   final_loss=mean_across_ranks(last.get("loss", float("nan")), rt),
                   final_kd=mean_across_ranks(last.get("kd", float("nan")), rt),
                   val_kd_loss_end=evaluate(model, teacher, val, cfg, rt, autocast), wall_s=wall,
                   tokens_per_s=tokens_per_step * (cfg.max_steps - start) / wall if wall else 0.0,
                   peak_mem_gb=_memory_gb(rt.device))
    sink.log({"val_kd_loss": metrics["val_kd_loss_end"]}, cfg.max_steps)
    return metrics
