"""Matplotlib figures used by the experiments and the notebooks.

Every function takes plain numbers (or library results), draws one figure, and returns the
matplotlib Figure; `save(fig, path)` writes it. The Agg backend is forced so plots work on
headless machines and in CI.
"""

from __future__ import annotations

import os
import sys

import matplotlib

if "ipykernel" not in sys.modules:  # keep a notebook's inline backend; headless everywhere else
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> str:
    """Write fig to path (creating the folder) and close it; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- accounting figures
# Inputs come from moe.accounting (experiments/savings.py gathers them for every preset).


def _grouped_bars(ax, labels: list[str], series: dict[str, list[float]], unit: str = "", log: bool = True) -> None:
    """Side-by-side bars: one group per label, one bar per series, values written on top."""
    n = len(series)
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, labels=[_short(v, unit) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels, rotation=15)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)


def _short(v: float, unit: str = "") -> str:
    """3.7e10 -> '37B' for counts (no unit), '37GB' / '37GFLOP' with a unit."""
    billion = "G" if unit else "B"
    for div, sfx in ((1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "K")):
        if abs(v) >= div:
            return f"{v / div:.3g}{sfx}{unit}"
    return f"{v:.3g}{unit}"


def plot_total_vs_active(params: dict[str, tuple[float, float]]) -> Figure:
    """Total vs active parameters per model: name -> (total, active).

    Include a dense model of equal total size (active == total) for the articles' contrast:
    a dense model keeps every parameter "always active".
    """
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(params)
    _grouped_bars(ax, labels, {"total": [t for t, _ in params.values()],
                               "active per token": [a for _, a in params.values()]})
    ax.set_ylabel("parameters")
    ax.set_title("Stored vs used per token: MoE activates a small fraction of its parameters")
    return fig


def plot_memory_per_precision(weight_gb: dict[str, dict[str, float]], card_gb: float = 24.0) -> Figure:
    """Weight memory (GB) per model and precision: name -> {precision: GB}, with a card_gb line."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(weight_gb)
    precisions = list(next(iter(weight_gb.values())))
    _grouped_bars(ax, labels, {p: [weight_gb[m][p] * 1e9 for m in labels] for p in precisions}, unit="B")
    ax.axhline(card_gb * 1e9, color="red", linestyle="--", linewidth=1, label=f"{card_gb:g} GB consumer card")
    ax.legend(fontsize=8)
    ax.set_ylabel("bytes of weights (no KV cache, no activations)")
    ax.set_title("Weights alone vs one gaming GPU")
    return fig


def plot_kv_cache(variants: dict[str, float], per_model: dict[str, float], variants_of: str = "") -> Figure:
    """KV-cache bytes per token: left, one model's heads cached as MHA/GQA/MQA/MLA (per layer);
    right, each model's own attention over all its layers."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, data, title in ((ax1, variants, f"same heads, what is cached ({variants_of}, per layer)"),
                            (ax2, per_model, "each model as built (all layers)")):
        bars = ax.bar(list(data), list(data.values()), color="tab:purple")
        ax.bar_label(bars, labels=[_short(v, "B") for v in data.values()], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("bytes per token (bf16)")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=15)
    fig.suptitle("KV cache per token: MLA caches a small latent instead of per-head keys and values")
    fig.tight_layout()
    return fig


def plot_flops_per_token(flops: dict[str, tuple[float, float]], context_note: str = "") -> Figure:
    """Forward FLOPs per token: name -> (MoE as configured, dense model of equal total parameters)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(flops)
    _grouped_bars(ax, labels, {"MoE (top-k experts)": [m for m, _ in flops.values()],
                               "dense, equal total params": [d for _, d in flops.values()]}, unit="FLOP")
    ax.set_ylabel(f"forward FLOPs per token{context_note}")
    ax.set_title("Compute per token: MoE pays for its active parameters only")
    return fig


# ---------------------------------------------------------------------------- training figures
# Inputs are the records of a run's metrics.jsonl (moe.checkpoint.read_metrics).


