"""The fast paths equal the readable ones, forward and backward.

experts_grouped (grouped_mm, routing weight folded into the hidden activation) and
experts_loop_add (per-expert loop, gather-and-sum combine: the CPU path) against experts_loop; the gather /
scatter-add dispatch of Experts against a per-token sum; the MoE layer with either
implementation, eager and under torch.compile; the 'auto' choice; the standalone init.
"""

import importlib.util
import os
import re

import pytest
import torch

from moe.config import PRESETS, ModelConfig
from moe.experts import (
    BUCKET_EXPERTS,
    CPU_BUCKETED_MIN_ROWS_PER_EXPERT,
    CPU_LOOP_MIN_ROWS_PER_EXPERT,
    Experts,
    experts_bucketed,
    experts_grouped,
    experts_loop,
    experts_loop_add,
    sort_by_expert,
    swiglu,
)
from moe.init import init_weights
from moe.layer import MoE, reset_routing_stats, routing_stats
from moe.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(**kw) -> ModelConfig:
    base = dict(dim=32, moe_inter_dim=16, n_routed_experts=8, n_activated_experts=3, n_shared_experts=1,
                n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5,
                n_layers=1, n_dense_layers=0)
    base.update(kw)
    return ModelConfig(**base)


def make_moe(impl: str, seed: int = 0, **kw) -> MoE:
    cfg = small_cfg(expert_impl=impl, init_std=0.2, **kw)
    torch.manual_seed(seed)
    return MoE(cfg)


def grads_of(m: torch.nn.Module, x: torch.Tensor, gout: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    y, _ = m(xi)
    y.backward(gout)
    return y.detach(), [xi.grad] + [p.grad for p in m.parameters()]


def random_dispatch(T: int, E: int, K: int, g: torch.Generator):
    """K distinct random experts per token, sorted by expert."""
    return sort_by_expert(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]), E)


def expert_weights(E: int, D: int, I: int, g: torch.Generator, std: float = 0.2) -> list[torch.Tensor]:
    """Random w1, w3 [E, D, I] and w2 [E, I, D]."""
    return [torch.randn(E, D, I, generator=g) * std, torch.randn(E, D, I, generator=g) * std,
            torch.randn(E, I, D, generator=g) * std]


def assert_all_close(a: list[torch.Tensor], b: list[torch.Tensor], **tol) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


def loop_then_scatter_add(x_TD, token_N, scale_N, counts_E, *ws):
    """What experts_loop_add and experts_bucketed must equal: gather, the reference loop, scale, scatter-add."""
    y_ND = experts_loop(x_TD.index_select(0, token_N), counts_E, *ws) * scale_N.unsqueeze(-1)
    return x_TD.new_zeros(x_TD.shape).index_add(0, token_N, y_ND)


@pytest.mark.parametrize("T,E,K,seed", [(1, 4, 1, 0), (7, 4, 2, 1), (33, 8, 3, 2), (64, 16, 4, 3)])
def test_grouped_with_row_scale_equals_loop_times_scale_forward_and_backward(T, E, K, seed):
    D, I = 32, 16
    g = torch.Generator().manual_seed(seed)
    d = random_dispatch(T, E, K, g)
    x_ND = torch.randn(T * K, D, generator=g)
    scale_N = torch.rand(T * K, generator=g)
    weights = expert_weights(E, D, I, g)
    gout = torch.randn(T * K, D, generator=g)
    results = []
    for fast in (False, True):
        xi, si = x_ND.clone().requires_grad_(True), scale_N.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in weights]
        if fast:
            y = experts_grouped(xi, d.counts_E, *ws, scale_N=si)
        else:
            y = experts_loop(xi, d.counts_E, *ws) * si.unsqueeze(-1)
        y.backward(gout)
        results.append([y.detach(), xi.grad, si.grad] + [w.grad for w in ws])
    assert_all_close(*results, rtol=1e-5, atol=1e-5)


# the two CPU fast paths with the same contract: (x_TD, token_N, scale_N, counts_E, w1, w3, w2) -> y_TD
FAST = pytest.mark.parametrize("fast", [experts_loop_add, experts_bucketed], ids=["loop_add", "bucketed"])


