"""Process groups and model wrapping for the training backends: none, ddp, fsdp (FSDP2), deepspeed.

    rt = setup_runtime("fsdp", seed=0)           # reads torchrun's RANK / WORLD_SIZE; gloo on CPU
    model = wrap_model(model, "fsdp", rt)        # fully_shard per decoder layer, then the root
    state = full_state_dict(model, rt)           # full CPU state dict on every rank (for saving)

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each decoder layer and then the root (embeddings,
final norm and the tied lm_head stay together in the root group, which FSDP keeps unsharded between
forward and backward, so the chunked KD loss can call `lm_head` many times per step). DeepSpeed is
initialised by `recipes.train` (it also owns the optimizer); here only its process group is set up.

Launchers: torchrun (and DeepSpeed's launcher) set RANK / WORLD_SIZE / LOCAL_RANK; under Slurm's
`srun` without torchrun, `process_ranks` reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead
and `setup_runtime` exports them under torchrun's names (MASTER_ADDR / MASTER_PORT must be set, as
run_train.sh's srun launcher does).

Mixed precision under FSDP2 (`fsdp_mp_policy`): gradients are always reduced in float32. With
precision=bf16 (bf16 weights) parameters are gathered in bf16; with bf16_autocast they are gathered
in float32, as stored: autocast casts the matmul inputs anyway, and gathering in bf16 would hand the
weight fake quantizer bf16-rounded weights, a grid different from the one export computes from the
saved float32 weights.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from quant.errors import UserError

logger = logging.getLogger(__name__)

BACKENDS = ("none", "ddp", "fsdp", "deepspeed")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Ranks(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun", "slurm" or "single"


def process_ranks(env: Optional[Mapping[str, str]] = None) -> Ranks:
    """This process's place: torchrun's RANK / WORLD_SIZE / LOCAL_RANK when RANK is set, else Slurm's
    SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (an `srun` task), else one process. Starts nothing."""
    env = os.environ if env is None else env
    if "RANK" in env:
        return Ranks(int(env["RANK"]), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")), "torchrun")
    if env.get("SLURM_PROCID", "").isdigit():
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")
        return Ranks(int(env["SLURM_PROCID"]), int(world), int(env.get("SLURM_LOCALID", "0")), "slurm")
    return Ranks(0, int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")), "single")


def env_world_size() -> int:
    return process_ranks().world_size


def check_world_size(backend: str, world_size: int) -> None:
    """Raise ValueError if `backend` cannot run with `world_size` processes."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if world_size < 1:
        raise UserError(f"nproc / WORLD_SIZE must be >= 1, got {world_size}")
    if backend == "none" and world_size > 1:
        raise UserError(f"backend=none runs one process, but WORLD_SIZE={world_size}: use backend=ddp, fsdp "
                         f"or deepspeed")
    if torch.cuda.is_available() and world_size > torch.cuda.device_count() * _nodes():
        raise UserError(f"{world_size} processes but only {torch.cuda.device_count()} GPUs on this node")


def check_device(device: str) -> None:
    """Raise UserError for an unknown device, or `cuda` on a machine without a usable GPU."""
    if device not in DEVICES:
        raise UserError(f"unknown device {device!r}; use one of {DEVICES}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but torch sees no CUDA GPU here (use device=auto or device=cpu)")


