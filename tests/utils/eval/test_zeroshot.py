"""Zero-shot scoring (utils/eval/zeroshot.py) and task formats (utils/eval/tasks.py) on a tiny random Llama.

    PYTHONPATH=. LLMQAT_DATA_DIR=../shared/data .venv/bin/python -m pytest -q tests/utils/eval/test_zeroshot.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from models import load_model, quantize_model
from quant.config import QuantConfig
from tests.conftest import save_tiny_model_dir
from utils.eval.stats import binomial_stderr
from utils.eval.tasks import TASKS, ZERO_SHOT_TASKS, MCDoc, load_task
from utils.eval.zeroshot import (doc_batches, encode_doc, encode_pair, evaluate_docs, pack_layout, score_doc,
                                 score_packed, score_pairs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(save_tiny_model_dir(tmp_path_factory.mktemp("zs") / "tiny"))


@torch.no_grad()
def direct_score(model, ctx: list, cont: list) -> float:
    """One unpadded forward of context + continuation; sum of the continuation's log-probs."""
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, tok].item() for j, tok in enumerate(cont))


def direct_metrics(doc: MCDoc, scores) -> tuple[float, float]:
    acc = float(int(np.argmax(scores)) == doc.gold)
    norm = [s / len(c) for s, c in zip(scores, doc.choices)]
    return acc, float(int(np.argmax(norm)) == doc.gold)


def test_encode_pair_moves_trailing_space_and_splits_whole_encoding(tiny):
    _, tok = tiny
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx2, cont2 = encode_pair(tok, "Answer:", " yes")
    assert (ctx, cont) == (ctx2, cont2)
    assert ctx + cont == tok.encode("Answer: yes", add_special_tokens=False)  # no BOS added


