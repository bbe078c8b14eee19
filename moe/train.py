"""Training: AdamW, warmup + cosine, clipping, accumulation, eval, checkpoints, exact resume.

Shapes: B batch, S sequence, V vocabulary.

One optimizer step:
  for each of grad_accum micro-batches: forward, loss / grad_accum, backward
  clip the gradient norm, AdamW step
  read the routing counts (logging), moe.balance.update_bias (aux-loss-free), reset the counts
The counts are reset after every step (and after every eval), so the bias only ever sees
training tokens of the step it follows.

A run folder OUT holds:
  metrics.jsonl        one JSON object per optimizer step (val_* keys on eval steps)
  LATEST               the name of the newest complete checkpoint folder
  ckpt-00000500/       model.safetensors, config.json, train.json, state.pt, manifest.json
  plots/               loss.png, expert_load.png (written at the end of a run)
A checkpoint is written into a temporary folder, renamed into place, and only then named in
LATEST (itself replaced atomically): a crash at any moment leaves the previous one loadable.
Batches are a pure function of (seed, step), so resuming at step n continues bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.accounting import count_params
from moe.balance import update_bias
from moe.cli import non_negative_float, non_negative_int, positive_float, positive_int
from moe.config import PRESETS, ModelConfig, atomic_write_text, get_preset, parse_overrides, with_umask
from moe.data import Corpus, domain_ids, eval_starts, get_batch, load_corpus, unigram_loss, windows
from moe.layer import reset_routing_stats, routing_stats
from moe.model import Transformer

LN2 = math.log(2.0)
CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class TrainConfig:
    out: str = "runs/train"  # run folder: metrics, checkpoints, plots
    steps: int = 1000  # optimizer steps in the run (also the length of the cosine schedule)
    batch_size: int = 4  # sequences per micro-batch (small batches, many steps: best on a CPU budget)
    seq_len: int = 128  # tokens per sequence (<= the model's max_seq_len)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3  # peak learning rate, reached after warmup
    min_lr: float = 2e-4  # the cosine decays to this
    warmup_steps: int = 30  # linear warmup from lr/warmup_steps
    weight_decay: float = 0.1  # AdamW decay, on matrices only (not norms, not biases)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm (0 = no clipping)
    eval_interval: int = 100  # steps between validation evals (0 = only at the end)
    eval_windows: int = 64  # fixed validation windows of seq_len per eval
    save_interval: int | None = None  # steps between checkpoints (None = eval_interval; 0 = end only)
    seed: int = 0  # model init and batch order
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # CPU intra-op threads (None = torch's default, one per core)
    data: str | None = None  # a UTF-8 text file (None = the embedded prose + code corpus)
    stop_at: int | None = None  # stop early (with a checkpoint) after this step; --resume goes on
    progress: bool = True  # tqdm progress bar
    plots: bool = True  # write OUT/plots at the end
    overwrite: bool = False  # start afresh in an OUT that already holds a run

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_windows"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_interval", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.save_interval is not None and (not isinstance(self.save_interval, int) or self.save_interval < 0):
            raise ValueError(f"save_interval must be an integer >= 0 or None, got {self.save_interval!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads <= 0):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.stop_at is not None and (not isinstance(self.stop_at, int) or self.stop_at <= 0):
            raise ValueError(f"stop_at must be a positive integer or None, got {self.stop_at!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must be a number in [0, lr={self.lr}], got {self.min_lr!r}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    model: Transformer
    out: str
    step: int  # optimizer steps completed
    checkpoint: str | None  # folder of the last checkpoint written
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics record
    val_loss: float | None = None  # nats per byte (token), last evaluation
    unigram_loss: float | None = None  # nats per byte of the train-frequency baseline on val
    stopped_early: bool = False  # stop_at or Ctrl-C: --resume continues
    interrupted: bool = False  # Ctrl-C (SIGINT) ended the run, after a checkpoint


# ------------------------------------------------------------------------------ small pieces
def resolve_device(name: str = "auto") -> torch.device:
    """cuda if available, else cpu; an explicit request that cannot be met is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 matmuls are slow on many CPUs)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (>= 2 dims) only: decaying norm gains only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2))


