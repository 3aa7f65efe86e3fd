"""The README tells the truth: its two set-up commands exist and CI runs the test one; the layout
it lists exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def setup_commands():
    section = README.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]


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


def test_layout_entries_exist():
    layout = README.split("## Layout", 1)[1]
    block = re.search(r"```\n(.*?)```", layout, re.S).group(1)
    names = set(re.findall(r"\b([\w]+\.(?:py|sh))\b", block))
    roots = [ROOT, ROOT / "tests", ROOT / "quant", ROOT / "models", ROOT / "utils", ROOT / "scripts", ROOT / "benchmarks"]
    missing = [n for n in names if not any((d / n).is_file() for d in roots)]
    assert not missing, f"README layout lists files that do not exist: {missing}"
