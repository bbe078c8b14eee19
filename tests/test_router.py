"""Router: hand-computed cases, then hypothesis properties of the DESIGN routing rules."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.config import PRESETS, ModelConfig
from moe.router import Router


def make_router(**kw) -> Router:
    base = dict(dim=4, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1)
    base.update(kw)
    return Router(ModelConfig(**base))


def set_logits(router: Router, logits_E: list[float]) -> torch.Tensor:
    """Make the router produce exactly these logits for the input e_0."""
    with torch.no_grad():
        router.weight.zero_()
        router.weight[:, 0] = torch.tensor(logits_E)
    x = torch.zeros(1, router.weight.shape[1])
    x[0, 0] = 1.0
    return x


def test_softmax_top2_hand_computed():
    r = make_router(score_func="softmax", norm_topk_prob=False)
    x = set_logits(r, [2.0, 1.0, 0.0, -1.0])
    out = r(x)
    z = sum(math.exp(v) for v in [2.0, 1.0, 0.0, -1.0])
    assert out.experts_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(out.weights_TK, torch.tensor([[math.exp(2) / z, math.exp(1) / z]]))


def test_norm_topk_prob_and_route_scale():
    r = make_router(score_func="softmax", norm_topk_prob=True, route_scale=2.5)
    x = set_logits(r, [2.0, 1.0, 0.0, -1.0])
    w = r(x).weights_TK
    e2, e1 = math.exp(2), math.exp(1)
    torch.testing.assert_close(w, torch.tensor([[2.5 * e2 / (e2 + e1), 2.5 * e1 / (e2 + e1)]]))


def test_sigmoid_scores_normalised_over_topk():
    r = make_router(score_func="sigmoid", norm_topk_prob=True)
    x = set_logits(r, [0.5, 3.0, -2.0, 1.0])
    out = r(x)
    s = torch.sigmoid(torch.tensor([0.5, 3.0, -2.0, 1.0]))
    assert out.experts_TK.tolist() == [[1, 3]]
    torch.testing.assert_close(out.weights_TK, (s[[1, 3]] / s[[1, 3]].sum())[None])
    torch.testing.assert_close(out.scores_TE, s[None])


def test_bias_changes_selection_not_weights():
    r = make_router(score_func="sigmoid", norm_topk_prob=False, bias_update_speed=1e-3)
    x = set_logits(r, [3.0, 2.0, 1.0, 0.0])
    assert r(x).experts_TK.tolist() == [[0, 1]]
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # push expert 3 into the top-2
    out = r(x)
    assert sorted(out.experts_TK[0].tolist()) == [0, 3]
    # the weight of expert 3 is its unbiased score, not score + bias
    w = dict(zip(out.experts_TK[0].tolist(), out.weights_TK[0].tolist()))
    assert abs(w[3] - torch.sigmoid(torch.tensor(0.0)).item()) < 1e-6
    assert abs(w[0] - torch.sigmoid(torch.tensor(3.0)).item()) < 1e-6


def test_bias_is_a_buffer_and_absent_when_speed_is_zero():
    assert make_router().bias is None
    r = make_router(bias_update_speed=1e-3)
    assert "bias" in dict(r.named_buffers()) and "bias" not in dict(r.named_parameters())


def test_group_limited_uses_top2_sum_with_bias_and_max_without():
    # 8 experts in 4 groups of 2; keep 1 group; top-2.
    # group 0 = (0.90, 0.00): best single expert;  group 1 = (0.60, 0.55): best top-2 sum.
    probs = [0.90, 0.00, 0.60, 0.55, 0.10, 0.10, 0.05, 0.05]
    logits = [math.log(p / (1 - p)) if 0 < p < 1 else (-30.0 if p == 0 else 30.0) for p in probs]
    kw = dict(dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1,
              score_func="sigmoid", norm_topk_prob=False)
    no_bias = Router(ModelConfig(**kw))
    x = set_logits(no_bias, logits)
    assert sorted(no_bias(x).experts_TK[0].tolist()) == [0, 1]  # max rule picks group 0
    with_bias = Router(ModelConfig(**kw, bias_update_speed=1e-3))
    set_logits(with_bias, logits)
    assert sorted(with_bias(x).experts_TK[0].tolist()) == [2, 3]  # top-2 sum picks group 1


# ---------------------------------------------------------------- properties

@st.composite
def router_cases(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.sampled_from([1, 2, 4]))
    E = G * per_group
    M = draw(st.integers(1, G))
    K = draw(st.integers(1, M * per_group))
    cfg = ModelConfig(
        dim=8, n_routed_experts=E, n_activated_experts=K, n_expert_groups=G, n_limited_groups=M,
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        norm_topk_prob=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5])),
        bias_update_speed=draw(st.sampled_from([0.0, 1e-3])),
    )
    T = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**16))
    return cfg, T, seed


def build(cfg, T, seed):
    g = torch.Generator().manual_seed(seed)
    r = Router(cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=g))
        if r.bias is not None:
            r.bias.copy_(0.1 * torch.randn(r.bias.shape, generator=g))
    return r, torch.randn(T, cfg.dim, generator=g)


@settings(max_examples=60, deadline=None)
@given(router_cases())
def test_routing_invariants(case):
    cfg, T, seed = case
    r, x = build(cfg, T, seed)
    w, e, scores, _ = r(x)
    K = cfg.n_activated_experts
    assert w.shape == e.shape == (T, K) and w.dtype == torch.float32
    # exactly K distinct experts per token, all valid
    assert all(len(set(row)) == K for row in e.tolist())
    assert e.min() >= 0 and e.max() < cfg.n_routed_experts
    # weights are non-negative; they sum to route_scale when normalised
    assert (w >= 0).all()
    if cfg.norm_topk_prob:
        torch.testing.assert_close(w.sum(-1), torch.full((T,), cfg.route_scale))
    else:  # else: weights are the unbiased scores times route_scale
        torch.testing.assert_close(w, cfg.route_scale * scores.gather(1, e))
    # selected experts come from at most n_limited_groups groups
    groups = e // (cfg.n_routed_experts // cfg.n_expert_groups)
    assert all(len(set(row)) <= cfg.n_limited_groups for row in groups.tolist())
    # load counts sum to T * K
    assert torch.bincount(e.flatten(), minlength=cfg.n_routed_experts).sum() == T * K


@settings(max_examples=30, deadline=None)
@given(router_cases())
def test_router_is_permutation_equivariant_over_tokens(case):
    cfg, T, seed = case
    r, x = build(cfg, T, seed)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed + 1))
    w, e, *_ = r(x)
    wp, ep, *_ = r(x[perm])
    # compare as sets per token (topk order is by score, which is the same per token)
    torch.testing.assert_close(wp, w[perm])
    assert torch.equal(ep, e[perm])


@settings(max_examples=30, deadline=None)
@given(router_cases())
def test_bias_never_enters_the_weight_formula(case):
    cfg, T, seed = case
    if cfg.bias_update_speed == 0:
        cfg = cfg.replace(bias_update_speed=1e-3)
    r, x = build(cfg, T, seed)
    with torch.no_grad():
        r.bias.copy_(torch.randn(r.bias.shape, generator=torch.Generator().manual_seed(seed)))
    w, e, scores, _ = r(x)
    expected = scores.gather(1, e)
    if cfg.norm_topk_prob:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(w, cfg.route_scale * expected)


def test_router_runs_in_fp32_for_low_precision_inputs():
    r = make_router()
    out = r(torch.randn(5, 4).to(torch.bfloat16))
    assert out.weights_TK.dtype == torch.float32 and out.scores_TE.dtype == torch.float32


def test_router_scores_in_fp32_inside_bf16_autocast():
    """Under autocast F.linear would run in bf16 and pick other experts for some tokens."""
    cfg = PRESETS["toy"].replace(dim=256, n_routed_experts=64, n_activated_experts=6, n_expert_groups=8,
                                 n_limited_groups=4)
    torch.manual_seed(0)
    r = Router(cfg)
    x = torch.randn(1024, cfg.dim)
    plain = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = r(x)
        assert torch.is_autocast_enabled("cpu")  # switched off inside the router only
    for field in ("logits_TE", "scores_TE", "weights_TK"):
        assert getattr(auto, field).dtype == torch.float32, field
        assert torch.equal(getattr(auto, field), getattr(plain, field)), field
    assert torch.equal(auto.experts_TK, plain.experts_TK)
    bf16 = r(x.bfloat16())  # a bf16 input is scored in fp32 too
    assert bf16.logits_TE.dtype == torch.float32


def test_correction_bias_stays_fp32_under_every_cast():
    from moe.model import Transformer

    model = Transformer(PRESETS["toy"])
    router = model.layers[-1].ffn.router
    values = torch.linspace(0.5, 0.507, PRESETS["toy"].n_routed_experts)
    with torch.no_grad():
        router.bias.copy_(values)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                 lambda m: m.to("cpu", torch.bfloat16)):
        cast(model)
        assert router.bias.dtype == torch.float32
        assert torch.equal(router.bias, values)  # bf16 would collapse these 8 values to 3
    assert router.weight.dtype == torch.bfloat16  # the rest of the model did follow the cast
    with torch.device("meta"):
        meta = Transformer(PRESETS["toy"])
    meta.to_empty(device="cpu")
    assert meta.layers[-1].ffn.router.bias.dtype == torch.float32
