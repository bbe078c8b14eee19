"""Multi-token prediction (DeepSeek-V3 section 2.2).

Shapes: B batch, S sequence, D model dim.

Module k (k = 1..n_mtp) predicts token t_{i+k+1} at position i, sequentially: it combines the
previous depth's hidden state h^{k-1}_i with the embedding of the token t_{i+k}, runs one
transformer block, and reuses the main model's embedding and output head:
    h'_i = W_proj [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]
    h^k  = Block_k(h')           logits = Head(RMSNorm(h^k))
Training adds mtp_loss_weight * mean_k CE_k to the loss. At inference the modules can be
dropped, or used to draft tokens for speculative decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.attention import RMSNorm
from moe.config import ModelConfig
from moe.init import init_weights
from moe.model import IGNORE_INDEX, Block


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, use_moe=cfg.n_moe_layers > 0)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        init_weights(self.proj, cfg)  # the block initialised itself

    def forward(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: dict | None = None, start_pos: int = 0,
                valid_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x_BSD = self.proj(torch.cat([self.hnorm(h_BSD), self.enorm(emb_BSD)], dim=-1))
        return self.block(x_BSD, cos, sin, cache, start_pos, valid_BS)


def mtp_loss(model: nn.Module, h_BSD: torch.Tensor, targets_BS: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda * mean over depths of the cross entropy; plus the MTP blocks' balancing terms.

    targets_BS[:, i] = t_{i+1}, so depth k reads t_{i+k} = targets[:, i+k-1] and predicts
    t_{i+k+1} = targets[:, i+k], for positions i < S - k.
    """
    from moe.model import add_losses

    S = h_BSD.shape[1]
    ce_total = h_BSD.new_zeros((), dtype=torch.float32)
    balance: dict[str, torch.Tensor] = {}
    for k, module in enumerate(model.mtp, start=1):
        n = S - k
        if n <= 0:
            break
        inputs = targets_BS[:, k - 1:k - 1 + n]
        # a position counts for balancing when its input is a real token and its target is kept
        valid = (inputs != IGNORE_INDEX) & (targets_BS[:, k:k + n] != IGNORE_INDEX)
        h_BSD, block_losses = module(h_BSD[:, :n], model.embed(inputs.clamp_min(0)), cos[:n], sin[:n],
                                     valid_BS=valid)  # ignored targets embed as token 0
        add_losses(balance, block_losses)
        logits = model.head(module.norm(h_BSD)).float()
        ce_total = ce_total + F.cross_entropy(logits.flatten(0, 1), targets_BS[:, k:k + n].flatten(),
                                              ignore_index=IGNORE_INDEX)
    return model.cfg.mtp_loss_weight * ce_total / len(model.mtp), balance