@torch.no_grad()
def evaluate(model: Transformer, corpus: Corpus, seq_len: int, n_windows: int, batch_size: int,
             device: torch.device) -> dict[str, float]:
    """Mean next-byte cross entropy (nats) on fixed validation windows, overall and per domain."""
    was_training = model.training
    model.eval()
    split = corpus.val
    n_dom = len(corpus.domains)
    loss_sum, count = torch.zeros(n_dom, dtype=torch.float64), torch.zeros(n_dom, dtype=torch.float64)
    for starts_B in eval_starts(split, seq_len, n_windows).split(batch_size):
        x_BS, y_BS = windows(split, starts_B, seq_len)
        dom_BS = domain_ids(split, starts_B + 1, seq_len)  # the domain of each target byte
        with autocast(device):
            logits_BSV = model(x_BS.to(device))[0]
        ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.to(device).flatten(), reduction="none")
        loss_sum.index_add_(0, dom_BS.flatten(), ce.double().cpu())
        count.index_add_(0, dom_BS.flatten(), torch.ones_like(ce, dtype=torch.float64).cpu())
    reset_routing_stats(model)  # eval tokens must not steer the balancing bias
    model.train(was_training)
    out = {"val_loss": float(loss_sum.sum() / count.sum())}
    if n_dom > 1:
        for d, name in enumerate(corpus.domains):
            if count[d] > 0:
                out[f"val_loss_{name}"] = float(loss_sum[d] / count[d])
    return out


# ------------------------------------------------------------------------------ checkpoints
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with shared tensors stored once (tied embeddings), plus alias -> owner.

    safetensors refuses two names for one storage; the alias map restores them on load.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def _checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def latest_checkpoint(out: str) -> str | None:
    """The folder named in OUT/LATEST, or None when OUT holds no checkpoint."""
    latest = os.path.join(out, "LATEST")
    if not os.path.isfile(latest):
        return None
    with open(latest, encoding="utf-8") as f:
        return os.path.join(out, f.read().strip())


def save_checkpoint(out: str, model: Transformer, optimizer: torch.optim.Optimizer, step: int,
                    tc: TrainConfig, extra: dict[str, Any]) -> str:
    """Write OUT/ckpt-<step> atomically, point LATEST at it, then delete the older ones."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    name = _checkpoint_name(step)
    final = os.path.join(out, name)
    if latest_checkpoint(out) == final and os.path.isdir(final):
        return final  # this step is already saved (the state cannot have changed since)
    if os.path.exists(final):
        shutil.rmtree(final)  # a leftover of a crash between rename and LATEST: never referenced
    tmp = tempfile.mkdtemp(dir=out, prefix=".tmp-ckpt-")
    os.chmod(tmp, with_umask(0o777))  # mkdtemp makes it private; a checkpoint is an ordinary folder
    try:
        tensors, aliases = _unique_tensors(model)
        save_file(tensors, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": f"moe-{CHECKPOINT_FORMAT}", "aliases": json.dumps(aliases)})
        atomic_write_text(os.path.join(tmp, "config.json"), model.cfg.to_json() + "\n")
        atomic_write_text(os.path.join(tmp, "train.json"), json.dumps(dataclasses.asdict(tc), indent=2) + "\n")
        state = {"format": CHECKPOINT_FORMAT, "step": step, "optimizer": optimizer.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                 **extra}
        torch.save(state, os.path.join(tmp, "state.pt"))
        names = ("model.safetensors", "config.json", "train.json", "state.pt")
        for f in names:
            os.chmod(os.path.join(tmp, f), with_umask(0o666))
        files = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))}
                 for f in names}
        atomic_write_text(os.path.join(tmp, "manifest.json"),
                          json.dumps({"format": CHECKPOINT_FORMAT, "step": step, "files": files}, indent=2) + "\n")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(os.path.join(out, "LATEST"), name + "\n")
    for entry in os.listdir(out):
        if entry.startswith("ckpt-") and entry != name:
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: str  # the ckpt-<step> folder
    config: ModelConfig
    step: int
    tensors: dict[str, torch.Tensor]  # weights and persistent buffers (router bias), on CPU
    aliases: dict[str, str]  # tied names -> the stored name
    state: dict[str, Any]  # optimizer, rng, data position, elapsed time
    train_config: dict[str, Any]


def resolve_checkpoint(path: str) -> str:
    """A run folder (via its LATEST) or a ckpt-* folder itself -> the checkpoint folder."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"run folder not found: {path}")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path} (no LATEST file): train one first with "
                                f"python -m moe train --out {path}")
    if not os.path.isdir(latest):
        raise FileNotFoundError(f"{os.path.join(path, 'LATEST')} names {os.path.basename(latest)}, "
                                "which is missing")
    return latest