@pytest.mark.parametrize("task", ZERO_SHOT_TASKS)
def test_scores_and_metrics_match_direct_per_choice_computation(tiny, data_dir, task):
    model, tok = tiny
    docs = load_task(task, data_dir, limit=3)
    got_scores: list = []
    result = evaluate_docs(model, tok, docs, acc_norm=TASKS[task].acc_norm, scores_out=got_scores)
    accs, norms = [], []
    for doc, got in zip(docs, got_scores):
        want = [direct_score(model, c, t) for c, t in encode_doc(tok, doc)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
        acc, norm = direct_metrics(doc, want)
        accs.append(acc)
        norms.append(norm)
    assert result["n"] == 3 and result["acc"] == pytest.approx(np.mean(accs))
    assert ("acc_norm" in result) == TASKS[task].acc_norm
    if TASKS[task].acc_norm:
        assert result["acc_norm"] == pytest.approx(np.mean(norms))
        assert result["per_example"]["acc_norm"] == "".join(str(int(v)) for v in norms)
    assert result["per_example"]["acc"] == "".join(str(int(v)) for v in accs)  # paired comparisons use these
    assert result["acc_stderr"] == pytest.approx(binomial_stderr(result["acc"], 3))


def test_prefix_reuse_batching_and_padding_do_not_change_scores(tiny):
    model, tok = tiny
    doc = MCDoc(["The cat sat on the"] * 3, [" mat.", " very long red carpet of the hall", " x"],
                ["mat.", "very long red carpet of the hall", "x"], 0)
    pairs = encode_doc(tok, doc)
    single = [score_pairs(model, [p], batch_size=1)[0] for p in pairs]
    batched = score_pairs(model, pairs, batch_size=3, pad_id=5)
    shared = score_doc(model, pairs, pad_id=7)
    np.testing.assert_allclose(batched, single, atol=1e-4)
    np.testing.assert_allclose(shared, single, atol=1e-4)


def test_winogrande_partial_scoring_shares_the_continuation(tiny):
    model, tok = tiny
    row = {"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah", "option2": "Maria", "answer": "2"}
    doc = TASKS["winogrande"].to_doc(row)
    assert doc.contexts == ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
    assert doc.continuations == [" got the prize."] * 2 and doc.gold == 1
    pairs = encode_doc(tok, doc)
    assert pairs[0][1] == pairs[1][1]  # the same tokens are scored under both contexts
    want = [direct_score(model, c, t) for c, t in pairs]
    np.testing.assert_allclose(score_doc(model, pairs), want, atol=1e-4)


def test_prompt_formats_follow_the_harness():
    piqa = TASKS["piqa"].to_doc({"goal": "G", "sol1": "a", "sol2": "b", "label": 1})
    assert piqa.contexts[0] == "Question: G\nAnswer:" and piqa.continuations == [" a", " b"] and piqa.gold == 1
    boolq = TASKS["boolq"].to_doc({"passage": "T -- P", "question": "is it", "label": "true", "idx": 0})
    assert boolq.contexts[0] == "T -- P\nQuestion: is it?\nAnswer:" and boolq.continuations == [" no", " yes"]
    assert boolq.gold == 1 and TASKS["boolq"].to_doc({"passage": "p", "question": "q", "label": 0}).gold == 0
    siqa = TASKS["siqa"].to_doc({"context": "C.", "question": "Q?", "answerA": "x", "answerB": "y",
                                 "answerC": "z", "label": "3"})
    assert siqa.contexts[0] == "Q: C. Q?\nA:" and siqa.gold == 2
    arc = TASKS["arc_easy"].to_doc({"question": {"stem": "S", "choices": [{"text": "u", "label": "1"},
                                                                         {"text": "v", "label": "2"}]},
                                    "answerKey": "2"})
    assert arc.contexts[0] == "Question: S\nAnswer:" and arc.gold == 1
    obqa = TASKS["openbookqa"].to_doc({"question_stem": "The sun is", "answerKey": "A",
                                       "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}})
    assert obqa.contexts[0] == "The sun is" and obqa.continuations == [" hot", " cold"] and obqa.gold == 0
    hs = TASKS["hellaswag"].to_doc({"activity_label": "Roof", "ctx_a": "A man sits.", "ctx_b": "he",
                                    "endings": ["a [title] x  y", "z"], "label": "1"})
    assert hs.contexts[0] == "Roof: A man sits. He" and hs.choices == ["a. x y", "z"] and hs.gold == 1


def test_quantized_model_scores_differ_but_stay_batch_invariant(tiny):
    model, tok = tiny
    doc = MCDoc(["Is the sky blue?"] * 2, [" no", " yes, it is"], ["no", "yes, it is"], 1)
    pairs = encode_doc(tok, doc)
    fp = score_doc(model, pairs)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    try:
        q_shared = score_doc(model, pairs)
        q_single = [score_pairs(model, [p], batch_size=1)[0] for p in pairs]
    finally:
        from models import dequantize_model

        dequantize_model(model)
    np.testing.assert_allclose(q_shared, q_single, atol=1e-4)
    assert not np.allclose(q_shared, fp, atol=1e-6)


def test_unknown_task_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown zero-shot task"):
        load_task("mmlu", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="piqa/validation.jsonl"):
        load_task("piqa", str(tmp_path))


def _naive(model, docs_pairs) -> list:
    return [[score_pairs(model, [p], batch_size=1)[0] for p in pairs] for pairs in docs_pairs]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_score_as_one_forward_per_choice(tmp_path, data_dir, attn):
    """Several examples of every task in one forward (a padded row each, 4D mask, positions continuing
    the prefix, logits only where scored), FP and W4A8KV4, under sdpa (bool mask) and eager (additive)."""
    model, tok = load_model(save_tiny_model_dir(tmp_path / "tiny"), attn_implementation=attn)
    docs = [doc for task in ZERO_SHOT_TASKS for doc in load_task(task, data_dir, limit=2)]
    docs_pairs = [encode_doc(tok, doc) for doc in docs]
    np.testing.assert_allclose(sum(score_packed(model, docs_pairs), []), sum(_naive(model, docs_pairs), []),
                               rtol=1e-6, atol=1e-4)
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    np.testing.assert_allclose(sum(score_packed(model, docs_pairs[:6]), []), sum(_naive(model, docs_pairs[:6]), []),
                               rtol=1e-6, atol=1e-4)


def test_pack_layout_positions_restart_and_each_choice_continues_the_prefix():
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6])]  # prefix 1 2 3; rests [4] and []
    lay = pack_layout([pairs, [([7], [8, 9])]])
    assert lay["input_ids"] == [1, 2, 3, 4, 7, 8] and lay["position_ids"] == [0, 1, 2, 3, 0, 1]
    assert lay["segment"] == [-1, -1, -1, 0, -1, 0] and lay["doc"] == [0, 0, 0, 0, 1, 1]
    # choice 1 of example 0: 4 is predicted at the prefix's last token (row 2), 5 at row 3; choice 2: 6 at row 2
    assert lay["scored"][0] == [([2, 3], [4, 5]), ([2], [6])] and lay["scored"][1] == [([4, 5], [8, 9])]


def test_doc_batches_respect_the_token_budget_shortest_first():
    docs_pairs = [[([1] * 10, [2] * 5)]] * 5  # 14 tokens each
    assert doc_batches(docs_pairs, 30) == [[0, 1], [2, 3], [4]]  # 2 rows x 14 padded tokens <= 30
    assert doc_batches(docs_pairs, 5) == [[0], [1], [2], [3], [4]]  # longer than the budget: alone
    mixed = [[([1] * 20, [2])], [([1] * 3, [2])], [([1] * 5, [2])]]  # 20, 3, 5 tokens
    assert doc_batches(mixed, 10) == [[1, 2], [0]]


def test_evaluate_docs_packed_equals_per_example(tiny, data_dir):
    model, tok = tiny
    docs = load_task("hellaswag", data_dir, limit=6)
    a, b = [], []
    packed = evaluate_docs(model, tok, docs, scores_out=a, batch_tokens=512)
    single = evaluate_docs(model, tok, docs, scores_out=b, batch_tokens=0)
    np.testing.assert_allclose(sum(a, []), sum(b, []), rtol=1e-6, atol=1e-4)
    assert packed["per_example"] == single["per_example"] and packed["n"] == 6