@FAST
@pytest.mark.parametrize("T,E,K,seed", [(1, 4, 1, 0), (7, 4, 2, 1), (33, 8, 3, 2), (64, 16, 4, 3), (40, 10, 3, 4)])
def test_loop_add_equals_loop_then_scatter_add_forward_and_backward(fast, T, E, K, seed):
    D, I = 32, 16
    g = torch.Generator().manual_seed(seed)
    d = random_dispatch(T, E, K, g)
    token_N = d.order_N // K
    x_TD = torch.randn(T, D, generator=g)
    scale_N = torch.rand(T * K, generator=g)
    weights = expert_weights(E, D, I, g)
    gout = torch.randn(T, D, generator=g)
    results = []
    for fused in (False, True):
        xi, si = x_TD.clone().requires_grad_(True), scale_N.clone().requires_grad_(True)
        ws = [w.clone().requires_grad_(True) for w in weights]
        if fused:
            y = fast(xi, token_N, si, d.counts_E, *ws)
        else:
            y = loop_then_scatter_add(xi, token_N, si, d.counts_E, *ws)
        y.backward(gout)
        results.append([y.detach(), xi.grad, si.grad] + [w.grad for w in ws])
    assert_all_close(*results, rtol=1e-5, atol=1e-5)


@FAST
def test_loop_add_with_dropped_assignments_equals_scatter_add(fast):
    """Tokens keep 0..K of their assignments (a capacity limit): the per-token bags vary in size."""
    T, E, K, D, I = 9, 4, 2, 8, 4
    g = torch.Generator().manual_seed(5)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    d = sort_by_expert(experts_TK, E, capacity=3)
    token_N = d.order_N // K
    assert int(d.dropped) > 0 and token_N.unique().numel() < T  # some tokens lose every assignment
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(token_N.numel(), generator=g, dtype=torch.float64, requires_grad=True)
    ws = [w.double().requires_grad_(True) for w in expert_weights(E, D, I, g)]
    got = fast(x, token_N, s, d.counts_E, *ws)
    ref = loop_then_scatter_add(x, token_N, s, d.counts_E, *ws)
    torch.testing.assert_close(got, ref)
    gout = torch.randn(T, D, generator=g, dtype=torch.float64)
    assert_all_close(list(torch.autograd.grad(got, (x, s, *ws), gout)),
                     list(torch.autograd.grad(ref, (x, s, *ws), gout)))


@FAST
def test_loop_add_gradcheck_float64_with_empty_experts(fast):
    """Experts 1, 3 and the whole second bucket (4..7) get no token: zero gradients, padding inert."""
    assert BUCKET_EXPERTS == 4
    E, T, K, D, I = 9, 6, 2, 4, 3
    g = torch.Generator().manual_seed(0)
    experts_TK = torch.tensor([[0, 2], [2, 0], [0, 8], [8, 2], [2, 0], [0, 2]])
    d = sort_by_expert(experts_TK, E)
    token_N = d.order_N // K
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.rand(T * K, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
          for shape in ((E, D, I), (E, D, I), (E, I, D))]
    assert torch.autograd.gradcheck(lambda x, s, *ws: fast(x, token_N, s, d.counts_E, *ws), (x, s, *ws))


@FAST
def test_loop_add_with_partial_gradients_and_without_grad(fast):
    E, T, K, D, I = 4, 10, 2, 8, 4
    g = torch.Generator().manual_seed(1)
    d = random_dispatch(T, E, K, g)
    token_N = d.order_N // K
    x, s = torch.randn(T, D, generator=g), torch.rand(T * K, generator=g)
    ws = expert_weights(E, D, I, g, std=1.0)
    ref = loop_then_scatter_add(x, token_N, s, d.counts_E, *ws)
    with torch.no_grad():  # inference: nothing saved
        torch.testing.assert_close(fast(x, token_N, s, d.counts_E, *ws), ref)
    w2 = ws[2].clone().requires_grad_(True)  # only one weight trains: the others get no gradient
    y = fast(x, token_N, s, d.counts_E, ws[0], ws[1], w2)
    (gw2,) = torch.autograd.grad(y, (w2,), torch.ones_like(y) * 0.5)
    w2_ref = ws[2].clone().requires_grad_(True)
    y_ref = loop_then_scatter_add(x, token_N, s, d.counts_E, ws[0], ws[1], w2_ref)
    (gw2_ref,) = torch.autograd.grad(y_ref, (w2_ref,), torch.ones_like(y_ref) * 0.5)
    torch.testing.assert_close(gw2, gw2_ref)


