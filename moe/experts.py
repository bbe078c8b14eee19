"""Experts: E SwiGLU feed-forward networks with stacked weights, and how tokens reach them.

Shapes: T tokens, D model dim, K experts per token, E experts, I expert hidden width,
N = token-expert assignments that are computed (T*K when dropless).

Dispatch is sort-based and dropless by default:
  1. flatten the T*K (token, expert) pairs and sort them by expert (stable, so token order
     is kept inside each expert's slice);
  2. gather the tokens into that order: each expert's tokens are one contiguous slice;
  3. run every expert on its slice: `experts_loop` (the readable reference) or one of the fast
     paths below (`experts_grouped`, `experts_bucketed`, `experts_loop_add`);
  4. scale each output by its routing weight and add it onto its token.
Steps 2 and 4 are the only data movement routing adds over a dense MLP: one gather of the
N rows in and one sum of the N rows back onto their T tokens; each is the other's backward.
Experts runs them in one of three ways ('auto' picks by device and rows per expert):
  - grouped (GPU; CPU decode, a few rows per expert): gather all N rows (index_select), three
    grouped matmuls with the routing weight folded into the hidden activation, one scatter-add;
  - bucketed (CPU, tens to hundreds of rows per expert: the fine-grained regime):
    `experts_bucketed`, buckets of 4 experts padded to equal rows, one torch.bmm per bucket, so
    each thread gets whole small GEMMs; the elementwise work runs once over all rows;
  - loop (CPU, large batches): `experts_loop_add`, one expert at a time, gather its rows and
    run its matmuls while they are in cache.
The last two sum each token's K rows in one call (`embedding_bag`, a gather-and-sum per token)
and write forward and backward out by hand, so weight gradients land directly in place.
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
from torch.autograd.function import once_differentiable

from moe.config import ModelConfig
from moe.init import init_weights


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
def experts_loop_add(x_TD: torch.Tensor, token_N: torch.Tensor, scale_N: torch.Tensor, counts_E: torch.Tensor,
                     w1_EDI: torch.Tensor, w3_EDI: torch.Tensor, w2_EID: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum over the assignments n of token t of scale_N[n] * expert_n(x_TD[t]): the CPU fast path.

    Equals x_ND = x_TD[token_N]; zeros.index_add_(0, token_N, experts_loop(x_ND, ...) * scale_N),
    in value and in every gradient (tests/test_perf_paths.py). Per expert it gathers its rows
    right before its matmuls (they are then in cache); the combine is one gather-and-sum per
    token (`embedding_bag`, "bags" of rows) instead of a scatter-add per expert, and the
    backward is written out so each expert's weight gradients land in place.
    """
    # the rows of each token's bag: positions in the sorted order, grouped by token
    bag_N, offsets_T = _bags(token_N, x_TD.shape[0])
    return _LoopAdd.apply(x_TD, token_N, scale_N, counts_E, bag_N, offsets_T, w1_EDI, w3_EDI, w2_EID)


