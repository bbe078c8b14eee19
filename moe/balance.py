"""Load balancing: auxiliary losses, and DeepSeek-V3's auxiliary-loss-free bias update.

Shapes: B sequences, S positions, T = B*S tokens, E experts, K experts per token.

Without balancing, a router collapses onto a few experts: they get all the gradient, grow
better, and get chosen more. Three remedies are here:
  - switch_aux_loss: alpha * E * sum_i f_i * P_i over the batch (Switch Transformer, GShard,
    DeepSeek-V2's expert-level loss): f_i = share of assignments to expert i, P_i = mean score.
  - seq_aux_loss: the same quantity per sequence, averaged (DeepSeek-V3's "complementary
    sequence-wise" loss, used with a tiny alpha next to the bias).
  - update_bias: no loss at all. After each optimizer step, raise the selection bias of
    underloaded experts and lower it for overloaded ones by a fixed step gamma. The bias
    changes which experts are chosen, never the weights, so it adds no gradient noise.
Plus the router z-loss (ST-MoE), which keeps router logits small.
Each loss equals its coefficient times 1.0 when the load is perfectly uniform.
"""

from __future__ import annotations

import torch
from torch import nn


def _normalised(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores as a distribution over experts (a no-op for softmax, needed for sigmoid)."""
    return scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def switch_aux_loss(scores_TE: torch.Tensor, experts_TK: torch.Tensor, group=None) -> torch.Tensor:
    """E * sum_i f_i * P_i over all tokens; 1.0 at uniform load.

    With a process group (data parallel), f_i counts the assignments of every rank's tokens
    (one all-reduce of E counts, which carry no gradient) and P_i is this rank's mean score:
    the mean of this loss over the ranks is then the loss of the global batch, and so is the
    mean of its gradients (ranks with equal token counts, as in training).
    """
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    counts_E = torch.bincount(experts_TK.flatten(), minlength=E).to(scores_TE.dtype)
    n = T * K
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts_E, group=group)
        n *= dist.get_world_size(group)
    f_E = counts_E / n
    P_E = _normalised(scores_TE).mean(dim=0)
    return E * (f_E * P_E).sum()


def seq_aux_loss(scores_TE: torch.Tensor, experts_TK: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: switch_aux_loss per sequence, averaged."""
    T, E = scores_TE.shape
    K = experts_TK.shape[1]
    S = T // batch
    experts_BSK = experts_TK.view(batch, S * K)
    counts_BE = scores_TE.new_zeros(batch, E).scatter_add_(
        1, experts_BSK, scores_TE.new_ones(experts_BSK.shape))
    f_BE = counts_BE * (E / (S * K))
    P_BE = _normalised(scores_TE).view(batch, S, E).mean(dim=1)
    return (f_BE * P_BE).sum(dim=-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)^2): penalises large router logits."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@torch.no_grad()
def update_bias(model: nn.Module) -> None:
    """One aux-loss-free step for every MoE layer: bias += gamma * sign(mean load - load).

    Uses the tokens-per-expert counts each layer accumulated since the last
    `moe.layer.reset_routing_stats`; call it once per optimizer step, before resetting.
    """
    from moe.layer import MoE

    for m in model.modules():
        if isinstance(m, MoE) and m.router.bias is not None:
            load_E = m.tokens_per_expert_E.float()
            m.router.bias.add_(m.cfg.bias_update_speed * torch.sign(load_E.mean() - load_E))
