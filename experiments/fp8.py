"""Why DeepSeek-V3's FP8 recipe is fine-grained and promotes to fp32, measured on a CPU.

Four parts (DeepSeek-V3 technical report, section 3.3), each a figure in OUT and numbers in
OUT/results.json:
  (a) granularity.png   quantisation error of activations with outlier channels, by scaling
                        granularity (tensor / row / 1x128 tile / 128x128 block), vs outlier size
  (b) accumulation.png  relative error of a K-long FP8 dot product with a ~14-bit running sum,
                        with and without promotion to fp32 every 128 products, next to the
                        report's "nearly 2%" at K = 4096
  (c) training.png      the toy model trained in fp32, bf16 (GEMM inputs rounded to bf16,
                        simulated like FP8) and simulated FP8 (blockwise, tensorwise), same data
                        and seeds; the relative validation-loss gap and its spread over seeds;
                        one short real bf16-autocast run as a check of the bf16 simulation
  (d) memory.png        what "8 bits instead of 32 saves 75%" leaves out: DeepSeek-V3's weights,
                        full training state and cached activations in each precision

    python experiments/fp8.py --out runs/fp8            # about 10 minutes on 2 cores (--jobs 2)
    python experiments/fp8.py --out runs/fp8 --quick    # CI: well under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import accounting as acc  # noqa: E402
from moe import fp8, plots  # noqa: E402
from moe.cli import non_negative_int, out_folder, positive_int  # noqa: E402
from moe.config import PRESETS  # noqa: E402
from moe.device import cpu_name  # noqa: E402

DEEPSEEK_ACCUM_ERR_K4096 = 0.02  # report, section 3.3.2: "a maximum relative error of nearly 2%"
DEEPSEEK_GAP_VS_BF16 = 0.0025  # report, section 3.3 / appendix B.1: "below 0.25%"
RECIPE_LABELS = {"none": "fp32", "bf16": "bf16 (simulated GEMM inputs)", "blockwise": "fp8 blockwise (DeepSeek)",
                 "tensorwise": "fp8 tensorwise", "bf16-autocast": "bf16 autocast (real)"}


# ------------------------------------------------------------------------------ (a) granularity
def outlier_activations(tokens: int, channels: int, magnitude: float, n_outliers: int = 4, seed: int = 0):
    """Gaussian activations where a few channels are `magnitude` times larger (as in LLMs' massive
    activations), plus the mask of the other values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g)
    cols = torch.randperm(channels, generator=g)[:n_outliers]
    x[:, cols] *= magnitude
    normal = torch.ones_like(x, dtype=torch.bool)
    normal[:, cols] = False
    return x, normal


def granularity_errors(tokens: int, channels: int, magnitudes: list[float]) -> dict:
    """SQNR of the non-outlier values after fake quantisation, per granularity (E4M3) and for
    tensor-wise E5M2 (more range, less precision)."""
    variants = {f"{g} e4m3": ("e4m3", g) for g in fp8.GRANULARITIES}
    variants["tensor e5m2"] = ("e5m2", "tensor")
    sqnr: dict[str, list[float]] = {k: [] for k in variants}
    zeros: dict[str, list[float]] = {k: [] for k in variants}
    for m in magnitudes:
        x, normal = outlier_activations(tokens, channels, m)
        for label, (fmt, g) in variants.items():
            xq = fp8.fake_quantize(x, fmt, g)
            sqnr[label].append(round(fp8.sqnr_db(x[normal], xq[normal]), 3))
            zeros[label].append(float(((xq == 0) & (x != 0))[normal].float().mean()))  # flushed to zero
    return {"tokens": tokens, "channels": channels, "outlier_channels": 4, "magnitudes": magnitudes,
            "sqnr_db": sqnr, "flushed_to_zero": zeros}


