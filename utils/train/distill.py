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
    terms = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros((), device=p_t.device))
    return terms.sum(-1) * temperature**2


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
        batch = student_hidden.shape[0]
        hidden_s = student_hidden.flatten(0, 1)  # [N, H]
        hidden_t = teacher_hidden.flatten(0, 1)
        labels = labels.flatten()
        mask = torch.ones_like(labels, dtype=torch.float32) if mask is None else mask.flatten().float()
        sums = self._sums(hidden_s, hidden_t, labels, mask, student_head, teacher_head)
        kd_den = batch if self.reduction == "batchmean_sequence" else mask.sum().clamp(min=1)
        kd = sums[0] / kd_den
        ce = sums[1] / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return {"loss": self.kd_loss_scale * kd + self.ce_loss_scale * ce, "kd": kd.detach(), "ce": ce.detach()}

    def _sums(self, hidden_s, hidden_t, labels, mask, student_head, teacher_head) -> torch.Tensor:
        # A term with weight 0 is skipped while training; without grad (held-out evaluation) both are
        # computed, so a cross-entropy-only run still reports its held-out KD loss (not 0).
        evaluating = not torch.is_grad_enabled()
        args = (student_head, teacher_head, self.temperature, evaluating or self.kd_loss_scale > 0,
                evaluating or self.ce_loss_scale > 0)
        size = self.chunk_size or hidden_s.shape[0]
        recompute = hidden_s.requires_grad and size < hidden_s.shape[0]
        total = None
        for start in range(0, hidden_s.shape[0], size):
            piece = slice(start, start + size)
            chunk = (hidden_s[piece], hidden_t[piece], labels[piece], mask[piece], *args)
            sums = checkpoint(_chunk_sums, *chunk, use_reentrant=False) if recompute else _chunk_sums(*chunk)
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

    def forward(self, input_ids, attention_mask, teacher_hidden, teacher_head) -> dict:
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        labels = next_token_labels(input_ids, attention_mask)
        return self.loss(hidden, self.lm.get_output_embeddings(), teacher_hidden, teacher_head, labels,
                         attention_mask)


@torch.no_grad()
def teacher_hidden_states(teacher: nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """Final hidden states [B, T, H] of the frozen teacher (no logits: the loss makes them per chunk)."""
    return teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False).last_hidden_state
