"""Dispatch: both implementations agree with a per-token reference, dropless and with capacity."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe.config import ModelConfig
from moe.experts import (
    Experts,
    expert_capacity,
    experts_grouped,
    experts_loop,
    sort_by_expert,
    swiglu,
)


def make_experts(E=8, D=16, I=8, K=2, seed=0, **kw):
    cfg = ModelConfig(dim=D, n_routed_experts=E, n_activated_experts=K, moe_inter_dim=I, **kw)
    torch.manual_seed(seed)
    ex = Experts(cfg)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.2)
    return ex


def random_routing(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=g)
    return weights_TK, experts_TK


def reference(ex: Experts, x_TD, weights_TK, experts_TK, keep_TK=None):
    """One token at a time: y_t = sum_k w_tk * expert_{e_tk}(x_t)."""
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(experts_TK.shape[1]):
            if keep_TK is not None and not keep_TK[t, k]:
                continue
            e = experts_TK[t, k]
            y[t] += weights_TK[t, k] * swiglu(x_TD[t], ex.w1[e], ex.w3[e], ex.w2[e])
    return y


@pytest.mark.parametrize("impl", ["loop", "bucketed", "grouped"])
def test_dropless_dispatch_matches_per_token_reference(impl):
    ex = make_experts(expert_impl=impl)
    x = torch.randn(20, 16)
    w, e = random_routing(20, 8, 2, seed=1)
    y, counts, dropped = ex(x, w, e)
    torch.testing.assert_close(y, reference(ex, x, w, e), rtol=1e-5, atol=1e-5)
    assert counts.sum() == 40 and dropped == 0
    assert torch.equal(counts, torch.bincount(e.flatten(), minlength=8))


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 40), E=st.sampled_from([2, 4, 8]), K=st.integers(1, 2), seed=st.integers(0, 999))
def test_loop_and_grouped_agree_forward_and_backward(T, E, K, seed):
    D, I = 16, 8
    ex = make_experts(E=E, D=D, I=I, K=K, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    _, e = random_routing(T, E, K, seed)
    d = sort_by_expert(e, E)
    x_ND = x[d.order_N // K]
    gout = torch.randn(T * K, D, generator=g)
    outs, grads = [], []
    for fn in (experts_loop, experts_grouped):
        xi = x_ND.detach().requires_grad_(True)
        ws = [p.detach().clone().requires_grad_(True) for p in (ex.w1, ex.w3, ex.w2)]
        y = fn(xi, d.counts_E, *ws)
        y.backward(gout)
        outs.append(y)
        grads.append([xi.grad] + [w.grad for w in ws])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradcheck_reference_path_float64():
    ex = make_experts(E=3, D=4, I=3, K=2).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w, e = random_routing(5, 3, 2, seed=3)
    w = w.double().requires_grad_(True)

    # gradients with respect to the input and the routing weights through the full dispatch
    assert torch.autograd.gradcheck(lambda x, w: ex(x, w, e)[0], (x, w))
    # and with respect to the expert weights through the reference loop
    d = sort_by_expert(e, 3)
    xs = x.detach()[d.order_N // 2]
    params = [p.detach().clone().requires_grad_(True) for p in (ex.w1, ex.w3, ex.w2)]
    assert torch.autograd.gradcheck(lambda *ws: experts_loop(xs, d.counts_E, *ws), params)


def test_sort_by_expert_is_stable_and_grouped():
    e = torch.tensor([[2, 0], [0, 1], [2, 1]])
    d = sort_by_expert(e, n_experts=4)
    assert d.order_N.tolist() == [1, 2, 3, 5, 0, 4]  # expert 0: pairs 1,2; expert 1: 3,5; expert 2: 0,4
    assert d.counts_E.tolist() == [2, 2, 2, 0]


def test_capacity_counts_the_top_k_factor():
    # 64 tokens, top-2, 8 experts, cf 1.0 -> 16 slots each (not 8: forgetting K drops half)
    assert expert_capacity(1.0, 64, 2, 8) == 16
    assert expert_capacity(1.25, 10, 2, 4) == 7


@pytest.mark.parametrize("impl", ["loop", "bucketed", "grouped"])
def test_capacity_drops_overflow_in_token_order_and_counts_it(impl):
    E, K, T = 4, 2, 12
    ex = make_experts(E=E, K=K, capacity_factor=0.5, expert_impl=impl)
    cap = expert_capacity(0.5, T, K, E)  # 3 slots per expert
    x = torch.randn(T, 16)
    w, e = random_routing(T, E, K, seed=5)
    y, counts, dropped = ex(x, w, e)
    # who is kept: the first `cap` assignments of each expert in (token, k) order
    seen = [0] * E
    keep = torch.zeros(T, K, dtype=torch.bool)
    for t in range(T):
        for k in range(K):
            ei = int(e[t, k])
            keep[t, k] = seen[ei] < cap
            seen[ei] += 1
    assert int(dropped) == int((~keep).sum()) > 0
    assert counts.tolist() == [min(c, cap) for c in seen]
    torch.testing.assert_close(y, reference(ex, x, w, e, keep), rtol=1e-5, atol=1e-5)


def test_auto_falls_back_to_the_loop_for_float64():
    ex = make_experts(expert_impl="auto").double()
    x = torch.randn(6, 16, dtype=torch.float64)
    w, e = random_routing(6, 8, 2, seed=0)
    y, _, _ = ex(x, w.double(), e)
    torch.testing.assert_close(y, reference(ex, x, w.double(), e))


def test_experts_with_no_tokens_at_all():
    ex = make_experts()
    y, counts, dropped = ex(torch.randn(0, 16), torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long))
    assert y.shape == (0, 16) and counts.sum() == 0