def _ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected: a readable line through a noisy loss."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_training_loss(records: list[dict], baseline: float | None = None) -> Figure:
    """Train cross entropy (raw and smoothed) and validation loss per step, in nats per token.

    baseline: an optional reference line, e.g. the unigram loss of the same validation text.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [(r["step"], r["ce"]) for r in records if isinstance(r.get("ce"), (int, float))]
    if train:
        steps, ce = zip(*train)
        ax.plot(steps, ce, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _ema(list(ce)), color="tab:blue", label="train (smoothed)")
    evals = [r for r in records if isinstance(r.get("val_loss"), (int, float))]
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red",
                label="validation")
        domains = sorted({k for r in evals for k in r if k.startswith("val_loss_")})
        for k in domains:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot(*zip(*pts), ".--", linewidth=1, label=f"validation, {k[len('val_loss_'):]}")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle=":", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross entropy (nats per byte)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_expert_load(records: list[dict], layer_names: list[str] | None = None) -> Figure:
    """Left: max/mean expert load per MoE layer over training (1.0 = perfectly balanced).
    Right: each expert's share of the last logged step's tokens, times E (1.0 = its fair share).

    layer_names: one label per MoE layer in logged order (moe.train.moe_layer_names gives them).
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    loads = [(r["step"], r["load_max_over_mean"]) for r in records if r.get("load_max_over_mean")]
    if loads:
        steps = [s for s, _ in loads]
        for layer in range(len(loads[0][1])):
            name = layer_names[layer] if layer_names and layer < len(layer_names) else f"MoE layer {layer}"
            ax1.plot(steps, _ema([v[layer] for _, v in loads]), label=name)
    ax1.axhline(1.0, color="gray", linestyle=":")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("max / mean tokens per expert (smoothed)")
    ax1.set_title("Load imbalance per layer")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    counted = [r for r in records if r.get("tokens_per_expert")]
    if counted:
        counts = counted[-1]["tokens_per_expert"]
        share = [[c * len(row) / max(sum(row), 1e-9) for c in row] for row in counts]
        im = ax2.imshow(share, cmap="viridis", aspect="auto", vmin=0)
        fig.colorbar(im, ax=ax2, label="tokens x E / total (1 = uniform)")
        ax2.set_xlabel("expert")
        ax2.set_ylabel("MoE layer")
        ax2.set_yticks(range(len(share)), layer_names if layer_names and len(layer_names) == len(share) else None)
        ax2.set_title(f"Expert load at step {counted[-1]['step']}")
    else:
        ax2.axis("off")
    fig.tight_layout()
    return fig


# ============================================================================ does it pay? (experiments/)
# Figures of experiments/dense_vs_moe.py and experiments/mtp.py. A "curve" is one run's evals:
# {"tokens": [...], "elapsed_s": [...], "val_loss": [...]}; each model has one curve per seed.


def _mean_curve(curves: list[dict], x_key: str) -> tuple[list[float], list[float]]:
    """Mean over seeds, eval by eval (every seed evaluates at the same steps)."""
    n = min(len(c["val_loss"]) for c in curves)
    xs = [sum(c[x_key][i] for c in curves) / len(curves) for i in range(n)]
    ys = [sum(c["val_loss"][i] for c in curves) / len(curves) for i in range(n)]
    return xs, ys


