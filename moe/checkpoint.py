"""Run folders on disk: atomic, verified checkpoints, LATEST, the writer lock, metrics.

A run folder OUT holds:
  metrics.jsonl        one JSON object per optimizer step (val_* keys on eval steps)
  LATEST               the name of the newest complete checkpoint folder
  ckpt-00000500/       model.safetensors, config.json, train.json, state.pt, manifest.json
  plots/               loss.png, expert_load.png (written at the end of a run)
  .lock                held (flock) by the one train process writing OUT, with its pid
A checkpoint is written into a temporary folder (every file fsynced), renamed into place, and
only then named in LATEST (itself replaced atomically); the folder is fsynced after each
rename and before the previous checkpoint is deleted. So a crash or a power loss at any moment
leaves the previous checkpoint loadable. Loading verifies the size and sha256 of every file
the manifest must list before trusting any of it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe.config import ModelConfig, aside_origin, atomic_write_text, fsync_dir, remove_path, replace_dir, with_umask
from moe.device import resolve_device

CHECKPOINT_FORMAT = 1
REQUIRED_FILES = ("model.safetensors", "config.json", "train.json", "state.pt")
TMP_PREFIX = ".tmp-ckpt-"
LOCK_NAME = ".lock"
_CKPT_NAME = re.compile(r"ckpt-\d{8}")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _removed_on_failure(tmp: str):
    """Around writing a checkpoint into tmp: on any failure tmp is removed, and an OSError is raised as
    "cannot write checkpoint" naming the path being written (at[0], which the body keeps current)."""
    at = [tmp]
    try:
        yield at
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"cannot write checkpoint ({e.strerror or e})", e.filename or at[0]) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(out: str, tmp: str, name: str, blobs: dict[str, bytes], files: dict[str, dict[str, Any]],
            manifest: dict[str, Any], at: list[str]) -> None:
    """Write blobs into tmp (each file's size and hash added to files), then manifest.json (manifest plus
    files); fsync; rename tmp to OUT/name, replacing a leftover of a crash between rename and LATEST
    (never referenced); point LATEST at it. at[0] follows the path being written."""
    for fname, data in blobs.items():
        at[0] = os.path.join(tmp, fname)
        _write_durable(at[0], data)
        files[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    at[0] = os.path.join(tmp, "manifest.json")
    _write_durable(at[0], (json.dumps({**manifest, "files": files}, indent=2) + "\n").encode())
    fsync_dir(tmp)
    final = at[0] = os.path.join(out, name)
    replace_dir(tmp, final)  # the old one (a convert --overwrite, or a crash's leftover) goes only afterwards
    at[0] = os.path.join(out, "LATEST")
    atomic_write_text(at[0], name + "\n")  # fsyncs the file and the folder


def _write_durable(path: str, data: bytes) -> None:
    """Write bytes and fsync them (ordinary permissions); OSError names the path and the cause."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, with_umask(0o666))


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with shared tensors stored once (tied embeddings), plus alias -> owner.

    safetensors refuses two names for one storage; the alias map restores them on load.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


# ------------------------------------------------------------------------------ the run folder
def check_out_dir(out: str, flag: str = "--out") -> None:
    """Fail early, before anything is loaded or deleted, when OUT cannot be a writable folder."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a file, not a folder; pick another {flag}")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {out} cannot be created: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe, prefix=".moe-write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {out} is not writable: cannot create files in {probe} "
                         f"({e.strerror or e})") from None


def remove_stale_tmp(out: str) -> list[str]:
    """Delete half-written checkpoint folders a killed process left (call with the lock held).

    A checkpoint replace_dir had moved aside goes back to its name if a kill came between its two
    renames (nothing is there: LATEST may name it), else it is deleted.
    """
    stale = []
    for entry in os.listdir(out):
        p = os.path.join(out, entry)
        origin = aside_origin(entry) or ""
        if origin.startswith("ckpt-") and not os.path.lexists(os.path.join(out, origin)):
            os.rename(p, os.path.join(out, origin))  # killed between replace_dir's two renames: put it back
        elif origin.startswith("ckpt-") or entry.startswith(TMP_PREFIX) and os.path.isdir(p):
            remove_path(p)
            stale.append(entry)
    return stale


def clear_run(out: str) -> None:
    """Delete a run's checkpoints, LATEST and metrics (for --overwrite, after every check passed)."""
    for entry in os.listdir(out):
        p = os.path.join(out, entry)
        replaced = (aside_origin(entry) or "").startswith("ckpt-")  # a checkpoint replace_dir moved aside
        if entry.startswith(("ckpt-", TMP_PREFIX)) and os.path.isdir(p) or replaced:
            remove_path(p)
        elif entry in ("LATEST", "metrics.jsonl"):
            os.unlink(p)


