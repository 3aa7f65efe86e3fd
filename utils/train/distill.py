"""Logit distillation for QAT: forward KL(teacher || student) per token, computed in token chunks.

    loss_fn = KDLoss(temperature=1.0, kd_loss_scale=1.0, ce_loss_scale=0.0, chunk_size=1024)
    out = loss_fn(student_hidden, student.lm_head, teacher_hidden, teacher.lm_head, labels, mask)
    out["loss"].backward()

Why chunks: the logits of one batch are [B, T, V] float32 (Llama-3: V = 128k, T = 2048 -> 1 GiB
each), and a naive KL holds several such tensors at once (student logits, both log-softmaxes,
their gradients). Here the *hidden states* [B, T, H] are the input; each chunk of `chunk_size`
tokens goes through the student and teacher heads, the softmaxes and the KL, and is wrapped in
`torch.utils.checkpoint`, so only one chunk's [C, V] tensors are alive at a time; backward
recomputes that chunk's logits (one extra head matmul per chunk). `chunk_size=0` computes the whole
batch in one piece (the plain reference the tests compare against).

Per token (float32 softmaxes, temperature t):  KL = t^2 * sum_v p_T(v) (log p_T(v) - log p_S(v)),
with p = softmax(logits / t) and 0 log 0 = 0 (a -inf teacher logit adds nothing, never NaN); the t^2
keeps gradient sizes independent of t (Hinton et al.).
Reductions: `mean` averages over real tokens (mask == 1); `batchmean_sequence` sums over tokens and
divides by the batch size, the scale of the original LLM-QAT code (`kl_div(reduction="batchmean")`
on [B, T, V]). Cross-entropy on the next-token labels (mean over labelled tokens) is mixed in with
`ce_loss_scale`.

Cached targets (train.py teacher=cached, `KDLoss.forward_cached`): the teacher's top-K ids S and
log-probs at temperature 1, plus log q(rest), q(rest) = 1 - sum_{v in S} q(v), stored at generation
(utils/data/topk.py). The student is coarsened the same way: p(rest) = 1 - sum_{v in S} p(v),
computed as the sum of the student's softmax outside S (exact, no 1 - sum).
The loss is the KL between the two K + 1 bucket distributions:

    KL_K = sum_{v in S} q(v) (log q(v) - log p(v)) + q(rest) (log q(rest) - log p(rest))

The teacher's K + 1 stored log-probs are renormalized (float16 storage leaves them summing to 1
only up to ~1e-3). Bias: KL_K = KL - q(rest) * KL(q(.|rest) || p(.|rest)) <= KL (the chain rule of
KL; the data-processing inequality): the student is not told how to spread the rest's mass, only
how much to give it. With K = V the rest is empty and KL_K = KL (the tests check loss and gradients).
Only temperature 1 (what was stored) is accepted with cached targets.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from quant.errors import UserError

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "batchmean_sequence")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of each row: logits [N, V] -> [N] float32, times temperature^2.

    Terms where the teacher's probability is 0 (a -inf teacher logit, e.g. a masked-out token)
    count 0, as in the definition (0 log 0 = 0), not NaN; elsewhere the value is the plain formula's.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p_t = log_t.exp()
    # 0 log 0 = 0 without torch.where (a bool-mask kernel, ~10x a multiply on CPU, on [N, V]): a -inf
    # teacher log-prob becomes the finite minimum, whose product with p_t = 0 is 0
    terms = torch.sub(log_t.clamp_(min=torch.finfo(log_t.dtype).min), log_s).mul_(p_t)
    return terms.sum(-1) * temperature**2


class _SparseKL(torch.autograd.Function):
    """KL_K per row with a hand-written backward: one vocabulary-sized buffer (the student's softmax)
    instead of autograd's chain through log_softmax, scatter, logsumexp and gather. With bucket
    probabilities P_b (the K top ids alone, then the rest) and the teacher's q_b,
        dKL_K / dz_v = p_v - q_v                   for v in the top K
                     = p_v (1 - q_rest / P_rest)    for every other v."""

    @staticmethod
    def forward(ctx, logits, topk_ids, log_t):
        p = torch.softmax(logits.float(), dim=-1)  # [N, V]: the one vocabulary-sized buffer (fused kernel)
        p_top = p.gather(-1, topk_ids)
        p_rest = p.scatter_(-1, topk_ids, 0.0).sum(-1, keepdim=True)  # exact sum of the rest (no 1 - sum)
        # log p of the buckets; a top-K probability that underflows counts as the smallest normal one
        log_s = torch.cat([p_top.clamp_min(torch.finfo(p.dtype).tiny).log(), p_rest.log()], dim=-1)  # [N, K + 1]
        q = log_t.exp()
        # 0 log 0 = 0: a bucket the teacher gives no mass adds nothing (finite minimum, never NaN)
        kl = (log_t.clamp(min=torch.finfo(log_t.dtype).min) - log_s.clamp(min=torch.finfo(log_s.dtype).min)).mul_(q)
        ratio = torch.where(p_rest > 0, q[:, -1:] / p_rest, torch.ones_like(p_rest))  # q_rest / P_rest
        ctx.save_for_backward(p, topk_ids, p_top - q[:, :-1], ratio)
        ctx.logits_dtype = logits.dtype
        return kl.sum(-1)

    @staticmethod
    def backward(ctx, grad_out):
        p, topk_ids, top_grad, ratio = ctx.saved_tensors  # p: the softmax with the top K zeroed
        # in place on the saved softmax: this graph is never run backward twice (no retain_graph)
        grad = p.mul_(1.0 - ratio).scatter_(-1, topk_ids, top_grad).mul_(grad_out[:, None])
        return grad.to(ctx.logits_dtype), None, None


def sparse_token_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """KL_K of each row (module docstring): logits [N, V], ids [N, K], teacher log-probs [N, K + 1] -> [N]."""
    log_t = topk_logprobs.float()
    log_t = log_t - log_t.logsumexp(-1, keepdim=True)  # float16 storage: renormalize the K + 1 buckets
    return _SparseKL.apply(student_logits, topk_ids.long(), log_t)


def _cached_chunk_sums(student_hidden, topk_ids, topk_logprobs, labels, mask, student_head, with_kd: bool,
                       with_ce: bool) -> torch.Tensor:
    """`_chunk_sums` with cached teacher targets instead of teacher hidden states."""
    logits = student_head(student_hidden)  # [C, V]
    kd = ce = logits.new_zeros((), dtype=torch.float32)
    if with_kd:
        kd = (sparse_token_kl(logits, topk_ids, topk_logprobs) * mask).sum()
    if with_ce:
        ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([kd, ce])


def next_token_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = input_ids[b, t + 1]; the last position and padding get IGNORE_INDEX."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(attention_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return labels


def _chunk_sums(student_hidden, teacher_hidden, labels, mask, student_head, teacher_head,
                temperature: float, with_kd: bool, with_ce: bool) -> torch.Tensor:
    """(sum of KL over masked tokens, sum of CE over labelled tokens) of one chunk, float32 [2]."""
    logits = student_head(student_hidden)  # [C, V]
    zero = logits.new_zeros((), dtype=torch.float32)
    kd = ce = zero
    if with_kd:
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        kd = (token_kl(logits, teacher_logits, temperature) * mask).sum()
    if with_ce:
        ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([kd, ce])


class KDLoss(nn.Module):
    """Forward-KL distillation (+ optional CE) from hidden states, chunked over tokens.

    Args:
        temperature: softmax temperature (> 0).
        kd_loss_scale, ce_loss_scale: weights of the KD and cross-entropy terms (>= 0).
        reduction: `mean` (per real token) or `batchmean_sequence` (original LLM-QAT scale).
        chunk_size: tokens per chunk; 0 = no chunking.
    Raises:
        ValueError: a bad temperature, scale, reduction or chunk size.
    """

    def __init__(self, temperature: float = 1.0, kd_loss_scale: float = 1.0, ce_loss_scale: float = 0.0,
                 reduction: str = "mean", chunk_size: int = 1024):
        super().__init__()
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if kd_loss_scale < 0 or ce_loss_scale < 0 or kd_loss_scale + ce_loss_scale == 0:
            raise UserError(f"loss scales must be >= 0 and not both 0, got kd={kd_loss_scale} ce={ce_loss_scale}")
        if reduction not in REDUCTIONS:
            raise UserError(f"unknown kd reduction {reduction!r}; use one of {REDUCTIONS}")
        if chunk_size < 0:
            raise UserError(f"chunk_size must be >= 0, got {chunk_size}")
        self.temperature, self.reduction, self.chunk_size = temperature, reduction, chunk_size
        self.kd_loss_scale, self.ce_loss_scale = kd_loss_scale, ce_loss_scale

    def forward(self, student_hidden: torch.Tensor, student_head: Callable, teacher_hidden: torch.Tensor,
                teacher_head: Callable, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict:
        """Loss of one batch.

        Args:
            student_hidden, teacher_hidden: final hidden states [B, T, H] (after the last norm).
            student_head, teacher_head: the output layers (e.g. `lm_head`), hidden -> logits.
            labels: next-token ids [B, T], IGNORE_INDEX where there is none.
            mask: [B, T], 1 on real tokens (default: all).
        Returns:
            {"loss": weighted sum (with grad), "kd": KD term, "ce": CE term} as float32 scalars.
        """
        labels = labels.flatten()
        mask = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.flatten().float()
        sums = self._sums(_chunk_sums, (student_hidden.flatten(0, 1), teacher_hidden.flatten(0, 1), labels, mask),
                          (student_head, teacher_head, self.temperature))
        return self._reduce(sums, student_hidden.shape[0], labels, mask)

    def forward_cached(self, student_hidden: torch.Tensor, student_head: Callable, topk_ids: torch.Tensor,
                       topk_logprobs: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> dict:
        """`forward` against cached targets: ids [B, T, K], log-probs [B, T, K + 1]; `mask` [B, T]: 1
        where a target exists. The sparse KL_K of the module docstring (temperature 1)."""
        labels, mask = labels.flatten(), mask.flatten().float()
        tokens = (student_hidden.flatten(0, 1), topk_ids.flatten(0, 1), topk_logprobs.flatten(0, 1), labels, mask)
        return self._reduce(self._sums(_cached_chunk_sums, tokens, (student_head,)), student_hidden.shape[0], labels,
                            mask)

    def _reduce(self, sums: torch.Tensor, batch: int, labels: torch.Tensor, mask: torch.Tensor) -> dict:
        kd_den = batch if self.reduction == "batchmean_sequence" else mask.sum().clamp(min=1)
        kd = sums[0] / kd_den
        ce = sums[1] / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return {"loss": self.kd_loss_scale * kd + self.ce_loss_scale * ce, "kd": kd.detach(), "ce": ce.detach()}

    def _sums(self, chunk_sums: Callable, tokens: tuple, args: tuple) -> torch.Tensor:
        """`chunk_sums(*token tensors[chunk], *args, with_kd, with_ce)` summed over token chunks; the
        first token tensor is the student's hidden states [N, H]."""
        # A term with weight 0 is skipped while training; without grad (held-out evaluation) both are
        # computed, so a cross-entropy-only run still reports its held-out KD loss (not 0).
        evaluating = not torch.is_grad_enabled()
        args = (*args, evaluating or self.kd_loss_scale > 0, evaluating or self.ce_loss_scale > 0)
        hidden_s = tokens[0]
        size = self.chunk_size or hidden_s.shape[0]
        recompute = hidden_s.requires_grad and size < hidden_s.shape[0]
        total = None
        for start in range(0, hidden_s.shape[0], size):
            chunk = (*(t[start:start + size] for t in tokens), *args)
            sums = checkpoint(chunk_sums, *chunk, use_reentrant=False) if recompute else chunk_sums(*chunk)
            total = sums if total is None else total + sums
        return total


class DistillStudent(nn.Module):
    """The student LM with its KD loss: `forward` returns the loss dict.

    One module whose forward runs decoder, head and loss, so FSDP / DeepSpeed see every student
    parameter used inside one root forward. The teacher is *not* a submodule: its hidden states and
    head are arguments of each call.
    """

    def __init__(self, lm: nn.Module, loss: KDLoss):
        super().__init__()
        self.lm = lm
        self.loss = loss

    def forward(self, input_ids, attention_mask, teacher_hidden=None, teacher_head=None, topk_ids=None,
                topk_logprobs=None, target_mask=None) -> dict:
        """Online (teacher_hidden, teacher_head) or cached targets (topk_ids, topk_logprobs, target_mask)."""
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        labels = next_token_labels(input_ids, attention_mask)
        head = self.lm.get_output_embeddings()
        if topk_ids is not None:
            return self.loss.forward_cached(hidden, head, topk_ids, topk_logprobs, labels, target_mask)
        return self.loss(hidden, head, teacher_hidden, teacher_head, labels, attention_mask)


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states [B, T, H] of the frozen teacher (no logits: the loss makes them per chunk)."""
    return teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state
