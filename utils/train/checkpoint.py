"""Atomic training checkpoints, `resume=auto` (checked against what made the checkpoint), the final student.

    save_checkpoint(out_dir, step, model, optimizer, scheduler, rt)   # -> out_dir/checkpoint-{step}
    path = find_checkpoint(out_dir, "auto")                           # newest complete one, or None
    step = load_checkpoint(path, model, optimizer, scheduler, rt)

Layout of `checkpoint-{step}/`: `model_optim/` (torch.distributed.checkpoint, sharded under FSDP; or
a DeepSpeed checkpoint under backend=deepspeed), `rng-rank{r}.pt` (python / torch / CUDA RNG per
rank), the run's `train_config.yaml` and `provenance.json` (`check_resume` compares a new run's
against them) and `trainer_state.json` (step, scheduler state, the step's mean loss), written last. Everything is written into
`.checkpoint-{step}.tmp` and renamed at the end, so a killed run never leaves a directory named
`checkpoint-N`; only directories holding `trainer_state.json` are ever resumed from. The data
position is the step count (batches are a pure function of the step, see utils.data.blocks).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from models import load_model, save_model
from quant.errors import InputFileError, UserError
from utils.config import to_dict
from utils.distributed import Runtime, barrier, full_state_dict, unwrap
from utils.provenance import differing_keys

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
PROVENANCE_FILE = "provenance.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoint folders of `out_dir`, oldest first."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(out_dir, resume: str) -> Optional[Path]:
    """`resume`: "none" -> None; "auto" -> newest complete checkpoint or None; else that folder.

    Raises:
        FileNotFoundError: an explicit path that is not a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume == "auto":
        done = complete_checkpoints(out_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise InputFileError(f"resume={resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _save_model_optim(path: Path, model, optimizer, rt: Runtime) -> None:
    if rt.backend == "deepspeed":
        model.save_checkpoint(str(path), tag="state", save_latest=False)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def _load_model_optim(path: Path, model, optimizer, rt: Runtime) -> None:
    if rt.backend == "deepspeed":
        model.load_checkpoint(str(path), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, rt: Runtime, keep: Optional[int] = 2,
                    files: Optional[dict] = None, last: Optional[dict] = None) -> Path:
    """Write checkpoint-{step} atomically (all ranks call); keep the newest `keep` (0 / None = all).

    Args:
        files: name -> text, written into the checkpoint (the run's config and provenance).
        last: the step's metrics (mean over ranks), given back by `load_checkpoint`.
    """
    final = Path(out_dir) / f"checkpoint-{step}"
    tmp = Path(out_dir) / f".checkpoint-{step}.tmp"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(rt)
    _save_model_optim(tmp / "model_optim", model, optimizer, rt)
    torch.save(rng_state(), tmp / f"rng-rank{rt.rank}.pt")
    barrier(rt)
    if rt.is_main:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": rt.world_size, "last": last}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(out_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier(rt)
    return final


def load_checkpoint(path, model, optimizer, scheduler, rt: Runtime) -> tuple[int, Optional[dict]]:
    """Restore model, optimizer, scheduler and this rank's RNG; return (the step to continue from,
    that step's metrics or None).

    Raises:
        ValueError: the checkpoint was written with another world size.
    """
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != rt.world_size:
        raise UserError(f"{path} was written by {state['world_size']} processes, this run has {rt.world_size}")
    _load_model_optim(path / "model_optim", model, optimizer, rt)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(torch.load(path / f"rng-rank{rt.rank}.pt", weights_only=False))
    logger.info("resumed from %s at step %d", path, state["step"])
    return state["step"], state.get("last")


def check_resume(path, prov: dict, max_steps: int, may_change=()) -> None:
    """Refuse to resume from `path` when what made it differs from this run's provenance `prov`
    (config keys but `may_change`, input fingerprints, tokenizer), or it is past `max_steps`.

    Raises:
        UserError: naming the differing keys (old -> new), or the step.
    """
    path = Path(path)
    if not (path / PROVENANCE_FILE).is_file():
        raise UserError(f"{path} records no training config ({PROVENANCE_FILE}; written by older code): it cannot "
                        f"be checked against this run; train into a new output_dir, or resume=none")
    old = json.loads((path / PROVENANCE_FILE).read_text())
    before = {"config": old.get("config", {}), "inputs": old.get("inputs", {}), "tokenizer": old.get("tokenizer")}
    now = {"config": prov["config"], "inputs": prov["inputs"], "tokenizer": prov["tokenizer"]}
    changed = differing_keys(before, now, ignore={f"config.{k}" for k in may_change})
    if changed:
        diff = ", ".join(f"{k.removeprefix('config.')}: {_get(before, k)!r} -> {_get(now, k)!r}" for k in changed)
        raise UserError(f"cannot resume from {path}: it was trained with another config or inputs ({diff}); "
                        f"use the same values, or train into a new output_dir (its files are left as they are)")
    step = json.loads((path / STATE_FILE).read_text())["step"]
    if step > max_steps:
        raise UserError(f"cannot resume from {path}: it is at step {step}, past max_steps={max_steps}; "
                        f"set max_steps >= {step}")


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def save_student(cfg, model, tokenizer, rt: Runtime, prov: dict) -> Path:
    """Write the final student to {cfg.output_dir}/student (atomically) as a `models.load_model` folder,
    with the training config (a `recipes.train.TrainConfig`) and provenance in its `llmqat_meta.json`.
    All ranks call it (FSDP / ZeRO-3 gather the full state dict)."""
    out = Path(cfg.output_dir) / "student"
    state = None if cfg.backend in ("none", "ddp") else full_state_dict(model, rt)  # collective
    if rt.is_main:
        lm = unwrap(model).lm if state is None else _lm_from_state(cfg, state)
        tmp = out.with_name("student.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(lm, tokenizer, tmp, extra={"train_config": to_dict(cfg), "provenance": prov})
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    barrier(rt)
    return out


def _lm_from_state(cfg, state: dict):
    """A fresh student holding a gathered full state dict."""
    lm, _ = load_model(cfg.model, quant=cfg.quant, attn_implementation=cfg.attn_implementation)
    missing, unexpected = lm.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()}, strict=False)
    tied = ["lm_head.weight"] if lm.config.tie_word_embeddings else []
    if unexpected or set(missing) - set(tied):
        raise RuntimeError(f"student state dict mismatch: missing {missing}, unexpected {unexpected}")
    return lm
