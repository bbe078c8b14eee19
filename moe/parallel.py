"""Expert parallelism (EP) and data parallelism (DP) over torch.distributed.

Shapes: T tokens on this rank, D model dim, K experts per token, W ranks in the EP group,
N = T*K (token, expert) rows this rank sends, R rows it receives, L = E / W local experts.

Every rank has its own micro-batch. The attention, router, shared experts, embeddings and
head are replicated (data parallel); the routed experts are sharded: rank r of an EP group
holds experts [r*L, (r+1)*L). A token's rows travel to the ranks that hold its experts and
back, in one MoE layer:

  dispatch  sort the T*K rows by expert (= by destination rank), exchange the row counts,
            all-to-all the rows (uneven splits)                     -> x_RD on the expert's rank
  compute   this rank's L experts on the rows of every rank (the single-process Experts)
  combine   all-to-all the results back (the reverse splits), scale by the routing
            weights and add each row onto its token                 -> y_TD on the token's rank

Both all-to-alls are differentiable: the backward of one is the other with the splits swapped.
Launch with torchrun (`moe.train` calls `setup` and `teardown`); gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from moe.config import ModelConfig
from moe.experts import Experts, sort_by_expert
from moe.layer import STATS_BUFFERS, moe_layers

MODES = ("none", "dp", "ep")
FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


# ------------------------------------------------------------------------------ the all-to-all
def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(in_splits[:r]):...] go to rank r; out gets out_splits[r] rows from rank r."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    wire = (lambda t: t.view(torch.uint8)) if x.dtype in FLOAT8 else (lambda t: t)  # gloo has no float8
    dist.all_to_all_single(wire(out), wire(x.contiguous()), out_splits, in_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable: the gradient travels back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _all_to_all(g, in_splits, out_splits, ctx.group), None, None, None


# ------------------------------------------------------------------------------ dispatch, compute, combine
class Plan(NamedTuple):
    """What combine needs to send the rows back and put them onto their tokens."""
    order_N: torch.Tensor  # the (token, k) pair of each sent row (index into weights_TK.flatten())
    token_N: torch.Tensor  # the token of each sent row
    counts_E: torch.Tensor  # rows this rank sent to each expert (all E): the layer's load statistics
    send_W: list[int]  # rows sent to each rank
    recv_W: list[int]  # rows received from each rank
    group: object  # the EP process group


def dispatch(x_TD: torch.Tensor, experts_TK: torch.Tensor, n_local: int,
             group) -> tuple[torch.Tensor, torch.Tensor, Plan]:
    """Send each (token, expert) row to the rank holding the expert: (x_RD, local expert of each row, plan).

    x_RD holds the rows of rank 0 first, then rank 1, ...; inside each, sorted by expert.
    """
    W, K = dist.get_world_size(group), experts_TK.shape[1]
    d = sort_by_expert(experts_TK, W * n_local)  # by expert = by destination rank
    token_N = d.order_N // K
    send_WL = d.counts_E.view(W, n_local)
    recv_WL = torch.empty_like(send_WL)
    dist.all_to_all_single(recv_WL, send_WL, group=group)  # recv_WL[r, e]: rows rank r sends my expert e
    send_W, recv_W = send_WL.sum(1).tolist(), recv_WL.sum(1).tolist()
    x_RD = AllToAll.apply(x_TD.index_select(0, token_N), recv_W, send_W, group)
    expert_R = torch.arange(n_local, device=x_TD.device).repeat(W).repeat_interleave(recv_WL.flatten())
    return x_RD, expert_R, Plan(d.order_N, token_N, d.counts_E, send_W, recv_W, group)


def combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, plan: Plan, n_tokens: int) -> torch.Tensor:
    """Send the expert outputs back (reverse splits), weight them and add each onto its token: y_TD."""
    y_ND = AllToAll.apply(y_RD, plan.send_W, plan.recv_W, plan.group)  # in the order dispatch sent them
    scale_N = weights_TK.flatten().index_select(0, plan.order_N).to(y_ND.dtype)
    return y_ND.new_zeros(n_tokens, y_ND.shape[-1]).index_add_(0, plan.token_N, y_ND * scale_N.unsqueeze(-1))


class ExpertParallel(Experts):
    """Experts, sharded: this rank holds E / W of them and serves every rank's tokens.

    A drop-in for `MoE.experts` (same forward, same parameter names, shards of the weights).
    """

    def __init__(self, experts: Experts, group):
        if type(experts) is not Experts:  # a variant (another compute path) would silently lose its behaviour
            raise ValueError(f"expert parallelism shards moe.experts.Experts, not {type(experts).__name__}")
        cfg, W, rank = experts.cfg, dist.get_world_size(group), dist.get_rank(group)
        check_expert_split(cfg, W)
        L = cfg.n_routed_experts // W
        local = cfg.replace(n_routed_experts=L, n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)
        with torch.device("meta"):  # no init: the weights are this rank's slice of the full layer
            super().__init__(local)
        self.to_empty(device=experts.w1.device)
        self.load_state_dict({k: v[rank * L:(rank + 1) * L] for k, v in experts.state_dict().items()})
        self.group, self.n_local, self.first = group, L, rank * L  # my experts: first .. first + L - 1
        self.fp8 = experts.fp8  # a simulated FP8 recipe (moe.fp8.convert) stays on

    def forward(self, x_TD, weights_TK, experts_TK):
        x_RD, expert_R, plan = dispatch(x_TD, experts_TK, self.n_local, self.group)
        # compute: the single-process dispatch over my L experts, one expert (weight 1) per row
        y_RD, _, _ = super().forward(x_RD, x_RD.new_ones(len(expert_R), 1), expert_R.unsqueeze(1))
        y_TD = combine(y_RD, weights_TK, plan, x_TD.shape[0])
        return y_TD, plan.counts_E, plan.counts_E.new_zeros(())


def check_expert_split(cfg: ModelConfig, ep: int) -> None:
    """Expert parallelism needs E divisible by the EP size, and is dropless."""
    if cfg.n_routed_experts % ep:
        raise ValueError(f"expert parallelism over {ep} processes needs n_routed_experts divisible by {ep}, "
                         f"got n_routed_experts={cfg.n_routed_experts}; pick --ep-size (or --nproc_per_node) "
                         f"among {[n for n in range(1, cfg.n_routed_experts + 1) if cfg.n_routed_experts % n == 0]}")
    if cfg.capacity_factor is not None:
        raise ValueError(f"expert parallelism is dropless: set capacity_factor=None "
                         f"(got {cfg.capacity_factor}), or train with --parallel dp")


# ------------------------------------------------------------------------------ the process groups
@dataclass
class Parallel:
    """This process's place in the run. Parallel() is one process alone: every method is then a no-op.

    Ranks r = i * ep + j: EP group i holds all experts once, split over its ep ranks (j holds
    experts [j*L, (j+1)*L)); the world // ep EP groups are data-parallel replicas of each other.
    """
    mode: str = "none"
    rank: int = 0
    world: int = 1
    ep: int = 1  # processes that share one copy of the experts (1: plain data parallel)
    group: object = None  # every rank (None: a single process)
    ep_group: object = None  # the ep ranks holding one copy of the experts (None when ep == 1)
    expert_dp_group: object = None  # the ranks holding the same expert shard (None when ep == world)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the metrics, the checkpoints and the plots."""
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """One GPU per process: cuda means cuda:LOCAL_RANK under torchrun."""
        if self.group is not None and device.type == "cuda" and device.index is None:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def check_config(self, cfg: ModelConfig) -> None:
        if self.ep > 1:
            check_expert_split(cfg, self.ep)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Shard every MoE layer's routed experts over the EP group; balance statistics over all ranks."""
        if self.group is None:
            return model
        for m in moe_layers(model):
            m.group = self.group  # the batch-level aux loss counts every rank's assignments
            if self.ep > 1:
                m.experts = ExpertParallel(m.experts, self.ep_group)
        return model

    # ---------------------------------------------------------------- gradients
    def _is_shard(self, model: nn.Module) -> set[int]:
        return {id(p) for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()}

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        """Each rank's gradient is of its own mean loss; make every gradient that of the mean over ranks.

        The loss is (1/world) * sum over ranks of L_r. A replicated parameter's gradient is then
        the mean of the ranks' gradients. An expert's shard already holds the sum over the ranks
        of its EP group (their rows came to it and their gradients came back); summed over its
        data-parallel replicas it is the sum over all ranks. So: every gradient is summed over
        the ranks holding that parameter, then divided by world.
        """
        if self.group is None:
            return
        shards = self._is_shard(model)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # every rank must send the same buffers
                p.grad = torch.zeros_like(p)
        _all_reduce_sum([p.grad for p in params if id(p) not in shards], self.group)
        _all_reduce_sum([p.grad for p in params if id(p) in shards], self.expert_dp_group)
        for p in params:
            p.grad.div_(self.world)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, params: list[torch.Tensor], max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over the whole model: the expert shards of every EP rank count."""
        if self.group is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        shards = self._is_shard(model)
        sq = [torch.zeros((), device=params[0].device) for _ in range(2)]
        for p in params:
            if p.grad is not None:
                sq[id(p) in shards] += torch.linalg.vector_norm(p.grad.float()).square()
        _all_reduce_sum([sq[1]], self.ep_group)  # the other ranks' experts (replicated ones are equal everywhere)
        total = (sq[0] + sq[1]).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return float(total)

    # ---------------------------------------------------------------- statistics
    @torch.no_grad()
    def all_reduce_routing_stats(self, model: nn.Module) -> None:
        """Tokens per expert (and drops, router entropy) over every rank's batch: the bias update sees
        the global load, so every rank applies the same update to its copy of the bias."""
        if self.group is not None:
            _all_reduce_sum([getattr(m, name) for m in moe_layers(model) for name in STATS_BUFFERS], self.group)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (losses: each rank has its own micro-batch)."""
        if self.group is None or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return dict(zip(values, (t / self.world).tolist()))

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Ctrl-C seen by one rank stops them all)."""
        if self.group is None:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    # ---------------------------------------------------------------- checkpoints
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.ep)]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def full_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """Model and optimizer state dicts as one process would have them (experts gathered).

        Every rank must call it; (None, None) when nothing is sharded (the model's own state is full).
        """
        if self.group is None or self.ep == 1:
            return None, None
        state = model.state_dict()
        for prefix, m in model.named_modules():
            if isinstance(m, ExpertParallel):
                for k in m.state_dict():
                    state[f"{prefix}.{k}"] = self._gather(state[f"{prefix}.{k}"])
        opt = optimizer.state_dict()
        opt["state"] = dict(opt["state"])
        shards = self._is_shard(model)
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            if id(p) in shards and i in opt["state"]:
                opt["state"][i] = {k: self._gather(v) if torch.is_tensor(v) and v.shape == p.shape else v
                                   for k, v in opt["state"][i].items()}
        return state, opt

    def shard_optimizer_state(self, opt: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """A single-process optimizer state dict, with this rank's slice of every expert's moments."""
        if self.group is None or self.ep == 1:
            return opt
        shards = self._is_shard(model)
        state = dict(opt["state"])
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            if id(p) in shards and i in state:
                lo = dist.get_rank(self.ep_group) * p.shape[0]
                state[i] = {k: v[lo:lo + p.shape[0]] if torch.is_tensor(v) and v.dim() == p.dim() else v
                            for k, v in state[i].items()}
        return {**opt, "state": state}


def _all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sum each tensor over the group in one call (flattened into one buffer); no-op without a group."""
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    for t, f in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(f.view_as(t))


def setup(mode: str, ep_size: int | None, device: torch.device, timeout_s: float = 300.0) -> Parallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build the groups.

    mode "none": a single process (refuses to run under a multi-process torchrun); "dp": every
    rank holds the whole model; "ep": experts sharded over ep_size ranks (None = all of them).
    A rank that never starts ends in a clear error after timeout_s, not a hang.
    """
    if mode not in MODES:
        raise ValueError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    world_env = os.environ.get("WORLD_SIZE")
    if mode == "none":
        if world_env is not None and int(world_env) > 1:
            raise ValueError(f"launched as one of {world_env} processes (WORLD_SIZE={world_env}) but --parallel is "
                             "none: every process would train the same run; pass --parallel dp or --parallel ep")
        return Parallel()
    if world_env is None or "RANK" not in os.environ:
        raise ValueError(f"--parallel {mode} runs one process per rank: launch it with "
                         f"torchrun --nproc_per_node N -m moe train --parallel {mode} ...")
    rank, world = int(os.environ["RANK"]), int(world_env)
    ep = 1 if mode == "dp" else (ep_size or world)
    if ep <= 0 or world % ep:
        raise ValueError(f"--ep-size {ep} must divide the number of processes ({world})")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # one GPU per process
        torch.cuda.set_device(device if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistError as e:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise ValueError(f"rank {rank}: the {world} processes did not all join the process group at {where} "
                         f"within --dist-timeout {timeout_s:g} s ({str(e).splitlines()[0]}); did every process "
                         "start? Launch with torchrun --nproc_per_node N") from None
    ps = Parallel(mode, rank, world, ep, dist.group.WORLD)
    # every rank creates every group, in the same order (torch.distributed requires it)
    if ep == world > 1:
        ps.ep_group = dist.group.WORLD
    elif ep > 1:
        for i in range(world // ep):  # EP groups: ranks i*ep .. i*ep + ep - 1
            g = dist.new_group(list(range(i * ep, (i + 1) * ep)))
            ps.ep_group = g if rank // ep == i else ps.ep_group
        for j in range(ep):  # the replicas of expert shard j: ranks j, j + ep, j + 2*ep, ...
            g = dist.new_group(list(range(j, world, ep)))
            ps.expert_dp_group = g if rank % ep == j else ps.expert_dp_group
    return ps


def teardown(ps: Parallel) -> None:
    if ps.group is not None and dist.is_initialized():
        dist.destroy_process_group()
