"""Provenance: what made an artifact, recorded next to it and compared before it is reused.

    prov = provenance(cfg, inputs={"model": model_fingerprint(cfg.model), "data": file_fingerprint(path)},
                      tokenizer=tok)
    write_json(out / "provenance.json", prov)
    changed = differing_keys(old["config"], prov["config"], ignore=("max_steps",))

Every reused artifact (generated shard, merged file, tokenized cache, checkpoint, student, PTQ
student, evaluation result, table row) carries such a record: the full resolved config and its
hash, content fingerprints of its inputs, the tokenizer's fingerprint, the code version (git commit
and dirty flag) and the library versions and device. A cache is keyed on the parts that decide
its content (config, inputs, tokenizer); the code version and environment are recorded, so a
reader can see which code made a number, without invalidating every cache at every commit.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from dataclasses import is_dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import transformers

from models.loading import file_fingerprint, tokenizer_fingerprint
from utils.config import to_dict

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_hash(fields) -> str:
    """A short, stable hash of a JSON-able dict or a config dataclass (key order does not matter)."""
    data = to_dict(fields) if is_dataclass(fields) else fields
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"commit": git HEAD or None, "dirty": uncommitted changes to tracked files}."""
    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def environment(device=None) -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": str(device) if device is not None else None}


def provenance(config, inputs: Optional[dict] = None, tokenizer=None, device=None) -> dict:
    """The provenance record of an artifact made by `config` from `inputs` (name -> fingerprint)."""
    cfg = to_dict(config) if is_dataclass(config) else dict(config)
    return {"config": cfg, "config_hash": config_hash(cfg), "inputs": dict(inputs or {}),
            "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            "code": code_version(), "env": environment(device)}


def data_fingerprint(path) -> str:
    """Content fingerprint of a data file (sha256 of its bytes, memoized on size and mtime)."""
    return file_fingerprint(Path(path))


def differing_keys(old: dict, new: dict, ignore: Iterable[str] = (), prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (missing on one side counts),
    except those in `ignore` (dotted names, or top-level names)."""
    ignore, out = set(ignore), []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in ignore or key in ignore and not prefix:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing_keys(a, b, ignore, f"{name}.")
        elif a != b:
            out.append(name)
    return out
