"""Load balancing compared on the toy model: no balancing, Switch aux loss, DeepSeek-V3's
sequence-wise loss, the aux-loss-free bias (alone, with a tiny seq loss, with the z-loss).

    python experiments/balancing.py --out runs/balancing [--quick] [--seeds 2] [--steps 300] [--jobs 1]

Three parts, every run the toy preset with one balancing mode (moe.balance.MODES) and the
same seeds and batches:
  1. compare: per mode, max/mean load per layer over the steps, the final layer x expert load,
     the bias trajectories (aux_free), validation cross entropy (CE only, never CE plus the
     balancing terms), and the share of assignments a capacity factor of 1.0 / 1.25 would drop;
  2. collapse: a harsher setting (softmax router, no group limit, 5x learning rate) where "none"
     collapses, and what each method does to it;
  3. specialisation: for the aux_free model (seed 0), expert usage by domain (prose vs code)
     per layer, the mutual information of domain and chosen experts in bits (with its maximum),
     and a routing picture of validation text coloured by each byte's top expert.
Writes OUT/results.json (top level: one entry per mode with at least "val_ce" and
"max_over_mean_load", plus "collapse", "specialisation", "settings"), OUT/table.md (also
printed) and the figures OUT/balancing_*.png and OUT/balancing_routing.html.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moe import plots  # noqa: E402
from moe.balance import MODES, mode_fields  # noqa: E402
from moe.checkpoint import load_checkpoint, load_model, read_metrics  # noqa: E402
from moe.cli import out_folder, positive_int  # noqa: E402
from moe.config import PRESETS, ModelConfig, atomic_write_text  # noqa: E402
from moe.data import domain_ids, domain_spans, eval_starts, load_corpus, windows  # noqa: E402
from moe.experts import expert_capacity  # noqa: E402
from moe.layer import moe_layers, reset_routing_stats  # noqa: E402
from moe.model import Transformer  # noqa: E402
from moe.train import TrainConfig, moe_layer_names, train  # noqa: E402

COMPARE = ["none", "aux", "seq_aux", "aux_free", "aux_free+seq_aux", "aux_free+z"]
COLLAPSE = ["none", "aux", "seq_aux", "aux_free"]
# "none" collapses on the plain toy too (group-limited sigmoid routing, every layer onto two
# experts); this setting is harsher: a softmax router without groups, trained 5x faster
COLLAPSE_MODEL = {"score_func": "softmax", "n_expert_groups": 1, "n_limited_groups": 1}
COLLAPSE_TRAIN = {"lr": 1e-2, "min_lr": 1e-3}
COLLAPSE_NAME = "softmax router, no group limit, peak lr 1e-2 (5x)"
SPECIALISE = "aux_free"
CAPACITY_FACTORS = (1.0, 1.25)
DPI = 100


@dataclasses.dataclass
class Settings:
    steps: int = 300
    seeds: int = 2
    batch_size: int = 4
    seq_len: int = 128
    eval_windows: int = 64
    window: int = 50  # the last steps whose loads give the end-of-run numbers
    jobs: int = 1
    reuse: bool = False  # read finished runs with the same configs instead of training them again


QUICK = Settings(steps=12, seeds=1, seq_len=32, eval_windows=8, window=4)


# ------------------------------------------------------------------------------ runs
def finished(tc: TrainConfig, cfg: ModelConfig) -> bool:
    """tc.out holds a complete run of exactly this model and training config (for --reuse)."""
    try:
        ckpt = load_checkpoint(tc.out)
    except (OSError, ValueError):
        return False
    same_tc = {k: v for k, v in ckpt.train_config.items() if k != "overwrite"} == {
        k: v for k, v in dataclasses.asdict(tc).items() if k != "overwrite"}
    return ckpt.config == cfg and ckpt.step == tc.steps and same_tc


def run_one(job: dict) -> dict:
    """Train one (part, mode, seed), or with reuse read its finished run, and return its per-step
    load records and validation CE."""
    cfg = ModelConfig.from_dict(job["cfg"])
    tc = TrainConfig(**job["tc"])
    if not (job["reuse"] and finished(tc, cfg)):
        with contextlib.redirect_stdout(io.StringIO()):  # train's eval line; the table says it all
            train(tc, cfg)
    records = read_metrics(tc.out)
    keep = ("load_max_over_mean", "tokens_per_expert", "bias", "router_entropy")
    return {**{k: job[k] for k in ("part", "mode", "seed")}, "out": tc.out, "val_ce": records[-1]["val_loss"],
            "records": [{k: r[k] for k in keep if k in r} for r in records]}


def make_job(part: str, mode: str, seed: int, s: Settings, out: str, cfg_changes: dict, tc_changes: dict) -> dict:
    cfg = PRESETS["toy"].replace(**mode_fields(mode), **cfg_changes)
    tc = dict(out=os.path.join(out, "runs", f"{part}-{mode}-s{seed}"), steps=s.steps, batch_size=s.batch_size,
              seq_len=s.seq_len, eval_interval=0, eval_windows=s.eval_windows, save_interval=0, seed=seed,
              device="cpu", threads=1, progress=False, plots=False, overwrite=True, **tc_changes)
    return {"part": part, "mode": mode, "seed": seed, "cfg": cfg.to_dict(), "tc": tc, "reuse": s.reuse}


def run_all(jobs: list[dict], n_jobs: int) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="balancing runs", unit="run", disable=not sys.stderr.isatty())
    results = []
    if n_jobs <= 1:
        for job in jobs:
            results.append(run_one(job))
            bar.update(1)
    else:
        import multiprocessing

        with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for res in pool.map(run_one, jobs):
                results.append(res)
                bar.update(1)
    bar.close()
    return results


# ------------------------------------------------------------------------------ numbers from one run
def max_over_mean(counts: list[float]) -> float:
    return max(counts) / max(sum(counts) / len(counts), 1e-9)


def summarise(run: dict, s: Settings, cfg: ModelConfig) -> dict:
    """End-of-run numbers from the per-step records of the last `window` steps."""
    recs = run["records"][-s.window:]
    n_layers = len(recs[0]["tokens_per_expert"])
    summed = [[sum(r["tokens_per_expert"][i][e] for r in recs) for e in range(cfg.n_routed_experts)]
              for i in range(n_layers)]
    T, K, E = s.batch_size * s.seq_len, cfg.n_activated_experts, cfg.n_routed_experts
    drops = {}
    for cf in CAPACITY_FACTORS:
        cap = expert_capacity(cf, T, K, E)
        drops[f"{cf:g}"] = [sum(sum(max(0.0, c - cap) for c in r["tokens_per_expert"][i]) for r in recs)
                            / (len(recs) * T * K) for i in range(n_layers)]
    return {
        "val_ce": run["val_ce"],
        "max_over_mean_load": [max_over_mean(c) for c in summed],
        "max_over_mean_load_per_step": [sum(r["load_max_over_mean"][i] for r in recs) / len(recs)
                                        for i in range(n_layers)],
        "dropped_fraction": drops,
        "router_entropy_bits": [sum(r["router_entropy"][i] for r in recs) / len(recs) for i in range(n_layers)],
        "load_share": [[c * E / max(sum(row), 1e-9) for c in row] for row in summed],
        "load_share_last_step": [[c * E / max(sum(row), 1e-9) for c in row] for row in recs[-1]["tokens_per_expert"]],
    }


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def aggregate(per_seed: list[dict]) -> dict:
    """Mean over seeds of every number (lists element-wise), the per-seed values beside."""
    first = per_seed[0]
    out: dict = {"seeds": len(per_seed), "val_ce": mean([p["val_ce"] for p in per_seed]),
                 "val_ce_per_seed": [p["val_ce"] for p in per_seed]}
    for key in ("max_over_mean_load", "max_over_mean_load_per_step", "router_entropy_bits"):
        out[key] = [mean([p[key][i] for p in per_seed]) for i in range(len(first[key]))]
    out["max_over_mean_load_worst_layer_per_seed"] = [max(p["max_over_mean_load"]) for p in per_seed]
    out["dropped_fraction"] = {cf: mean([mean(p["dropped_fraction"][cf]) for p in per_seed])
                               for cf in first["dropped_fraction"]}
    out["load_share"] = first["load_share"]  # seed 0: the heatmap
    out["load_share_last_step"] = first["load_share_last_step"]
    return out


def balanced_floor(T: int, K: int, E: int, trials: int = 200, seed: int = 0) -> float:
    """Mean max/mean load of a perfectly balanced random router (K distinct experts per token)
    over T tokens: what sampling noise alone shows, the floor for a per-step number."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(trials, E)
    for t in range(trials):
        picks = torch.rand(T, E, generator=g).topk(K, dim=-1).indices
        counts[t] = torch.bincount(picks.flatten(), minlength=E).float()
    return float((counts.max(1).values / counts.mean(1)).mean())


