"""Decode throughput with the KV cache: MoE vs dense, MHA vs MLA, plain vs MTP-speculative.

Greedy decoding (temperature 0) of --new tokens after a --prompt-len prompt, batch 1, timed
from the prefill to the last token (moe.generate.generate / speculative_generate). Entries are
timed interleaved. Each MoE model (the preset, MLA and MHA) is paired with its dense twin of
equal active FLOPs (moe.config.dense_baseline). Speculative rows use the MTP module as the
drafter; greedy speculative decoding must return exactly the plain greedy tokens, which is
checked. With random weights the MTP drafts are rarely accepted, so speculative decoding
only pays off with a trained model: pass --checkpoint RUN (e.g. the output of `make demo`)
to time that model plainly and speculatively instead.

  python benchmarks/decode.py                          # toy preset, random weights, 1 thread
  python benchmarks/decode.py --checkpoint runs/demo   # a trained model (needs n_mtp >= 1 for spec)
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

from moe.checkpoint import load_model  # noqa: E402
from moe.cli import config_from, one_of, positive_int  # noqa: E402
from moe.config import CHOICES, ModelConfig, dense_baseline  # noqa: E402
from moe.device import resolve_device  # noqa: E402
from moe.generate import generate, speculative_generate  # noqa: E402
from moe.model import Transformer  # noqa: E402


def build(cfg: ModelConfig, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).to(device).eval()


def cache_bytes_per_token(model: Transformer) -> int:
    """KV cache bytes one position costs, summed over layers (MLA caches only its latent)."""
    cache = model.new_cache(1, max_len=1)
    return sum(t.numel() * t.element_size() for c in cache for t in c.values() if isinstance(t, torch.Tensor))


def run_once(model: Transformer, prompt: list[int], n_new: int, speculative: bool) -> tuple[float, list[int], Any]:
    t0 = time.perf_counter()
    if speculative:
        tokens, stats = speculative_generate(model, prompt, n_new, temperature=0.0)
    else:
        with torch.no_grad():
            tokens, stats = generate(model, prompt, n_new, temperature=0.0), None
    if model.embed.weight.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens, stats


def entries_for(impls: list[str], configs: dict[str, ModelConfig], trained: Transformer | None,
                device: torch.device) -> dict[str, tuple[Transformer, bool]]:
    """name -> (model, speculative): the trained model, else each attention kind's config with each impl."""
    if trained is not None:
        out = {"checkpoint": (trained, False)}
        if len(trained.mtp):
            out["checkpoint+spec"] = (trained, True)
        return out
    out: dict[str, tuple[Transformer, bool]] = {}
    for attn, cfg in configs.items():
        for impl in impls:
            moe = build(cfg.replace(expert_impl=impl), device)
            out[f"moe[{impl}] {attn}"] = (moe, False)
            out[f"moe[{impl}] {attn}+spec"] = (moe, True)
        dense = build(dense_baseline(cfg), device)
        out[f"dense {attn}"] = (dense, False)
        out[f"dense {attn}+spec"] = (dense, True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="change a ModelConfig field")
    ap.add_argument("--attn", type=one_of(CHOICES["attn"]), default="mla,mha",
                    help="attention kinds to compare (comma list)")
    ap.add_argument("--impls", type=one_of(CHOICES["expert_impl"]), default="auto",
                    help="expert_impl values for the MoE models (comma list)")
    ap.add_argument("--checkpoint", default=None, help="time this trained run instead (plain and speculative)")
    ap.add_argument("--prompt-len", type=positive_int, default=16)
    ap.add_argument("--new", type=positive_int, default=128, help="new tokens per run")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=positive_int, default=1, help="one: a batch-1 decode step is too small to split")
    ap.add_argument("--rounds", type=positive_int, default=5)
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        ap.error(f"--device: {e}")
    base = config_from(ap, args.preset, args.set)
    configs = {}
    for attn in args.attn.split(","):
        try:
            configs[attn] = base.replace(attn=attn, n_mtp=max(base.n_mtp, 1))
        except ValueError as e:
            ap.error(f"--attn {attn}: {e} (with this --preset and --set)")
    trained = None
    if args.checkpoint:
        try:
            trained, _ = load_model(args.checkpoint, device)
        except (ValueError, OSError) as e:  # OSError: FileNotFoundError, a folder we cannot read
            ap.error(f"--checkpoint: {e}")
    limit = (trained.cfg if trained is not None else base).max_seq_len
    if args.prompt_len + args.new > limit:  # generation would stop early and time fewer tokens than asked
        ap.error(f"--prompt-len + --new ({args.prompt_len} + {args.new}) exceeds the model's max_seq_len={limit}")

    torch.set_num_threads(args.threads)
    entries = entries_for(args.impls.split(","), configs, trained, device)
    vocab = next(iter(entries.values()))[0].cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=g).tolist()
    load_start = os.getloadavg()
    for model, spec in entries.values():  # warm-up
        run_once(model, prompt, 4, spec)
    times: dict[str, list[float]] = {name: [] for name in entries}
    outputs: dict[str, list[int]] = {}
    spec_stats: dict[str, Any] = {}
    for _ in range(args.rounds):
        for name, (model, spec) in entries.items():
            dt, tokens, stats = run_once(model, prompt, args.new, spec)
            times[name].append(dt)
            outputs[name] = tokens
            if stats is not None:
                spec_stats[name] = stats

    rows = []
    for name, (model, spec) in entries.items():
        dt = statistics.median(times[name])
        n = len(outputs[name])
        plain = name.removesuffix("+spec")
        row = dict(name=name, tok_s=n / dt, ms_per_token=1e3 * dt / n, new_tokens=n,
                   kv_bytes_per_token=cache_bytes_per_token(model), attn=model.cfg.attn,
                   moe=model.cfg.n_moe_layers > 0)
        if spec:
            s = spec_stats[name]
            row.update(acceptance=s.acceptance, tokens_per_forward=s.tokens_per_forward,
                       same_tokens_as_plain=outputs[name] == outputs.get(plain, outputs[name]),
                       vs_plain=row["tok_s"] / (len(outputs[plain]) / statistics.median(times[plain]))
                       if plain in times else None)
        rows.append(row)
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=str(device),
                threads=torch.get_num_threads(), torch=torch.__version__, preset=args.preset, overrides=args.set,
                checkpoint=args.checkpoint, prompt_len=args.prompt_len, new=args.new, rounds=args.rounds,
                loadavg_start=load_start, loadavg_end=os.getloadavg())

    print(f"\n== greedy decode, batch 1, prompt {args.prompt_len} + {args.new} new tokens, {device}, "
          f"{meta['threads']} threads, median of {args.rounds} interleaved runs ==")
    print(f"{'model':<24}{'tok/s':>8}{'ms/tok':>8}{'KV B/tok':>10}{'accept':>8}{'tok/fwd':>8}{'vs plain':>9}"
          f"{'same tokens':>12}")
    for r in rows:
        cols = [format(r[k], ".2f") if r.get(k) is not None else "-"
                for k in ("acceptance", "tokens_per_forward", "vs_plain")]
        same = str(r["same_tokens_as_plain"]) if "acceptance" in r else "-"
        print(f"{r['name']:<24}{r['tok_s']:>8.0f}{r['ms_per_token']:>8.2f}{r['kv_bytes_per_token']:>10}"
              f"{cols[0]:>8}{cols[1]:>8}{cols[2]:>9}{same:>12}")
    if not args.checkpoint:
        print("note: random weights: MTP drafts are rarely accepted, so +spec rows show the drafting cost; "
              "use --checkpoint RUN for a trained model")
    print(f"load average at start {load_start}, at end {meta['loadavg_end']}")
    out = dict(meta=meta, rows=rows)
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
