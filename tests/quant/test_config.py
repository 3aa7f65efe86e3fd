"""QuantConfig / QuantSpec validation and QuantLinear construction."""

import pytest
import torch
from torch import nn

from quant import QuantConfig, QuantLinear, QuantSpec


@pytest.mark.parametrize("kwargs,match", [
    (dict(w_bits=9), "w_bits=9"),
    (dict(a_bits=1), "a_bits=1"),
    (dict(kv_bits=12), "kv_bits=12"),
    (dict(w_bits=4.0), "integer"),
    (dict(w_granularity="per_row"), "w_granularity"),
    (dict(w_granularity="per_group"), "group_size"),
    (dict(w_granularity="per_group", w_group_size=0), "group_size"),
    (dict(a_granularity="per_channel"), "a_granularity"),
    (dict(kv_position="mid_rope"), "kv_position"),
    (dict(kv_granularity="per_tensor"), "kv_granularity"),
])
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_defaults_are_off_and_round_trip():
    cfg = QuantConfig()
    assert not cfg.enabled and cfg.tag() == "W16A16KV16"
    cfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=8, w_granularity="per_group", w_group_size=32)
    assert cfg.enabled and QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"w_bit": 4})


def test_kv_spec_per_head_uses_head_dim():
    assert QuantConfig(kv_bits=4, kv_granularity="per_head").kv_spec(64) == QuantSpec(4, True, "per_group", 64)
    assert QuantConfig(kv_bits=4).kv_spec(64).granularity == "per_token"


def test_group_size_must_divide_in_features():
    lin = nn.Linear(48, 8)
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear.from_linear(lin, weight_spec=QuantSpec(4, True, "per_group", 32))


def test_from_linear_shares_parameters_and_to_linear_undoes():
    lin = nn.Linear(32, 16)
    ql = QuantLinear.from_linear(lin, weight_spec=QuantSpec(4), act_spec=QuantSpec(8, granularity="per_token"))
    assert ql.weight is lin.weight and ql.bias is lin.bias
    back = ql.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight
    x = torch.randn(3, 32)
    assert torch.equal(back(x), lin(x))
    assert not torch.equal(ql(x), lin(x))
    off = QuantLinear.from_linear(lin)
    assert torch.equal(off(x), lin(x))