# ------------------------------------------------------------------------------ specialisation
@torch.no_grad()
def route(model: Transformer, split, starts_B: torch.Tensor, seq_len: int, batch: int = 16):
    """Route the windows at starts_B: per main-model MoE layer (experts_TK, weights_TK) of every
    token, with the tokens (bytes) and their domain ids, in window order."""
    model.eval()
    layers = moe_layers(model)
    captured: list[list] = [[] for _ in layers]
    hooks = [m.router.register_forward_hook(lambda mod, inp, out, i=i: captured[i].append(out))
             for i, m in enumerate(layers)]
    doms, toks = [], []
    try:
        for starts in starts_B.split(batch):
            x, _ = windows(split, starts, seq_len)
            model(x)
            doms.append(domain_ids(split, starts, seq_len).flatten())
            toks.append(x.flatten())
    finally:
        for h in hooks:
            h.remove()
        reset_routing_stats(model)
    routed = [(torch.cat([r.experts_TK for r in c]), torch.cat([r.weights_TK for r in c])) for c in captured if c]
    return routed, torch.cat(toks), torch.cat(doms)


def mutual_information_bits(domain_T: torch.Tensor, experts_TK: torch.Tensor) -> tuple[float, float]:
    """I(domain; set of chosen experts) in bits, and its maximum H(domain)."""
    _, set_T = torch.unique(experts_TK.sort(dim=1).values, dim=0, return_inverse=True)
    n_d, n_s = int(domain_T.max()) + 1, int(set_T.max()) + 1
    joint = torch.zeros(n_d, n_s, dtype=torch.float64).index_put_(
        (domain_T, set_T), torch.ones(domain_T.numel(), dtype=torch.float64), accumulate=True)
    p = joint / joint.sum()
    p_d, p_s = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = float((p[nz] * (p[nz] / (p_d * p_s)[nz]).log2()).sum())
    h_d = float(-(p_d[p_d > 0] * p_d[p_d > 0].log2()).sum())
    return max(mi, 0.0), h_d


