"""Training: AdamW, warmup + cosine, clipping, accumulation, eval, checkpoints, exact resume.

Shapes: B batch, S sequence, V vocabulary.

One optimizer step:
  for each of grad_accum micro-batches: forward, loss / grad_accum, backward
  clip the gradient norm, AdamW step
  read the routing counts (logging), moe.balance.update_bias (aux-loss-free), reset the counts
The counts are reset after every step (and after every eval), so the bias only ever sees
training tokens of the step it follows, all its micro-batches once. With bias_freeze_frac the
bias stops moving for the last part of the run (DeepSeek-V3: gamma 0 for its last 500B tokens).

Before anything in the run folder is touched, every input is checked: the folder is writable,
the config and the data load, seq_len fits, the model fits in memory. The run folder's layout,
the atomic checkpoints and the writer lock are in moe/checkpoint.py. Batches are a pure function
of (seed, step), so resuming at step n continues bit for bit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe.accounting import training_state_bytes
from moe.balance import MODES as BALANCE_MODES
from moe.balance import mode_fields, update_bias
from moe.checkpoint import (
    RunLock,
    check_out_dir,
    checkpoint_name,
    clear_run,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    read_metrics,
    remove_stale_tmp,
    save_checkpoint,
    truncate_metrics,
)
from moe.cli import checked, non_negative_float, non_negative_int, positive_float, positive_int
from moe.config import PRESETS, ModelConfig, get_preset, parse_overrides
from moe.data import DEFAULT_MAX_DATA_MB, Corpus, domain_ids, eval_starts, get_batch, load_corpus, unigram_loss, windows
from moe.device import autocast, available_bytes, resolve_device
from moe.layer import reset_routing_stats, routing_stats
from moe.model import Transformer
from moe.parallel import MODES, Parallel

LN2 = math.log(2.0)


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
    max_data_mb: int = DEFAULT_MAX_DATA_MB  # refuse --data files larger than this (an endless file never ends)
    bias_freeze_frac: float = 0.0  # the last fraction of the steps with the balancing bias frozen (V3: ~0.034)
    # several processes (launched by torchrun; moe/parallel.py): each has its own micro-batch of
    # batch_size sequences, so one optimizer step sees world * batch_size * grad_accum sequences
    parallel: str = "none"  # "none" (one process), "dp" (data parallel), "ep" (experts sharded, the rest DP)
    ep_size: int | None = None  # "ep": processes sharing one copy of the experts (None = all of them)
    dist_timeout: float = 300.0  # seconds a process waits for the others (to join, in a collective)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_windows", "max_data_mb"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup_steps", "eval_interval", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.save_interval is not None and (not isinstance(self.save_interval, int) or self.save_interval < 0):
            raise ValueError(f"save_interval must be an integer >= 0 or None, got {self.save_interval!r}")
        if self.parallel not in MODES:
            raise ValueError(f"parallel must be one of {', '.join(MODES)}, got {self.parallel!r}")
        if self.ep_size is not None and (not isinstance(self.ep_size, int) or self.ep_size <= 0):
            raise ValueError(f"ep_size must be a positive integer or None, got {self.ep_size!r}")
        if self.ep_size is not None and self.parallel != "ep":
            raise ValueError(f"ep_size applies with parallel='ep' only (--ep-size with --parallel ep), "
                             f"got parallel={self.parallel!r}")
        if not (isinstance(self.dist_timeout, (int, float)) and self.dist_timeout > 0):
            raise ValueError(f"dist_timeout must be a number of seconds > 0, got {self.dist_timeout!r}")
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
        f = self.bias_freeze_frac
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 <= f <= 1):
            raise ValueError(f"bias_freeze_frac must be a number in [0, 1], got {f!r}")
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
    rank: int = 0  # under --parallel: this process (its model holds only its experts under EP)


# ------------------------------------------------------------------------------ small pieces
def bias_update_steps(tc: TrainConfig) -> int:
    """The aux-loss-free bias moves after optimizer steps 1..n and is frozen after the rest."""
    return tc.steps - math.floor(tc.bias_freeze_frac * tc.steps + 1e-9)


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


def load_optimizer_state(optimizer: torch.optim.AdamW, state: dict, tc: TrainConfig) -> None:
    """Restore the moments and step counts of a checkpoint, keeping the hyperparameters of tc.

    load_state_dict also restores each group's weight_decay and betas; a resume that passes new
    ones (recorded in its train.json) must train with them. The lr is set every step anyway.
    """
    optimizer.load_state_dict(state)
    for group, decay in zip(optimizer.param_groups, (tc.weight_decay, 0.0)):
        group["weight_decay"], group["betas"] = decay, (tc.beta1, tc.beta2)


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


# ------------------------------------------------------------------------------ metrics
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


def _in_notebook() -> bool:
    """Inside a running Jupyter kernel, where tqdm draws a widget (merely importing ipykernel,
    as test runners do, does not count)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Progress:
    """A tqdm bar on a terminal or in a notebook; in a log file or a pipe, where a bar's
    carriage-return frames would pile up, a plain line every `every` steps instead."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, every: int | None = None):
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty() or _in_notebook()
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and interactive), unit="step",
                        dynamic_ncols=True, desc=desc)
        self.lines = enabled and not interactive
        self.total, self.desc = total, desc
        self.every = every or max(1, total // 20)

    def step(self, step: int, postfix: dict[str, str]) -> None:
        if self.lines and (step % self.every == 0 or step == self.total):
            print(f"{self.desc}: step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in postfix.items()),
                  file=sys.stderr, flush=True)
        self.bar.update(1)
        self.bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------------------ the loop
def train(tc: TrainConfig, model_cfg: ModelConfig | None = None, resume: bool = False) -> TrainResult:
    """Train (or, with resume=True, continue the run in tc.out) and return the final state.

    Raises TrainingDiverged on a NaN/inf loss, leaving the last checkpoint in place.
    """
    from moe import parallel

    tc.validate()
    if resume and os.path.isfile(os.path.join(tc.out, "manifest.json")):
        # the run would go on inside the checkpoint, and the next save in the run folder would delete it
        parent = os.path.dirname(os.path.abspath(tc.out))
        raise ValueError(f"--resume takes a run folder, and {tc.out} is one of its checkpoints; continue the run "
                         f"(from its LATEST) with --resume {parent}")
    threads = torch.get_num_threads()
    try:
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        ps = parallel.setup(tc.parallel, tc.ep_size, resolve_device(tc.device), tc.dist_timeout)
        try:
            return _train(tc, model_cfg, resume, ps)
        finally:
            parallel.teardown(ps)
    finally:  # also when setup refuses the device or the parallel mode
        torch.set_num_threads(threads)


def check_memory(cfg: ModelConfig, device: torch.device) -> None:
    """Refuse a model whose fp32 weights, gradients and AdamW moments cannot fit, before allocating it."""
    from moe.accounting import human

    need = training_state_bytes(cfg, "fp32-adamw")["total"]
    have = available_bytes(device)
    if have is None or need <= have:
        return
    n = need / training_state_bytes(cfg, "fp32-adamw")["bytes_per_param"]
    raise ValueError(
        f"this model has {human(n)} parameters (MTP included): training it needs about {need / 1e9:,.1f} GB "
        f"for fp32 weights, gradients and AdamW moments alone, but {device} has {have / 1e9:,.1f} GB available, "
        f"enough for about {human(have / 16)} parameters. To count a large model without allocating it, use "
        "python -m moe calc --preset NAME (or build it under torch.device('meta'))")


def _prepare(tc: TrainConfig, model_cfg: ModelConfig | None, resume: bool):
    """Every check that can fail on bad input, before the run folder is touched."""
    device = resolve_device(tc.device)
    check_out_dir(tc.out)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(tc.out, expect_config=model_cfg)
        if ckpt.state.get("weights_only"):
            raise ValueError(f"{tc.out} holds converted weights only (python -m moe convert): no optimizer state or "
                             "data position to resume from; use it with generate, info or moe.checkpoint.load_model")
        model_cfg = ckpt.config
    else:
        model_cfg = model_cfg or PRESETS["toy"]
        # with --overwrite the old run is cleared whatever its LATEST says (a corrupt one included)
        existing = latest_checkpoint(tc.out) if os.path.isdir(tc.out) and not tc.overwrite else None
        if existing is not None:
            raise ValueError(f"{tc.out} already holds a run ({os.path.basename(existing)}); continue it with "
                             f"--resume {tc.out}, start over with --overwrite, or pick another --out")
    if tc.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}")
    start_step = ckpt.step if ckpt is not None else 0
    end_step = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    if end_step <= start_step:
        raise ValueError(f"{tc.out} is already at step {start_step}: pass --steps larger than {start_step} "
                         "to train further")
    check_memory(model_cfg, device)
    corpus = load_corpus(tc.data, tc.seq_len, max_bytes=tc.max_data_mb * 2**20)
    return device, model_cfg, ckpt, corpus


def _train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: bool, ps: Parallel) -> TrainResult:
    with contextlib.ExitStack() as stack:
        if ps.is_main and os.path.isdir(tc.out):  # lock before reading: another writer may be mid-save
            stack.enter_context(RunLock(tc.out))
        device, model_cfg, ckpt, corpus = _prepare(tc, model_cfg, resume)  # every rank checks the same inputs
        ps.check_config(model_cfg)
        ps.barrier()  # every rank has read the run folder before rank 0 changes it
        if ps.is_main:
            if not os.path.isdir(tc.out):
                os.makedirs(tc.out)
                stack.enter_context(RunLock(tc.out))
            remove_stale_tmp(tc.out)
            if tc.overwrite and not resume:
                clear_run(tc.out)
        return _loop(tc, model_cfg, ckpt, corpus, ps.local_device(device), ps)


def _loop(tc: TrainConfig, model_cfg: ModelConfig, ckpt, corpus: Corpus, device: torch.device,
          ps: Parallel) -> TrainResult:
    out = tc.out
    unigram = unigram_loss(corpus)
    torch.manual_seed(tc.seed)
    model = Transformer(model_cfg)  # the same seed on every rank: the same replicated weights
    start_step, elapsed, tokens_seen = 0, 0.0, 0
    if ckpt is not None:
        load_weights(model, ckpt)  # a checkpoint always holds the full model
    ps.parallelize(model)  # under EP: keep this rank's experts only
    model.to(device).train()
    optimizer = build_optimizer(model, tc)
    if ckpt is not None:
        load_optimizer_state(optimizer, ps.shard_optimizer_state(ckpt.state["optimizer"], model, optimizer), tc)
        torch.set_rng_state(ckpt.state["rng"]["torch"])
        if device.type == "cuda" and ckpt.state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt.state["rng"]["cuda"])
        start_step = ckpt.step
        elapsed = float(ckpt.state.get("elapsed_s", 0.0))
        tokens_seen = int(ckpt.state.get("tokens", 0))
        if ckpt.state.get("data", {}).get("fingerprint") != corpus.fingerprint():
            print(f"warning: resuming {out} on different training data than it started with", file=sys.stderr)
    if ps.is_main:
        truncate_metrics(out, start_step)

    end_step = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    save_every = tc.eval_interval if tc.save_interval is None else tc.save_interval
    B = tc.batch_size
    tokens_per_step = ps.world * B * tc.seq_len * tc.grad_accum
    bias_steps = bias_update_steps(tc)
    params = [p for p in model.parameters() if p.requires_grad]
    last_ckpt = ckpt.path if ckpt is not None else None
    last: dict[str, Any] = {}
    val_loss: float | None = None
    step = start_step
    interrupted = False

    def checkpoint() -> str:
        extra = {"elapsed_s": elapsed, "tokens": tokens_seen, "world_size": ps.world,
                 "data": {"fingerprint": corpus.fingerprint(), "seed": tc.seed, "next_step": step}}
        model_state, optimizer_state = ps.full_state(model, optimizer)  # experts gathered (every rank calls)
        if not ps.is_main:
            return os.path.join(out, checkpoint_name(step))
        return save_checkpoint(out, model, optimizer, step, dataclasses.asdict(tc), extra,
                               model_state=model_state, optimizer_state=optimizer_state)

    bar = Progress(tc.steps, start_step, tc.progress and ps.is_main, f"train {os.path.basename(os.path.normpath(out))}")
    metrics_file = open(os.path.join(out, "metrics.jsonl"), "a", encoding="utf-8") if ps.is_main else None  # noqa: SIM115
    try:
        with _StopFlag() as stop:
            while step < end_step:
                t0 = time.perf_counter()
                lr = lr_at(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                terms: dict[str, float] = {}
                for micro in range(tc.grad_accum):
                    # the global micro-batch of world * B sequences; this rank takes its B rows
                    x_BS, y_BS = get_batch(corpus.train, ps.world * B, tc.seq_len, tc.seed, step, micro)
                    x_BS, y_BS = x_BS[ps.rank * B:(ps.rank + 1) * B], y_BS[ps.rank * B:(ps.rank + 1) * B]
                    with autocast(device):
                        _, losses = model(x_BS.to(device), y_BS.to(device))
                    loss = losses["loss"]
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingDiverged(_diverged_message("loss", value, step + 1, last_ckpt))
                    (loss / tc.grad_accum).backward()
                    for k, v in losses.items():
                        terms[k] = terms.get(k, 0.0) + float(v.detach()) / tc.grad_accum
                ps.reduce_gradients(model)  # the gradient of the mean loss over every rank's micro-batch
                terms = ps.mean(terms)
                grad_norm = ps.clip_grad_norm_(model, params, tc.grad_clip or float("inf"))
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(_diverged_message("gradient norm", grad_norm, step + 1, last_ckpt))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ps.all_reduce_routing_stats(model)  # the global load: every rank's bias moves alike
                stats = routing_stats(model)  # counts of this step's micro-batches
                if step < bias_steps:
                    update_bias(model)
                reset_routing_stats(model)
                step += 1
                dt = time.perf_counter() - t0
                elapsed += dt
                tokens_seen += tokens_per_step
                record: dict[str, Any] = {"step": step, **terms, "lr": lr, "grad_norm": grad_norm,
                                          "tokens": tokens_seen, "tokens_per_s": tokens_per_step / dt,
                                          "elapsed_s": elapsed,
                                          "load_max_over_mean": stats["max_over_mean_load"],
                                          "tokens_per_expert": stats["tokens_per_expert"],
                                          "router_entropy": stats["router_entropy"]}
                if any(b is not None for b in stats["bias"]):
                    record["bias"] = stats["bias"]  # what this step routed with (before its update)
                if model_cfg.capacity_factor is not None:
                    record["dropped"] = stats["dropped"]
                stop_now = ps.any(stop.requested)  # a Ctrl-C seen by one rank stops every rank
                is_last = step == end_step or stop_now
                if is_last or (tc.eval_interval and step % tc.eval_interval == 0):
                    # no activations are kept for backward, so 4x the training batch fits
                    record.update(evaluate(model, corpus, tc.seq_len, tc.eval_windows, 4 * tc.batch_size, device))
                    record["unigram_loss"] = unigram
                    val_loss = record["val_loss"]
                    if ps.is_main:
                        bar.write(_eval_line(record, unigram))
                if metrics_file is not None:
                    metrics_file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
                    metrics_file.flush()
                last = record
                postfix = {"loss": f"{terms['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if val_loss is not None:
                    postfix["val"] = f"{val_loss:.3f}"
                bar.step(step, postfix)
                if is_last or (save_every and step % save_every == 0):
                    last_ckpt = checkpoint()
                if stop_now:
                    interrupted = True
                    if ps.is_main:
                        bar.write(f"interrupted: checkpoint saved at step {step}; continue with "
                                  f"python -m moe train --resume {out}")
                    break
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    if tc.plots and step > start_step and ps.is_main:
        write_plots(out)
    return TrainResult(model, out, step, last_ckpt, last, val_loss, unigram, stopped_early=step < tc.steps,
                       interrupted=interrupted, rank=ps.rank)


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
                "device": "device", "threads": "threads", "data": "data", "max_data_mb": "max_data_mb",
                "parallel": "parallel", "ep_size": "ep_size", "dist_timeout": "dist_timeout",
                "bias_freeze_frac": "bias_freeze_frac"}


def model_config_from_args(args: argparse.Namespace, base: ModelConfig | None = None) -> ModelConfig | None:
    """--config FILE or --preset NAME, then --balance NAME, then --set overrides; None when none is given.

    Without --config or --preset, --balance and --set change base (a resumed run's own config), else toy.
    """
    cfg = None
    if args.config:
        cfg = ModelConfig.load(args.config)
    elif args.preset:
        cfg = get_preset(args.preset)
    if getattr(args, "balance", None):
        cfg = (cfg or base or get_preset("toy")).replace(**mode_fields(args.balance))
    if args.set:
        cfg = (cfg or base or get_preset("toy")).replace(**parse_overrides(args.set))
    return cfg


def run_train(args: argparse.Namespace) -> int:
    if args.resume:
        if args.out and os.path.normpath(args.out) != os.path.normpath(args.resume):
            raise ValueError(f"--resume {args.resume} continues in its own folder; drop --out {args.out}")
        ckpt = load_checkpoint(args.resume)
        # --set/--balance change the run's own config, so train's check against the checkpoint names only what
        # they changed
        cfg = model_config_from_args(args, ckpt.config)
        base = TrainConfig.from_dict(ckpt.train_config)
        # how the run was launched is not kept: a resume runs as it is launched now
        base = dataclasses.replace(base, out=args.resume, stop_at=None, overwrite=False, parallel="none",
                                   ep_size=None)
    else:
        cfg = model_config_from_args(args)
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
    if result.rank == 0:
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


_unit_fraction = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


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
    p.add_argument("--balance", choices=list(BALANCE_MODES), default=None, metavar="MODE",
                   help="load balancing recipe, set before --set: " + ", ".join(
                       f"{name} ({', '.join(f'{k}={v:g}' for k, v in fields.items() if v) or 'all off'})"
                       for name, fields in BALANCE_MODES.items()) + " (default: the preset's own)")
    p.add_argument("--bias-freeze-frac", type=_unit_fraction, default=None,
                   help="freeze the balancing bias for this last fraction of --steps, as DeepSeek-V3 did "
                        f"for its last ~3.4%% of tokens (default: {d.bias_freeze_frac:g})")
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
                   help=f"sequences per micro-batch, per process under --parallel (default: {d.batch_size})")
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
    p.add_argument("--max-data-mb", type=positive_int, default=None,
                   help=f"refuse a --data file larger than this many MiB (default: {d.max_data_mb})")
    par = p.add_argument_group(
        "several processes", "Launch with torchrun, one process per CPU share or GPU: torchrun --nproc_per_node N "
        "-m moe train --parallel ep ... Each process trains on its own --batch-size sequences, so an optimizer "
        "step sees N x batch-size x grad-accum sequences (the effective batch; the learning rate is not "
        "rescaled). Process 0 writes the metrics, the checkpoints and the plots; a checkpoint always holds the "
        "full model, loadable by one process, and a run can resume under another N (docs/parallel.md).")
    par.add_argument("--parallel", choices=MODES, default=None,
                     help="none: one process (default); dp: data parallel, every process holds the whole model; "
                          "ep: expert parallel, the routed experts are split over the processes (tokens travel "
                          "to their experts by all-to-all), everything else is data parallel")
    par.add_argument("--ep-size", type=positive_int, default=None,
                     help="with --parallel ep: processes that share one copy of the experts, each holding "
                          "n_routed_experts / ep-size of them (default: all N); N / ep-size copies then train "
                          "data parallel")
    par.add_argument("--dist-timeout", type=positive_float, default=None,
                     help=f"seconds a process waits for the others, to start or in a collective, before it "
                          f"fails with an error (default: {d.dist_timeout:g})")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (on a terminal a tqdm bar; in a log or pipe a line every 5%% of the steps)")
    p.add_argument("--no-plots", action="store_true", help="do not write OUT/plots at the end")
    p.set_defaults(func=run_train)