def test_bucketed_padding_stays_inert_when_a_token_is_not_finite():
    """Padding rows are zero rows: a NaN in token 0's input or an inf in its output gradient reaches only
    the experts token 0 went to, exactly as in the loop (padding that read token 0 spread it everywhere)."""
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 4], [4, 5], [4, 6], [5, 6], [5, 7],
                               [6, 7]])
    T, E, K, D, I = 11, 8, 2, 4, 3
    d = sort_by_expert(experts_TK, E)
    assert d.counts_E.tolist() == [3, 3, 3, 2, 3, 3, 3, 2]  # experts 3 and 7 get one padding row each
    token_N = d.order_N // K
    g = torch.Generator().manual_seed(0)
    for poison in ("x", "gout"):
        x, gout = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
        (x if poison == "x" else gout)[0, 0] = float("nan") if poison == "x" else float("inf")
        finite = []
        for fast in (experts_loop_add, experts_bucketed):
            ws = [w.requires_grad_(True) for w in expert_weights(E, D, I, torch.Generator().manual_seed(1))]
            y = fast(x, token_N, torch.rand(T * K, generator=torch.Generator().manual_seed(2)), d.counts_E, *ws)
            y.backward(gout)
            finite.append([bool(w.grad[e].isfinite().all()) for w in ws for e in range(E)])
        assert finite[0] == finite[1] and sum(finite[0]) == 3 * (E - 2)  # only experts 0 and 1 are poisoned


