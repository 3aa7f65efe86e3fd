"""The architecture, checked by parsing every module's imports.

    PYTHONPATH=. python -m pytest -q tests/test_architecture.py

* Imports flow one way: quant -> models -> utils (the library) -> recipes -> entry points (the root
  scripts and benchmarks/). A module may import its own layer or a lower one, never a higher one.
* One import style: imports sit at module level; only heavy optional dependencies (DeepSpeed,
  wandb, TensorBoard, lm-eval, HF datasets, matplotlib, llama-cpp-python, vLLM) may be imported inside a
  function, so that a user without them can still run everything else.
* No library / recipe module over 300 lines unless its docstring says why ("Long file:").
* Each recipe module defines one `*Config` dataclass and a `run(cfg)`, and each root entry point
  reaches its recipe in one import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"quant": 0, "models": 1, "utils": 2, "recipes": 3}
ENTRY_LAYER = 4
ROOT_SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py"))
OPTIONAL_HEAVY = ("deepspeed", "wandb", "torch.utils.tensorboard", "lm_eval", "datasets", "matplotlib", "llama_cpp",
                  "vllm")
MAX_LINES = 300
ENTRY_POINTS = {"generate_data": "recipes.generate", "merge_gen_data": "recipes.merge", "train": "recipes.train",
                "evaluate": "recipes.evaluate", "export": "recipes.export", "quantize_ptq": "recipes.ptq",
                "pipeline": "recipes.pipeline"}


def _modules() -> list[Path]:
    files = [p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")]
    return files + [ROOT / f"{name}.py" for name in ROOT_SCRIPTS] + sorted((ROOT / "benchmarks").glob("*.py"))


def _layer(path: Path) -> int:
    top = path.relative_to(ROOT).parts[0]
    return LAYERS.get(top, ENTRY_LAYER)


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def _project_layer(module: str):
    top = module.split(".")[0]
    if top in LAYERS:
        return LAYERS[top]
    return ENTRY_LAYER if top in ROOT_SCRIPTS else None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    layer = _layer(path)
    for node in ast.walk(ast.parse(path.read_text())):
        for module in _imported(node):
            target = _project_layer(module)
            assert target is None or target <= layer, (
                f"{path.relative_to(ROOT)}:{node.lineno} imports {module} (layer {target}) from layer {layer}: "
                f"imports flow quant -> models -> utils -> recipes -> entry points")


def _function_imports(tree: ast.Module):
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                for module in _imported(node):
                    yield node.lineno, module


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_are_at_module_level_except_heavy_optional_ones(path):
    for lineno, module in _function_imports(ast.parse(path.read_text())):
        assert module.startswith(OPTIONAL_HEAVY), (
            f"{path.relative_to(ROOT)}:{lineno}: `import {module}` inside a function; move it to the top "
            f"(only {OPTIONAL_HEAVY} may be imported lazily)")


@pytest.mark.parametrize("path", [p for p in _modules() if _layer(p) < ENTRY_LAYER], ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_short_or_say_why(path):
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MAX_LINES or "Long file:" in doc, f"{path.relative_to(ROOT)} has {lines} lines and no reason"


@pytest.mark.parametrize("script, recipe", ENTRY_POINTS.items())
def test_each_entry_point_reaches_its_recipe_in_one_hop(script, recipe):
    tree = ast.parse((ROOT / f"{script}.py").read_text())
    assert recipe in [m for node in tree.body for m in _imported(node)], f"{script}.py does not import {recipe}"
    lines = len((ROOT / f"{script}.py").read_text().splitlines())
    assert lines <= 60, f"{script}.py has {lines} lines: an entry point parses its config and calls run(cfg)"
    recipe_tree = ast.parse((ROOT / (recipe.replace(".", "/") + ".py")).read_text())
    names = {n.name for n in recipe_tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert "run" in names and any(n.endswith("Config") for n in names), f"{recipe}: no XConfig + run(cfg)"
