"""scripts/paired_delta.py: the paired difference of two result files (perplexity windows, examples).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_paired_delta.py
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("paired_delta", ROOT / "scripts" / "paired_delta.py")
pd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pd)


def _ppl_row(nll):
    tokens = [100] * len(nll)
    return {"ppl": float(np.exp(sum(nll) / sum(tokens))), "per_window": {"nll": nll, "tokens": tokens}}


def test_perplexity_and_accuracy_differences_with_intervals():
    a = {"wikitext2": _ppl_row([300.0, 310.0, 320.0, 330.0]), "piqa": {"per_example": {"acc": "1111000011"}}}
    b = {"wikitext2": _ppl_row([310.0, 320.0, 330.0, 340.0]), "piqa": {"per_example": {"acc": "1010000001"}}}
    d = pd.delta(a, b)
    w = d["wikitext2"]
    assert w["diff"] == pytest.approx(a["wikitext2"]["ppl"] - b["wikitext2"]["ppl"]) and w["diff"] < 0
    assert w["ci95"][1] < 0  # every window is better in A: every resample says so
    assert w["rel_pct"] == pytest.approx(100 * (a["wikitext2"]["ppl"] / b["wikitext2"]["ppl"] - 1))
    p = d["piqa"]
    assert (p["a"], p["b"], p["diff"], p["n"]) == (60.0, 30.0, 30.0, 10) and p["ci95"][0] <= 30 <= p["ci95"][1]


def test_rows_on_different_windows_are_refused():
    a = {"c4": _ppl_row([1.0, 2.0])}
    b = {"c4": {**_ppl_row([1.0, 2.0]), "per_window": {"nll": [1.0, 2.0], "tokens": [100, 90]}}}
    with pytest.raises(ValueError, match="different windows"):
        pd.delta(a, b)


def _write_row(path, results):
    path.write_text(json.dumps({"results": results}))


def test_pairs_table_is_written_with_its_record_and_rebuilt_by_sync(tmp_path):
    folder = tmp_path / "results" / "2026-01-01-x"
    folder.mkdir(parents=True)
    _write_row(folder / "a.json", {"wikitext2": _ppl_row([300.0, 310.0, 320.0, 330.0]),
                                   "piqa": {"per_example": {"acc": "1111000011", "acc_norm": "1111000111"}}})
    _write_row(folder / "b.json", {"wikitext2": _ppl_row([300.0, 311.0, 319.0, 331.0]),
                                   "piqa": {"per_example": {"acc": "1010000001", "acc_norm": "1010000011"}}})
    out = folder / "paired.md"
    assert pd.main(["--pairs", str(out), "a.json:b.json"]) == 0
    text = out.read_text()
    assert json.loads((folder / "paired.pairs.json").read_text()) == {"pairs": [["a.json", "b.json"]]}
    lines = [line for line in text.splitlines() if line.startswith("| a | b |")]
    assert len(lines) == 2
    assert "PIQA (acc_norm, n=10) | 70.00 | 40.00 | +30.00" in lines[1]
    assert lines[0].count("n.s.") == 1  # a mixed perplexity difference: its interval spans 0

    from utils.eval.report import rebuild_pairs
    assert rebuild_pairs(folder / "paired.pairs.json") == (out, text)
    sync = _load_sync()
    assert sync.rebuild_tables(check=True, root=tmp_path) == []
    _write_row(folder / "b.json", {"wikitext2": _ppl_row([400.0, 411.0, 419.0, 431.0])})
    assert sync.rebuild_tables(check=True, root=tmp_path) == ["results/2026-01-01-x/paired.md"]


def test_pairs_refuses_a_missing_file_and_a_bad_spec(tmp_path):
    _write_row(tmp_path / "a.json", {})
    with pytest.raises(SystemExit, match="no such result file"):
        pd.main(["--pairs", str(tmp_path / "p.md"), "a.json:missing.json"])
    with pytest.raises(SystemExit, match="A.json:B.json"):
        pd.main(["--pairs", str(tmp_path / "p.md"), "a.json"])
    assert not (tmp_path / "p.pairs.json").exists()


def _load_sync():
    spec = importlib.util.spec_from_file_location("sync_results", ROOT / "scripts" / "sync_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