class RunLock:
    """An exclusive lock on OUT/.lock (released by the OS even after kill -9), holding the pid.

    A second train process on the same OUT would interleave metrics and race on checkpoints;
    it is refused with a message naming the owner.
    """

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.file = None

    def __enter__(self) -> RunLock:
        import fcntl

        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until __exit__)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                f.close()
                raise
            f.seek(0)
            owner = f.read().strip() or "unknown"
            f.close()
            raise ValueError(f"{os.path.dirname(self.path)} is being written by another train process "
                             f"(pid {owner}); wait for it to finish or pick another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the flock
            self.file = None


def latest_checkpoint(out: str) -> str | None:
    """The folder named in OUT/LATEST, or None when OUT holds no checkpoint.

    LATEST must name a ckpt-<8 digits> folder inside OUT: a path elsewhere (another run's
    checkpoint, ../x) is refused rather than silently loaded.
    """
    latest = os.path.join(out, "LATEST")
    if not os.path.isfile(latest):
        return None
    try:
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
    except UnicodeDecodeError:
        name = "<not text>"
    if not _CKPT_NAME.fullmatch(name):
        raise ValueError(f"{latest} is corrupt: it names {name!r}, but must name a ckpt-<step> folder of this run")
    return os.path.join(out, name)


# ------------------------------------------------------------------------------ save
def save_checkpoint(out: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    train_config: dict[str, Any], extra: dict[str, Any], model_state: dict | None = None,
                    optimizer_state: dict | None = None) -> str:
    """Write OUT/ckpt-<step> atomically and durably, point LATEST at it, then delete older ones.

    model_state / optimizer_state replace model.state_dict() / optimizer.state_dict() when the
    model is sharded (moe.parallel.Parallel.full_state gathers the experts): a checkpoint always
    holds the full single-process model. An OSError (disk full, read-only) leaves the previous
    checkpoint as it was and is raised with the path that failed.
    """
    from safetensors.torch import save as safetensors_bytes

    os.makedirs(out, exist_ok=True)
    name = checkpoint_name(step)
    final = os.path.join(out, name)
    if latest_checkpoint(out) == final and os.path.isdir(final):
        return final  # this step is already saved (the state cannot have changed since)
    tmp = tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX)
    os.chmod(tmp, with_umask(0o777))  # mkdtemp makes it private; a checkpoint is an ordinary folder
    with _removed_on_failure(tmp) as at:
        tensors, aliases = _unique_tensors(model.state_dict() if model_state is None else model_state)
        if optimizer_state is None:
            optimizer_state = optimizer.state_dict()
        state = {"format": CHECKPOINT_FORMAT, "step": step, "optimizer": optimizer_state,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                 **extra}
        buffer = io.BytesIO()
        torch.save(state, buffer)  # into memory: a full disk then raises ENOSPC, not a zip error
        blobs = {"model.safetensors": safetensors_bytes(tensors, metadata={
                     "format": f"moe-{CHECKPOINT_FORMAT}", "aliases": json.dumps(aliases)}),
                 "config.json": (model.cfg.to_json() + "\n").encode(),
                 "train.json": (json.dumps(train_config, indent=2) + "\n").encode(),
                 "state.pt": buffer.getvalue()}
        _commit(out, tmp, name, blobs, {}, {"format": CHECKPOINT_FORMAT, "step": step}, at)
    for entry in os.listdir(out):
        if entry.startswith("ckpt-") and entry != name:
            shutil.rmtree(os.path.join(out, entry), ignore_errors=True)
    return final


# ------------------------------------------------------------------------------ load
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
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; expected a run folder written by train (or one of its ckpt-* folders)")
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path} (no LATEST file): train one first with "
                                f"python -m moe train --out {path}")
    if not os.path.isdir(latest):
        name = os.path.basename(latest)
        asides = sorted(e for e in os.listdir(path) if aside_origin(e) == name)
        hint = f" (a process killed while replacing it left the old copy as {asides[-1]}: rename it back)" \
            if asides else ""
        raise FileNotFoundError(f"{os.path.join(path, 'LATEST')} names {name}, which is missing{hint}")
    return latest


def read_manifest(folder: str) -> dict[str, dict[str, Any]]:
    """The manifest's file table, checked: every required file listed with its size and sha256."""
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"checkpoint {folder} has no manifest.json")
    corrupt = f"checkpoint file {manifest_path} is corrupt"
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{corrupt} (not valid JSON)") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{corrupt} (no 'files' table)")
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        raise ValueError(f"{corrupt} (it does not list {missing}; a checkpoint has {list(REQUIRED_FILES)})")
    for fname, info in files.items():
        if fname != os.path.basename(fname) or fname in (".", ".."):
            raise ValueError(f"{corrupt} (entry {fname!r} is not a file name inside the checkpoint)")
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int)
                and isinstance(info.get("sha256"), str)):
            raise ValueError(f"{corrupt} (entry {fname!r} needs 'bytes' (an integer) and 'sha256' (a string))")
    return files


