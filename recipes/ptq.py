"""Post-training baselines under the same quantizers as QAT: RTN, SmoothQuant, GPTQ.

    python quantize_ptq.py method=gptq model=smollm2-135m w_bits=4 a_bits=8 kv_bits=8 output_dir=runs/ptq/gptq-W4A8KV8

Each method leaves a stock HF model whose weights it may have changed, then `quantize_model` puts on
the W/A/KV fake quantizers and `save_model` writes a student folder that evaluate.py reads like a
QAT one. RTN changes nothing (round-to-nearest at evaluation time); SmoothQuant migrates activation
outliers into the weights (quant/smoothquant.py); GPTQ rounds the weights with second-order error
compensation (quant/gptq.py).

Calibration (`calib`): a generated-data JSONL (rows with `token_ids` or `text`; the data-free
default `gen_data/all_gen.jsonl`), or `wikitext2` / `c4`. With a local data directory these are
WikiText-2 *validation* (the local copy has no train split) and the C4 validation subset, which
the C4 perplexity also samples from: say so when reporting. `calib_samples` random windows of
`calib_seqlen` tokens (seeded) are drawn from the concatenated token stream.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from quant.config import QuantConfig
from utils.config import save_config, to_dict

logger = logging.getLogger(__name__)

METHODS = ("rtn", "smoothquant", "gptq")


GPTQ_TOKENS_PER_FEATURE = 20  # below this many calibration tokens per input feature, warn (see calibration_ids)


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
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.calib_samples <= 0 or self.calib_seqlen < 2:
            raise ValueError("calib_samples must be positive and calib_seqlen at least 2")


def _jsonl_stream(path: str, tokenizer) -> list:
    from utils.io import iter_jsonl

    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration data not found: {path} (generate it, or set calib=wikitext2 / c4)")
    ids = []
    for lineno, row in iter_jsonl(path):
        if "token_ids" in row:
            ids += list(row["token_ids"])
        elif "text" in row:
            ids += tokenizer.encode(row["text"], add_special_tokens=False)
        else:
            raise ValueError(f"{path}:{lineno}: a calibration row needs `token_ids` or `text`")
        ids.append(tokenizer.eos_token_id)
    return ids


def _text_stream(name: str, tokenizer, data_dir: Optional[str]) -> list:
    from utils.eval.datasets import c4_texts, resolve_data_dir, wikitext2_text

    if name == "c4":
        return tokenizer.encode("\n\n".join(c4_texts(data_dir)), add_special_tokens=False)
    split = "validation" if resolve_data_dir(data_dir) is not None else "train"
    logger.info("calibrating on WikiText-2 %s", split)
    return tokenizer.encode(wikitext2_text(split, data_dir), add_special_tokens=False)


def calibration_ids(cfg: PTQConfig, tokenizer, min_tokens: int = 0) -> torch.Tensor:
    """[calib_samples, calib_seqlen] random windows of the calibration token stream (seeded).

    Warns when fewer than `min_tokens` distinct tokens can be covered (the stream or the windows
    are too short): see GPTQ in the README.
    """
    if cfg.calib in ("wikitext2", "c4"):
        ids = _text_stream(cfg.calib, tokenizer, cfg.data_dir)
    else:
        ids = _jsonl_stream(cfg.calib, tokenizer)
    if len(ids) <= cfg.calib_seqlen:
        raise ValueError(f"calibration data {cfg.calib} has {len(ids)} tokens, not more than calib_seqlen")
    covered = min(len(ids), cfg.calib_samples * cfg.calib_seqlen)
    logger.info("calibration: %d windows x %d tokens from %s (%d tokens)", cfg.calib_samples, cfg.calib_seqlen,
                cfg.calib, len(ids))
    if covered < min_tokens:
        logger.warning("calibration covers at most %d distinct tokens, fewer than %d: GPTQ's Hessians are then "
                       "poorly estimated and it can do worse than RTN on held-out text (measured on SmolLM2-135M "
                       "with 4k-16k tokens); use more data / calib_samples, or gptq_percdamp=0.1", covered,
                       min_tokens)
    rng = random.Random(cfg.seed)
    starts = [rng.randint(0, len(ids) - cfg.calib_seqlen - 1) for _ in range(cfg.calib_samples)]
    return torch.tensor([ids[s : s + cfg.calib_seqlen] for s in starts], dtype=torch.long)


def apply_method(model, tokenizer, cfg: PTQConfig) -> None:
    """Change the plain model's weights as `cfg.method` says (RTN: nothing)."""
    if cfg.method == "rtn":
        return
    widest = max(getattr(model.config, "intermediate_size", 0) or 0, model.config.hidden_size)
    calib = calibration_ids(cfg, tokenizer, min_tokens=GPTQ_TOKENS_PER_FEATURE * widest if cfg.method == "gptq" else 0)
    if cfg.method == "smoothquant":
        from quant.smoothquant import activation_absmax, smooth_model

        smooth_model(model, activation_absmax(model, calib, cfg.batch_size), cfg.alpha, cfg.smooth_down)
    else:
        from quant.gptq import gptq_model

        gptq_model(model, cfg.quant, calib, cfg.gptq_block_size, cfg.gptq_percdamp, cfg.gptq_act_order,
                   cfg.batch_size)


def run(cfg: PTQConfig) -> Path:
    """Build the baseline student and save it to `cfg.output_dir`; return that folder."""
    from models import dequantize_model, load_model, quantize_model, save_model

    if not cfg.quant.enabled:
        raise ValueError("all bits are 16: nothing to quantize (set w_bits / a_bits / kv_bits)")
    model, tok = load_model(cfg.model, dtype=cfg.dtype)
    dequantize_model(model.eval())  # a student folder as the base: start from its plain weights
    with torch.no_grad():
        apply_method(model, tok, cfg)
    quantize_model(model, cfg.quant)
    out = save_model(model, tok, cfg.output_dir, extra={"method": cfg.method, "ptq": to_dict(cfg)})
    save_config(cfg, out / "ptq_config.yaml")
    logger.info("saved %s %s student to %s", cfg.method, cfg.quant.tag(), out)
    return out
