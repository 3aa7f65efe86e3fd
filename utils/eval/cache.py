"""The one evaluation-result cache: a results JSON is reused, task by task, only under the same key.

    key = config_hash({"eval": settings_that_change_numbers, "model": model_fingerprint(model)})  # utils.provenance
    done = cached_results(path, key)      # task -> metrics written under this key, else {}

evaluate.py writes `provenance.config_hash` into every results JSON it saves (after each task), and
reads back only the tasks saved under the same hash: a changed model (its weights' fingerprint),
quant config, limit, sequence length, data directory, ... is a different key and evaluates again.
The main job and run_table.sh go through evaluate.py, so this is the only place the rule lives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def read_payload(path) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def cached_results(path, key: str) -> dict:
    """task -> metrics from the results JSON at `path` if it was written under `key`, else {}."""
    payload = read_payload(path)
    return dict(payload.get("results", {})) if payload.get("provenance", {}).get("config_hash") == key else {}


def recorded_results(path, model: str, key_for: Callable[[str], str]) -> tuple[dict, dict]:
    """(task -> metrics, the whole JSON) at `path` for a model that is not on this machine: only if the
    file was written for the model path `model` under the key `key_for(fingerprint)`, with the model
    fingerprint it records (every setting checked, the weights not); else ({}, {})."""
    payload = read_payload(path)
    prov = payload.get("provenance", {})
    fingerprint = prov.get("inputs", {}).get("model")
    if not fingerprint or Path(str(payload.get("model"))) != Path(model):
        return {}, {}
    if prov.get("config_hash") != key_for(fingerprint):
        return {}, {}
    return dict(payload.get("results", {})), payload
