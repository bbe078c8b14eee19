"""Load-balancing pitfalls, each pinned: a check that passes on this code and catches the bug.

Every one of these shipped in a well-known MoE codebase at some point. Each test writes the
buggy variant next to the check (or compares with hand-computed values the bug would change)
and asserts the check rejects it, so the test cannot pass vacuously. docs/balancing.md lists
them with the test that pins each.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moe import balance
from moe import layer as layer_mod
from moe import train as train_mod
from moe.checkpoint import read_metrics
from moe.config import ModelConfig
from moe.layer import MoE, moe_layers, reset_routing_stats, routing_stats
from moe.model import IGNORE_INDEX, Transformer
from moe.router import Router, limit_groups
from moe.train import build_optimizer, train
from tests.test_layer import make_moe
from tests.test_train import TINY, tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

GAMMA = 0.01
# dense block, two MoE blocks, one MTP block (MoE too): four routers with a bias each
BIASED = TINY.replace(n_layers=3, n_mtp=1, bias_update_speed=GAMMA)


# ============================================================================ the correction bias
def weights_ignore_the_bias(r, scores_TE: torch.Tensor, cfg: ModelConfig) -> bool:
    """The check: the weights are the UNBIASED scores at the chosen experts (normalised, scaled)."""
    w = scores_TE.gather(1, r.experts_TK)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return torch.allclose(r.weights_TK, cfg.route_scale * w, atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_bias_never_leaks_into_the_gate_weights(norm):
    cfg = ModelConfig(dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                      score_func="sigmoid", norm_topk_prob=norm, route_scale=2.5, bias_update_speed=1e-3)
    torch.manual_seed(0)
    r = Router(cfg)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([1e3, 0, 0, 0, 0, 0, 0, -1e3]))  # a huge bias: expert 0 always chosen
    x = torch.randn(32, 8)
    out = r(x)
    assert (out.experts_TK == 0).any(dim=1).all() and not (out.experts_TK == 7).any()  # the bias did select
    assert weights_ignore_the_bias(out, out.scores_TE, cfg)
    # the bug: weights gathered from the biased selection scores
    leaked = (out.scores_TE + r.bias).gather(1, out.experts_TK)
    if norm:
        leaked = leaked / leaked.sum(-1, keepdim=True)
    assert not weights_ignore_the_bias(out._replace(weights_TK=cfg.route_scale * leaked), out.scores_TE, cfg)


def bias_problems(records: list[dict], gamma: float, totals: list[int]) -> list[str]:
    """The check on a run's metrics: after every optimizer step, every MoE layer's bias moved by
    exactly gamma * sign(mean load - load), with the loads counted over the whole step (all its
    micro-batches, once). Anything else (no update, per micro-batch, the optimizer or weight decay
    touching it, a layer skipped) breaks it. A record holds the bias its step routed with (before
    that step's update). Returns what is wrong, empty when all is right."""
    problems = []
    if any(v != 0 for b in records[0]["bias"] for v in b):
        problems.append("the bias does not start at 0")
    for r, after in zip(records, records[1:]):
        for i, (bias, load, new) in enumerate(zip(r["bias"], r["tokens_per_expert"], after["bias"])):
            if sum(load) != totals[i]:
                problems.append(f"step {r['step']} layer {i}: {sum(load)} assignments, expected {totals[i]}")
            mean = sum(load) / len(load)
            expect = [b + gamma * (0.0 if c == mean else math.copysign(1.0, mean - c)) for b, c in zip(bias, load)]
            if max(abs(n - e) for n, e in zip(new, expect)) > 1e-5:
                problems.append(f"after step {r['step']} layer {i}: bias {new}, expected {expect}")
    return problems


def run_biased(tmp_path, name: str, **tc) -> list[dict]:
    # a large weight decay and learning rate: if the optimizer touched the bias, it would show
    tc = tiny_run(tmp_path, name, steps=6, grad_accum=2, seq_len=16, eval_interval=0, weight_decay=0.5, **tc)
    train(tc, BIASED)
    return read_metrics(tc.out)


# per MoE layer, assignments per step: 2 micro-batches x 4 sequences x 16 positions x top-2; the
# MTP block sees 15 positions
TOTALS = [2 * 4 * 16 * 2] * 2 + [2 * 4 * 15 * 2]


def update_blocks_only(model: nn.Module) -> None:
    """Buggy: walks model.layers, so the MTP block's router is never balanced."""
    for blk in model.layers:
        if isinstance(blk.ffn, MoE):
            load = blk.ffn.tokens_per_expert_E
            blk.ffn.router.bias.add_(GAMMA * torch.sign(load.mean() - load))


def update_until_a_dense_block(model: nn.Module) -> None:
    """Buggy: stops at the first block without balancing (here the leading dense block)."""
    for blk in model.layers:
        if not isinstance(blk.ffn, MoE):
            break
        load = blk.ffn.tokens_per_expert_E
        blk.ffn.router.bias.add_(GAMMA * torch.sign(load.mean() - load))


def test_bias_moves_once_per_optimizer_step_in_every_layer(tmp_path):
    records = run_biased(tmp_path, "ok")
    assert len(records[0]["bias"]) == 4 - 1  # two blocks and the MTP block (the first block is dense)
    assert bias_problems(records, GAMMA, TOTALS) == []
    assert all(any(v != 0 for v in b) for b in records[-1]["bias"])  # it did move, every layer


@pytest.mark.parametrize("bug", ["never", "blocks only", "stop at dense", "per micro-batch"])
def test_bias_check_catches_each_broken_update(tmp_path, monkeypatch, bug):
    real_update = balance.update_bias
    if bug == "never":
        monkeypatch.setattr(train_mod, "update_bias", lambda model: None)
    elif bug == "blocks only":
        monkeypatch.setattr(train_mod, "update_bias", torch.no_grad()(update_blocks_only))
    elif bug == "stop at dense":
        monkeypatch.setattr(train_mod, "update_bias", torch.no_grad()(update_until_a_dense_block))
    else:  # updated inside the forward, from each micro-batch's partial counts
        real_forward = Transformer.forward

        def forward(self, tokens, targets=None, *args, **kwargs):
            out = real_forward(self, tokens, targets, *args, **kwargs)
            if targets is not None and self.training:
                real_update(self)
            return out

        monkeypatch.setattr(Transformer, "forward", forward)
        monkeypatch.setattr(train_mod, "update_bias", lambda model: None)
    problems = bias_problems(run_biased(tmp_path, bug.replace(" ", "_")), GAMMA, TOTALS)
    assert problems, bug


def bias_outside_the_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """The check: no router bias is a parameter, or in any optimizer group (so neither AdamW
    nor weight decay can move it; only update_bias does)."""
    biases = [m.router.bias for m in moe_layers(model) if m.router.bias is not None]
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = {id(p) for p in model.parameters()}
    return bool(biases) and all(id(b) not in in_groups and id(b) not in params for b in biases)


def test_bias_is_not_an_optimizer_parameter():
    model = Transformer(BIASED)
    assert bias_outside_the_optimizer(model, build_optimizer(model, train_mod.TrainConfig()))
    # the bug: the bias registered as an nn.Parameter (the optimizer and weight decay now own it)
    router = model.layers[-1].ffn.router
    bias = router._buffers.pop("bias")
    router.bias = nn.Parameter(bias)
    assert not bias_outside_the_optimizer(model, build_optimizer(model, train_mod.TrainConfig()))


def test_bias_freezes_for_the_last_fraction_of_the_run(tmp_path):
    tc = tiny_run(tmp_path, steps=10, eval_interval=0, bias_freeze_frac=0.3)
    train(tc, BIASED)
    records = read_metrics(tc.out)
    assert train_mod.bias_update_steps(tc) == 7
    biases = [r["bias"] for r in records]
    # records hold the bias each step routed with: steps 8, 9 and 10 route with the bias of step 7's update
    assert biases[7] == biases[8] == biases[9]
    assert biases[6] != biases[7]
    assert train_mod.bias_update_steps(train_mod.TrainConfig(steps=1000, bias_freeze_frac=0.034)) == 966


# ============================================================================ counting the loads
@pytest.mark.parametrize("reentrant", [False, True])
def test_loads_counted_once_under_activation_checkpointing(monkeypatch, reentrant):
    m = make_moe(n_shared_experts=0)

    def assignments_after_a_checkpointed_step() -> float:
        reset_routing_stats(m)
        x = torch.randn(2, 8, 16, requires_grad=True)
        # recompute the whole forward (by default the non-reentrant kind stops once it has the
        # tensors backward needs, which here happens to be before the counting)
        with set_checkpoint_early_stop(False):
            y = checkpoint(lambda x: m(x)[0], x, use_reentrant=reentrant)
            y.square().sum().backward()  # the forward runs again in here
        assert m.experts.w1.grad is not None
        return sum(routing_stats(m)["tokens_per_expert"][0])

    assert assignments_after_a_checkpointed_step() == 2 * 8 * 2
    monkeypatch.setattr(layer_mod, "_recomputing", lambda: False)  # the bug: count every forward
    assert assignments_after_a_checkpointed_step() == 2 * (2 * 8 * 2)


def test_loads_stay_exact_counts_in_a_bf16_model():
    m = make_moe(n_shared_experts=0, expert_impl="loop").to(torch.bfloat16)
    assert all(getattr(m, name).dtype == torch.float32 for name in layer_mod.STATS_BUFFERS)
    x = torch.randn(8, 128, 16, dtype=torch.bfloat16)
    reset_routing_stats(m)
    with torch.no_grad():
        m(x)
    loads = routing_stats(m)["tokens_per_expert"][0]
    r = m.router(x.view(-1, 16))
    assert loads == torch.bincount(r.experts_TK.flatten(), minlength=8).float().tolist()
    assert sum(loads) == 8 * 128 * 2 and max(loads) > 256
    # the bug: counts kept in bf16 (as the model's other buffers are) stop being exact at 256
    assert torch.tensor(256.0, dtype=torch.bfloat16) + 1 == 256


def test_loads_cover_each_micro_batch_once_under_gradient_accumulation(tmp_path):
    # also pinned by test_train.py::test_metrics_record_the_promised_fields; here with the bias:
    # bias_problems checks every step's loads sum to grad_accum x B x S x K (TOTALS)
    records = run_biased(tmp_path, "accum")
    assert all(sum(row) == total for r in records for row, total in zip(r["tokens_per_expert"], TOTALS))


def test_padding_counts_in_neither_the_loads_nor_the_losses():
    """Right padding (targets IGNORE_INDEX) must change nothing: loads and balance losses equal
    those of the unpadded prefix (causal attention: the real positions see the same context)."""
    cfg = TINY.replace(n_layers=3, n_mtp=1, aux_loss_alpha=0.01, seq_aux_loss_alpha=0.01, z_loss_coef=1e-3)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 256, (2, 20))
    n = 12
    targets = torch.randint(0, 256, (2, 20))
    padded_targets = targets.clone()
    padded_targets[:, n:] = IGNORE_INDEX

    def run(tok, tgt):
        reset_routing_stats(model)
        with torch.no_grad():
            losses = model(tok, tgt)[1]
        return routing_stats(model)["tokens_per_expert"], losses

    loads, losses = run(tokens[:, :n], targets[:, :n])
    padded_loads, padded_losses = run(tokens, padded_targets)
    assert padded_loads == loads
    for k in ("aux", "seq_aux", "z", "ce", "mtp"):
        torch.testing.assert_close(padded_losses[k], losses[k], msg=k)
    # the bug (what this code did before): every position counted, padding included
    counted_all, _ = run(tokens, targets)
    assert counted_all != loads
    assert [sum(c) for c in counted_all] == [2 * 20 * 2] * 2 + [2 * 19 * 2]


