"""Transformer: parameter count, errors, init, overfitting, caches, MTP, compile, GPU."""

import re

import pytest
import torch
import torch.nn.functional as F

from moe.balance import update_bias
from moe.config import PRESETS, ModelConfig
from moe.layer import MoE, reset_routing_stats, routing_stats
from moe.model import Transformer

TOY = PRESETS["toy"]
SMALL = TOY.replace(dim=32, n_layers=3, n_heads=2, max_seq_len=48, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=8, inter_dim=64, moe_inter_dim=16)


def expected_params(c: ModelConfig) -> int:
    """Parameters written out from the config by hand (the accounting module is tested separately)."""
    D, H = c.dim, c.n_heads
    if c.attn == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        q = D * H * qk if c.q_lora_rank == 0 else D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk
        attn = (q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
                + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D)
    else:
        hd, kv = c.mha_head_dim, c.kv_heads
        attn = 2 * D * H * hd + 2 * D * kv * hd
    dense_ffn = 3 * D * c.inter_dim
    moe_ffn = (c.n_routed_experts * D  # router
               + c.n_routed_experts * 3 * D * c.moe_inter_dim  # routed experts
               + c.n_shared_experts * 3 * D * c.moe_inter_dim)  # shared experts
    block = lambda moe: 2 * D + attn + (moe_ffn if moe else dense_ffn)
    total = c.vocab_size * D * (1 if c.tie_embeddings else 2) + D  # embedding, head, final norm
    total += c.n_dense_layers * block(False) + c.n_moe_layers * block(True)
    mtp = c.n_mtp * (3 * D + 2 * D * D + block(c.n_moe_layers > 0))
    return total + mtp


@pytest.mark.parametrize("cfg", [
    TOY, TOY.replace(tie_embeddings=True), TOY.replace(q_lora_rank=32, n_mtp=2),
    TOY.replace(attn="mha", n_kv_heads=2), TOY.replace(n_dense_layers=0, n_shared_experts=2),
])
def test_param_count_equals_config_sum(cfg):
    model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected_params(cfg)


def test_big_presets_build_on_meta_without_allocating():
    with torch.device("meta"):
        v3 = Transformer(PRESETS["deepseek-v3"])
    assert all(p.is_meta for p in v3.parameters())
    n = sum(p.numel() for p in v3.parameters())
    assert n == expected_params(PRESETS["deepseek-v3"])
    assert 680e9 < n < 686e9  # 671B main model + the MTP module


def test_bad_inputs_fail_clearly():
    model = Transformer(SMALL)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=256\).*300"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="-1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exceeds max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(1), start_pos=47)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0), (0, 0)])
def test_an_empty_batch_is_a_clear_error(shape):
    model = Transformer(SMALL)
    with pytest.raises(ValueError, match=re.escape(f"at least one sequence of at least one token, got shape {shape}")):
        model(torch.zeros(shape, dtype=torch.long))


def test_a_negative_start_pos_is_a_clear_error():
    model = Transformer(SMALL)
    with pytest.raises(ValueError, match="start_pos must be >= 0"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(1), start_pos=-1)


def test_init_has_random_routers_and_experts():
    model = Transformer(TOY)
    for m in model.modules():
        if isinstance(m, MoE):
            assert m.router.weight.std() > 0.01
            for w in (m.experts.w1, m.experts.w2, m.experts.w3):
                assert torch.isfinite(w).all() and w.std() > 1e-3
    assert torch.isfinite(Transformer(TOY)(torch.randint(0, 256, (1, 8)))[0]).all()


def test_loss_decreases_on_a_tiny_overfit_batch():
    torch.manual_seed(0)
    cfg = SMALL.replace(seq_aux_loss_alpha=1e-3, aux_loss_alpha=1e-2, z_loss_coef=1e-4, n_mtp=1)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (4, 33))
    first = None
    for _ in range(40):
        _, losses = model(data[:, :-1], data[:, 1:])
        assert {"loss", "ce", "aux", "seq_aux", "z", "mtp"} <= set(losses)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        update_bias(model)
        reset_routing_stats(model)
        first = first if first is not None else losses["ce"].item()
    assert losses["ce"].item() < 0.5 * first
    assert any(abs(v) > 0 for m in model.modules() if isinstance(m, MoE) for v in m.router.bias.tolist())


def test_total_loss_is_ce_plus_terms():
    model = Transformer(SMALL.replace(aux_loss_alpha=0.01, n_mtp=1))
    data = torch.randint(0, 256, (2, 17))
    _, losses = model(data[:, :-1], data[:, 1:])
    torch.testing.assert_close(losses["loss"], losses["ce"] + losses["aux"] + losses["seq_aux"] + losses["mtp"])


def test_mtp_depth1_loss_by_hand():
    torch.manual_seed(0)
    model = Transformer(SMALL.replace(n_mtp=1, seq_aux_loss_alpha=0.0, mtp_loss_weight=0.5)).eval()
    tokens = torch.randint(0, 256, (2, 12))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    S = inp.shape[1]
    h = model.embed(inp)
    cos, sin = model.rope_cos[:S], model.rope_sin[:S]
    for blk in model.layers:
        h, _ = blk(h, cos, sin)
    mod = model.mtp[0]
    # position i combines h_i with the embedding of t_{i+1} and predicts t_{i+2}
    h1, _ = mod(h[:, :S - 1], model.embed(tokens[:, 1:S]), cos[:S - 1], sin[:S - 1])
    ce = F.cross_entropy(model.head(mod.norm(h1)).flatten(0, 1), tokens[:, 2:].flatten())
    _, losses = model(inp, tgt)
    torch.testing.assert_close(losses["mtp"], 0.5 * ce)


