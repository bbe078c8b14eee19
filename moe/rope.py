"""Rotary position embeddings (RoPE), in the "rotate half" layout.

A pair of channels (i, i + d/2) is rotated by the angle pos * theta^(-2i/d), so the dot
product of a rotated query and key depends only on their distance.
"""

from __future__ import annotations

import torch


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [max_seq_len, head_dim // 2] in fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles_LH = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles_LH.cos(), angles_LH.sin()


def apply_rope(x_BSHd: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, heads, d] by the angles of its positions (cos/sin sliced to those S)."""
    x1, x2 = x_BSHd.float().chunk(2, dim=-1)
    cos, sin = cos_SH[:, None, :], sin_SH[:, None, :]  # broadcast over heads
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x_BSHd.dtype)
