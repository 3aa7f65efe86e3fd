"""The typed config schema: YAML + key=value overrides, errors that name the key, every YAML loads."""

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from quant import QuantConfig
from utils.config import ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class Inner:
    lr: float = 1e-4
    steps: int = 10


@dataclass
class Demo:
    model: str = "smollm2-135m"
    name: Optional[str] = None
    tasks: List[str] = field(default_factory=lambda: ["wikitext2"])
    opt: Inner = field(default_factory=Inner)
    quant: QuantConfig = field(default_factory=QuantConfig)


def test_defaults_yaml_and_cli_in_that_order(tmp_path):
    yaml = tmp_path / "demo.yaml"
    yaml.write_text("model: from-yaml\nopt:\n  lr: 0.5\nquant:\n  w_bits: 8\n")
    cfg = load_config(Demo, ["opt.lr=0.25", "tasks=[piqa,boolq]"], default_yaml=str(yaml))
    assert isinstance(cfg, Demo) and isinstance(cfg.quant, QuantConfig)
    assert (cfg.model, cfg.opt.lr, cfg.opt.steps, cfg.tasks, cfg.quant.w_bits) == ("from-yaml", 0.25, 10,
                                                                                   ["piqa", "boolq"], 8)


def test_quant_fields_without_prefix():
    cfg = load_config(Demo, ["w_bits=4", "a_bits=8", "quant.kv_bits=8", "kv_position=post_rope"])
    assert cfg.quant.tag() == "W4A8KV8" and cfg.quant.kv_position == "post_rope"


@pytest.mark.parametrize("argv,match", [
    (["nope=1"], "nope"),
    (["opt.lr=fast"], "opt.lr"),
    (["opt.steps=1.5"], "opt.steps"),
    (["w_bits=9"], "w_bits=9"),
    (["quant.w_granularity=rows"], "w_granularity"),
    (["justaword"], "key=value"),
    (["config=does-not-exist.yaml"], "not found"),
])
def test_bad_input_names_the_problem(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Demo, argv)


def test_save_config_round_trips(tmp_path):
    cfg = load_config(Demo, ["w_bits=4", "name=x"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Demo, [], default_yaml=str(tmp_path / "resolved.yaml"))
    assert again == cfg


def _yaml_files():
    return sorted(p for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name)
def test_every_yaml_in_configs_loads_into_its_schema(path):
    header = path.read_text().splitlines()[:10]
    schema = next((re.search(r"schema:\s*([\w.]+)", line) for line in header if "schema:" in line), None)
    assert schema, f"{path.name}: the header must name its schema ('# schema: module.Class')"
    module, _, cls = schema.group(1).rpartition(".")
    cfg = load_config(getattr(importlib.import_module(module), cls), [], default_yaml=str(path))
    assert cfg is not None
    assert any(line.startswith("#") and ("python" in line or "sh " in line) for line in header), \
        f"{path.name}: the header must give the launch command"


def test_recipe_name_means_its_yaml_and_is_checked():
    from recipes.ptq import PTQConfig
    from recipes.train import TrainConfig

    alias = load_config(TrainConfig, ["recipe=original", "max_steps=3"])
    assert alias == load_config(TrainConfig, ["config=configs/recipe_original.yaml", "max_steps=3"])
    assert (alias.kd_reduction, alias.quant.ste_clip, alias.precision, alias.data.text_bos) == \
        ("batchmean_sequence", True, "bf16", True)
    with pytest.raises(ConfigError, match="available: .*original"):
        load_config(TrainConfig, ["recipe=nope"])
    with pytest.raises(ConfigError, match="TrainConfig"):
        load_config(PTQConfig, ["recipe=original"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(TrainConfig, ["recipe=original", "config=configs/qat_smollm2_w4a8kv8.yaml"])