BYTE_CLASSES = ("space", "newline", "letter", "digit", "other")


def byte_classes(tokens_T: torch.Tensor) -> torch.Tensor:
    """class_T: index into BYTE_CLASSES of every byte (non-ASCII bytes count as letters)."""
    t = tokens_T
    letter = ((t >= 65) & (t <= 90)) | ((t >= 97) & (t <= 122)) | (t >= 128)
    digit = (t >= 48) & (t <= 57)
    out = torch.full_like(t, 4)
    for cls, mask in ((2, letter), (3, digit), (1, t == 10), (0, (t == 32) | (t == 9))):
        out[mask] = cls
    return out


def domain_usage(domain_T: torch.Tensor, experts_TK: torch.Tensor, domains: tuple[str, ...], E: int) -> dict:
    """domain -> share of its assignments on each expert, times E (1 = fair share)."""
    out = {}
    K = experts_TK.shape[1]
    for d, name in enumerate(domains):
        picked = experts_TK[domain_T == d].flatten()
        counts = torch.bincount(picked, minlength=E).double()
        out[name] = (counts * E / max(float(counts.sum()), 1.0)).tolist()
        assert counts.sum() == K * int((domain_T == d).sum())
    return out


def boundary_window(split, seq_len: int, per_side: int = 2) -> int:
    """Start of 2 * per_side windows of validation bytes centred on the first switch of domain
    with per_side full windows of plain ASCII on each side (else the split's start)."""
    spans = domain_spans(split)
    n = per_side * seq_len
    for (a, b, d), (_, d_end, d2) in zip(spans, spans[1:]):
        start = b - n
        if d != d2 and start >= a and b + n <= d_end:
            chunk = split.tokens_N[start:b + n]
            if bool((chunk < 128).all()):
                return start
    return 0


