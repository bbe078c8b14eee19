"""Does multi-token prediction pay at toy scale? Training with n_mtp = 0, 1, 2 and speculative decoding.

The toy preset trains with 0, 1 and 2 MTP modules on the same corpus, tokens, batches and
seeds (one process, one thread). For each model this reports:
  - the main head's validation cross entropy (the MTP loss is left out): does MTP help or hurt?
  - per-depth draft accuracy: how often module k's argmax is the true token k+1 ahead, with
    the true tokens as inputs (teacher forcing, as in training);
  - on held-out prompts (windows of the validation split), greedy and sampled (temperature
    0.8, top-k 40) speculative decoding: acceptance per draft position, tokens per main-model
    forward, and decode tokens/s plain vs speculative (greedy, timed interleaved in this process);
  - the bound: one draft accepted with probability a gives at most 1 + a tokens per verify
    forward; minus the draft's own cost c (MTP time per verify step over a plain decode step),
    at most (1 + a) / (1 + c) the plain speed. Two chained drafts: 1 + a1 + a1*a2 tokens.
DeepSeek-V3 (technical report, section 5.4.3): the second token is accepted 85-90% of the
time, giving 1.8x tokens per second.

Writes OUT/results.json (`acceptance_rate`: greedy, one draft, n_mtp=1, mean over seeds;
`speedup`: its tokens/s over plain decoding; all the rest, per seed too), OUT/table.md and
OUT/mtp.png.

    python experiments/mtp.py --out runs/mtp          # default budget: ~10 min on 2 CPU cores
    python experiments/mtp.py --quick --out /tmp/mtp   # CI-sized: seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from moe import plots  # noqa: E402
from moe.checkpoint import read_metrics  # noqa: E402
from moe.cli import non_negative_int, out_folder, positive_float, positive_int, training_inputs  # noqa: E402
from moe.config import PRESETS, ModelConfig, atomic_write_text, get_preset, parse_overrides  # noqa: E402
from moe.data import Corpus, eval_starts, windows  # noqa: E402
from moe.device import cpu_name  # noqa: E402
from moe.generate import generate, speculative_generate  # noqa: E402
from moe.model import Transformer  # noqa: E402
from moe.train import TrainConfig, train  # noqa: E402

LN2 = math.log(2.0)
PUBLISHED = {"acceptance": [0.85, 0.90], "speedup": 1.8,
             "source": "DeepSeek-V3 technical report, section 5.4.3 (second-token acceptance, tokens per second)"}
SAMPLING = {"temperature": 0.8, "top_k": 40}


# ------------------------------------------------------------------------------ measurements
@torch.no_grad()
def draft_accuracy(model: Transformer, corpus: Corpus, seq_len: int, n_windows: int) -> dict[str, Any]:
    """Top-1 accuracy of the main head and of each MTP depth on validation windows (teacher forced)."""
    model.eval()
    main, depth = [0, 0], [[0, 0] for _ in model.mtp]
    for starts_B in eval_starts(corpus.val, seq_len, n_windows).split(16):
        x_BS, y_BS = windows(corpus.val, starts_B, seq_len)
        logits_BSV, _, h_BSD = model(x_BS, return_hidden=True)
        main[0] += int((logits_BSV.argmax(-1) == y_BS).sum())
        main[1] += y_BS.numel()
        for k, module in enumerate(model.mtp, start=1):  # the chain of moe.mtp.mtp_loss
            n = seq_len - k
            h_BSD, _ = module(h_BSD[:, :n], model.embed(y_BS[:, k - 1:k - 1 + n]), model.rope_cos[:n],
                              model.rope_sin[:n])
            pred = model.head(module.norm(h_BSD)).argmax(-1)
            depth[k - 1][0] += int((pred == y_BS[:, k:k + n]).sum())
            depth[k - 1][1] += pred.numel()
    return {"main": main[0] / main[1], "by_depth": [c / n for c, n in depth]}


def held_out_prompts(corpus: Corpus, n: int, prompt_len: int, new: int) -> list[list[int]]:
    """n prompts from the validation split, evenly spaced, each leaving room for `new` tokens of it."""
    starts = eval_starts(corpus.val, prompt_len + new, n)
    return [corpus.val.tokens_N[s:s + prompt_len].tolist() for s in starts.tolist()]


def _sum_stats(all_stats: list) -> dict[str, Any]:
    depth = len(all_stats[0].drafted_by_depth)
    drafted = [sum(s.drafted_by_depth[j] for s in all_stats) for j in range(depth)]
    accepted = [sum(s.accepted_by_depth[j] for s in all_stats) for j in range(depth)]
    verifies = sum(s.main_forwards - 1 for s in all_stats)
    new = sum(s.new_tokens for s in all_stats)
    return {"acceptance": sum(accepted) / max(sum(drafted), 1),
            "acceptance_by_depth": [a / max(d, 1) for a, d in zip(accepted, drafted)],
            "tokens_per_forward": new / sum(s.main_forwards for s in all_stats),
            "tokens_per_verify": (new - len(all_stats)) / max(verifies, 1),  # the prefill gives one token
            "verifies": verifies, "draft_seconds": sum(s.draft_seconds for s in all_stats)}


def expected_tokens_per_verify(acceptance_by_depth: list[float]) -> float:
    """1 + a1 + a1*a2 + ...: the tokens a verify forward yields when draft j passes with probability a_j."""
    total, p = 1.0, 1.0
    for a in acceptance_by_depth:
        p *= a
        total += p
    return total


@torch.no_grad()
def decode_measurements(model: Transformer, prompts: list[list[int]], new: int, draft_lens: list[int],
                        rounds: int, seed: int) -> dict[str, Any]:
    """Greedy: plain vs speculative tokens/s (modes alternate prompt by prompt; median of rounds),
    acceptance, the bound.
    Sampled: acceptance and tokens per forward with the demo's sampling settings."""
    model.eval()
    modes = [0, *draft_lens]  # 0 = plain decoding

    def run(mode: int, prompt: list[int]):
        if mode == 0:
            return generate(model, prompt, new, temperature=0.0), None
        return speculative_generate(model, prompt, new, temperature=0.0, draft_len=mode)

    for mode in modes:  # warm-up
        run(mode, prompts[0][:8])
    times = {m: [] for m in modes}  # [round]: seconds for all prompts
    outputs: dict[int, list[list[int]]] = {}
    stats: dict[int, list] = {m: [] for m in draft_lens}
    for _ in range(rounds):
        t = dict.fromkeys(modes, 0.0)
        outs: dict[int, list[list[int]]] = {m: [] for m in modes}
        for prompt in prompts:  # modes alternate prompt by prompt: a change in load hits them alike
            for mode in modes:
                t0 = time.perf_counter()
                tokens, st = run(mode, prompt)
                t[mode] += time.perf_counter() - t0
                outs[mode].append(tokens)
                if st is not None:
                    stats[mode].append(st)
        for mode in modes:
            times[mode].append(t[mode])
        outputs = outs
    n_tokens = sum(len(o) for o in outputs[0])
    plain_s_per_token = statistics.median(times[0]) / n_tokens
    out: dict[str, Any] = {"plain_tokens_per_s": 1 / plain_s_per_token, "rounds": rounds, "prompts": len(prompts),
                           "new_tokens": new, "greedy": {}, "sampled": {}}
    for m in draft_lens:
        g = _sum_stats(stats[m])
        c = g["draft_seconds"] / max(g["verifies"], 1) / plain_s_per_token  # MTP time per step / plain step
        ideal = expected_tokens_per_verify(g["acceptance_by_depth"])
        g.update(tokens_per_s=n_tokens / statistics.median(times[m]),
                 speedup=statistics.median(times[0]) / statistics.median(times[m]),
                 draft_cost=c, bound_tokens_per_verify=ideal, speedup_bound=ideal / (1 + c),
                 same_tokens_as_plain=outputs[m] == outputs[0])
        out["greedy"][f"draft_len_{m}"] = g
        sampled = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator().manual_seed(1000 * seed + i)
            sampled.append(speculative_generate(model, prompt, new, generator=gen, draft_len=m, **SAMPLING)[1])
        s = _sum_stats(sampled)
        s["bound_tokens_per_verify"] = expected_tokens_per_verify(s["acceptance_by_depth"])
        out["sampled"][f"draft_len_{m}"] = s
    return out


