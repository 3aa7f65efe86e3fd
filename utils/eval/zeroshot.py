"""Zero-shot multiple-choice scoring by log-likelihood, as lm-evaluation-harness 0.4 does it.

    scores = evaluate_docs(model, tokenizer, load_task("piqa", limit=200))   # {"acc", "acc_norm", ...}

Encoding (the harness's `_encode_pair`): trailing spaces of the context move to the continuation;
the continuation's tokens are those of tokenize(context + continuation) after the context's tokens;
no BOS is added. The score of a choice is the summed log-probability of its continuation tokens.
acc = argmax of the scores; acc_norm = argmax of score / len(choice string) (characters).

Error bars: `acc_stderr` / `acc_norm_stderr` as the harness computes them (sample standard deviation
of the per-example 0/1 outcomes / sqrt(n) = sqrt(p (1 - p) / (n - 1)), utils/eval/stats.py), and
each example's outcome in `per_example` ({"acc": "0110...", ...}: one character per example, in
task order, compact in the results JSON), so two models on the same examples can be compared paired.

Speed, default (`score_packed`, `batch_tokens` > 0): many examples go through one forward. Each
example is one row laid out as [shared prefix, choice 1's remainder, choice 2's remainder, ...];
a 4D attention mask lets a choice's tokens see the prefix and their own choice only, and position
ids continue from the prefix for every choice, so each token computes what it would in a forward of
its own sequence. Rows are right-padded (pad tokens see only pads; no real token sees them) and
examples are grouped shortest first into forwards of at most `batch_tokens` padded tokens. Logits
(and the log-softmax over the vocabulary) are computed only at the scored positions, from the
decoder's last hidden states and the output embedding. Results equal one forward per choice up to
float rounding (tested against `score_pairs`).

Per example (`score_doc`, batch_tokens=0): the choices of one example share a token prefix (the
whole context for most tasks, the text before the blank for WinoGrande). `score_doc` runs that prefix once, repeats its KV cache for every
choice and scores all the choice remainders in one right-padded batch. Right padding cannot change
a real token's logits (causal attention) and every fake quantizer is per token, so the scores equal
one forward per choice up to float rounding (tested). With per-tensor activation quantization the
scale depends on everything in the forward, so `evaluate_docs` then scores one choice at a time.
`score_pairs` with batch size 1 is the naive reference (one forward per choice, all logits), the
baseline of benchmarks/bench_eval.py.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from quant.errors import UserError
from utils.data.generation import mask_dtype
from utils.eval.stats import mean_stderr
from utils.eval.tasks import MCDoc
from utils.logging import progress_disabled

Pair = tuple[list, list]  # (context token ids, continuation token ids)


def encode_pair(tokenizer, context: str, continuation: str) -> Pair:
    """Token ids of (context, continuation) as the harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:  # the harness conditions an empty context on the BOS (else EOS) token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def encode_doc(tokenizer, doc: MCDoc) -> list[Pair]:
    return [encode_pair(tokenizer, c, t) for c, t in zip(doc.contexts, doc.continuations)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[list], pad_id: int, device) -> torch.Tensor:
    """Right-pad lists of ids into [B, T_max]."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _gather_logprobs(logits: torch.Tensor, targets: list) -> float:
    """Sum of log softmax(logits[i])[targets[i]] for logits [N, V]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    idx = torch.tensor(targets, device=logits.device)
    return logp.gather(-1, idx[:, None]).sum().item()


