"""The README tells the truth, and so do the docs:

* the README has at most 200 lines, two set-up commands whose scripts exist, and CI runs the test one;
* its layout tree names every file of the code, configs, scripts and docs, and each name exists;
* every `key=value` of every entry-point command in a ```sh / ```bash block of README.md and
  docs/*.md loads with that entry point's schema (`utils.config.load_config`: keys and types;
  paths need not exist, a `config=FILE.yaml` must).

    PYTHONPATH=. python -m pytest -q tests/test_readme.py
"""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from utils.config import load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# entry point (a root file, or `-m recipes.table`) -> its schema
SCHEMAS = {
    "generate_data.py": "recipes.generate.GenerateConfig",
    "run_generate.sh": "recipes.generate.GenerateConfig",
    "merge_gen_data.py": "recipes.merge.MergeConfig",
    "train.py": "recipes.train.TrainConfig",
    "run_train.sh": "recipes.train.TrainConfig",
    "evaluate.py": "recipes.evaluate.EvalConfig",
    "export.py": "recipes.export.ExportConfig",
    "quantize_ptq.py": "recipes.ptq.PTQConfig",
    "run_table.sh": "recipes.table.TableConfig",
    "recipes.table": "recipes.table.TableConfig",
    "pipeline.py": "recipes.pipeline.PipelineConfig",
    "run_pipeline.sh": "recipes.pipeline.PipelineConfig",
}
# files the layout tree must list: code, configs, scripts, docs (not tests/, not __init__.py)
LISTED = ["*.py", "*.sh", "pyproject.toml", "requirements.txt", "configs/**/*.yaml", "configs/**/*.json",
          "recipes/**/*.py", "quant/**/*.py", "models/**/*.py", "utils/**/*.py", "benchmarks/*.py",
          "scripts/*.sh", "docs/*"]


def setup_commands():
    section = README.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


def test_exactly_two_setup_commands_and_their_scripts_exist():
    cmds = setup_commands()
    assert len(cmds) == 2, cmds
    for cmd in cmds:
        script = cmd.split()[1]
        assert (ROOT / script).is_file(), script
        assert "setup_env.sh" in (ROOT / script).read_text(), f"{script} must create its own virtualenv"


def test_ci_runs_the_readme_test_command():
    test_cmd = setup_commands()[1]
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def layout_paths() -> list[str]:
    """Paths of the layout tree: one entry per line, two spaces of indent per level, folders end in /."""
    block = re.search(r"```\n(.*?)```", README.split("## Layout", 1)[1], re.S).group(1)
    stack, paths = [], []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+)", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack[depth:] = [match.group(2)]
        paths.append("".join(stack))
    return paths


def test_layout_entries_exist():
    missing = [p for p in layout_paths() if not (ROOT / p).exists() or (p.endswith("/") != (ROOT / p).is_dir())]
    assert not missing, f"README layout lists files that do not exist: {missing}"


def test_layout_lists_every_file():
    listed = set(layout_paths())
    files = {str(p.relative_to(ROOT)) for pattern in LISTED for p in ROOT.glob(pattern) if p.is_file()}
    unlisted = sorted(f for f in files if Path(f).name != "__init__.py" and f not in listed)
    assert not unlisted, f"add these files to the README layout tree (one line each): {unlisted}"


def shell_lines(path: Path):
    """(line number, command line) of every ```sh / ```bash block line, continuations joined."""
    text = path.read_text()
    for block in re.finditer(r"```(?:sh|bash)\n(.*?)```", text, re.S):
        first = text[:block.start()].count("\n") + 2
        pending, start = "", None
        for i, line in enumerate(block.group(1).splitlines()):
            start = first + i if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            yield start, pending + line
            pending, start = "", None


def entry_point_argv(tokens: list[str]):
    """(entry point, key=value list) of one shell command, or None when it runs no entry point.

    Raises:
        ValueError: a positional argument the entry point does not take.
    """
    for i, tok in enumerate(tokens):
        if tok in SCHEMAS and tok.endswith((".py", ".sh")):
            name, args = tok, tokens[i + 1:]
            break
        if tok == "-m" and tokens[i + 1:i + 2] == ["recipes.table"]:
            name, args = "recipes.table", tokens[i + 2:]
            break
    else:
        return None
    if name == "run_train.sh":
        bits, args = args[:3], args[3:]
        if len(bits) != 3 or not all(b.isdigit() for b in bits):
            raise ValueError(f"run_train.sh needs W A KV first, got {bits}")
        args = [f"quant.{k}={b}" for k, b in zip(("w_bits", "a_bits", "kv_bits"), bits)] + args
    elif name == "run_generate.sh":
        if not args or not args[0].isdigit():
            raise ValueError("run_generate.sh needs the number of shards first")
        args = args[1:]
    elif name == "generate_data.py" and args and args[0].isdigit():
        args = [f"shard={args[0]}", *args[1:]]
    elif name == "train.py":
        args = [a for a in args if a != "--launch-plan"]
    positional = [a for a in args if "=" not in a]
    if positional:
        raise ValueError(f"{name} takes only key=value arguments here, got {positional}")
    return name, args


def doc_commands():
    for path in DOCS:
        for lineno, line in shell_lines(path):
            for cmd in re.split(r"\s(?:&&|\|\||;|\|)\s", line):
                yield f"{path.relative_to(ROOT)}:{lineno}", cmd


def test_doc_commands_match_their_schemas():
    checked, errors = 0, []
    for where, cmd in doc_commands():
        try:
            found = entry_point_argv(shlex.split(cmd, comments=True))
            if found is None:
                continue
            module, cls = SCHEMAS[found[0]].rsplit(".", 1)
            load_config(getattr(importlib.import_module(module), cls), found[1])
            checked += 1
        except Exception as err:  # noqa: BLE001 - every failure is reported with its line
            errors.append(f"{where}: {cmd.strip()}\n    {type(err).__name__}: {err}")
    assert not errors, "commands in the docs that their schemas reject:\n" + "\n".join(errors)
    assert checked >= 20, f"only {checked} entry-point commands found in README.md and docs/*.md"


@pytest.mark.parametrize("cmd, bad", [
    ("sh run_train.sh 4 8 8 max_step=10", True),             # unknown key
    ("python evaluate.py limit=many", True),                 # wrong type
    ("sh run_table.sh dtype=bfloat16", True),                # TableConfig has no dtype
    ("sh run_generate.sh 2 config=configs/gen_smollm2.yaml n_vocab=8", False),
    ("CUDA_VISIBLE_DEVICES=0 python generate_data.py 0 max_length=64", False),
])
def test_command_check_catches_bad_keys(cmd, bad):
    name, argv = entry_point_argv(shlex.split(cmd, comments=True))
    module, cls = SCHEMAS[name].rsplit(".", 1)
    schema = getattr(importlib.import_module(module), cls)
    if bad:
        with pytest.raises(Exception):
            load_config(schema, argv)
    else:
        load_config(schema, argv)


def test_readme_results_come_from_committed_result_files():
    """Every number of the README's results table is in the committed table it quotes."""
    section = README[README.index("## Results"):README.index("## Layout")]
    source = re.search(r"result files in `(results/[^`]+)/`", section).group(1)
    table = (ROOT / source / "table.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Method")]
    numbers = {n for line in rows for n in re.findall(r"-?\d+\.\d+|\b\d+\b(?= \[)", line.replace("**", ""))}
    assert numbers, "no numbers found in the README results table"
    missing = sorted(n for n in numbers if n not in table)
    assert not missing, f"README numbers not in {source}/table.md: {missing}"