def load_checkpoint(path: str, expect_config: ModelConfig | None = None) -> Checkpoint:
    """Read and verify a checkpoint (sizes and sha256 of every file) before trusting any of it."""
    from safetensors import safe_open

    folder = resolve_checkpoint(path)
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"checkpoint {folder} has no manifest.json")
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"checkpoint file {manifest_path} is corrupt (not a valid manifest)") from None
    for fname, info in files.items():
        fpath = os.path.join(folder, fname)
        if not os.path.isfile(fpath):
            raise FileNotFoundError(f"checkpoint file missing: {fpath}")
        if os.path.getsize(fpath) != info["bytes"] or _sha256(fpath) != info["sha256"]:
            raise ValueError(f"checkpoint file {fpath} is corrupt (size or sha256 differs from manifest.json)")
    try:
        config = ModelConfig.load(os.path.join(folder, "config.json"))
    except ValueError as e:
        raise ValueError(f"checkpoint config {os.path.join(folder, 'config.json')} is invalid: {e}") from None
    if expect_config is not None and expect_config != config:
        raise ValueError(f"checkpoint {folder} was trained with a different model config: "
                         f"{config_diff(config, expect_config)}")
    weights = os.path.join(folder, "model.safetensors")
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        aliases = json.loads(meta.get("aliases", "{}"))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"checkpoint file {weights} is corrupt: {e}") from None
    try:
        state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, "train.json"), encoding="utf-8") as f:
            train_config = json.load(f)
    except Exception as e:
        raise ValueError(f"checkpoint state in {folder} is corrupt: {e}") from None
    return Checkpoint(folder, config, int(state["step"]), tensors, aliases, state, train_config)


def config_diff(found: ModelConfig, expected: ModelConfig) -> str:
    a, b = found.to_dict(), expected.to_dict()
    return "; ".join(f"{k}: checkpoint {a[k]!r}, requested {b[k]!r}" for k in a if a[k] != b[k])


def load_weights(model: Transformer, ckpt: Checkpoint) -> None:
    """Copy checkpoint tensors into the model, naming any missing, extra or misshapen tensor."""
    tensors = dict(ckpt.tensors)
    for alias, owner in ckpt.aliases.items():
        if owner in tensors:
            tensors[alias] = tensors[owner]
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = [f"missing tensors {missing}"] * bool(missing) + [f"unexpected tensors {extra}"] * bool(extra)
        parts += [f"shape mismatch {s}" for s in shapes]
        raise ValueError(f"checkpoint {ckpt.path} does not match the model config: " + "; ".join(parts))
    model.load_state_dict(tensors, strict=True)


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[Transformer, Checkpoint]:
    """A trained model from a run folder (or a ckpt-* folder), in eval mode, on device."""
    ckpt = load_checkpoint(path)
    model = Transformer(ckpt.config)
    load_weights(model, ckpt)
    device = resolve_device(device) if isinstance(device, str) else device
    return model.to(device).eval(), ckpt


# ------------------------------------------------------------------------------ metrics
def read_metrics(out: str) -> list[dict[str, Any]]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                with contextlib.suppress(json.JSONDecodeError):  # a torn last line after a crash
                    records.append(json.loads(line))
    return records


def _clean(v: Any) -> Any:
    """Floats rounded for a readable log; NaN/inf as strings (JSON has no literal for them)."""
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else str(v)
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (and save); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():  # signals only work there
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ------------------------------------------------------------------------------ the loop
def train(tc: TrainConfig, model_cfg: ModelConfig | None = None, resume: bool = False) -> TrainResult:
    """Train (or, with resume=True, continue the run in tc.out) and return the final state.

    Raises TrainingDiverged on a NaN/inf loss, leaving the last checkpoint in place.
    """
    tc.validate()
    threads = torch.get_num_threads()
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)
    try:
        return _train(tc, model_cfg, resume)
    finally:
        torch.set_num_threads(threads)


