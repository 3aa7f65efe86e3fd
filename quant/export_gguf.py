"""GGUF export of a fake-quant Llama student, for llama.cpp and everything built on it.

    write_gguf(model, tokenizer, "student.Q4_0.gguf", weight_type="q4_0")

Decoder linears are written as Q4_0 / Q8_0 blocks computed by `quant.gguf_formats` (the functions
the GGUF-faithful fake quantizer runs): from the latent weight when the student was trained in that
very format (lossless by construction), else from its fake-quantized weight (what the student
computes with), re-gridded; a student with stored (lsq / mse) gguf block scales writes its own codes
and fp16 scales. `tq1_0` / `tq2_0` (llama.cpp's ternary types) hold a ternary student exactly (see
quant/gguf_encode.py, which computes all tensor data); their rows are whole 256-blocks, so a model
whose widths are not (SmolLM2-135M: hidden 576) is written zero-padded to the next multiple, a wider
model computing the same function (quant/gguf_pad.py; the original widths under `llmqat.padded_from`). `f16` / `f32` write the effective weights unquantized (the input
llama.cpp's own quantizer takes). Embeddings and a separate lm_head use `embed_type` (q8_0, f16 or
f32); norms are F32. q_proj / k_proj rows are permuted to llama.cpp's RoPE layout (HF rotates
half-split pairs, GGUF interleaved ones), as convert_hf_to_gguf.py's `LlamaModel.permute`; rows
are whole 32-blocks, so permuting them commutes with quantizing. Metadata: general.architecture =
llama, llama.* hyperparameters, and tokenizer.ggml.* either copied from an existing GGUF
(`tokenizer_from`, e.g. the SmolLM2 file) or built from a gpt2-style byte-level BPE HF tokenizer.
The file is written to a temporary name and renamed, so a failure leaves no partial file; it
carries `llmqat.exporter`, and an existing file is replaced only if it has that key (a GGUF this
project wrote), never someone else's model. The token list has exactly one entry per embedding row:
a smaller HF vocabulary is padded with unused `[PAD<i>]` tokens (as llama.cpp's convert_hf_to_gguf.py
does), a larger one, or a copied (`tokenizer_from`) list of another length, is refused.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Union

import gguf
import numpy as np
import torch
from torch import nn

from quant.errors import UserError
from quant.gguf_encode import (  # noqa: F401  (encode_blocks, permute_rope: part of this module's interface)
    TERNARY_BLOCK,
    TERNARY_TYPES,
    encode_blocks,
    encode_codes,
    encode_tensor,
    ggml_type,
    linear_codes_for_export,
    linear_weight_for_export,
    permute_rope,
    rope_heads,
)
from quant.gguf_pad import BlockPadding, block_padding

logger = logging.getLogger(__name__)

MARKER_KEY, MARKER = "llmqat.exporter", "llm-qat quant/export_gguf.py"  # how we recognise our own files
PADDED_KEY = "llmqat.padded_from"  # the original widths of a model zero-padded to whole blocks (quant/gguf_pad.py)
WEIGHT_TYPES = ("q4_0", "q8_0", "tq1_0", "tq2_0", "f16", "f32")
EMBED_TYPES = ("q8_0", "f16", "f32")

def _file_type(kind: str) -> int:
    return {"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0, "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
            "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[kind]


def check_exportable(model: nn.Module, weight_type: str, embed_type: str) -> None:
    """Raise ValueError / NotImplementedError for what this writer does not cover."""
    if weight_type not in WEIGHT_TYPES:
        raise UserError(f"unknown GGUF weight type {weight_type!r}; use one of {WEIGHT_TYPES}")
    if embed_type not in EMBED_TYPES:
        raise UserError(f"unknown GGUF embedding type {embed_type!r}; use one of {EMBED_TYPES}")
    config = model.config
    if config.model_type != "llama":
        raise UserError(f"GGUF export supports Llama models only, got model_type={config.model_type}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("GGUF export of Llama models with linear biases is not supported")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export of rope_type={rope.get('rope_type')} is not supported")
    padding_for(config, weight_type)  # raises for a geometry that cannot be padded to whole blocks


def padding_for(config, weight_type: str) -> Optional[BlockPadding]:
    """The zero-padding (quant/gguf_pad.py) a ternary type needs for this model's widths, else None."""
    return block_padding(config, TERNARY_BLOCK) if weight_type in TERNARY_TYPES else None


def gguf_layout(key: str, weight: torch.Tensor, config, padding: Optional[BlockPadding]) -> torch.Tensor:
    """State-dict tensor `key` as the GGUF stores it: zero-padded to whole blocks (`padding`, with
    `config` the padded one) and, for q_proj / k_proj, in llama.cpp's rotary row order."""
    if padding:
        weight = padding.tensor(key, weight)
    heads = rope_heads(key, config)
    return weight if heads is None else permute_rope(weight, heads)


