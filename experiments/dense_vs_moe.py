"""Does MoE pay at toy scale? The toy MoE against dense models of equal active and of equal total size.

Every model trains on the same corpus, token budget, batches (a pure function of seed and step)
and seeds. Runs are interleaved seed by seed in one process on one thread, so their wall-clock
times are measured under the same conditions. Models (from --set'd toy preset, the "base"):

  moe           the base: 1 dense + 3 MoE blocks, 8 routed experts top-2 + 1 shared expert
  dense_active  every block a dense SwiGLU, same ACTIVE parameters / FLOPs per token
                (moe.accounting.dense_equal_active)
  dense_total   every block a dense SwiGLU, same TOTAL parameters (moe.accounting.dense_equal_total)
  moe_fine      DeepSeekMoE's fine-grained split: 16 experts top-4 and 2 shared, all at half width:
                the same active and total size as moe

Validation loss is the main head's cross entropy only (no balancing terms), in nats per byte
(= per token: the tokenizer is bytes) and bits per byte. Writes OUT/results.json (`val_loss`:
final, mean over seeds, per model; `val_loss_spread`; per-run curves), OUT/table.md,
OUT/metrics/NAME-sSEED.jsonl, OUT/dense_vs_moe.png (loss vs tokens, final losses) and
OUT/dense_vs_moe_time.png (loss vs seconds).

    python experiments/dense_vs_moe.py --out runs/dense_vs_moe       # default budget: ~10 min, 2 CPU cores
    python experiments/dense_vs_moe.py --quick --out /tmp/dvm         # CI-sized: seconds
    python experiments/dense_vs_moe.py --models moe,dense_active --steps 1600 --out runs/dvm_long
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from moe import accounting as acc  # noqa: E402
from moe import plots  # noqa: E402
from moe.checkpoint import read_metrics  # noqa: E402
from moe.cli import non_negative_int, out_folder, positive_float, positive_int, training_inputs  # noqa: E402
from moe.config import PRESETS, ModelConfig, atomic_write_text, get_preset, parse_overrides  # noqa: E402
from moe.data import Corpus, get_batch  # noqa: E402
from moe.device import cpu_name, resolve_device  # noqa: E402
from moe.train import TrainConfig, train  # noqa: E402

LN2 = math.log(2.0)
MODELS = ("moe", "dense_active", "dense_total", "moe_fine")
LABELS = {"moe": "MoE (8 experts, top-2)", "dense_active": "dense, equal active",
          "dense_total": "dense, equal total", "moe_fine": "MoE fine (16 experts, top-4, half width)"}
# The reference: a < 25M-parameter study, 3 seeds, final validation loss (its own data and tokenizer).
PUBLISHED = {"moe": 1.579, "dense_active": 1.655, "dense_total": 1.561}


def fine_grained(cfg: ModelConfig, factor: int = 2) -> ModelConfig:
    """factor x the experts (routed and shared) and top-k, each 1/factor as wide: same active and total size."""
    if cfg.moe_inter_dim % factor:
        raise ValueError(f"moe_inter_dim ({cfg.moe_inter_dim}) must be divisible by the granularity factor {factor}")
    return cfg.replace(n_routed_experts=factor * cfg.n_routed_experts,
                       n_activated_experts=factor * cfg.n_activated_experts,
                       n_shared_experts=factor * cfg.n_shared_experts, moe_inter_dim=cfg.moe_inter_dim // factor)


def model_configs(base: ModelConfig, names: list[str]) -> dict[str, ModelConfig]:
    if base.n_moe_layers == 0:
        raise ValueError("the base config has no MoE layer (n_dense_layers == n_layers); nothing to compare")
    build = {"moe": lambda: base, "dense_active": lambda: acc.dense_equal_active(base),
             "dense_total": lambda: acc.dense_equal_total(base), "moe_fine": lambda: fine_grained(base)}
    return {n: build[n]() for n in names}


def train_config(args: argparse.Namespace, seed: int, work: str) -> TrainConfig:
    return TrainConfig(out=work, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       min_lr=args.lr / 10, warmup_steps=min(30, max(1, args.steps // 10)),
                       eval_interval=args.eval_interval, eval_windows=args.eval_windows, save_interval=0, seed=seed,
                       device=args.device, threads=args.threads, data=args.data, progress=False, plots=False,
                       overwrite=True)


def run_one(cfg: ModelConfig, seed: int, args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Train one model with one seed; its eval curve, final losses, speed and expert load."""
    tc = train_config(args, seed, work)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 (train prints each eval)
        result = train(tc, cfg)
    wall = time.perf_counter() - t0
    records = read_metrics(work)
    evals = [r for r in records if "val_loss" in r]
    last = records[-1]
    run = {"seed": seed, "val_loss": result.val_loss, "unigram_loss": result.unigram_loss,
           "val_loss_by_domain": {k[len("val_loss_"):]: v for k, v in last.items() if k.startswith("val_loss_")},
           "tokens": last["tokens"], "elapsed_s": last["elapsed_s"], "tokens_per_s": last["tokens"] / last["elapsed_s"],
           "wall_s": wall,
           "curve": {k: [r[k] for r in evals] for k in ("tokens", "elapsed_s", "val_loss")}}
    if cfg.n_moe_layers:
        loads = [r["load_max_over_mean"] for r in records if r.get("load_max_over_mean")]
        tail = loads[len(loads) // 2:]  # the second half of training, per MoE layer
        run["load_max_over_mean"] = [statistics.fmean(v[i] for v in tail) for i in range(len(tail[0]))]
    return run


def interleaved_step_seconds(cfgs: dict[str, ModelConfig], args: argparse.Namespace, corpus: Corpus, rounds: int,
                             steps: int) -> dict[str, float]:
    """Median seconds per training step of each model, the models taking turns step by step.

    The runs' own elapsed_s were measured minutes apart; on a shared machine the load changes
    in between, so the time axis of the comparison comes from this interleaved measurement.
    """
    from benchmarks.train_step import Trainer  # one step as moe.train takes it (no data, eval, saving)

    batches = [get_batch(corpus.train, args.batch_size, args.seq_len, 0, i) for i in range(steps)]
    device = torch.device(args.device)
    trainers = {name: Trainer(cfg, device, compile=False) for name, cfg in cfgs.items()}
    for t in trainers.values():  # warm-up
        t.step(*(b.to(device) for b in batches[0]))
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(rounds):
        for name, t in trainers.items():
            for x_BS, y_BS in batches:
                x_BS, y_BS = x_BS.to(device), y_BS.to(device)
                t0 = time.perf_counter()
                t.step(x_BS, y_BS)  # ends with a host sync (the loss as a float)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def spread(values: list[float]) -> dict[str, float]:
    return {"std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values), "max": max(values),
            "n_seeds": len(values)}


def summarize(base: ModelConfig, cfgs: dict[str, ModelConfig], runs: dict[str, list[dict]],
              step_s: dict[str, float], args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    models = {}
    tokens_per_step = args.batch_size * args.seq_len
    for name, cfg in cfgs.items():
        p = acc.count_params(cfg)
        fwd = acc.forward_flops_per_token(cfg, context=(args.seq_len + 1) / 2)["total"]
        for r in runs[name]:  # the time axis at the interleaved step rate
            r["curve"]["seconds"] = [tok / tokens_per_step * step_s[name] for tok in r["curve"]["tokens"]]
        models[name] = {"label": LABELS[name], "total_params": p["total"], "active_params": p["active"],
                        "forward_flops_per_token": fwd, "train_flops": 3 * fwd * runs[name][0]["tokens"],
                        "step_seconds": step_s[name], "tokens_per_s": tokens_per_step / step_s[name],
                        "config_changes": {k: v for k, v in cfg.to_dict().items() if base.to_dict()[k] != v},
                        "runs": runs[name]}
    finals = {n: [r["val_loss"] for r in runs[n]] for n in cfgs}
    res: dict[str, Any] = {
        "meta": meta,
        "models": models,
        "val_loss": {n: statistics.fmean(v) for n, v in finals.items()},
        "val_loss_spread": {n: spread(v) for n, v in finals.items()},
        "val_bits_per_byte": {n: statistics.fmean(v) / LN2 for n, v in finals.items()},
        "tokens_per_s": {n: models[n]["tokens_per_s"] for n in cfgs},  # interleaved step timing
        "tokens_per_s_vs_moe": {n: models[n]["tokens_per_s"] / models["moe"]["tokens_per_s"] for n in cfgs}
        if "moe" in cfgs else {},
        "published_small_scale": PUBLISHED,
    }
    if "moe" in cfgs:  # paired by seed: same batches, same validation windows
        paired = {}
        for other in cfgs:
            if other == "moe":
                continue
            diffs = [a["val_loss"] - b["val_loss"] for a, b in zip(runs["moe"], runs[other])]
            paired[f"moe_minus_{other}"] = {"mean": statistics.fmean(diffs), **spread(diffs),
                                            "moe_lower_in": sum(d < 0 for d in diffs), "diffs": diffs}
        res["paired"] = paired
    return res


def _h(n: float) -> str:
    return acc.human(n)


def format_table(res: dict[str, Any]) -> str:
    """A markdown table: one row per model (mean +- std over seeds)."""
    n = next(iter(res["val_loss_spread"].values()))["n_seeds"]
    lines = [f"| model | total params | active params | forward FLOPs/token | val loss, nats/byte (mean ± std, "
             f"{n} seeds) | bits/byte | train tokens/s (interleaved) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in res["models"].items():
        s = res["val_loss_spread"][name]
        lines.append(f"| {m['label']} | {_h(m['total_params'])} | {_h(m['active_params'])} | "
                     f"{_h(m['forward_flops_per_token'])} | {res['val_loss'][name]:.3f} ± {s['std']:.3f} | "
                     f"{res['val_bits_per_byte'][name]:.3f} | {res['tokens_per_s'][name]:,.0f} |")
    return "\n".join(lines)


def format_paired(res: dict[str, Any]) -> str:
    lines = []
    for key, d in res.get("paired", {}).items():
        other = key.removeprefix("moe_minus_")
        lines.append(f"MoE - {res['models'][other]['label']}: {d['mean']:+.3f} ± {d['std']:.3f} nats/byte "
                     f"(MoE lower in {d['moe_lower_in']} of {d['n_seeds']} seeds)")
    return "\n".join(lines)


def draw(res: dict[str, Any], out: str) -> list[str]:
    curves = {m["label"]: [r["curve"] for r in m["runs"]] for m in res["models"].values()}
    notes = {m["label"]: f"{_h(m['active_params'])} active / {_h(m['total_params'])} total"
             for m in res["models"].values()}
    finals = {m["label"]: [r["val_loss"] for r in m["runs"]] for m in res["models"].values()}
    meta = res["meta"]
    budget = (f"{meta['tokens']:,} tokens ({meta['steps']} steps of {meta['batch_size']}x{meta['seq_len']}), "
              f"{len(meta['seeds'])} seeds")
    unigram = res["models"][next(iter(res["models"]))]["runs"][0]["unigram_loss"]
    return [plots.save(plots.plot_dense_vs_moe(curves, finals, notes, budget), os.path.join(out, "dense_vs_moe.png"),
                       dpi=100),
            plots.save(plots.plot_loss_vs_seconds(curves, budget, unigram, meta["threads"]),
                       os.path.join(out, "dense_vs_moe_time.png"), dpi=100)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=out_folder, default="runs/dense_vs_moe", help="output folder (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 16 steps of 4x64 tokens, 2 seeds")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {','.join(MODELS)}")
    ap.add_argument("--preset", default="toy", choices=sorted(PRESETS), help="base MoE preset (default: toy)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the base MoE config (the dense models follow it), e.g. --set n_routed_experts=16")
    ap.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: %(default)s)")
    ap.add_argument("--steps", type=positive_int, default=400, help="optimizer steps per run (default: %(default)s)")
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--seq-len", type=positive_int, default=128)
    ap.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate; the cosine ends at lr/10")
    ap.add_argument("--eval-interval", type=non_negative_int, default=50, help="0 = at the end only")
    ap.add_argument("--eval-windows", type=positive_int, default=64)
    ap.add_argument("--data", default=None, help="a UTF-8 text file instead of the embedded corpus")
    ap.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="CPU threads (default 1: the toy's matmuls are small)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seq_len, args.eval_interval, args.eval_windows = 16, 64, 8, 8
        if args.seeds == ap.get_default("seeds"):
            args.seeds = "0,1"
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or not set(names) <= set(MODELS) or len(set(names)) < len(names):
        ap.error(f"--models: expected a comma list of distinct names, got {args.models!r}; "
                 f"allowed: {', '.join(MODELS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        ap.error(f"--seeds: expected a comma list of integers >= 0, got {args.seeds!r}")
    try:
        base = get_preset(args.preset).replace(**parse_overrides(args.set))
        cfgs = model_configs(base, names)
    except ValueError as e:
        ap.error(str(e))
    # every check a run would make, before the first one starts
    max_seq_len = min(c.max_seq_len for c in cfgs.values())
    if args.seq_len > max_seq_len:
        ap.error(f"--seq-len {args.seq_len} exceeds the model's max_seq_len ({max_seq_len})")
    try:
        args.device = str(resolve_device(args.device))
    except ValueError as e:
        ap.error(f"--device: {e}")
    corpus = training_inputs(ap, train_config(args, seeds[0], args.out))  # seeds differ only in a checked field

    tokens = args.steps * args.batch_size * args.seq_len
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": cpu_name(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "device": args.device, "argv": sys.argv[1:] if argv is None else list(argv), "quick": args.quick,
            "preset": args.preset, "overrides": args.set, "seeds": seeds, "steps": args.steps,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "tokens": tokens,
            "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
            "epochs": tokens / len(corpus.train), "loadavg_start": os.getloadavg()}
    os.makedirs(os.path.join(args.out, "metrics"), exist_ok=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    bar = tqdm(total=len(seeds) * len(names), unit="run", desc="dense_vs_moe", disable=args.quick)
    with tempfile.TemporaryDirectory(prefix="dvm-") as tmp:
        for seed in seeds:  # interleaved: a change in machine load hits every model alike
            for name in names:
                work = os.path.join(tmp, f"{name}-s{seed}")
                runs[name].append(run_one(cfgs[name], seed, args, work))
                shutil.copy(os.path.join(work, "metrics.jsonl"),
                            os.path.join(args.out, "metrics", f"{name}-s{seed}.jsonl"))
                shutil.rmtree(work)
                bar.update(1)
                bar.set_postfix({name: f"{runs[name][-1]['val_loss']:.3f}"})
    bar.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # as during training (train() restores the count after each run)
    try:
        step_s = interleaved_step_seconds(cfgs, args, corpus, rounds=2 if args.quick else 10,
                                          steps=1 if args.quick else 3)
    finally:
        torch.set_num_threads(threads)
    meta["loadavg_end"] = os.getloadavg()
    res = summarize(base, cfgs, runs, step_s, args, meta)
    files = draw(res, args.out)
    table = format_table(res)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "table.md"), table + "\n\n" + format_paired(res) + "\n")
    print(f"\n== dense vs MoE: {tokens:,} tokens per run ({tokens / len(corpus.train):.2f} epochs of "
          f"{len(corpus.train):,} training bytes), seeds {seeds}, {args.threads} thread(s), {meta['host']} ==")
    print(table)
    print(format_paired(res))
    print(f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    print("wrote", ", ".join(files + [os.path.join(args.out, f) for f in ("results.json", "table.md")]))
    return res



if __name__ == "__main__":
    main()
