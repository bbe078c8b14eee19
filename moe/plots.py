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


# ---------------------------------------------------------------------------- expert parallelism
# Inputs: routing choices per rank (the picture of moe/parallel.py's dispatch) and the traffic
# model of moe.accounting.ep_traffic (experiments/parallel_traffic.py gathers both).


def plot_ep_dispatch(experts_by_rank: list[list[list[int]]], n_experts: int) -> Figure:
    """Dispatch / compute / combine of moe.parallel for a few tokens on a few ranks.

    experts_by_rank[r][t]: the experts token t of rank r chose. Each rank sorts its (token,
    expert) rows by expert (= by destination rank), the all-to-all moves every row to the rank
    holding its expert (grouped by source rank there), the experts run, and the reverse
    all-to-all brings the results back to be weighted and added onto their tokens.
    """
    W = len(experts_by_rank)
    L = n_experts // W
    colors = plt.get_cmap("tab10" if n_experts <= 10 else "tab20")
    sent = []  # per rank: (token, expert) rows in sorted order
    for choices in experts_by_rank:
        rows = [(t, e) for t, es in enumerate(choices) for e in es]
        sent.append(sorted(rows, key=lambda te: te[1]))  # stable: token order inside an expert
    received = [[(s, t, e) for s in range(W) for t, e in sent[s] if e // L == r] for r in range(W)]
    n_rows = max(max(len(x) for x in sent), max(len(x) for x in received), 1)
    h, gap = 0.8, 1.5
    band = n_rows + gap
    fig, ax = plt.subplots(figsize=(12, 1.0 + 0.32 * band * W))
    cols = {"tokens": 0.0, "sent": 2.6, "recv": 6.6, "experts": 9.0, "combine": 11.4}

    def box(x, y, w, label, color, fs=7):
        ax.add_patch(plt.Rectangle((x, y - h / 2), w, h, facecolor=color, edgecolor="black", linewidth=0.5))
        ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=fs)

    def y_of(r, i):
        return -(r * band + i)

    for r in range(W):
        top = y_of(r, 0) + 1.1
        ax.text(-0.3, y_of(r, 0) - (n_rows - 1) / 2, f"rank {r}", ha="right", va="center", fontsize=10,
                fontweight="bold", rotation=90)
        for t, es in enumerate(experts_by_rank[r]):
            box(cols["tokens"], y_of(r, t), 0.9, f"t{t}", "white")
            for k, e in enumerate(es):
                box(cols["tokens"] + 1.0 + 0.42 * k, y_of(r, t), 0.38, f"{e}", colors(e), fs=6)
        for i, (t, e) in enumerate(sent[r]):
            box(cols["sent"], y_of(r, i), 1.3, f"t{t} -> E{e}", colors(e))
        for i, (s, t, e) in enumerate(received[r]):
            box(cols["recv"], y_of(r, i), 1.5, f"r{s} t{t} -> E{e}", colors(e))
        for j in range(L):
            e = r * L + j
            rows = [i for i, (_, _, ee) in enumerate(received[r]) if ee == e]
            ymid = y_of(r, (rows[0] + rows[-1]) / 2) if rows else y_of(r, j)
            box(cols["experts"], ymid, 1.3, f"E{e}: {len(rows)} rows", colors(e), fs=7)
            for i in rows:
                ax.plot([cols["recv"] + 1.5, cols["experts"]], [y_of(r, i), ymid], color=colors(e), lw=0.6)
        for t, es in enumerate(experts_by_rank[r]):
            terms = " + ".join(f"w{k} E{e}" for k, e in enumerate(es))
            box(cols["combine"], y_of(r, t), 2.0, f"y_t{t} = {terms}", "white")
        if r == 0:
            for x, text in ((cols["tokens"], "tokens, their top-k experts"),
                            (cols["sent"], "1 dispatch: sort rows by expert\n(= by destination rank)"),
                            (cols["recv"], "received: by source rank,\nthen by expert"),
                            (cols["experts"], "2 compute: this\nrank's experts"),
                            (cols["combine"], "3 combine: the reverse all-to-all\nbrings results home, weighted sum")):
                ax.text(x, top, text, ha="left", va="bottom", fontsize=8)
    # the all-to-all: every row from its place on the sending rank to its place on the receiving rank
    for s in range(W):
        for i, (t, e) in enumerate(sent[s]):
            r = e // L
            j = received[r].index((s, t, e))
            ax.annotate("", xy=(cols["recv"], y_of(r, j)), xytext=(cols["sent"] + 1.3, y_of(s, i)),
                        arrowprops={"arrowstyle": "->", "color": colors(e), "lw": 0.7,
                                    "alpha": 1.0 if r != s else 0.4})
    ax.text(cols["sent"] + 1.5, y_of(W - 1, n_rows) - 0.2,
            "all-to-all with uneven splits (the row counts are exchanged first); faint: rows that stay on their rank",
            ha="left", fontsize=8, style="italic")
    ax.set_xlim(-0.8, 13.6)
    ax.set_ylim(y_of(W - 1, n_rows) - 1.0, 2.4)
    ax.axis("off")
    ax.set_title(f"Expert parallelism: {n_experts} experts over {W} ranks ({L} each)", fontsize=11)
    return fig


def plot_ep_traffic(ep_sizes: list[int], bytes_per_token: dict[str, list[float]],
                    cross_node_rows: dict[str, float], model: str = "", max_nodes: int | None = None) -> Figure:
    """Left: all-to-all bytes per token (fwd + bwd, all MoE layers) vs EP size, per element type.
    Right: rows per token and MoE layer that cross nodes: one per assignment, once per node, node-limited."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in bytes_per_token.items():
        ax1.plot(ep_sizes, [v / 1e6 for v in values], "o-", label=name)
        for x, v in zip(ep_sizes, values):
            ax1.annotate(f"{v / 1e6:.1f}", (x, v / 1e6), textcoords="offset points", xytext=(0, 5),
                         ha="center", fontsize=7)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(ep_sizes, [str(x) for x in ep_sizes])
    ax1.set_xlabel("expert-parallel ranks")
    ax1.set_ylabel("MB sent per token (fwd + bwd)")
    ax1.set_title(f"All-to-all traffic per token{', ' + model if model else ''}")
    ax1.set_ylim(bottom=0)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    labels = list(cross_node_rows)
    bars = ax2.bar(labels, list(cross_node_rows.values()), color=["tab:gray", "tab:blue", "tab:green"][:len(labels)])
    for b, v in zip(bars, cross_node_rows.values()):
        ax2.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    if max_nodes is not None:
        ax2.axhline(max_nodes, color="tab:green", linestyle=":", label=f"bound: {max_nodes} nodes")
        ax2.legend(fontsize=8)
    ax2.set_ylabel("rows per token per MoE layer")
    ax2.set_title("Crossing nodes (InfiniBand), one way")
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- load-balancing figures
# Inputs come from experiments/balancing.py (plain lists: steps x layers, layers x experts).


def _grid(n: int, cols: int = 3, size: tuple[float, float] = (4.0, 2.8), **kw):
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, min(cols, n), figsize=(size[0] * min(cols, n), size[1] * rows), squeeze=False,
                             **kw)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def plot_load_curves(curves: dict[str, list[list[float]]], layer_names: list[str] | None = None,
                     floor: float | None = None, title: str = "Load imbalance per layer") -> Figure:
    """max/mean tokens per expert over training, one panel per mode, one line per MoE layer.

    curves: mode -> per step, one value per layer. floor: the value a perfectly balanced random
    router would show at this batch size (drawn dotted).
    """
    fig, axes = _grid(len(curves), size=(3.6, 2.5), sharey=True)
    for ax, (mode, per_step) in zip(axes, curves.items()):
        for layer in range(len(per_step[0]) if per_step else 0):
            name = layer_names[layer] if layer_names else f"MoE layer {layer}"
            ax.plot(range(1, len(per_step) + 1), _ema([v[layer] for v in per_step]), label=name, linewidth=1.2)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        if floor is not None:
            ax.axhline(floor, color="tab:red", linestyle=":", linewidth=1, label="balanced-router noise")
        ax.set_title(mode, fontsize=10)
        ax.set_ylim(bottom=0.9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("optimizer step", fontsize=8)
    axes[0].set_ylabel("max / mean load (smoothed)", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_load_heatmaps(shares: dict[str, list[list[float]]], layer_names: list[str] | None = None,
                       title: str = "Expert load at the end (tokens x E / total; 1 = fair share)") -> Figure:
    """One layer x expert heatmap per mode, on one colour scale."""
    fig, axes = _grid(len(shares), size=(3.4, 2.2))
    vmax = max(max(max(row) for row in s) for s in shares.values())
    im = None
    for ax, (mode, share) in zip(axes, shares.items()):
        im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
        ax.set_title(mode, fontsize=10)
        ax.set_xticks(range(len(share[0])))
        ax.set_yticks(range(len(share)), layer_names if layer_names else None, fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.colorbar(im, ax=axes, shrink=0.8)
    return fig


def plot_bias_trajectories(bias: list[list[list[float]]], layer_names: list[str] | None = None,
                           title: str = "Aux-loss-free correction bias per expert") -> Figure:
    """bias: per step, per layer, per expert. One panel per layer, one line per expert."""
    n_layers = len(bias[0])
    fig, axes = _grid(n_layers, size=(3.6, 2.5), sharey=True)
    steps = range(1, len(bias) + 1)
    for layer, ax in enumerate(axes):
        for e in range(len(bias[0][layer])):
            ax.plot(steps, [b[layer][e] for b in bias], linewidth=1, color=plt.cm.tab10(e % 10), label=f"expert {e}")
        ax.axhline(0.0, color="gray", linestyle=":", linewidth=1)
        ax.set_title(layer_names[layer] if layer_names else f"MoE layer {layer}", fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bias (added to the selection score)", fontsize=8)
    axes[-1].legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_collapse(curves: dict[str, list[float]], shares: dict[str, list[list[float]]], setting: str,
                  layer_names: list[str] | None = None, shares_label: str = "last step") -> Figure:
    """Top: the worst layer's max/mean load over steps, one line per mode. Bottom: each mode's
    layer x expert load (shares_label says of which tokens)."""
    n = len(shares)
    fig = plt.figure(figsize=(3.0 * n, 6.6))
    grid = fig.add_gridspec(2, n, height_ratios=[1.3, 1], hspace=0.45)
    top = fig.add_subplot(grid[0, :])
    for mode, values in curves.items():
        top.plot(range(1, len(values) + 1), _ema(values), label=mode, linewidth=1.4)
    top.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    top.set_ylim(bottom=0.9)
    top.set_xlabel("optimizer step")
    top.set_ylabel("worst layer: max / mean load")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    top.set_title(f"Collapse and the fixes: {setting}", fontsize=10)
    vmax = max(max(max(row) for row in s) for s in shares.values())
    im = None
    for i, (mode, share) in enumerate(shares.items()):
        ax = fig.add_subplot(grid[1, i])
        im = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0, vmax=vmax)
        ax.set_title(f"{mode} ({shares_label})", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_yticks(range(len(share)), layer_names if (layer_names and i == 0) else [""] * len(share), fontsize=7)
    fig.colorbar(im, ax=fig.axes[1:], shrink=0.8, label="tokens x E / total")
    return fig


def plot_domain_usage(usage: list[dict[str, list[float]]], mi_bits: list[float], mi_max_bits: float,
                      layer_names: list[str] | None = None, title: str = "Expert usage by domain") -> Figure:
    """usage: per layer, domain -> share of that domain's assignments on each expert (times E,
    1 = fair share). mi_bits: per layer, the mutual information of domain and chosen experts."""
    fig, axes = _grid(len(usage), size=(4.2, 2.8), sharey=True)
    for layer, (ax, per_domain) in enumerate(zip(axes, usage)):
        n_dom = len(per_domain)
        width = 0.8 / n_dom
        for d, (domain, shares) in enumerate(per_domain.items()):
            xs = [e + (d - (n_dom - 1) / 2) * width for e in range(len(shares))]
            ax.bar(xs, shares, width, label=domain)
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        name = layer_names[layer] if layer_names else f"MoE layer {layer}"
        ax.set_title(f"{name}: I = {mi_bits[layer]:.3f} of {mi_max_bits:.3f} bits", fontsize=9)
        ax.set_xticks(range(len(next(iter(per_domain.values())))))
        ax.set_xlabel("expert", fontsize=8)
    axes[0].set_ylabel("share of the domain's assignments x E", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _expert_colour(e: int) -> str:
    from matplotlib.colors import to_hex

    return to_hex(plt.cm.tab10(e % 10))


def _display(ch: str) -> str:
    return {"\n": "\u21b5", "\t": "\u2192", " ": "\u00b7"}.get(ch, ch if ch.isprintable() else "?")


def plot_routing_text(text: str, experts: list[int], n_experts: int, title: str, width: int = 64) -> Figure:
    """Each character on a cell coloured by its top expert (newlines shown as a return sign)."""
    from matplotlib.patches import Patch, Rectangle

    lines: list[list[tuple[str, int]]] = [[]]
    for ch, e in zip(text, experts):
        lines[-1].append((ch, e))
        if ch == "\n" or len(lines[-1]) >= width:
            lines.append([])
    lines = [line for line in lines if line]
    fig, ax = plt.subplots(figsize=(width * 0.13 + 0.5, len(lines) * 0.24 + 0.9))
    for y, line in enumerate(lines):
        for x, (ch, e) in enumerate(line):
            ax.add_patch(Rectangle((x, -y - 1), 1, 1, color=_expert_colour(e), alpha=0.55, lw=0))
            ax.text(x + 0.5, -y - 0.5, _display(ch), ha="center", va="center", fontsize=7, family="monospace")
    ax.set_xlim(0, width)
    ax.set_ylim(-len(lines), 0)
    ax.axis("off")
    handles = [Patch(color=_expert_colour(e), alpha=0.55, label=str(e)) for e in range(n_experts)]
    ax.legend(handles=handles, title="top expert", fontsize=7, title_fontsize=7, ncol=n_experts,
              loc="upper center", bbox_to_anchor=(0.5, 0.0), frameon=False)
    ax.set_title(title, fontsize=9)
    return fig


def routing_html(text: str, experts: list[int], n_experts: int, title: str) -> str:
    """The same picture as plot_routing_text, as a standalone HTML page (hover shows the expert)."""
    import html

    cells = "".join(f'<span style="background:{_expert_colour(e)}8c" title="expert {e}">{html.escape(ch)}</span>'
                    for ch, e in zip(text, experts))
    legend = " ".join(f'<span style="background:{_expert_colour(e)}8c">&nbsp;{e}&nbsp;</span>'
                      for e in range(n_experts))
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title></head>"
            "<body style=\"font-family:sans-serif\">\n<h3>" + html.escape(title) + "</h3>\n<p>top expert: " + legend
            + "</p>\n<pre style=\"font-size:14px;line-height:1.5\">" + cells + "</pre>\n</body></html>\n")


# ---------------------------------------------------------------------------- FP8 figures
# Inputs come from experiments/fp8.py (moe.fp8 and moe.accounting do the arithmetic).


def plot_fp8_granularity(magnitudes: list[float], sqnr_db: dict[str, list[float]]) -> Figure:
    """SQNR (dB) of activations with outlier channels vs the outliers' size, one line per scaling.

    sqnr_db: label -> one value per magnitude (measured on the non-outlier values).
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in sqnr_db.items():
        ax.plot(magnitudes, values, "o-" if "e4m3" in label else "s--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("outlier channels' magnitude / typical activation")
    ax.set_ylabel("SQNR of the other values (dB, higher is better)")
    ax.set_title("One scale per 1x128 tile keeps the values next to an outlier; one per tensor or row does not")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_fp8_accumulation(ks: list[int], errors: dict[str, list[float]],
                          reference: tuple[float, float] | None = None) -> Figure:
    """Relative error of a K-long dot product vs K, one line per accumulation; reference = (K, error)
    a published point (DeepSeek: nearly 2% at K = 4096)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, values in errors.items():
        ax.plot(ks, values, "o:" if "nearest" in label else "o-", label=label)
    if reference is not None:
        ax.plot(*reference, "r*", markersize=14,
                label=f"DeepSeek-V3 report: ~{reference[1]:.0%} at K = {reference[0]:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (products summed)")
    ax.set_ylabel("relative error |sum - exact| / |exact|")
    ax.set_title("A 14-bit running sum drifts as K grows; promoting to fp32 every 128 products stops it")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_fp8_training(curves: dict[str, list[list[tuple[int, float]]]], final: dict[str, list[float]],
                      note: str = "") -> Figure:
    """Left: validation loss per step, mean over seeds with the min-max band, per recipe.
    Right: final validation loss per recipe, one dot per seed. curves: label -> per seed [(step, val)]."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for label, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        per_step = list(zip(*[[v for _, v in run] for run in runs]))
        mean = [sum(v) / len(v) for v in per_step]
        line, = ax1.plot(steps, mean, "o-", markersize=3, label=f"{label} ({len(runs)} seed{'s' * (len(runs) > 1)})")
        if len(runs) > 1:
            ax1.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.2,
                             color=line.get_color())
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("validation cross entropy (nats per byte)")
    ax1.set_title("Toy model, same data and seeds")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    labels = list(final)
    for i, label in enumerate(labels):
        ax2.plot([i] * len(final[label]), final[label], "o", alpha=0.7)
        ax2.plot([i - 0.2, i + 0.2], [sum(final[label]) / len(final[label])] * 2, "k-")
    ax2.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax2.set_ylabel("final validation loss (dots: seeds, bar: mean)")
    ax2.set_title(note or "Final validation loss", fontsize=9)
    ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def plot_fp8_memory(panels: dict[str, dict[str, float]], model: str = "DeepSeek-V3") -> Figure:
    """The "75%" question: one panel per kind of memory (title -> {bar label: bytes}), savings written
    against each panel's first bar."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.5))
    for ax, (title, bars) in zip(axes, panels.items()):
        first = next(iter(bars.values()))
        colors = ["tab:gray", "tab:blue", "tab:orange", "tab:green"][:len(bars)]
        rects = ax.bar(list(bars), list(bars.values()), color=colors)
        ax.bar_label(rects, labels=[_short(v, "B") + ("" if v == first else f"\n-{1 - v / first:.1%}")
                                    for v in bars.values()], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=15, labelsize=8)
        ax.set_ylim(0, first * 1.25)
    axes[0].set_ylabel("bytes")
    fig.suptitle(f"{model}: FP8 saves 75% of the weights against fp32, far less of what training holds")
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

