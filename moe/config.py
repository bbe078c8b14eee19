"""ModelConfig: the one source of truth for every shape in the project.

Field names follow DeepSeek-V3's reference `ModelArgs` wherever one exists, so this file can
be read side by side with the official code. Every behaviour is a named field: nothing is
switched on by a magic size (the reference enables its routing bias only when dim == 7168).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from typing import Any

# the string fields and their allowed values
CHOICES: dict[str, tuple[str, ...]] = {
    "attn": ("mha", "mla"),
    "score_func": ("softmax", "sigmoid"),
    "expert_impl": ("auto", "loop", "bucketed", "grouped"),
    "fp8": ("none", "blockwise", "rowwise", "tensorwise", "bf16"),  # moe.fp8.RECIPES
}


@dataclass(frozen=True)
class ModelConfig:
    # --- trunk ---
    vocab_size: int = 256  # tokens; 256 = the byte tokenizer
    dim: int = 128  # residual width (d_model)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    max_seq_len: int = 256  # longest sequence the model accepts (RoPE table size)
    tie_embeddings: bool = False  # share the input embedding with the output head
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    init_std: float = 0.02  # std of the normal init of every weight matrix (DeepSeek-V2/V3: 0.006)

    # --- YaRN: RoPE stretched past the pre-training context (names and defaults of DeepSeek's ---
    # --- reference ModelArgs; on when max_seq_len > original_seq_len, as there; see moe/rope.py) ---
    original_seq_len: int = 4096  # context RoPE was pre-trained at (DeepSeek-V2/V3: 4096)
    rope_factor: float = 40.0  # s: slow frequencies are divided by s (DeepSeek-V2/V3: 40; 1 = no stretch)
    beta_fast: float = 32.0  # frequencies turning more than this often over original_seq_len are kept
    beta_slow: float = 1.0  # ... less than this often are divided by rope_factor; a linear ramp between
    mscale: float = 1.0  # softmax scale *= (0.1 * mscale * ln(rope_factor) + 1)^2 (V3: 1.0; V2, V2-Lite: 0.707)

    # --- attention ---
    attn: str = "mla"  # "mha" (covers MHA and GQA) or "mla" (Multi-head Latent Attention)
    n_kv_heads: int | None = None  # "mha" only: key/value heads for GQA (None = n_heads)
    head_dim: int | None = None  # "mha" only: per-head width (None = dim // n_heads)
    q_lora_rank: int = 0  # "mla": query compression rank (0 = no query compression)
    kv_lora_rank: int = 64  # "mla": width of the cached key/value latent
    qk_nope_head_dim: int = 32  # "mla": per-head query/key width without RoPE
    qk_rope_head_dim: int = 16  # "mla": per-head query/key width with RoPE (key shared by heads)
    v_head_dim: int = 32  # "mla": per-head value width

    # --- feed-forward ---
    inter_dim: int = 384  # dense SwiGLU hidden width (the first n_dense_layers blocks)
    n_dense_layers: int = 1  # leading blocks with a dense FFN instead of MoE
    n_routed_experts: int = 8  # routed experts per MoE layer (E)
    n_shared_experts: int = 1  # always-on shared experts per MoE layer
    n_activated_experts: int = 2  # top-k: routed experts per token (K)
    moe_inter_dim: int = 96  # hidden width of one expert (I)

    # --- routing ---
    n_expert_groups: int = 1  # expert groups for group-limited routing (1 = off)
    n_limited_groups: int = 1  # groups a token may route into
    score_func: str = "softmax"  # router scores: "softmax" or "sigmoid"
    route_scale: float = 1.0  # multiply the routing weights by this
    norm_topk_prob: bool = True  # renormalise the top-k weights to sum to 1 (before route_scale)
    capacity_factor: float | None = None  # None = dropless; else keep ceil(cf*T*K/E) per expert
    expert_impl: str = "auto"  # expert compute: "loop", "bucketed" (bmm), "grouped" (grouped_mm), "auto"

    # --- load balancing ---
    bias_update_speed: float = 0.0  # aux-loss-free bias step (gamma; DeepSeek-V3: 0.001; 0 = no bias)
    aux_loss_alpha: float = 0.0  # Switch-style batch aux loss coefficient (0 = off)
    seq_aux_loss_alpha: float = 0.0  # DeepSeek-V3 sequence-wise aux loss coefficient (0 = off)
    z_loss_coef: float = 0.0  # router z-loss coefficient (0 = off)

    # --- multi-token prediction ---
    n_mtp: int = 0  # extra future tokens predicted by MTP modules (DeepSeek-V3: 1; 0 = off)
    mtp_loss_weight: float = 0.3  # lambda: weight of the mean MTP loss

    # --- low precision ---
    # simulated FP8 GEMMs (moe/fp8.py): "none", "blockwise" (DeepSeek-V3: 1x128 activation tiles,
    # 128x128 weight blocks), "rowwise", "tensorwise"; "bf16" rounds the GEMM inputs to bf16 the same way
    fp8: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        """Reject every impossible value or combination, naming the field(s) and what is allowed."""
        self._check_types()
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "inter_dim",
                    "n_routed_experts", "n_activated_experts", "moe_inter_dim",
                    "n_expert_groups", "n_limited_groups"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ["n_dense_layers", "n_shared_experts", "n_mtp", "q_lora_rank"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ["bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_coef",
                     "mtp_loss_weight"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ["norm_eps", "rope_theta", "init_std", "route_scale"]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.original_seq_len <= 0:
            raise ValueError(f"original_seq_len must be a positive integer, got {self.original_seq_len!r}")
        if self.rope_factor < 1:
            raise ValueError(f"rope_factor must be a finite number >= 1 (1 = no stretch), got {self.rope_factor!r}")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"beta_fast and beta_slow must satisfy 0 < beta_slow < beta_fast, got "
                             f"beta_fast={self.beta_fast!r}, beta_slow={self.beta_slow!r}")
        if self.mscale < 0:
            raise ValueError(f"mscale must be a finite number >= 0, got {self.mscale!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}")

        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")

        if self.attn == "mha":
            kv = self.n_kv_heads if self.n_kv_heads is not None else self.n_heads
            if kv <= 0 or self.n_heads % kv:
                raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must be a positive divisor of "
                                 f"n_heads ({self.n_heads}) (or None)")
            if self.head_dim is None and self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "when head_dim is None; or set head_dim explicitly")
            hd = self.head_dim if self.head_dim is not None else self.dim // self.n_heads
            if hd <= 0 or hd % 2:
                raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {hd!r}")
        else:
            for name in ["kv_lora_rank", "qk_rope_head_dim", "v_head_dim"]:
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be a positive integer for attn='mla', got {getattr(self, name)!r}")
            if self.qk_nope_head_dim < 0:
                raise ValueError(f"qk_nope_head_dim must be an integer >= 0, got {self.qk_nope_head_dim!r}")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")

        E, K, G, M = self.n_routed_experts, self.n_activated_experts, self.n_expert_groups, self.n_limited_groups
        if K > E:
            raise ValueError(f"n_activated_experts ({K}) must be <= n_routed_experts ({E})")
        if E % G:
            raise ValueError(f"n_routed_experts ({E}) must be divisible by n_expert_groups ({G})")
        if M > G:
            raise ValueError(f"n_limited_groups ({M}) must be <= n_expert_groups ({G})")
        if M * (E // G) < K:
            raise ValueError(f"n_limited_groups * experts per group ({M} * {E // G}) must be >= "
                             f"n_activated_experts ({K}), or a token cannot find K experts")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None (dropless) or > 0, got {self.capacity_factor!r}")

    def _check_types(self) -> None:
        """Each field has its declared type: a JSON "false" is not False, 1.0 is not an int, NaN is
        not a number (it would pass every range check)."""
        for f in fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            if v is None and "None" in kind:
                continue
            base = kind.split("|")[0].strip()
            ok = {"bool": isinstance(v, bool),
                  "int": isinstance(v, int) and not isinstance(v, bool),
                  "float": isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  "str": isinstance(v, str)}[base]
            if not ok:
                what = {"bool": "true or false (a boolean, not a string)", "int": "an integer",
                        "float": "a finite number", "str": "a string"}[base]
                raise ValueError(f"{f.name} must be {what}{' or None' if 'None' in kind else ''}, got {v!r}")

    # ---------------------------------------------------------------- derived shapes
    @property
    def kv_heads(self) -> int:
        """Key/value heads of "mha" attention (n_heads for MHA, fewer for GQA)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def mha_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("config JSON must be an object of field: value")
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file then rename): a crash never leaves half a file."""
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        """A config JSON file; every error names the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
        try:
            return cls.from_json(text)
        except ValueError as e:
            raise ValueError(f"config file {path}: {e}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; allowed: {sorted(known)}")
        return dataclasses.replace(self, **changes)