def _main_hidden(model: Transformer, inp: torch.Tensor):
    """The last block's output (before the final norm), with the rope tables of its positions."""
    S = inp.shape[1]
    cos, sin = model.rope_cos[:S], model.rope_sin[:S]
    h = model.embed(inp)
    for blk in model.layers:
        h, _ = blk(h, cos, sin)
    return h, cos, sin


def test_mtp_loss_uses_each_modules_own_final_norm():
    """Head(RMSNorm_k(h^k)) with module k's own norm (shared_head.norm in DeepSeek's checkpoint).
    At init every norm weight is 1, so the by-hand test above cannot tell the norms apart: here
    they differ, and the main model's final norm, or none, gives another loss."""
    torch.manual_seed(0)
    model = Transformer(SMALL.replace(n_mtp=1, seq_aux_loss_alpha=0.0, mtp_loss_weight=1.0)).eval()
    mod = model.mtp[0]
    with torch.no_grad():
        mod.norm.weight.uniform_(0.5, 2.0)
        model.norm.weight.uniform_(0.5, 2.0)
    tokens = torch.randint(0, 256, (2, 12))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    S = inp.shape[1]
    h, cos, sin = _main_hidden(model, inp)
    with torch.no_grad():
        h1, _ = mod(h[:, :S - 1], model.embed(tokens[:, 1:S]), cos[:S - 1], sin[:S - 1])
        ce = lambda x: F.cross_entropy(model.head(x).flatten(0, 1), tokens[:, 2:].flatten())
        _, losses = model(inp, tgt)
        torch.testing.assert_close(losses["mtp"], ce(mod.norm(h1)))
        for wrong in (model.norm(h1), h1):  # the main model's final norm; no norm at all
            assert abs(float(losses["mtp"] - ce(wrong))) > 1e-3


def test_mtp_loss_is_the_weight_times_the_mean_over_depths():
    """lambda / D * sum_k CE_k (report section 2.2), CE_k the mean over the S - k positions depth k
    predicts; the sum over depths (a weight that grows with D) is rejected."""
    torch.manual_seed(0)
    lam = 0.4
    model = Transformer(SMALL.replace(n_mtp=2, seq_aux_loss_alpha=0.0, mtp_loss_weight=lam)).eval()
    tokens = torch.randint(0, 256, (2, 14))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    S = inp.shape[1]
    with torch.no_grad():
        h, cos, sin = _main_hidden(model, inp)
        ces = []
        for k, mod in enumerate(model.mtp, start=1):  # depth k at position i reads t_{i+k}, predicts t_{i+k+1}
            n = S - k
            h, _ = mod(h[:, :n], model.embed(tokens[:, k:k + n]), cos[:n], sin[:n])
            ces.append(F.cross_entropy(model.head(mod.norm(h)).flatten(0, 1), tokens[:, k + 1:k + 1 + n].flatten()))
        _, losses = model(inp, tgt)
    torch.testing.assert_close(losses["mtp"], lam * (ces[0] + ces[1]) / 2)
    assert abs(float(losses["mtp"]) - lam * float(ces[0] + ces[1])) > 1e-2


@pytest.mark.parametrize("attn", ["mla", "mha"])
def test_cached_greedy_generation_equals_recomputing(attn):
    torch.manual_seed(0)
    cfg = SMALL if attn == "mla" else SMALL.replace(attn="mha", n_kv_heads=1)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        seq = prompt
        for _ in range(12):  # recompute the whole sequence every step
            seq = torch.cat([seq, model(seq)[0][:, -1:].argmax(-1)], dim=1)
        cache = model.new_cache(2)
        logits, _ = model(prompt, cache=cache)
        out = [prompt, logits[:, -1:].argmax(-1)]
        for i in range(11):
            logits, _ = model(out[-1], cache=cache, start_pos=5 + i)
            out.append(logits[:, -1:].argmax(-1))
    assert torch.equal(torch.cat(out, dim=1), seq)


def test_routing_stats_cover_every_moe_layer():
    model = Transformer(TOY)
    model(torch.randint(0, 256, (2, 16)))
    s = routing_stats(model)
    assert len(s["tokens_per_expert"]) == TOY.n_moe_layers
    assert all(sum(c) == 2 * 16 * TOY.n_activated_experts for c in s["tokens_per_expert"])


@pytest.mark.slow
def test_torch_compile_matches_eager_and_keeps_stats():
    torch.manual_seed(0)
    cfg = SMALL.replace(n_layers=2, seq_aux_loss_alpha=1e-3)
    model = Transformer(cfg)
    data = torch.randint(0, 256, (2, 17))
    _, eager = model(data[:, :-1], data[:, 1:])
    eager["loss"].backward()
    g_eager = model.layers[1].ffn.experts.w1.grad.clone()
    model.zero_grad()
    reset_routing_stats(model)
    compiled = torch.compile(model)
    _, comp = compiled(data[:, :-1], data[:, 1:])
    comp["loss"].backward()
    torch.testing.assert_close(comp["loss"], eager["loss"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.layers[1].ffn.experts.w1.grad, g_eager, rtol=1e-3, atol=1e-5)
    assert sum(routing_stats(model)["tokens_per_expert"][0]) == 2 * 16 * cfg.n_activated_experts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_forward_backward_close_to_cpu_fp32():
    torch.manual_seed(0)
    model = Transformer(TOY)
    data = torch.randint(0, 256, (2, 65))
    _, ref = model(data[:, :-1], data[:, 1:])
    gpu = model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, out = gpu(data[:, :-1].cuda(), data[:, 1:].cuda())
    out["loss"].backward()
    assert abs(out["ce"].item() - ref["ce"].item()) < 0.05
