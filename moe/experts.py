"""Experts: E SwiGLU feed-forward networks with stacked weights, and how tokens reach them.

Shapes: T tokens, D model dim, K experts per token, E experts, I expert hidden width,
N = token-expert assignments that are computed (T*K when dropless).

Dispatch is sort-based and dropless by default:
  1. flatten the T*K (token, expert) pairs and sort them by expert (stable, so token order
     is kept inside each expert's slice);
  2. gather the tokens into that order: each expert's tokens are one contiguous slice;
  3. run every expert on its slice: `experts_loop` (readable reference) or `experts_grouped`
     (one torch.nn.functional.grouped_mm per weight, no Python loop);
  4. put the outputs back in (token, k) order and sum them with the routing weights.
With a capacity factor, each expert keeps only its first ceil(cf * T * K / E) assignments (in
token order) and the rest are dropped and counted: the classic Switch/GShard behaviour, kept
for comparison.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig


class Dispatch(NamedTuple):
    order_N: torch.Tensor  # index into the flattened (token, k) pairs, sorted by expert
    counts_E: torch.Tensor  # int64 assignments computed per expert (after drops)
    dropped: torch.Tensor  # int64 scalar: assignments dropped by the capacity limit


def sort_by_expert(experts_TK: torch.Tensor, n_experts: int, capacity: int | None = None) -> Dispatch:
    """Order the T*K assignments by expert; optionally keep at most `capacity` per expert."""
    flat = experts_TK.flatten()
    order_N = flat.argsort(stable=True)
    counts_E = torch.bincount(flat, minlength=n_experts)
    if capacity is None:
        return Dispatch(order_N, counts_E, counts_E.new_zeros(()))
    # rank of each sorted assignment inside its expert's slice; keep the first `capacity`
    starts_E = counts_E.cumsum(0) - counts_E
    rank_N = torch.arange(flat.numel(), device=flat.device) - starts_E[flat[order_N]]
    keep_N = rank_N < capacity
    kept_E = counts_E.clamp(max=capacity)
    return Dispatch(order_N[keep_N], kept_E, (counts_E - kept_E).sum())


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Slots per expert: ceil(cf * T * K / E). The K matters: without it most assignments drop."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert: (silu(x @ w1) * (x @ w3)) @ w2, weights stored [in, out]."""
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def experts_loop(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDI: torch.Tensor,
                 w3_EDI: torch.Tensor, w2_EID: torch.Tensor) -> torch.Tensor:
    """Reference: run expert e on its contiguous slice of the sorted tokens, one at a time."""
    outs = []
    for e, x_nD in enumerate(x_ND.split(counts_E.tolist())):
        if x_nD.shape[0]:
            outs.append(swiglu(x_nD, w1_EDI[e], w3_EDI[e], w2_EID[e]))
    if not outs:
        return x_ND.new_zeros(0, w2_EID.shape[-1])
    return torch.cat(outs)


def experts_grouped(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDI: torch.Tensor,
                    w3_EDI: torch.Tensor, w2_EID: torch.Tensor) -> torch.Tensor:
    """Fast path: the same computation as experts_loop as three grouped matmuls."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_NI = F.silu(F.grouped_mm(x_ND, w1_EDI, offs=offs_E)) * F.grouped_mm(x_ND, w3_EDI, offs=offs_E)
    return F.grouped_mm(h_NI, w2_EID, offs=offs_E)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """grouped_mm needs fp32/bf16/fp16 and 16-byte-aligned row strides.

    Under torch.compile (torch 2.13) its tracing rule accepts bf16 only, so compiled fp32
    models take the loop.
    """
    if not hasattr(F, "grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    return all(w.dtype == x.dtype and (w.shape[-1] * w.element_size()) % 16 == 0
               and (w.shape[-2] * w.element_size()) % 16 == 0 for w in weights)


class Experts(nn.Module):
    """E routed SwiGLU experts, weights stacked as w1, w3: [E, D, I] and w2: [E, I, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(E, D, I))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, D, I))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, I, D))  # down projection

    def compute(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous slice of the expert-sorted tokens."""
        impl = self.cfg.expert_impl
        weights = (self.w1, self.w3, self.w2)
        if impl == "grouped" or (impl == "auto" and grouped_mm_supported(x_ND, *weights)):
            return experts_grouped(x_ND, counts_E, *weights)
        return experts_loop(x_ND, counts_E, *weights)

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor,
                experts_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (y_TD, counts_E, dropped): the weighted sum of each token's experts."""
        T, K = experts_TK.shape
        cfg = self.cfg
        capacity = None
        if cfg.capacity_factor is not None:
            capacity = expert_capacity(cfg.capacity_factor, T, K, cfg.n_routed_experts)
        d = sort_by_expert(experts_TK, cfg.n_routed_experts, capacity)
        x_ND = x_TD[d.order_N // K]  # each expert's tokens, contiguous
        y_ND = self.compute(x_ND, d.counts_E)
        # back to (token, k) order; dropped assignments stay zero
        D = x_TD.shape[-1]
        y_TKD = y_ND.new_zeros(T * K, D).index_copy(0, d.order_N, y_ND).view(T, K, D)
        y_TD = torch.einsum("tkd,tk->td", y_TKD, weights_TK.to(y_TKD.dtype))
        return y_TD, d.counts_E, d.dropped
