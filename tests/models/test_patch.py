"""quantize_model on a stock HF Llama: identity at 16 bits, W4A8KV8 against an independent
re-implementation of the original LLM-QAT forward, GQA, KV placement, cache consistency."""

import math

import pytest
import torch
from torch.nn import functional as F

import models
from quant import QuantConfig, QuantLinear
from quant.errors import UserError
from tests.conftest import make_tiny_llama

TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def ids(batch=2, length=12, vocab=256, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_position", ["pre_rope", "post_rope"])
def test_16_bits_is_bit_exact(attn, kv_position):
    model = make_tiny_llama()
    model.set_attn_implementation(attn)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        models.quantize_model(model, QuantConfig(kv_position=kv_position))
        assert torch.equal(model(x).logits, ref)


def test_only_decoder_linears_are_swapped():
    model = make_tiny_llama()
    models.quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8))
    swapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert swapped == TARGETS
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * 2
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_requantize_and_dequantize_restore_stock():
    model = make_tiny_llama()
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        models.quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_position="post_rope"))
        q4 = model(x).logits
        models.quantize_model(model, QuantConfig(w_bits=8))  # replaces, does not stack
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        models.dequantize_model(model)
        assert torch.equal(model(x).logits, ref)
        assert not torch.equal(q4, ref)


# ---- independent re-implementation of the original LLM-QAT forward (float64, eager) ----

def _sym(x, bits):
    """SymQuantizer of the original code, per last-dim slice, spec formula (no epsilons)."""
    if bits >= 16:
        return x
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def _qlinear(x, w, w_bits, a_bits):
    return _sym(x, a_bits) @ _sym(w, w_bits).T


def _rope(x, pos, theta, dim):
    # cos / sin in float32 as HF computes them, so both sides rotate by the same numbers
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().double(), torch.cat([ang, ang], -1).sin().double()
    x1, x2 = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rms(x, w, eps):
    x32 = x.float()  # HF's RMSNorm normalizes in float32 whatever the model dtype
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).double()


def original_forward(model, input_ids, w_bits, a_bits, kv_bits):
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    B, T = input_ids.shape
    h = sd["model.embed_tokens.weight"][input_ids]
    pos = torch.arange(T)
    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = _qlinear(x, sd[p + "self_attn.q_proj.weight"], w_bits, a_bits)
        k = _sym(_qlinear(x, sd[p + "self_attn.k_proj.weight"], w_bits, a_bits), kv_bits)  # all KV heads, pre-RoPE
        v = _sym(_qlinear(x, sd[p + "self_attn.v_proj.weight"], w_bits, a_bits), kv_bits)
        q = _rope(q.view(B, T, H, D).transpose(1, 2), pos, cfg.rope_parameters["rope_theta"], D)
        k = _rope(k.view(B, T, KV, D).transpose(1, 2), pos, cfg.rope_parameters["rope_theta"], D)
        v = v.view(B, T, KV, D).transpose(1, 2)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        scores = q @ k.transpose(-1, -2) * D**-0.5 + mask
        att = torch.softmax(scores, -1, dtype=torch.float32).double() @ v  # float32 softmax, as HF
        h = h + _qlinear(att.transpose(1, 2).reshape(B, T, H * D), sd[p + "self_attn.o_proj.weight"], w_bits, a_bits)
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        g = _qlinear(x, sd[p + "mlp.gate_proj.weight"], w_bits, a_bits)
        u = _qlinear(x, sd[p + "mlp.up_proj.weight"], w_bits, a_bits)
        h = h + _qlinear(F.silu(g) * u, sd[p + "mlp.down_proj.weight"], w_bits, a_bits)
    return _rms(h, sd["model.norm.weight"], cfg.rms_norm_eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("bits", [(4, 8, 8), (8, 8, 4), (3, 6, 16)])
def test_w4a8kv8_matches_original_forward(bits):
    model = make_tiny_llama(dtype=torch.float64)
    model.set_attn_implementation("eager")
    x = ids()
    ref = original_forward(model, x, *bits)
    w, a, kv = bits
    models.quantize_model(model, QuantConfig(w_bits=w, a_bits=a, kv_bits=kv if kv < 16 else 16))
    with torch.no_grad():
        out = model(x).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_gqa_kv_scale_is_per_token_over_all_kv_heads():
    model = make_tiny_llama()  # 4 query heads, 2 KV heads, head_dim 16
    models.quantize_model(model, QuantConfig(kv_bits=3))
    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        model(ids())
    k = seen[0]  # [B, T, KV * D]
    assert k.shape[-1] == 2 * 16
    for row in k.reshape(-1, 32):  # one grid across both heads: <= 7 levels, max reproduced
        assert row.unique().numel() <= 7
    per_head = QuantConfig(kv_bits=3, kv_granularity="per_head")
    models.quantize_model(model, per_head)
    assert model.model.layers[0].self_attn.k_proj.output_quantizer.spec.group_size == 16


def test_post_rope_quantizes_rotated_keys():
    model = make_tiny_llama()
    x = ids()
    models.quantize_model(model, QuantConfig(kv_bits=4, kv_position="post_rope"))
    assert model.config._attn_implementation.startswith("llmqat_kv_")
    attn = model.model.layers[0].self_attn
    captured = []
    orig = attn.k_quantizer.forward
    attn.k_quantizer.forward = lambda t: captured.append(orig(t)) or captured[-1]
    with torch.no_grad():
        post = model(x).logits
        models.quantize_model(model, QuantConfig(kv_bits=4, kv_position="pre_rope"))
        pre = model(x).logits
    k = captured[0]  # [B, T, KV * D] after RoPE, quantized
    assert all(row.unique().numel() <= 15 for row in k.reshape(-1, k.shape[-1]))
    assert not torch.equal(pre, post)


@pytest.mark.parametrize("kv_position", ["pre_rope", "post_rope"])
def test_cached_decoding_matches_full_forward(kv_position):
    """Per-token quantizers make incremental decoding with a KV cache equal to a full forward."""
    model = make_tiny_llama()
    models.quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_position=kv_position))
    x = ids(batch=1, length=10)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :6], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(6, 10):
            out = model(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_gradients_flow_to_all_quantized_weights():
    model = make_tiny_llama().train()
    models.quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8))
    model(ids(), labels=ids()).loss.backward()
    for name, p in model.named_parameters():
        if any(t in name for t in TARGETS):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_same_projection_names_work(arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cls, cfg_cls = {"mistral": (MistralForCausalLM, MistralConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[arch]
    torch.manual_seed(0)
    model = cls(cfg_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)).eval()
    x = ids(vocab=128)
    with torch.no_grad():
        ref = model(x).logits
        models.quantize_model(model, QuantConfig())
        assert torch.equal(model(x).logits, ref)
        models.quantize_model(model, QuantConfig(w_bits=4, a_bits=8, kv_bits=8, kv_position="post_rope"))
        assert torch.isfinite(model(x).logits).all()
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14


def test_group_size_error_names_the_problem():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="does not divide"):
        models.quantize_model(model, QuantConfig(w_bits=4, w_granularity="per_group", w_group_size=48))


# ---- strict coverage, fused projections (Phi-3) ----

PHI_KW = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
              max_position_embeddings=256, rms_norm_eps=1e-5)


