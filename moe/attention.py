"""Attention: MHA/GQA, and DeepSeek's Multi-head Latent Attention (MLA), both with a KV cache.

Shapes: B batch, S new positions, L cached positions (start_pos + S), H query heads,
Hkv key/value heads, d head width, C = kv_lora_rank (the latent), R = qk_rope_head_dim.

MLA compresses keys and values into one latent c (C numbers per token) plus one RoPE key
shared by all heads (R numbers). Training uses the plain form: expand c into per-head keys
and values, then ordinary attention. Decoding caches only (c, k_rope) and "absorbs" the
up-projections into the query and the output instead, so the cache per token per layer is
C + R numbers rather than 2 * H * d.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe.config import ModelConfig
from moe.init import init_weights
from moe.rope import apply_rope, softmax_scale_factor


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def causal_mask(start_pos: int, S: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [S, start_pos + S] mask (True = may attend) for S new queries after a cache."""
    if S == 1:
        return None  # a single new query may see every cached key
    q_pos = torch.arange(start_pos, start_pos + S, device=device)[:, None]
    k_pos = torch.arange(start_pos + S, device=device)[None, :]
    return k_pos <= q_pos


class MHA(nn.Module):
    """Multi-head attention with grouped key/value heads (GQA when n_kv_heads < n_heads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.mha_head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)
        self.softmax_scale = self.head_dim ** -0.5 * softmax_scale_factor(cfg)  # YaRN's m^2 when on
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        shape = (batch, max_len, self.n_kv_heads, self.head_dim)
        return {"k": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: dict[str, torch.Tensor] | None = None, start_pos: int = 0) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = apply_rope(rearrange(self.wq(x_BSD), "b s (h d) -> b s h d", h=self.n_heads), cos, sin)
        k = apply_rope(rearrange(self.wk(x_BSD), "b s (h d) -> b s h d", h=self.n_kv_heads), cos, sin)
        v = rearrange(self.wv(x_BSD), "b s (h d) -> b s h d", h=self.n_kv_heads)
        mask, causal = None, True
        if cache is not None:
            end = start_pos + S
            cache["k"][:B, start_pos:end] = k
            cache["v"][:B, start_pos:end] = v
            k, v = cache["k"][:B, :end], cache["v"][:B, :end]
            mask, causal = causal_mask(start_pos, S, x_BSD.device), False
        rep = self.n_heads // self.n_kv_heads  # GQA: each kv head serves `rep` query heads
        q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and S > 1,
                                             scale=self.softmax_scale)
        return self.wo(rearrange(out, "b h s d -> b s (h d)"))


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2/V3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.n_heads, cfg.dim
        self.n_heads = H
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank == 0:
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        else:  # low-rank query: D -> q_lora_rank -> heads
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, cfg.kv_lora_rank + self.rope, bias=False)  # latent + shared rope key
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        # the score scale is set by the per-head query/key width, not by the latent size; YaRN
        # multiplies it by m^2 when on (moe/rope.py; DeepSeek-V3 at 163840 positions: x1.874)
        self.softmax_scale = qk_dim ** -0.5 * softmax_scale_factor(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)  # the matrices; the latent norms stay at 1

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        return {"kv": torch.zeros(batch, max_len, self.kv_lora_rank, device=device, dtype=dtype),
                "pe": torch.zeros(batch, max_len, self.rope, device=device, dtype=dtype)}

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: dict[str, torch.Tensor] | None = None, start_pos: int = 0) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H = self.n_heads
        q = self.wq(x_BSD) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope, q_pe = rearrange(q, "b s (h d) -> b s h d", h=H).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv_BSC, k_pe = self.wkv_a(x_BSD).split([self.kv_lora_rank, self.rope], dim=-1)
        kv_BSC = self.kv_norm(kv_BSC)
        k_pe_BSR = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        if cache is None:
            out = self._naive(q_nope, q_pe, kv_BSC, k_pe_BSR)
        else:
            end = start_pos + S
            cache["kv"][:B, start_pos:end] = kv_BSC
            cache["pe"][:B, start_pos:end] = k_pe_BSR
            out = self._absorbed(q_nope, q_pe, cache["kv"][:B, :end], cache["pe"][:B, :end], start_pos)
        return self.wo(rearrange(out, "b s h v -> b s (h v)"))

    def _naive(self, q_nope, q_pe, kv_BSC, k_pe_BSR) -> torch.Tensor:
        """Expand the latent into per-head keys and values; causal attention over S positions."""
        B, S, H, _ = q_nope.shape
        kv_BSHX = rearrange(self.wkv_b(kv_BSC), "b s (h x) -> b s h x", h=H)
        k_nope, v = kv_BSHX.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe_BSR.unsqueeze(2).expand(B, S, H, self.rope)], dim=-1)  # one rope key, all heads
        q, k, v = (rearrange(t, "b s h d -> b h s d") for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=self.softmax_scale)
        return rearrange(out, "b h s v -> b s h v")

    def _absorbed(self, q_nope, q_pe, kv_BLC, pe_BLR, start_pos: int) -> torch.Tensor:
        """Attend over the cached latents directly: W_uk folds into q, W_uv into the output."""
        S = q_nope.shape[1]
        w_HXC = rearrange(self.wkv_b.weight, "(h x) c -> h x c", h=self.n_heads)
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope, self.v_dim], dim=1)
        q_lat_BSHC = torch.einsum("bshn,hnc->bshc", q_nope, w_uk_HNC)
        scores_BSHL = (torch.einsum("bshc,blc->bshl", q_lat_BSHC, kv_BLC)
                       + torch.einsum("bshr,blr->bshl", q_pe, pe_BLR)).float() * self.softmax_scale
        mask = causal_mask(start_pos, S, q_nope.device)
        if mask is not None:
            scores_BSHL = scores_BSHL.masked_fill(~mask[None, :, None, :], float("-inf"))
        probs_BSHL = scores_BSHL.softmax(dim=-1).to(kv_BLC.dtype)
        out_lat_BSHC = torch.einsum("bshl,blc->bshc", probs_BSHL, kv_BLC)
        return torch.einsum("bshc,hvc->bshv", out_lat_BSHC, w_uv_HVC)


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attn == "mla" else MHA(cfg)
