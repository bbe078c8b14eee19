"""The Transformer: embedding, n_layers blocks (first n_dense_layers dense, the rest MoE), head.

Shapes: B batch, S sequence, D model dim, V vocabulary.

forward(tokens_BS, targets_BS=None) returns (logits_BSV, losses) where losses holds the
balancing terms of every MoE layer ("aux", "seq_aux", "z": each already times its
coefficient, summed over layers) and, given targets, "ce", "mtp" (when n_mtp > 0) and their
sum "loss". "ce" is the cross entropy alone: log it, not "loss", to compare models.
Positions whose target is IGNORE_INDEX count neither in the loads nor in the balance losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.attention import RMSNorm, build_attention
from moe.config import ModelConfig
from moe.init import init_weights
from moe.layer import MLP, MoE
from moe.rope import cfg_frequencies, rope_tables

IGNORE_INDEX = -100  # targets with this value add no loss


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, use_moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if use_moe else MLP(cfg, cfg.inter_dim)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: dict | None = None, start_pos: int = 0,
                valid_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """valid_BS: the positions that count for load balancing (None = all)."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, cache, start_pos)
        if isinstance(self.ffn, MoE):
            h, losses = self.ffn(self.ffn_norm(x_BSD), valid_BS)
        else:
            h, losses = self.ffn(self.ffn_norm(x_BSD)), {}
        return x_BSD + h, losses


def add_losses(total: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    for k, v in new.items():
        total[k] = total[k] + v if k in total else v


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from moe.mtp import MTPModule  # mtp builds on Block

        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, use_moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.n_mtp))
        rope_dim = cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.mha_head_dim
        # plain RoPE, or YaRN's frequencies when max_seq_len > original_seq_len (moe/rope.py)
        cos, sin = rope_tables(rope_dim, cfg.max_seq_len, cfg.rope_theta, freqs=cfg_frequencies(cfg, rope_dim))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()
        if cfg.fp8 != "none":  # simulated FP8 GEMMs: same parameters and state-dict keys (moe/fp8.py)
            from moe.fp8 import convert

            convert(self, cfg.fp8)

    def init_weights(self) -> None:
        """The one init rule (moe.init) over every matrix in parameter order.

        Each module already initialised itself with the same rule; this pass adds the
        embedding and head and draws everything in one fixed order, so a seed gives the same
        model whatever order the modules were built in.
        """
        init_weights(self, self.cfg)

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[dict]:
        """An empty KV cache per block (MLA caches only the latent and the RoPE key)."""
        max_len = max_len or self.cfg.max_seq_len
        device = self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [blk.attn.new_cache(batch, max_len, device, dtype) for blk in self.layers]

    def check_tokens(self, tokens_BS: torch.Tensor, start_pos: int = 0) -> None:
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (batch, seq), got "
                             f"{tokens_BS.dtype} of shape {tuple(tokens_BS.shape)}")
        if tokens_BS.shape[0] == 0 or tokens_BS.shape[1] == 0:
            raise ValueError(f"tokens must hold at least one sequence of at least one token, got shape "
                             f"{tuple(tokens_BS.shape)}")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0 (the position of the first new token), got {start_pos}")
        if start_pos + tokens_BS.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start_pos + tokens_BS.shape[1]} exceeds "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if tokens_BS.is_meta or torch.compiler.is_compiling():
            return
        lo, hi = int(tokens_BS.min()), int(tokens_BS.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size}), got ids "
                             f"from {lo} to {hi}")

    def forward(self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                cache: list[dict] | None = None, start_pos: int = 0, return_hidden: bool = False,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """return_hidden=True appends h_BSD (last block output, before the final norm) to the
        result: speculative decoding feeds it to the MTP module."""
        self.check_tokens(tokens_BS, start_pos)
        S = tokens_BS.shape[1]
        cos = self.rope_cos[start_pos:start_pos + S]
        sin = self.rope_sin[start_pos:start_pos + S]
        h_BSD = self.embed(tokens_BS)
        # balancing covers the positions the cross entropy covers: an ignored target (padding)
        # adds nothing to the loads or the balance losses
        valid_BS = None if targets_BS is None else targets_BS != IGNORE_INDEX
        losses: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.layers):
            h_BSD, block_losses = block(h_BSD, cos, sin, None if cache is None else cache[i], start_pos, valid_BS)
            add_losses(losses, block_losses)
        logits_BSV = self.head(self.norm(h_BSD))
        if targets_BS is None:
            return (logits_BSV, losses, h_BSD) if return_hidden else (logits_BSV, losses)

        balance_terms = sum(losses.values()) if losses else 0.0
        losses["ce"] = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(),
                                       ignore_index=IGNORE_INDEX)
        total = losses["ce"] + balance_terms
        if len(self.mtp):
            from moe.mtp import mtp_loss

            mtp, mtp_balance = mtp_loss(self, h_BSD, targets_BS, cos, sin)
            losses["mtp"] = mtp
            total = total + mtp + sum(mtp_balance.values())
            add_losses(losses, mtp_balance)
        losses["loss"] = total
        return (logits_BSV, losses, h_BSD) if return_hidden else (logits_BSV, losses)
