"""Forward+backward throughput of one MoE layer: ours vs transformers vs the dense limit.

Entries, all built from the same config and fed the same input:
  ours[loop|grouped]     moe.layer.MoE(cfg) (it initialises itself with the project's rule, moe.init), with each
                         dispatch implementation; "+compile" = torch.compile of the layer
  hf[eager|grouped_mm|batched_mm]
                         transformers' DeepseekV3MoE with each experts implementation, every
                         parameter ~ N(0, 0.02) (standalone it leaves the router at zero)
  dense[fused|split]     a dense SwiGLU with the ACTIVE FLOPs of the MoE (dim -> (top_k +
                         n_shared) * moe_inter_dim -> dim), gate/up as one matmul or two: the
                         no-routing-overhead limit; the faster of the two is the reference

The entries are timed interleaved (round-robin, a few steps each) so that a change in machine
load hits all of them alike (hf[batched_mm], ~100x slower, is timed alone afterwards). Per
row: fwd+bwd tokens/s (median), ratios to the best hf entry and to the dense limit, peak
memory of one forward+backward, and the load balance of the routed batch (max/mean tokens
per expert). A table, then one line 'JSON {...}'.

  python benchmarks/moe_layer.py                                  # the issue's CPU benchmark
  python benchmarks/moe_layer.py --device cuda --dtype bf16 --preset-size large
  python benchmarks/moe_layer.py --crossover                      # loop vs grouped over T
  python benchmarks/moe_layer.py --breakdown                      # where ours' time goes
  python benchmarks/moe_layer.py --repeat 10 --max-gb 8           # ten runs, ours' ratios summarized

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

from moe.config import ModelConfig  # noqa: E402
from moe.init import init_weights  # noqa: E402
from moe.layer import MoE  # noqa: E402

# The MoE shape of each preset, in ModelConfig's contract fields, and its default batches.
PRESET_SIZES: dict[str, dict[str, Any]] = {
    # issue 6: 16 routed experts top-4 + 1 shared, 4 groups keep 2, sigmoid, scale 2.5
    "small": dict(cfg=dict(dim=256, moe_inter_dim=128, n_routed_experts=16, n_activated_experts=4,
                           n_shared_experts=1, n_expert_groups=4, n_limited_groups=2),
                  sizes="8x256,16x512"),
    # the GPU run: DeepSeek-V2-Lite's MoE width (dim 2048, experts of 1408, 2 shared) with 64
    # experts top-6 routed as in V3, 8k tokens
    "large": dict(cfg=dict(dim=2048, moe_inter_dim=1408, n_routed_experts=64, n_activated_experts=6,
                           n_shared_experts=2, n_expert_groups=8, n_limited_groups=4),
                  sizes="4x2048"),
}
ROUTING = dict(score_func="sigmoid", route_scale=2.5, norm_topk_prob=True)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs)"


# ---------------------------------------------------------------------------------- modes
def run_comparison(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                   dtype: torch.dtype) -> dict[str, Any]:
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
                notes.append(f"{B}x{S}: hf[batched_mm] skipped, needs ~{need:.0f} GB (a weight copy per "
                             f"token-expert pair) > --max-gb {args.max_gb:g}")
                continue
            builders[f"hf[{impl}]"] = lambda impl=impl: build_hf(cfg, impl)
        probe = build_ours(cfg, "auto").to(device, dtype)
        auto = "grouped" if probe.experts.use_grouped(x, T * cfg.n_activated_experts) else "loop"
        notes.append(f"{B}x{S}: expert_impl='auto' picks {auto} here")
        entries: dict[str, nn.Module] = {}
        for name, make in builders.items():
            torch.manual_seed(0)
            mod = make().to(device, dtype).train()
            entries[name] = torch.compile(mod) if name.endswith("+compile") else mod
        # hf[batched_mm] is ~100x slower and allocates GBs: timed on its own afterwards (two steps), so
        # that it neither takes most of the run nor evicts the caches of the interleaved entries
        slow = {k: entries.pop(k) for k in list(entries) if k == "hf[batched_mm]"}
        times = time_interleaved(entries, x, gout, args.rounds, args.steps, args.warmup)
        entries.update(slow)
        times.update({k: time_interleaved({k: m}, x, gout, 1, 2, 1)[k] for k, m in slow.items()})
        for name, mod in entries.items():
            ts = times[name]
            rows.append(dict(
                name=name, auto=name in (f"ours[{auto}]", f"ours[{auto}]+compile"),
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
    sizes = sorted({(r["batch"], r["seq"]) for r in result["rows"]}, key=lambda s: s[0] * s[1])
    for B, S in sizes:
        rows = [r for r in result["rows"] if (r["batch"], r["seq"]) == (B, S)]
        print(f"\n== {B}x{S} = {B * S} tokens, {meta['dtype']}, {meta['threads']} threads, {meta['device']}, "
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


# issue 6's targets for ours, checked by --repeat
TARGETS = {"vs_dense": 0.8, "vs_hf_best": 1.25}


def summarize_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and ours entry: each run's ratios, their median/min/max, and in how many runs each target is met."""
    out = []
    first = runs[0]["rows"]
    for key in [(r["batch"], r["seq"], r["name"]) for r in first if r["name"].startswith("ours[")]:
        per_run = [next(r for r in run["rows"] if (r["batch"], r["seq"], r["name"]) == key) for run in runs]
        entry = dict(batch=key[0], seq=key[1], name=key[2], auto=per_run[0]["auto"], n_runs=len(runs))
        for ratio, target in TARGETS.items():
            vals = [r[ratio] for r in per_run if r[ratio] is not None]
            entry[ratio] = vals
            entry[f"{ratio}_median"] = statistics.median(vals) if vals else None
            entry[f"{ratio}_met"] = sum(v >= target for v in vals)
        out.append(entry)
    return out


