"""The MoE layer with this checkout's moe/experts.py against a git revision's: same weights, interleaved.

A change to moe/experts.py is judged by the layer's fwd+bwd time before and after. Two runs of
benchmarks/moe_layer.py minutes apart differ by 10-30% on a shared host; here both versions run
in the same process, round-robin, on the same weights and input, so load changes hit them alike.
The revision's moe/experts.py is loaded as a module (`git show REV:moe/experts.py`) and its
`Experts` (dispatch, 'auto' and fast paths, everything in that file) takes this checkout's expert
weights inside an otherwise identical MoE layer; router and shared expert are this checkout's.
The revision's file must define `Experts(cfg)` with parameters w1, w3, w2. Also timed: the dense
SwiGLU of equal active FLOPs (the faster of fused and split gate/up); then, untimed, the minor page
faults per step of each entry.

  python benchmarks/ab_experts.py --against HEAD~1                 # fine64, the bucketed regime
  python benchmarks/ab_experts.py --against 5fc72f5 --preset-size small,fine64,fine256 --rounds 10
  python benchmarks/ab_experts.py --against 4e1d6f3 --preset-size small --sizes 8x256 --impls loop,auto

Prints a table per configuration and one line 'JSON {...}'. Exit code 2 on a bad revision.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from types import ModuleType
from typing import Any

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from moe_layer import (  # noqa: E402
    PRESET_SIZES,
    bench_config,
    build_dense,
    build_ours,
    device_name,
    fwd_bwd,
    minor_page_faults,
    time_interleaved,
)

from moe.config import CHOICES, ModelConfig  # noqa: E402


def experts_at(rev: str) -> ModuleType:
    """moe/experts.py as it was at `rev`, imported as a module of its own."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:moe/experts.py"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        raise ValueError(f"--against: cannot read moe/experts.py at {rev!r}: {err.strip()}") from None
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    try:
        spec = importlib.util.spec_from_file_location(f"experts_at_{rev}", f.name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # e.g. it needs a module this checkout no longer has
        raise ValueError(f"--against: moe/experts.py at {rev!r} does not import here: {e!r}") from None
    finally:
        os.unlink(f.name)
    if not hasattr(module, "Experts"):
        raise ValueError(f"--against: moe/experts.py at {rev!r} defines no Experts")
    return module


def layer_pair(cfg: ModelConfig, impl: str, old: ModuleType) -> tuple[nn.Module, nn.Module]:
    """Two MoE layers with the same weights: this checkout's, and the same with `old`'s Experts."""
    torch.manual_seed(0)
    now = build_ours(cfg, impl)
    torch.manual_seed(0)
    before = build_ours(cfg, impl)
    try:
        experts = old.Experts(before.cfg)
        experts.load_state_dict(now.experts.state_dict())
    except (TypeError, RuntimeError) as e:  # another constructor or other parameters
        raise ValueError(f"--against: its Experts does not take this checkout's config and weights: {e}") from None
    before.experts = experts
    return now, before


def faults_per_step(mod: nn.Module, x: torch.Tensor, gout: torch.Tensor, steps: int = 4) -> float:
    f0 = minor_page_faults()
    for _ in range(steps):
        fwd_bwd(mod, x, gout)
    return (minor_page_faults() - f0) / steps


def run_preset(preset: str, size: str, old: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    B, S = (int(v) for v in size.split("x"))
    cfg = bench_config(preset)
    entries: dict[str, nn.Module] = {}
    twin: dict[str, str] = {}  # each layer entry -> the revision's entry it is compared with
    for impl in args.impls.split(","):
        now, before = f"now[{impl}]", f"{args.against}[{impl}]"
        entries[now], entries[before] = layer_pair(cfg, impl, old)
        twin[now] = twin[before] = before
    dense = {f"dense[{'fused' if f else 'split'}]": build_dense(cfg, f) for f in (True, False)}
    entries.update(dense)
    g = torch.Generator().manual_seed(1)
    x, gout = torch.randn(B, S, cfg.dim, generator=g), torch.randn(B, S, cfg.dim, generator=g)
    times = time_interleaved(entries, x, gout, args.rounds, args.steps, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    best_dense = min(dense, key=med.get)
    auto = entries[f"now[{args.impls.split(',')[0]}]"].experts.impl_for(x.reshape(-1, cfg.dim),
                                                                          B * S * cfg.n_activated_experts)
    rows = [dict(entry=k, median_ms=1e3 * med[k], min_ms=1e3 * min(times[k]),
                 faults_per_step=faults_per_step(mod, x, gout), vs_dense=med[best_dense] / med[k],
                 vs_against=med[twin[k]] / med[k] if k in twin else None) for k, mod in entries.items()]
    return dict(preset=preset, size=size, auto=auto, dense=best_dense, rows=rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="a git revision (commit, tag, HEAD~1)")
    ap.add_argument("--preset-size", default="fine64",
                    help=f"comma list of configurations: {', '.join(p for p in PRESET_SIZES if p != 'large')}")
    ap.add_argument("--sizes", default=None, help="BATCHxSEQ for every configuration (default: each one's first)")
    ap.add_argument("--impls", default="auto", help="expert_impl values, each timed in both versions (comma list)")
    ap.add_argument("--rounds", type=int, default=8, help="round-robin passes over the entries")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per entry per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    presets = [p for p in args.preset_size.split(",") if p]
    if not presets or any(p not in PRESET_SIZES or p == "large" for p in presets):
        ap.error(f"--preset-size: {args.preset_size!r}; choose from small, fine64, fine256 (comma list)")
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        ap.error(f"--rounds, --steps and --threads must be >= 1, got {args.rounds}, {args.steps}, {args.threads}")
    if args.against == "now":
        ap.error("--against: 'now' names this checkout's entries; give a commit, tag or HEAD~N")
    impls = args.impls.split(",")
    if any(i not in CHOICES["expert_impl"] for i in impls):
        ap.error(f"--impls: {args.impls!r}; choose from {', '.join(CHOICES['expert_impl'])} (comma list)")
    parts = (args.sizes or "1x1").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        ap.error(f"--sizes: {args.sizes!r}; give one BATCHxSEQ such as 8x256")
    try:
        old = experts_at(args.against)
        layer_pair(bench_config(presets[0]), impls[0], old)  # its Experts fits, before anything is timed
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device_name(torch.device("cpu")),
                threads=torch.get_num_threads(), torch=torch.__version__, loadavg_start=os.getloadavg(),
                against=args.against,
                command=" ".join(["python", os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])))
    print(f"{meta['date']}  {meta['device']}, fp32, {meta['threads']} threads  load {meta['loadavg_start']}")
    results = []
    for preset in presets:
        size = args.sizes or PRESET_SIZES[preset]["sizes"].split(",")[0]
        r = run_preset(preset, size, old, args)
        results.append(r)
        n = args.rounds * args.steps
        print(f"\n== {preset}, {size} tokens, auto = {r['auto']}, median of {n} interleaved steps ==")
        print(f"{'entry':<24}{'ms':>9}{'min ms':>9}{'faults/step':>13}{'vs dense':>10}{'vs ' + args.against:>16}")
        for row in r["rows"]:
            vs = "-" if row["vs_against"] is None else f"{row['vs_against']:.2f}"
            print(f"{row['entry']:<24}{row['median_ms']:>9.1f}{row['min_ms']:>9.1f}{row['faults_per_step']:>13.0f}"
                  f"{row['vs_dense']:>10.2f}{vs:>16}")
    meta["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    out = dict(meta=meta, results=results)
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
