"""Post-training baselines under the same quantizers as QAT: RTN, SmoothQuant, GPTQ.

    python quantize_ptq.py method=gptq model=smollm2-135m w_bits=4 a_bits=8 kv_bits=8 output_dir=runs/ptq/gptq-W4A8KV8

Each method leaves a stock HF model whose weights it may have changed, then `quantize_model` puts on
the W/A/KV fake quantizers and `save_model` writes a student folder that evaluate.py reads like a
QAT one. RTN changes nothing (round-to-nearest at evaluation time); SmoothQuant migrates activation
outliers into the weights (quant/smoothquant.py); GPTQ rounds the weights with second-order error
compensation (quant/gptq.py).

Calibration (`calib`, utils/data/calibration.py): a generated-data JSONL (the data-free default
`gen_data/all_gen.jsonl`), or `wikitext2` / `c4` (say so when reporting: the C4 perplexity samples
the same subset). `calib_samples` random windows of `calib_seqlen` tokens (seeded).

SmoothQuant as published by default: q/k/v and gate/up only (`smooth_down=true` adds down_proj),
alpha chosen per model and setting (`alpha=auto`; a number fixes it). `auto` tries every alpha of
`alpha_grid` and keeps the one whose smoothed, fake-quantized model (at this run's `quant`) has the
lowest next-token NLL on `alpha_holdout` calibration windows held out from the fit (the stream's
tail). On data-free calibration text, which the full-precision model sampled itself, that NLL is in
expectation the model's entropy plus KL(FP || quantized): the grid minimises the same divergence
QAT's distillation loss does, on data-free text, with no labelled data. The choice and every
grid point's loss are logged and saved in the student's `llmqat_meta.json` (`smoothquant`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch.nn import functional as F

from models import dequantize_model, load_model, model_fingerprint, quantize_model, save_model
from quant.config import QuantConfig
from quant.errors import UserError
from quant.gptq import gptq_model
from quant.smoothquant import activation_absmax, smooth_model, smoothed_tensors
from utils.config import save_config, to_dict
from utils.data.calibration import (TEXT_SOURCES, calibration_record, calibration_source, calibration_split,
                                    calibration_windows)
from utils.logging import progress_disabled
from utils.provenance import data_fingerprint, differing_keys, provenance

logger = logging.getLogger(__name__)

METHODS = ("rtn", "smoothquant", "gptq")
ALPHA_GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
GPTQ_TOKENS_PER_FEATURE = 20  # fewer calibration tokens per input feature: a warning (utils/data/calibration.py)


@dataclass
class PTQConfig:
    """Args:
    method: rtn | smoothquant | gptq.
    model: base full-precision model (alias, HF folder, .gguf, hub id).
    output_dir: the student folder written.
    calib: generated JSONL path, or wikitext2 / c4 (see module docstring).
    calib_samples, calib_seqlen, seed: number and length of calibration windows; sampling seed.
    alpha: SmoothQuant migration strength in [0, 1], or `auto` (chosen from alpha_grid, module docstring).
    alpha_grid, alpha_holdout: the alphas `auto` tries; held-out windows (of calib_seqlen) it scores them on.
    smooth_down: also smooth down_proj through up_proj (not in the published recipe).
    gptq_block_size, gptq_percdamp, gptq_act_order: GPTQ's lazy-batch size, dampening, act-order.
    gptq_true_sequential: round q/k/v, o, gate/up, down in turn within a layer (quant/gptq.py).
    """

    method: str = "rtn"
    model: str = "smollm2-135m"
    output_dir: str = "runs/ptq/student"
    calib: str = "gen_data/all_gen.jsonl"
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    alpha: str = "auto"
    alpha_grid: List[float] = field(default_factory=lambda: list(ALPHA_GRID))
    alpha_holdout: int = 16
    smooth_down: bool = False
    gptq_block_size: int = 128
    gptq_percdamp: float = 0.01
    gptq_act_order: bool = False
    gptq_true_sequential: bool = True
    batch_size: int = 8
    dtype: str = "float32"
    data_dir: Optional[str] = None
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.calib_samples <= 0 or self.calib_seqlen < 2:
            raise UserError("calib_samples must be positive and calib_seqlen at least 2")
        fixed_alpha(self.alpha)
        if not self.alpha_grid or not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise UserError(f"alpha_grid must be a non-empty list of values in [0, 1], got {self.alpha_grid}")
        if self.alpha_holdout < 1:
            raise UserError(f"alpha_holdout must be >= 1, got {self.alpha_holdout}")


def fixed_alpha(alpha: str) -> Optional[float]:
    """The number `alpha` names, or None for `auto`.

    Raises:
        UserError: neither `auto` nor a number in [0, 1].
    """
    if str(alpha).strip().lower() == "auto":
        return None
    try:
        value = float(alpha)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise UserError(f"alpha must be auto or a number in [0, 1], got {alpha!r}")
    return value


@torch.no_grad()
def heldout_nll(model, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats per token) of `model` on the windows `ids` [N, T]."""
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # [B, T-1, V]
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def _smoothed_loss(model, scales: dict, alpha: float, cfg: PTQConfig, held: torch.Tensor) -> float:
    """Held-out NLL of the model smoothed at `alpha` and fake-quantized at `cfg.quant`; the weights are
    restored exactly afterwards."""
    saved = [t.clone() for t in smoothed_tensors(model, cfg.smooth_down)]
    try:
        smooth_model(model, scales, alpha, cfg.smooth_down)
        quantize_model(model, cfg.quant)
        return heldout_nll(model, held, cfg.batch_size)
    finally:
        dequantize_model(model)
        for tensor, original in zip(smoothed_tensors(model, cfg.smooth_down), saved):
            tensor.copy_(original)


