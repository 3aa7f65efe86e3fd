"""Every result table quoted in README.md / docs/RESULTS.md equals its committed file under results/, and
every committed table with a sources record equals what its per-row result files give
(scripts/sync_results.py rebuilds and quotes; this fails when a document and its results disagree).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_results_docs.py
"""

import importlib.util
import json
from pathlib import Path

import pytest

from utils.eval.report import add_recovered, table_row, write_table

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


# ---- tables rebuilt from their result files ------------------------------------------------------

SOURCES = sorted((ROOT / "results").glob("*/*.sources.json"))


@pytest.mark.parametrize("sources", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_committed_tables_equal_what_their_result_files_give(sources):
    table, text = sync.rebuilt(sources)
    assert table.read_text() == text, f"{table} disagrees with its result files: python scripts/sync_results.py"


def _results_dir(tmp_path):
    """A results folder like the committed ones: three rows' result JSONs and the table written from them."""
    src, folder = ROOT / "results" / "2026-12-03-learned-and-cached", tmp_path / "results" / "day"
    folder.mkdir(parents=True)
    tasks, rows = ["wikitext2", "c4"], []
    for method, setting, name in (("FP", "16-16-16", "fp.json"), ("RTN", "4-8-8", "rtn-W4A8KV8.json"),
                                  ("QAT (w4a8kv8)", "4-8-8", "qat-w4a8kv8-W4A8KV8.json")):
        (folder / f"row-{name}").write_text((src / f"row-{name}").read_text())
        rows.append(table_row(method, setting, json.loads((src / f"row-{name}").read_text())["results"], tasks))
        rows[-1]["_source"] = name
    add_recovered(rows)
    write_table(rows, tasks, folder / "table.md", ["a note"])
    return folder


def test_a_table_is_rebuilt_from_its_sources_and_a_changed_result_is_caught(tmp_path):
    folder = _results_dir(tmp_path)
    record = json.loads((folder / "table.sources.json").read_text())
    assert [r["source"] for r in record["rows"]] == ["fp.json", "rtn-W4A8KV8.json", "qat-w4a8kv8-W4A8KV8.json"]
    assert record["notes"] == ["a note"] and record["tasks"] == ["wikitext2", "c4"]
    assert sync.rebuild_tables(check=True, root=tmp_path) == []
    row = folder / "row-qat-w4a8kv8-W4A8KV8.json"
    data = json.loads(row.read_text())
    data["results"]["wikitext2"]["ppl"] += 1.0  # a number edited by hand
    row.write_text(json.dumps(data))
    before = (folder / "table.md").read_text()
    assert sync.rebuild_tables(check=True, root=tmp_path) == ["results/day/table.md"]
    assert (folder / "table.md").read_text() == before  # --check changes nothing
    assert sync.rebuild_tables(check=False, root=tmp_path) == ["results/day/table.md"]
    assert sync.rebuild_tables(check=True, root=tmp_path) == []


def test_a_missing_row_file_is_an_error_naming_it(tmp_path):
    folder = _results_dir(tmp_path)
    (folder / "row-rtn-W4A8KV8.json").unlink()
    with pytest.raises(FileNotFoundError, match="rtn-W4A8KV8.json"):
        sync.rebuild_tables(check=True, root=tmp_path)


def test_a_data_statistics_table_is_rebuilt_from_the_merges_statistics(tmp_path):
    from utils.data.stats_report import write_markdown

    folder = tmp_path / "results" / "data"
    folder.mkdir(parents=True)
    info = {"records": 4, "tokens": 600, "mean_tokens": 150.0, "distinct_start_ids": 2, "distinct_tokens": 310,
            "finish": {"eos": 1, "length": 3}, "eos_share": 0.25, "distinct_ngrams": {"1": 0.5, "2": 0.9},
            "duplicates_dropped": 0, "bad_lines_skipped": 0, "length_histogram": {"<=128": 1, "<=256": 3},
            "samples": [{"start_id": 7, "greedy_len": 3, "finish": "eos", "n_tokens": 12, "text": "a | b\nc"}]}
    (folder / "data.stats.json").write_text(json.dumps(info))
    assert write_markdown(folder / "data.stats.json") == folder / "data.stats.md"
    assert sync.rebuild_tables(check=True, root=tmp_path) == []
    text = (folder / "data.stats.md").read_text()
    assert "| tokens | 600 |" in text and "| <=256 | 3 | 75.0% |" in text and "a \\| b ⏎ c" in text
    info["tokens"] = 700  # the statistics changed, the table did not
    (folder / "data.stats.json").write_text(json.dumps(info))
    assert sync.rebuild_tables(check=True, root=tmp_path) == ["results/data/data.stats.md"]
    assert sync.rebuild_tables(check=False, root=tmp_path) == ["results/data/data.stats.md"]
    assert "| tokens | 700 |" in (folder / "data.stats.md").read_text()
