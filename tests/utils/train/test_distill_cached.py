"""The sparse KD loss against cached top-K targets (train.py teacher=cached), on a tiny random Llama:
with K equal to the vocabulary it is the online KD loss on the same unpacked documents, in value and
in gradients: to float32 rounding (rtol 1e-5) with float32 targets, and to rtol 2e-2 / atol 1e-3 with
the float16 log-probs generation stores; with K < V it is <= the full KL (the estimator's bias).

    PYTHONPATH=. python -m pytest -q tests/utils/train/test_distill_cached.py
"""

import pytest
import torch

from tests.conftest import make_tiny_llama
from utils.data.topk import decode, encode, topk_targets
from utils.train.distill import DistillStudent, KDLoss, next_token_labels, sparse_token_kl, token_kl


def _documents():
    """Two right-padded documents, one per block (lengths 9 and 6), and where targets exist."""
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 9 + [0], [1] * 6 + [0] * 4])
    ids = ids * mask
    target_mask = mask.clone()
    target_mask[0, 8] = target_mask[1, 5] = 0  # the last token of a document has no target
    return ids, mask, target_mask


def _targets(teacher, ids, mask, k, storage):
    with torch.no_grad():
        logits = teacher(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    top_ids, top_lps = topk_targets(logits.flatten(0, 1), k)
    if storage == "float16":  # what the sidecar holds
        top_ids, top_lps = decode(encode(top_ids, top_lps, 2, 2), k, 2, 2)
    return top_ids.view(*ids.shape, k), top_lps.view(*ids.shape, k + 1)


def _loss_and_grads(student, compute):
    student.zero_grad()
    out = compute()
    out["loss"].backward()
    return out["loss"].detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("storage,rtol,atol", [("float32", 1e-5, 1e-6), ("float16", 2e-2, 1e-3)])
def test_k_equal_to_vocab_gives_the_online_loss_and_gradients(storage, rtol, atol):
    teacher, student = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    ids, mask, target_mask = _documents()
    vocab = teacher.config.vocab_size
    top_ids, top_lps = _targets(teacher, ids, mask, vocab, storage)
    model = DistillStudent(student, KDLoss(chunk_size=7))

    def online():
        with torch.no_grad():
            teacher_hidden = teacher.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = student.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        return model.loss(hidden, student.get_output_embeddings(), teacher_hidden, teacher.get_output_embeddings(),
                          next_token_labels(ids, mask), target_mask)

    def cached():
        return model(ids, mask, topk_ids=top_ids, topk_logprobs=top_lps, target_mask=target_mask)

    loss_online, grads_online = _loss_and_grads(student, online)
    loss_cached, grads_cached = _loss_and_grads(student, cached)
    torch.testing.assert_close(loss_cached, loss_online, rtol=rtol, atol=atol)
    assert len(grads_cached) == len(grads_online) > 0
    for g_cached, g_online in zip(grads_cached, grads_online):
        torch.testing.assert_close(g_cached, g_online, rtol=rtol, atol=atol)


def test_sparse_kl_is_a_lower_bound_and_exact_at_full_k():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 40), torch.randn(6, 40) * 2
    full = token_kl(student, teacher)
    for k in (1, 4, 16):
        assert (sparse_token_kl(student, *topk_targets(teacher, k)) <= full + 1e-5).all()
    torch.testing.assert_close(sparse_token_kl(student, *topk_targets(teacher, 40)), full)
    hand = teacher.log_softmax(-1)  # K = 1 by hand: two buckets, the top token and the rest
    top = hand.argmax(-1, keepdim=True)
    q = hand.gather(-1, top).exp()
    p = student.log_softmax(-1).gather(-1, top).exp()
    ref = q * (q.log() - p.log()) + (1 - q) * ((1 - q).log() - (1 - p).log())
    torch.testing.assert_close(sparse_token_kl(student, *topk_targets(teacher, 1)), ref.squeeze(-1),
                               rtol=1e-4, atol=1e-6)


def _reference_sparse_kl(logits, topk_ids, topk_logprobs):
    """KL_K by plain autograd (bucket log-probs from log_softmax, the rest by a masked logsumexp)."""
    log_s = torch.log_softmax(logits, dim=-1)
    rest = log_s.scatter(-1, topk_ids, float("-inf")).logsumexp(-1, keepdim=True)
    log_s = torch.cat([log_s.gather(-1, topk_ids), rest], dim=-1)
    log_t = topk_logprobs - topk_logprobs.logsumexp(-1, keepdim=True)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


@pytest.mark.parametrize("k", [1, 4, 17])
def test_sparse_kl_backward_equals_autograd_of_the_formula(k):
    gen = torch.Generator().manual_seed(k)
    logits = (torch.randn(6, 50, generator=gen) * 3).requires_grad_()
    teacher = torch.log_softmax(torch.randn(6, 50, generator=gen) * 3, dim=-1)
    top_ids, top_lps = topk_targets(teacher, k)
    weights = torch.rand(6, generator=gen)
    (sparse_token_kl(logits, top_ids, top_lps) * weights).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    want_loss = _reference_sparse_kl(logits, top_ids.long(), top_lps.float())
    (want_loss * weights).sum().backward()
    torch.testing.assert_close(sparse_token_kl(logits, top_ids, top_lps), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, logits.grad, rtol=1e-5, atol=1e-7)


def test_sparse_kl_of_bfloat16_logits_returns_a_bfloat16_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, generator=gen).bfloat16().requires_grad_()
    top_ids, top_lps = topk_targets(torch.log_softmax(torch.randn(3, 20, generator=gen), -1), 5)
    sparse_token_kl(logits, top_ids, top_lps).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
