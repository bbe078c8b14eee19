"""Known-wrong solutions: the classic mistakes, at least two per exercise.

Each function is a plausible submission with exactly one mistake, registered with the
sentence the grader prints when a submission's output matches it. CI (tests/test_exercises.py)
requires every one of them to fail the grader.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

WRONG: dict[str, list[Callable]] = {}


def mistake(exercise: str, what: str) -> Callable[[Callable], Callable]:
    """Register a known-wrong solution of `exercise`; `what` names the mistake for the student."""

    def register(fn: Callable) -> Callable:
        fn.mistake = what
        WRONG.setdefault(exercise, []).append(fn)
        return fn

    return register


# ------------------------------------------------------------------------------ topk_route
@mistake("topk_route", "the weights were taken from the biased scores (scores + bias) instead of the scores")
def topk_route_weights_from_biased_scores(scores_TE, k, bias_E=None, route_scale=1.0, normalize=True):
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E
    weights_TK, experts_TK = select_TE.topk(k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK * route_scale, experts_TK


@mistake("topk_route", "the chosen scores were normalised with a softmax over the top-k instead of "
                       "dividing by their sum")
def topk_route_softmax_over_topk(scores_TE, k, bias_E=None, route_scale=1.0, normalize=True):
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E
    experts_TK = select_TE.topk(k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, experts_TK)
    if normalize:
        weights_TK = weights_TK.softmax(dim=-1)
    return weights_TK * route_scale, experts_TK


@mistake("topk_route", "route_scale was applied before normalising, so the normalisation undid it")
def topk_route_scale_before_normalizing(scores_TE, k, bias_E=None, route_scale=1.0, normalize=True):
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E
    experts_TK = select_TE.topk(k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, experts_TK) * route_scale
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, experts_TK


@mistake("topk_route", "the bias was ignored when selecting the experts")
def topk_route_bias_ignored(scores_TE, k, bias_E=None, route_scale=1.0, normalize=True):
    weights_TK, experts_TK = scores_TE.topk(k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK * route_scale, experts_TK


# ------------------------------------------------------------------------------ group_limited_topk
def _group_limited(scores_TE, k, n_groups, n_limited_groups, bias_E, group_score, fill):
    T, E = scores_TE.shape
    select_TGe = (scores_TE + bias_E).reshape(T, n_groups, E // n_groups)
    keep_TM = group_score(select_TGe).topk(n_limited_groups, dim=-1).indices
    keep_TG = torch.zeros(T, n_groups, dtype=torch.bool).scatter(1, keep_TM, True)
    return select_TGe.masked_fill(~keep_TG.unsqueeze(-1), fill).reshape(T, E).topk(k, dim=-1).indices


@mistake("group_limited_topk", "a group was scored by its largest selection value (max) instead of the sum of "
                               "its two largest")
def group_limited_topk_max_group_score(scores_TE, k, n_groups, n_limited_groups, bias_E):
    return _group_limited(scores_TE, k, n_groups, n_limited_groups, bias_E,
                          lambda s: s.amax(dim=-1), float("-inf"))


@mistake("group_limited_topk", "the other groups were masked with 0 instead of -inf, so they still win when "
                               "the selection values are negative")
def group_limited_topk_zero_mask(scores_TE, k, n_groups, n_limited_groups, bias_E):
    return _group_limited(scores_TE, k, n_groups, n_limited_groups, bias_E,
                          lambda s: s.topk(2, dim=-1).values.sum(dim=-1), 0.0)


@mistake("group_limited_topk", "a group was scored by the sum of all its experts instead of its two largest")
def group_limited_topk_sum_all_group_score(scores_TE, k, n_groups, n_limited_groups, bias_E):
    return _group_limited(scores_TE, k, n_groups, n_limited_groups, bias_E,
                          lambda s: s.sum(dim=-1), float("-inf"))


@mistake("group_limited_topk", "the groups were ignored: a plain top-k over all experts")
def group_limited_topk_groups_ignored(scores_TE, k, n_groups, n_limited_groups, bias_E):
    return (scores_TE + bias_E).topk(k, dim=-1).indices


# ------------------------------------------------------------------------------ switch_aux_loss
def _counts(experts_TK, E, dtype):
    return torch.bincount(experts_TK.flatten(), minlength=E).to(dtype)


@mistake("switch_aux_loss", "f_i was not divided by K: it is the share of the T*K assignments, not of the T tokens")
def switch_aux_loss_f_not_divided_by_k(scores_TE, experts_TK):
    T, E = scores_TE.shape
    f_E = _counts(experts_TK, E, scores_TE.dtype) / T
    P_E = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).mean(dim=0)
    return E * (f_E * P_E).sum()


@mistake("switch_aux_loss", "P_i was computed over the top-k (only the chosen experts' scores) instead of "
                            "every expert's score")
def switch_aux_loss_p_over_topk(scores_TE, experts_TK):
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    f_E = _counts(experts_TK, E, scores_TE.dtype) / (T * K)
    probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    chosen_TE = torch.zeros_like(probs_TE).scatter(1, experts_TK, probs_TE.gather(1, experts_TK))
    return E * (f_E * chosen_TE.mean(dim=0)).sum()


@mistake("switch_aux_loss", "P_i used the raw scores: each token's scores were not divided by their sum")
def switch_aux_loss_unnormalised_scores(scores_TE, experts_TK):
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    f_E = _counts(experts_TK, E, scores_TE.dtype) / (T * K)
    return E * (f_E * scores_TE.mean(dim=0)).sum()


@mistake("switch_aux_loss", "the factor E was left out (the loss should be 1.0 at uniform load)")
def switch_aux_loss_no_e_factor(scores_TE, experts_TK):
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    f_E = _counts(experts_TK, E, scores_TE.dtype) / (T * K)
    P_E = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).mean(dim=0)
    return (f_E * P_E).sum()


# ------------------------------------------------------------------------------ seq_aux_loss
def _seq_loss(scores_BSE, experts_BSK, f_scale, p_over_topk=False):
    B, S, E = scores_BSE.shape
    K = experts_BSK.shape[-1]
    counts_BE = F.one_hot(experts_BSK, E).sum(dim=(1, 2)).to(scores_BSE.dtype)
    probs_BSE = scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)
    if p_over_topk:
        probs_BSE = (F.one_hot(experts_BSK, E).sum(dim=2) > 0) * probs_BSE
    return (E * (counts_BE / f_scale(S, K) * probs_BSE.mean(dim=1)).sum(dim=-1)).mean()


@mistake("seq_aux_loss", "f and P were computed over the whole batch instead of per sequence")
def seq_aux_loss_over_the_batch(scores_BSE, experts_BSK):
    B, S, E = scores_BSE.shape  # the batch as one long sequence
    return _seq_loss(scores_BSE.reshape(1, B * S, E), experts_BSK.reshape(1, B * S, -1), lambda S, K: S * K)


@mistake("seq_aux_loss", "f_i was not divided by K: it is the share of the sequence's S*K assignments")
def seq_aux_loss_f_not_divided_by_k(scores_BSE, experts_BSK):
    return _seq_loss(scores_BSE, experts_BSK, lambda S, K: S)


@mistake("seq_aux_loss", "P_i was computed over the top-k (only the chosen experts' scores) instead of "
                         "every expert's score")
def seq_aux_loss_p_over_topk(scores_BSE, experts_BSK):
    return _seq_loss(scores_BSE, experts_BSK, lambda S, K: S * K, p_over_topk=True)


# ------------------------------------------------------------------------------ update_bias
@mistake("update_bias", "the sign is reversed: overloaded experts were pushed up instead of down")
def update_bias_reversed_sign(bias_E, tokens_per_expert_E, gamma):
    load_E = tokens_per_expert_E.float()
    return bias_E + gamma * torch.sign(load_E - load_E.mean())


@mistake("update_bias", "the step was proportional to the imbalance (gamma * (mean - load)) instead of "
                        "gamma * sign(mean - load)")
def update_bias_proportional(bias_E, tokens_per_expert_E, gamma):
    load_E = tokens_per_expert_E.float()
    return bias_E + gamma * (load_E.mean() - load_E)


@mistake("update_bias", "the load was compared with the largest load instead of the mean load")
def update_bias_against_max(bias_E, tokens_per_expert_E, gamma):
    load_E = tokens_per_expert_E.float()
    return bias_E + gamma * torch.sign(load_E.max() - load_E)


# ------------------------------------------------------------------------------ expert_capacity
@mistake("expert_capacity", "the capacity left out top_k: with k > 1 most assignments would be dropped")
def expert_capacity_without_k(capacity_factor, n_tokens, top_k, n_experts):
    return math.ceil(capacity_factor * n_tokens / n_experts)


@mistake("expert_capacity", "the capacity was truncated (int / floor) instead of rounded up")
def expert_capacity_truncated(capacity_factor, n_tokens, top_k, n_experts):
    return int(capacity_factor * n_tokens * top_k / n_experts)


@mistake("expert_capacity", "the capacity was rounded to nearest instead of rounded up")
def expert_capacity_rounded(capacity_factor, n_tokens, top_k, n_experts):
    return round(capacity_factor * n_tokens * top_k / n_experts)


# ------------------------------------------------------------------------------ round_to_e4m3
def _e4m3(x, rounding, saturate=True, min_exponent=-6):
    x = x.float()
    a = x.abs().clamp(max=448.0) if saturate else x.abs()
    _, e = torch.frexp(a)
    e = e - 1 if min_exponent is None else (e - 1).clamp(min=min_exponent)
    step = torch.pow(2.0, e - 3)
    return torch.copysign(rounding(a / step) * step, x)


@mistake("round_to_e4m3", "the mantissa was truncated (rounded toward zero) instead of rounded to nearest")
def round_to_e4m3_truncated(x):
    return _e4m3(x, torch.floor)


@mistake("round_to_e4m3", "ties were rounded away from zero instead of to the even neighbour")
def round_to_e4m3_half_away_from_zero(x):
    return _e4m3(x, lambda v: torch.floor(v + 0.5))


@mistake("round_to_e4m3", "no saturation: magnitudes above 448 must become +-448 (e4m3fn has no infinity)")
def round_to_e4m3_no_saturation(x):
    return _e4m3(x, torch.round, saturate=False)


@mistake("round_to_e4m3", "no subnormals: below 2**-6 the spacing must stay 2**-9, not keep shrinking")
def round_to_e4m3_no_subnormals(x):
    return _e4m3(x, torch.round, min_exponent=None)


@mistake("round_to_e4m3", "values below the smallest normal (2**-6) were flushed to zero instead of rounded "
                          "to the subnormals")
def round_to_e4m3_flush_subnormals(x):
    y = _e4m3(x, torch.round)
    return torch.where(x.abs() < 2.0**-6, torch.zeros_like(y), y)


@mistake("round_to_e4m3", "it used torch's float8 dtype, which the exercise asks you to implement")
def round_to_e4m3_uses_float8(x):
    return x.to(torch.float8_e4m3fn).float()


# ------------------------------------------------------------------------------ accept_draft
@mistake("accept_draft", "the ratio is inverted: it must be p[draft] / q[draft] (main model over drafter)")
def accept_draft_ratio_inverted(p_V, q_V, draft, u):
    return bool(u < min(1.0, float(q_V[draft] / p_V[draft])))


@mistake("accept_draft", "the comparison is reversed: accept when u < ratio, not u > ratio")
def accept_draft_comparison_reversed(p_V, q_V, draft, u):
    return bool(u > min(1.0, float(p_V[draft] / q_V[draft])))


@mistake("accept_draft", "u was ignored: a draft with p < q must still be accepted with probability p/q")
def accept_draft_ignores_u(p_V, q_V, draft, u):
    return bool(p_V[draft] >= q_V[draft])


# ------------------------------------------------------------------------------ residual_distribution
@mistake("residual_distribution", "max(p - q, 0) was not normalised to sum to 1")
def residual_distribution_unnormalised(p_V, q_V):
    return (p_V - q_V).clamp_min(0.0)


@mistake("residual_distribution", "the difference is inverted: it must be max(p - q, 0), not max(q - p, 0)")
def residual_distribution_inverted(p_V, q_V):
    residual_V = (q_V - p_V).clamp_min(0.0)
    total = residual_V.sum()
    return residual_V / total if total > 0 else p_V


@mistake("residual_distribution", "no fallback: when p == q the residual is all zero and 0/0 gives NaN; "
                                  "return p itself then")
def residual_distribution_no_fallback(p_V, q_V):
    residual_V = (p_V - q_V).clamp_min(0.0)
    return residual_V / residual_V.sum()
