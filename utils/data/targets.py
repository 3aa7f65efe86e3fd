"""Training blocks with the teacher's cached top-K targets (train.py teacher=cached).

    blocks = load_target_blocks("gen_data/all_gen.jsonl", tokenizer, model_max_length=1024)
    # {"input_ids", "attention_mask", "target_mask"} [N, L], "topk_ids" [N, L, K], "topk_logprobs" [N, L, K + 1]

The targets were computed by the generating teacher on each document alone, from position 0. So the
student must see exactly that context: one document per block, right-padded, never packed (no
attention across documents; HF's default position ids 0..L-1 restart with every block, and the
causal mask with right padding hides nothing a real token needs). A document longer than the block
(`model_max_length`) is truncated to its first L tokens: every kept position's context is then the
teacher's, while positions past L would need context the block cannot hold (a second block
starting mid-document would restart positions at 0, which the teacher never saw). `target_mask` is 1
where a target exists: the first min(n_tokens - 1, L) positions (the last token of a document has
none). The targets are held in memory as read (ids int32, log-probs as stored, float16), about the
size of the sidecar; the JSONL and sidecar layout is utils/data/topk.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from quant.errors import InputFileError, UserError
from utils.data.blocks import check_data_file, data_provenance
from utils.data.topk import check_block, decode, read_header, sidecar_path
from utils.io import iter_jsonl

logger = logging.getLogger(__name__)


def check_cached_settings(kd_temperature: float, pack: bool, text_bos: bool) -> None:
    """What teacher=cached needs of the config: the stored temperature, one unre-encoded document per block.

    Raises:
        UserError: naming the key to change.
    """
    if kd_temperature != 1.0:
        raise UserError(f"teacher=cached: kd_temperature={kd_temperature}, but the targets were stored at "
                        f"temperature 1; set kd_temperature=1.0")
    if pack:
        raise UserError("teacher=cached trains one document per block (the targets saw each document alone, "
                        "from position 0): set data.pack=false")
    if text_bos:
        raise UserError("teacher=cached trains on the records' token_ids, the ids the targets belong to: "
                        "set data.text_bos=false")


def check_targets(path, model_fingerprint: str) -> int:
    """K of the data's cached targets, checked: sidecar present, provenance (when there) from `model`.

    Raises:
        InputFileError: no sidecar next to the data (generated without teacher_topk).
        UserError: the provenance says another model generated the targets.
    """
    k = read_header(sidecar_path(check_data_file(path)))[0]
    prov = data_provenance(path) or {}
    made_by = (prov.get("inputs") or {}).get("model")
    if made_by and made_by != model_fingerprint:
        raise UserError(f"{path}: its top-K targets come from model {made_by}, not from `model` "
                        f"({model_fingerprint}); teacher=cached distills from the model that generated the data")
    return k


def _empty(n: int, length: int, k: int, lp_dtype: torch.dtype, pad_id: int) -> dict:
    return {"input_ids": torch.full((n, length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(n, length, dtype=torch.long),
            "target_mask": torch.zeros(n, length, dtype=torch.long),
            "topk_ids": torch.zeros(n, length, k, dtype=torch.int32),
            "topk_logprobs": torch.zeros(n, length, k + 1, dtype=lp_dtype)}


def _rows(path: Path, vocab_size: int) -> list[tuple[list, dict]]:
    rows = []
    for lineno, row in iter_jsonl(path):
        ids, entry = row.get("token_ids"), row.get("topk")
        if not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < vocab_size for i in ids):
            raise UserError(f"{path}:{lineno}: token_ids must be a list of ints in [0, {vocab_size})")
        if not isinstance(entry, dict):
            raise UserError(f"{path}:{lineno}: no 'topk' entry: the data was not generated with teacher_topk")
        rows.append((ids, entry))
    if not rows:
        raise UserError(f"{path}: no rows to train on")
    return rows


def load_target_blocks(path, tokenizer, model_max_length: int) -> dict:
    """One block per document with its cached targets (module docstring); each block's checksum is checked.

    Raises:
        InputFileError: missing sidecar, or a block missing / corrupt. UserError: bad rows.
    """
    path = check_data_file(path)
    k, id_size, lp_size = read_header(sidecar_path(path))
    rows = _rows(path, len(tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks = _empty(len(rows), model_max_length, k, torch.float16 if lp_size == 2 else torch.float32, pad)
    truncated = 0
    with sidecar_path(path).open("rb") as side:
        for i, (ids, entry) in enumerate(rows):
            side.seek(entry["offset"])
            block = side.read(entry["length"])
            check_block(block, entry, f"{path} record {i + 1}")
            top_ids, top_lps = decode(block, k, id_size, lp_size)
            if len(top_ids) != len(ids) - 1:
                raise InputFileError(f"{path} record {i + 1}: {len(top_ids)} targets for {len(ids)} tokens")
            n, t = min(len(ids), model_max_length), min(len(ids) - 1, model_max_length)
            truncated += len(ids) > model_max_length
            blocks["input_ids"][i, :n], blocks["attention_mask"][i, :n] = torch.tensor(ids[:n]), 1
            blocks["topk_ids"][i, :t], blocks["topk_logprobs"][i, :t] = top_ids[:t].int(), top_lps[:t]
            blocks["target_mask"][i, :t] = 1
    if truncated:
        logger.warning("%s: %d of %d documents are longer than model_max_length=%d and were truncated (the "
                       "cached targets past it need the teacher's context)", path, truncated, len(rows),
                       model_max_length)
    return blocks
