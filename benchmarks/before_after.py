"""The MoE layer with moe/experts.py from an older commit vs now, same weights, interleaved.

Loads `git show REV:moe/experts.py` as a module, swaps its Experts into our MoE (same
parameters), and times forward+backward next to the current layer, the dense limit and
transformers' DeepseekV3MoE, as benchmarks/moe_layer.py does. The old file must define
`Experts(cfg)` with parameters w1, w3, w2.

  python benchmarks/before_after.py --rev 9c8cd61 --sizes 8x256,16x512
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moe_layer as bench  # noqa: E402


def old_experts_module(rev: str):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:moe/experts.py"], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix="_experts.py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"experts_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="9c8cd61", help="the commit whose moe/experts.py is 'before'")
    ap.add_argument("--sizes", default="8x256,16x512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = old_experts_module(args.rev)
    cfg = bench.bench_config()

    def ours(impl: str, before: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        m = bench.build_ours(cfg, impl)
        if before:
            experts = old.Experts(m.cfg)
            experts.load_state_dict(m.experts.state_dict())
            m.experts = experts
        return m

    out: dict[str, Any] = dict(rev=args.rev, threads=torch.get_num_threads(), loadavg_start=os.getloadavg(), rows=[])
    for size in args.sizes.split(","):
        B, S = (int(v) for v in size.split("x"))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, S, cfg.dim, generator=g)
        gout = torch.randn(B, S, cfg.dim, generator=g)
        entries = {
            f"before[{args.rev}, loop]": ours("loop", True),
            f"before[{args.rev}, grouped]": ours("grouped", True),
            "now[auto]": ours("auto", False),
            "dense[split]": bench.build_dense(cfg, fused=False),
            "hf[eager]": bench.build_hf(cfg, "eager"),
            "hf[grouped_mm]": bench.build_hf(cfg, "grouped_mm"),
        }
        times = bench.time_interleaved(entries, x, gout, args.rounds, args.steps, 2)
        med = {k: statistics.median(v) for k, v in times.items()}
        hf = min(med["hf[eager]"], med["hf[grouped_mm]"])
        print(f"\n== {size}, fp32, {torch.get_num_threads()} threads, median of {args.rounds * args.steps} "
              f"interleaved steps, load {os.getloadavg()} ==")
        for k, t in med.items():
            row = dict(size=size, name=k, ms=1e3 * t, vs_dense=med["dense[split]"] / t, vs_hf_best=hf / t)
            out["rows"].append(row)
            print(f"{k:28s}{row['ms']:9.1f} ms{row['vs_dense']:8.2f} x dense{row['vs_hf_best']:8.2f} x hf best")
    out["loadavg_end"] = os.getloadavg()
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
