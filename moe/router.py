"""Router: which experts each token goes to, and with what weight.

Shapes: T tokens, D model dim, E routed experts, K experts per token (top-k),
G expert groups.

The whole rule, in fp32 whatever the input dtype or an enclosing bf16 autocast (as DeepSeek-V3's
`Gate`; under autocast a bf16 matmul picked different experts for about 1% of the choices):
  1. scores = softmax or sigmoid of x @ W_gate
  2. selection scores = scores + correction bias (the bias picks WHICH experts, never the weights)
  3. group-limited routing: a group's score is the sum of its top-2 selection scores (the max
     when there is no bias); keep the best n_limited_groups groups, mask the rest with -inf
  4. top-k on the selection scores; gather the weights from the UNBIASED scores; renormalise
     if norm_topk_prob; multiply by route_scale
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe.config import ModelConfig
from moe.init import init_weights


class Routing(NamedTuple):
    weights_TK: torch.Tensor  # fp32 weight of each chosen expert
    experts_TK: torch.Tensor  # int64 expert index, K distinct per token
    scores_TE: torch.Tensor  # fp32 unbiased scores of every expert (for balance losses, plots)
    logits_TE: torch.Tensor  # fp32 raw router logits (for the z-loss)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added for selection only,
        # nudged outside the forward pass by moe.balance.update_bias. A buffer, not a parameter:
        # no gradient ever reaches it. Always fp32 (see _apply): steps of gamma = 0.001 on
        # values near 0.5 vanish in bf16, whose spacing there is 0.002.
        if cfg.bias_update_speed > 0:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)
        if self.bias is not None:
            self.bias.zero_()

    def _apply(self, fn, recurse=True):
        """model.to(dtype) / .half() / .bfloat16() move the bias with the model but keep it fp32
        (DeepSeek's reference pins its gate bias to fp32 the same way)."""
        bias = self._buffers.pop("bias", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if bias is not None:
                moved = fn(bias)
                if moved.dtype != torch.float32:  # a dtype cast: redo it from the fp32 values
                    moved = bias.to(device=moved.device, dtype=torch.float32)
                self._buffers["bias"] = moved
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.cfg
        with _fp32(x_TD.device):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()

        select_TE = scores_TE if self.bias is None else scores_TE + self.bias

        if cfg.n_expert_groups > 1:
            select_TE = limit_groups(select_TE, cfg.n_expert_groups, cfg.n_limited_groups, top2=self.bias is not None)

        experts_TK = select_TE.topk(cfg.n_activated_experts, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.route_scale
        return Routing(weights_TK, experts_TK, scores_TE, logits_TE)


def limit_groups(select_TE: torch.Tensor, n_groups: int, n_limited: int, top2: bool) -> torch.Tensor:
    """select_TE with every expert outside each token's n_limited best groups set to -inf.

    A group's score is the sum of its top-2 selection scores when top2 (with the correction
    bias, as DeepSeek-V3), else its best score. Masked with -inf, not 0: once the bias pushes
    selection scores below 0, a 0 would rank the masked experts above the kept ones.
    """
    select_TGe = rearrange(select_TE, "t (g e) -> t g e", g=n_groups)
    if top2:
        group_scores_TG = select_TGe.topk(min(2, select_TGe.shape[-1]), dim=-1).values.sum(dim=-1)
    else:
        group_scores_TG = select_TGe.amax(dim=-1)
    keep_groups = group_scores_TG.topk(n_limited, dim=-1).indices
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, keep_groups, True)
    return rearrange(select_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")), "t g e -> t (g e)")


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch an enclosing autocast off, so the router's matmul really runs in fp32."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
