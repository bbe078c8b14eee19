"""The one init rule, used by every module that owns weights (PyTorch's `reset_parameters`).

Every matrix ~ N(0, init_std); the projections that write into the residual stream (attention
`wo`, the FFNs' and experts' `w2`) ~ N(0, init_std / sqrt(2 n_layers)), so the residual
stream's variance does not grow with depth (GPT-2's rule). Routers are random too: a zero
router scores every expert alike and top-k would then pick by index, not by token. RMSNorm
weights (1-D) stay at 1. DeepSeek-V2/V3 use init_std = 0.006 (the presets say so).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.config import ModelConfig


def is_out_projection(name: str) -> bool:
    """`...wo.weight`, `...w2.weight` (nn.Linear) and `...w2` (the stacked experts)."""
    parts = name.split(".")
    return parts[-1] == "w2" or parts[-2:] in (["wo", "weight"], ["w2", "weight"])


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """Apply the rule to every matrix of module (its own and its children's)."""
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, mean=0.0, std=out_std if is_out_projection(name) else cfg.init_std)