def verify_checkpoint(path: str) -> str:
    """The checkpoint folder of path, once every file matches the size and sha256 of its manifest."""
    folder = resolve_checkpoint(path)
    for fname, info in read_manifest(folder).items():
        fpath = os.path.join(folder, fname)
        if not os.path.isfile(fpath):
            raise FileNotFoundError(f"checkpoint file missing: {fpath}")
        if os.path.getsize(fpath) != info["bytes"] or _sha256(fpath) != info["sha256"]:
            raise ValueError(f"checkpoint file {fpath} is corrupt (size or sha256 differs from manifest.json)")
    return folder


def load_checkpoint(path: str, expect_config: ModelConfig | None = None) -> Checkpoint:
    """Read and verify a checkpoint (sizes and sha256 of every file) before trusting any of it."""
    from safetensors import safe_open

    folder = verify_checkpoint(path)
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


def load_weights(model: nn.Module, ckpt: Checkpoint) -> None:
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


def load_model(path: str, device: str | torch.device = "cpu"):
    """A trained Transformer from a run folder (or a ckpt-* folder), in eval mode, on device."""
    from moe.model import Transformer

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


def truncate_metrics(out: str, step: int) -> None:
    """Drop records past the checkpoint we resume from (logged after its last save)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = [r for r in read_metrics(out) if isinstance(r.get("step"), int) and r["step"] <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# ------------------------------------------------------------------------------ weights-only checkpoints
# A converted model (python -m moe convert) has weights but no training state. It is written as an
# ordinary checkpoint (same files, manifest and verification; load_model, generate and info read
# it) whose state.pt holds {"weights_only": True, "source": ...} instead of optimizer and RNG
# state, so train cannot resume it. Its model.safetensors is written piece by piece, in whatever
# order the pieces come: the whole model is never in memory.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class StreamingSafetensors:
    """A safetensors file whose tensors (or single slots of stacked [E, ...] tensors) arrive in any order.

    The header (every name, dtype, shape and byte range) is written first, from specs; each piece
    is then written at its offset. The caller checks that every piece came (the file is only
    renamed into place after that).
    """

    def __init__(self, path: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        self.where: dict[str, tuple[int, int]] = {}  # name -> (start in the data section, bytes)
        start = 0
        for name in sorted(specs):
            shape, dtype = specs[name]
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"cannot store {name} as {dtype}; allowed: {list(SAFETENSORS_DTYPES)}")
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [start, start + n]}
            self.where[name] = (start, n)
            start += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
        self.specs = specs
        self.base = 8 + len(text)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._pwrite(len(text).to_bytes(8, "little") + text, 0)
            os.ftruncate(self.fd, self.base + start)
        except BaseException:  # e.g. a full disk: no object, so close() would never run
            os.close(self.fd)
            raise

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, name: str, expert: int | None, t: torch.Tensor) -> None:
        """Store tensor `name` (expert None) or its slot [expert] of a stacked tensor."""
        start, n = self.where[name]
        shape, dtype = self.specs[name]
        t = t.detach().to("cpu", dtype).contiguous()
        if expert is not None:
            n //= shape[0]
            start += expert * n
        if t.numel() * t.element_size() != n:
            raise ValueError(f"{name}: {t.numel()} values do not fill its {n} bytes")
        self._pwrite(t.view(-1).view(torch.uint8).numpy(), self.base + start)

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        self.fd = -1


def save_weights_checkpoint(out: str, config: ModelConfig, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                            fill, aliases: dict[str, str], info: dict[str, Any]) -> str:
    """Write OUT/ckpt-00000000 (weights only) and point LATEST at it; returns the folder.

    fill(write) must call write(name, expert, tensor) for every piece of every tensor in specs
    (and raise if one is missing). aliases: tied names -> stored name. info: where the weights
    came from (state.pt "source" and train.json). A failure leaves no half-written checkpoint.
    """
    os.makedirs(out, exist_ok=True)
    name = checkpoint_name(0)
    final = os.path.join(out, name)
    tmp = tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX)
    os.chmod(tmp, with_umask(0o777))
    with _removed_on_failure(tmp) as at:
        path = at[0] = os.path.join(tmp, "model.safetensors")
        writer = StreamingSafetensors(path, specs, {"format": f"moe-{CHECKPOINT_FORMAT}",
                                                    "aliases": json.dumps(aliases)})
        try:
            fill(writer.write)
        finally:
            writer.close()
        os.chmod(path, with_umask(0o666))
        files = {"model.safetensors": {"bytes": os.path.getsize(path), "sha256": _sha256(path)}}
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "step": 0, "weights_only": True, "source": info}, buffer)
        blobs = {"config.json": (config.to_json() + "\n").encode(),
                 "train.json": (json.dumps({"weights_only": True, **info}, indent=2) + "\n").encode(),
                 "state.pt": buffer.getvalue()}
        _commit(out, tmp, name, blobs, files, {"format": CHECKPOINT_FORMAT, "step": 0, "weights_only": True}, at)
    return final