def test_bucketed_hands_skewed_routing_to_the_loop(monkeypatch):
    """One busy expert per bucket would mean 4x the rows in padding: the loop runs instead, same result."""
    import moe.experts as ex_mod

    T, E, K, D, I = 32, 16, 2, 8, 4
    experts_TK = torch.tensor([[0, 4]] * T)  # every token on experts 0 and 4: buckets [0..3], [4..7] pad 4x
    d = sort_by_expert(experts_TK, E)
    token_N = d.order_N // K
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(T, D, generator=g), torch.rand(T * K, generator=g)
    ws = expert_weights(E, D, I, g)
    ref = experts_loop_add(x, token_N, s, d.counts_E, *ws)
    calls = []
    monkeypatch.setattr(ex_mod._Bucketed, "apply", lambda *a: calls.append(a))
    torch.testing.assert_close(experts_bucketed(x, token_N, s, d.counts_E, *ws), ref)
    assert not calls
    balanced = random_dispatch(T, E, K, g)  # near-even loads: the bucketed kernel runs
    experts_bucketed(x, balanced.order_N // K, s, balanced.counts_E, *ws)
    assert len(calls) == 1


@FAST
def test_fast_paths_refuse_double_backward_clearly(fast):
    E, T, K, D, I = 4, 6, 2, 4, 3
    g = torch.Generator().manual_seed(0)
    d = random_dispatch(T, E, K, g)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ws = [w.requires_grad_(True) for w in expert_weights(E, D, I, g)]
    y = fast(x, d.order_N // K, torch.rand(T * K, generator=g), d.counts_E, *ws)
    (gx,) = torch.autograd.grad(y.square().sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_the_documented_crossovers_are_the_code_s():
    """docs/design.md states the CPU thresholds of 'auto'; they must be the constants."""
    with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
        design = f.read()
    assert f"under {CPU_BUCKETED_MIN_ROWS_PER_EXPERT} rows per expert" in design
    assert f"{CPU_BUCKETED_MIN_ROWS_PER_EXPERT} to {CPU_LOOP_MIN_ROWS_PER_EXPERT} rows per expert" in design
    assert f"from {CPU_LOOP_MIN_ROWS_PER_EXPERT} rows per expert" in design


def test_auto_on_cpu_picks_grouped_then_bucketed_then_the_loop_by_rows_per_expert():
    ex = Experts(small_cfg(expert_impl="auto"))
    E = ex.cfg.n_routed_experts
    x = torch.randn(4, 32)
    assert ex.impl_for(x, CPU_BUCKETED_MIN_ROWS_PER_EXPERT * E - 1) == "grouped"
    assert ex.impl_for(x, CPU_BUCKETED_MIN_ROWS_PER_EXPERT * E) == "bucketed"
    assert ex.impl_for(x, CPU_LOOP_MIN_ROWS_PER_EXPERT * E - 1) == "bucketed"
    assert ex.impl_for(x, CPU_LOOP_MIN_ROWS_PER_EXPERT * E) == "loop"
    assert ex.impl_for(x.double(), 4) == "bucketed"  # grouped_mm has no float64
    for impl in ("grouped", "bucketed", "loop"):
        assert Experts(small_cfg(expert_impl=impl)).impl_for(x, 4) == impl


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_is_grouped_on_gpu():
    ex = Experts(small_cfg(expert_impl="auto")).cuda()
    x = torch.randn(4, 32, device="cuda")
    assert ex.impl_for(x, 10**6) == "grouped"
    assert ex.impl_for(x.bfloat16(), 4) == "loop"  # the weights are fp32


def test_unused_experts_get_zero_gradient_in_both_paths():
    E, D, I = 6, 32, 16
    counts_E = torch.tensor([3, 0, 2, 0, 0, 1])
    x = torch.randn(6, D)
    for fn in (experts_loop, experts_grouped):
        ws = [torch.randn(E, D, I, requires_grad=True), torch.randn(E, D, I, requires_grad=True),
              torch.randn(E, I, D, requires_grad=True)]
        # a random upstream gradient: grouped_mm's backward rejects the stride-0 one of .sum()
        # (torch 2.13); inside Experts the gradient always arrives contiguous (index_select)
        y = fn(x, counts_E, *ws)
        y.backward(torch.randn_like(y))
        for w in ws:
            assert w.grad.shape == w.shape
            assert torch.all(w.grad[[1, 3, 4]] == 0)


@pytest.mark.parametrize("impl", ["loop", "bucketed", "grouped"])
@pytest.mark.parametrize("capacity_factor", [None, 0.6])
def test_dispatch_equals_per_token_sum_with_weight_gradients(capacity_factor, impl):
    """Gather, scaled experts, scatter-add == sum_k w_tk * expert(x_t), also for d/dweights."""
    cfg = small_cfg(capacity_factor=capacity_factor, expert_impl=impl)
    torch.manual_seed(0)
    ex = Experts(cfg.replace(init_std=0.2))
    T, K = 24, cfg.n_activated_experts
    g = torch.Generator().manual_seed(1)
    experts_TK = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:K] for _ in range(T)])
    x = torch.randn(T, cfg.dim, generator=g, requires_grad=True)
    w = torch.rand(T, K, generator=g, requires_grad=True)
    y, counts_E, dropped = ex(x, w, experts_TK)
    # reference: keep the first `capacity` assignments of each expert in (token, k) order
    keep = torch.ones(T, K, dtype=torch.bool)
    if capacity_factor is not None:
        cap = int(counts_E.max())
        seen = [0] * cfg.n_routed_experts
        for t in range(T):
            for k in range(K):
                e = int(experts_TK[t, k])
                keep[t, k] = seen[e] < cap
                seen[e] += 1
        assert int(dropped) == int((~keep).sum()) > 0
    ref = torch.stack([
        sum((w[t, k] * swiglu(x[t], ex.w1[e], ex.w3[e], ex.w2[e])
             for k, e in enumerate(experts_TK[t].tolist()) if keep[t, k]), torch.zeros(cfg.dim))
        for t in range(T)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gout = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, ex.w1, ex.w3, ex.w2), gout)
    want = torch.autograd.grad(ref, (x, w, ex.w1, ex.w3, ex.w2), gout)
    assert_all_close(list(got), list(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("other", ["grouped", "bucketed"])
@pytest.mark.parametrize("shape", [(2, 9), (3, 40)])
def test_moe_loop_and_grouped_agree_forward_and_all_gradients(shape, other):
    x = torch.randn(*shape, 32)
    gout = torch.randn(*shape, 32)
    loop, grouped = make_moe("loop"), make_moe(other)
    grouped.load_state_dict(loop.state_dict())
    y0, g0 = grads_of(loop, x, gout)
    y1, g1 = grads_of(grouped, x, gout)
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
    assert_all_close(g0, g1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loop.tokens_per_expert_E, grouped.tokens_per_expert_E)


def test_grouped_bf16_tracks_fp32_loop():
    x = torch.randn(4, 16, 32)
    ref = make_moe("loop")
    fast = make_moe("grouped").to(torch.bfloat16)
    fast.load_state_dict({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ref.state_dict().items()})
    y_ref, _ = ref(x)
    y, _ = fast(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits; a few routing flips near ties are allowed for
    close = (y.float() - y_ref).abs() <= 0.05 * y_ref.abs().max()
    assert close.float().mean() > 0.95


def test_grouped_under_autocast_runs_its_matmuls_in_the_autocast_dtype(monkeypatch):
    """grouped_mm is not autocast-registered: without the cast the experts would stay fp32 under bf16
    autocast (CUDA training) while the dense matmuls ran bf16."""
    import torch.nn.functional as F

    seen = []
    real = F.grouped_mm

    def spy(a, b, **kw):
        seen.append((a.dtype, b.dtype))
        return real(a, b, **kw)

    m = make_moe("grouped")
    x = torch.randn(2, 8, 32)
    y_ref, _ = m(x)
    monkeypatch.setattr(F, "grouped_mm", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x)
    assert seen and all(dt == (torch.bfloat16, torch.bfloat16) for dt in seen)
    assert y.dtype == torch.float32  # the routed sum stays in the layer's dtype
    close = (y - y_ref).abs() <= 0.05 * y_ref.abs().max()
    assert close.float().mean() > 0.95  # bf16 matmuls; a few routing flips near ties are allowed for


@pytest.mark.parametrize("impl", ["loop", "bucketed"])
@pytest.mark.parametrize("frozen", [False, True])
def test_hand_written_paths_under_autocast_run_in_the_autocast_dtype(monkeypatch, impl, frozen):
    """Their out= matmuls are not autocast-registered: the inputs are cast as autocast would cast a matmul
    (a frozen model's loop once mixed an autocast bf16 mm with an fp32 out= buffer and failed)."""
    import moe.experts as ex

    name = "experts_loop_add" if impl == "loop" else "experts_bucketed"
    real, seen = getattr(ex, name), []

    def spy(x, token, scale, counts, *ws):
        seen.append({t.dtype for t in (x, scale, *ws)})
        return real(x, token, scale, counts, *ws)

    m = make_moe(impl).requires_grad_(not frozen)
    x = torch.randn(2, 8, 32)
    y_ref, _ = m(x)
    monkeypatch.setattr(ex, name, spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = m(x)
    assert seen == [{torch.bfloat16}]
    assert y.dtype == torch.float32
    close = (y - y_ref).abs() <= 0.05 * y_ref.abs().max()
    assert close.float().mean() > 0.95
    if not frozen:
        y.sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.experts.parameters())


def test_sort_by_expert_counts_match_bincount():
    g = torch.Generator().manual_seed(0)
    e = torch.randint(0, 16, (100, 4), generator=g)
    d = sort_by_expert(e, 16)
    assert d.counts_E.dtype == torch.int64
    assert torch.equal(d.counts_E, torch.bincount(e.flatten(), minlength=16))
    assert torch.equal(e.flatten()[d.order_N], e.flatten().sort(stable=True).values)


def test_init_weights_is_the_transformer_rule():
    cfg = small_cfg(n_layers=2, n_dense_layers=1, vocab_size=64, n_heads=2, attn="mha")
    a, b = Transformer(cfg), Transformer(cfg)
    torch.manual_seed(0)
    a.init_weights()
    torch.manual_seed(0)
    init_weights(b, cfg)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_standalone_moe_init_is_random_router_and_scaled_outputs():
    cfg = small_cfg(n_layers=8)
    torch.manual_seed(0)
    m = MoE(cfg)  # no init call: the module initialises itself
    assert m.router.weight.std().item() == pytest.approx(cfg.init_std, rel=0.2)
    assert m.experts.w2.std().item() == pytest.approx(cfg.init_std / 4, rel=0.2)  # 1/sqrt(2*8)
    assert m.shared.w2.weight.std().item() == pytest.approx(cfg.init_std / 4, rel=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["grouped", "bucketed", "loop"])
def test_moe_under_torch_compile_matches_eager_and_counts_tokens(impl):
    m = make_moe(impl)
    compiled = torch.compile(m)
    reset_routing_stats(m)
    for shape in [(2, 16), (2, 16), (3, 8)]:
        x, gout = torch.randn(*shape, 32), torch.randn(*shape, 32)
        y0, g0 = grads_of(m, x, gout)
        y1, g1 = grads_of(compiled, x, gout)
        torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-5)
        assert_all_close(g0, g1, rtol=1e-4, atol=1e-5)
    # eager and compiled calls both counted their T*K assignments
    counts = routing_stats(m)["tokens_per_expert"][0]
    assert sum(counts) == 2 * (32 + 32 + 24) * m.cfg.n_activated_experts


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", os.path.join(ROOT, "benchmarks", "moe_layer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_factory_builds_our_moe_for_the_peer_harness():
    bench = load_benchmark()
    peer_cfg = dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                    n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5, hidden_act="silu", init_std=0.02, seed=0, dtype="float32")
    m = bench.build(peer_cfg)
    assert isinstance(m, MoE) and m.cfg.score_func == "sigmoid" and m.cfg.n_activated_experts == 2
    x = torch.randn(2, 5, 32, requires_grad=True)
    y = m(x)[0]
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())


