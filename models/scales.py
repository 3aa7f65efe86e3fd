"""Stored weight scales of a saved student (w_quantizer lsq / ternary, w_init mse; quant/lsq.py).

They are ordinary entries of the student's state dict (`<linear>.weight_quantizer.scale`), written by
`save_pretrained` with the weights; stock `from_pretrained` does not know them (it builds the plain
model), so `models.load_model` re-applies `quantize_model` and then loads them from the safetensors
files with `load_stored_scales`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from safetensors import safe_open

from quant.errors import InputFileError
from quant.quantizer import is_stored_param


def _stored_scale_keys(model) -> list[str]:
    """Weight scales and learned activation / K, V clip ratios (`<module>.<x>_quantizer.clip`)."""
    return [k for k in model.state_dict() if is_stored_param(k)]


def load_stored_scales(model, folder: Union[str, Path]) -> int:
    """Load the learned (lsq / ternary) or searched (mse) weight scales a saved student holds in its
    safetensors files; stock `from_pretrained` does not know them. Returns how many were loaded.

    Raises:
        InputFileError: the student's quant_config asks for stored scales the folder lacks.
    """
    keys = _stored_scale_keys(model)
    if not keys:
        return 0
    found = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found.update({k: f.get_tensor(k) for k in keys if k in f.keys()})
    missing = [k for k in keys if k not in found]
    if missing:
        raise InputFileError(f"{folder} lacks {len(missing)} stored weight scales (e.g. {missing[0]}) that its "
                             f"quant_config.json asks for: not a complete student folder")
    model.load_state_dict(found, strict=False)
    return len(found)