def _bags(token_N: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine's bags: the sorted positions grouped by token, and where each token's bag starts."""
    per_token_T = token_N.new_zeros(T).scatter_add_(0, token_N, torch.ones_like(token_N))
    return token_N.argsort(stable=True), per_token_T.cumsum(0) - per_token_T


def _sum_bags(rows_ND: torch.Tensor, bag_N: torch.Tensor, offsets_T: torch.Tensor) -> torch.Tensor:
    """out[t] = sum of rows_ND[bag_N[offsets_T[t]:offsets_T[t+1]]]: a gather-and-sum per token."""
    return F.embedding_bag(bag_N, rows_ND, offsets_T, mode="sum")


def _unbind_t(w_EAB: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-expert transposed views [B, A], made in one call."""
    return w_EAB.transpose(-2, -1).unbind(0)


class _LoopAdd(torch.autograd.Function):
    """Forward and backward of experts_loop_add. Per expert, with s the routing weights:
    a = x w1, b = x w3, h = silu(a) * b, y = (s * h) w2. Saved: x, a, b (as autograd would).
    Per-expert views come from split/unbind: one call each, not a slice per expert."""

    @staticmethod
    def forward(ctx, x_TD, token_N, scale_N, counts_E, bag_N, offsets_T, w1_EDI, w3_EDI, w2_EID):
        sizes = counts_E.tolist()
        N, D, I = token_N.numel(), x_TD.shape[-1], w1_EDI.shape[-1]
        keep = any(ctx.needs_input_grad)  # else x, a, b are per-expert temporaries, nothing saved
        saved = [x_TD.new_empty(N, width) for width in (D, I, I)] if keep else []
        rows = [buf.split(sizes) for buf in saved] if keep else [[None] * len(sizes)] * 3
        y_ND = x_TD.new_empty(N, D)
        per_expert = zip(token_N.split(sizes), scale_N.unsqueeze(-1).split(sizes), *rows, y_ND.split(sizes),
                         w1_EDI.unbind(0), w3_EDI.unbind(0), w2_EID.unbind(0))
        for token_n, s, x, a, b, y, w1, w3, w2 in per_expert:
            if token_n.numel():
                x = torch.index_select(x_TD, 0, token_n, out=x)
                a, b = torch.mm(x, w1, out=a), torch.mm(x, w3, out=b)
                torch.mm(F.silu(a).mul_(b).mul_(s), w2, out=y)
        if keep:
            x_ND, a_NI, b_NI = saved
            ctx.sizes = sizes
            ctx.save_for_backward(token_N, scale_N, bag_N, offsets_T, w1_EDI, w3_EDI, w2_EID, x_ND, a_NI, b_NI)
        return _sum_bags(y_ND, bag_N, offsets_T)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TD):
        token_N, scale_N, bag_N, offsets_T, w1_EDI, w3_EDI, w2_EID, x_ND, a_NI, b_NI = ctx.saved_tensors
        need_x, _, need_s, *_, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        sizes = ctx.sizes
        g_TD = g_TD.contiguous()
        gx_ND = torch.empty_like(x_ND)
        gs_N = torch.empty_like(scale_N)
        gw1_EDI, gw3_EDI, gw2_EID = (torch.empty_like(w) for w in (w1_EDI, w3_EDI, w2_EID))
        # x_ND.t() split by columns: each expert's x^T [D, n] for its weight gradients, one call
        per_expert = zip(token_N.split(sizes), scale_N.unsqueeze(-1).split(sizes), x_ND.t().split(sizes, dim=1),
                         a_NI.split(sizes), b_NI.split(sizes), gx_ND.split(sizes), gs_N.split(sizes),
                         _unbind_t(w1_EDI), _unbind_t(w3_EDI), _unbind_t(w2_EID), gw1_EDI.unbind(0), gw3_EDI.unbind(0),
                         _unbind_t(gw2_EID))
        for token_n, s, xt, a, b, gx, gs, w1t, w3t, w2t, gw1, gw3, gw2t in per_expert:
            if not token_n.numel():
                gw1.zero_(), gw3.zero_(), gw2t.zero_()  # an expert without tokens
                continue
            g = g_TD.index_select(0, token_n)
            sa = F.silu(a)
            h = sa * b
            gh = g @ w2t  # d/d(s * h)
            torch.linalg.vecdot(gh, h, out=gs)
            torch.mm(g.t(), h.mul_(s), out=gw2t)
            gh.mul_(s)  # d/dh
            gb = gh * sa
            ga = torch.ops.aten.silu_backward(gh.mul_(b), a)
            torch.mm(xt, ga, out=gw1)
            torch.mm(xt, gb, out=gw3)
            if need_x:
                torch.mm(ga, w1t, out=gx).addmm_(gb, w3t)
        gx_TD = _sum_bags(gx_ND, bag_N, offsets_T) if need_x else None
        gws = (gw if need else None for gw, need in zip((gw1_EDI, gw3_EDI, gw2_EID), (need_w1, need_w3, need_w2)))
        return gx_TD, None, gs_N if need_s else None, None, None, None, *gws


# experts per torch.bmm call in experts_bucketed: enough for 2 threads to take 2 each, few enough that the
# padding up to the bucket's largest expert stays small (measured: docs/performance.md, "Fine-grained experts")
BUCKET_EXPERTS = 4
# beyond this many slots per assignment (skewed routing: one busy expert per bucket) the padding costs
# more than bmm saves, and experts_bucketed hands the batch to experts_loop_add
BUCKET_MAX_PADDING = 1.5


