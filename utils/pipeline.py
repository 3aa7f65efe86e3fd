"""The main job: the LLM-QAT pipeline on the default model, stage by stage (see pipeline.py).

Stages now: `rtn` — full precision against round-to-nearest fake quantization (W8A8KV8, W4A8KV8) on
WikiText-2 perplexity, with the quantizers of `quant/`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from quant.config import QuantConfig
from utils.datasets import resolve_data_dir, wikitext2_text
from utils.io import write_json
from utils.logging import print0

logger = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Main-job settings. `settings` are W-A-KV triples; 16 = full precision."""

    model: str = "smollm2-135m"
    data_dir: Optional[str] = None
    out_dir: str = "runs/pipeline"
    seqlen: int = 512
    ppl_windows: int = 16
    settings: List[str] = field(default_factory=lambda: ["16-16-16", "8-8-8", "4-8-8"])
    quant: QuantConfig = field(default_factory=QuantConfig)  # base settings (granularity, kv_position, ...)


def parse_setting(text: str, base: QuantConfig) -> QuantConfig:
    """'4-8-8' -> QuantConfig(w_bits=4, a_bits=8, kv_bits=8) on top of `base`."""
    try:
        w, a, kv = (int(v) for v in text.split("-"))
    except ValueError:
        raise ValueError(f"setting {text!r} is not W-A-KV, e.g. 4-8-8") from None
    return QuantConfig(**{**base.to_dict(), "w_bits": w, "a_bits": a, "kv_bits": kv})


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def stage_rtn(cfg: PipelineConfig, out: Path) -> list[dict]:
    """FP vs RTN fake quantization on WikiText-2 test perplexity (first `ppl_windows` windows)."""
    from models import load_model, quantize_model
    from utils.perplexity import perplexity

    text = wikitext2_text("test", cfg.data_dir)
    model, tok = load_model(cfg.model)
    rows = []
    for setting in cfg.settings:
        qcfg = parse_setting(setting, cfg.quant)
        quantize_model(model, qcfg)
        start = time.time()
        res = perplexity(model, tok, text, seqlen=cfg.seqlen, limit=cfg.ppl_windows)
        rows.append({"setting": qcfg.tag(), "method": "FP" if not qcfg.enabled else "RTN",
                     "wikitext2_ppl": res["ppl"], "tokens": res["tokens"], "seconds": time.time() - start})
        logger.info("%s: WikiText-2 ppl %.3f over %d tokens", qcfg.tag(), res["ppl"], res["tokens"])
    write_json(out / "rtn.json", rows)
    return rows


def run(cfg: PipelineConfig) -> list[dict]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if resolve_data_dir(cfg.data_dir) is None:
        logger.warning("no data_dir / LLMQAT_DATA_DIR: WikiText-2 comes from the Hugging Face hub")
    rows = stage_rtn(cfg, out)
    table = markdown_table(rows, ["method", "setting", "wikitext2_ppl", "tokens", "seconds"])
    (out / "table.md").write_text(table + "\n")
    print0(f"\nWikiText-2 test perplexity, seqlen {cfg.seqlen}, first {cfg.ppl_windows} windows, model {cfg.model}:\n")
    print0(table)
    return rows
