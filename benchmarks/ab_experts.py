"""The expert paths of this checkout against those of a git revision, in one process, interleaved.

A change to moe/experts.py is judged by the layer's fwd+bwd time before and after. Two runs of
benchmarks/moe_layer.py minutes apart differ by 10-30% on a shared host; here both versions run
in the same process, round-robin, on the same layer, weights and input, so load changes hit them
alike. The revision's moe/experts.py is loaded as a module (`git show REV:moe/experts.py`) and its
`experts_loop_add`, `experts_bucketed` and `experts_grouped` replace this checkout's while its
entry runs; everything else (router, dispatch, `Experts.forward`, 'auto') is this checkout's. Also
timed: the dense SwiGLU of equal active FLOPs (the faster of fused and split gate/up), and the
minor page faults per step.

  python benchmarks/ab_experts.py --against HEAD~1                 # fine64, the bucketed regime
  python benchmarks/ab_experts.py --against 5fc72f5 --preset-size small,fine64,fine256 --rounds 10

Prints a table per configuration and one line 'JSON {...}'. Exit code 2 on a bad revision.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from moe_layer import PRESET_SIZES, bench_config, build_dense, build_ours, device_name, fwd_bwd  # noqa: E402

import moe.experts as experts_now  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWAPPED = ("experts_loop_add", "experts_bucketed", "experts_grouped")


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
    return module


# this checkout's fast paths, captured before any swap
NOW = SimpleNamespace(**{name: getattr(experts_now, name) for name in SWAPPED})


def use(version: Any) -> None:
    """Make Experts.forward call `version`'s fast paths (this checkout's where it lacks one)."""
    for name in SWAPPED:
        setattr(experts_now, name, getattr(version, name, None) or getattr(NOW, name))


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_preset(preset: str, size: str, old: ModuleType, args: argparse.Namespace) -> dict[str, Any]:
    B, S = (int(v) for v in size.split("x"))
    cfg = bench_config(preset)
    torch.manual_seed(0)
    layer = build_ours(cfg, "auto")
    dense = {f"dense[{'fused' if f else 'split'}]": build_dense(cfg, f) for f in (True, False)}
    g = torch.Generator().manual_seed(1)
    x, gout = torch.randn(B, S, cfg.dim, generator=g), torch.randn(B, S, cfg.dim, generator=g)
    entries = {"now": (layer, NOW), args.against: (layer, old), **{k: (m, None) for k, m in dense.items()}}
    times: dict[str, list[float]] = {k: [] for k in entries}
    flts: dict[str, list[int]] = {k: [] for k in entries}
    try:
        for _ in range(args.rounds):
            for name, (mod, version) in entries.items():
                if version is not None:
                    use(version)
                fwd_bwd(mod, x, gout)  # one untimed step after each switch
                for _ in range(args.steps):
                    f0, t0 = faults(), time.perf_counter()
                    fwd_bwd(mod, x, gout)
                    times[name].append(time.perf_counter() - t0)
                    flts[name].append(faults() - f0)
    finally:
        use(NOW)  # never leave the revision's functions installed
    med = {k: statistics.median(v) for k, v in times.items()}
    best_dense = min((k for k in dense), key=med.get)
    impl = layer.experts.impl_for(x.reshape(-1, cfg.dim), B * S * cfg.n_activated_experts)
    rows = [dict(entry=k, median_ms=1e3 * med[k], min_ms=1e3 * min(times[k]),
                 faults_per_step=statistics.median(flts[k]), vs_dense=med[best_dense] / med[k],
                 vs_against=med[args.against] / med[k]) for k in entries]
    missing = [n for n in SWAPPED if not hasattr(old, n)]  # this checkout's ran in their place
    return dict(preset=preset, size=size, auto=impl, dense=best_dense, rows=rows, not_in_revision=missing)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="a git revision (commit, tag, HEAD~1)")
    ap.add_argument("--preset-size", default="fine64",
                    help=f"comma list of configurations: {', '.join(p for p in PRESET_SIZES if p != 'large')}")
    ap.add_argument("--sizes", default=None, help="BATCHxSEQ for every configuration (default: each one's first)")
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
        ap.error("--against: 'now' names this checkout's entry; give a commit, tag or HEAD~N")
    if args.sizes is not None and not all(p.isdigit() and int(p) > 0 for p in args.sizes.split("x")) \
            or args.sizes is not None and args.sizes.count("x") != 1:
        ap.error(f"--sizes: {args.sizes!r}; give one BATCHxSEQ such as 8x256")
    try:
        old = experts_at(args.against)
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
        print(f"{'entry':<16}{'ms':>9}{'min ms':>9}{'faults/step':>13}{'vs dense':>10}{'vs ' + args.against:>16}")
        if r["not_in_revision"]:
            print(f"note: {args.against} has no {', '.join(r['not_in_revision'])}: this checkout's ran in its place")
        for row in r["rows"]:
            print(f"{row['entry']:<16}{row['median_ms']:>9.1f}{row['min_ms']:>9.1f}{row['faults_per_step']:>13.0f}"
                  f"{row['vs_dense']:>10.2f}{row['vs_against']:>16.2f}")
    meta["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    out = dict(meta=meta, results=results)
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
