"""What expert parallelism costs in traffic, and what node-limited routing saves.

Writes OUT/parallel_dispatch.png (moe/parallel.py's dispatch / compute / combine for 8 tokens
a real router sent to 4 experts on 2 ranks), OUT/parallel_traffic.png (DeepSeek-V3's
all-to-all bytes per token against the EP size, bf16 and fp8, and the rows per token that
cross nodes with and without the node limit) and OUT/results.json (every number in them).
Arithmetic from moe.accounting.ep_traffic, the same as `python -m moe calc --ep N --nodes M`.

    python experiments/parallel_traffic.py --out runs/parallel [--quick]
    cp runs/parallel/parallel_*.png docs/img/        # the figures of docs/parallel.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moe import plots  # noqa: E402
from moe.accounting import ep_traffic, human  # noqa: E402
from moe.cli import out_folder  # noqa: E402
from moe.config import PRESETS  # noqa: E402
from moe.router import Router  # noqa: E402

V3_BATCH_TOKENS = 15360 * 4096  # DeepSeek-V3's batch after its ramp-up (report 4.2): 15360 sequences of 4096
V3_GPUS = 2048  # H800s of the pre-training run
V3_EP = 64  # 64-way expert parallelism over 8 nodes (report 3.2)
V3_MAX_NODES = 4  # each token's experts on at most 4 nodes


def dispatch_example(n_ranks: int = 2, tokens_per_rank: int = 4, seed: int = 1) -> tuple[list, int]:
    """The experts a real (randomly initialised) router picks for a few random tokens on each rank.

    Seed 1 gives uneven loads (10 rows go to rank 0, 6 to rank 1), as real batches do; seed 0 happens
    to be perfectly even, which hides what the uneven splits are for.
    """
    cfg = PRESETS["toy"].replace(dim=16, n_routed_experts=4, n_activated_experts=2, n_expert_groups=1,
                                 n_limited_groups=1)
    torch.manual_seed(seed)
    router = Router(cfg)
    x = torch.randn(n_ranks, tokens_per_rank, cfg.dim)
    return [router(x[r]).experts_TK.tolist() for r in range(n_ranks)], cfg.n_routed_experts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=out_folder, default="runs/parallel")
    ap.add_argument("--quick", action="store_true", help="fewer EP sizes (CI)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    v3 = PRESETS["deepseek-v3"]
    eps = [8, 64] if args.quick else [8, 16, 32, 64, 128, 256]
    by_dtype = {dt: [ep_traffic(v3, ep, dt, batch_tokens=V3_BATCH_TOKENS) for ep in eps] for dt in ("bf16", "fp8")}
    limited = ep_traffic(v3, V3_EP, "fp8", V3_MAX_NODES, V3_BATCH_TOKENS)
    toy = ep_traffic(PRESETS["toy"], 4, "fp32", batch_tokens=4 * 128)
    example, n_experts = dispatch_example()
    results = {
        "deepseek_v3": {"ep_sizes": eps, "batch_tokens": V3_BATCH_TOKENS, "gpus": V3_GPUS,
                        "traffic": by_dtype, "node_limited": limited,
                        "bytes_per_step_per_gpu_fp8": limited["bytes_per_step"] / V3_GPUS},
        "toy_ep4_fp32": toy,
        "dispatch_example": {"experts_by_rank": example, "n_experts": n_experts},
    }
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    plots.save(plots.plot_ep_dispatch(example, n_experts), os.path.join(args.out, "parallel_dispatch.png"))
    rows = limited["node_limited"]["cross_node_rows_per_token_per_layer"]
    plots.save(plots.plot_ep_traffic(eps, {f"{dt} ({'FP8 dispatch, BF16 combine' if dt == 'fp8' else 'all BF16'})":
                                           [t["bytes_per_token"] for t in ts] for dt, ts in by_dtype.items()},
                                     {"one per assignment": rows["per_assignment"],
                                      "once per node": rows["once_per_node"],
                                      f"node-limited (M={V3_MAX_NODES})": rows["node_limited"]},
                                     model="DeepSeek-V3", max_nodes=V3_MAX_NODES),
               os.path.join(args.out, "parallel_traffic.png"))

    print(f"DeepSeek-V3 all-to-all per token (fwd + bwd, {by_dtype['bf16'][0]['moe_layers']} MoE layers incl. MTP)")
    print(f"{'EP ranks':>9} {'rows/token/layer':>17} {'bf16':>10} {'fp8':>10} {'fp8 per step':>13}")
    for i, ep in enumerate(eps):
        b, f8 = by_dtype["bf16"][i], by_dtype["fp8"][i]
        print(f"{ep:>9} {b['rows_per_token_per_layer']:>17.3f} {human(b['bytes_per_token'], 'B'):>10} "
              f"{human(f8['bytes_per_token'], 'B'):>10} {human(f8['bytes_per_step'], 'B'):>13}")
    n = limited["node_limited"]
    print(f"EP {V3_EP} on {n['nodes']} nodes, cross-node rows/token/layer: {rows['per_assignment']:.2f} one per "
          f"assignment, {rows['once_per_node']:.2f} once per node, {rows['node_limited']:.2f} node-limited "
          f"(at most {rows['node_limited_max']}): {n['reduction']:.2f}x less than one per assignment")
    print(f"toy preset, EP 4, fp32: {human(toy['bytes_per_token'], 'B')} per token, "
          f"{human(toy['bytes_per_step'], 'B')} per step of 4 x 128 tokens")
    print(f"wrote {args.out}/results.json, parallel_dispatch.png, parallel_traffic.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
