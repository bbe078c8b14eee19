"""Forward+backward throughput of one MoE layer: ours vs transformers vs the dense limit.

Configurations (--preset-size, a comma list; each has its own batches): small = 16 experts top-4
(issue 6), fine64 = 64 experts top-6 and fine256 = 256 experts top-8 (DeepSeek's fine-grained
regime), all at dim 256, expert width 128, 1 shared expert; large = the GPU run.

Entries, all built from the same config and fed the same input:
  ours[loop|bucketed|grouped]
                         moe.layer.MoE(cfg) (it initialises itself with the project's rule, moe.init), with each
                         expert implementation; "+compile" = torch.compile of the layer
  hf[eager|grouped_mm|batched_mm]
                         transformers' DeepseekV3MoE with each experts implementation, every
                         parameter ~ N(0, 0.02) (standalone it leaves the router at zero)
  dense[fused|split]     a dense SwiGLU with the ACTIVE FLOPs of the MoE (dim -> (top_k +
                         n_shared) * moe_inter_dim -> dim), gate/up as one matmul or two: the
                         no-routing-overhead limit; the faster of the two is the reference

The entries are timed interleaved (round-robin, a few steps each) so that a change in machine
load hits all of them alike (hf[batched_mm], ~100x slower, and hf[eager] beyond 64 experts are
timed alone afterwards). Per
row: fwd+bwd tokens/s (median), ratios to the best hf entry and to the dense limit, peak
memory of one forward+backward, and the load balance of the routed batch (max/mean tokens
per expert). A table, then one line 'JSON {...}'.

  python benchmarks/moe_layer.py                                  # the CPU benchmark: small, fine64, fine256
  python benchmarks/moe_layer.py --device cuda --dtype bf16 --preset-size large
  python benchmarks/moe_layer.py --crossover                      # loop vs bucketed vs grouped over T
  python benchmarks/moe_layer.py --breakdown                      # where ours' time goes
  python benchmarks/moe_layer.py --roofline                       # GFLOP/s of every GEMM shape, the bound
  python benchmarks/moe_layer.py --repeat 10 --max-gb 8           # ten runs, ours' ratios against the targets

As an entry of the reference harness (../shared/bench/peer_moe.py):
  python ../shared/bench/peer_moe.py --extra ours=benchmarks/moe_layer.py:build
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe.cli import comma_list, non_negative_float, non_negative_int, one_of, positive_int  # noqa: E402
from moe.config import CHOICES, ModelConfig, parse_overrides  # noqa: E402
from moe.device import cpu_name, resolve_device  # noqa: E402
from moe.experts import BUCKET_EXPERTS, sort_by_expert  # noqa: E402
from moe.init import init_weights  # noqa: E402
from moe.layer import MoE  # noqa: E402

# The MoE shape of each preset, in ModelConfig's contract fields, and its default batches.
PRESET_SIZES: dict[str, dict[str, Any]] = {
    # issue 6: 16 routed experts top-4 + 1 shared, 4 groups keep 2, sigmoid, scale 2.5
    "small": dict(cfg=dict(dim=256, moe_inter_dim=128, n_routed_experts=16, n_activated_experts=4,
                           n_shared_experts=1, n_expert_groups=4, n_limited_groups=2),
                  sizes="8x256,16x512"),
    # issue 19, DeepSeek's fine-grained regime at the toy dims: many narrow experts, more of them per token
    "fine64": dict(cfg=dict(dim=256, moe_inter_dim=128, n_routed_experts=64, n_activated_experts=6,
                            n_shared_experts=1, n_expert_groups=8, n_limited_groups=4),
                   sizes="8x256"),
    "fine256": dict(cfg=dict(dim=256, moe_inter_dim=128, n_routed_experts=256, n_activated_experts=8,
                             n_shared_experts=1, n_expert_groups=8, n_limited_groups=4),
                    sizes="8x256"),
    # the GPU run: DeepSeek-V2-Lite's MoE width (dim 2048, experts of 1408, 2 shared) with 64
    # experts top-6 routed as in V3, 8k tokens
    "large": dict(cfg=dict(dim=2048, moe_inter_dim=1408, n_routed_experts=64, n_activated_experts=6,
                           n_shared_experts=2, n_expert_groups=8, n_limited_groups=4),
                  sizes="4x2048"),
}
ROUTING = dict(score_func="sigmoid", route_scale=2.5, norm_topk_prob=True)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")  # transformers' experts implementations timed here


def bench_config(preset: str = "small", **changes: Any) -> ModelConfig:
    """The benchmark's MoE layer as a ModelConfig (one layer: n_layers=1, no dense blocks)."""
    return ModelConfig(n_layers=1, n_dense_layers=0, **PRESET_SIZES[preset]["cfg"], **ROUTING).replace(**changes)


def active_fwd_flops_per_token(cfg: ModelConfig) -> float:
    """Matmul FLOPs of one token's forward: K routed + shared SwiGLUs and the router."""
    expert = 2 * 3 * cfg.dim * cfg.moe_inter_dim
    return (cfg.n_activated_experts + cfg.n_shared_experts) * expert + 2 * cfg.dim * cfg.n_routed_experts


