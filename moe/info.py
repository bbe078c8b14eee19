"""`python -m moe info OUT`: a run's config, parameter counts, checkpoint and last metrics."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from moe.accounting import count_params, human
from moe.checkpoint import load_checkpoint, read_metrics


def run_info_dict(run: str) -> dict[str, Any]:
    ckpt = load_checkpoint(run)
    records = read_metrics(run if not os.path.isfile(os.path.join(run, "manifest.json")) else os.path.dirname(run))
    evals = [r for r in records if "val_loss" in r]
    last_val = ({k: v for k, v in evals[-1].items() if k == "step" or k.startswith("val_loss")} if evals else {})
    return {"checkpoint": ckpt.path, "step": ckpt.step, "config": ckpt.config.to_dict(),
            "params": count_params(ckpt.config), "train_config": ckpt.train_config,
            "last_metrics": records[-1] if records else {}, "last_val": last_val}


def run_info(args: argparse.Namespace) -> int:
    info = run_info_dict(args.run)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"run: {args.run}")
    print(f"checkpoint: {info['checkpoint']} (step {info['step']})")
    p = info["params"]
    line = f"parameters: total {human(p['total'])}, active per token {human(p['active'])}"
    if p.get("mtp"):
        line += f", MTP modules {human(p['mtp'])}"
    print(line)
    print("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    if info["last_metrics"]:
        m = info["last_metrics"]
        keys = [k for k in ("step", "loss", "ce", "mtp", "val_loss", "tokens", "elapsed_s") if k in m]
        print("last metrics: " + ", ".join(f"{k}={m[k]}" for k in keys))
    if info.get("last_val"):
        print("last eval: " + ", ".join(f"{k}={v}" for k, v in info["last_val"].items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    q = subparsers.add_parser(
        "info", help="show a run's config, parameter counts and last metrics",
        description="Print the model config, total/active parameters, checkpoint step and last metrics of "
                    "a run folder. Example: python -m moe info runs/demo")
    q.add_argument("run", metavar="OUT", help="run folder written by train (or one of its ckpt-* folders)")
    q.add_argument("--json", action="store_true", help="print everything as JSON")
    q.set_defaults(func=run_info)
