"""Batched self-generation on a tiny random Llama: greedy prefix = argmax of a plain forward (under
eager and sdpa attention, with refills), sampling = HF's warpers, records independent of the batch,
no id past the tokenizer, start-id orders (walk / random) and shard coverage, shard-file repair and
resume checks (settings, model and tokenizer).

    PYTHONPATH=. python -m pytest -q tests/utils/data/test_generation.py
"""

import json

import pytest
import torch

from quant.errors import UserError
from recipes.generate import shard_jobs, skipped_ids, start_order
from tests.conftest import make_byte_tokenizer, make_tiny_llama
from utils.data.generation import Sampling, generate_sequences, mask_dtype, sample_next
from utils.data.shards import check_meta, done_keys, read_meta, repair_shard
from utils.io import JsonlError

VOCAB = 272


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine run ~10x faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0, vocab_size=VOCAB)


def _generate(model, jobs, batch_size, max_length=24, eos=(2,), sampling=Sampling(1.0, 50, 1.0)):
    seqs = generate_sequences(model, jobs, max_length=max_length, batch_size=batch_size, seed=7, eos_ids=eos,
                              sampling=sampling)
    return {(s["start_id"], s["greedy_len"]): s for s in seqs}


def test_greedy_prefix_is_argmax_and_samples_lie_in_top_k(model):
    jobs = [(i, j) for j in (3, 4, 5) for i in range(10, 16)]
    out = _generate(model, jobs, batch_size=4, sampling=Sampling(1.0, 5, 1.0))
    for (start, greedy_len), seq in out.items():
        ids = seq["token_ids"]
        assert ids[0] == start
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0]  # row t predicts token t + 1
        for t in range(1, len(ids)):
            if t < greedy_len:
                assert ids[t] == int(logits[t - 1].argmax()), (start, greedy_len, t)
            else:
                assert ids[t] in logits[t - 1].topk(5).indices.tolist(), (start, greedy_len, t)


def _plain_greedy(model, start, max_length, eos):
    """The reference: a full forward over the whole prefix per token, no cache, no batch."""
    ids = [start]
    with torch.no_grad():
        while len(ids) < max_length and not (len(ids) > 1 and ids[-1] in eos):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batched_decoder_with_refills_equals_plain_greedy_decode(attn):
    """Rows end at different steps (many EOS ids), so refilled rows sit beside longer ones whose cache
    slots they must not see (eager attention added a bool mask instead of masking: stale slots leaked)."""
    model = make_tiny_llama(seed=0, vocab_size=VOCAB, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    eos, max_length = set(range(100, 130)), 24
    jobs = [(i, max_length) for i in range(3, 40)]  # greedy_len = max_length: every token is the argmax
    out = _generate(model, jobs, batch_size=4, max_length=max_length, eos=eos)
    lengths = {len(s["token_ids"]) for s in out.values()}
    assert len(lengths) > 5, "rows must finish at different steps for refills to matter"
    for start, _ in jobs:
        assert out[(start, max_length)]["token_ids"] == _plain_greedy(model, start, max_length, eos), start


def test_an_attention_without_a_4d_mask_is_refused(model):
    assert mask_dtype("sdpa", torch.bfloat16) == torch.bool and mask_dtype("eager", torch.bfloat16) == torch.bfloat16
    for name in ("flash_attention_2", "flex_attention", "paged|eager"):
        with pytest.raises(UserError, match=f"attn_implementation={name}"):
            mask_dtype(name, torch.float32)
    flash = make_tiny_llama(seed=0, vocab_size=VOCAB)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="eager or attn_implementation=sdpa"):
        _generate(flash, [(5, 3)], batch_size=1)