# ============================================================================ the Switch loss itself
def switch_topk_only(scores_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Buggy: P_i averaged over the renormalised top-k weights only."""
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    w_TK = scores_TE.gather(1, experts_TK)
    w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    P_E = scores_TE.new_zeros(E).scatter_add(0, experts_TK.flatten(), w_TK.flatten()) / T
    f_E = torch.bincount(experts_TK.flatten(), minlength=E).float() / (T * K)
    return E * (f_E * P_E).sum()


def loss_steers_the_router(loss_fn) -> bool:
    """The check: with the routing fixed, the loss still depends on the router's scores (so it has
    a gradient that moves probability away from the overloaded expert)."""
    logits = torch.tensor([[2.0, 0.5, 0.0, -1.0], [1.5, 1.0, -0.5, 0.0], [3.0, 0.0, 0.0, 0.0]], requires_grad=True)
    scores = logits.softmax(-1)
    experts = torch.zeros(3, 1, dtype=torch.long)  # top-1: everything on expert 0
    loss = loss_fn(scores, experts)
    (g,) = torch.autograd.grad(loss, logits)
    return bool(g.abs().max() > 1e-3 and (g[:, 0] > 0).all())  # descent lowers expert 0's logit


def test_p_i_is_over_all_experts_not_the_top_k():
    assert loss_steers_the_router(balance.switch_aux_loss)
    assert not loss_steers_the_router(switch_topk_only)
    # the buggy loss is constant: E * sum f^2 = 4 whatever the scores
    scores = torch.rand(3, 4).softmax(-1)
    assert switch_topk_only(scores, torch.zeros(3, 1, dtype=torch.long)).item() == pytest.approx(4.0)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_uniform_routing_gives_exactly_one_for_any_k(K, score):
    E, T = 8, 16
    experts = (torch.arange(T * K) % E).view(T, K)  # every expert chosen equally often, K distinct per token
    assert all(len(set(row)) == K for row in experts.tolist())
    scores = torch.full((T, E), 1 / E) if score == "softmax" else torch.full((T, E), 0.3)  # sigmoid: unnormalised
    assert balance.switch_aux_loss(scores, experts).item() == pytest.approx(1.0)
    assert balance.seq_aux_loss(scores, experts, batch=2).item() == pytest.approx(1.0)
    # the bug: f_i not divided by K, so uniform load reads as K
    f_not_by_k = torch.bincount(experts.flatten(), minlength=E).float() / T
    assert (E * (f_not_by_k * balance._normalised(scores).mean(0)).sum()).item() == pytest.approx(K)


def test_scaling_the_sigmoid_scores_cannot_game_the_loss():
    """s / max(sum s, tiny), not s / (sum s + eps): shrinking every score must not lower the loss."""
    torch.manual_seed(0)
    scores = torch.rand(16, 8) * 0.5 + 0.25
    experts = scores.topk(2, dim=-1).indices
    base = balance.switch_aux_loss(scores, experts)
    for c in (1e-3, 1e-6, 1e-9):
        torch.testing.assert_close(balance.switch_aux_loss(c * scores, experts), base)

    def with_eps(s):  # the bug
        P = (s / (s.sum(-1, keepdim=True) + 1e-6)).mean(0)
        f = torch.bincount(experts.flatten(), minlength=8).float() / (16 * 2)
        return 8 * (f * P).sum()

    assert with_eps(scores).item() == pytest.approx(base.item(), rel=1e-5)
    assert with_eps(1e-7 * scores).item() < 0.5 * base.item()  # a router could win by shrinking all scores


def test_the_loss_is_one_at_balance_and_can_read_below_one_only_when_f_and_p_disagree():
    # P = f (the scores agree with the choices): E * sum f^2 >= 1, equal only at uniform load
    f = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert 4 * (f * f).sum().item() == pytest.approx(1.2)
    # f and P disagree: two half-batches each send top-1 to expert 2 or 3 although experts 0 and 1
    # hold more of the probability mass: 4 * (0.5 * 0.2 + 0.5 * 0.2) = 0.8
    scores = torch.tensor([[0.3, 0.3, 0.4, 0.0], [0.3, 0.3, 0.0, 0.4]])
    experts = torch.tensor([[2], [3]])
    assert balance.switch_aux_loss(scores, experts).item() == pytest.approx(0.8)


def test_f_i_is_the_routed_share_before_capacity_drops():
    m = make_moe(n_shared_experts=0, n_expert_groups=1, n_limited_groups=1, aux_loss_alpha=1.0, capacity_factor=1.0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[:2, 0] = 5.0  # every token with x_0 > 0 goes to experts 0 and 1
        m.router.weight[2:, 0] = -5.0
    x = torch.randn(1, 64, 16).abs()
    reset_routing_stats(m)
    _, losses = m(x)
    r = m.router(x.view(-1, 16))
    assert (r.experts_TK.sort(dim=1).values == torch.tensor([0, 1])).all()  # collapsed onto two experts
    stats = routing_stats(m)
    assert stats["dropped"][0] > 0  # capacity 1.0 dropped most of it
    routed = balance.switch_aux_loss(r.scores_TE, r.experts_TK)
    torch.testing.assert_close(losses["aux"], routed)
    assert routed.item() > 3.0  # the collapse shows: near E/K = 4
    # the bug: f_i from the kept assignments (what the dispatch computed) reads as nearly balanced
    cap = math.ceil(1.0 * 64 * 2 / 8)
    kept_E = torch.tensor([cap, cap, 0, 0, 0, 0, 0, 0], dtype=torch.float)
    after_drops = 8 * (kept_E / (64 * 2) * balance._normalised(r.scores_TE).mean(0)).sum()
    assert after_drops.item() < 0.35 * routed.item()


def test_each_layer_balances_its_own_tokens():
    """Two layers collapsed onto different experts are imbalanced; a loss over both layers'
    tokens at once (f and P of the concatenation) calls them balanced."""
    E = 2
    layer_a = (torch.tensor([[1.0, 0.0]] * 4), torch.zeros(4, 1, dtype=torch.long))
    layer_b = (torch.tensor([[0.0, 1.0]] * 4), torch.ones(4, 1, dtype=torch.long))
    per_layer = sum(balance.switch_aux_loss(s, e) for s, e in (layer_a, layer_b))
    assert per_layer.item() == pytest.approx(2 * E)  # each layer at its maximum, E
    concatenated = balance.switch_aux_loss(torch.cat([layer_a[0], layer_b[0]]), torch.cat([layer_a[1], layer_b[1]]))
    assert concatenated.item() == pytest.approx(1.0)  # the bug: "perfectly balanced"
    # and the model does sum per-layer losses: capture every router, recompute, compare
    cfg = TINY.replace(n_layers=3, aux_loss_alpha=0.5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    seen = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: seen.append(out)) for m in moe_layers(model)]
    tokens = torch.randint(0, 256, (2, 9))
    losses = model(tokens[:, :-1], tokens[:, 1:])[1]
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    expected = sum(0.5 * balance.switch_aux_loss(r.scores_TE, r.experts_TK) for r in seen)
    torch.testing.assert_close(losses["aux"], expected)


# ============================================================================ group-limited routing
def test_groups_are_masked_with_minus_infinity():
    # biased selection scores, all negative (the bias pushed every expert down); group 0 is best
    select = torch.tensor([[-0.2, -0.3, -0.9, -0.8, -0.6, -0.7, -0.95, -0.99]])
    masked = limit_groups(select, n_groups=4, n_limited=1, top2=True)
    picks = lambda masked_TE: sorted(masked_TE.topk(2, dim=-1).indices[0].tolist())
    assert picks(masked) == [0, 1]
    assert masked[0, 2:].eq(float("-inf")).all()
    # the bug: masked experts set to 0, which now beats every kept (negative) score
    zero_masked = torch.where(masked == float("-inf"), torch.zeros_like(select), select)
    assert not set(picks(zero_masked)) & {0, 1}
    # and end to end through the router, with a large negative bias
    cfg = ModelConfig(dim=8, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=1,
                      score_func="sigmoid", bias_update_speed=1e-3)
    torch.manual_seed(0)
    r = Router(cfg)
    with torch.no_grad():
        r.bias.fill_(-5.0)
    groups = r(torch.randn(64, 8)).experts_TK // 2
    assert (groups[:, 0] == groups[:, 1]).all()


def test_group_score_is_the_sum_of_the_top2_biased_scores():
    scores = torch.tensor([[0.90, 0.10, 0.60, 0.55, 0.70, 0.50, 0.05, 0.05]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -0.2, 0.0, 0.0])
    select = scores + bias
    # group sums of the top-2 biased scores: 1.00, 1.15, 1.00, 0.10 -> group 1
    chosen = limit_groups(select, n_groups=4, n_limited=1, top2=True).topk(2).indices
    assert sorted(chosen[0].tolist()) == [2, 3]
    # the bugs: the max (group 0), or the top-2 sum of the unbiased scores (group 2: 1.20)
    by_max = limit_groups(select, n_groups=4, n_limited=1, top2=False).topk(2).indices
    assert sorted(by_max[0].tolist()) == [0, 1]
    unbiased_groups = limit_groups(scores, n_groups=4, n_limited=1, top2=True) > float("-inf")
    by_unbiased = select.masked_fill(~unbiased_groups, float("-inf")).topk(2).indices
    assert sorted(by_unbiased[0].tolist()) == [4, 5]


# ============================================================================ one routing, one CE
def loss_matches_the_dispatch(loss: torch.Tensor, loads_E: list[float], scores_TE: torch.Tensor, K: int,
                              alpha: float) -> bool:
    """The check: the loss equals alpha * E * sum f_i P_i with f_i from the loads the dispatch
    counted (so the loss saw the biased, group-limited choice the tokens really took)."""
    E, T = len(loads_E), scores_TE.shape[0]
    f = torch.tensor(loads_E) / (T * K)
    expected = alpha * E * float((f * balance._normalised(scores_TE.detach()).mean(0)).sum())
    return math.isclose(float(loss.detach()), expected, rel_tol=1e-5)


def test_seq_aux_loss_uses_the_routing_the_dispatch_used():
    m = make_moe(n_shared_experts=0, seq_aux_loss_alpha=1.0, bias_update_speed=1e-3)
    with torch.no_grad():
        m.router.bias.copy_(torch.tensor([0.0, 0, 0, 0, 0, 0, 2.0, 2.0]))  # experts 6 and 7 always chosen
    x = torch.randn(1, 32, 16)
    reset_routing_stats(m)
    _, losses = m(x)
    loads = routing_stats(m)["tokens_per_expert"][0]
    assert loads[6] == loads[7] == 32
    r = m.router(x.view(-1, 16))
    assert loss_matches_the_dispatch(losses["seq_aux"], loads, r.scores_TE, K=2, alpha=1.0)
    # the bug: the loss recomputes a plain top-k of the unbiased scores, not the dispatch's choice
    plain = balance.seq_aux_loss(r.scores_TE, r.scores_TE.topk(2, dim=-1).indices, batch=1)
    assert not loss_matches_the_dispatch(plain, loads, r.scores_TE, K=2, alpha=1.0)


def ce_is_pure(logged: float, model: Transformer, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> bool:
    """The check: the logged number is the cross entropy of the logits, nothing added."""
    with torch.no_grad():
        logits = model(tokens_BS)[0]
    return math.isclose(logged, F.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()).item(), rel_tol=1e-5)


def test_logged_ce_holds_no_balancing_terms(tmp_path):
    cfg = TINY.replace(aux_loss_alpha=1.0, seq_aux_loss_alpha=1.0, z_loss_coef=1.0)  # terms as large as the CE
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 256, (2, 17))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        losses = model(x, y)[1]
    assert ce_is_pure(losses["ce"].item(), model, x, y)
    assert not ce_is_pure(losses["loss"].item(), model, x, y)  # the bug: logging "loss" as the CE
    torch.testing.assert_close(losses["loss"], losses["ce"] + losses["aux"] + losses["seq_aux"] + losses["z"])
    # the training loop: "ce" and the validation loss are CE; "loss" carries the terms
    tc = tiny_run(tmp_path, steps=3, eval_interval=0)
    result = train(tc, cfg)
    for r in read_metrics(tc.out):
        assert r["loss"] - r["ce"] == pytest.approx(r["aux"] + r["seq_aux"] + r["z"], abs=1e-4)
        assert r["aux"] > 0.5  # so mixing them in would show
    from moe.data import eval_starts, load_corpus, windows

    corpus = load_corpus(tc.data)
    xs, ys = windows(corpus.val, eval_starts(corpus.val, tc.seq_len, tc.eval_windows), tc.seq_len)
    assert ce_is_pure(result.val_loss, result.model.eval(), xs, ys)
