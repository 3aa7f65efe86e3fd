"""Every YAML in configs/ is an experiment: it loads with the schema its header names, its header gives
its launch command, and it sets only values that differ from the schema's defaults (a copied default
would silently override a later change of that default in code).

    PYTHONPATH=. python -m pytest -q tests/test_configs.py

A line may keep a default on purpose with a `# keep` comment.
"""

import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from utils.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def schema_of(path: Path):
    """The dataclass named by the file's `# schema: module.Class` header line."""
    match = re.search(r"^# schema: ([\w.]+)\.(\w+)\s*$", path.read_text(), re.M)
    assert match, f"{path.name}: no '# schema: module.Class' header line"
    schema = getattr(importlib.import_module(match.group(1)), match.group(2))
    assert dataclasses.is_dataclass(schema), f"{path.name}: {match.group(0)} is not a dataclass"
    return schema


def leaves(node, prefix=()):
    """(key path, line number) of every scalar or list value of a YAML mapping node."""
    for key, value in node.value:
        path = (*prefix, key.value)
        if isinstance(value, yaml.MappingNode):
            yield from leaves(value, path)
        else:
            yield path, key.start_mark.line


def test_configs_exist():
    assert CONFIGS, "configs/ holds no YAML file"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads_with_its_schema(path):
    load_config(schema_of(path), [f"config={path}"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_header_gives_its_launch_command(path):
    launch = re.search(r"^# Launch: (.+)$", path.read_text(), re.M)
    assert launch, f"{path.name}: no '# Launch: <command>' header line"
    assert f"config=configs/{path.relative_to(ROOT / 'configs')}" in launch.group(1) or \
        path.name == "main_job.yaml", f"{path.name}: the launch command does not name the file"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_repeats_no_default(path):
    text = path.read_text()
    lines = text.splitlines()
    defaults = OmegaConf.structured(schema_of(path))
    loaded = OmegaConf.load(path)
    repeated = []
    for keys, line in leaves(yaml.compose(text)):
        dotted = ".".join(keys)
        if "# keep" in lines[line]:
            continue
        default = OmegaConf.select(defaults, dotted, throw_on_missing=False)
        value = OmegaConf.select(loaded, dotted)
        if OmegaConf.is_config(default):
            default = OmegaConf.to_container(default)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        if value == default:
            repeated.append(f"{dotted}: {value!r}")
    assert not repeated, f"{path.name} repeats schema defaults (delete them, or mark the line '# keep'): {repeated}"