# ------------------------------------------------------------------------------ the experiment
def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n_seeds": len(values)}


def summarize(per_seed: dict[str, list[dict]], meta: dict[str, Any]) -> dict[str, Any]:
    """Means and spreads over seeds; the headline keys come from n_mtp=1 with one draft."""
    res: dict[str, Any] = {"meta": meta, "published": PUBLISHED, "sampling": SAMPLING, "per_seed": per_seed}
    res["val_loss"] = {k: statistics.fmean(r["val_loss"] for r in runs) for k, runs in per_seed.items()}
    res["val_loss_spread"] = {k: _mean_std([r["val_loss"] for r in runs]) for k, runs in per_seed.items()}
    res["val_bits_per_byte"] = {k: v / LN2 for k, v in res["val_loss"].items()}
    res["draft_accuracy"] = {k: [statistics.fmean(r["accuracy"]["by_depth"][j] for r in runs)
                                 for j in range(len(runs[0]["accuracy"]["by_depth"]))]
                             for k, runs in per_seed.items() if runs[0]["accuracy"]["by_depth"]}
    res["main_accuracy"] = {k: statistics.fmean(r["accuracy"]["main"] for r in runs) for k, runs in per_seed.items()}
    modes = {}
    for k, runs in per_seed.items():
        if "decode" not in runs[0]:
            continue
        for dl in runs[0]["decode"]["greedy"]:
            entry: dict[str, Any] = {"model": k, "draft_len": int(dl.rsplit("_", 1)[1])}
            for kind in ("greedy", "sampled"):
                rows = [r["decode"][kind][dl] for r in runs]
                entry[kind] = {key: _mean_std([row[key] for row in rows]) for key in rows[0]
                               if isinstance(rows[0][key], float) and not isinstance(rows[0][key], bool)}
                entry[kind]["acceptance_by_depth"] = [statistics.fmean(row["acceptance_by_depth"][j] for row in rows)
                                                      for j in range(len(rows[0]["acceptance_by_depth"]))]
            entry["greedy"]["same_tokens_as_plain"] = all(r["decode"]["greedy"][dl]["same_tokens_as_plain"]
                                                          for r in runs)
            entry["plain_tokens_per_s"] = _mean_std([r["decode"]["plain_tokens_per_s"] for r in runs])
            modes[f"{k}/{dl}"] = entry
    res["modes"] = modes
    head = modes.get("n_mtp_1/draft_len_1")
    if head:
        g, s = head["greedy"], head["sampled"]
        res.update(acceptance_rate=g["acceptance"]["mean"], acceptance_rate_sampled=s["acceptance"]["mean"],
                   speedup=g["speedup"]["mean"], speedup_std=g["speedup"]["std"],
                   speedup_bound=g["speedup_bound"]["mean"], draft_cost=g["draft_cost"]["mean"],
                   tokens_per_forward=g["tokens_per_forward"]["mean"],
                   tokens_per_verify=g["tokens_per_verify"]["mean"],
                   same_tokens_as_plain=all(m["greedy"]["same_tokens_as_plain"] for m in modes.values()))
    one, two = modes.get("n_mtp_2/draft_len_1"), modes.get("n_mtp_2/draft_len_2")
    if one and two:
        res["two_drafts_vs_one"] = {
            "speedup_one": one["greedy"]["speedup"]["mean"], "speedup_two": two["greedy"]["speedup"]["mean"],
            "tokens_per_verify_one": one["greedy"]["tokens_per_verify"]["mean"],
            "tokens_per_verify_two": two["greedy"]["tokens_per_verify"]["mean"],
            "two_beats_one": two["greedy"]["speedup"]["mean"] > one["greedy"]["speedup"]["mean"]}
    return res


