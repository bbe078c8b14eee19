"""Attention: KV caches agree with full recomputation; MLA's scale and cache size."""

import pytest
import torch

from moe.attention import MHA, MLA
from moe.config import ModelConfig
from moe.rope import apply_rope, rope_tables


def mla_cfg(**kw):
    base = dict(dim=32, n_heads=4, attn="mla", q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=6, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def randomise(mod, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
    return mod


def run_cached(attn, x, cos, sin, prefill: int):
    """Prefill `prefill` positions at once, then one position at a time."""
    B, S, _ = x.shape
    cache = attn.new_cache(B, S)
    outs = [attn(x[:, :prefill], cos[:prefill], sin[:prefill], cache, 0)]
    for i in range(prefill, S):
        outs.append(attn(x[:, i:i + 1], cos[i:i + 1], sin[i:i + 1], cache, i))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("q_lora_rank", [0, 12])
@pytest.mark.parametrize("prefill", [1, 7])
def test_mla_cached_absorbed_decode_equals_naive_forward(q_lora_rank, prefill):
    cfg = mla_cfg(q_lora_rank=q_lora_rank)
    attn = randomise(MLA(cfg))
    cos, sin = rope_tables(cfg.qk_rope_head_dim, 64, cfg.rope_theta)
    x = torch.randn(2, 20, 32)
    full = attn(x, cos[:20], sin[:20])
    inc, cache = run_cached(attn, x, cos, sin, prefill)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)
    # the cache holds only the latent and the shared rope key: kv_lora_rank + qk_rope_head_dim per token
    assert set(cache) == {"kv", "pe"}
    assert cache["kv"].shape[-1] + cache["pe"].shape[-1] == 16 + 4


def test_mla_softmax_scale_is_per_head_qk_width():
    """Hand-written MLA at 24 positions: a wrong scale (e.g. latent size) would not match."""
    cfg = mla_cfg()
    attn = randomise(MLA(cfg), std=0.5)
    S, H, N, R, V = 24, 4, 8, 4, 6
    cos, sin = rope_tables(R, 64, cfg.rope_theta)
    x = torch.randn(1, S, 32)
    q = attn.wq(x).view(1, S, H, N + R)
    q_nope, q_pe = q[..., :N], apply_rope(q[..., N:], cos[:S], sin[:S])
    kv, k_pe = attn.wkv_a(x).split([16, R], dim=-1)
    kv = attn.kv_norm(kv)
    k_pe = apply_rope(k_pe[:, :, None], cos[:S], sin[:S])[:, :, 0]
    kvb = attn.wkv_b(kv).view(1, S, H, N + V)
    k_nope, v = kvb[..., :N], kvb[..., N:]
    scores = (torch.einsum("bshn,bthn->bhst", q_nope, k_nope)
              + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) / (N + R) ** 0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhst,bthv->bshv", scores.softmax(-1), v).reshape(1, S, H * V)
    expected = attn.wo(out)
    torch.testing.assert_close(attn(x, cos[:S], sin[:S]), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run_cached(attn, x, cos, sin, 1)[0], expected, rtol=1e-4, atol=1e-5)
    assert attn.softmax_scale == pytest.approx((N + R) ** -0.5)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_mha_gqa_cache_equals_full_forward(n_kv_heads):
    cfg = ModelConfig(dim=32, n_heads=4, attn="mha", n_kv_heads=n_kv_heads, head_dim=6, max_seq_len=64)
    attn = randomise(MHA(cfg))
    cos, sin = rope_tables(6, 64, cfg.rope_theta)
    x = torch.randn(2, 15, 32)
    full = attn(x, cos[:15], sin[:15])
    inc, cache = run_cached(attn, x, cos, sin, prefill=5)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)
    assert cache["k"].shape == (2, 15, n_kv_heads, 6)


def test_gqa_shares_kv_heads_across_query_groups():
    """GQA with 1 kv head equals MHA whose 4 kv heads are copies of it."""
    gqa = randomise(MHA(ModelConfig(dim=16, n_heads=4, attn="mha", n_kv_heads=1)))
    mha = MHA(ModelConfig(dim=16, n_heads=4, attn="mha"))
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        mha.wk.weight.copy_(gqa.wk.weight.repeat(4, 1))
        mha.wv.weight.copy_(gqa.wv.weight.repeat(4, 1))
    cos, sin = rope_tables(4, 16, 10000.0)
    x = torch.randn(1, 9, 16)
    torch.testing.assert_close(gqa(x, cos[:9], sin[:9]), mha(x, cos[:9], sin[:9]))


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