@torch.compiler.disable  # as experts_loop
def experts_bucketed(x_TD: torch.Tensor, token_N: torch.Tensor, scale_N: torch.Tensor, counts_E: torch.Tensor,
                     w1_EDI: torch.Tensor, w3_EDI: torch.Tensor, w2_EID: torch.Tensor) -> torch.Tensor:
    """experts_loop_add's result for many small experts (DeepSeek's fine-grained regime), via torch.bmm.

    A GEMM of a few dozen to a few hundred rows runs about as fast on one thread as on two; a
    batched matmul instead gives each thread whole experts. So the experts go in buckets of
    BUCKET_EXPERTS consecutive ids, each expert padded to the bucket's largest row count: slots
    [bucket, expert, row]. Padding slots are zero rows with routing weight 0 (and a zero output
    gradient), so they add nothing to any output or gradient, even when a token is NaN or inf,
    and the combine (a gather-and-sum per token) never reads them. The elementwise work (silu,
    products) runs once over all slots, not per expert. When routing is so skewed that the
    padding would exceed BUCKET_MAX_PADDING slots per assignment, it runs experts_loop_add.
    Equals experts_loop_add in value and in every gradient (tests/test_perf_paths.py).
    """
    counts = counts_E.tolist()
    E, N, dev = len(counts), token_N.numel(), token_N.device
    buckets, base_E, P = [], [0] * E, 0  # bucket: (first expert, last + 1, rows per expert, first slot)
    for e0 in range(0, E, BUCKET_EXPERTS):
        e1 = min(E, e0 + BUCKET_EXPERTS)
        rows = max(counts[e0:e1])
        if rows:
            base_E[e0:e1] = range(P, P + (e1 - e0) * rows, rows)
            buckets.append((e0, e1, rows, P))
            P += (e1 - e0) * rows
    if P > BUCKET_MAX_PADDING * N:
        return experts_loop_add(x_TD, token_N, scale_N, counts_E, w1_EDI, w3_EDI, w2_EID)
    # the slot of each sorted assignment: its expert's first slot + its rank inside the expert
    expert_N = torch.repeat_interleave(torch.arange(E, device=dev), counts_E, output_size=N)
    starts_E = counts_E.cumsum(0) - counts_E
    slot_N = torch.tensor(base_E, device=dev)[expert_N] + torch.arange(N, device=dev) - starts_E[expert_N]
    token_P = token_N.new_zeros(P).index_copy_(0, slot_N, token_N)
    pad_Q = token_N.new_ones(P, dtype=torch.bool).index_fill_(0, slot_N, False).nonzero().squeeze(1)
    order_N, offsets_T = _bags(token_N, x_TD.shape[0])
    bag_N = slot_N.index_select(0, order_N)  # each token's slots, token by token
    return _Bucketed.apply(x_TD, token_P, pad_Q, slot_N, scale_N, bag_N, offsets_T, buckets, w1_EDI, w3_EDI, w2_EID)


def _per_bucket(buckets: list, t_PC: torch.Tensor) -> list[torch.Tensor]:
    """Views [experts, rows, C] of each bucket's slots."""
    return [t_PC[p0:p0 + (e1 - e0) * rows].view(e1 - e0, rows, t_PC.shape[-1]) for e0, e1, rows, p0 in buckets]