TINY_BENCH = ["--sizes", "1x64", "--set", "dim=32", "--set", "moe_inter_dim=16", "--rounds", "1", "--steps", "1",
              "--warmup", "0", "--threads", "1", "--preset-size", "small"]


def test_benchmark_comparison_reports_every_entry_with_ratios(capsys):
    torch.manual_seed(0)
    out = load_benchmark().main(TINY_BENCH + ["--compile", "off", "--hf-impls", "", "--preset-size", "small,fine64"])
    assert {r["config"] for r in out["rows"]} == {"small", "fine64"}
    fine = {r["name"]: r for r in out["rows"] if r["config"] == "fine64"}
    assert set(fine) == {"ours[loop]", "ours[bucketed]", "ours[grouped]", "dense[fused]", "dense[split]"}
    rows = {r["name"]: r for r in out["rows"] if r["config"] == "small"}
    assert set(rows) == set(fine)
    dense_best = max(rows["dense[fused]"]["fb_tok_s"], rows["dense[split]"]["fb_tok_s"])
    for r in rows.values():
        assert r["fb_tok_s"] > 0 and r["peak_mb"] > 0
        assert r["vs_dense"] == pytest.approx(r["fb_tok_s"] / dense_best)
    assert 1.0 <= rows["ours[loop]"]["load_max_over_mean"] <= 16 and rows["dense[split]"]["load_max_over_mean"] is None
    assert capsys.readouterr().out.splitlines()[-1].startswith("JSON {")