def search_alpha(model, scales: dict, held: torch.Tensor, cfg: PTQConfig) -> tuple[float, dict]:
    """(the alpha of `cfg.alpha_grid` with the lowest held-out NLL, {alpha: NLL}); ties go to the first."""
    losses = {alpha: _smoothed_loss(model, scales, alpha, cfg, held) for alpha in cfg.alpha_grid}
    best = min(losses, key=lambda a: losses[a] if math.isfinite(losses[a]) else math.inf)
    logger.info("SmoothQuant alpha=auto: held-out NLL %s -> alpha %g",
                ", ".join(f"{a:g}: {v:.4f}" for a, v in losses.items()), best)
    return best, losses


def _smoothquant(model, tokenizer, cfg: PTQConfig) -> dict:
    """Smooth the model in place; returns what was chosen (saved in the student's metadata)."""
    alpha = fixed_alpha(cfg.alpha)
    if alpha is not None:
        calib = calibration_windows(cfg.calib, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed, cfg.data_dir)
        smooth_model(model, activation_absmax(model, calib, cfg.batch_size), alpha, cfg.smooth_down)
        return {"alpha": alpha, "smooth_down": cfg.smooth_down}
    calib, held = calibration_split(cfg.calib, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed,
                                    cfg.data_dir, held_out=cfg.alpha_holdout)
    scales = activation_absmax(model, calib, cfg.batch_size)
    alpha, losses = search_alpha(model, scales, held, cfg)
    smooth_model(model, scales, alpha, cfg.smooth_down)
    return {"alpha": alpha, "smooth_down": cfg.smooth_down, "alpha_search": {f"{a:g}": v for a, v in losses.items()},
            "criterion": f"next-token NLL (nats/token) at {cfg.quant.tag()} on {len(held)} held-out windows"}