def routing_picture(model: Transformer, split, seq_len: int, layer: int) -> tuple[str, list[int]]:
    """Text of four windows around a domain switch and each byte's top expert (largest weight) in
    `layer`; each window is routed with its own context, as in training."""
    start = boundary_window(split, seq_len)
    routed, toks, _ = route(model, split, start + seq_len * torch.arange(4), seq_len)
    experts_TK, weights_TK = routed[layer]
    top = experts_TK.gather(1, weights_TK.argmax(dim=1, keepdim=True)).squeeze(1)
    text = "".join(chr(b) if b < 128 else "?" for b in toks.tolist())
    return text, top.tolist()


def specialisation(model: Transformer, corpus, s: Settings) -> dict:
    cfg = model.cfg
    routed, toks, dom = route(model, corpus.val, eval_starts(corpus.val, s.seq_len, s.eval_windows), s.seq_len)
    cls = byte_classes(toks)
    layers = []
    for experts_TK, _ in routed:
        mi, h_d = mutual_information_bits(dom, experts_TK)
        mi_c, h_c = mutual_information_bits(cls, experts_TK)
        counts = torch.bincount(experts_TK.flatten(), minlength=cfg.n_routed_experts).tolist()
        # batches of batch_size validation windows, as a training step sees them: how much of the
        # per-step imbalance is just which sequences share a batch
        per_batch = experts_TK.view(-1, s.batch_size * s.seq_len * cfg.n_activated_experts)
        batch_loads = [max_over_mean(torch.bincount(b, minlength=cfg.n_routed_experts).tolist()) for b in per_batch]
        layers.append({"mi_bits": mi, "mi_max_bits": h_d, "byte_class_mi_bits": mi_c, "byte_class_mi_max_bits": h_c,
                       "max_over_mean_load_val": max_over_mean(counts),
                       "max_over_mean_load_val_per_batch": mean(batch_loads),
                       "usage_by_domain": domain_usage(dom, experts_TK, corpus.domains, cfg.n_routed_experts)})
    return {"layers": layers, "domains": list(corpus.domains),
            "domain_share": [float((dom == d).double().mean()) for d in range(len(corpus.domains))]}


def untrained_mi(cfg: ModelConfig, corpus, s: Settings, seed: int = 0) -> dict[str, list[float]]:
    """The same mutual informations for the model at init: what the router knows before training."""
    torch.manual_seed(seed)
    routed, toks, dom = route(Transformer(cfg), corpus.val, eval_starts(corpus.val, s.seq_len, s.eval_windows),
                              s.seq_len)
    return {"domain": [mutual_information_bits(dom, e)[0] for e, _ in routed],
            "byte_class": [mutual_information_bits(byte_classes(toks), e)[0] for e, _ in routed]}


