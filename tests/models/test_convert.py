"""models/convert.py: the one verb for what happens to a fake-quant student after training.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/models/test_convert.py
"""

from __future__ import annotations

import pytest
import torch

from models import load_model, quantize_model
from models.convert import convert
from quant.config import QuantConfig
from quant.errors import UserError
from quant.linear import QuantLinear


def test_frozen_weight_quantizers_give_identical_logits(tiny_model_dir):

    from models.convert import fold_weights

    model, _ = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_symmetric=False))
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        assert fold_weights(model) == 14
        assert torch.equal(model(ids).logits, before)


def test_convert_float_unpatches_and_unknown_targets_are_user_errors(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    quantize_model(model, QuantConfig(w_bits=4))
    assert convert(model, "float") is model and not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(UserError, match="unknown conversion"):
        convert(model, "int3")
    with pytest.raises(UserError, match="output="):
        convert(model, "packed")