def make_tiny_phi3(dtype=torch.float64):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(**PHI_KW)).eval().to(dtype)


def llama_twin_of(phi):
    """A Llama with the Phi-3's weights, its fused qkv_proj / gate_up_proj split into the parts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(**PHI_KW)).eval().to(phi.dtype)
    state = {}
    for key, value in phi.state_dict().items():
        if "qkv_proj" in key:
            for part, w in zip(("q_proj", "k_proj", "v_proj"), value.split([64, 32, 32])):
                state[key.replace("qkv_proj", part)] = w
        elif "gate_up_proj" in key:
            for part, w in zip(("gate_proj", "up_proj"), value.chunk(2)):
                state[key.replace("gate_up_proj", part)] = w
        else:
            state[key] = value
    llama.load_state_dict(state, strict=True)
    return llama


@pytest.mark.parametrize("kv_position", ["pre_rope", "post_rope"])
@pytest.mark.parametrize("kv_granularity", ["per_token", "per_head"])
def test_fused_phi3_equals_its_split_llama_twin(kv_position, kv_granularity):
    """Fused qkv_proj / gate_up_proj are quantized as their parts would be, K/V slices included."""
    phi = make_tiny_phi3()
    llama = llama_twin_of(phi)
    qcfg = QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_position=kv_position, kv_granularity=kv_granularity)
    x = ids(vocab=128)
    with torch.no_grad():
        models.quantize_model(phi, qcfg)
        models.quantize_model(llama, qcfg)
        assert torch.equal(phi(x).logits, llama(x).logits)
        models.quantize_model(phi, QuantConfig(kv_position=kv_position))
        assert torch.equal(phi(x).logits, models.dequantize_model(llama)(x).logits)  # 16 bits: identity
    assert models.patch.quant_coverage(phi) == {"linears": [0, 8], "kv_layers": [0, 2]}


def test_phi3_coverage_is_complete():
    phi = make_tiny_phi3(torch.float32)
    models.quantize_model(phi, QuantConfig(w_bits=4, a_bits=8, kv_bits=4))
    assert sum(isinstance(m, QuantLinear) for m in phi.modules()) == 8  # was 4 of 8: o_proj, down_proj only
    assert models.patch.quant_coverage(phi) == {"linears": [8, 8], "kv_layers": [2, 2]}
    models.quantize_model(phi, QuantConfig(w_bits=4, a_bits=8, kv_bits=4, kv_position="post_rope"))
    assert models.patch.quant_coverage(phi) == {"linears": [8, 8], "kv_layers": [2, 2]}


@pytest.mark.parametrize("make,qcfg,match", [
    (make_tiny_llama, QuantConfig(w_bits=4, targets=[*TARGETS, "dense"]), r"model\.layers\.0 has no dense"),
    (make_tiny_llama, QuantConfig(kv_bits=4, targets=["q_proj", "o_proj"]), r"K/V would not be quantized"),
    (make_tiny_phi3, QuantConfig(kv_bits=4, targets=["o_proj", "down_proj"]), r"qkv_proj.*targets="),
    (make_tiny_phi3, QuantConfig(w_bits=4, targets=["q_proj", "o_proj"]), r"q_proj is fused into qkv_proj"),
    (make_tiny_phi3, QuantConfig(w_bits=4, w_granularity="per_tensor"), r"per_tensor"),
])
def test_incomplete_quantization_is_refused(make, qcfg, match):
    model = make()
    with pytest.raises(UserError, match=match):
        models.quantize_model(model, qcfg)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # refused before any swap


def test_targets_override_reaches_other_names():
    model = make_tiny_phi3(torch.float32)
    models.quantize_model(model, QuantConfig(w_bits=4, targets=["qkv_proj", "o_proj"]))
    assert models.patch.quant_coverage(model) == {"linears": [4, 8], "kv_layers": [0, 2]}