def _nodes() -> int:
    slurm_nodes = os.environ.get("SLURM_STEP_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if "LOCAL_WORLD_SIZE" not in os.environ and slurm_nodes and slurm_nodes.isdigit():
        return int(slurm_nodes)
    return max(1, env_world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", env_world_size())))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _single_process_env() -> None:
    """torchrun's variables for a one-process group on this machine (a free loopback port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def _export_slurm_ranks(ranks: Ranks) -> None:
    """torchrun's variable names for an `srun` task, which init_process_group("env://") reads.

    Raises:
        UserError: MASTER_ADDR is not set (srun does not set it; run_train.sh's srun launcher does).
    """
    if ranks.world_size == 1:
        return  # _single_process_env starts a one-process group on this machine
    if "MASTER_ADDR" not in os.environ:
        raise UserError("an srun task without MASTER_ADDR: export MASTER_ADDR (the first node) and MASTER_PORT, "
                        "or launch with LAUNCHER=srun sh run_train.sh (docs/training.md)")
    os.environ.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size), LOCAL_RANK=str(ranks.local_rank))
    os.environ.setdefault("MASTER_PORT", "29500")


def setup_runtime(backend: str, seed: int, device: str = "auto") -> Runtime:
    """Check the world size, start the process group (nccl on GPU, gloo on CPU), pick the device, seed.

    Raises:
        ValueError: a backend / world size combination that cannot work.
    """
    ranks = process_ranks()
    rank, world, local_rank = ranks.rank, ranks.world_size, ranks.local_rank
    check_world_size(backend, world)
    check_device(device)
    if ranks.source == "slurm" and backend != "none":
        _export_slurm_ranks(ranks)
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if backend != "none" and world == 1 and "RANK" not in os.environ:
        _single_process_env()  # FSDP2 / DDP / DeepSpeed need a process group even for one process
    if backend != "none" and not dist.is_initialized():
        if backend == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_cuda else "cpu")
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
        else:
            dist.init_process_group("nccl" if use_cuda else "gloo")
    seed_everything(seed)
    return Runtime(rank, world, local_rank, dev, backend)


_GROUP_ENDED = False  # set once this process has ended a process group: see exit_process


def shutdown_runtime(rt: Runtime) -> None:
    """End a finished run's process group on every rank together (barrier, then destroy). Left to
    interpreter exit, gloo's threads can be torn down while a peer still talks to them, and a rank
    that already finished its work dies with SIGABRT ("terminate called without an active exception").
    destroy_process_group only drops torch's own references: DeepSpeed (its engine, its groups module)
    may still hold the group, so the entry point ends such a process with `exit_process`."""
    global _GROUP_ENDED
    if rt.backend != "none" and dist.is_initialized():
        gc.collect()  # drop the engine / optimizer cycles that still hold the group or its pending work
        dist.barrier()
        dist.destroy_process_group()
        _GROUP_ENDED = True


def exit_process(code: int) -> NoReturn:
    """Exit an entry point with `code`. After a process group was ended (`shutdown_runtime`), skip the
    interpreter's finalization (logs and std streams flushed, then `os._exit`): a gloo group that a
    library still references is otherwise destroyed during finalization, where its worker threads can
    abort the process (SIGABRT, "terminate called without an active exception") after every result file
    was written, and torchrun then reports the finished run as failed. Every file this project writes
    is closed before that point (atomic writes), so nothing is lost."""
    if not _GROUP_ENDED:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def barrier(rt: Runtime) -> None:
    if rt.world_size > 1:
        dist.barrier()


def mean_across_ranks(value: float, rt: Runtime) -> float:
    if rt.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(t)
    return t.item() / rt.world_size


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (Llama-style `model.layers`)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise UserError(f"cannot find decoder layers in {type(lm).__name__} to shard")
    return list(layers)


def fsdp_mp_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's mixed precision for a resolved `precision` (fp32 | bf16_autocast | bf16): float32
    gradient reduction always; bf16 gathers only where the weights are bf16 (module docstring).
    Forward inputs are not cast: the root's include the teacher's hidden states, which must keep the
    teacher head's dtype."""
    param_dtype = torch.bfloat16 if precision == "bf16" else None
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def wrap_model(model: nn.Module, backend: str, rt: Runtime, precision: str = "fp32") -> nn.Module:
    """Wrap a module (with `.lm` the HF model) for `backend`; deepspeed is wrapped by its engine.
    `precision`: the resolved precision (fp32 | bf16_autocast | bf16), FSDP2's `fsdp_mp_policy`."""
    if backend == "ddp":
        return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if backend == "fsdp":
        policy = fsdp_mp_policy(precision)
        for layer in decoder_layers(model.lm):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def compile_layers(lm: nn.Module, probe: Callable[[], object]) -> bool:
    """torch.compile each decoder layer of `lm` (with its fake quantizers) in place, then run `probe`
    (e.g. one forward and backward) so that a compiler failure shows now; on any failure, warn and
    put the eager forwards back. Returns whether the layers stay compiled.

    Per layer, as torchtune does: small graphs, the same code for every layer, and FSDP2's per-layer
    hooks stay outside the graphs. Parameter names do not change (the forward is an instance attribute).
    """
    layers = decoder_layers(lm)
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    try:
        probe()
    except Exception as err:  # noqa: BLE001 - any compiler failure: eager computes the same function
        for layer in layers:
            del layer.forward
        logger.warning("compile=true: torch.compile failed here (%s: %s); running eager",
                       type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    return True


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / a DeepSpeed engine (FSDP2 modules are not wrapped)."""
    return getattr(model, "module", model)


def full_state_dict(model: nn.Module, rt: Runtime) -> dict:
    """A full, unsharded CPU state dict of `model` (all ranks must call it under FSDP / ZeRO-3)."""
    if rt.backend == "fsdp":
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rt.backend == "deepspeed" and model.zero_optimization_stage() == 3:
        state = model._zero3_consolidated_16bit_state_dict()  # a dict on rank 0 only
        return {k: v.cpu() for k, v in (state or {}).items()}
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
