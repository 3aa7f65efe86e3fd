"""One typed schema per entry point: dataclass defaults, then a YAML file, then `key=value`.

    cfg = load_config(TrainConfig, sys.argv[1:])                  # defaults, then key=value
    cfg = load_config(TrainConfig, ["config=configs/qat_smollm2_w4a8kv8.yaml", "max_steps=10"])

* Defaults live only in the dataclasses; a YAML file in configs/ is an experiment (only the values it
  changes); the command line wins.
* Unknown keys and wrong types are errors that name the key (`ConfigError`).
* `config=path.yaml` on the command line picks another YAML file; `recipe=NAME` is short for
  `config=configs/recipe_NAME.yaml` (e.g. `recipe=original`: the original LLM-QAT code's training
  choices, docs/recipe.md), and is refused by a schema other than the one its header names.
* Fields of the `quant` section may be given without their prefix: `w_bits=4` means
  `quant.w_bits=4` (the original scripts' and the issues' spelling).
* The result is the dataclass instance itself (`OmegaConf.to_object`), so each dataclass's
  `__post_init__` validation runs (bits 9 fails here, before any model is loaded).
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Type, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from quant.config import QuantConfig
from quant.errors import UserError

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(UserError):
    """A bad configuration value, key or file."""


def _field_names(schema) -> set:
    return {f.name for f in dataclasses.fields(schema)}


def _quant_fields(schema) -> set:
    for f in dataclasses.fields(schema):
        if f.name == "quant" and dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            return _field_names(f.type)
    return _field_names(QuantConfig) if "quant" in _field_names(schema) else set()


def expand_shorthands(schema, dotlist: Sequence[str]) -> list[str]:
    """Rewrite `w_bits=4` to `quant.w_bits=4` where `w_bits` is a quant field, not a top-level one."""
    top, qfields, out = _field_names(schema), _quant_fields(schema), []
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r}")
        key = item.split("=", 1)[0].lstrip("+")
        head = key.split(".", 1)[0]
        out.append(f"quant.{item}" if head not in top and head in qfields else item)
    return out


def _resolve_yaml(path: str) -> Path:
    p = Path(path)
    for cand in (p, REPO_ROOT / p, REPO_ROOT / "configs" / p, REPO_ROOT / "configs" / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path}")


@contextmanager
def _config_errors():
    """OmegaConf errors and the schemas' own ValueError / TypeError checks -> one-line ConfigError."""
    try:
        yield
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"bad config{f' key {key!r}' if key else ''}: {err}".split("\n")[0]) from None
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"bad config value: {err}") from None


def recipe_names() -> list[str]:
    """NAME of every configs/recipe_NAME.yaml."""
    return sorted(p.stem[len("recipe_"):] for p in (REPO_ROOT / "configs").glob("recipe_*.yaml"))


def recipe_yaml(name: str, schema) -> str:
    """configs/recipe_<name>.yaml, checked to exist and to be written for `schema`.

    Raises:
        ConfigError: an unknown recipe (naming the available ones), or one for another schema.
    """
    path = REPO_ROOT / "configs" / f"recipe_{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(recipe_names()) or 'none'}")
    match = re.search(r"^# schema: ([\w.]+)\s*$", path.read_text(), re.M)
    wanted = f"{schema.__module__}.{schema.__qualname__}"
    if match and match.group(1) != wanted:
        raise ConfigError(f"recipe={name} is a {match.group(1)} recipe ({path.name}); this command takes {wanted}")
    return str(path)


def _yaml_choice(schema, argv: list, default_yaml: Optional[str]) -> Optional[str]:
    """Remove `config=` / `recipe=` from `argv` and return the YAML file they name (else `default_yaml`)."""
    picked, keys = {}, ("config",) if "recipe" in _field_names(schema) else ("config", "recipe")
    for item in list(argv):
        key = item.split("=", 1)[0]
        if key in keys and "=" in item:
            picked[key] = item.split("=", 1)[1]
            argv.remove(item)
    if len(picked) == 2:
        raise ConfigError("give either config=FILE or recipe=NAME, not both")
    if "recipe" in picked:
        return recipe_yaml(picked["recipe"], schema)
    return picked.get("config", default_yaml)


def load_config(schema: Type[T], argv: Sequence[str] = (), default_yaml: Optional[str] = None) -> T:
    """Build a validated `schema` instance from defaults, a YAML file and `key=value` overrides.

    Raises:
        ConfigError: unknown key, wrong type, invalid value, malformed override or missing file.
    """
    argv = list(argv)
    yaml_path = _yaml_choice(schema, argv, default_yaml)
    with _config_errors():
        cfg = OmegaConf.structured(schema)  # structured: unknown keys are errors (dict fields stay open)
        if yaml_path:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(_resolve_yaml(yaml_path)))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(expand_shorthands(schema, argv)))
        return OmegaConf.to_object(cfg)


def with_overrides(cfg: T, updates: dict) -> T:
    """A copy of the dataclass instance `cfg` with `updates` (nested dict) merged in, validated like
    a command line: unknown keys and wrong types are ConfigErrors."""
    with _config_errors():
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.create(updates)))


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg, path) -> None:
    """Write the resolved config as YAML (what a run really used)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))
