"""`python -m moe convert`: a local transformers checkpoint folder <-> this project's run folder.

    python -m moe convert --from-hf DIR --out OUT      # config.json + *.safetensors (sharded or not)
    python -m moe convert --to-hf OUT --out DIR        # a folder transformers' from_pretrained loads

Both directions stream: one tensor is read, converted (moe.interop.hf's table) and written
at a time, so memory holds about one shard (to-hf) or one tensor (from-hf), never the model
twice. From a checkpoint's files, the MTP layer (model.layers.{n_layers}.*, which transformers
drops on load) is converted too, and FP8 weights are dequantised with their weight_scale_inv.
Nothing is downloaded: DIR is a folder on disk. Tokenizer files found next to the weights are
copied along (OUT/tokenizer/, where `python -m moe generate` finds them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import torch

from moe.checkpoint import check_out_dir, latest_checkpoint, save_weights_checkpoint, verify_checkpoint
from moe.cli import positive_float
from moe.config import ModelConfig, atomic_write_text, parse_overrides, replace_dir, with_umask
from moe.interop.hf import (
    ARCHS,
    StateDictBuilder,
    architecture,
    config_from_hf,
    config_to_hf,
    convert_from_hf,
    entry_to_hf,
    hf_entries,
    is_fp8,
    mtp_layers_in,
    our_specs,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
INDEX = "model.safetensors.index.json"
SAFETENSORS_NAMES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ------------------------------------------------------------------------------ reading a checkpoint folder
class HFCheckpoint:
    """A transformers checkpoint folder, read one tensor at a time (safetensors opens lazily)."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--from-hf {folder}: no such folder")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--from-hf {folder} has no config.json")
        try:
            with open(config_path, encoding="utf-8") as f:
                self.config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from None
        self.folder = folder
        self.where: dict[str, str] = {}  # tensor name -> its file, in shard order
        index = os.path.join(folder, INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map") or {}
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"--from-hf {folder} has no *.safetensors weights (PyTorch .bin files are "
                                    "not read: save the model with safe_serialization)")
        self._stack = contextlib.ExitStack()
        self._open: dict[str, Any] = {}
        for fname in files:
            if not os.path.isfile(os.path.join(folder, fname)):
                raise FileNotFoundError(f"{index} names {fname}, which is missing")
            keys = self._handle(fname).keys()
            for key in keys:
                if weight_map is None or weight_map.get(key) == fname:
                    self.where[key] = fname
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.where))
            if absent:
                raise ValueError(f"{index} lists tensors its files do not hold: {absent[:5]}")

    def _handle(self, fname: str):
        from safetensors import safe_open

        if fname not in self._open:
            path = os.path.join(self.folder, fname)
            try:
                self._open[fname] = self._stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
        return self._open[fname]

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.where[name]).get_tensor(name)

    def dtype(self) -> torch.dtype:
        """The checkpoint's float dtype: config.json's, else its first non-FP8 float tensor's."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if name in HF_DTYPE_NAMES:
            return HF_DTYPE_NAMES[name]
        for key in self.where:
            t = self.get(key)
            if t.is_floating_point() and not is_fp8(t) and t.dtype in DTYPES.values():
                return t.dtype
        return torch.float32

    def close(self) -> None:
        self._stack.close()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if found:
        os.makedirs(dst, exist_ok=True)
        for f in found:
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    return found


# ------------------------------------------------------------------------------ transformers -> ours
def from_hf_dir(src: str, out: str, dtype: str = "auto", overrides: dict[str, Any] | None = None,
                overwrite: bool = False, progress: bool = True) -> str:
    """Convert the checkpoint folder src into a run folder out (weights-only ckpt-00000000)."""
    check_out_dir(out)
    if os.path.isdir(out) and latest_checkpoint(out) is not None and not overwrite:
        raise ValueError(f"--out {out} already holds a checkpoint; pass --overwrite or pick another --out")
    ckpt = HFCheckpoint(src)
    try:
        hf = ckpt.config
        arch = architecture(hf)
        names = ckpt.names()
        n_mtp = mtp_layers_in(names, hf["num_hidden_layers"])
        cfg = config_from_hf(hf, n_mtp=n_mtp, **(overrides or {}))
        out_dtype = ckpt.dtype() if dtype == "auto" else DTYPES[dtype]
        specs = our_specs(cfg, out_dtype)
        fp8 = any(n.endswith("weight_scale_inv") for n in names)
        info = {"converted_from": os.path.abspath(src), "architecture": ARCHS[arch],
                "dtype": str(out_dtype).removeprefix("torch."), "fp8_dequantised": fp8, "mtp_layers": n_mtp}

        def fill(write) -> None:
            with _progress(len(names), "from transformers", progress) as bar:
                convert_from_hf(cfg, names, ckpt.get, StateDictBuilder(specs, store=write),
                                bool(hf.get("rope_interleave", True)), progress=lambda _: bar.update(1))

        aliases = {"head.weight": "embed.weight"} if cfg.tie_embeddings else {}
        folder = save_weights_checkpoint(out, cfg, specs, fill, aliases, info)
    finally:
        ckpt.close()
    _copy_tokenizer(src, os.path.join(out, "tokenizer"))
    return folder


# ------------------------------------------------------------------------------ ours -> transformers
def _entry_bytes(entry, shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    shape = shapes[entry.ours[0]]
    n = 1
    for s in (shape[1:] if entry.expert is not None else shape):
        n *= s
    return n * len(entry.ours) * itemsize


def to_hf_dir(run: str, out: str, dtype: str = "auto", layout: str = "per_expert", shard_gb: float = 5.0,
              overwrite: bool = False, progress: bool = True) -> str:
    """Write the checkpoint of run as a transformers folder out (config.json, safetensors shards, index)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if os.path.exists(out) and not (os.path.isdir(out) and (overwrite or not os.listdir(out))):
        raise ValueError(f"--out {out} exists and is not empty; pass --overwrite or pick another --out")
    check_out_dir(out)
    folder = verify_checkpoint(run)
    cfg = ModelConfig.load(os.path.join(folder, "config.json"))
    hf_config = config_to_hf(cfg)
    entries = [e for e in hf_entries(cfg, layout) if not (e.hf == "lm_head.weight" and cfg.tie_embeddings)]
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-hf-")
    os.chmod(tmp, with_umask(0o777))
    try:
        with safe_open(os.path.join(folder, "model.safetensors"), framework="pt", device="cpu") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            real = lambda name: aliases.get(name, name)
            stored = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            shapes = {k: tuple(s.get_shape()) for k, s in stored.items()}
            shapes.update({a: shapes[o] for a, o in aliases.items()})
            src_dtype = SAFETENSORS_NAMES[stored[real("embed.weight")].get_dtype()]
            out_dtype = src_dtype if dtype == "auto" else DTYPES[dtype]

            def get(name: str, expert: int | None) -> torch.Tensor:
                t = f.get_tensor(real(name)) if expert is None else stored[real(name)][expert]
                return t if name.endswith("router.bias") else t.to(out_dtype)  # the bias stays fp32

            shards: list[list] = [[]]
            size, limit = 0, shard_gb * 1e9
            for e in entries:
                n = _entry_bytes(e, shapes, out_dtype.itemsize)
                if shards[-1] and size + n > limit:
                    shards.append([])
                    size = 0
                shards[-1].append(e)
                size += n
            weight_map, total = {}, 0
            with _progress(len(entries), "to transformers", progress) as bar:
                for i, shard in enumerate(shards):
                    fname = "model.safetensors" if len(shards) == 1 else \
                        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    tensors, storages = {}, set()
                    for e in shard:
                        t = entry_to_hf(e, get, cfg).contiguous()
                        if t.untyped_storage().data_ptr() in storages:
                            # the MTP layers' embed_tokens and shared_head.head are the main model's tensors
                            # again; safetensors refuses two names for one storage, transformers wants both
                            t = t.clone()
                        storages.add(t.untyped_storage().data_ptr())
                        tensors[e.hf] = t
                        weight_map[e.hf] = fname
                        total += tensors[e.hf].numel() * tensors[e.hf].element_size()
                        bar.update(1)
                    path = os.path.join(tmp, fname)
                    save_file(tensors, path, metadata={"format": "pt"})
                    _fsync(path)
                    del tensors
        hf_config["dtype"] = str(out_dtype).removeprefix("torch.")
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(hf_config, indent=2) + "\n")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(os.path.join(tmp, INDEX), json.dumps(index, indent=2) + "\n")
        _copy_tokenizer(os.path.join(os.path.dirname(folder), "tokenizer"), tmp)
        replace_dir(tmp, out)  # an --overwrite'n folder is deleted only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------ CLI