def print_summary(runs: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    labels = [f"{e['batch']}x{e['seq']} {e['name']}{' =auto' if e['auto'] else ''}" for e in summary]
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"\n== {len(runs)} runs: ours vs the targets (vs dense >= {TARGETS['vs_dense']}, vs hf best >= "
          f"{TARGETS['vs_hf_best']}), each run's ratios from its interleaved medians ==")
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
        for ratio in TARGETS:
            vals = e[ratio]
            spread = f"{e[ratio + '_median']:.2f} ({min(vals):.2f}-{max(vals):.2f})" if vals else "-"
            cols += [spread, f"{e[ratio + '_met']}/{len(vals)}" if vals else "-"]
        print(f"{label:<{w}}{cols[0]:>28}{cols[1]:>7}{cols[2]:>30}{cols[3]:>7}")


def run_crossover(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                  dtype: torch.dtype) -> dict[str, Any]:
    """Loop vs grouped over the number of tokens: forward only (decode, eval) and fwd+bwd."""
    mods = {}
    for impl in ("loop", "grouped"):
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

        row: dict[str, Any] = dict(tokens=T)
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
            row[f"{mode}_loop_over_grouped"] = row[f"{mode}_loop_us"] / row[f"{mode}_grouped_us"]
        rows.append(row)
    print(f"\n== crossover: time of ours[loop] / ours[grouped] (>1: grouped faster), {meta_line(device, dtype)} ==")
    print(f"{'tokens':>8}{'fwd loop us':>13}{'fwd grouped us':>16}{'loop/grouped':>14}"
          f"{'fwd+bwd loop us':>17}{'fwd+bwd grouped us':>20}{'loop/grouped':>14}")
    for r in rows:
        print(f"{r['tokens']:>8}{r['fwd_loop_us']:>13.0f}{r['fwd_grouped_us']:>16.0f}{r['fwd_loop_over_grouped']:>14.2f}"
              f"{r['fwd_bwd_loop_us']:>17.0f}{r['fwd_bwd_grouped_us']:>20.0f}{r['fwd_bwd_loop_over_grouped']:>14.2f}")
    return dict(crossover=rows)


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm")


