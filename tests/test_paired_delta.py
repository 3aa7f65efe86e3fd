"""scripts/paired_delta.py: the paired difference of two result files (perplexity windows, examples).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_paired_delta.py
"""

import importlib.util
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