class _Bucketed(torch.autograd.Function):
    """Forward and backward of experts_bucketed, the same algebra as _LoopAdd with s = 0 on padding:
    a = x w1, b = x w3, h = silu(a) * b, y = (s * h) w2. Saved: a, b and the layer's input, not the
    gathered x (backward gathers it again: one copy, and P x D less activation memory per layer).
    Buffers are reused where a value is used up (y goes into x's, d/dx into g's, d/db into h's)."""

    @staticmethod
    def forward(ctx, x_TD, token_P, pad_Q, slot_N, scale_N, bag_N, offsets_T, buckets, w1_EDI, w3_EDI, w2_EID):
        P, I = token_P.numel(), w1_EDI.shape[-1]
        s_P1 = scale_N.new_zeros(P).index_copy_(0, slot_N, scale_N).unsqueeze(-1)
        x_PD = _gather(x_TD, token_P, pad_Q)
        a_PI, b_PI = x_TD.new_empty(P, I), x_TD.new_empty(P, I)
        for (e0, e1, *_), x, a, b in zip(buckets, *(_per_bucket(buckets, t) for t in (x_PD, a_PI, b_PI))):
            torch.bmm(x, w1_EDI[e0:e1], out=a)
            torch.bmm(x, w3_EDI[e0:e1], out=b)
        hs_PI = F.silu(a_PI).mul_(b_PI).mul_(s_P1)
        y_PD = x_PD  # x is used up: its buffer takes y
        for (e0, e1, *_), hs, y in zip(buckets, _per_bucket(buckets, hs_PI), _per_bucket(buckets, y_PD)):
            torch.bmm(hs, w2_EID[e0:e1], out=y)
        ctx.buckets = buckets
        ctx.save_for_backward(x_TD, token_P, pad_Q, slot_N, s_P1, bag_N, offsets_T, w1_EDI, w3_EDI, w2_EID, a_PI,
                              b_PI)
        return _sum_bags(y_PD, bag_N, offsets_T)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_TD):
        x_TD, token_P, pad_Q, slot_N, s_P1, bag_N, offsets_T, w1_EDI, w3_EDI, w2_EID, a_PI, b_PI = ctx.saved_tensors
        need_x, *_, need_s, _, _, _, need_w1, need_w3, need_w2 = ctx.needs_input_grad
        buckets = ctx.buckets
        views = lambda *ts: zip(buckets, *(_per_bucket(buckets, t) for t in ts))  # noqa: E731
        gw1_EDI, gw3_EDI, gw2_EID = (torch.empty_like(w) for w in (w1_EDI, w3_EDI, w2_EID))
        covered = [False] * w1_EDI.shape[0]
        for e0, e1, *_ in buckets:
            covered[e0:e1] = [True] * (e1 - e0)
        for e, c in enumerate(covered):  # experts in no bucket (none in theirs had rows): zero
            if not c:
                gw1_EDI[e].zero_(), gw3_EDI[e].zero_(), gw2_EID[e].zero_()
        g_PD = _gather(g_TD.contiguous(), token_P, pad_Q)
        gh_PI = torch.empty_like(a_PI)
        for (e0, e1, *_), g, gh in views(g_PD, gh_PI):
            torch.bmm(g, w2_EID[e0:e1].transpose(1, 2), out=gh)  # d/d(s * h)
        sa_PI = F.silu(a_PI)
        h_PI = sa_PI * b_PI
        gs_N = (gh_PI * h_PI).sum(1).index_select(0, slot_N)  # a row-wise dot, faster here than vecdot
        hs_PI = h_PI.mul_(s_P1)
        for (e0, e1, *_), hs, g in views(hs_PI, g_PD) if need_w2 else ():
            torch.bmm(hs.transpose(1, 2), g, out=gw2_EID[e0:e1])
        gh_PI.mul_(s_P1)  # d/dh: zero on padding, so padding adds nothing below
        gb_PI = torch.mul(gh_PI, sa_PI, out=h_PI)  # h is used up: its buffer takes d/db
        ga_PI = torch.ops.aten.silu_backward.grad_input(gh_PI.mul_(b_PI), a_PI, grad_input=sa_PI)  # silu's d/da
        x_PD = _gather(x_TD, token_P, pad_Q) if need_w1 or need_w3 else None  # for the weight gradients only
        xs = _per_bucket(buckets, x_PD) if x_PD is not None else [None] * len(buckets)
        gx_PD = g_PD  # g is no longer needed: its buffer takes d/dx
        for ((e0, e1, *_), ga, gb, gx), x in zip(views(ga_PI, gb_PI, gx_PD), xs):
            if need_w1:
                torch.bmm(x.transpose(1, 2), ga, out=gw1_EDI[e0:e1])
            if need_w3:
                torch.bmm(x.transpose(1, 2), gb, out=gw3_EDI[e0:e1])
            if need_x:
                torch.bmm(ga, w1_EDI[e0:e1].transpose(1, 2), out=gx).baddbmm_(gb, w3_EDI[e0:e1].transpose(1, 2))
        return (_sum_bags(gx_PD, bag_N, offsets_T) if need_x else None, None, None, None, gs_N if need_s else None,
                None, None, None, *(gw if n else None for gw, n in zip((gw1_EDI, gw3_EDI, gw2_EID),
                                                                        (need_w1, need_w3, need_w2))))


