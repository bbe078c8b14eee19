"""Exercises: the small functions behind DeepSeek-V3's Mixture-of-Experts.

Write the body of each function where it says `raise NotImplementedError`. Keep the names and
the signatures: the grader calls them. Shapes are in the names: T tokens, E experts, K experts
per token (top-k), B sequences, S positions per sequence, V vocabulary. Work in PyTorch; every
function fits in a few lines.

Grade yourself at any time (one exercise, or all of them; a .py file or this notebook):

    python -m moe.exercises grade topk_route moe_exercises.py
    python -m moe.exercises grade all moe_exercises.ipynb

Each check prints PASS or FAIL with what was wrong. The grader compares against the `moe`
package and torch itself on pinned cases and on random inputs (hypothesis).
"""

import math

import torch


def topk_route(scores_TE: torch.Tensor, k: int, bias_E: torch.Tensor | None = None, route_scale: float = 1.0,
               normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: which k experts each token goes to, and with what weight.

    scores_TE: router scores (sigmoid or softmax of the router logits), float32 [T, E].
    bias_E: DeepSeek-V3's load-balancing bias, or None. It is added to the scores to SELECT
    the experts (the k largest of scores + bias per token), but the weights are the UNBIASED
    scores of the chosen experts: divided by their sum over the k chosen when `normalize`,
    then multiplied by `route_scale`.
    Returns (weights_TK float32 [T, K], experts_TK int64 [T, K]), k distinct experts per token;
    the order within a row is free.
    DeepSeek-V3 technical report, section 2.1.2 (the gating values g_{i,t}); moe/router.py.
    """
    ### BEGIN SOLUTION
    select_TE = scores_TE if bias_E is None else scores_TE + bias_E
    experts_TK = select_TE.topk(k, dim=-1).indices
    weights_TK = scores_TE.gather(-1, experts_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK * route_scale, experts_TK
    ### END SOLUTION


def group_limited_topk(scores_TE: torch.Tensor, k: int, n_groups: int, n_limited_groups: int,
                       bias_E: torch.Tensor) -> torch.Tensor:
    """Group-limited top-k: each token may only use experts from its n_limited_groups best groups.

    The E experts form n_groups consecutive groups of E // n_groups (at least two each).
    selection = scores + bias. A group's score is the sum of its TWO largest selection values.
    Keep the n_limited_groups best groups per token; take the top-k selection values among
    their experts only. Experts of the other groups can never be chosen, even when every
    selection value is negative.
    Returns experts_TK (int64 [T, K], distinct per token, order free).
    DeepSeek-V3 report section 2.1.2 (node-limited routing: groups scored by the sum of their
    highest affinities) and its inference code's Gate; moe/router.py.
    """
    ### BEGIN SOLUTION
    T, E = scores_TE.shape
    select_TGe = (scores_TE + bias_E).reshape(T, n_groups, E // n_groups)
    group_scores_TG = select_TGe.topk(2, dim=-1).values.sum(dim=-1)
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_scores_TG.topk(n_limited_groups, dim=-1).indices, True)
    select_TE = select_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).reshape(T, E)
    return select_TE.topk(k, dim=-1).indices
    ### END SOLUTION


def switch_aux_loss(scores_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """The auxiliary load-balancing loss over a batch: E * sum_i f_i * P_i (1.0 at uniform load).

    f_i = the share of the T*K token-expert assignments in experts_TK that went to expert i.
    P_i = the mean over the T tokens of s_ti / sum_j s_tj (every token's scores as a
    distribution over all E experts, chosen or not).
    Returns a scalar tensor that stays differentiable with respect to scores_TE.
    Switch Transformer (Fedus et al.) section 2.2; DeepSeek-V2 section 2.2.3; moe/balance.py.
    """
    ### BEGIN SOLUTION
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    f_E = torch.bincount(experts_TK.flatten(), minlength=E).to(scores_TE.dtype) / (T * K)
    P_E = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).mean(dim=0)
    return E * (f_E * P_E).sum()
    ### END SOLUTION


def seq_aux_loss(scores_BSE: torch.Tensor, experts_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: switch_aux_loss of each sequence, averaged over B.

    For every sequence b on its own: f_i = share of its S*K assignments that went to expert i,
    P_i = mean over its S positions of s_ti / sum_j s_tj; loss_b = E * sum_i f_i * P_i.
    Returns the mean of loss_b over the B sequences, a scalar tensor differentiable with
    respect to scores_BSE.
    DeepSeek-V3 report section 2.1.2 (complementary sequence-wise auxiliary loss); moe/balance.py.
    """
    ### BEGIN SOLUTION
    B, S, E = scores_BSE.shape
    K = experts_BSK.shape[-1]
    counts_BE = torch.nn.functional.one_hot(experts_BSK, E).sum(dim=(1, 2)).to(scores_BSE.dtype)
    f_BE = counts_BE / (S * K)
    P_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return (E * (f_BE * P_BE).sum(dim=-1)).mean()
    ### END SOLUTION


def update_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """One step of auxiliary-loss-free balancing: bias + gamma * sign(mean load - load).

    tokens_per_expert_E: how many tokens each expert received (integer or float counts).
    Underloaded experts (below the mean load) get their bias raised by gamma, overloaded ones
    lowered by gamma, an expert exactly at the mean keeps its bias.
    Returns the new bias_E (float32 [E]).
    DeepSeek-V3 report section 2.1.2 (auxiliary-loss-free load balancing); moe/balance.py.
    """
    ### BEGIN SOLUTION
    load_E = tokens_per_expert_E.float()
    return bias_E + gamma * torch.sign(load_E.mean() - load_E)
    ### END SOLUTION


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Slots per expert when tokens beyond an expert's capacity are dropped.

    Every token makes top_k assignments, so a perfectly balanced expert receives
    n_tokens * top_k / n_experts of them; the capacity is capacity_factor times that,
    rounded up to a whole number of slots. Returns a Python int.
    Switch Transformer section 2.2 (expert capacity); moe/experts.py.
    """
    ### BEGIN SOLUTION
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)
    ### END SOLUTION


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest FP8 E4M3 value, returned as float32 (same shape).

    E4M3 (the "fn" variant DeepSeek-V3 trains with): 1 sign bit, 4 exponent bits (bias 7),
    3 mantissa bits. Normal values 2**e * (1 + m/8) for e in -6..8; below 2**-6 the values are
    subnormal, multiples of 2**-9. The largest is 448 and there is no infinity: larger
    magnitudes saturate to +-448. Round to nearest, ties to the value with an even last
    mantissa bit. The result must equal x.to(torch.float8_e4m3fn).float() for every finite x,
    but do not use float8 dtypes: the grader rejects a submission that does.
    DeepSeek-V3 report section 3.3 (FP8 training); the OCP 8-bit floating point specification.
    """
    ### BEGIN SOLUTION
    x = x.float()
    a = x.abs().clamp(max=448.0)  # everything above 448 saturates
    _, e = torch.frexp(a)  # a = m * 2**e with 0.5 <= m < 1: a lies in [2**(e-1), 2**e)
    step = torch.pow(2.0, (e - 1).clamp(min=-6) - 3)  # 3 mantissa bits; subnormals keep 2**-9
    return torch.copysign(torch.round(a / step) * step, x)  # torch.round: half to even
    ### END SOLUTION


def accept_draft(p_V: torch.Tensor, q_V: torch.Tensor, draft: int, u: float) -> bool:
    """Speculative sampling's acceptance test for one drafted token.

    p_V: the main model's next-token distribution; q_V: the drafter's, which sampled `draft`
    (so q_V[draft] > 0); u: a uniform random number in [0, 1).
    Accept iff u < min(1, p_V[draft] / q_V[draft]). Returns a bool.
    Leviathan et al., "Fast Inference from Transformers via Speculative Decoding", section 2.3;
    DeepSeek-V3 section 5.4.3 drafts with its MTP module; moe/generate.py.
    """
    ### BEGIN SOLUTION
    return bool(u < min(1.0, float(p_V[draft] / q_V[draft])))
    ### END SOLUTION


def residual_distribution(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """The distribution to resample from after a rejected draft: max(p - q, 0), normalised.

    This correction makes speculative sampling's output distributed exactly as p. When
    max(p - q, 0) is zero everywhere (p == q), return p itself.
    Returns p_V's shape, non-negative, summing to 1.
    Leviathan et al., section 2.3; moe/generate.py.
    """
    ### BEGIN SOLUTION
    residual_V = (p_V - q_V).clamp_min(0.0)
    total = residual_V.sum()
    return residual_V / total if total > 0 else p_V
    ### END SOLUTION