def test_benchmark_repeat_summarizes_each_runs_ratios_against_the_targets(capsys):
    bench = load_benchmark()
    out = bench.main(TINY_BENCH + ["--compile", "off", "--hf-impls", "eager", "--impls", "loop", "--repeat", "3"])
    assert len(out["runs"]) == 3
    (summary,) = out["summary"]
    assert summary["name"] == "ours[loop]" and summary["n_runs"] == 3 and summary["config"] == "small"
    for ratio, target in bench.TARGETS["small"].items():
        per_run = [next(r for r in run["rows"] if r["name"] == "ours[loop]")[ratio] for run in out["runs"]]
        assert summary[ratio] == per_run
        assert summary[f"{ratio}_median"] == sorted(per_run)[1]
        assert summary[f"{ratio}_met"] == sum(v >= target for v in per_run)
    printed = capsys.readouterr().out
    assert printed.count("## run ") == 3 and "3 runs: ours vs the targets" in printed
    assert printed.splitlines()[-1].startswith("JSON {")


def test_benchmark_summary_keeps_long_entry_names_apart(capsys):
    bench = load_benchmark()
    entry = dict(batch=16, seq=512, n_runs=1, vs_dense=[0.8], vs_dense_median=0.8, vs_dense_met=1,
                 vs_hf_best=[1.3], vs_hf_best_median=1.3, vs_hf_best_met=1)
    summary = [dict(entry, config="small", name="ours[loop]+compile", auto=True),
               dict(entry, config="fine64", name="ours[grouped]+compile", auto=False)]
    bench.print_summary([dict(loadavg_start=(0.5, 0.5, 0.5))], summary)
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run"))
    assert re.split(r"\s{2,}", header) == ["run", "load at start", "small 16x512 ours[loop]+compile =auto",
                                          "fine64 16x512 ours[grouped]+compile"]