def _gather(x_TD: torch.Tensor, token_P: torch.Tensor, pad_Q: torch.Tensor) -> torch.Tensor:
    """The rows token_P of x_TD, with the padding slots pad_Q zero."""
    return x_TD.index_select(0, token_P).index_fill_(0, pad_Q, 0.0)


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


# CPU crossovers of 'auto', in mean rows (assignments) per expert (benchmarks/moe_layer.py --crossover):
# grouped_mm below the first, bucketed bmm up to the second, the per-expert loop above
CPU_BUCKETED_MIN_ROWS_PER_EXPERT = 4
CPU_LOOP_MIN_ROWS_PER_EXPERT = 576


class Experts(nn.Module):
    """E routed SwiGLU experts, weights stacked as w1, w3: [E, D, I] and w2: [E, I, D]."""

    fp8 = None  # a moe.fp8.Recipe, set by moe.fp8.convert: then every expert GEMM is fake-quantised

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D, I = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(E, D, I))  # gate projection
        self.w3 = nn.Parameter(torch.empty(E, D, I))  # up projection
        self.w2 = nn.Parameter(torch.empty(E, I, D))  # down projection
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg)

    def impl_for(self, x: torch.Tensor, n_rows: int) -> str:
        """The implementation that runs: cfg.expert_impl, or for 'auto' one chosen by device and size.

        GPU: grouped_mm. CPU (measured, docs/performance.md): grouped_mm (one call, no Python per
        expert) while experts get a handful of rows each; bucketed bmm while they get tens to a
        few hundred (small GEMMs gain little from a second thread; bmm hands each thread whole
        experts); from a few hundred rows per expert the loop, which keeps each expert's rows in
        cache, is fastest. Where grouped_mm is unsupported (e.g. float64), bucketed takes its place.
        """
        impl = self.cfg.expert_impl
        if impl != "auto":
            return impl
        grouped_ok = grouped_mm_supported(x, self.w1, self.w3, self.w2)
        if x.device.type != "cpu":
            return "grouped" if grouped_ok else "loop"
        per_expert = n_rows / self.cfg.n_routed_experts
        if per_expert >= CPU_LOOP_MIN_ROWS_PER_EXPERT:
            return "loop"
        return "grouped" if grouped_ok and per_expert < CPU_BUCKETED_MIN_ROWS_PER_EXPERT else "bucketed"

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
        scale_N = weights_TK.flatten().index_select(0, d.order_N).to(x_TD.dtype)
        if self.fp8 is not None:  # simulated FP8 (moe.fp8.convert): a loop over experts, quantised GEMMs
            from moe.fp8 import experts_fp8

            y_ND = experts_fp8(x_TD.index_select(0, token_N), d.counts_E, self.w1, self.w3, self.w2, scale_N,
                               self.fp8)
            return x_TD.new_zeros(T, y_ND.shape[-1]).index_add_(0, token_N, y_ND), d.counts_E, d.dropped
        impl = self.impl_for(x_TD, token_N.numel())
        x_in, ws = x_TD, (self.w1, self.w3, self.w2)
        if torch.is_autocast_enabled(x_TD.device.type):
            # grouped_mm and the out= matmuls of the hand-written paths are not on autocast's list: cast as it
            # casts a matmul (bf16 on CUDA training), or the experts would run fp32 while every dense matmul
            # runs bf16 (and a path mixing both would fail)
            dt = torch.get_autocast_dtype(x_TD.device.type)
            x_in, scale_N, ws = x_TD.to(dt), scale_N.to(dt), tuple(w.to(dt) for w in ws)
        if impl in ("loop", "bucketed"):
            fn = experts_loop_add if impl == "loop" else experts_bucketed
            with torch.autocast(x_TD.device.type, enabled=False):  # one dtype throughout, as cast above
                y_TD = fn(x_in, token_N, scale_N, d.counts_E, *ws)
            return y_TD.to(x_TD.dtype), d.counts_E, d.dropped
        x_ND = x_in.index_select(0, token_N)  # each expert's tokens, contiguous
        y_ND = experts_grouped(x_ND, d.counts_E, *ws, scale_N)
        # scatter-add each weighted output onto its token; dropped assignments add nothing
        y_TD = x_TD.new_zeros(T, y_ND.shape[-1]).index_add_(0, token_N, y_ND.to(x_TD.dtype))
        return y_TD, d.counts_E, d.dropped