def _common_prefix(rows: Sequence[list]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


@torch.no_grad()
def score_pairs(model, pairs: Sequence[Pair], batch_size: int = 8, pad_id: int = 0) -> list[float]:
    """Log-likelihood of each continuation, full sequences in right-padded batches (no reuse)."""
    device, scores = _device(model), [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in chunk]
        logits = model(_pad(inputs, pad_id, device), use_cache=False).logits
        for row, i in enumerate(chunk):
            ctx, cont = pairs[i]
            scores[i] = _gather_logprobs(logits[row, len(ctx) - 1 : len(ctx) - 1 + len(cont)], cont)
    return scores


@torch.no_grad()
def score_doc(model, pairs: Sequence[Pair], pad_id: int = 0) -> list[float]:
    """Log-likelihood of each continuation, running the choices' shared token prefix once.

    The prefix p stops at the shortest context, so every continuation starts at or after it: the
    prefix's last logits predict a continuation's first token when the context ends exactly there.
    """
    fulls = [ctx + cont for ctx, cont in pairs]
    p = _shared_prefix(pairs)
    if p == 0:
        return score_pairs(model, pairs, batch_size=len(pairs), pad_id=pad_id)
    device = _device(model)
    out = model(torch.tensor([fulls[0][:p]], device=device), use_cache=True, logits_to_keep=1)
    last, cache = out.logits[0, -1:], out.past_key_values  # last: [1, V] predicts position p
    rests = [full[p:-1] for full in fulls]  # inputs after the prefix; empty for 1-token tails
    rest_logits = None
    if any(rests):
        cache.batch_repeat_interleave(len(pairs))
        rest_logits = model(_pad([r or [pad_id] for r in rests], pad_id, device), past_key_values=cache,
                            use_cache=True).logits
    scores = []
    for i, (ctx, cont) in enumerate(pairs):
        rows = last if rest_logits is None else torch.cat([last, rest_logits[i, : len(rests[i])]])
        start = len(ctx) - p  # row j predicts absolute position p + j
        scores.append(_gather_logprobs(rows[start : start + len(cont)], cont))
    return scores


def _shared_prefix(pairs: Sequence[Pair]) -> int:
    """Length of the token prefix every choice's sequence starts with, cut at the shortest context
    (so that every continuation token is predicted at or after the prefix's last position)."""
    return min(_common_prefix([ctx + cont for ctx, cont in pairs]), min(len(ctx) for ctx, _ in pairs))


def pack_layout(docs_pairs: Sequence[Sequence[Pair]]) -> dict:
    """One packed row for several examples (module docstring): token ids, position ids, the segment
    of every token (example, choice; -1 = the example's prefix) and, per choice, the row indices
    whose next-token logits score its continuation and the continuation's ids."""
    ids, pos, doc_of, seg_of, scored = [], [], [], [], []
    for d, pairs in enumerate(docs_pairs):
        fulls = [ctx + cont for ctx, cont in pairs]
        p = _shared_prefix(pairs)
        start = len(ids)
        ids += fulls[0][:p]
        pos += range(p)
        doc_of += [d] * p
        seg_of += [-1] * p
        doc_scored = []
        for i, (ctx, cont) in enumerate(pairs):
            rest = fulls[i][p:-1]  # inputs after the prefix (the last token is only ever predicted)
            first = len(ids)
            ids += rest
            pos += range(p, p + len(rest))
            doc_of += [d] * len(rest)
            seg_of += [i] * len(rest)
            # absolute position a of a continuation token is predicted at a - 1: the prefix's last
            # token for a - 1 = p - 1, else this choice's rest at index a - 1 - p
            rows = [start + p - 1 if a - 1 < p else first + a - 1 - p for a in range(len(ctx), len(ctx) + len(cont))]
            doc_scored.append((rows, cont))
        scored.append(doc_scored)
    return {"input_ids": ids, "position_ids": pos, "doc": doc_of, "segment": seg_of, "scored": scored}


def _packed_len(pairs: Sequence[Pair]) -> int:
    """Tokens of an example's packed layout: its shared prefix once, then each choice's remainder."""
    p = _shared_prefix(pairs)
    return p + sum(len(ctx) + len(cont) - 1 - p for ctx, cont in pairs)


@torch.no_grad()
def score_packed(model, docs_pairs: Sequence[Sequence[Pair]], pad_id: int = 0) -> list[list[float]]:
    """Log-likelihood of every choice of several examples in one forward (module docstring): one
    right-padded row per example, its layout from `pack_layout`, a [B, 1, T, T] mask (pad tokens see
    only pad tokens, no real token sees them), logits only at the scored positions."""
    device = _device(model)
    lays = [pack_layout([pairs]) for pairs in docs_pairs]
    width = max(len(lay["input_ids"]) for lay in lays)

    def padded(key, fill):
        return torch.tensor([lay[key] + [fill] * (width - len(lay[key])) for lay in lays], device=device)

    doc, seg = padded("doc", -1), padded("segment", -1)  # pads: example -1, "prefix" segment (causal among pads)
    t = torch.arange(width, device=device)
    visible = (doc[:, :, None] == doc[:, None, :]) & (t[None, None, :] <= t[None, :, None])
    visible &= (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])
    dtype = mask_dtype(model.config._attn_implementation or "eager", model.dtype)
    mask = visible if dtype == torch.bool else torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(
        ~visible, torch.finfo(dtype).min)
    hidden = model.get_decoder()(input_ids=padded("input_ids", pad_id), attention_mask=mask[:, None],
                                 position_ids=padded("position_ids", 0), use_cache=False).last_hidden_state
    spots = [(b, r) for b, lay in enumerate(lays) for choice in lay["scored"][0] for r in choice[0]]
    where = {spot: j for j, spot in enumerate(spots)}
    rows = torch.tensor([b for b, _ in spots], device=device), torch.tensor([r for _, r in spots], device=device)
    logits = model.get_output_embeddings()(hidden[rows]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style models cap their logits after the head
        logits = torch.tanh(logits / cap) * cap
    logp = F.log_softmax(logits, dim=-1)
    return [[logp[[where[(b, r)] for r in rs], cont].sum().item() for rs, cont in lay["scored"][0]]
            for b, lay in enumerate(lays)]


def doc_batches(docs_pairs: Sequence[Sequence[Pair]], batch_tokens: int) -> list[list[int]]:
    """Examples grouped into forwards of at most `batch_tokens` padded tokens (rows x the longest
    row), shortest first so that rows of one forward have similar lengths; an example longer than
    the budget forms a group of its own. Returns example indices."""
    lengths = [_packed_len(pairs) for pairs in docs_pairs]
    groups, current, width = [], [], 0
    for d in sorted(range(len(docs_pairs)), key=lengths.__getitem__):
        n = lengths[d]
        if current and (len(current) + 1) * max(width, n) > batch_tokens:
            groups.append(current)
            current, width = [], 0
        current.append(d)
        width = max(width, n)
    return groups + ([current] if current else [])


def doc_metrics(doc: MCDoc, scores: Sequence[float]) -> dict:
    """{"acc": 0/1, "acc_norm": 0/1} of one example (np.argmax: ties go to the first choice)."""
    lengths = np.array([float(len(c)) for c in doc.choices])
    return {"acc": float(np.argmax(scores) == doc.gold),
            "acc_norm": float(np.argmax(np.asarray(scores) / lengths) == doc.gold)}


def _per_tensor_activations(model) -> bool:
    qcfg = model.__dict__.get("llmqat_quant_config")
    return qcfg is not None and qcfg.a_granularity == "per_tensor" and qcfg.a_bits not in (16, 32)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad if pad is not None else 0


def _outcomes(values: list) -> str:
    """Per-example 0/1 outcomes as a string of '0' / '1' characters."""
    return "".join("1" if v else "0" for v in values)


def evaluate_docs(model, tokenizer, docs: Sequence[MCDoc], acc_norm: bool = True, prefix_reuse: bool = True,
                  desc: str = "zero-shot", scores_out: Optional[list] = None, batch_tokens: int = 0) -> dict:
    """acc (and acc_norm) with standard errors, n and per-example outcomes (`per_example`, see the
    module docstring) over `docs`, quantizers as the model has them.

    Args:
        acc_norm: report acc_norm (the harness defines it only for some tasks).
        prefix_reuse: share each example's prefix (`score_doc`); else one batch of full sequences.
        batch_tokens: > 0: pack consecutive examples into forwards of up to this many tokens
            (`score_packed`; needs prefix_reuse and per-token activation quantizers); 0: per example.
        scores_out: if a list, the per-choice log-likelihoods of each doc are appended to it.
    """
    if not docs:
        raise UserError("no examples to evaluate")
    exact_single = _per_tensor_activations(model)
    was_training, pad_id = model.training, _pad_id(tokenizer)
    model.eval()
    per_doc = []
    if batch_tokens > 0 and prefix_reuse and not exact_single:
        encoded, found = [encode_doc(tokenizer, doc) for doc in docs], {}
        with tqdm(total=len(docs), desc=desc, disable=progress_disabled()) as bar:
            for group in doc_batches(encoded, batch_tokens):
                found.update(zip(group, score_packed(model, [encoded[d] for d in group], pad_id)))
                bar.update(len(group))
        for d, doc in enumerate(docs):
            if scores_out is not None:
                scores_out.append(found[d])
            per_doc.append(doc_metrics(doc, found[d]))
    for doc in () if per_doc else tqdm(docs, desc=desc, disable=progress_disabled()):
        pairs = encode_doc(tokenizer, doc)
        if exact_single:
            scores = score_pairs(model, pairs, batch_size=1, pad_id=pad_id)
        elif prefix_reuse:
            scores = score_doc(model, pairs, pad_id)
        else:
            scores = score_pairs(model, pairs, batch_size=len(pairs), pad_id=pad_id)
        if scores_out is not None:
            scores_out.append(scores)
        per_doc.append(doc_metrics(doc, scores))
    model.train(was_training)
    keys = ("acc", "acc_norm") if acc_norm else ("acc",)
    result = {k: float(np.mean([m[k] for m in per_doc])) for k in keys}
    result.update({f"{k}_stderr": mean_stderr([m[k] for m in per_doc]) for k in keys})
    result["n"] = len(per_doc)
    result["per_example"] = {k: _outcomes([m[k] for m in per_doc]) for k in keys}
    return result
