"""What MoE saves, and what it does not: parameters, FLOPs, memory and KV cache per preset.

Writes OUT/{params,memory,kv_cache,flops}.png and OUT/results.json (every number in the
figures, plus the claims-table figures: fp8 savings, training state, DeepSeek-V3's cost).
Pure arithmetic from the configs; without --quick it also builds every preset on the meta
device and checks that count_params equals the real parameter count.

    python experiments/savings.py --out runs/savings [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import accounting as acc  # noqa: E402
from moe import plots  # noqa: E402
from moe.cli import out_folder  # noqa: E402
from moe.config import PRESETS, ModelConfig  # noqa: E402

# A dense 7B model with LLaMA-7B's shapes, for the "7B runs on consumer hardware" claim
# (the same as: python -m moe calc --preset toy --set attn=mha --set dim=4096 ...; see docs/claims.md).
DENSE_7B = PRESETS["toy"].replace(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, attn="mha",
                                  inter_dim=11008, n_dense_layers=32, max_seq_len=4096)
BIG = ["deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "mixtral-8x7b"]


def meta_param_count(cfg: ModelConfig) -> int:
    """sum(p.numel()) of the real model, built on the meta device (no memory allocated)."""
    import torch

    from moe.model import Transformer

    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def collect(check_meta: bool) -> dict:
    """Every number the figures and docs/claims.md use."""
    v3 = PRESETS["deepseek-v3"]
    dense_v3 = acc.dense_equal_total(v3)
    models = {name: PRESETS[name] for name in ["toy", *BIG]}
    out: dict = {"presets": {n: acc.summary(c) for n, c in models.items()},
                 "dense_7b": acc.summary(DENSE_7B),
                 "dense_equal_total_v3": acc.summary(dense_v3)}
    v3s = out["presets"]["deepseek-v3"]
    w = v3s["weight_gb"]
    ts = v3s["training_state_gb"]
    out["claims"] = {
        "v3_total_params": v3s["total_params"],
        "v3_active_params": v3s["active_params"],
        "v3_active_fraction": v3s["active_fraction"],
        "v3_weight_saving_fp8_vs_fp32": 1 - w["fp8"] / w["fp32"],
        "v3_weight_saving_fp8_vs_bf16": 1 - w["fp8"] / w["bf16"],
        "v3_train_state_saving_deepseek_vs_fp32_adamw": 1 - ts["deepseek-v3"]["total"] / ts["fp32-adamw"]["total"],
        "v3_train_state_saving_deepseek_vs_bf16_mixed": (
            1 - ts["deepseek-v3"]["total"] / ts["bf16-mixed-adamw"]["total"]),
        "v3_flops_ratio_dense_equal_total": (v3s["flops_per_token"]["dense_equal_total_forward"]
                                             / v3s["flops_per_token"]["forward"]),
        "v3_kv_saving_vs_naive": 1 - v3s["kv_cache"]["bytes_per_token"] / v3s["kv_cache"]["naive_bytes_per_token"],
        "deepseek_v3_cost": acc.deepseek_v3_cost(),
        "v3_training": acc.summary(v3, tokens=acc.DEEPSEEK_V3_TRAIN_TOKENS,
                                   gpu_hours=sum(acc.DEEPSEEK_V3_GPU_HOURS.values()))["training"],
    }
    out["kv_variants_v3_bytes_per_layer"] = {k: 2 * v for k, v in acc.kv_cache_variants(v3).items()}
    if check_meta:
        out["meta_check"] = {}
        for n, c in [*models.items(), ("dense_7b", DENSE_7B)]:
            p = acc.count_params(c)
            real = meta_param_count(c)
            out["meta_check"][n] = {"count_params": p["total"] + p["mtp"], "meta_build": real,
                                    "equal": p["total"] + p["mtp"] == real}
    return out


def draw(res: dict, out_dir: str) -> list[str]:
    pr = res["presets"]
    d3 = res["dense_equal_total_v3"]
    params = {n: (s["total_params"], s["active_params"]) for n, s in pr.items()}
    params["dense, = V3 total"] = (d3["total_params"], d3["active_params"])
    mem = {n: pr[n]["weight_gb"] for n in BIG}
    mem["dense 7B"] = res["dense_7b"]["weight_gb"]
    per_model = {n: pr[n]["kv_cache"]["bytes_per_token"] for n in BIG}
    per_model["V3 heads, no MLA"] = pr["deepseek-v3"]["kv_cache"]["naive_bytes_per_token"]
    flops = {n: (pr[n]["flops_per_token"]["forward"], pr[n]["flops_per_token"]["dense_equal_total_forward"])
             for n in ["toy", *BIG]}
    return [
        plots.save(plots.plot_total_vs_active(params), os.path.join(out_dir, "params.png")),
        plots.save(plots.plot_memory_per_precision(mem, acc.CONSUMER_CARD_GB), os.path.join(out_dir, "memory.png")),
        plots.save(plots.plot_kv_cache(res["kv_variants_v3_bytes_per_layer"], per_model, "deepseek-v3"),
                   os.path.join(out_dir, "kv_cache.png")),
        plots.save(plots.plot_flops_per_token(flops, "\n(context: min(4096, max_seq_len) keys)"),
                   os.path.join(out_dir, "flops.png")),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=out_folder, default="runs/savings", help="output folder")
    ap.add_argument("--quick", action="store_true", help="skip the meta-device build check (CI)")
    args = ap.parse_args(argv)
    res = collect(check_meta=not args.quick)
    os.makedirs(args.out, exist_ok=True)
    files = draw(res, args.out)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(res, f, indent=2)
    c = res["claims"]
    print(f"DeepSeek-V3: {acc.human(c['v3_total_params'])} total, {acc.human(c['v3_active_params'])} active "
          f"({100 * c['v3_active_fraction']:.1f}%)")
    print(f"weights fp8 vs fp32: -{100 * c['v3_weight_saving_fp8_vs_fp32']:.1f}%, "
          f"vs bf16: -{100 * c['v3_weight_saving_fp8_vs_bf16']:.1f}%; training state (DeepSeek recipe vs fp32 "
          f"AdamW): -{100 * c['v3_train_state_saving_deepseek_vs_fp32_adamw']:.1f}%")
    print(f"cost: {acc.human(c['deepseek_v3_cost']['gpu_hours'])} GPU-hours x "
          f"${c['deepseek_v3_cost']['price_per_gpu_hour']:g} = ${c['deepseek_v3_cost']['cost_usd']:,.0f}")
    if "meta_check" in res:
        ok = all(v["equal"] for v in res["meta_check"].values())
        print(f"count_params == meta-device build for {len(res['meta_check'])} configs: {ok}")
        if not ok:
            return 1
    print("wrote", ", ".join(files + [os.path.join(args.out, "results.json")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