def format_loss_table(res: dict[str, Any]) -> str:
    """Markdown: main-head loss and draft accuracy per n_mtp (mean over seeds)."""
    n = next(iter(res["val_loss_spread"].values()))["n_seeds"]
    lines = [f"| model | main-head val loss, nats/byte (mean ± std, {n} seeds) | bits/byte | main top-1 | "
             "draft accuracy by depth |", "|---|---:|---:|---:|---|"]
    for k, v in res["val_loss"].items():
        s = res["val_loss_spread"][k]
        acc = ", ".join(f"{a:.1%}" for a in res["draft_accuracy"].get(k, [])) or "-"
        lines.append(f"| {k.replace('_', ' ').replace('n mtp', 'n_mtp =')} | {v:.3f} ± {s['std']:.3f} | "
                     f"{res['val_bits_per_byte'][k]:.3f} | {res['main_accuracy'][k]:.1%} | {acc} |")
    return "\n".join(lines)


def format_decode_table(res: dict[str, Any]) -> str:
    """Markdown: speculative decoding per (model, drafts): acceptance, tokens per verify, speed-up, bounds."""
    lines = ["| decoding | greedy acceptance (by depth) | sampled acceptance | tokens/verify: measured "
             "(bound 1+a...) | draft cost c | speed-up: measured (bound) | same tokens as plain |",
             "|---|---|---|---|---:|---|---|"]
    def acceptance(kind: dict) -> str:
        by_depth = kind["acceptance_by_depth"]
        text = f"{kind['acceptance']['mean']:.1%}"
        return text + (f" ({', '.join(f'{a:.0%}' for a in by_depth)})" if len(by_depth) > 1 else "")

    for m in res["modes"].values():
        g, s = m["greedy"], m["sampled"]
        drafts = f"{m['draft_len']} draft{'s' if m['draft_len'] > 1 else ''}"
        lines.append(
            f"| {m['model'].replace('_', ' ').replace('n mtp', 'n_mtp =')}, {drafts} | "
            f"{acceptance(g)} | {acceptance(s)} | "
            f"{g['tokens_per_verify']['mean']:.2f} ({g['bound_tokens_per_verify']['mean']:.2f}) | "
            f"{g['draft_cost']['mean']:.2f} | {g['speedup']['mean']:.2f}x ± {g['speedup']['std']:.2f} "
            f"({g['speedup_bound']['mean']:.2f}x) | {g['same_tokens_as_plain']} |")
    p = res["published"]
    lines.append(f"| DeepSeek-V3 (published) | {p['acceptance'][0]:.0%}-{p['acceptance'][1]:.0%} | | | | "
                 f"{p['speedup']}x | |")
    return "\n".join(lines)


