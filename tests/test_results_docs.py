"""Every result table quoted in README.md / docs/RESULTS.md equals its committed file under results/
(scripts/sync_results.py writes the quotes; this fails when a document and its results disagree).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_results_docs.py
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sync_results", ROOT / "scripts" / "sync_results.py")
sync = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync)


@pytest.mark.parametrize("doc", sync.DOCS)
def test_quoted_result_tables_equal_their_files(doc):
    text = (ROOT / doc).read_text()
    for path, body in sync.quoted_blocks(text):
        assert (ROOT / path).is_file(), f"{doc} quotes {path}, which is not committed"
        assert body == sync.source_text(path), f"{doc}: the quote of {path} is stale: python scripts/sync_results.py"


def test_results_doc_quotes_tables():
    assert sync.quoted_blocks((ROOT / "docs/RESULTS.md").read_text()), "RESULTS.md quotes no result file"


def test_a_stale_quote_is_detected_and_rewritten():
    path = "results/2026-12-02-grid-4-8-8/table.md"
    stale = f"x\n<!-- results: {path} -->\nold numbers\n<!-- /results -->\ny\n"
    (quote,) = sync.quoted_blocks(stale)
    assert quote == (path, "old numbers\n") and quote[1] != sync.source_text(path)
    assert sync.quoted_blocks(sync.synced(stale)) == [(path, sync.source_text(path))]