# ------------------------------------------------------------------------------ report
def _nums(values: list[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def table(res: dict, modes: list[str], window: int) -> str:
    cfs = [f"{cf:g}" for cf in CAPACITY_FACTORS]
    head = ("| mode | val CE (nats/byte) | max/mean load per layer, last "
            f"{window} steps | per step | dropped at cf {' / '.join(cfs)} | router entropy (bits) |")
    lines = [head, "|" + "---|" * 6]
    for m in modes:
        r = res[m]
        ce = f"{r['val_ce']:.3f}"
        if r["seeds"] > 1:
            ce += f" ({', '.join(f'{v:.3f}' for v in r['val_ce_per_seed'])})"
        cells = [ce, _nums(r["max_over_mean_load"]), _nums(r["max_over_mean_load_per_step"]),
                 " / ".join(f"{100 * r['dropped_fraction'][cf]:.1f}%" for cf in cfs), _nums(r["router_entropy_bits"])]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=out_folder, default="runs/balancing", help="output folder")
    ap.add_argument("--quick", action="store_true", help="a few steps of every run, one seed (CI)")
    ap.add_argument("--steps", type=positive_int, default=None,
                    help=f"optimizer steps per run (default {Settings.steps})")
    ap.add_argument("--seeds", type=positive_int, default=None,
                    help=f"seeds per compared mode (default {Settings.seeds})")
    ap.add_argument("--jobs", type=positive_int, default=1,
                    help="runs trained in parallel, one thread each (default 1)")
    ap.add_argument("--reuse", action="store_true",
                    help="do not retrain runs already finished in OUT/runs with the same configs (re-analyse)")
    args = ap.parse_args(argv)
    s = dataclasses.replace(QUICK if args.quick else Settings(), jobs=args.jobs, reuse=args.reuse)
    if args.steps is not None:
        s = dataclasses.replace(s, steps=args.steps, window=min(s.window, max(1, args.steps // 4)))
    if args.seeds is not None:
        s = dataclasses.replace(s, seeds=args.seeds)
    os.makedirs(args.out, exist_ok=True)
    corpus = load_corpus(None, s.seq_len)
    base = PRESETS["toy"]
    names = moe_layer_names(base)

    jobs = [make_job("compare", m, seed, s, args.out, {}, {}) for m in COMPARE for seed in range(s.seeds)]
    jobs += [make_job("collapse", m, 0, s, args.out, COLLAPSE_MODEL, COLLAPSE_TRAIN) for m in COLLAPSE]
    runs = run_all(jobs, s.jobs)

    res: dict = {"settings": {**dataclasses.asdict(s), "modes": {m: MODES[m] for m in COMPARE},
                              "preset": "toy", "collapse_setting": COLLAPSE_NAME,
                              "collapse_model": COLLAPSE_MODEL, "collapse_train": COLLAPSE_TRAIN}}
    by = {(r["part"], r["mode"], r["seed"]): r for r in runs}
    for m in COMPARE:
        cfg = base.replace(**mode_fields(m))
        res[m] = aggregate([summarise(by["compare", m, seed], s, cfg) for seed in range(s.seeds)])
    T = s.batch_size * s.seq_len
    res["settings"]["balanced_floor_per_step"] = balanced_floor(T, base.n_activated_experts, base.n_routed_experts)
    res["settings"]["balanced_floor_window"] = balanced_floor(T * s.window, base.n_activated_experts,
                                                              base.n_routed_experts, trials=50)
    coll_cfg = base.replace(**COLLAPSE_MODEL)
    res["collapse"] = {m: summarise(by["collapse", m, 0], s, coll_cfg.replace(**mode_fields(m))) for m in COLLAPSE}

    # specialisation: every compared mode's seed-0 model, the figures for SPECIALISE
    res["specialisation"] = {"untrained_mi_bits": untrained_mi(base.replace(**mode_fields(SPECIALISE)), corpus, s)}
    models = {m: load_model(by["compare", m, 0]["out"], device="cpu")[0] for m in COMPARE}
    for m, model in models.items():
        res["specialisation"][m] = specialisation(model, corpus, s)
    spec = res["specialisation"][SPECIALISE]
    best = max(range(len(spec["layers"])), key=lambda i: spec["layers"][i]["mi_bits"])
    text, top = routing_picture(models[SPECIALISE], corpus.val, s.seq_len, best)
    res["specialisation"]["picture"] = {"mode": SPECIALISE, "layer": names[best], "text": text, "top_expert": top}

    files = draw(res, by, s, names, best, args.out)
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(res, indent=1) + "\n")
    md = report(res, s)
    atomic_write_text(os.path.join(args.out, "table.md"), md + "\n")
    print(md)
    print("wrote", ", ".join(files + [os.path.join(args.out, f) for f in ("results.json", "table.md")]))
    return 0


def report(res: dict, s: Settings) -> str:
    parts = [f"Balancing modes on the toy preset: {s.steps} steps, batch {s.batch_size} x {s.seq_len}, "
             f"{s.seeds} seed(s) each; loads over the last {s.window} steps (balanced-router noise: "
             f"{res['settings']['balanced_floor_window']:.3f} over that window, "
             f"{res['settings']['balanced_floor_per_step']:.3f} per step)", "", table(res, COMPARE, s.window), "",
             f"Collapse setting ({COLLAPSE_NAME}), seed 0:", "",
             f"| mode | val CE | max/mean load per layer, last {s.window} steps | per step | dropped at cf 1 / 1.25 |",
             "|---|---|---|---|---|"]
    for m, r in res["collapse"].items():
        drops = " / ".join(f"{100 * mean(r['dropped_fraction'][f'{cf:g}']):.1f}%" for cf in CAPACITY_FACTORS)
        parts.append(f"| {m} | {r['val_ce']:.3f} | {_nums(r['max_over_mean_load'])} | "
                     f"{_nums(r['max_over_mean_load_per_step'])} | {drops} |")
    sp = res["specialisation"]
    first = sp[SPECIALISE]["layers"][0]
    parts += ["", "Specialisation on the validation split, seed 0: mutual information of the chosen experts (the "
              "set of K) with the byte's domain (prose/code) and with its byte class "
              f"({'/'.join(BYTE_CLASSES)}), bits per layer", "",
              f"| mode | I(domain; experts), max {first['mi_max_bits']:.3f} | I(byte class; experts), max "
              f"{first['byte_class_mi_max_bits']:.3f} | max/mean load on validation: all | per batch of "
              f"{s.batch_size} windows |", "|---|---|---|---|---|",
              f"| untrained | {_nums(sp['untrained_mi_bits']['domain'], 3)} | "
              f"{_nums(sp['untrained_mi_bits']['byte_class'], 3)} | | |"]
    for m in COMPARE:
        layers = sp[m]["layers"]
        cells = [_nums([x["mi_bits"] for x in layers], 3), _nums([x["byte_class_mi_bits"] for x in layers], 3),
                 _nums([x["max_over_mean_load_val"] for x in layers]),
                 _nums([x["max_over_mean_load_val_per_batch"] for x in layers])]
        parts.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(parts)


def draw(res: dict, by: dict, s: Settings, names: list[str], best: int, out: str) -> list[str]:
    path = lambda name: os.path.join(out, name)
    curves = {m: [r["load_max_over_mean"] for r in by["compare", m, 0]["records"]] for m in COMPARE}
    files = [plots.save(plots.plot_load_curves(curves, names, res["settings"]["balanced_floor_per_step"],
                                               "max/mean load per layer over training (seed 0)"),
                        path("balancing_load.png"), DPI),
             plots.save(plots.plot_load_heatmaps({m: res[m]["load_share"] for m in COMPARE}, names,
                                                 f"Expert load over the last {s.window} steps (x E; 1 = fair "
                                                 "share), seed 0"), path("balancing_heatmap.png"), DPI)]
    bias = [r["bias"] for r in by["compare", "aux_free", 0]["records"]]
    files.append(plots.save(plots.plot_bias_trajectories(bias, names, "aux_free: each expert's bias over training "
                                                         "(seed 0)"), path("balancing_bias.png"), DPI))
    worst = {m: [max(r["load_max_over_mean"]) for r in by["collapse", m, 0]["records"]] for m in COLLAPSE}
    files.append(plots.save(plots.plot_collapse(worst, {m: res["collapse"][m]["load_share_last_step"]
                                                       for m in COLLAPSE}, COLLAPSE_NAME, names),
                            path("balancing_collapse.png"), DPI))
    sp = res["specialisation"][SPECIALISE]
    files.append(plots.save(plots.plot_domain_usage([x["usage_by_domain"] for x in sp["layers"]],
                                                    [x["mi_bits"] for x in sp["layers"]],
                                                    sp["layers"][0]["mi_max_bits"], names,
                                                    f"{SPECIALISE}: expert usage by domain (validation)"),
                            path("balancing_domains.png"), DPI))
    pic = res["specialisation"]["picture"]
    title = f"{pic['mode']} model, {pic['layer']}: each byte coloured by its top expert (validation text)"
    E = PRESETS["toy"].n_routed_experts
    files.append(plots.save(plots.plot_routing_text(pic["text"], pic["top_expert"], E, title),
                            path("balancing_routing.png"), DPI))
    atomic_write_text(path("balancing_routing.html"), plots.routing_html(pic["text"], pic["top_expert"], E, title))
    files.append(path("balancing_routing.html"))
    return files


if __name__ == "__main__":
    sys.exit(main())
