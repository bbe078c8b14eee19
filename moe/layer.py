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

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe import balance
from moe.config import ModelConfig
from moe.experts import Experts
from moe.router import Router


class MLP(nn.Module):
    """Dense SwiGLU feed-forward: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

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
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # routing statistics, accumulated until reset_routing_stats (not saved in checkpoints)
        self.register_buffer("tokens_per_expert_E", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)

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
            losses["aux"] = cfg.aux_loss_alpha * balance.switch_aux_loss(r.scores_TE, r.experts_TK)
        if cfg.seq_aux_loss_alpha > 0:
            losses["seq_aux"] = cfg.seq_aux_loss_alpha * balance.seq_aux_loss(r.scores_TE, r.experts_TK, batch)
        if cfg.z_loss_coef > 0:
            losses["z"] = cfg.z_loss_coef * balance.z_loss(r.logits_TE)
        return losses


# parameters that write into the residual stream: their init is scaled down by depth
OUT_PROJECTIONS = ("wo.weight", "w2.weight", "experts.w2")


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Every matrix ~ N(0, init_std); residual output projections scaled by 1/sqrt(2 n_layers).

    The one init rule: Transformer.init_weights calls it, and so can a standalone MoE or MLP.
    Routers are random too: a zero router scores every expert alike and top-k would then
    pick by index, not by token. RMSNorm weights (1-D) are left alone.
    """
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=out_std if name.endswith(OUT_PROJECTIONS) else cfg.init_std)


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
