"""Data-free training data: the teacher writes its own text, many sequences at once.

    python generate_data.py 0 n_vocab=500 max_length=2048 batch_size=32   # shard 0 -> gen_data/gen.chunk.00.jsonl

The LLM-QAT recipe (arXiv 2305.17888, its `generate_data.py`): every vocabulary id is a start token,
fed alone (no BOS); for each total greedy length j (default 3, 4, 5) the first j tokens of the
sequence (start token included) are top-1, the rest are sampled from the softmax (top_k 50, T 1.0:
Hugging Face `generate`'s defaults then) until EOS or `max_length` tokens in total.

Start ids (`start_ids`): `random` (the default, the paper's text: the first token is sampled at
random) takes each shard's `n_vocab` ids from one seeded random order of the usable vocabulary (no
special or added tokens), the same order in every process, so shards partition it and any number of
shards covers it uniformly; `walk` (the original code) gives shard i the ids [i * n_vocab, (i + 1) *
n_vocab). A saved student generates from its full-precision weights unless `quantized=true`.

The decoding engine (slot KV cache, continuous batching, per-record seeds) is utils/data/generation.py;
shard files and their metadata are utils/data/shards.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

from models import get_quant_config, load_model, model_fingerprint
from models.convert import convert
from models.loading import check_attn_implementation as check_offered
from quant.errors import UserError
from utils.config import to_dict
from utils.data.generation import Sampling, generate_sequences, mask_dtype
from utils.data.shards import ShardWriter, check_meta, done_keys, read_meta, repair_shard, shard_path, write_meta
from utils.data.topk import SidecarWriter, repair_sidecar
from utils.distributed import compile_layers, process_ranks
from utils.logging import progress_disabled
from utils.provenance import provenance

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """Settings of `generate_data.py`.

    Args:
        shard: which `n_vocab` start ids (of the `start_ids` order) to use; None: $RANK, else $SLURM_PROCID, else 0.
        n_vocab: start ids per shard (the original: 500 x 64 shards = LLaMA's 32k vocabulary).
        greedy_lengths: total greedy lengths j (start token included).
        max_length: total tokens per sequence, start token included (HF `max_length`).
        temperature, top_k, top_p: sampling after the greedy prefix (top_k 0 or top_p 1.0: off).
        eos_ids: tokens that end a sequence; None: the model's generation_config (what HF generate uses).
        device: "auto" (cuda:$LOCAL_RANK if CUDA is available, else cpu), or a torch device.
        num_threads: CPU threads for torch (0: torch's default).
        start_ids: "random" (a seeded random order of the usable vocabulary, the paper's text) or
            "walk" (consecutive ids, the original code); see the module docstring.
        attn_implementation: eager / sdpa (what the slot-cache decoder serves); None: transformers' default.
        quantized: generate from a saved student's fake-quantized model instead of its full-precision weights.
        compile: torch.compile the decoder layers (checked on one short sequence; eager where it fails).
        teacher_topk: K > 0 also stores the model's top-K next-token log-probs at every position in a
            sidecar per shard (layout: utils/data/topk.py), the targets of train.py teacher=cached; 0: off.
    """

    model: str = "smollm2-135m"
    shard: Optional[int] = None
    n_vocab: int = 500
    greedy_lengths: List[int] = field(default_factory=lambda: [3, 4, 5])
    max_length: int = 2048
    batch_size: int = 32
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    eos_ids: Optional[List[int]] = None
    out_dir: str = "gen_data"
    dtype: str = "float32"
    device: str = "auto"
    num_threads: int = 0
    start_ids: str = "random"
    attn_implementation: Optional[str] = None
    quantized: bool = False
    compile: bool = False
    teacher_topk: int = 0

    def __post_init__(self):
        checks = [(self.n_vocab >= 1, "n_vocab must be >= 1"), (self.max_length >= 2, "max_length must be >= 2"),
                  (self.batch_size >= 1, "batch_size must be >= 1"), (self.temperature > 0, "temperature must be > 0"),
                  (self.top_k >= 0, "top_k must be >= 0"), (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (len(self.greedy_lengths) > 0, "greedy_lengths must not be empty"),
                  (self.shard is None or self.shard >= 0, "shard must be >= 0"),
                  (self.num_threads >= 0, "num_threads must be >= 0"),
                  (self.teacher_topk >= 0, "teacher_topk must be >= 0"),
                  (self.start_ids in START_IDS, f"start_ids must be one of {'|'.join(START_IDS)}")]
        checks += [(1 <= j <= self.max_length, f"greedy_lengths: {j} is not in [1, max_length={self.max_length}]")
                   for j in self.greedy_lengths]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        check_attn_implementation(self.attn_implementation)


START_IDS = ("random", "walk")
# Keys that do not decide a shard's records, or differ between the shards of one run: left out of
# the provenance config (the merger compares it across shards) and recorded under "runtime".
RUNTIME_KEYS = ("shard", "out_dir", "batch_size", "device", "num_threads", "attn_implementation", "compile")


def check_attn_implementation(name: Optional[str]) -> None:
    """Refuse a name transformers does not offer, or one the slot-cache decoder cannot serve.

    Raises:
        UserError: naming the key and the accepted values.
    """
    if name is None:
        return
    check_offered(name)
    mask_dtype(name, torch.float32)


def resolve_shard(shard: Optional[int]) -> int:
    """The shard index: the config's, else torchrun's $RANK, else Slurm's $SLURM_PROCID, else 0."""
    if shard is not None:
        return shard
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def resolve_device(device: str) -> torch.device:
    """auto: cuda:(local rank modulo the visible GPUs), so that a task that sees all of its node's GPUs
    takes its own and one that sees only its own (srun --gpus-per-task=1) takes cuda:0; else cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", process_ranks().local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def skipped_ids(tokenizer) -> set[int]:
    """Start ids never used: special tokens and added (control) tokens such as SmolLM2's <filename>."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def start_order(vocab_size: int, skip: set, start_ids: str, seed: int) -> list[int]:
    """The ids in the order shards take them (shard i: positions [i * n_vocab, (i + 1) * n_vocab)).

    walk: every id ascending (skipped ids are dropped from a shard's slice later, as the original
    does); random: the usable ids (not in `skip`) ordered by a hash of (seed, id), a seeded random
    permutation that needs no shared state and is the same in every process and library version.
    """
    if start_ids == "walk":
        return list(range(vocab_size))
    usable = [i for i in range(vocab_size) if i not in skip]
    return sorted(usable, key=lambda i: hashlib.sha256(f"start_ids:{seed}:{i}".encode()).digest())


def shard_jobs(shard: int, n_vocab: int, greedy_lengths: List[int], vocab_size: int, skip: set, start_ids: str,
               seed: int) -> list[tuple[int, int]]:
    """(start_id, greedy_len) owned by `shard`: its `n_vocab` positions of `start_order` minus `skip`,
    for each greedy length (greedy length outer, as the original loops).

    Raises:
        UserError: the shard starts past the end of the vocabulary.
    """
    order, first = start_order(vocab_size, skip, start_ids, seed), shard * n_vocab
    if first >= len(order):
        raise UserError(f"shard {shard} starts at start id number {first}, past the vocabulary ({len(order)} "
                        f"{start_ids} start ids, {-(-len(order) // n_vocab)} shards of n_vocab={n_vocab})")
    ids = [i for i in order[first:first + n_vocab] if i not in skip]
    return [(i, j) for j in greedy_lengths for i in ids]


def eos_ids_of(model, tokenizer, eos_ids: Optional[List[int]]) -> list[int]:
    if eos_ids is not None:
        return list(eos_ids)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return [eos] if isinstance(eos, int) else list(eos or [])


def to_record(seq: dict, tokenizer) -> dict:
    return {"text": tokenizer.decode(seq["token_ids"], skip_special_tokens=True), "token_ids": seq["token_ids"],
            "start_id": seq["start_id"], "greedy_len": seq["greedy_len"], "n_tokens": len(seq["token_ids"]),
            "finish": seq["finish"]}


def record_settings(cfg: GenerateConfig, shard: int, vocab_size: int, eos: list[int]) -> dict:
    """What decides a shard's records (batch_size, device and threads do not: see the README)."""
    keys = ("model", "n_vocab", "greedy_lengths", "max_length", "temperature", "top_k", "top_p", "seed", "dtype",
            "start_ids", "quantized")
    topk = {"teacher_topk": cfg.teacher_topk} if cfg.teacher_topk else {}  # absent at 0: older shards stay valid
    return {**{k: getattr(cfg, k) for k in keys}, "shard": shard, "vocab_size": vocab_size, "eos_ids": eos, **topk}


def shard_meta(cfg: GenerateConfig, shard: int, jobs: list, model, tokenizer, device) -> dict:
    """What the shard's metadata records besides its settings (layout: utils/data/shards.py)."""
    config = {k: v for k, v in to_dict(cfg).items() if k not in RUNTIME_KEYS}
    runtime = {"shard": shard, "batch_size": cfg.batch_size, "device": str(device), "num_threads": cfg.num_threads,
               "attn_implementation": model.config._attn_implementation, "compile": cfg.compile}
    ids = list(dict.fromkeys(i for i, _ in jobs))
    return {"provenance": provenance(config, inputs={"model": model_fingerprint(cfg.model)}, tokenizer=tokenizer,
                                     device=device),
            "start_ids": {"mode": cfg.start_ids, "ids": ids}, "runtime": runtime, "n_expected": len(jobs)}


def is_complete(cfg: GenerateConfig) -> bool:
    """The shard's metadata says complete and was made with these settings from this model."""
    shard = resolve_shard(cfg.shard)
    path = shard_path(cfg.out_dir, shard)
    meta = read_meta(path) if path.is_file() else None
    if not meta or meta.get("complete") is not True:
        return False
    old = meta.get("settings", {})
    eos = cfg.eos_ids if cfg.eos_ids is not None else old.get("eos_ids")
    if record_settings(cfg, shard, old.get("vocab_size"), eos) != old:
        return False
    return (meta.get("provenance") or {}).get("inputs", {}).get("model") == model_fingerprint(cfg.model)


def load_generator(cfg: GenerateConfig, device):
    """The model that writes the data: a saved student's full-precision weights unless `quantized`.

    Raises:
        UserError: quantized=true on a model that is not a quantized student.
    """
    model, tokenizer = load_model(cfg.model, dtype=cfg.dtype, device=device,
                                  attn_implementation=cfg.attn_implementation)
    qcfg = get_quant_config(model)
    if cfg.quantized and qcfg is None:
        raise UserError(f"quantized=true: {cfg.model} is not a quantized student (it has no quant config)")
    if qcfg is not None and not cfg.quantized:
        convert(model, "float")
    weights = "full-precision" if not cfg.quantized else f"fake-quantized ({qcfg.tag()})"
    logger.info("generating from the %s weights of %s (attention: %s)", weights, cfg.model,
                model.config._attn_implementation)
    return model.eval(), tokenizer


def run(cfg: GenerateConfig) -> Path:
    """Generate (or finish) one shard; return its file. Records already in the file are kept."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    shard, device = resolve_shard(cfg.shard), resolve_device(cfg.device)
    logger.info("config: %s", cfg)
    model, tokenizer = load_generator(cfg, device)
    vocab_size, eos = len(tokenizer), eos_ids_of(model, tokenizer, cfg.eos_ids)
    if cfg.compile:
        compile_generator(model, cfg)
    jobs = shard_jobs(shard, cfg.n_vocab, cfg.greedy_lengths, vocab_size, skipped_ids(tokenizer), cfg.start_ids,
                      cfg.seed)
    path = shard_path(cfg.out_dir, shard)
    repair_shard(path)
    done = done_keys(path)
    settings, meta = record_settings(cfg, shard, vocab_size, eos), shard_meta(cfg, shard, jobs, model, tokenizer,
                                                                              device)
    check_meta(path, settings, has_records=bool(done), complete=False, **meta)
    repair_sidecar(path, cfg.teacher_topk, vocab_size)  # after check_meta, which refuses a changed K
    todo = [job for job in jobs if job not in done]
    logger.info("shard %d -> %s: %d sequences (%s start ids), %d already written, %d to generate on %s (batch %d)",
                shard, path, len(jobs), cfg.start_ids, len(jobs) - len(todo), len(todo), device, cfg.batch_size)
    start = time.perf_counter()
    tokens = _write_records(model, tokenizer, cfg, todo, path, eos, total=len(jobs))
    elapsed = time.perf_counter() - start
    write_meta(path, settings, complete=True, **meta)
    logger.info("shard %d done: %d new sequences, %d new tokens in %.1f s (%.1f tok/s)", shard, len(todo), tokens,
                elapsed, tokens / max(elapsed, 1e-9))
    return path


def compile_generator(model, cfg: GenerateConfig) -> bool:
    """torch.compile the decoder layers, checked on one short sequence (eager with a warning where it fails)."""
    def probe():
        list(generate_sequences(model, [(0, 1)], max_length=min(4, cfg.max_length),
                                batch_size=cfg.batch_size, seed=cfg.seed, eos_ids=[], sampling=Sampling()))

    return compile_layers(model, probe)


def _write_records(model, tokenizer, cfg: GenerateConfig, todo: list, path: Path, eos: list, total: int) -> int:
    """Generate the `todo` jobs into the shard file, one line each as it finishes; return new tokens."""
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    tokens, new, start = 0, 0, time.perf_counter()
    with ShardWriter(path) as writer, SidecarWriter(path, cfg.teacher_topk, len(tokenizer)) as sidecar, \
        tqdm(total=total, initial=total - len(todo), unit="seq", desc=path.stem, disable=progress_disabled()) as bar:
        for seq in generate_sequences(model, todo, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                      seed=cfg.seed, eos_ids=eos, sampling=sampling, vocab_limit=len(tokenizer),
                                      teacher_topk=cfg.teacher_topk):
            writer.write(sidecar.add(to_record(seq, tokenizer), seq))  # the block is written before the line
            tokens, new = tokens + len(seq["token_ids"]) - 1, new + 1
            elapsed = time.perf_counter() - start
            bar.set_postfix(seq_s=f"{new / elapsed:.2f}", tok_s=f"{tokens / elapsed:.1f}", refresh=False)
            bar.update(1)
    return tokens