# ---------------------------------------------------------------------------------- entries
def build_ours(cfg: ModelConfig, impl: str) -> MoE:
    m = MoE(cfg.replace(expert_impl=impl))  # initialises itself with the project's rule (moe.init)
    m.fwd_flops_per_token = active_fwd_flops_per_token(cfg)
    return m


def build(cfg: dict, impl: str | None = None) -> nn.Module:
    """Factory for ../shared/bench/peer_moe.py --extra: its config dict (HF names) -> our MoE.

    expert_impl: `impl`, else $MOE_EXPERT_IMPL, else "auto".
    """
    ours = bench_config(
        dim=cfg["hidden_size"], moe_inter_dim=cfg["moe_intermediate_size"],
        n_routed_experts=cfg["n_routed_experts"], n_activated_experts=cfg["num_experts_per_tok"],
        n_shared_experts=cfg["n_shared_experts"], n_expert_groups=cfg["n_group"],
        n_limited_groups=cfg["topk_group"], norm_topk_prob=cfg["norm_topk_prob"],
        route_scale=cfg["routed_scaling_factor"], init_std=cfg.get("init_std", 0.02))
    return build_ours(ours, impl or os.environ.get("MOE_EXPERT_IMPL", "auto"))


def build_loop(cfg: dict) -> nn.Module:
    return build(cfg, "loop")


def build_grouped(cfg: dict) -> nn.Module:
    return build(cfg, "grouped")


def build_bucketed(cfg: dict) -> nn.Module:
    return build(cfg, "bucketed")


def build_hf(cfg: ModelConfig, impl: str) -> nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    c = DeepseekV3Config(
        hidden_size=cfg.dim, intermediate_size=4 * cfg.dim, moe_intermediate_size=cfg.moe_inter_dim,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.n_activated_experts,
        n_shared_experts=cfg.n_shared_experts, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.route_scale, hidden_act="silu")
    c._experts_implementation = impl
    m = DeepseekV3MoE(c)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02)
    return m