def apply_method(model, tokenizer, cfg: PTQConfig) -> dict:
    """Change the plain model's weights as `cfg.method` says (RTN: nothing); returns the method's
    choices to record with the student ({} when there are none)."""
    if cfg.method == "rtn":
        return {}
    if cfg.method == "smoothquant":
        return {"smoothquant": _smoothquant(model, tokenizer, cfg)}
    widest = max(getattr(model.config, "intermediate_size", 0) or 0, model.config.hidden_size)
    calib = calibration_windows(cfg.calib, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed, cfg.data_dir,
                                min_tokens=GPTQ_TOKENS_PER_FEATURE * widest)
    gptq_model(model, cfg.quant, calib, cfg.gptq_block_size, cfg.gptq_percdamp, cfg.gptq_act_order,
               cfg.batch_size, progress=not progress_disabled(), true_sequential=cfg.gptq_true_sequential)
    return {}


def read_ptq_meta(folder) -> dict:
    """The `llmqat_meta.json` of a PTQ student folder ({} when it has none)."""
    path = Path(folder) / "llmqat_meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def student_inputs(cfg: PTQConfig) -> dict:
    """What a PTQ student is made from: the model's fingerprint and (not RTN) the calibration record
    (source, split, data fingerprint or hub dataset: utils/data/calibration.calibration_record)."""
    inputs = {"model": model_fingerprint(cfg.model)}
    if cfg.method != "rtn":
        inputs["calibration"] = calibration_record(cfg.calib, cfg.data_dir)
    return inputs


def stale_inputs(folder, cfg: PTQConfig) -> list[str]:
    """Dotted names of the inputs that the PTQ student in `folder` was built from and that differ from
    what `cfg` uses now ([] when it may be reused). A student saved before calibration records were
    kept records a JSONL's sha256 only: compared on that; one calibrated on WikiText-2 / C4 then recorded
    no split or data, so it is stale (its split depended on whether a data directory resolved)."""
    recorded = dict(read_ptq_meta(folder).get("provenance", {}).get("inputs", {}))
    now = student_inputs(cfg)
    old = recorded.get("calibration")
    if isinstance(old, str) and cfg.calib not in TEXT_SOURCES and old == data_fingerprint(cfg.calib):
        recorded["calibration"] = now["calibration"]
    return differing_keys(recorded, now)


def label_notes(cfg: PTQConfig, meta: Optional[dict] = None) -> list[str]:
    """What distinguishes this PTQ student in a table row: calibration source and the method's
    choices, e.g. ["data-free", "alpha=0.8 (auto)"] or ["wikitext2", "act-order"]."""
    meta = meta or {}
    notes = [meta.get("calibration", {}).get("source") or calibration_source(cfg.calib)]
    if cfg.method == "smoothquant":
        notes += ["+down"] if cfg.smooth_down else []
        chosen = meta.get("smoothquant", {}).get("alpha")
        fixed = fixed_alpha(cfg.alpha)
        notes.append(f"alpha={fixed:g}" if fixed is not None else
                     f"alpha={chosen:g} (auto)" if chosen is not None else "alpha=auto")
    if cfg.method == "gptq":
        notes += ([] if cfg.gptq_true_sequential else ["one-pass"]) + (["act-order"] if cfg.gptq_act_order else [])
    return notes


def run(cfg: PTQConfig) -> Path:
    """Build the baseline student and save it to `cfg.output_dir`; return that folder."""
    if not cfg.quant.enabled:
        raise UserError("all bits are 16: nothing to quantize (set w_bits / a_bits / kv_bits)")
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    dequantize_model(model.eval())  # a student folder as the base: start from its plain weights
    with torch.no_grad():
        chosen = apply_method(model, tok, cfg)
    quantize_model(model, cfg.quant)
    inputs = student_inputs(cfg)
    meta = {"method": cfg.method, "ptq": to_dict(cfg), **chosen,
            "provenance": provenance(cfg, inputs=inputs, tokenizer=tok)}
    if cfg.method != "rtn":
        meta["calibration"] = inputs["calibration"]
    out = save_model(model, tok, cfg.output_dir, extra=meta)
    save_config(cfg, out / "ptq_config.yaml")
    logger.info("saved %s %s student (%s) to %s", cfg.method, cfg.quant.tag(), ", ".join(label_notes(cfg, meta)), out)
    return out