def _zoom(ax, curves: dict[str, list[dict]]) -> None:
    """Show the last three quarters of training: the first evals would flatten the differences."""
    finals = [_mean_curve(cs, "tokens")[1] for cs in curves.values()]
    lo = min(min(y) for y in finals)
    hi = max(y[min(len(y) - 1, len(y) // 4)] for y in finals)
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))


def _plot_curves(ax, curves: dict[str, list[dict]], x_key: str) -> None:
    for i, (label, cs) in enumerate(curves.items()):
        color = f"C{i}"
        for c in cs:
            ax.plot(c[x_key], c["val_loss"], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(*_mean_curve(cs, x_key), "o-", color=color, markersize=3, label=label)
    _zoom(ax, curves)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_dense_vs_moe(curves: dict[str, list[dict]], finals: dict[str, list[float]], notes: dict[str, str],
                      budget: str = "") -> Figure:
    """Left: validation loss vs training tokens (thin: each seed, bold: mean). Right: final loss per
    model, each seed a dot and the mean +- std, labelled with its active / total parameters."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    _plot_curves(ax1, curves, "tokens")
    ax1.set_xlabel("training tokens (bytes)")
    ax1.set_ylabel("validation cross entropy (nats per byte)")
    ax1.set_title("Validation loss vs tokens", fontsize=10)
    labels = list(finals)
    for i, label in enumerate(labels):
        vs = finals[label]
        mean = sum(vs) / len(vs)
        std = (sum((v - mean) ** 2 for v in vs) / max(len(vs) - 1, 1)) ** 0.5
        y = len(labels) - 1 - i
        ax2.plot(vs, [y] * len(vs), "o", color=f"C{i}", alpha=0.4, markersize=4)
        ax2.errorbar([mean], [y], xerr=[std], fmt="D", color=f"C{i}", capsize=4, markersize=6)
        ax2.annotate(f"{mean:.3f}", (mean, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    ax2.set_yticks(range(len(labels) - 1, -1, -1), [f"{lab}\n{notes.get(lab, '')}" for lab in labels], fontsize=8)
    ax2.set_ylim(-0.6, len(labels) - 0.4)
    ax2.set_xlabel("final validation loss (nats per byte)")
    ax2.set_title("Final loss: seeds and mean ± std", fontsize=10)
    ax2.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Toy MoE vs dense at equal active and equal total parameters\n{budget}", fontsize=11)
    fig.tight_layout()
    return fig


def plot_loss_vs_seconds(curves: dict[str, list[dict]], budget: str = "", baseline: float | None = None,
                         threads: int = 1) -> Figure:
    """Validation loss vs seconds of training steps: each curve's "seconds" (tokens at the step rate
    measured with the models taking turns; evals excluded)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    _plot_curves(ax, curves, "seconds")
    if baseline is not None and baseline < ax.get_ylim()[1]:
        ax.axhline(baseline, color="gray", linestyle=":", label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel(f"seconds of training steps (interleaved step timing, {threads} CPU thread)")
    ax.set_ylabel("validation cross entropy (nats per byte)")
    ax.set_title(f"Validation loss vs wall-clock time\n{budget}", fontsize=10)
    return fig


def _bars(ax, labels: list[str], series: dict[str, list[float]], fmt: str) -> None:
    """Side-by-side bars on a linear axis, each value written on top with fmt."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, values, width, label=name, color=f"C{i}")
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels)
    ax.legend(fontsize=7)


def _mode_label(mode: dict) -> str:
    n = mode["model"].rsplit("_", 1)[1]
    return f"n_mtp={n}\n{mode['draft_len']} draft{'s' if mode['draft_len'] > 1 else ''}"


def plot_mtp(res: dict) -> Figure:
    """experiments/mtp.py: main-head loss per n_mtp; acceptance per draft position (greedy, sampled)
    against DeepSeek's 85-90%; tokens per verify forward and speed-up, measured vs bound, vs 1.8x."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [2, 3, 3]})
    keys = list(res["val_loss"])
    for i, k in enumerate(keys):
        vs = [r["val_loss"] for r in res["per_seed"][k]]
        s = res["val_loss_spread"][k]
        ax1.plot([i] * len(vs), vs, "o", color="C0", alpha=0.4, markersize=4)
        ax1.errorbar([i], [s["mean"]], yerr=[s["std"]], fmt="D", color="C0", capsize=4)
        ax1.annotate(f"{s['mean']:.3f}", (i, s["mean"]), textcoords="offset points", xytext=(10, -3), fontsize=8)
    ax1.set_xticks(range(len(keys)), [k.replace("n_mtp_", "n_mtp=") for k in keys])
    ax1.set_xlim(-0.5, len(keys) - 0.5)
    ax1.set_ylabel("main-head validation CE (nats per byte)")
    ax1.set_title("Does MTP training help the main head?", fontsize=10)
    ax1.grid(alpha=0.3, axis="y")

    modes = list(res["modes"].values())
    cats, greedy, sampled = [], [], []
    for m in modes:
        for j, (g, s) in enumerate(zip(m["greedy"]["acceptance_by_depth"], m["sampled"]["acceptance_by_depth"])):
            suffix = f"\ndraft {j + 1}" if m["draft_len"] > 1 else ""
            cats.append(_mode_label(m) + suffix)
            greedy.append(g)
            sampled.append(s)
    lo, hi = res["published"]["acceptance"]
    ax2.axhspan(lo, hi, color="gray", alpha=0.25, label=f"DeepSeek-V3: {lo:.0%}-{hi:.0%}")
    _bars(ax2, cats, {"greedy": greedy, "sampled (T=0.8, top-40)": sampled}, "{:.0%}")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("acceptance (given earlier drafts accepted)")
    ax2.set_title("Drafts accepted by the main model", fontsize=10)
    ax2.tick_params(axis="x", rotation=0, labelsize=8)

    labels = [_mode_label(m) for m in modes]
    g = [m["greedy"] for m in modes]
    _bars(ax3, labels, {"1 + a (+ a1*a2): free drafts": [x["bound_tokens_per_verify"]["mean"] for x in g],
                        "bound minus draft cost: (1 + a)/(1 + c)": [x["speedup_bound"]["mean"] for x in g],
                        "measured speed-up (tokens/s)": [x["speedup"]["mean"] for x in g]}, "{:.2f}")
    ax3.axhline(res["published"]["speedup"], color="black", linestyle="--", linewidth=1,
                label=f"DeepSeek-V3: {res['published']['speedup']}x")
    ax3.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    ax3.legend(fontsize=7, loc="upper left")
    ax3.set_ylim(0, max(3.2, ax3.get_ylim()[1]))
    ax3.set_ylabel("x plain greedy decoding")
    ax3.set_title("Speculative decoding: bound vs measured (greedy)", fontsize=10)
    ax3.tick_params(axis="x", rotation=0, labelsize=8)
    meta = res["meta"]
    fig.suptitle(f"Multi-token prediction on the toy model: {meta['tokens']:,} training tokens, "
                 f"{len(meta['seeds'])} seeds; {meta['prompts']} held-out prompts of {meta['prompt_len']} + "
                 f"{meta['new']} bytes", fontsize=11)
    fig.tight_layout()
    return fig

