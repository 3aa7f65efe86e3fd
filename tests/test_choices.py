"""Choice shares on two-choice tasks (utils/eval/choices.py, scripts/choice_shares.py): the pick recovered
from outcomes and gold labels, its share with error bars, the table rebuilt and checked by sync_results."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from utils.eval.choices import choices_markdown, choices_record, picked, rebuild_choices, share

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pick_is_gold_when_correct_and_the_other_choice_when_wrong():
    assert picked([1, 0, 1, 0], [1, 1, 0, 0]).tolist() == [1, 0, 0, 1]
    with pytest.raises(ValueError, match="not the same examples"):
        picked([1, 0], [1, 1, 0])
    with pytest.raises(ValueError, match="0 or 1"):
        picked([1, 0], [2, 1])


def test_share_has_binomial_error_and_a_bootstrap_interval_around_it():
    s = share(np.array([1] * 30 + [0] * 70), "boolq")
    assert s["n"] == 100 and s["pct"] == pytest.approx(30.0)
    assert s["stderr"] == pytest.approx(100 * np.sqrt(0.3 * 0.7 / 99))
    assert s["ci95"][0] < 30.0 < s["ci95"][1] and s["ci95"][1] - s["ci95"][0] < 25


def test_record_refuses_tasks_with_more_than_two_choices_and_bad_choice():
    with pytest.raises(ValueError, match="two-choice"):
        choices_record("hellaswag", [0, 1], ["a.json"], {})
    with pytest.raises(ValueError, match="0 or 1"):
        choices_record("boolq", [0, 1], ["a.json"], {}, choice=2)


def _row(path: Path, outcomes: str, quant=None):
    path.write_text(json.dumps({"quant": quant, "results": {"boolq": {"per_example": {"acc": outcomes}}}}))


def test_table_counts_yes_picks_per_row_and_gold(tmp_path):
    gold = [1, 1, 1, 0]
    _row(tmp_path / "fp.json", "1100")  # picks 1 1 0 1 -> yes 3/4
    _row(tmp_path / "rtn.json", "0001", {"w_bits": 4, "a_bits": 8, "kv_bits": 8})  # picks 0 0 0 0 -> 0/4
    record = choices_record("boolq", gold, ["fp.json", "rtn.json"], {"where": "boolq/validation.jsonl",
                                                                       "fingerprint": "abc"})
    text = choices_markdown(record, lambda name: json.loads((tmp_path / name).read_text()))
    lines = text.splitlines()
    assert lines[2].startswith("| fp | 16-16-16 | 4 | 50.0 | 75.0 ± ")
    assert lines[3].startswith("| rtn | 4-8-8 | 4 | 25.0 | 0.0 ± 0.0 ")
    assert lines[4] == "| gold labels | | 4 | | 75.0 |"
    assert "abc" in text


def test_a_row_with_more_examples_than_labels_is_refused(tmp_path):
    _row(tmp_path / "fp.json", "11000")
    record = choices_record("boolq", [1, 0], ["fp.json"], {})
    with pytest.raises(ValueError, match="more than the record"):
        choices_markdown(record, lambda name: json.loads((tmp_path / name).read_text()))


def test_script_writes_record_and_table_that_sync_rebuilds_and_checks(tmp_path):
    data = tmp_path / "data" / "boolq"
    data.mkdir(parents=True)
    rows = [{"passage": "p", "question": f"q{i}", "label": lab} for i, lab in enumerate([True, False, True])]
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "results" / "2026-01-01-x"
    folder.mkdir(parents=True)
    _row(folder / "fp.json", "100")  # gold yes no yes: picks yes yes no
    _row(folder / "q.json", "10")  # fewer examples, scored on the first 2 labels: picks yes yes
    out = folder / "boolq-yes.md"
    assert _load("choice_shares").main([str(out), "fp.json", "q.json", "--data-dir", str(tmp_path / "data")]) == 0
    record = json.loads((folder / "boolq-yes.choices.json").read_text())
    assert record["gold"] == "101" and record["choice_name"] == "yes" and len(record["source"]["fingerprint"]) == 64
    assert rebuild_choices(folder / "boolq-yes.choices.json") == (out, out.read_text())
    assert "| fp | 16-16-16 | 3 | 33.3 | 66.7 ± " in out.read_text()
    assert "| q | 16-16-16 | 2 | 50.0 | 100.0 ± " in out.read_text()
    sync = _load("sync_results")
    assert sync.rebuild_tables(check=True, root=tmp_path) == []
    _row(folder / "q.json", "01")  # a row file changed: its table is stale until rebuilt
    assert sync.rebuild_tables(check=True, root=tmp_path) == ["results/2026-01-01-x/boolq-yes.md"]


def test_script_refuses_a_missing_row_file(tmp_path):
    with pytest.raises(SystemExit, match="no such result file"):
        _load("choice_shares").main([str(tmp_path / "t.md"), "nope.json", "--data-dir", str(tmp_path)])
