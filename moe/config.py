"""ModelConfig: the one source of truth for every shape in the project.

Field names follow DeepSeek-V3's reference `ModelArgs` wherever one exists, so this file can
be read side by side with the official code. Every behaviour is a named field: nothing is
switched on by a magic size (the reference enables its routing bias only when dim == 7168).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, fields
from typing import Any


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
    init_std: float = 0.02  # std of the normal init of every weight matrix

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
    expert_impl: str = "auto"  # expert compute: "loop" (reference), "grouped" (grouped_mm), "auto"

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
        """Reject every impossible combination, naming the field(s) and allowed values."""
        positive = ["vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "inter_dim",
                    "n_routed_experts", "n_activated_experts", "moe_inter_dim",
                    "n_expert_groups", "n_limited_groups"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        non_negative = ["n_dense_layers", "n_shared_experts", "n_mtp", "q_lora_rank"]
        for name in non_negative:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ["bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_coef",
                     "mtp_loss_weight"]:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        for name in ["norm_eps", "rope_theta", "init_std", "route_scale"]:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")

        if self.attn not in ("mha", "mla"):
            raise ValueError(f"attn must be one of 'mha', 'mla', got {self.attn!r}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be one of 'softmax', 'sigmoid', got {self.score_func!r}")
        if self.expert_impl not in ("auto", "loop", "grouped"):
            raise ValueError(f"expert_impl must be one of 'auto', 'loop', 'grouped', got {self.expert_impl!r}")
        if self.fp8 not in ("none", "blockwise", "rowwise", "tensorwise", "bf16"):  # moe.fp8.RECIPES
            raise ValueError(f"fp8 must be one of 'none', 'blockwise', 'rowwise', 'tensorwise', 'bf16', "
                             f"got {self.fp8!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers})")

        if self.attn == "mha":
            kv = self.n_kv_heads if self.n_kv_heads is not None else self.n_heads
            if not isinstance(kv, int) or kv <= 0 or self.n_heads % kv:
                raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must be a positive divisor of "
                                 f"n_heads ({self.n_heads}) (or None)")
            if self.head_dim is None and self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "when head_dim is None; or set head_dim explicitly")
            hd = self.head_dim if self.head_dim is not None else self.dim // self.n_heads
            if not isinstance(hd, int) or hd <= 0 or hd % 2:
                raise ValueError(f"head_dim must be a positive even integer (RoPE rotates pairs), got {hd!r}")
        else:
            for name in ["kv_lora_rank", "qk_rope_head_dim", "v_head_dim"]:
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise ValueError(f"{name} must be a positive integer for attn='mla', got {v!r}")
            if not isinstance(self.qk_nope_head_dim, int) or self.qk_nope_head_dim < 0:
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
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())

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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temp file in the same folder and os.replace (ordinary permissions)."""
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    ),
    "deepseek-v2": ModelConfig(
        vocab_size=102400, dim=5120, n_layers=60, n_heads=128, max_seq_len=163840,
        attn="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, inter_dim=12288, n_dense_layers=1, n_routed_experts=160, n_shared_experts=2,
        n_activated_experts=6, moe_inter_dim=1536, n_expert_groups=8, n_limited_groups=3,
        score_func="softmax", route_scale=16.0, norm_topk_prob=False, aux_loss_alpha=3e-3,
    ),
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, max_seq_len=163840,
        attn="mla", q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, inter_dim=10944, n_dense_layers=1, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, moe_inter_dim=1408, n_expert_groups=1, n_limited_groups=1,
        score_func="softmax", route_scale=1.0, norm_topk_prob=False, aux_loss_alpha=1e-3,
    ),
    "mixtral-8x7b": ModelConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, max_seq_len=32768, rope_theta=1e6,
        norm_eps=1e-5, attn="mha", n_kv_heads=8, head_dim=128, inter_dim=14336, n_dense_layers=0,
        n_routed_experts=8, n_shared_experts=0, n_activated_experts=2, moe_inter_dim=14336,
        score_func="softmax", route_scale=1.0, norm_topk_prob=True, aux_loss_alpha=2e-2,
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