# ------------------------------------------------------------------------------ (b) accumulation
def accumulation_errors(ks: list[int], rows: int, mantissa_bits: int = 14) -> dict:
    """Relative (norm-wise) error of `rows` dot products of random E4M3 vectors, per K."""
    g = torch.Generator().manual_seed(0)
    variants = {"no promotion": (None, "truncate"), "promoted every 128 (fp32)": (fp8.BLOCK, "truncate"),
                "no promotion, rounded to nearest": (None, "nearest")}  # the other model of the dropped bits
    out: dict[str, list[float]] = {label: [] for label in variants}
    for k in ks:
        a = torch.randn(rows, k, generator=g).to(torch.float8_e4m3fn).float()
        b = torch.randn(rows, k, generator=g).to(torch.float8_e4m3fn).float()
        exact = (a.double() * b.double()).sum(-1)  # exact: products of FP8 values fit in fp64 sums
        for label, (every, rounding) in variants.items():
            s = fp8.accumulate_dot(a, b, mantissa_bits, promote_every=every, rounding=rounding)
            out[label].append(float((s - exact).norm() / exact.norm()))
    return {"ks": ks, "rows": rows, "mantissa_bits": mantissa_bits, "errors": out}


# ------------------------------------------------------------------------------ (c) training
def train_one(job: dict) -> dict:
    """One toy run; returns its validation curve and timing. Runs in a worker process."""
    from moe.train import TrainConfig, read_metrics, train

    torch.set_num_threads(1)
    cfg = PRESETS["toy"].replace(fp8="none" if job["recipe"] == "bf16-autocast" else job["recipe"])
    tc = TrainConfig(out=job["out"], steps=job["steps"], batch_size=job["batch_size"], seq_len=job["seq_len"],
                     eval_interval=job["eval_interval"], eval_windows=job["eval_windows"], seed=job["seed"],
                     device="cpu", threads=1, progress=False, plots=False, overwrite=True, save_interval=0)
    import moe.train

    plain_autocast = moe.train.autocast
    if job["recipe"] == "bf16-autocast":
        # moe.train autocasts each forward (train and eval) to bf16 on CUDA only; for this run it does
        # on CPU too. (One autocast region around the whole run would be wrong: it caches the bf16
        # copy of every weight for the region's lifetime, so the updates would never be seen.)
        moe.train.autocast = lambda device: torch.autocast(device.type, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the eval lines of many runs would interleave
            result = train(tc, cfg)
    finally:
        moe.train.autocast = plain_autocast  # a worker process runs the next job as it was
    records = read_metrics(tc.out)
    return {**{k: job[k] for k in ("recipe", "seed")}, "val_loss": result.val_loss,
            "curve": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
            "train_ce_last": records[-1]["ce"], "wall_s": time.perf_counter() - t0,
            "step_s": records[-1]["elapsed_s"] / records[-1]["step"]}


def training_runs(out: str, recipes: list[str], seeds: int, steps: int, jobs: int, autocast_steps: int,
                  batch_size: int = 4, seq_len: int = 128, eval_windows: int = 32) -> list[dict]:
    from tqdm.auto import tqdm

    base = {"steps": steps, "batch_size": batch_size, "seq_len": seq_len, "eval_interval": max(1, steps // 4),
            "eval_windows": eval_windows}
    todo = [{**base, "recipe": r, "seed": s, "out": os.path.join(out, "runs", f"{r}-seed{s}")}
            for s in range(seeds) for r in recipes]
    if autocast_steps:
        todo.append({**base, "steps": autocast_steps, "eval_interval": max(1, autocast_steps // 4),
                     "recipe": "bf16-autocast", "seed": 0, "out": os.path.join(out, "runs", "bf16-autocast-seed0")})
        # the matching simulated-bf16 run of the same length, for the check
        if autocast_steps != steps:
            todo.append({**todo[-1], "recipe": "bf16", "out": os.path.join(out, "runs", "bf16-short-seed0"),
                         "check": True})
    done = []
    with tqdm(total=len(todo), desc="toy runs", unit="run") as bar:
        if jobs <= 1:
            for job in todo:
                done.append({**train_one(job), "check": job.get("check", False)})
                bar.update(1)
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                for job, res in zip(todo, pool.map(train_one, todo)):
                    done.append({**res, "check": job.get("check", False)})
                    bar.update(1)
    return done


def gap_stats(runs: list[dict], recipe: str, baseline: str) -> dict:
    """Relative validation-loss gap of recipe vs baseline, paired by seed: mean and spread."""
    by = {r["seed"]: r["val_loss"] for r in runs if r["recipe"] == baseline and not r["check"]}
    gaps = [(r["val_loss"] - by[r["seed"]]) / by[r["seed"]] for r in runs
            if r["recipe"] == recipe and not r["check"] and r["seed"] in by]
    base = list(by.values())
    seed_noise = statistics.stdev(base) / statistics.mean(base) if len(base) > 1 else float("nan")
    spread = statistics.stdev(gaps) if len(gaps) > 1 else float("nan")
    mean = statistics.mean(gaps)
    # inside seed noise: the paired gap is within two standard errors of zero, or smaller than
    # the seed-to-seed spread of the baseline itself
    sem = spread / math.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
    inside = bool(len(gaps) > 1 and (abs(mean) <= 2 * sem or abs(mean) <= seed_noise))
    return {"mean": mean, "std": spread, "per_seed": gaps, "n_seeds": len(gaps),
            "baseline_seed_to_seed_rel_std": seed_noise, "inside_seed_noise": inside}


# ------------------------------------------------------------------------------ (d) memory
def memory_panels() -> tuple[dict, dict]:
    s = acc.summary(PRESETS["deepseek-v3"])
    w, ts, act = s["weight_gb"], s["training_state_gb"], s["linear_inputs_cached"]
    panels = {
        "weights": {"fp32": w["fp32"] * acc.GB, "bf16": w["bf16"] * acc.GB, "fp8 (+ block scales)": w["fp8"] * acc.GB},
        "training state (weights, grads,\nmaster, AdamW; +MTP)": {
            "fp32 AdamW": ts["fp32-adamw"]["total"] * acc.GB, "bf16 mixed": ts["bf16-mixed-adamw"]["total"] * acc.GB,
            "DeepSeek-V3 FP8": ts["deepseek-v3"]["total"] * acc.GB},
        f"linear inputs cached for backward\n(one {s['context']}-token sequence)": {
            "bf16": act["bf16"]["gb_at_context"] * acc.GB, "fp8 as DeepSeek": act["fp8"]["gb_at_context"] * acc.GB},
    }
    numbers = {
        "weights_gb": w, "training_state_gb": {k: v["total"] for k, v in ts.items()},
        "linear_inputs_cached_gb_per_sequence": {k: v["gb_at_context"] for k, v in act.items()},
        "context": s["context"],
        "weight_saving_fp8_vs_fp32": 1 - w["fp8"] / w["fp32"],
        "weight_saving_fp8_vs_bf16": 1 - w["fp8"] / w["bf16"],
        "train_state_saving_deepseek_vs_fp32_adamw": 1 - ts["deepseek-v3"]["total"] / ts["fp32-adamw"]["total"],
        "activation_saving_fp8_vs_bf16": 1 - act["fp8"]["bytes_per_token"] / act["bf16"]["bytes_per_token"],
    }
    return panels, numbers


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=out_folder, default="runs/fp8", help="output folder")
    ap.add_argument("--quick", action="store_true", help="CI size: small tensors, a few steps, one seed")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help="toy training steps per run (default 400; quick 6)")
    ap.add_argument("--seeds", type=positive_int, default=None, help="seeds per recipe (default 3; quick 1)")
    ap.add_argument("--jobs", type=positive_int, default=None,
                    help="runs in parallel, 1 thread each (default 2; quick 1)")
    ap.add_argument("--autocast-steps", type=non_negative_int, default=None,
                    help="steps of the real bf16-autocast check, 0 = skip (default 100; quick 0): slow on "
                         "CPUs without native bf16")
    args = ap.parse_args(argv)
    q = args.quick  # a flag left out (None) takes its default; a given one is checked by its type
    steps = args.steps if args.steps is not None else (6 if q else 400)
    seeds = args.seeds if args.seeds is not None else (1 if q else 3)
    jobs = args.jobs if args.jobs is not None else (1 if q else 2)
    autocast_steps = args.autocast_steps if args.autocast_steps is not None else (0 if q else 100)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()

    res: dict = {"host": {"cpu": cpu_name(), "load_avg_start": os.getloadavg(), "date": time.strftime("%Y-%m-%d")},
                 "quick": q}
    magnitudes = [1.0, 10.0, 1e2, 1e3, 1e4, 1e5]
    res["granularity"] = granularity_errors(128 if q else 1024, 512 if q else 1024, magnitudes)
    ks = [128, 512, 1024, 4096] if q else [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    res["accumulation"] = accumulation_errors(ks, 16 if q else 128)
    errs = res["accumulation"]["errors"]
    res["accum_err_k4096"] = errs["no promotion"][ks.index(4096)]
    res["accum_err_k4096_promoted"] = errs["promoted every 128 (fp32)"][ks.index(4096)]
    res["deepseek_accum_err_k4096"] = DEEPSEEK_ACCUM_ERR_K4096

    recipes = ["none", "bf16", "blockwise", "tensorwise"]
    runs = training_runs(args.out, recipes, seeds, steps, jobs, autocast_steps,
                         batch_size=2 if q else 4, seq_len=32 if q else 128, eval_windows=4 if q else 32)
    res["training"] = {"steps": steps, "seeds": seeds, "batch_size": 2 if q else 4, "seq_len": 32 if q else 128,
                       "preset": "toy", "runs": runs}
    gaps = {f"{r}_vs_{b}": gap_stats(runs, r, b) for r in ("bf16", "blockwise", "tensorwise") for b in ("none",)}
    gaps.update({f"{r}_vs_bf16": gap_stats(runs, r, "bf16") for r in ("blockwise", "tensorwise")})
    res["training"]["gaps"] = gaps
    res["gap_rel_blockwise"] = gaps["blockwise_vs_none"]["mean"]
    res["gap_rel_blockwise_std"] = gaps["blockwise_vs_none"]["std"]
    res["gap_rel_blockwise_vs_bf16"] = gaps["blockwise_vs_bf16"]["mean"]
    res["gap_rel_tensorwise"] = gaps["tensorwise_vs_none"]["mean"]
    res["deepseek_gap_vs_bf16"] = DEEPSEEK_GAP_VS_BF16
    real = [r for r in runs if r["recipe"] == "bf16-autocast"]
    if real:
        sim = next(r for r in runs if r["recipe"] == "bf16" and r["seed"] == 0 and
                   (r["check"] or autocast_steps == steps))
        res["training"]["bf16_check"] = {"steps": autocast_steps, "real_autocast_val": real[0]["val_loss"],
                                         "simulated_val": sim["val_loss"],
                                         "rel_diff": (real[0]["val_loss"] - sim["val_loss"]) / sim["val_loss"],
                                         "real_step_s": real[0]["step_s"], "simulated_step_s": sim["step_s"]}
    res["training"]["step_s_median"] = {r: statistics.median([x["step_s"] for x in runs if x["recipe"] == r
                                                              and not x["check"]]) for r in recipes}

    panels, res["memory"] = memory_panels()
    files = draw(res, panels, args.out)
    res["wall_s"] = time.perf_counter() - t0
    res["host"]["load_avg_end"] = os.getloadavg()
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_json_safe(res), f, indent=2)  # NaN (one seed: no spread) -> null
    print(table(res))
    print("wrote", ", ".join(files + [os.path.join(args.out, "results.json")]))
    return 0


def draw(res: dict, panels: dict, out: str) -> list[str]:
    g, a, t = res["granularity"], res["accumulation"], res["training"]
    curves: dict[str, list] = {}
    final: dict[str, list[float]] = {}
    for r in t["runs"]:
        if r["check"]:
            continue
        if r["recipe"] == "bf16-autocast":  # a shorter run, reported in the note
            continue
        label = RECIPE_LABELS[r["recipe"]]
        curves.setdefault(label, []).append(r["curve"])
        final.setdefault(label, []).append(r["val_loss"])
    gap = t["gaps"]["blockwise_vs_none"]
    note = (f"fp8 blockwise vs fp32: {100 * gap['mean']:+.2f}% (std {100 * gap['std']:.2f}% over "
            f"{gap['n_seeds']} seeds){', inside seed noise' if gap['inside_seed_noise'] else ''}")
    if "bf16_check" in t:
        c = t["bf16_check"]
        note += (f"\nreal bf16 autocast, {c['steps']} steps, seed 0: {100 * c['rel_diff']:+.1f}% vs simulated bf16 "
                 f"({c['real_step_s'] / c['simulated_step_s']:.1f}x slower)")
    return [
        plots.save(plots.plot_fp8_granularity(g["magnitudes"], g["sqnr_db"]), os.path.join(out, "granularity.png")),
        plots.save(plots.plot_fp8_accumulation(a["ks"], a["errors"], (4096, DEEPSEEK_ACCUM_ERR_K4096)),
                   os.path.join(out, "accumulation.png")),
        plots.save(plots.plot_fp8_training(curves, final, note), os.path.join(out, "training.png")),
        plots.save(plots.plot_fp8_memory(panels), os.path.join(out, "memory.png")),
    ]


def table(res: dict) -> str:
    g, a, t, m = res["granularity"], res["accumulation"], res["training"], res["memory"]
    lines = [f"(a) SQNR (dB) of the non-outlier values, {g['tokens']}x{g['channels']} activations, "
             f"{g['outlier_channels']} outlier channels"]
    lines.append("    magnitude  " + "  ".join(f"{m_:>7g}" for m_ in g["magnitudes"]))
    for label, vals in g["sqnr_db"].items():
        lines.append(f"    {label:<11}" + "  ".join(f"{v:7.1f}" for v in vals))
    lines.append(f"(b) accumulation, {a['mantissa_bits']}-bit running sum, relative error over "
                 f"{a['rows']} dot products (DeepSeek: ~2% at K = 4096)")
    lines.append(f"    {'K':<33}" + "  ".join(f"{k:>8d}" for k in a["ks"]))
    for label, vals in a["errors"].items():
        lines.append(f"    {label:<33}" + "  ".join(f"{v:8.2e}" for v in vals))
    lines.append(f"(c) toy training, {t['steps']} steps x {t['batch_size']}x{t['seq_len']} tokens, "
                 f"{t['seeds']} seed(s): final validation loss (nats/byte)")
    for recipe, label in RECIPE_LABELS.items():
        vals = [r["val_loss"] for r in t["runs"] if r["recipe"] == recipe and not r["check"]]
        if vals:
            lines.append(f"    {label:<30} " + "  ".join(f"{v:.4f}" for v in vals)
                         + (f"   ({t['step_s_median'][recipe] * 1e3:.0f} ms/step)" if recipe in t["step_s_median"]
                            else ""))
    for name, gst in t["gaps"].items():
        lines.append(f"    gap {name:<22} {100 * gst['mean']:+.3f}% (std {100 * gst['std']:.3f}%, fp32 seed-to-seed "
                     f"{100 * gst['baseline_seed_to_seed_rel_std']:.3f}%)"
                     + ("  inside seed noise" if gst["inside_seed_noise"] else ""))
    if "bf16_check" in t:
        c = t["bf16_check"]
        lines.append(f"    bf16 check, {c['steps']} steps seed 0: real autocast {c['real_autocast_val']:.4f} vs "
                     f"simulated {c['simulated_val']:.4f} ({100 * c['rel_diff']:+.2f}%); "
                     f"{c['real_step_s'] / c['simulated_step_s']:.1f}x the time per step")
    lines.append(f"(d) DeepSeek-V3 memory: weights fp8 vs fp32 -{100 * m['weight_saving_fp8_vs_fp32']:.1f}%, "
                 f"vs bf16 -{100 * m['weight_saving_fp8_vs_bf16']:.1f}%; training state vs fp32 AdamW "
                 f"-{100 * m['train_state_saving_deepseek_vs_fp32_adamw']:.1f}%; cached linear inputs vs bf16 "
                 f"-{100 * m['activation_saving_fp8_vs_bf16']:.1f}%")
    lines.append(f"host {res['host']['cpu']}, load {res['host']['load_avg_start'][0]:.2f} at start, "
                 f"{res['wall_s']:.0f} s")
    return "\n".join(lines)


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v



if __name__ == "__main__":
    sys.exit(main())