def gguf_tensors(model: nn.Module, weight_type: str, embed_type: str) -> list[tuple[str, np.ndarray, str]]:
    """[(gguf name, data, kind)] of every tensor to write; tied lm_head is left out (llama.cpp reuses
    token_embd)."""
    padding = padding_for(model.config, weight_type)
    config = padding.config(model.config) if padding else model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    modules = dict(model.named_modules())
    out, lossy = [], []
    for key, param in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings or key.endswith("_quantizer.scale"):
            continue  # stored scales are written inside their weight's blocks
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"no GGUF name for tensor {key}")
        module = modules[key.rsplit(".", 1)[0]]
        codes = linear_codes_for_export(module, weight_type) if key.endswith(".weight") else None
        if codes is not None:
            out.append((name, encode_codes(*codes, key, config, weight_type), weight_type))
            continue
        if isinstance(module, nn.Linear) and key not in ("lm_head.weight",):
            weight, exact = linear_weight_for_export(module, weight_type)
            kind = weight_type
            lossy += [] if exact else [key]
        else:
            weight, kind = param.detach(), ("f32" if param.dim() == 1 else embed_type)
        out.append((name, encode_tensor(gguf_layout(key, weight, config, padding), kind), kind))
    if lossy and weight_type not in ("f16", "f32"):
        logger.warning("%d linears are re-gridded to %s (the student was not trained in gguf_%s): the GGUF is "
                       "close to, not equal to, the fake-quant student", len(lossy), weight_type, weight_type)
    return out


def add_hparams(writer, config, weight_type: str, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(weight_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def check_gguf_replaceable(path: Union[str, Path]) -> None:
    """Raise unless `path` is absent or a GGUF file this writer made (it has MARKER_KEY)."""
    path = Path(path)
    if not path.exists():
        return
    try:
        ours = path.is_file() and MARKER_KEY in gguf.GGUFReader(path).fields
    except Exception:  # any failure to parse it: not a GGUF at all, so not ours
        ours = False
    if not ours:
        raise UserError(f"{path} exists and was not written by llm-qat's GGUF export: choose another output, "
                        "or delete it")


def copy_tokenizer_metadata(writer, source: Union[str, Path], rows: Optional[int] = None) -> None:
    """Copy every tokenizer.* key of an existing GGUF file (same vocabulary) into `writer`.

    Raises:
        UserError: its token list does not have `rows` entries (one per embedding row).
    """
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if rows is not None and (tokens is None or len(tokens.data) != rows):
        raise UserError(f"tokenizer_from={source} has {len(tokens.data) if tokens else 0} tokens, the model's "
                        f"embedding {rows} rows: use a GGUF with this model's vocabulary, or leave tokenizer_from "
                        "empty to build it from the student's tokenizer")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast (tokenizers) tokenizer, or tokenizer_from=<a .gguf>")
    spec = json.loads(backend.to_str())
    pre = json.dumps(spec.get("pre_tokenizer"))
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in pre:
        raise UserError("only gpt2-style byte-level BPE tokenizers are built from HF; pass "
                                  "tokenizer_from=<a .gguf with this vocabulary> instead")
    return spec


def add_hf_tokenizer(writer, tokenizer, vocab_size: int, pre: str = "gpt-2") -> None:
    """tokenizer.ggml.* of a gpt2-style byte-level BPE HF tokenizer (model "gpt2", merges, types).

    Ids the tokenizer lacks up to `vocab_size` (the embedding rows) become unused [PAD<i>] tokens.

    Raises:
        UserError: the tokenizer has ids at or beyond `vocab_size` (the model has no row for them).
    """
    merges = _tokenizer_json(tokenizer)["model"]["merges"]
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has ids up to {max(by_id)} but the model's embedding only {vocab_size} rows: "
                        "its vocabulary does not belong to this model")
    specials = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in specials else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not merges:  # GGUF has no empty arrays, and llama.cpp refuses a gpt2 vocabulary without merges
        logger.warning("the tokenizer has no BPE merges: transformers reads this GGUF, llama.cpp will not")
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model: nn.Module, tokenizer, path: Union[str, Path], weight_type: str = "q4_0",
               embed_type: str = "q8_0", tokenizer_from: Optional[Union[str, Path]] = None,
               name: str = "llmqat-student") -> Path:
    """Write `model` (a Llama, fake-quant student or plain) as a llama.cpp GGUF file at `path`.

    Args:
        weight_type: decoder linears: q4_0 / q8_0 (GGUF grids), f16 / f32 (effective weights).
        embed_type: token_embd (and an untied output) tensor type: q8_0, f16 or f32.
        tokenizer_from: a .gguf whose tokenizer.* metadata to copy; default: build from `tokenizer`.
    Raises:
        UserError: unknown type, a model / tokenizer the writer does not cover, a vocabulary that does
            not match the embedding, or an existing `path` this writer did not make.
    """
    check_exportable(model, weight_type, embed_type)
    path = Path(path)
    check_gguf_replaceable(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        padding = padding_for(model.config, weight_type)
        add_hparams(writer, padding.config(model.config) if padding else model.config, weight_type, name)
        writer.add_string(MARKER_KEY, MARKER)
        if padding:
            logger.info("%s: hidden %d -> %d, intermediate %d -> %d, %d -> %d query heads, zero-padded to whole "
                        "%d-blocks (the same function: quant/gguf_pad.py)", weight_type, padding.hidden,
                        padding.hidden_to, padding.inter, padding.inter_to, padding.heads, padding.heads_to,
                        TERNARY_BLOCK)
            writer.add_string(PADDED_KEY, json.dumps({"hidden_size": padding.hidden, "intermediate_size":
                                                      padding.inter, "num_attention_heads": padding.heads}))
        if tokenizer_from:
            copy_tokenizer_metadata(writer, tokenizer_from, model.get_input_embeddings().weight.shape[0])
        else:
            add_hf_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
        for tensor_name, data, kind in gguf_tensors(model, weight_type, embed_type):
            raw = ggml_type(kind) if kind not in ("f16", "f32") else None
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