def format_table(res: dict[str, Any]) -> str:
    return format_loss_table(res) + "\n\n" + format_decode_table(res)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=out_folder, default="runs/mtp", help="output folder (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 16 steps, 2 seeds, 2 short prompts")
    ap.add_argument("--depths", default="0,1,2", help="n_mtp values to train (default: %(default)s)")
    ap.add_argument("--preset", default="toy", choices=sorted(PRESETS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the base config")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=positive_int, default=400)
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--seq-len", type=positive_int, default=128)
    ap.add_argument("--lr", type=positive_float, default=2e-3)
    ap.add_argument("--eval-interval", type=non_negative_int, default=50, help="0 = at the end only")
    ap.add_argument("--eval-windows", type=positive_int, default=64)
    ap.add_argument("--prompts", type=positive_int, default=8,
                    help="held-out prompts for decoding (default: %(default)s)")
    ap.add_argument("--prompt-len", type=positive_int, default=32)
    ap.add_argument("--new", type=positive_int, default=96, help="new tokens per prompt (default: %(default)s)")
    ap.add_argument("--rounds", type=positive_int, default=3, help="interleaved timing rounds (default: %(default)s)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--threads", type=positive_int, default=1)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick:
        args.steps, args.seq_len, args.eval_interval, args.eval_windows = 16, 64, 8, 8
        args.prompts, args.prompt_len, args.new, args.rounds = 2, 16, 24, 1
        if args.seeds == ap.get_default("seeds"):
            args.seeds = "0,1"
    depths, seeds = int_list(args.depths), int_list(args.seeds)
    if not depths or len(set(depths)) < len(depths) or not set(depths) <= {0, 1, 2}:
        ap.error(f"--depths: n_mtp values must be 0, 1 or 2, a comma list without repeats, got {args.depths!r}")
    if not seeds or min(seeds) < 0:
        ap.error(f"--seeds: expected a comma list of integers >= 0, got {args.seeds!r}")
    try:
        base = get_preset(args.preset).replace(**parse_overrides(args.set))
    except ValueError as e:
        ap.error(str(e))
    if args.prompt_len + args.new > base.max_seq_len:
        ap.error(f"--prompt-len + --new ({args.prompt_len + args.new}) exceeds max_seq_len ({base.max_seq_len})")
    if args.seq_len > base.max_seq_len:  # every check a run would make, before the first one starts
        ap.error(f"--seq-len {args.seq_len} exceeds the model's max_seq_len ({base.max_seq_len})")
    corpus = training_inputs(ap, train_config(args, seeds[0], args.out))  # seeds differ only in a checked field

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, base, depths, seeds, corpus)
    finally:
        torch.set_num_threads(threads)


def int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; [] when it is not a comma list of integers."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        return []


def train_config(args: argparse.Namespace, seed: int, work: str) -> TrainConfig:
    return TrainConfig(out=work, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       min_lr=args.lr / 10, warmup_steps=min(30, max(1, args.steps // 10)),
                       eval_interval=args.eval_interval, eval_windows=args.eval_windows, save_interval=0, seed=seed,
                       device="cpu", threads=args.threads, data=args.data, progress=False, plots=False,
                       overwrite=True)


def run(args: argparse.Namespace, base: ModelConfig, depths: list[int], seeds: list[int],
        corpus: Corpus) -> dict[str, Any]:
    prompts = held_out_prompts(corpus, args.prompts, args.prompt_len, args.new)
    tokens = args.steps * args.batch_size * args.seq_len
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": cpu_name(),
            "torch": torch.__version__, "threads": args.threads, "argv": args.argv,
            "quick": args.quick, "preset": args.preset, "overrides": args.set, "seeds": seeds, "depths": depths,
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "tokens": tokens, "prompts": args.prompts, "prompt_len": args.prompt_len, "new": args.new,
            "rounds": args.rounds, "loadavg_start": os.getloadavg()}
    per_seed: dict[str, list[dict]] = {f"n_mtp_{d}": [] for d in depths}
    os.makedirs(os.path.join(args.out, "metrics"), exist_ok=True)
    bar = tqdm(total=len(seeds) * len(depths), unit="run", desc="mtp", disable=args.quick)
    with tempfile.TemporaryDirectory(prefix="mtp-") as tmp:
        for seed in seeds:
            for d in depths:
                work = os.path.join(tmp, f"n_mtp_{d}-s{seed}")
                with contextlib.redirect_stdout(open(os.devnull, "w")):  # noqa: SIM115 (train prints each eval)
                    result = train(train_config(args, seed, work), base.replace(n_mtp=d))
                records = read_metrics(work)
                atomic_write_text(os.path.join(args.out, "metrics", f"n_mtp_{d}-s{seed}.jsonl"),
                                  "".join(json.dumps(r) + "\n" for r in records))
                evals = [r for r in records if "val_loss" in r]
                model = result.model.eval()
                run = {"seed": seed, "val_loss": result.val_loss, "unigram_loss": result.unigram_loss,
                       "tokens_per_s": records[-1]["tokens"] / records[-1]["elapsed_s"],
                       "curve": {k: [r[k] for r in evals] for k in ("tokens", "elapsed_s", "val_loss")},
                       "accuracy": draft_accuracy(model, corpus, args.seq_len, args.eval_windows)}
                if d:
                    run["decode"] = decode_measurements(model, prompts, args.new, list(range(1, d + 1)),
                                                        args.rounds, seed)
                per_seed[f"n_mtp_{d}"].append(run)
                bar.update(1)
                bar.set_postfix({"val": f"{result.val_loss:.3f}"})
    bar.close()
    meta["loadavg_end"] = os.getloadavg()
    res = summarize(per_seed, meta)
    files = [plots.save(plots.plot_mtp(res), os.path.join(args.out, "mtp.png"), dpi=100)]
    table = format_table(res)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(res, indent=2) + "\n")
    atomic_write_text(os.path.join(args.out, "table.md"), table + "\n")
    print(f"\n== MTP: {tokens:,} tokens per run, seeds {seeds}, {args.prompts} held-out prompts of "
          f"{args.prompt_len} + {args.new} tokens, {args.threads} thread(s), {meta['host']} ==")
    print(table)
    if "two_drafts_vs_one" in res:
        t = res["two_drafts_vs_one"]
        print(f"n_mtp=2 model, greedy: two drafts {t['speedup_two']:.2f}x vs one draft {t['speedup_one']:.2f}x "
              f"({t['tokens_per_verify_two']:.2f} vs {t['tokens_per_verify_one']:.2f} tokens per verify forward)")
    print(f"load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    print("wrote", ", ".join(files + [os.path.join(args.out, f) for f in ("results.json", "table.md")]))
    return res



if __name__ == "__main__":
    main()