class DenseSwiGLU(nn.Module):
    """w_down(silu(x W_gate) * (x W_up)); fused=True computes gate and up as one matmul."""

    def __init__(self, dim: int, inter: int, fused: bool):
        super().__init__()
        self.fused = fused
        if fused:
            self.w13 = nn.Linear(dim, 2 * inter, bias=False)
        else:
            self.w1 = nn.Linear(dim, inter, bias=False)
            self.w3 = nn.Linear(dim, inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


def build_dense(cfg: ModelConfig, fused: bool) -> nn.Module:
    m = DenseSwiGLU(cfg.dim, (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim, fused)
    init_weights(m, cfg)
    return m


# ---------------------------------------------------------------------------------- measuring
def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def fwd_bwd(mod: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> None:
    """One training step's worth of layer work: forward, backward into every parameter and x."""
    for p in mod.parameters():
        p.grad = None
    xi = x.detach().requires_grad_(True)
    _first(mod(xi)).backward(gout)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class CPUPeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated while active (CPU has no max_memory_allocated).

    Each new storage is counted when an op returns it and uncounted when it is freed, so
    the peak covers activations saved for backward, temporaries and gradients, not the
    parameters or inputs that existed before.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self.live: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views, in-place and out= results live in an input's storage: nothing new
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if id(st) not in self.live and st.data_ptr() not in inputs:
                    self.live.add(id(st))
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, id(st), st.nbytes())
        return out


def peak_memory_mb(mod: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> float | None:
    """Peak memory of one forward+backward beyond what existed before (MB); None if unknown."""
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(mod, x, gout)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if hasattr(mod, "_orig_mod"):
        return None  # compiled kernels allocate outside the dispatcher
    fwd_bwd(mod, x, gout)  # let gradients exist already, as in training
    with CPUPeakMemory() as pm:
        fwd_bwd(mod, x, gout)
    return pm.peak / 2**20


@torch.no_grad()
def load_balance(mod: nn.Module, x: torch.Tensor, n_experts: int) -> float | None:
    """max/mean tokens per routed expert for this batch (what the loop and grouped_mm see)."""
    mod = getattr(mod, "_orig_mod", mod)
    x_TD = x.reshape(-1, x.shape[-1])
    if isinstance(mod, MoE):
        experts_TK = mod.router(x_TD).experts_TK
    elif hasattr(mod, "gate"):
        experts_TK = mod.gate(x_TD)[2]
    else:
        return None
    counts = torch.bincount(experts_TK.flatten(), minlength=n_experts).float()
    return float(counts.max() / counts.mean())


def hf_batched_mm_gb(cfg: ModelConfig, tokens: int, itemsize: int) -> float:
    """batched_mm gathers one copy of the expert weights per (token, expert) pair."""
    pairs = tokens * cfg.n_activated_experts
    return 3 * pairs * cfg.dim * cfg.moe_inter_dim * itemsize * 2 / 2**30  # forward copy + its grad


def time_interleaved(entries: dict[str, nn.Module], x: torch.Tensor, gout: torch.Tensor, rounds: int,
                     steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per fwd+bwd step for every entry, round-robin so load drifts hit all alike."""
    for mod in entries.values():
        for _ in range(warmup):
            fwd_bwd(mod, x, gout)
    times: dict[str, list[float]] = {name: [] for name in entries}
    for _ in range(rounds):
        for name, mod in entries.items():
            for _ in range(steps):
                sync(x.device)
                t0 = time.perf_counter()
                fwd_bwd(mod, x, gout)
                sync(x.device)
                times[name].append(time.perf_counter() - t0)
    return times


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


# ---------------------------------------------------------------------------------- modes
def run_comparison(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                   dtype: torch.dtype, preset: str = "small") -> dict[str, Any]:
    try:
        import transformers  # noqa: F401
        hf_impls = [s for s in args.hf_impls.split(",") if s]
        hf_note = None
    except ImportError:
        hf_impls, hf_note = [], "transformers not installed: hf entries skipped"
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    impls = [s for s in args.impls.split(",") if s]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows, notes = [], [hf_note] if hf_note else []
    for B, S in sizes:
        T = B * S
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, S, cfg.dim, generator=g).to(device, dtype)
        gout = torch.randn(B, S, cfg.dim, generator=g).to(device, dtype)
        builders: dict[str, Callable[[], nn.Module]] = {}
        for compiled in compile_modes:
            tag = "+compile" if compiled else ""
            for impl in impls:
                builders[f"ours[{impl}]{tag}"] = lambda impl=impl: build_ours(cfg, impl)
            for fused in (True, False):
                builders[f"dense[{'fused' if fused else 'split'}]{tag}"] = lambda fused=fused: build_dense(cfg, fused)
        for impl in hf_impls:
            need = hf_batched_mm_gb(cfg, T, x.element_size()) if impl == "batched_mm" else 0.0
            if need > args.max_gb:
                notes.append(f"{preset} {B}x{S}: hf[batched_mm] skipped, needs ~{need:.0f} GB (a weight copy per "
                             f"token-expert pair) > --max-gb {args.max_gb:g}")
                continue
            builders[f"hf[{impl}]"] = lambda impl=impl: build_hf(cfg, impl)
        probe = build_ours(cfg, "auto").to(device, dtype)
        auto = probe.experts.impl_for(x, T * cfg.n_activated_experts)
        notes.append(f"{preset} {B}x{S}: expert_impl='auto' picks {auto} here")
        if True in compile_modes:
            torch._dynamo.reset()  # fresh compiles per config and size: new modules would hit the recompile limit
        entries: dict[str, nn.Module] = {}
        for name, make in builders.items():
            torch.manual_seed(0)
            mod = make().to(device, dtype).train()
            entries[name] = torch.compile(mod) if name.endswith("+compile") else mod
        # hf[batched_mm] is ~100x slower and allocates GBs, and hf[eager] with many experts (a Python loop
        # over them, 15 s per step at 256) is as slow: timed on their own afterwards (two steps), so that
        # they neither take most of the run nor evict the caches of the interleaved entries
        slow_names = {"hf[batched_mm]"} | ({"hf[eager]"} if cfg.n_routed_experts > 64 else set())
        slow = {k: entries.pop(k) for k in list(entries) if k in slow_names}
        times = time_interleaved(entries, x, gout, args.rounds, args.steps, args.warmup)
        entries.update(slow)
        times.update({k: time_interleaved({k: m}, x, gout, 1, 2, 1)[k] for k, m in slow.items()})
        for name, mod in entries.items():
            ts = times[name]
            rows.append(dict(
                config=preset, name=name, auto=name in (f"ours[{auto}]", f"ours[{auto}]+compile"),
                batch=B, seq=S, tokens=T, fb_ms=1e3 * statistics.median(ts), fb_min_ms=1e3 * min(ts),
                fb_tok_s=T / statistics.median(ts), n_timed=len(ts),
                peak_mb=peak_memory_mb(mod, x, gout),
                load_max_over_mean=load_balance(mod, x, cfg.n_routed_experts)))
        add_ratios([r for r in rows if r["tokens"] == T])
    return dict(rows=rows, notes=notes)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """ours/hf_best and ours/dense (compiled rows against the best compiled dense)."""
    hf = [r["fb_tok_s"] for r in rows if r["name"].startswith("hf[")]
    hf_best = max(hf) if hf else None
    for r in rows:
        compiled = r["name"].endswith("+compile")
        dense = [d for d in rows if d["name"].startswith("dense[") and d["name"].endswith("+compile") == compiled]
        best = max(dense, key=lambda d: d["fb_tok_s"]) if dense else None
        r["vs_hf_best"] = r["fb_tok_s"] / hf_best if hf_best else None
        r["vs_dense"] = r["fb_tok_s"] / best["fb_tok_s"] if best else None
        r["dense_ref"] = best["name"] if best else None
        r["dense_peak_mb"] = best["peak_mb"] if best else None


def print_table(result: dict[str, Any], meta: dict[str, Any]) -> None:
    groups = list(dict.fromkeys((r["config"], r["batch"], r["seq"]) for r in result["rows"]))
    for preset, B, S in groups:
        rows = [r for r in result["rows"] if (r["config"], r["batch"], r["seq"]) == (preset, B, S)]
        print(f"\n== {preset} ({describe(preset)}): {B}x{S} = {B * S} tokens, {meta['dtype']}, "
              f"{meta['threads']} threads, {meta['device']}, "
              f"median of {rows[0]['n_timed']} interleaved steps ==")
        print(f"{'entry':<24}{'fwd+bwd tok/s':>14}{'ms':>8}{'min ms':>8}{'vs hf best':>11}{'vs dense':>9}"
              f"{'peak MB':>9}{'dense MB':>9}{'load max/mean':>14}")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        for r in rows:
            print(f"{r['name']:<24}{r['fb_tok_s']:>14.0f}{r['fb_ms']:>8.1f}{r['fb_min_ms']:>8.1f}"
                  f"{fmt(r['vs_hf_best'], '.2f'):>11}{fmt(r['vs_dense'], '.2f'):>9}{fmt(r['peak_mb'], '.0f'):>9}"
                  f"{fmt(r['dense_peak_mb'], '.0f'):>9}{fmt(r['load_max_over_mean'], '.2f'):>14}")
    for note in result["notes"]:
        print(f"note: {note}")
    print("vs dense: against the faster dense entry, compiled rows against compiled dense; peak MB: one "
          "fwd+bwd beyond parameters and inputs ('-' under torch.compile on CPU)")


# issue 19's targets for ours, per configuration, checked by --repeat (no dense target for fine256)
TARGETS = {"small": {"vs_dense": 0.9, "vs_hf_best": 1.5}, "fine64": {"vs_dense": 0.75, "vs_hf_best": 1.5},
           "fine256": {"vs_hf_best": 1.5}, "large": {}}


def describe(preset: str) -> str:
    c = PRESET_SIZES[preset]["cfg"]
    return (f"{c['n_routed_experts']} experts top-{c['n_activated_experts']} + {c['n_shared_experts']} shared, "
            f"dim {c['dim']}, expert width {c['moe_inter_dim']}")


def summarize_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and ours entry: each run's ratios, their median/min/max, and in how many runs each target is met."""
    out = []
    first = runs[0]["rows"]
    for key in [(r["config"], r["batch"], r["seq"], r["name"]) for r in first if r["name"].startswith("ours[")]:
        per_run = [next(r for r in run["rows"] if (r["config"], r["batch"], r["seq"], r["name"]) == key)
                   for run in runs]
        entry = dict(config=key[0], batch=key[1], seq=key[2], name=key[3], auto=per_run[0]["auto"], n_runs=len(runs))
        for ratio in ("vs_dense", "vs_hf_best"):
            target = TARGETS.get(key[0], {}).get(ratio)  # None: no target for this ratio here
            entry[f"{ratio}_target"] = target
            vals = [r[ratio] for r in per_run if r[ratio] is not None]
            entry[ratio] = vals
            entry[f"{ratio}_median"] = statistics.median(vals) if vals else None
            entry[f"{ratio}_met"] = None if target is None else sum(v >= target for v in vals)
        out.append(entry)
    return out


def print_summary(runs: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    labels = [f"{e.get('config', 'small')} {e['batch']}x{e['seq']} {e['name']}{' =auto' if e['auto'] else ''}"
              for e in summary]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    targets = "; ".join(f"{k}: " + ", ".join(f"{r} >= {v}" for r, v in t.items()) for k, t in TARGETS.items() if t)
    print(f"\n== {len(runs)} runs: ours vs the targets ({targets}), each run's ratios from its interleaved "
          "medians ==")
    w = max(len(label) for label in labels) + 2
    print(f"{'run':>3}{'load at start':>15}" + "".join(f"{label:>{w}}" for label in labels))
    for i, run in enumerate(runs):
        cells = [f"{fmt(e['vs_dense'][i] if e['vs_dense'] else None)} / "
                 f"{fmt(e['vs_hf_best'][i] if e['vs_hf_best'] else None)}" for e in summary]
        print(f"{i + 1:>3}{run['loadavg_start'][0]:>15.2f}" + "".join(f"{c:>{w}}" for c in cells))
    print("(each cell: vs dense / vs hf best)")
    print(f"{'entry':<{w}}{'vs dense: median (min-max)':>28}{'met':>7}{'vs hf best: median (min-max)':>30}{'met':>7}")
    for label, e in zip(labels, summary):
        cols = []
        for ratio in ("vs_dense", "vs_hf_best"):
            vals = e[ratio]
            spread = f"{e[ratio + '_median']:.2f} ({min(vals):.2f}-{max(vals):.2f})" if vals else "-"
            met = e[ratio + "_met"]
            cols += [spread, f"{met}/{len(vals)}" if vals and met is not None else "-"]
        print(f"{label:<{w}}{cols[0]:>28}{cols[1]:>7}{cols[2]:>30}{cols[3]:>7}")


def run_crossover(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                  dtype: torch.dtype, preset: str = "small") -> dict[str, Any]:
    """loop, bucketed and grouped over the number of tokens: forward only (decode, eval) and fwd+bwd.

    What 'auto' picks on CPU comes from these tables: per mean rows per expert (T*K/E), the fastest."""
    impls = ("loop", "bucketed", "grouped")
    mods = {}
    for impl in impls:
        torch.manual_seed(0)
        mods[impl] = build_ours(cfg, impl).to(device, dtype)
    rows = []
    for T in [int(t) for t in args.crossover_tokens.split(",")]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, T, cfg.dim, generator=g).to(device, dtype)
        gout = torch.randn(1, T, cfg.dim, generator=g).to(device, dtype)
        reps = max(args.rounds, min(200, 20000 // T))

        def fwd(m: nn.Module, x: torch.Tensor = x) -> None:
            with torch.no_grad():
                m(x)

        n_rows = T * cfg.n_activated_experts
        row: dict[str, Any] = dict(config=preset, tokens=T, rows_per_expert=n_rows / cfg.n_routed_experts,
                                   auto=build_ours(cfg, "auto").experts.impl_for(x, n_rows))
        for mode, fn in (("fwd", fwd), ("fwd_bwd", lambda m, x=x, gout=gout: fwd_bwd(m, x, gout))):
            ts: dict[str, list[float]] = {k: [] for k in mods}
            for m in mods.values():
                fn(m)
            for _ in range(reps):  # interleaved, one step each
                for k, m in mods.items():
                    sync(device)
                    t0 = time.perf_counter()
                    fn(m)
                    sync(device)
                    ts[k].append(time.perf_counter() - t0)
            for k in mods:
                row[f"{mode}_{k}_us"] = 1e6 * statistics.median(ts[k])
            row[f"{mode}_fastest"] = min(impls, key=lambda k: row[f"{mode}_{k}_us"])
        rows.append(row)
    print(f"\n== crossover, {preset} ({describe(preset)}): microseconds per call, interleaved medians, "
          f"{meta_line(device, dtype)} ==")
    head = "".join(f"{mode + ' ' + k:>18}" for mode in ("fwd", "fwd+bwd") for k in impls)
    print(f"{'tokens':>7}{'rows/expert':>12}{head}{'fastest fwd+bwd':>17}{'auto picks':>12}")
    for r in rows:
        cells = "".join(f"{r[f'{mode}_{k}_us']:>18.0f}" for mode in ("fwd", "fwd_bwd") for k in impls)
        print(f"{r['tokens']:>7}{r['rows_per_expert']:>12.1f}{cells}{r['fwd_bwd_fastest']:>17}{r['auto']:>12}")
    return dict(crossover=rows)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm")


def nine_gemms(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> None:
    """The 9 GEMMs of one SwiGLU fwd+bwd in the order the layer runs them (2-D: one expert with mm; 3-D: a
    bucket with bmm), the x gradient's two accumulated into one output as _LoopAdd and _Bucketed do."""
    t = lambda m: m.transpose(-1, -2)  # noqa: E731
    a, b = x @ w1, x @ w3
    y = a @ w2
    y @ t(w2), t(a) @ y, t(x) @ a, t(x) @ b
    gx = a @ t(w1)
    (gx.addmm_ if gx.dim() == 2 else gx.baddbmm_)(b, t(w3))


def expert_matmuls(impl: str, counts_E: torch.Tensor, ex: nn.Module,
                   g: torch.Generator) -> tuple[Callable[[], None], int]:
    """The 9 GEMMs per expert of one fwd+bwd (3 forward, 6 backward) as `impl` runs them, on random
    inputs of the routed shapes, without autograd; and the rows they cover (bucketed pads)."""
    w1, w3, w2 = (w.detach() for w in (ex.w1, ex.w3, ex.w2))
    D, dev, dt = w1.shape[1], w1.device, w1.dtype
    if impl == "bucketed":
        counts = counts_E.tolist()
        groups = [(e0, min(len(counts), e0 + BUCKET_EXPERTS)) for e0 in range(0, len(counts), BUCKET_EXPERTS)]
        shapes = [(e0, e1, max(counts[e0:e1])) for e0, e1 in groups if max(counts[e0:e1])]
        parts = [(torch.randn(e1 - e0, n, D, generator=g).to(dev, dt), w1[e0:e1], w3[e0:e1], w2[e0:e1])
                 for e0, e1, n in shapes]
        rows = sum((e1 - e0) * n for e0, e1, n in shapes)
    else:
        parts = [(torch.randn(int(n), D, generator=g).to(dev, dt), w1[e], w3[e], w2[e])
                 for e, n in enumerate(counts_E) if n]
        rows = int(counts_E.sum())
    return (lambda: [nine_gemms(*p) for p in parts]), rows


def run_breakdown(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                  dtype: torch.dtype, preset: str = "small") -> dict[str, Any]:
    """Where ours[auto]'s fwd+bwd time goes: its parts timed alone (interleaved), then profiles of it
    and of the dense layer (on CPU: matmul time vs the rest, page faults), and ours' top ops."""
    from torch.profiler import profile

    B, S = (int(v) for v in args.sizes.split(",")[0].split("x"))
    T, K = B * S, cfg.n_activated_experts
    torch.manual_seed(0)
    moe = build_ours(cfg, "auto").to(device, dtype)
    dense = build_dense(cfg, fused=False).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, cfg.dim, generator=g).to(device, dtype)
    g_TD = torch.randn(T, cfg.dim, generator=g).to(device, dtype)
    with torch.no_grad():
        r = moe.router(x_TD)
    ex = moe.experts
    impl = ex.impl_for(x_TD, T * K)
    d = sort_by_expert(r.experts_TK, cfg.n_routed_experts)
    token_N = d.order_N // K
    N = token_N.numel()
    matmuls, n_slots = expert_matmuls(impl, d.counts_E, ex, g)
    x_ND = x_TD.index_select(0, token_N)
    bag_N = token_N.argsort(stable=True)
    per_token_T = torch.bincount(token_N, minlength=T)
    offsets_T = per_token_T.cumsum(0) - per_token_T
    a_PI, b_PI, gh_PI = (torch.randn(n_slots, cfg.moe_inter_dim, generator=g).to(device, dtype) for _ in range(3))
    s_P1 = torch.rand(n_slots, 1, generator=g).to(device, dtype)

    def sort_and_index() -> None:
        dd = sort_by_expert(r.experts_TK, cfg.n_routed_experts)
        r.weights_TK.flatten().index_select(0, dd.order_N)
        dd.order_N // K

    def gather() -> None:  # the rows in, and its backward: their gradients summed back onto the tokens
        x_TD.index_select(0, token_N)
        torch.zeros_like(x_TD).index_add_(0, token_N, x_ND)

    def combine() -> None:  # the sum of each token's K outputs, and its backward: a gather of the gradient
        F.embedding_bag(bag_N, x_ND, offsets_T, mode="sum")
        g_TD.index_select(0, token_N)

    def elementwise() -> None:  # silu, products and routing scale, and their backward, over every row (slot)
        sa = F.silu(a_PI)
        h = sa * b_PI
        h * s_P1
        h = sa * b_PI
        torch.linalg.vecdot(gh_PI, h)
        gs = gh_PI * s_P1
        gs * sa
        torch.ops.aten.silu_backward(gs * b_PI, a_PI)

    def backward_of(fn: Callable[[torch.Tensor], torch.Tensor], gout: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            xi = x_TD.detach().requires_grad_(True)
            fn(xi).backward(gout)
        return step

    kernel = {"loop": "mm per expert", "bucketed": "bmm per bucket", "grouped": "mm per expert, as grouped_mm"}[impl]
    parts: dict[str, Callable[[], None]] = {
        f"layer (ours[auto] = {impl})": lambda: fwd_bwd(moe, x_TD.view(B, S, -1), g_TD.view(B, S, -1)),
        "  router (scores, group limit, top-k)": backward_of(lambda xi: moe.router(xi).weights_TK,
                                                             torch.ones(T, K, device=device)),
        "  sort by expert, permute weights": sort_and_index,
        "  gather rows in (+ backward)": gather,
        "  combine K rows per token (+ backward)": combine,
        f"  expert matmuls alone ({kernel})": matmuls,
        "  expert silu/products alone": elementwise,
        "  shared expert": backward_of(moe.shared, g_TD),
        "dense[split] (the reference)": lambda: fwd_bwd(dense, x_TD, g_TD),
    }
    ts: dict[str, list[float]] = {k: [] for k in parts}
    for fn in parts.values():
        fn()
    for _ in range(max(args.rounds, 10)):
        for k, fn in parts.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts[k].append(time.perf_counter() - t0)
    rows = [dict(part=k, median_ms=1e3 * statistics.median(v), min_ms=1e3 * min(v)) for k, v in ts.items()]
    layer_ms, dense_ms = rows[0]["median_ms"], rows[-1]["median_ms"]
    rest = layer_ms - sum(r["median_ms"] for r in rows[1:-1])
    rows.insert(-1, dict(part="  the rest (layer - parts: Python, autograd, allocation, statistics)", median_ms=rest,
                         min_ms=None))
    print(f"\n== breakdown of one fwd+bwd, {preset} ({describe(preset)}), {B}x{S}, {N} assignments in {n_slots} "
          f"rows, {meta_line(device, dtype)}, ms (interleaved medians; parts timed alone) ==")
    for row in rows:
        low = "" if row["min_ms"] is None else f"{row['min_ms']:>9.1f} min"
        print(f"{row['part']:<72}{row['median_ms']:>9.1f} median{low}   {row['median_ms'] / dense_ms:>5.2f}x dense")
    # 5 profiled steps of ours, and on CPU of the dense layer too, to split each one's time into its
    # matmuls as they run inside the layer (cold weights, fresh outputs) and the rest (on GPU the
    # profiler's CPU time is launch time, so no split there)
    layer, on_cpu = f"layer (ours[auto] = {impl})", device.type == "cpu"
    events, faults = {}, {}
    for name in [layer, "dense[split] (the reference)"] if on_cpu else [layer]:
        faults0 = minor_page_faults()
        with profile() as prof:
            for _ in range(5):
                parts[name]()
        faults[name] = (minor_page_faults() - faults0) / 5
        events[name] = prof.key_averages()
    table = events[layer].table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    flops = 3 * T * active_fwd_flops_per_token(cfg)  # fwd+bwd; the dense layer's differ by the router's
    split = []
    for name, evs in events.items() if on_cpu else ():
        total = sum(e.self_cpu_time_total for e in evs) / 5e3
        mm = sum(e.self_cpu_time_total for e in evs if e.key in MATMUL_OPS) / 5e3
        split.append(dict(entry=name, total_ms=total, matmul_ms=mm, other_ms=total - mm,
                          matmul_gflops=flops / mm / 1e6, page_faults=faults[name]))
    if split:
        print("\n== inside the layer (torch.profiler, 5 fwd+bwd each, profiler overhead included), ms per step; "
              "minor page faults per step ==")
        print(f"{'entry':<32}{'total':>8}{'matmuls':>9}{'GFLOP/s':>9}{'the rest':>10}{'page faults':>13}")
    for row in split:
        print(f"{row['entry']:<32}{row['total_ms']:>8.1f}{row['matmul_ms']:>9.1f}{row['matmul_gflops']:>9.0f}"
              f"{row['other_ms']:>10.1f}{row['page_faults']:>13.0f}")
    print(f"\n== torch.profiler, 5 fwd+bwd of ours[auto], by self CPU time ==\n{table}")
    return dict(breakdown=rows, inside=split, profile=table)


def gemm_shapes(cfg: ModelConfig, rows: int, width: int) -> list[tuple[str, int, int, int]]:
    """The 9 GEMMs (m, k, n) of one SwiGLU's fwd+bwd on `rows` rows with hidden `width`."""
    D = cfg.dim
    return [("fwd x@w1, x@w3", rows, D, width), ("fwd h@w2", rows, width, D), ("bwd g@w2^T", rows, D, width),
            ("bwd w2 grad h^T@g", width, rows, D), ("bwd w1, w3 grads x^T@g", D, rows, width),
            ("bwd x grads g@w1^T, g@w3^T", rows, width, D)]


def run_roofline(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                 dtype: torch.dtype, preset: str = "small") -> dict[str, Any]:
    """The matmuls alone, at the mean rows per expert: (1) each GEMM kind on its own, one weight per
    expert in turn (GFLOP/s at 1 thread and --threads); (2) all 9 GEMMs of each expert (or bucket) back to
    back, as the layer runs them, for the routed experts (mm per expert, bmm per bucket), the shared
    expert and the dense layer; (2) gives the bound on ours/dense if nothing but these matmuls took time."""
    B, S = (int(v) for v in args.sizes.split(",")[0].split("x"))
    T, K, E, I, D = B * S, cfg.n_activated_experts, cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim
    rows = max(1, round(T * K / E))
    g = torch.Generator().manual_seed(0)
    bmm_kind = f"routed (bmm, buckets of {BUCKET_EXPERTS})"
    kinds = {"routed (mm per expert)": (rows, I, E, False), bmm_kind: (rows, I, E, True),
             "shared expert": (T, cfg.n_shared_experts * I, 1, False),
             "dense": (T, (K + cfg.n_shared_experts) * I, 1, False)}
    if not cfg.n_shared_experts:
        kinds.pop("shared expert")
    threads = sorted({1, args.threads})
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        ts = []
        for _ in range(max(3, args.rounds)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    out, order = [], []
    for kind, (m_rows, width, n_mats, bucketed) in kinds.items():
        chunks = (lambda t: t.split(BUCKET_EXPERTS)) if bucketed else (lambda t: t.unbind(0))  # noqa: E731
        for name, m, k, n in gemm_shapes(cfg, m_rows, width):
            reps = 2 if name.startswith(("fwd x@w1", "bwd w1", "bwd x")) else 1  # w1 and w3: two of each
            a, b = rnd(n_mats, m, k), rnd(n_mats, k, n)
            row = dict(config=preset, kind=kind, gemm=name, m=m, k=k, n=n, count=reps * n_mats)
            for th in threads:
                torch.set_num_threads(th)
                sec = reps * timed(lambda a=a, b=b, c=chunks: [x @ w for x, w in zip(c(a), c(b))])
                row[f"ms_{th}t"] = 1e3 * sec
                row[f"gflops_{th}t"] = 2 * m * k * n * n_mats * reps / sec / 1e9
            out.append(row)
        parts = list(zip(*map(chunks, (rnd(n_mats, m_rows, D), rnd(n_mats, D, width), rnd(n_mats, D, width),
                                      rnd(n_mats, width, D)))))
        row = dict(config=preset, kind=kind)
        for th in threads:
            torch.set_num_threads(th)
            row[f"ms_{th}t"] = 1e3 * timed(lambda parts=parts: [nine_gemms(*p) for p in parts])
        order.append(row)
    torch.set_num_threads(args.threads)
    th = args.threads
    ms = {r["kind"]: r[f"ms_{th}t"] for r in order}
    shared = ms.get("shared expert", 0.0)
    bounds = {kind: ms["dense"] / (ms[kind] + shared) for kind in ms if kind.startswith("routed")}
    print(f"\n== roofline, {preset} ({describe(preset)}), {B}x{S} tokens = {rows} rows per routed expert on "
          f"average, {meta_line(device, dtype)} ==")
    print("each GEMM kind on its own, one weight per expert in turn:")
    print(f"{'kind':<28}{'gemm':<30}{'m x k x n':>18}{'count':>7}" + "".join(f"{f'GFLOP/s {t}t':>13}" for t in threads)
          + f"{f'ms ({th}t)':>10}")
    for r in out:
        mkn = f"{r['m']}x{r['k']}x{r['n']}"
        print(f"{r['kind']:<28}{r['gemm']:<30}{mkn:>18}{r['count']:>7}"
              + "".join(f"{r[f'gflops_{t}t']:>13.1f}" for t in threads) + f"{r[f'ms_{th}t']:>10.2f}")
    print("the 9 GEMMs of each expert (bucket) back to back, as in the layer, ms:")
    for r in order:
        print(f"{r['kind']:<28}" + "".join(f"{r[f'ms_{t}t']:>10.2f} ({t}t)" for t in threads))
    for kind, bound in bounds.items():
        print(f"matmul-only bound on ours/dense with {kind} + shared: {ms['dense']:.1f} ms / "
              f"{ms[kind] + shared:.1f} ms = {bound:.2f}")
    return dict(roofline=out, layer_order=order,
                bounds=[dict(config=preset, kind=k, bound=v) for k, v in bounds.items()])


def minor_page_faults() -> int:
    """Minor page faults of this process so far: each first touch of memory fresh from the kernel."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def meta_line(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device_name(device)}, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads"


POSITIVE = re.compile("[1-9][0-9]*")
SIZE = re.compile("[1-9][0-9]*x[1-9][0-9]*")  # BATCHxSEQ


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset-size", default="small,fine64,fine256",
                    help=f"comma list of configurations, each with its own batches: {', '.join(PRESET_SIZES)} "
                         "(default: the three CPU ones)")
    ap.add_argument("--sizes", default=None, type=comma_list(SIZE.fullmatch, "BATCHxSEQ such as 8x256,16x512"),
                    help="comma list of BATCHxSEQ (default: each preset's)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=positive_int, default=2, help="CPU intra-op threads")
    ap.add_argument("--impls", type=one_of(CHOICES["expert_impl"], empty_ok=True), default="loop,bucketed,grouped",
                    help="our expert implementations to time")
    ap.add_argument("--hf-impls", type=one_of(HF_IMPLS, empty_ok=True), default="eager,grouped_mm,batched_mm",
                    help="transformers experts implementations ('' for none)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--rounds", type=positive_int, default=6, help="round-robin passes over the entries")
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps per entry per round")
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    ap.add_argument("--max-gb", type=non_negative_float, default=4.0,
                    help="skip hf[batched_mm] when it would need more")
    ap.add_argument("--repeat", type=positive_int, default=1,
                    help="run the comparison this many times, then summarize ours' ratios against the targets")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--crossover", action="store_true",
                      help="instead: time loop, bucketed and grouped over --crossover-tokens")
    ap.add_argument("--crossover-tokens", default="1,4,16,64,256,1024,4096,16384",
                    type=comma_list(POSITIVE.fullmatch, "positive integers"))
    mode.add_argument("--breakdown", action="store_true",
                      help="instead: time the parts of ours[auto] (first of --sizes), then profile it and the "
                           "dense layer (matmuls vs the rest, page faults) and print ours' top ops")
    ap.add_argument("--profile-rows", type=positive_int, default=15)
    mode.add_argument("--roofline", action="store_true",
                      help="instead: the layer's matmuls alone (routed per expert, as bmm, shared, dense): GFLOP/s "
                           "of each GEMM shape at 1 thread and --threads, the 9 GEMMs per expert in layer order, and "
                           "the bound they put on ours/dense")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="change a ModelConfig field")
    args = ap.parse_args(argv)
    if args.repeat > 1 and (args.crossover or args.breakdown or args.roofline):
        ap.error("--repeat applies to the comparison, not to --crossover, --breakdown or --roofline")
    presets = [p for p in args.preset_size.split(",") if p]
    if not presets or any(p not in PRESET_SIZES for p in presets):
        ap.error(f"--preset-size: {args.preset_size!r}; choose from {', '.join(PRESET_SIZES)} (comma list)")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    try:
        cfgs = {p: bench_config(p, **parse_overrides(args.set)) for p in presets}
    except ValueError as e:  # parse_overrides names --set; an impossible config names only its fields
        ap.error(str(e) if str(e).startswith("--set") else f"--set: {e}")

    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    sizes = args.sizes
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), device=device_name(device),
        dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        loadavg_start=os.getloadavg(), preset_size=args.preset_size,
        configs={p: {k: v for k, v in c.to_dict().items() if k in PRESET_SIZES["small"]["cfg"] or k in ROUTING}
                 for p, c in cfgs.items()},
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])))
    with contextlib.suppress(ImportError):
        import transformers

        meta["transformers"] = transformers.__version__
    print(f"{meta['date']}  {meta_line(device, dtype)}  torch {meta['torch']}  load {meta['loadavg_start']}")

    def each(run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
        """run(args, cfg, device, dtype, preset) for every preset, its own batches unless --sizes; lists joined."""
        merged: dict[str, Any] = {}
        for p, c in cfgs.items():
            args.sizes = sizes or PRESET_SIZES[p]["sizes"]
            for k, v in run(args, c, device, dtype, p).items():
                merged.setdefault(k, []).extend(v if isinstance(v, list) else [v])
        return merged

    if args.crossover:
        result = each(run_crossover)
    elif args.breakdown:
        result = each(run_breakdown)
    elif args.roofline:
        result = each(run_roofline)
    elif args.repeat > 1:
        runs = []
        for i in range(args.repeat):
            start = os.getloadavg()
            print(f"\n## run {i + 1} of {args.repeat}, load average at start {start}")
            runs.append(dict(loadavg_start=start, **each(run_comparison)))
            print_table(runs[-1], meta)
        result = dict(runs=runs, summary=summarize_runs(runs))
        print_summary(runs, result["summary"])
    else:
        result = each(run_comparison)
    meta["loadavg_end"] = os.getloadavg()
    if not (args.crossover or args.breakdown or args.roofline or args.repeat > 1):
        print_table(result, meta)
    print(f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    out = dict(meta=meta, **result)
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
