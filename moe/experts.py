"""Experts: E SwiGLU feed-forward networks with stacked weights, and how tokens reach them.

Shapes: T tokens, D model dim, K experts per token, E experts, I expert hidden width,
N = token-expert assignments that are computed (T*K when dropless).

Dispatch is sort-based and dropless by default:
  1. flatten the T*K (token, expert) pairs and sort them by expert (stable, so token order
     is kept inside each expert's slice);
  2. gather the tokens into that order: each expert's tokens are one contiguous slice;
  3. run every expert on its slice: `experts_loop` (readable reference) or `experts_grouped`
     (one torch.nn.functional.grouped_mm per weight, no Python loop);
  4. scale each output by its routing weight and scatter-add it onto its token.
Steps 2 and 4 are the only data movement routing adds over a dense MLP: one gather of the
N rows in (index_select) and one scatter-add of the N rows out (index_add_); each is the
other's backward. Experts runs steps 3-4 either as three grouped matmuls over all N rows
then one scatter-add (GPU, torch.compile), or one expert at a time, adding its rows onto
their tokens as soon as they are computed (`experts_loop_add`, CPU): an expert's rows are
then still in cache, and nothing N x D is materialised on the way out.
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
    # a scatter-add, not bincount: its output shape does not depend on the data (torch.compile)
    counts_E = flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))
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


@torch.compiler.disable  # split sizes are data: traced, every new routing would recompile
def experts_loop(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDI: torch.Tensor,
                 w3_EDI: torch.Tensor, w2_EID: torch.Tensor) -> torch.Tensor:
    """Reference: run expert e on its contiguous slice of the sorted tokens, one at a time."""
    # unbind, not w1_EDI[e]: its backward stacks the E gradients once instead of adding E
    # zero-padded [E, D, I] copies
    per_expert = zip(x_ND.split(counts_E.tolist()), w1_EDI.unbind(0), w3_EDI.unbind(0), w2_EID.unbind(0))
    outs = [swiglu(x_nD, w1, w3, w2) for x_nD, w1, w3, w2 in per_expert if x_nD.shape[0]]
    if not outs:
        return x_ND.new_zeros(0, w2_EID.shape[-1])
    return torch.cat(outs)


@torch.compiler.disable  # as experts_loop
def experts_loop_add(y_TD: torch.Tensor, x_ND: torch.Tensor, token_N: torch.Tensor, scale_N: torch.Tensor,
                     counts_E: torch.Tensor, w1_EDI: torch.Tensor, w3_EDI: torch.Tensor,
                     w2_EID: torch.Tensor) -> torch.Tensor:
    """experts_loop with the combine fused in: y_TD[token_N] += scale_N * expert(x_ND), per expert.

    The CPU path: each expert's rows are scatter-added while still in cache, instead of
    gathering all N outputs first (see docs/performance.md).
    """
    sizes = counts_E.tolist()
    per_expert = zip(x_ND.split(sizes), token_N.split(sizes), scale_N.split(sizes),
                     w1_EDI.unbind(0), w3_EDI.unbind(0), w2_EID.unbind(0))
    for x_nD, token_n, scale_n, w1, w3, w2 in per_expert:
        if token_n.numel():
            y_TD.index_add_(0, token_n, swiglu(x_nD, w1, w3, w2) * scale_n.unsqueeze(-1))
    return y_TD


def experts_grouped(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EDI: torch.Tensor,
                    w3_EDI: torch.Tensor, w2_EID: torch.Tensor,
                    scale_N: torch.Tensor | None = None) -> torch.Tensor:
    """Fast path: experts_loop as three grouped matmuls; scale_N (optional) multiplies each row.

    The scale is applied to the hidden activation before w2, which equals scaling the output
    (w2 is linear) but touches I instead of D columns. (torch 2.13: backward needs an output
    gradient with real strides, not the stride-0 one of `.sum()`; Experts always gives one.)
    """
    offs_E = counts_E.cumsum(0).to(torch.int32)
    gmm = F.grouped_mm
    if torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16:
        gmm = _grouped_mm_eager  # torch.compile traces grouped_mm for bf16 only (torch 2.13)
    h_NI = F.silu(gmm(x_ND, w1_EDI, offs=offs_E)) * gmm(x_ND, w3_EDI, offs=offs_E)
    if scale_N is not None:
        h_NI = h_NI * scale_N.unsqueeze(-1)
    return gmm(h_NI, w2_EID, offs=offs_E)


_grouped_mm_eager = torch.compiler.disable(F.grouped_mm)


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


# CPU crossover of 'auto' (benchmarks/moe_layer.py --crossover): grouped_mm below, loop above
CPU_LOOP_MIN_ROWS_PER_EXPERT = 192


class Experts(nn.Module):
    """E routed SwiGLU experts, weights stacked as w1, w3: [E, D, I] and w2: [E, I, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(E, D, I))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, D, I))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, I, D))  # down projection

    def use_grouped(self, x_ND: torch.Tensor) -> bool:
        """'auto': grouped_mm on GPU; on CPU grouped_mm for small batches, the loop for large.

        Measured on CPU (docs/performance.md, the crossover): one grouped call wins while
        experts get few rows each; from a few hundred rows per expert the loop, which keeps
        each expert's rows in cache, is 5-30% faster.
        """
        impl = self.cfg.expert_impl
        if impl != "auto":
            return impl == "grouped"
        if not grouped_mm_supported(x_ND, self.w1, self.w3, self.w2):
            return False
        return x_ND.device.type != "cpu" or x_ND.shape[0] < CPU_LOOP_MIN_ROWS_PER_EXPERT * self.cfg.n_routed_experts

    def compute(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous slice of the expert-sorted tokens."""
        weights = (self.w1, self.w3, self.w2)
        if self.use_grouped(x_ND):
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
        token_N = d.order_N // K  # which token each sorted assignment belongs to
        x_ND = x_TD.index_select(0, token_N)  # each expert's tokens, contiguous
        scale_N = weights_TK.flatten().index_select(0, d.order_N).to(x_TD.dtype)
        y_TD = x_TD.new_zeros(T, x_TD.shape[-1])  # dropped assignments add nothing
        if self.use_grouped(x_ND):
            y_ND = experts_grouped(x_ND, d.counts_E, self.w1, self.w3, self.w2, scale_N)
            y_TD = y_TD.index_add_(0, token_N, y_ND)
        else:
            y_TD = experts_loop_add(y_TD, x_ND, token_N, scale_N, d.counts_E, self.w1, self.w3, self.w2)
        return y_TD, d.counts_E, d.dropped