def run_breakdown(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                  dtype: torch.dtype) -> dict[str, Any]:
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
    counts_E = torch.bincount(r.experts_TK.flatten(), minlength=cfg.n_routed_experts)
    # the expert matmuls alone: same shapes, inputs already gathered, no autograd
    x_nD = [torch.randn(int(n), cfg.dim, generator=g).to(device, dtype) for n in counts_E]
    g_nD = [torch.randn(int(n), cfg.dim, generator=g).to(device, dtype) for n in counts_E]
    w1, w3, w2 = (w.detach() for w in (ex.w1, ex.w3, ex.w2))

    def matmuls() -> None:
        for e, (x, gy) in enumerate(zip(x_nD, g_nD)):
            if x.shape[0]:
                a, b = x @ w1[e], x @ w3[e]
                a @ w2[e], gy @ w2[e].t(), a.t() @ gy, x.t() @ a, x.t() @ b
                torch.mm(a, w1[e].t()).addmm_(b, w3[e].t())

    def backward_of(fn: Callable[[torch.Tensor], torch.Tensor], gout: torch.Tensor) -> Callable[[], None]:
        def step() -> None:
            xi = x_TD.detach().requires_grad_(True)
            fn(xi).backward(gout)
        return step

    parts: dict[str, Callable[[], None]] = {
        "layer (ours[auto])": lambda: fwd_bwd(moe, x_TD.view(B, S, -1), g_TD.view(B, S, -1)),
        "  router": backward_of(lambda xi: moe.router(xi).weights_TK, torch.ones(T, K, device=device)),
        "  shared expert": backward_of(moe.shared, g_TD),
        "  routed experts (dispatch + compute + combine)": backward_of(
            lambda xi: ex(xi, r.weights_TK, r.experts_TK)[0], g_TD),
        "    their matmuls alone": matmuls,
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
    print(f"\n== breakdown of one fwd+bwd, {B}x{S}, {meta_line(device, dtype)}, ms (interleaved) ==")
    for row in rows:
        print(f"{row['part']:<50}{row['median_ms']:>9.1f} median{row['min_ms']:>9.1f} min")
    # 5 profiled steps of ours, and on CPU of the dense layer too, to split each one's time into its
    # matmuls as they run inside the layer (cold weights, fresh outputs) and the rest (on GPU the
    # profiler's CPU time is launch time, so no split there)
    layer, on_cpu = "layer (ours[auto])", device.type == "cpu"
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


def minor_page_faults() -> int:
    """Minor page faults of this process so far: each first touch of memory fresh from the kernel."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def meta_line(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device_name(device)}, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset-size", choices=sorted(PRESET_SIZES), default="small")
    ap.add_argument("--sizes", default=None, help="comma list of BATCHxSEQ (default: the preset's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    ap.add_argument("--impls", default="loop,grouped", help="our expert implementations to time")
    ap.add_argument("--hf-impls", default="eager,grouped_mm,batched_mm", help="transformers experts implementations")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=6, help="round-robin passes over the entries")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per entry per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-gb", type=float, default=4.0, help="skip hf[batched_mm] when it would need more")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the comparison this many times, then summarize ours' ratios against the targets")
    ap.add_argument("--crossover", action="store_true", help="time loop vs grouped over --crossover-tokens instead")
    ap.add_argument("--crossover-tokens", default="1,4,16,64,256,1024,4096,16384")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead: time the parts of ours[auto] (first of --sizes), then profile it and the "
                         "dense layer (matmuls vs the rest, page faults) and print ours' top ops")
    ap.add_argument("--profile-rows", type=int, default=15)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="change a ModelConfig field")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.repeat > 1 and (args.crossover or args.breakdown):
        ap.error("--repeat applies to the comparison, not to --crossover or --breakdown")

    from moe.config import parse_overrides

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = bench_config(args.preset_size, **parse_overrides(args.set))
    args.sizes = args.sizes or PRESET_SIZES[args.preset_size]["sizes"]
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), device=device_name(device),
        dtype=args.dtype, threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
        loadavg_start=os.getloadavg(), preset_size=args.preset_size,
        config={k: v for k, v in cfg.to_dict().items() if k in PRESET_SIZES["small"]["cfg"] or k in ROUTING},
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])))
    with contextlib.suppress(ImportError):
        import transformers

        meta["transformers"] = transformers.__version__
    print(f"{meta['date']}  {meta_line(device, dtype)}  torch {meta['torch']}  load {meta['loadavg_start']}")
    if args.crossover:
        result = run_crossover(args, cfg, device, dtype)
    elif args.breakdown:
        result = run_breakdown(args, cfg, device, dtype)
    elif args.repeat > 1:
        runs = []
        for i in range(args.repeat):
            start = os.getloadavg()
            print(f"\n## run {i + 1} of {args.repeat}, load average at start {start}")
            runs.append(dict(loadavg_start=start, **run_comparison(args, cfg, device, dtype)))
            print_table(runs[-1], meta)
        result = dict(runs=runs, summary=summarize_runs(runs))
        print_summary(runs, result["summary"])
    else:
        result = run_comparison(args, cfg, device, dtype)
    meta["loadavg_end"] = os.getloadavg()
    if not (args.crossover or args.breakdown or args.repeat > 1):
        print_table(result, meta)
    print(f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    out = dict(meta=meta, **result)
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