def test_benchmark_breakdown_splits_matmuls_from_the_rest():
    out = load_benchmark().main(TINY_BENCH + ["--breakdown"])
    parts = {r["part"].strip(): r["median_ms"] for r in out["breakdown"]}
    assert list(parts)[0].startswith("layer (ours[auto] = ")
    # every part is timed (positive), and together, without the remainder, they take no more than the layer
    # (plus timing noise): a part that timed something outside the layer would exceed it
    layer, *inner, rest, dense = parts.values()
    assert all(t > 0 for t in inner) and dense > 0
    assert sum(inner) <= 1.5 * layer and rest == pytest.approx(layer - sum(inner))
    assert any(p.startswith("expert matmuls alone") for p in parts) and "router (scores, group limit, top-k)" in parts
    ours, dense = out["inside"]
    for row in (ours, dense):
        assert 0 < row["matmul_ms"] < row["total_ms"] and row["page_faults"] >= 0
    # routing (scores, top-k, sort, gathers, combine) is work beyond the matmuls that a dense MLP does not do
    assert ours["other_ms"] > dense["other_ms"]


def test_benchmark_roofline_bounds_ours_by_the_gemm_rates():
    out = load_benchmark().main(TINY_BENCH + ["--roofline", "--preset-size", "fine64"])
    rows = out["roofline"]
    kinds = {"routed (mm per expert)", "routed (bmm, buckets of 4)", "shared expert", "dense"}
    assert {r["kind"] for r in rows} == kinds
    assert all(r["gflops_1t"] > 0 and r["ms_1t"] > 0 for r in rows)
    routed = [r for r in rows if r["kind"] == "routed (mm per expert)"]
    assert routed[0]["m"] == round(64 * 6 / 64) and routed[0]["count"] == 2 * 64  # x@w1 and x@w3 per expert
    order = {r["kind"]: r["ms_1t"] for r in out["layer_order"]}
    assert set(order) == kinds and all(v > 0 for v in order.values())
    for b in out["bounds"]:  # the bound: dense matmuls over ours (routed + shared), in layer order
        assert b["bound"] == pytest.approx(order["dense"] / (order[b["kind"]] + order["shared expert"]))


def test_benchmark_crossover_reports_the_fastest_and_what_auto_picks():
    out = load_benchmark().main(TINY_BENCH + ["--crossover", "--crossover-tokens", "2,64"])
    for r in out["crossover"]:
        times = {k: r[f"fwd_bwd_{k}_us"] for k in ("loop", "bucketed", "grouped")}
        assert r["fwd_bwd_fastest"] == min(times, key=times.get)
        assert r["auto"] in times and r["rows_per_expert"] == r["tokens"] * 4 / 16


