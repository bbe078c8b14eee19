"""The feed-forward layers: a dense SwiGLU MLP, and MoE = Router + Experts + shared experts.

Shapes: B batch, S sequence, T = B*S tokens, D model dim, K experts per token, E experts.

A token's path through `MoE.forward`:
  x_TD --Router--> (weights_TK, experts_TK)      which K experts, with which weights
       --Experts-> y_TD = sum_k weights_TK[:, k] * expert_{experts_TK[:, k]}(x_TD)
       + shared(x_TD)                            the always-on shared experts
The layer also counts tokens per expert (for logging and the aux-loss-free bias) and returns
its balancing loss terms, already multiplied by their coefficients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe import balance
from moe.config import ModelConfig
from moe.experts import Experts
from moe.init import init_weights
from moe.router import Router


class MLP(nn.Module):
    """Dense SwiGLU feed-forward of width inter_dim: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig, inter_dim: int):
        super().__init__()
        self.cfg = cfg
        self.w1 = nn.Linear(cfg.dim, inter_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, cfg.dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed experts plus shared experts. forward(x_BSD) -> (y_BSD, losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        # n_shared experts of width I behave exactly like one MLP of width n_shared * I
        self.shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # routing statistics, accumulated until reset_routing_stats (not saved in checkpoints)
        self.register_buffer("tokens_per_expert_E", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        # the ranks whose tokens form one batch for the batch-level aux loss (set by moe.parallel)
        self.group = None

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        r = self.router(x_TD)
        y_TD, counts_E, dropped = self.experts(x_TD, r.weights_TK, r.experts_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        with torch.no_grad():
            self.tokens_per_expert_E.add_(counts_E)
            self.dropped_tokens.add_(dropped)
        return y_TD.view(B, S, D), self.balance_losses(r, B)

    def balance_losses(self, r, batch: int) -> dict[str, torch.Tensor]:
        """The enabled balancing terms, each already times its coefficient."""
        cfg, losses = self.cfg, {}
        if cfg.aux_loss_alpha > 0:
            losses["aux"] = cfg.aux_loss_alpha * balance.switch_aux_loss(r.scores_TE, r.experts_TK, self.group)
        if cfg.seq_aux_loss_alpha > 0:
            losses["seq_aux"] = cfg.seq_aux_loss_alpha * balance.seq_aux_loss(r.scores_TE, r.experts_TK, batch)
        if cfg.z_loss_coef > 0:
            losses["z"] = cfg.z_loss_coef * balance.z_loss(r.logits_TE)
        return losses


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict[str, list[float]]:
    """Per MoE layer since the last reset: tokens per expert, max/mean load, dropped count."""
    layers = moe_layers(model)
    counts = [m.tokens_per_expert_E.tolist() for m in layers]
    return {
        "tokens_per_expert": counts,
        "max_over_mean_load": [max(c) / max(sum(c) / len(c), 1e-9) for c in counts],
        "dropped": [float(m.dropped_tokens) for m in layers],
    }


@torch.no_grad()
def reset_routing_stats(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.tokens_per_expert_E.zero_()
        m.dropped_tokens.zero_()