def test_no_id_past_the_vocab_limit():
    """A padded vocabulary: the 16 logits past the tokenizer are the largest; none may be emitted."""
    model = make_tiny_llama(seed=0, vocab_size=VOCAB)
    with torch.no_grad():
        model.lm_head.weight[VOCAB - 16:] = model.lm_head.weight[:VOCAB - 16].abs().max() * 50
    jobs = [(i, j) for j in (3, 24) for i in range(3, 15)]
    unlimited = _generate(model, jobs, batch_size=4)
    assert any(t >= VOCAB - 16 for s in unlimited.values() for t in s["token_ids"])
    seqs = generate_sequences(model, jobs, max_length=24, batch_size=4, seed=7, eos_ids=(2,),
                              sampling=Sampling(1.0, 50, 1.0), vocab_limit=VOCAB - 16)
    assert all(t < VOCAB - 16 for s in seqs for t in s["token_ids"])


def test_records_do_not_depend_on_batch_size(model):
    jobs = [(i, j) for j in (3, 5) for i in range(30, 42)]
    reference = _generate(model, jobs, batch_size=1)
    for batch_size in (3, 8, 64):
        assert _generate(model, jobs, batch_size) == reference
    assert len({tuple(s["token_ids"]) for s in reference.values()}) == len(jobs)  # sampling differs per record


def test_eos_ends_a_row_and_the_row_is_refilled(model):
    eos = list(range(100, 115))  # ~1 in 18 tokens ends a sequence: rows finish early and are refilled
    jobs = [(i, 3) for i in range(3, 40)]
    out = _generate(model, jobs, batch_size=4, eos=eos)
    assert set(out) == set(jobs)
    for seq in out.values():
        ids = seq["token_ids"]
        assert seq["finish"] == ("eos" if ids[-1] in eos else "length")
        assert not any(t in eos for t in ids[1:-1]) and len(ids) <= 24
    assert any(s["finish"] == "eos" for s in out.values()) and any(len(s["token_ids"]) == 24 for s in out.values())


def _warped_probs(logits, sampling):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits.clone())
    scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("sampling", [Sampling(1.0, 50, 1.0), Sampling(0.7, 10, 1.0), Sampling(1.3, 0, 0.8)])
def test_sampling_matches_hf_warpers(sampling):
    """Evenly spaced uniforms give each token a count of exactly N * p (+-1) under inverse-CDF sampling."""
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(1)) * 3
    n = 20000
    uniforms = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = sample_next(logits.expand(n, -1), torch.zeros(n, dtype=torch.bool), uniforms, sampling)
    counts = torch.bincount(tokens, minlength=300).double()
    expected = _warped_probs(logits, Sampling(sampling.temperature, sampling.top_k or 300, sampling.top_p))[0] * n
    assert (counts - expected.double()).abs().max() <= 1.5


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(6, 50)
    greedy = torch.tensor([True, False] * 3)
    out = sample_next(logits, greedy, torch.rand(6), Sampling(1.0, 50, 1.0))
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])


def test_shard_jobs_cover_the_slice_minus_special_tokens():
    tok = make_byte_tokenizer()
    skip = skipped_ids(tok)
    assert {0, 1, 2} <= skip
    jobs = shard_jobs(0, 10, [3, 4, 5], len(tok), skip, "walk", 0)
    assert jobs == [(i, j) for j in (3, 4, 5) for i in range(3, 10)]
    last = shard_jobs(25, 10, [3], len(tok), skip, "walk", 0)  # 259 ids: the last shard is short
    assert last == [(i, 3) for i in range(250, 259)]
    with pytest.raises(ValueError, match="past the vocabulary"):
        shard_jobs(26, 10, [3], len(tok), skip, "walk", 0)


def _shard_ids(shard, n_vocab, seed, vocab=259, skip=frozenset({0, 1, 2})):
    return [i for i, _ in shard_jobs(shard, n_vocab, [3], vocab, set(skip), "random", seed)]


def test_random_start_ids_partition_the_usable_vocabulary():
    usable = set(range(3, 259))
    shards = [_shard_ids(s, 40, seed=0) for s in range(7)]  # 7 x 40 >= 256 usable ids: all covered once
    assert sorted(i for ids in shards for i in ids) == sorted(usable)
    assert [len(ids) for ids in shards] == [40] * 6 + [16]
    assert shards[0] == _shard_ids(0, 40, seed=0) != _shard_ids(0, 40, seed=1)  # seeded, the same every call
    assert start_order(259, {0, 1, 2}, "random", 0)[:40] == shards[0]
    with pytest.raises(UserError, match="past the vocabulary"):
        _shard_ids(7, 40, seed=0)


