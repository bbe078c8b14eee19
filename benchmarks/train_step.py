"""End-to-end training throughput of the toy model: MoE vs its equal-active-FLOPs dense twin.

One step = forward with targets (cross-entropy + balance terms; bf16 autocast on CUDA, fp32 on
CPU, as `moe.train`), backward, gradient clipping,
AdamW, the aux-loss-free bias update and the routing-stat reset: what `moe.train` does per
step, minus data loading, evaluation and checkpoints. The dense model is
`moe.config.dense_baseline(cfg)`: every block a SwiGLU of width (top_k + n_shared) *
moe_inter_dim, i.e. the FFN FLOPs a token meets in the MoE, with no routing. Tokens are
random bytes (throughput does not depend on the text). Entries are timed interleaved.

  python benchmarks/train_step.py                       # toy preset, 16 x 128 tokens, 2 threads
  python benchmarks/train_step.py --compile             # also torch.compile'd models
  python benchmarks/train_step.py --device cuda --set dim=512 --batch-size 32
  python benchmarks/train_step.py --fp8 blockwise --impls auto --threads 1   # simulated FP8 vs fp32
  python benchmarks/train_step.py --segment 4           # fine-grained toy: 4x the experts, 1/4 as wide
  python benchmarks/train_step.py --profile             # the ops where the MoE step spends more than dense
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe.accounting import count_params  # noqa: E402
from moe.balance import update_bias  # noqa: E402
from moe.cli import config_from, non_negative_int, one_of, positive_int  # noqa: E402
from moe.config import CHOICES, ModelConfig, dense_baseline  # noqa: E402
from moe.device import autocast, resolve_device  # noqa: E402
from moe.layer import reset_routing_stats, routing_stats  # noqa: E402
from moe.model import Transformer  # noqa: E402
from moe.train import TrainConfig, build_optimizer  # noqa: E402


class Trainer:
    """A model, its optimizer and one training step."""

    def __init__(self, cfg: ModelConfig, device: torch.device, compile: bool):
        torch.manual_seed(0)
        self.cfg = cfg
        self.model = Transformer(cfg).to(device).train()
        self.optimizer = build_optimizer(self.model, TrainConfig())
        self.forward = torch.compile(self.model) if compile else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, x_BS: torch.Tensor, y_BS: torch.Tensor) -> float:
        with autocast(x_BS.device):  # as moe.train: bf16 on CUDA, fp32 on CPU
            _, losses = self.forward(x_BS, y_BS)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        update_bias(self.model)
        reset_routing_stats(self.model)
        return float(losses["loss"].detach())  # the host sync a real loop has too


def segment(cfg: ModelConfig, m: int) -> ModelConfig:
    """Split every expert into m narrower ones: m times as many routed (and chosen per token) and shared."""
    if m < 1 or cfg.moe_inter_dim % m:
        raise ValueError(f"--segment {m}: must be >= 1 and divide moe_inter_dim={cfg.moe_inter_dim}")
    if m == 1:
        return cfg
    return cfg.replace(n_routed_experts=cfg.n_routed_experts * m, n_activated_experts=cfg.n_activated_experts * m,
                       n_shared_experts=cfg.n_shared_experts * m, moe_inter_dim=cfg.moe_inter_dim // m)


def profile_diff(trainers: dict[str, Trainer], x_BS: torch.Tensor, y_BS: torch.Tensor,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Self CPU time per op over 5 profiled steps, MoE (first entry) against dense, largest excess first."""
    from torch.profiler import profile

    names = [next(n for n in trainers if n.startswith("moe")), "dense"]
    per_op: dict[str, dict[str, float]] = {}
    for name in names:
        t = trainers[name]
        for _ in range(max(1, args.warmup)):
            t.step(x_BS, y_BS)
        with profile() as prof:
            for _ in range(5):
                t.step(x_BS, y_BS)
        per_op[name] = {e.key: e.self_cpu_time_total / 5e3 for e in prof.key_averages()}
    moe, dense = (per_op[n] for n in names)
    ops = sorted(set(moe) | set(dense), key=lambda k: dense.get(k, 0.0) - moe.get(k, 0.0))
    rows = [dict(op=k, moe_ms=moe.get(k, 0.0), dense_ms=dense.get(k, 0.0)) for k in ops]
    print(f"\n== profile of 5 steps, ms per step (profiler overhead included): {names[0]} "
          f"{sum(moe.values()):.1f}, dense {sum(dense.values()):.1f}; the ops with the largest excess ==")
    print(f"{'op':<56}{names[0]:>12}{'dense':>9}{'excess':>9}")
    for r in rows[:args.profile_rows]:
        print(f"{r['op'][:55]:<56}{r['moe_ms']:>12.2f}{r['dense_ms']:>9.2f}{r['moe_ms'] - r['dense_ms']:>9.2f}")
    out = dict(profile=rows, total_ms={n: sum(per_op[n].values()) for n in names})
    print("JSON " + json.dumps(out))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="change a ModelConfig field")
    ap.add_argument("--impls", type=one_of(CHOICES["expert_impl"]), default="auto,grouped",
                    help="expert_impl values for the MoE model (comma list)")
    ap.add_argument("--segment", type=positive_int, default=1, metavar="M",
                    help="fine-grained experts (DeepSeekMoE's segmentation): each routed expert split into M of "
                         "width moe_inter_dim/M, M times as many chosen per token; same parameters and FLOPs")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--seq-len", type=positive_int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--fp8", type=one_of(CHOICES["fp8"], empty_ok=True), default="", metavar="RECIPES",
                    help="also time the MoE model with these simulated FP8 recipes (moe/fp8.py), e.g. blockwise")
    ap.add_argument("--profile", action="store_true",
                    help="instead: profile 5 steps of the first MoE entry and of dense, and list the ops where the "
                         "MoE step spends more (what routing costs beyond the FFN matmuls)")
    ap.add_argument("--profile-rows", type=positive_int, default=25)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps per entry per round")
    ap.add_argument("--warmup", type=non_negative_int, default=2)
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    cfg = config_from(ap, args.preset, args.set)
    try:
        cfg = segment(cfg, args.segment)
    except ValueError as e:
        ap.error(str(e))
    if args.seq_len > cfg.max_seq_len:
        ap.error(f"--seq-len {args.seq_len}: longer than the model's max_seq_len={cfg.max_seq_len}")

    torch.set_num_threads(args.threads)
    configs = {f"moe[{impl}]": cfg.replace(expert_impl=impl) for impl in args.impls.split(",") if impl}
    for recipe in filter(None, args.fp8.split(",")):
        configs[f"moe+fp8={recipe}"] = cfg.replace(fp8=recipe)
    configs["dense"] = dense_baseline(cfg)
    trainers = {name: Trainer(c, device, False) for name, c in configs.items()}
    if args.compile:
        trainers.update({f"{name}+compile": Trainer(c, device, True) for name, c in configs.items()})

    g = torch.Generator().manual_seed(0)
    x_BS = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    y_BS = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), generator=g).to(device)
    if args.profile:
        return profile_diff(trainers, x_BS, y_BS, args)
    load_start = os.getloadavg()
    for t in trainers.values():
        for _ in range(args.warmup):
            t.step(x_BS, y_BS)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):  # round-robin: a change in machine load hits every entry alike
        for name, t in trainers.items():
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                t.step(x_BS, y_BS)
                sync(device)
                times[name].append(time.perf_counter() - t0)
    # balance of one more forward, for the table
    loads: dict[str, float | None] = {}
    for name, t in trainers.items():
        with torch.no_grad():
            t.model(x_BS)
        mm = routing_stats(t.model)["max_over_mean_load"]
        loads[name] = max(mm) if mm else None
        reset_routing_stats(t.model)

    tokens = args.batch_size * args.seq_len
    rows = []
    for name, t in trainers.items():
        n = count_params(t.cfg)
        rows.append(dict(name=name, step_ms=1e3 * statistics.median(times[name]), step_min_ms=1e3 * min(times[name]),
                         tok_s=tokens / statistics.median(times[name]), params_total=n.get("total"),
                         params_active=n.get("active"), load_max_over_mean=loads[name]))
    dense = {r["name"].replace("dense", ""): r for r in rows if r["name"].startswith("dense")}
    for r in rows:
        ref = dense.get("+compile" if r["name"].endswith("+compile") else "")
        r["vs_dense"] = r["tok_s"] / ref["tok_s"] if ref else None
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=str(device),
                threads=torch.get_num_threads(), torch=torch.__version__, preset=args.preset, overrides=args.set,
                segment=args.segment,
                batch=args.batch_size, seq_len=args.seq_len, loadavg_start=load_start, loadavg_end=os.getloadavg(),
                n_timed=args.rounds * args.steps)

    seg = (f" segmented x{args.segment} ({cfg.n_routed_experts} experts top-{cfg.n_activated_experts})"
           if args.segment > 1 else "")
    print(f"\n== train step, preset {args.preset}{seg}, {args.batch_size}x{args.seq_len} tokens, {device}, "
          f"{meta['threads']} threads, median of {meta['n_timed']} interleaved steps ==")
    print(f"{'model':<20}{'tok/s':>9}{'ms/step':>9}{'min ms':>8}{'vs dense':>9}{'params':>10}{'active':>10}"
          f"{'max load/mean':>14}")
    for r in rows:
        load = "-" if r["load_max_over_mean"] is None else f"{r['load_max_over_mean']:.2f}"
        print(f"{r['name']:<20}{r['tok_s']:>9.0f}{r['step_ms']:>9.1f}{r['step_min_ms']:>8.1f}{r['vs_dense']:>9.2f}"
              f"{r['params_total'] / 1e6:>9.2f}M{r['params_active'] / 1e6:>9.2f}M{load:>14}")
    fp32 = next((r for r in rows if r["name"].startswith("moe[")), None)
    for r in rows:
        if "+fp8=" in r["name"] and fp32 is not None:
            r["vs_fp32_step"] = r["step_ms"] / fp32["step_ms"]
            print(f"{r['name']}: {r['vs_fp32_step']:.2f}x the step time of {fp32['name']} (fp32)")
    print(f"load average at start {load_start}, at end {meta['loadavg_end']}")
    out = dict(meta=meta, rows=rows)
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