def load_train_step():
    spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(ROOT, "benchmarks", "train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


TINY_STEP = ["--batch-size", "2", "--seq-len", "16", "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
             "--set", "dim=32", "--set", "moe_inter_dim=16", "--set", "inter_dim=48"]


def test_train_step_segment_keeps_parameters_and_flops_and_times_the_dense_twin(capsys):
    bench = load_train_step()
    plain = bench.main(TINY_STEP + ["--impls", "bucketed"])
    fine = bench.main(TINY_STEP + ["--impls", "bucketed", "--segment", "4"])
    for out in (plain, fine):
        rows = {r["name"]: r for r in out["rows"]}
        assert set(rows) == {"moe[bucketed]", "dense"}
        moe, dense = rows["moe[bucketed]"], rows["dense"]
        assert moe["vs_dense"] == pytest.approx(moe["tok_s"] / dense["tok_s"])
    p, f = ({r["name"]: r for r in out["rows"]}["moe[bucketed]"] for out in (plain, fine))
    # 4x the experts of 1/4 the width, 4x as many chosen and shared: the same parameters and active parameters
    # up to the router's E x D weight
    assert f["params_total"] - p["params_total"] == 3 * (32 - 8) * 32  # 3 MoE layers' routers: 24 more rows of dim 32
    assert f["params_active"] - p["params_active"] == f["params_total"] - p["params_total"]
    cfg = bench.segment(PRESETS["toy"], 4)
    assert (cfg.n_routed_experts, cfg.n_activated_experts, cfg.n_shared_experts, cfg.moe_inter_dim) == (32, 8, 4, 24)
    with pytest.raises(ValueError, match="--segment 5"):
        bench.segment(PRESETS["toy"], 5)


def test_train_step_profile_lists_the_ops_where_moe_exceeds_dense(capsys):
    out = load_train_step().main(TINY_STEP + ["--impls", "loop", "--profile", "--profile-rows", "5"])
    excess = [r["moe_ms"] - r["dense_ms"] for r in out["profile"]]
    assert excess == sorted(excess, reverse=True)
    assert any(r["op"] == "_LoopAdd" and r["dense_ms"] == 0 for r in out["profile"])  # only the MoE step routes
    assert set(out["total_ms"]) == {"moe[loop]", "dense"}


def test_ab_benchmark_runs_a_revisions_experts_on_the_same_weights(capsys):
    spec = importlib.util.spec_from_file_location("bench_ab_experts", os.path.join(ROOT, "benchmarks", "ab_experts.py"))
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)

    old = ab.experts_at("HEAD")
    assert old.__name__ == "experts_at_HEAD" and old.Experts is not Experts
    now, before = ab.layer_pair(small_cfg(), "auto", old)
    assert type(now.experts) is Experts and type(before.experts) is old.Experts
    assert_all_close([p.detach() for p in before.parameters()], [p.detach() for p in now.parameters()], rtol=0, atol=0)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(before(x)[0], now(x)[0])  # HEAD's experts.py is this checkout's
    out = ab.main(["--against", "HEAD", "--preset-size", "small", "--sizes", "1x16", "--rounds", "1", "--steps", "1"])
    (r,) = out["results"]
    assert [row["entry"] for row in r["rows"]] == ["now[auto]", "HEAD[auto]", "dense[fused]", "dense[split]"]
    head = next(row for row in r["rows"] if row["entry"] == "HEAD[auto]")
    assert head["vs_against"] == 1.0 and all(row["median_ms"] > 0 for row in r["rows"])
    assert "JSON " in capsys.readouterr().out
    bad = ((["--against", "no-such-revision-xyz"], "cannot read moe/experts.py at 'no-such-revision-xyz'"),
           (["--against", "HEAD", "--impls", "fast"], "--impls: 'fast'; choose from"),
           (["--against", "HEAD", "--sizes", "1x"], "--sizes: '1x'"))
    for argv, message in bad:
        with pytest.raises(SystemExit) as e:
            ab.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err


@FAST
@pytest.mark.parametrize("frozen", ["weights", "input"])
def test_fast_paths_with_frozen_weights_or_input_give_the_other_gradients(fast, frozen):
    """Backward computes only what is needed (no weight gradients for frozen experts); the rest still match."""
    T, E, K, D, I = 30, 8, 2, 16, 8
    g = torch.Generator().manual_seed(5)
    d = random_dispatch(T, E, K, g)
    x, s, gout = torch.randn(T, D, generator=g), torch.rand(T * K, generator=g), torch.randn(T, D, generator=g)
    weights = expert_weights(E, D, I, g)
    results = []
    for fn in (fast, loop_then_scatter_add):
        xi = x.clone().requires_grad_(frozen == "weights")
        ws = [w.clone().requires_grad_(frozen == "input") for w in weights]
        fn(xi, d.order_N // K, s, d.counts_E, *ws).backward(gout)
        results.append([xi.grad] if frozen == "weights" else [w.grad for w in ws])
    assert all(t is not None for t in results[0])
    assert_all_close(*results, rtol=1e-5, atol=1e-5)
