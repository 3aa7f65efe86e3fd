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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from models import dequantize_model, load_model, quantize_model, save_model
from quant.config import QuantConfig
from quant.errors import UserError
from quant.gptq import gptq_model
from quant.smoothquant import activation_absmax, smooth_model
from utils.config import save_config, to_dict
from utils.data.calibration import calibration_windows
from utils.logging import progress_disabled

logger = logging.getLogger(__name__)

METHODS = ("rtn", "smoothquant", "gptq")


GPTQ_TOKENS_PER_FEATURE = 20  # below this many calibration tokens per input feature, warn (see utils/data/calibration.py)


@dataclass
class PTQConfig:
    """Args:
    method: rtn | smoothquant | gptq.
    model: base full-precision model (alias, HF folder, .gguf, hub id).
    output_dir: the student folder written.
    calib: generated JSONL path, or wikitext2 / c4 (see module docstring).
    calib_samples, calib_seqlen, seed: number and length of calibration windows; sampling seed.
    alpha, smooth_down: SmoothQuant migration strength; also smooth down_proj through up_proj.
    gptq_block_size, gptq_percdamp, gptq_act_order: GPTQ's lazy-batch size, dampening, act-order.
    """

    method: str = "rtn"
    model: str = "smollm2-135m"
    output_dir: str = "runs/ptq/student"
    calib: str = "gen_data/all_gen.jsonl"
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    alpha: float = 0.5
    smooth_down: bool = True
    gptq_block_size: int = 128
    gptq_percdamp: float = 0.01
    gptq_act_order: bool = False
    batch_size: int = 8
    dtype: str = "float32"
    data_dir: Optional[str] = None
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.calib_samples <= 0 or self.calib_seqlen < 2:
            raise UserError("calib_samples must be positive and calib_seqlen at least 2")


def apply_method(model, tokenizer, cfg: PTQConfig) -> None:
    """Change the plain model's weights as `cfg.method` says (RTN: nothing)."""
    if cfg.method == "rtn":
        return
    widest = max(getattr(model.config, "intermediate_size", 0) or 0, model.config.hidden_size)
    calib = calibration_windows(cfg.calib, tokenizer, cfg.calib_samples, cfg.calib_seqlen, cfg.seed, cfg.data_dir,
                                min_tokens=GPTQ_TOKENS_PER_FEATURE * widest if cfg.method == "gptq" else 0)
    if cfg.method == "smoothquant":
        smooth_model(model, activation_absmax(model, calib, cfg.batch_size), cfg.alpha, cfg.smooth_down)
    else:
        gptq_model(model, cfg.quant, calib, cfg.gptq_block_size, cfg.gptq_percdamp, cfg.gptq_act_order,
                   cfg.batch_size, progress=not progress_disabled())


def run(cfg: PTQConfig) -> Path:
    """Build the baseline student and save it to `cfg.output_dir`; return that folder."""
    if not cfg.quant.enabled:
        raise UserError("all bits are 16: nothing to quantize (set w_bits / a_bits / kv_bits)")
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    dequantize_model(model.eval())  # a student folder as the base: start from its plain weights
    with torch.no_grad():
        apply_method(model, tok, cfg)
    quantize_model(model, cfg.quant)
    out = save_model(model, tok, cfg.output_dir, extra={"method": cfg.method, "ptq": to_dict(cfg)})
    save_config(cfg, out / "ptq_config.yaml")
    logger.info("saved %s %s student to %s", cfg.method, cfg.quant.tag(), out)
    return out