def with_umask(mode: int) -> int:
    """mode as the process umask leaves it: what open() would give a new file or folder.

    tempfile's mkstemp/mkdtemp start private (0600/0700); files we rename into place should
    look like any other file the user writes.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or deletion inside folder durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temp file in the same folder, fsync, os.replace, fsync the folder.

    A crash (or power loss) leaves either the old file or the new one, never half of it; the
    new file gets ordinary permissions.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, with_umask(0o666))
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename folder src to dst, replacing a dst that exists without ever deleting it first.

    The old dst is renamed aside and deleted only once src is in its place; if that rename
    fails, the old folder is put back. So at every moment one complete folder is at dst, but
    for the instant between the two renames.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    parent = os.path.dirname(os.path.abspath(dst))
    aside = None
    if os.path.lexists(dst):
        aside = os.path.join(parent, f"{ASIDE_PREFIX}{os.path.basename(os.path.normpath(dst))}-{os.urandom(4).hex()}")
        os.rename(dst, aside)  # a fresh name: never onto anything (dst may also be a file or a link)
    try:
        os.replace(src, dst)
    except BaseException:
        if aside is not None:
            os.rename(aside, dst)
        raise
    fsync_dir(parent)
    if aside is not None:
        remove_path(aside)


# replace_dir's name for the folder it moves aside: ASIDE_PREFIX + the folder's name + "-" + 8 hex digits
ASIDE_PREFIX = ".old-"


def aside_origin(entry: str) -> str | None:
    """The name a folder replace_dir moved aside had (None for any other name)."""
    if not entry.startswith(ASIDE_PREFIX) or entry.count("-") < 2:
        return None
    return entry[len(ASIDE_PREFIX):].rsplit("-", 1)[0]


def remove_path(path: str) -> None:
    """Delete a folder tree, or a file or link (never what a link points to)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["key=value", ...] into typed ModelConfig changes (for --set on the CLI)."""
    types = {f.name: f.type for f in fields(ModelConfig)}
    out: dict[str, Any] = {}
    for kv in pairs:
        if "=" not in kv:
            raise ValueError(f"--set expects key=value, got {kv!r}")
        key, raw = kv.split("=", 1)
        key = key.strip()
        if key not in types:
            raise ValueError(f"--set: unknown field {key!r}; allowed: {sorted(types)}")
        out[key] = _parse_value(key, raw.strip(), str(types[key]))
    return out


def _parse_value(key: str, raw: str, type_name: str) -> Any:
    if raw.lower() in ("none", "null") and "None" in type_name:
        return None
    try:
        if type_name.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"--set {key}: cannot parse {raw!r} as {type_name}") from None
    return raw


# ---------------------------------------------------------------------- presets
# Official shapes from the published configs. The large ones are for the calculator and
# meta-device builds: nobody allocates 671B parameters.
PRESETS: dict[str, ModelConfig] = {
    # Trains in minutes on 2 CPU cores: MLA, 1 dense + 3 MoE layers, 8 experts top-2 + 1 shared,
    # sigmoid scores, group-limited routing and the aux-loss-free bias, as in DeepSeek-V3.
    "toy": ModelConfig(
        vocab_size=256, dim=128, n_layers=4, n_heads=4, max_seq_len=256,
        attn="mla", q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, inter_dim=384, n_dense_layers=1, n_routed_experts=8, n_shared_experts=1,
        n_activated_experts=2, moe_inter_dim=96, n_expert_groups=4, n_limited_groups=2,
        score_func="sigmoid", route_scale=1.0, norm_topk_prob=True, bias_update_speed=1e-3,
        seq_aux_loss_alpha=1e-4,
    ),
    "deepseek-v3": ModelConfig(
        vocab_size=129280, dim=7168, n_layers=61, n_heads=128, max_seq_len=163840,
        attn="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, inter_dim=18432, n_dense_layers=3, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, moe_inter_dim=2048, n_expert_groups=8, n_limited_groups=4,
        score_func="sigmoid", route_scale=2.5, norm_topk_prob=True, bias_update_speed=1e-3,
        seq_aux_loss_alpha=1e-4, n_mtp=1, mtp_loss_weight=0.3,
        init_std=0.006,  # technical report section 4.2: every parameter ~ N(0, 0.006)
        # YaRN as DeepSeek's inference/model.py ModelArgs (config_671B.json keeps its defaults) and the V3
        # report's long-context extension: s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1
        original_seq_len=4096, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
    ),
    "deepseek-v2": ModelConfig(
        vocab_size=102400, dim=5120, n_layers=60, n_heads=128, max_seq_len=163840,
        attn="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, inter_dim=12288, n_dense_layers=1, n_routed_experts=160, n_shared_experts=2,
        n_activated_experts=6, moe_inter_dim=1536, n_expert_groups=8, n_limited_groups=3,
        score_func="softmax", route_scale=16.0, norm_topk_prob=False, aux_loss_alpha=3e-3,
        init_std=0.006,  # DeepSeek-V2 report, training hyper-parameters: N(0, 0.006)
        # YaRN as the V2 report's long-context extension: s = 40, alpha = 1, beta = 32 over 4096 positions,
        # sqrt(t) = 0.0707 ln s + 1, i.e. mscale 0.707. (DeepSeek-V3's inference/configs/config_236B.json
        # omits mscale, so that code would run V2 with 1.0; its config_16B.json for V2-Lite sets 0.707.)
        original_seq_len=4096, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
    ),
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, max_seq_len=163840,
        attn="mla", q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, inter_dim=10944, n_dense_layers=1, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, moe_inter_dim=1408, n_expert_groups=1, n_limited_groups=1,
        score_func="softmax", route_scale=1.0, norm_topk_prob=False, aux_loss_alpha=1e-3,
        init_std=0.006,  # as DeepSeek-V2
        # YaRN as inference/configs/config_16B.json (mscale 0.707) and the released config.json
        original_seq_len=4096, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
    ),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, max_seq_len=32768, rope_theta=1e6,
        norm_eps=1e-5, attn="mha", n_kv_heads=8, head_dim=128, inter_dim=14336, n_dense_layers=0,
        n_routed_experts=8, n_shared_experts=0, n_activated_experts=2, moe_inter_dim=14336,
        score_func="softmax", route_scale=1.0, norm_topk_prob=True,
        # config.json's router_aux_loss_coef 0.02, normalised as ours (moe.interop.hf.aux_alpha_from_hf):
        # transformers' loss over all layers pooled is top_k x ours per layer, and we sum 32 layers
        aux_loss_alpha=0.02 * 2 / 32,
        original_seq_len=32768, rope_factor=1.0,  # plain RoPE over the whole context: no YaRN
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return PRESETS[name]


def dense_baseline(cfg: ModelConfig) -> ModelConfig:
    """A dense model with about the same per-token FLOPs as cfg: for equal-active comparisons.

    Every block gets one dense SwiGLU of width (top_k + n_shared) * moe_inter_dim, which is
    exactly the FFN width a token meets in cfg's MoE layers (the few leading dense blocks of
    cfg change width to match). Routing and the idle experts are gone.
    """
    if cfg.n_moe_layers == 0:
        return cfg
    width = (cfg.n_activated_experts + cfg.n_shared_experts) * cfg.moe_inter_dim
    return cfg.replace(n_dense_layers=cfg.n_layers, inter_dim=width)