def run_convert(args: argparse.Namespace) -> int:
    if args.from_hf:
        if args.layout != "per_expert" or args.shard_size is not None:
            raise ValueError("--layout and --shard-size apply to --to-hf only")
        folder = from_hf_dir(args.from_hf, args.out, args.dtype, parse_overrides(args.set), args.overwrite,
                             progress=not args.quiet)
        cfg = ModelConfig.load(os.path.join(folder, "config.json"))
        print(f"wrote {folder} ({'MLA' if cfg.attn == 'mla' else 'GQA'}, {cfg.n_layers} layers, "
              f"{cfg.n_routed_experts} experts top-{cfg.n_activated_experts}, {cfg.n_mtp} MTP); "
              f"try: python -m moe generate {args.out} --greedy")
    else:
        if args.set:
            raise ValueError("--set applies to --from-hf only")
        out = to_hf_dir(args.to_hf, args.out, args.dtype, args.layout,
                        args.shard_size if args.shard_size is not None else 5.0, args.overwrite,
                        progress=not args.quiet)
        print(f"wrote {out}: load it with transformers' AutoModelForCausalLM.from_pretrained({out!r})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a local transformers DeepseekV3/Mixtral checkpoint to a run folder, or back",
        description="Convert weights between a local transformers checkpoint folder (config.json + "
                    "*.safetensors, sharded or not; DeepseekV3 bf16 or FP8, or Mixtral) and this project's run "
                    "folder, one tensor at a time. Nothing is downloaded. Examples: "
                    "python -m moe convert --from-hf ~/models/DeepSeek-V2-Lite --out runs/v2lite ; "
                    "python -m moe convert --to-hf runs/v2lite --out /tmp/v2lite-hf")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="transformers checkpoint folder to read")
    src.add_argument("--to-hf", metavar="RUN", help="run folder (or ckpt-* folder) to write out for transformers")
    p.add_argument("--out", required=True, help="run folder (--from-hf) or transformers folder (--to-hf) to write")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="dtype of the written weights; auto = the source's (FP8 is dequantised to the config's "
                        "dtype, bf16 for DeepSeek's release); the router bias stays fp32 (default: auto)")
    p.add_argument("--layout", choices=["per_expert", "fused"], default="per_expert",
                   help="--to-hf: experts as checkpoints store them (one Linear each) or transformers 5's fused "
                        "gate_up_proj/down_proj (default: per_expert)")
    p.add_argument("--shard-size", type=positive_float, default=None, metavar="GB",
                   help="--to-hf: largest safetensors shard (default: 5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--from-hf: change a ModelConfig field of the result (e.g. max_seq_len=4096)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)
