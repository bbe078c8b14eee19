"""MoE layer, balancing losses and the aux-loss-free bias."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe import balance
from moe.config import ModelConfig
from moe.experts import swiglu
from moe.layer import MLP, MoE, reset_routing_stats, routing_stats


def make_moe(seed=0, **kw) -> MoE:
    # init_std 0.3 (training uses 0.02) spreads the router scores, so top-k choices are not near-ties
    base = dict(dim=16, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=8, n_shared_experts=1,
                n_expert_groups=4, n_limited_groups=2, score_func="sigmoid", route_scale=2.5, init_std=0.3)
    base.update(kw)
    torch.manual_seed(seed)
    return MoE(ModelConfig(**base))


def test_moe_output_is_routed_experts_plus_shared():
    m = make_moe()
    x = torch.randn(2, 5, 16)
    y, losses = m(x)
    assert y.shape == x.shape and losses == {}
    r = m.router(x.view(-1, 16))
    x_TD = x.view(-1, 16)
    ref = m.shared(x_TD).clone()
    for t in range(10):
        for k in range(2):
            e = r.experts_TK[t, k]
            ref[t] += r.weights_TK[t, k] * swiglu(x_TD[t], m.experts.w1[e], m.experts.w3[e], m.experts.w2[e])
    torch.testing.assert_close(y.view(-1, 16), ref, rtol=1e-5, atol=1e-5)


def test_shared_experts_equal_one_mlp_of_their_total_width():
    m = make_moe(n_shared_experts=2)
    assert isinstance(m.shared, MLP) and m.shared.w1.out_features == 2 * 8
    assert make_moe(n_shared_experts=0).shared is None


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 9), seed=st.integers(0, 999),
       impl=st.sampled_from(["loop", "bucketed", "grouped"]))
def test_dropless_processes_every_token_and_counts_sum_to_TK(B, S, seed, impl):
    m = make_moe(seed=seed, n_shared_experts=0, expert_impl=impl)
    reset_routing_stats(m)
    x = torch.randn(B, S, 16)
    y, _ = m(x)
    stats = routing_stats(m)
    assert sum(stats["tokens_per_expert"][0]) == B * S * 2
    assert stats["dropped"] == [0.0]
    # every token got its experts' output: compare with the per-token formula
    r = m.router(x.view(-1, 16))
    x_TD = x.view(-1, 16)
    ref = torch.stack([
        sum(r.weights_TK[t, k] * swiglu(x_TD[t], m.experts.w1[e], m.experts.w3[e], m.experts.w2[e])
            for k, e in enumerate(r.experts_TK[t].tolist()))
        for t in range(B * S)])
    torch.testing.assert_close(y.view(-1, 16), ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 999))
def test_moe_is_permutation_equivariant_over_tokens(seed):
    m = make_moe(seed=seed)
    x = torch.randn(1, 12, 16)
    perm = torch.randperm(12)
    y, _ = m(x)
    yp, _ = m(x[:, perm])
    torch.testing.assert_close(yp, y[:, perm], rtol=1e-5, atol=1e-5)


def test_stats_accumulate_until_reset_and_count_drops():
    m = make_moe(capacity_factor=0.25)
    x = torch.randn(2, 16, 16)
    m(x)
    m(x)
    s = routing_stats(m)
    # the loads are the router's assignments, before the capacity drops (counted apart): kept
    # counts would hide an overloaded expert behind its capacity
    assert sum(s["tokens_per_expert"][0]) == 2 * 2 * 32
    r = m.router(x.view(-1, 16))
    expected = 2 * torch.bincount(r.experts_TK.flatten(), minlength=8).float()
    assert s["tokens_per_expert"][0] == expected.tolist()
    assert s["dropped"][0] > 0 and s["max_over_mean_load"][0] >= 1.0
    reset_routing_stats(m)
    assert routing_stats(m)["tokens_per_expert"][0] == [0.0] * 8
    assert "tokens_per_expert_E" not in m.state_dict()  # not saved in checkpoints


def test_balance_losses_returned_with_their_coefficients():
    m = make_moe(aux_loss_alpha=0.01, seq_aux_loss_alpha=0.001, z_loss_coef=0.1)
    x = torch.randn(2, 6, 16)
    _, losses = m(x)
    assert set(losses) == {"aux", "seq_aux", "z"}
    r = m.router(x.view(-1, 16))
    torch.testing.assert_close(losses["aux"], 0.01 * balance.switch_aux_loss(r.scores_TE, r.experts_TK))
    torch.testing.assert_close(losses["z"], 0.1 * balance.z_loss(r.logits_TE))
    (losses["aux"] + losses["seq_aux"] + losses["z"]).backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_aux_losses_are_one_at_uniform_load():
    # 4 tokens, 4 experts, top-1, each expert used once, uniform scores -> exactly 1.0
    scores = torch.full((4, 4), 0.25)
    experts = torch.tensor([[0], [1], [2], [3]])
    assert balance.switch_aux_loss(scores, experts).item() == pytest.approx(1.0)
    assert balance.seq_aux_loss(scores, experts, batch=1).item() == pytest.approx(1.0)
    # all tokens on expert 0 with all probability there: E * 1 * 1 = 4
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 4)
    assert balance.switch_aux_loss(collapsed, torch.zeros(4, 1, dtype=torch.long)).item() == pytest.approx(4.0)


def test_seq_aux_loss_is_per_sequence():
    # two sequences, each collapsed onto a different expert: balanced over the batch, not per sequence
    scores = torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 2)
    experts = torch.tensor([[0], [0], [1], [1]])
    assert balance.switch_aux_loss(scores, experts).item() == pytest.approx(1.0)
    assert balance.seq_aux_loss(scores, experts, batch=2).item() == pytest.approx(2.0)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    lse = torch.logsumexp(logits, -1)
    assert balance.z_loss(logits).item() == pytest.approx(float((lse**2).mean()))


def test_update_bias_moves_against_the_load():
    m = make_moe(bias_update_speed=0.01)
    with torch.no_grad():
        m.tokens_per_expert_E.copy_(torch.tensor([10.0, 0, 2, 2, 2, 2, 2, 4]))  # mean 3
    balance.update_bias(m)
    assert m.router.bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01])


def test_bias_updates_balance_a_skewed_router():
    """The aux-loss-free rule alone spreads a router that favours two experts."""
    m = make_moe(seed=1, bias_update_speed=0.02, n_expert_groups=1, n_limited_groups=1, n_shared_experts=0)
    with torch.no_grad():
        m.router.weight[:2] += 0.2  # experts 0 and 1 favoured for inputs with positive mean
    x = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(0)).abs()
    loads = []
    for _ in range(60):
        reset_routing_stats(m)
        with torch.no_grad():
            m(x)
        loads.append(routing_stats(m)["max_over_mean_load"][0])
        balance.update_bias(m)
    assert loads[0] > 2.5 and max(loads[-10:]) < 1.4  # 3.0 -> about 1.2 at this seed