def test_few_random_start_ids_spread_over_the_vocabulary():
    """2 shards x 20 ids of 256: a random subset, not the first 40 ids (the walk takes ids 3-39)."""
    ids = _shard_ids(0, 20, seed=0) + _shard_ids(1, 20, seed=0)
    assert len(set(ids)) == 40 and not set(ids) & {0, 1, 2}
    assert sum(i >= 130 for i in ids) >= 10 and sum(i < 130 for i in ids) >= 10
    walk = [i for i, _ in shard_jobs(0, 40, [3], 259, {0, 1, 2}, "walk", 0)]
    assert walk == list(range(3, 40))


def _write_lines(path, records, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_repair_cuts_a_partial_last_line_only(tmp_path):
    path = tmp_path / "gen.chunk.00.jsonl"
    good = [{"text": "a", "token_ids": [5, 6], "start_id": 5, "greedy_len": 3}]
    _write_lines(path, good, tail=b'{"text": "half a rec')
    assert repair_shard(path) == len(b'{"text": "half a rec')
    assert [json.loads(x) for x in path.read_text().splitlines()] == good
    assert repair_shard(path) == 0 and done_keys(path) == {(5, 3)}
    path.write_bytes(b'{"text": "no newline at all')
    assert repair_shard(path) > 0 and path.read_bytes() == b""


def test_a_malformed_complete_line_is_an_error_with_file_and_line(tmp_path):
    path = tmp_path / "gen.chunk.00.jsonl"
    path.write_text('{"text": "a", "token_ids": [1], "start_id": 5, "greedy_len": 3}\nnot json\n')
    with pytest.raises(JsonlError, match=r"gen.chunk.00.jsonl:2"):
        done_keys(path)
    path.write_text('{"text": "a", "token_ids": [1]}\n')
    with pytest.raises(JsonlError, match=r":1: record without integer start_id"):
        done_keys(path)


def test_resume_refuses_records_made_with_other_settings(tmp_path):
    path = tmp_path / "gen.chunk.00.jsonl"
    check_meta(path, {"seed": 0, "max_length": 64}, has_records=False)
    check_meta(path, {"seed": 0, "max_length": 64}, has_records=True)
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        check_meta(path, {"seed": 1, "max_length": 64}, has_records=True)
    check_meta(path, {"seed": 1, "max_length": 64}, has_records=False)  # an empty shard may start over


def _prov(model="files:aaaa", tokenizer="tok:1111"):
    return {"config": {"seed": 0}, "inputs": {"model": model}, "tokenizer": tokenizer, "code": {"commit": "x"}}


def test_resume_refuses_records_from_another_model_or_tokenizer(tmp_path):
    path, settings = tmp_path / "gen.chunk.00.jsonl", {"seed": 0}
    check_meta(path, settings, has_records=False, provenance=_prov(), n_expected=3)
    assert read_meta(path)["provenance"]["inputs"]["model"] == "files:aaaa"
    assert read_meta(path)["provenance"]["tokenizer"] == "tok:1111" and read_meta(path)["n_expected"] == 3
    other_code = {**_prov(), "code": {"commit": "y"}}
    check_meta(path, settings, has_records=True, provenance=other_code)  # another commit: resumed
    with pytest.raises(UserError, match=r"inputs.model: 'files:aaaa' -> 'files:bbbb'.*new out_dir"):
        check_meta(path, settings, has_records=True, provenance=_prov(model="files:bbbb"))
    with pytest.raises(UserError, match=r"tokenizer: 'tok:1111' -> 'tok:2222'"):
        check_meta(path, settings, has_records=True, provenance=_prov(tokenizer="tok:2222"))
