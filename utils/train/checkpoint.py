"""Atomic training checkpoints and `resume=auto`.

    save_checkpoint(out_dir, step, model, optimizer, scheduler, rt)   # -> out_dir/checkpoint-{step}
    path = find_checkpoint(out_dir, "auto")                           # newest complete one, or None
    step = load_checkpoint(path, model, optimizer, scheduler, rt)

Layout of `checkpoint-{step}/`: `model_optim/` (torch.distributed.checkpoint, sharded under FSDP; or
a DeepSpeed checkpoint under backend=deepspeed), `rng-rank{r}.pt` (python / torch / CUDA RNG per
rank) and `trainer_state.json` (step and scheduler state), written last. Everything is written into
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

from quant.errors import InputFileError, UserError
from utils.distributed import Runtime, barrier

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
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


def save_checkpoint(out_dir, step: int, model, optimizer, scheduler, rt: Runtime, keep: int = 2) -> Path:
    """Write checkpoint-{step} atomically (all ranks call); keep the newest `keep` (0 = all)."""
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
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": rt.world_size}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(out_dir)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    barrier(rt)
    return final


def load_checkpoint(path, model, optimizer, scheduler, rt: Runtime) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG; return the step to continue from.

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
    return state["step"]
