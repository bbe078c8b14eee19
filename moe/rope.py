"""Rotary position embeddings (RoPE) in the "rotate half" layout, with YaRN for long contexts.

A pair of channels (i, i + d/2) is rotated by the angle pos * f_i with f_i = theta^(-2i/d), so
the dot product of a rotated query and key depends only on their distance. (DeepSeek's
reference and transformers' DeepseekV3 pair neighbours (2i, 2i+1) instead: the same rotation
with the channels in another order; moe.interop.hf permutes weights between the two.)

YaRN (Peng et al. 2023; DeepSeek-V2/V3 run with it, `precompute_freqs_cis` in DeepSeek's
inference code) stretches a model pre-trained at original_seq_len positions to max_seq_len.
It is on when max_seq_len > original_seq_len, as in the reference. Frequency i completes
r_i = original_seq_len * f_i / (2 pi) turns over the original context:
  - fast ones (r_i > beta_fast turns) already saw every angle: kept;
  - slow ones (r_i < beta_slow) did not: divided by rope_factor (interpolated);
  - in between a linear ramp over the channel index i mixes the two.
The softmax scale is multiplied by m^2, m = 0.1 * mscale * ln(rope_factor) + 1, against the
flatter attention of longer contexts (DeepSeek-V3: m^2 = 1.874; V2 and V2-Lite: mscale 0.707).
"""

from __future__ import annotations

import math

import torch

from moe.config import ModelConfig


def yarn_on(cfg: ModelConfig) -> bool:
    return cfg.max_seq_len > cfg.original_seq_len


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE: f_i = theta^(-2i/d) for the d/2 channel pairs, fp32."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def yarn_correction_range(head_dim: int, theta: float, original_seq_len: int, beta_fast: float,
                          beta_slow: float) -> tuple[int, int]:
    """The channel-pair indices (low, high) between which YaRN's ramp runs.

    Pair i turns r times over L positions when i = d * ln(L / (2 pi r)) / (2 ln theta); low is
    that index for beta_fast turns (rounded down), high for beta_slow (rounded up), clamped to
    [0, d - 1] as the reference does.
    """
    def index(turns: float) -> float:
        return head_dim * math.log(original_seq_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    return max(math.floor(index(beta_fast)), 0), min(math.ceil(index(beta_slow)), head_dim - 1)


def yarn_frequencies(head_dim: int, theta: float, original_seq_len: int, factor: float,
                     beta_fast: float, beta_slow: float) -> torch.Tensor:
    """f_i * (keep_i + (1 - keep_i) / factor): keep_i = 1 below the ramp, 0 above it."""
    freqs = rope_frequencies(head_dim, theta)
    low, high = yarn_correction_range(head_dim, theta, original_seq_len, beta_fast, beta_slow)
    width = high - low if high > low else 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / width).clamp(0, 1)
    keep = 1 - ramp
    return freqs / factor * (1 - keep) + freqs * keep


def cfg_frequencies(cfg: ModelConfig, head_dim: int) -> torch.Tensor:
    """The d/2 frequencies a model with cfg uses: YaRN's when on, plain RoPE's otherwise."""
    if not yarn_on(cfg):
        return rope_frequencies(head_dim, cfg.rope_theta)
    return yarn_frequencies(head_dim, cfg.rope_theta, cfg.original_seq_len, cfg.rope_factor,
                            cfg.beta_fast, cfg.beta_slow)


def softmax_scale_factor(cfg: ModelConfig) -> float:
    """What YaRN multiplies the attention softmax scale by: m^2, or 1 when YaRN is off."""
    if not yarn_on(cfg):
        return 1.0
    m = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
    return m * m


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None,
                freqs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_seq_len, head_dim // 2] in fp32 (freqs: YaRN's, else plain)."""
    if freqs is None:
        freqs = rope_frequencies(head_dim, theta)
    angles_LH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), freqs.to(device))
    return angles_LH.cos(), angles_LH.sin()


def apply_rope(x_BSHd: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, heads, d] by the angles of its positions (cos/sin sliced to those S)."""
    x1, x2 = x_BSHd.float().chunk(2, dim=-1)
    cos, sin = cos_SH[:, None, :], sin_SH[:, None, :]  # broadcast over heads
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BSHd.dtype)
