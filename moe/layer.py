"""The feed-forward layers: a dense SwiGLU MLP, and MoE = Router + Experts + shared experts.

Shapes: B batch, S sequence, T = B*S tokens, D model dim, K experts per token, E experts.

A token's path through `MoE.forward`:
  x_TD --Router--> (weights_TK, experts_TK)      which K experts, with which weights
       --Experts-> y_TD = sum_k weights_TK[:, k] * expert_{experts_TK[:, k]}(x_TD)
       + shared(x_TD)                            the always-on shared experts
The layer also counts the router's assignments per expert (for logging and the aux-loss-free
bias; once per forward, not again when activation checkpointing recomputes it) and returns its
balancing loss terms, already multiplied by their coefficients.
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


STATS_BUFFERS = ("tokens_per_expert_E", "dropped_tokens", "entropy_sum", "counted_tokens")


class MoE(nn.Module):
    """Routed experts plus shared experts. forward(x_BSD) -> (y_BSD, losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        # n_shared experts of width I behave exactly like one MLP of width n_shared * I
        self.shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        # routing statistics, accumulated until reset_routing_stats (not saved in checkpoints):
        # assignments the router made to each expert (before capacity drops), the assignments
        # dropped, and the summed router entropy over the tokens counted. Always fp32 (_apply).
        self.register_buffer("tokens_per_expert_E", torch.zeros(cfg.n_routed_experts), persistent=False)
        for name in STATS_BUFFERS[1:]:
            self.register_buffer(name, torch.zeros(()), persistent=False)
        # the ranks whose tokens form one batch for the batch-level aux loss (set by moe.parallel)
        self.group = None

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .bfloat16() move the statistics with the model but keep them fp32:
        a bf16 count stops being exact at 256 (256 + 1 == 256), and the bias steers by them."""
        stats = {name: self._buffers.pop(name) for name in STATS_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in stats.items():
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == torch.float32 else buf.to(moved.device, torch.float32)
        return self

    def forward(self, x_BSD: torch.Tensor,
                valid_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """valid_BS (optional, bool): the tokens that count for balancing; the others (padding,
        positions without a target) are still computed but left out of the loads and losses."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        valid_T = None if valid_BS is None else valid_BS.reshape(B * S)
        r = self.router(x_TD)
        y_TD, _, dropped = self.experts(x_TD, r.weights_TK, r.experts_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if not _recomputing():
            self.count(r, dropped, valid_T)
        return y_TD.view(B, S, D), self.balance_losses(r, B, valid_T)

    @torch.no_grad()
    def count(self, r, dropped: torch.Tensor, valid_T: torch.Tensor | None = None) -> None:
        """Add one forward's routing to the statistics: the same choices the dispatch used."""
        T, K = r.experts_TK.shape
        w_T = r.scores_TE.new_ones(T) if valid_T is None else valid_T.to(r.scores_TE.dtype)
        self.tokens_per_expert_E.scatter_add_(0, r.experts_TK.flatten(), w_T.repeat_interleave(K))
        self.dropped_tokens.add_(dropped)
        self.entropy_sum.add_((balance.router_entropy_bits(r.scores_TE) * w_T).sum())
        self.counted_tokens.add_(w_T.sum())

    def balance_losses(self, r, batch: int, valid_T: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The enabled balancing terms of this layer's routing, each already times its coefficient."""
        cfg, losses = self.cfg, {}
        if cfg.aux_loss_alpha > 0:
            losses["aux"] = cfg.aux_loss_alpha * balance.switch_aux_loss(r.scores_TE, r.experts_TK, valid_T,
                                                                         self.group)
        if cfg.seq_aux_loss_alpha > 0:
            losses["seq_aux"] = cfg.seq_aux_loss_alpha * balance.seq_aux_loss(r.scores_TE, r.experts_TK, batch,
                                                                              valid_T)
        if cfg.z_loss_coef > 0:
            losses["z"] = cfg.z_loss_coef * balance.z_loss(r.logits_TE, valid_T)
        return losses


def _recomputing() -> bool:
    """True while autograd re-runs a forward inside backward (activation checkpointing): that
    forward was counted when it first ran, and counting it again would double the loads."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def routing_stats(model: nn.Module) -> dict[str, list]:
    """Per MoE layer (blocks, then MTP blocks) since the last reset: tokens per expert (the
    router's assignments, before capacity drops), max/mean load, dropped assignments, mean
    router entropy in bits (log2(E) = undecided), and the correction bias (None without one)."""
    layers = moe_layers(model)
    counts = [m.tokens_per_expert_E.tolist() for m in layers]
    return {
        "tokens_per_expert": counts,
        "max_over_mean_load": [max(c) / max(sum(c) / len(c), 1e-9) for c in counts],
        "dropped": [float(m.dropped_tokens) for m in layers],
        "router_entropy": [float(m.entropy_sum / m.counted_tokens.clamp_min(1.0)) for m in layers],
        "bias": [None if m.router.bias is None else m.router.bias.tolist() for m in layers],
    }


@torch.no_grad()
def reset_routing_stats(model: nn.Module) -> None:
    for m in moe_layers(model):
        for name in STATS_BUFFERS:
            getattr(m, name).zero_()