def _train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: bool) -> TrainResult:
    from tqdm.auto import tqdm

    device = resolve_device(tc.device)
    out = tc.out
    ckpt = None
    if resume:
        ckpt = load_checkpoint(out, expect_config=model_cfg)
        model_cfg = ckpt.config
    else:
        model_cfg = model_cfg or PRESETS["toy"]
        existing = latest_checkpoint(out) if os.path.isdir(out) else None
        if existing is not None and not tc.overwrite:
            raise ValueError(f"{out} already holds a run ({os.path.basename(existing)}); continue it with "
                             f"--resume {out}, start over with --overwrite, or pick another --out")
        if tc.overwrite and os.path.isdir(out):
            _clear_run(out)
    if tc.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    corpus = load_corpus(tc.data, tc.seq_len)
    unigram = unigram_loss(corpus)

    torch.manual_seed(tc.seed)
    model = Transformer(model_cfg)
    start_step, elapsed, tokens_seen = 0, 0.0, 0
    if ckpt is not None:
        load_weights(model, ckpt)
    model.to(device).train()
    optimizer = build_optimizer(model, tc)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt.state["optimizer"])
        torch.set_rng_state(ckpt.state["rng"]["torch"])
        if device.type == "cuda" and ckpt.state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt.state["rng"]["cuda"])
        start_step = ckpt.step
        elapsed = float(ckpt.state.get("elapsed_s", 0.0))
        tokens_seen = int(ckpt.state.get("tokens", 0))
        if ckpt.state.get("data", {}).get("fingerprint") != corpus.fingerprint():
            print(f"warning: resuming {out} on different training data than it started with", file=sys.stderr)
    os.makedirs(out, exist_ok=True)
    _truncate_metrics(out, start_step)

    end_step = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    if end_step <= start_step:
        raise ValueError(f"{out} is already at step {start_step}: pass --steps larger than {start_step} "
                         "to train further")
    save_every = tc.eval_interval if tc.save_interval is None else tc.save_interval
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum
    params = [p for p in model.parameters() if p.requires_grad]
    last_ckpt = ckpt.path if ckpt is not None else None
    last: dict[str, Any] = {}
    val_loss: float | None = None
    step = start_step
    interrupted = False

    def checkpoint() -> str:
        extra = {"elapsed_s": elapsed, "tokens": tokens_seen,
                 "data": {"fingerprint": corpus.fingerprint(), "seed": tc.seed, "next_step": step}}
        return save_checkpoint(out, model, optimizer, step, tc, extra)

    bar = tqdm(total=tc.steps, initial=start_step, disable=not tc.progress, unit="step", dynamic_ncols=True,
               desc=f"train {os.path.basename(os.path.normpath(out))}")
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
    try:
        with _StopFlag() as stop:
            while step < end_step:
                t0 = time.perf_counter()
                lr = lr_at(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                terms: dict[str, float] = {}
                for micro in range(tc.grad_accum):
                    x_BS, y_BS = get_batch(corpus.train, tc.batch_size, tc.seq_len, tc.seed, step, micro)
                    with autocast(device):
                        _, losses = model(x_BS.to(device), y_BS.to(device))
                    loss = losses["loss"]
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingDiverged(_diverged_message("loss", value, step + 1, last_ckpt))
                    (loss / tc.grad_accum).backward()
                    for k, v in losses.items():
                        terms[k] = terms.get(k, 0.0) + float(v.detach()) / tc.grad_accum
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or float("inf")))
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(_diverged_message("gradient norm", grad_norm, step + 1, last_ckpt))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats = routing_stats(model)  # counts of this step's micro-batches
                update_bias(model)
                reset_routing_stats(model)
                step += 1
                dt = time.perf_counter() - t0
                elapsed += dt
                tokens_seen += tokens_per_step
                record: dict[str, Any] = {"step": step, **terms, "lr": lr, "grad_norm": grad_norm,
                                          "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                                          "elapsed_s": elapsed,
                                          "load_max_over_mean": stats["max_over_mean_load"]}
                if model_cfg.capacity_factor is not None:
                    record["dropped"] = stats["dropped"]
                is_last = step == end_step or stop.requested
                if is_last or (tc.eval_interval and step % tc.eval_interval == 0):
                    record["tokens_per_expert"] = stats["tokens_per_expert"]
                    # no activations are kept for backward, so 4x the training batch fits
                    record.update(evaluate(model, corpus, tc.seq_len, tc.eval_windows, 4 * tc.batch_size, device))
                    record["unigram_loss"] = unigram
                    val_loss = record["val_loss"]
                    bar.write(_eval_line(record, unigram))
                metrics_file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
                metrics_file.flush()
                last = record
                bar.update(1)
                postfix = {"loss": f"{terms['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if val_loss is not None:
                    postfix["val"] = f"{val_loss:.3f}"
                bar.set_postfix(postfix, refresh=False)
                if is_last or (save_every and step % save_every == 0):
                    last_ckpt = checkpoint()
                if stop.requested:
                    interrupted = True
                    bar.write(f"interrupted: checkpoint saved at step {step}; continue with "
                              f"python -m moe train --resume {out}")
                    break
    finally:
        bar.close()
        metrics_file.close()
    if tc.plots and step > start_step:
        write_plots(out)
    return TrainResult(model, out, step, last_ckpt, last, val_loss, unigram, stopped_early=step < tc.steps,
                       interrupted=interrupted)


def _diverged_message(what: str, value: float, step: int, last_ckpt: str | None) -> str:
    where = f"the last good checkpoint is kept in {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
    return (f"{what} became {value} at step {step}: training stopped; {where}. "
            "Try a lower --lr, a smaller --grad-clip, or more --warmup.")


def _eval_line(record: dict[str, Any], unigram: float) -> str:
    parts = [f"step {record['step']}: val {record['val_loss']:.3f} nats/byte "
             f"({record['val_loss'] / LN2:.2f} bits)"]
    per = [f"{k[len('val_loss_'):]} {v:.3f}" for k, v in record.items() if k.startswith("val_loss_")]
    if per:
        parts.append("(" + ", ".join(per) + ")")
    parts.append(f"| unigram baseline {unigram:.3f} ({unigram / LN2:.2f} bits)")
    return " ".join(parts)


def _truncate_metrics(out: str, step: int) -> None:
    """Drop records past the checkpoint we resume from (logged after its last save)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = [r for r in read_metrics(out) if isinstance(r.get("step"), int) and r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def _clear_run(out: str) -> None:
    for entry in os.listdir(out):
        p = os.path.join(out, entry)
        if entry.startswith(("ckpt-", ".tmp-ckpt-")) and os.path.isdir(p):
            shutil.rmtree(p)
        elif entry in ("LATEST", "metrics.jsonl"):
            os.unlink(p)


def moe_layer_names(cfg: ModelConfig) -> list[str]:
    """Labels of the MoE layers in the order routing_stats lists them: blocks, then MTP blocks."""
    names = [f"block {i}" for i in range(cfg.n_dense_layers, cfg.n_layers)]
    if cfg.n_moe_layers:
        names += [f"MTP {k}" for k in range(1, cfg.n_mtp + 1)]
    return names


def write_plots(out: str) -> list[str]:
    """Loss curves and expert load from OUT/metrics.jsonl into OUT/plots; returns the paths."""
    from moe import plots

    records = read_metrics(out)
    if not records:
        return []
    latest = latest_checkpoint(out)
    names = None
    if latest and os.path.isfile(os.path.join(latest, "config.json")):
        names = moe_layer_names(ModelConfig.load(os.path.join(latest, "config.json")))
    baseline = next((r["unigram_loss"] for r in reversed(records) if "unigram_loss" in r), None)
    paths = [plots.save(plots.plot_training_loss(records, baseline), os.path.join(out, "plots", "loss.png"))]
    if any("load_max_over_mean" in r and r["load_max_over_mean"] for r in records):
        paths.append(plots.save(plots.plot_expert_load(records, names),
                                os.path.join(out, "plots", "expert_load.png")))
    return paths


# ------------------------------------------------------------------------------ CLI


# CLI flag -> TrainConfig field; flags default to None so a resume keeps the saved value
_TRAIN_FLAGS = {"steps": "steps", "stop_at": "stop_at", "batch_size": "batch_size", "seq_len": "seq_len",
                "grad_accum": "grad_accum", "lr": "lr", "min_lr": "min_lr", "warmup": "warmup_steps",
                "weight_decay": "weight_decay", "grad_clip": "grad_clip", "eval_interval": "eval_interval",
                "eval_windows": "eval_windows", "save_interval": "save_interval", "seed": "seed",
                "device": "device", "threads": "threads", "data": "data"}


def model_config_from_args(args: argparse.Namespace) -> ModelConfig | None:
    """--config FILE or --preset NAME, then --set overrides; None when none of them is given."""
    cfg = None
    if args.config:
        cfg = ModelConfig.load(args.config)
    elif args.preset:
        cfg = get_preset(args.preset)
    if args.set:
        cfg = (cfg or get_preset("toy")).replace(**parse_overrides(args.set))
    return cfg


def run_train(args: argparse.Namespace) -> int:
    cfg = model_config_from_args(args)
    if args.resume:
        if args.out and os.path.normpath(args.out) != os.path.normpath(args.resume):
            raise ValueError(f"--resume {args.resume} continues in its own folder; drop --out {args.out}")
        ckpt = load_checkpoint(args.resume, expect_config=cfg)
        base = TrainConfig.from_dict(ckpt.train_config)
        base = dataclasses.replace(base, out=args.resume, stop_at=None, overwrite=False)
    else:
        base = TrainConfig(out=args.out or "runs/train", overwrite=args.overwrite)
    changes = {f: getattr(args, a) for a, f in _TRAIN_FLAGS.items() if getattr(args, a) is not None}
    if args.no_progress:
        changes["progress"] = False
    if args.no_plots:
        changes["plots"] = False
    tc = dataclasses.replace(base, **changes)
    try:
        result = train(tc, cfg, resume=bool(args.resume))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary_text(result))
    return 130 if result.interrupted else 0  # the shell's code for Ctrl-C: `make` and `&&` stop


def summary_text(result: TrainResult) -> str:
    lines = [f"run folder: {result.out}  (step {result.step}, checkpoint {result.checkpoint})"]
    if "elapsed_s" in result.last:
        t, n = result.last["elapsed_s"], result.last["tokens"]
        lines.append(f"trained {n:,} tokens in {t:.0f} s of steps ({n / max(t, 1e-9):,.0f} tokens/s; "
                     "evals and saves not counted)")
    if result.val_loss is not None and result.unigram_loss is not None:
        v, u = result.val_loss, result.unigram_loss
        lines.append(f"validation loss {v:.3f} nats/byte = {v / LN2:.2f} bits/byte; unigram baseline "
                     f"{u:.3f} nats/byte = {u / LN2:.2f} bits/byte ({abs(1 - v / u) * 100:.0f}% "
                     f"{'below' if v < u else 'ABOVE'} the baseline)")
        per = {k[len("val_loss_"):]: val for k, val in result.last.items() if k.startswith("val_loss_")}
        if per:
            lines.append("per domain: " + ", ".join(f"{k} {val:.3f} nats/byte" for k, val in per.items()))
    if result.stopped_early:
        lines.append(f"stopped early; continue with: python -m moe train --resume {result.out}")
    if os.path.isdir(os.path.join(result.out, "plots")):
        lines.append(f"plots: {os.path.join(result.out, 'plots')}")
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    info = run_info_dict(args.run)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"run: {args.run}")
    print(f"checkpoint: {info['checkpoint']} (step {info['step']})")
    p = info["params"]
    line = f"parameters: total {_human(p['total'])}, active per token {_human(p['active'])}"
    if p.get("mtp"):
        line += f", MTP modules {_human(p['mtp'])}"
    print(line)
    print("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    if info["last_metrics"]:
        m = info["last_metrics"]
        keys = [k for k in ("step", "loss", "ce", "mtp", "val_loss", "tokens", "elapsed_s") if k in m]
        print("last metrics: " + ", ".join(f"{k}={m[k]}" for k in keys))
    if info.get("last_val"):
        lv = info["last_val"]
        print("last eval: " + ", ".join(f"{k}={v}" for k, v in lv.items()))
    return 0


def run_info_dict(run: str) -> dict[str, Any]:
    ckpt = load_checkpoint(run)
    records = read_metrics(run if not os.path.isfile(os.path.join(run, "manifest.json")) else os.path.dirname(run))
    evals = [r for r in records if "val_loss" in r]
    last_val = ({k: v for k, v in evals[-1].items() if k == "step" or k.startswith("val_loss")} if evals else {})
    return {"checkpoint": ckpt.path, "step": ckpt.step, "config": ckpt.config.to_dict(),
            "params": count_params(ckpt.config), "train_config": ckpt.train_config,
            "last_metrics": records[-1] if records else {}, "last_val": last_val}


def _human(n: float) -> str:
    for div, sfx in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{sfx}"
    return str(int(n))


def register(subparsers: argparse._SubParsersAction) -> None:
    d = TrainConfig()  # defaults shown in --help come from the dataclass
    p = subparsers.add_parser(
        "train", help="train a model (default: the toy preset on the embedded prose + code corpus)",
        description="Train with AdamW (warmup + cosine), gradient clipping and accumulation. Writes "
                    "OUT/metrics.jsonl, atomic safetensors checkpoints and OUT/plots. Examples: "
                    "python -m moe train --preset toy --steps 300 --out runs/toy ; "
                    "python -m moe train --resume runs/toy --steps 600")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model preset (default: toy)")
    src.add_argument("--config", metavar="FILE.json", default=None, help="a ModelConfig JSON file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. --set n_mtp=1 (repeatable)")
    p.add_argument("--out", default=None, help=f"run folder (default: {d.out})")
    p.add_argument("--resume", metavar="OUT", default=None,
                   help="continue the run in OUT from its last checkpoint (bit for bit); flags you pass "
                        "override the saved training settings, e.g. a larger --steps")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out already holds a run")
    p.add_argument("--data", metavar="FILE", default=None,
                   help="train on this UTF-8 text file instead of the embedded corpus")
    p.add_argument("--steps", type=positive_int, default=None, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--stop-at", type=positive_int, default=None,
                   help="stop after this step with a checkpoint (the schedule still spans --steps)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"sequences per micro-batch (default: {d.batch_size})")
    p.add_argument("--seq-len", type=positive_int, default=None, help=f"tokens per sequence (default: {d.seq_len})")
    p.add_argument("--grad-accum", type=positive_int, default=None,
                   help=f"micro-batches per step (default: {d.grad_accum})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"peak learning rate (default: {d.lr:g})")
    p.add_argument("--min-lr", type=non_negative_float, default=None,
                   help=f"final learning rate (default: {d.min_lr:g})")
    p.add_argument("--warmup", type=non_negative_int, default=None, help=f"warmup steps (default: {d.warmup_steps})")
    p.add_argument("--weight-decay", type=non_negative_float, default=None,
                   help=f"AdamW decay (default: {d.weight_decay:g})")
    p.add_argument("--grad-clip", type=non_negative_float, default=None,
                   help=f"max gradient norm, 0 = off (default: {d.grad_clip:g})")
    p.add_argument("--eval-interval", type=non_negative_int, default=None,
                   help=f"steps between validation evals, 0 = at the end only (default: {d.eval_interval})")
    p.add_argument("--eval-windows", type=positive_int, default=None,
                   help=f"validation windows per eval (default: {d.eval_windows})")
    p.add_argument("--save-interval", type=non_negative_int, default=None,
                   help="steps between checkpoints, 0 = at the end only (default: the eval interval)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help=f"init and batch-order seed (default: {d.seed})")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto = cuda if available)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: one per core). Small models on a busy machine "
                        "often run faster with 1")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--no-plots", action="store_true", help="do not write OUT/plots at the end")
    p.set_defaults(func=run_train)

    q = subparsers.add_parser(
        "info", help="show a run's config, parameter counts and last metrics",
        description="Print the model config, total/active parameters, checkpoint step and last metrics of "
                    "a run folder. Example: python -m moe info runs/demo")
    q.add_argument("run", metavar="OUT", help="run folder written by train (or one of its ckpt-* folders)")
    q.add_argument("--json", action="store_true", help="print everything as JSON")
    q.set_defaults(func=run_info)
