"""Accounting: parameters (total / active), FLOPs, memory, KV cache and training cost.

Pure functions of a ModelConfig: nothing here allocates a model, so the 671B preset costs
microseconds, and "671B total, 37B active" is derived from the same config that builds the
model. `weight_list` mirrors, line for line, the modules that create the parameters
(model.py, attention.py, layer.py, router.py, experts.py, mtp.py); tests check the totals
against sum(p.numel()) of meta-device builds for every preset and for random configs.

Conventions (DESIGN.md):
  total  = every parameter of the main model: embedding and output head included (once when
           tied); the MTP modules are reported separately ("mtp"), they can be dropped at
           inference. The router's correction bias is a buffer, not a parameter.
  active = total minus the routed experts a token does not use: (E - K) experts per MoE layer.
           The embedding row a token reads counts as active, though it costs no FLOPs.
  FLOPs  = 2*m*n*k per matmul, forward, per token; elementwise work (norms, SwiGLU gate,
           softmax, RoPE) is ignored. Training = 3x forward (backward ~ 2x forward).
  memory = bytes of weights or training state (no framework overhead); GB = 1e9 bytes, and a
           "24 GB" consumer card is taken as 24e9 usable bytes. Of the activations, only the
           inputs of linear layers cached for backward are counted (linear_input_bytes_per_token).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from moe.cli import non_negative_float, positive_float, positive_int
from moe.config import PRESETS, ModelConfig, get_preset, parse_overrides

GB = 1e9
CONSUMER_CARD_GB = 24.0  # RTX 3090 / 4090 class
FP8_BLOCK = 128  # DeepSeek-V3: one fp32 scale per 128x128 block of an FP8 weight matrix

# DeepSeek-V3 technical report, Table 1: H800 GPU-hours of the final training run, at $2/hour.
DEEPSEEK_V3_GPU_HOURS = {"pre-training": 2_664_000, "context extension": 119_000, "post-training": 5_000}
DEEPSEEK_V3_PRICE_PER_GPU_HOUR = 2.0
DEEPSEEK_V3_TRAIN_TOKENS = 14.8e12
H800_PEAK_BF16_TFLOPS = 989.5  # dense BF16 tensor-core peak (same as H100 SXM); FP8 is 2x

# Published totals (billions), for tests and docs: (total, active).
PUBLISHED = {
    "deepseek-v3": (671.0, 37.0),
    "deepseek-v2": (236.0, 21.0),
    "deepseek-v2-lite": (15.7, 2.4),
    "mixtral-8x7b": (46.7, 12.9),
}


# ---------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Weight:
    """One parameter tensor, repeated `copies` times (layers x experts)."""

    group: str  # breakdown key: embedding, head, attention, norms, dense_ffn, shared_experts, ...
    name: str  # where it lives, e.g. "layers.moe.attn.wkv_b"
    shape: tuple[int, ...]  # one copy; matrices as (out, in), norms as (dim,)
    copies: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies


def _attention_weights(cfg: ModelConfig, where: str, n: int) -> list[Weight]:
    D, H = cfg.dim, cfg.n_heads
    if cfg.attn == "mha":
        hd, kv = cfg.mha_head_dim, cfg.kv_heads
        return [Weight("attention", f"{where}.wq", (H * hd, D), n),
                Weight("attention", f"{where}.wk", (kv * hd, D), n),
                Weight("attention", f"{where}.wv", (kv * hd, D), n),
                Weight("attention", f"{where}.wo", (D, H * hd), n)]
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank == 0:
        ws = [Weight("attention", f"{where}.wq", (H * qk, D), n)]
    else:
        ws = [Weight("attention", f"{where}.wq_a", (cfg.q_lora_rank, D), n),
              Weight("norms", f"{where}.q_norm", (cfg.q_lora_rank,), n),
              Weight("attention", f"{where}.wq_b", (H * qk, cfg.q_lora_rank), n)]
    return ws + [Weight("attention", f"{where}.wkv_a", (C + R, D), n),
                 Weight("norms", f"{where}.kv_norm", (C,), n),
                 Weight("attention", f"{where}.wkv_b", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), C), n),
                 Weight("attention", f"{where}.wo", (D, H * cfg.v_head_dim), n)]


def _block_weights(cfg: ModelConfig, use_moe: bool, where: str, n: int) -> list[Weight]:
    """One `Block` (pre-norms, attention, dense MLP or MoE), repeated n times."""
    D = cfg.dim
    ws = [Weight("norms", f"{where}.attn_norm", (D,), n), Weight("norms", f"{where}.ffn_norm", (D,), n)]
    ws += _attention_weights(cfg, f"{where}.attn", n)
    if not use_moe:
        F = cfg.inter_dim
        return ws + [Weight("dense_ffn", f"{where}.ffn.{w}", s, n)
                     for w, s in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F)))]
    E, I = cfg.n_routed_experts, cfg.moe_inter_dim
    ws.append(Weight("router", f"{where}.ffn.router", (E, D), n))
    ws += [Weight("routed_experts", f"{where}.ffn.experts.{w}", s, n * E)
           for w, s in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I)))]
    if cfg.n_shared_experts:  # n shared experts of width I = one MLP of width n * I
        S = cfg.n_shared_experts * I
        ws += [Weight("shared_experts", f"{where}.ffn.shared.{w}", s, n)
               for w, s in (("w1", (S, D)), ("w3", (S, D)), ("w2", (D, S)))]
    return ws


def weight_list(cfg: ModelConfig) -> list[Weight]:
    """Every parameter tensor of the main model (no MTP), in build order."""
    D, V = cfg.dim, cfg.vocab_size
    ws = [Weight("embedding", "embed", (V, D))]
    for use_moe, where, n in ((False, "layers.dense", cfg.n_dense_layers), (True, "layers.moe", cfg.n_moe_layers)):
        if n:
            ws += _block_weights(cfg, use_moe, where, n)
    ws.append(Weight("norms", "norm", (D,)))
    if not cfg.tie_embeddings:  # tied: the head IS the embedding matrix, counted once
        ws.append(Weight("head", "head", (V, D)))
    return ws


def mtp_weight_list(cfg: ModelConfig) -> list[Weight]:
    """The n_mtp MTP modules: two input norms, a 2D -> D projection, one Block, an output norm.

    They share the main model's embedding and head, so those are not repeated here.
    """
    n, D = cfg.n_mtp, cfg.dim
    if n == 0:
        return []
    return ([Weight("norms", "mtp.hnorm", (D,), n), Weight("norms", "mtp.enorm", (D,), n),
             Weight("mtp_proj", "mtp.proj", (D, 2 * D), n)]
            + _block_weights(cfg, cfg.n_moe_layers > 0, "mtp.block", n)
            + [Weight("norms", "mtp.norm", (D,), n)])


GROUPS = ("embedding", "head", "attention", "norms", "dense_ffn", "shared_experts", "routed_experts", "router")


def _unused_expert_params(cfg: ModelConfig, n_moe_blocks: int) -> int:
    """Routed-expert weights a token skips: (E - K) experts of 3*D*I in each MoE block."""
    return n_moe_blocks * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by group, "total" and "active" (main model), and "mtp" / "mtp_active".

    total + mtp == sum(p.numel() for p in Transformer(cfg).parameters()), exactly.
    """
    out = dict.fromkeys(GROUPS, 0)
    for w in weight_list(cfg):
        out[w.group] += w.numel
    out["total"] = sum(out[g] for g in GROUPS)
    out["routed_experts_active"] = out["routed_experts"] - _unused_expert_params(cfg, cfg.n_moe_layers)
    out["active"] = out["total"] - _unused_expert_params(cfg, cfg.n_moe_layers)
    out["mtp"] = sum(w.numel for w in mtp_weight_list(cfg))
    mtp_moe_blocks = cfg.n_mtp if cfg.n_moe_layers > 0 else 0
    out["mtp_active"] = out["mtp"] - _unused_expert_params(cfg, mtp_moe_blocks)
    out["total_with_mtp"] = out["total"] + out["mtp"]
    return out


def dense_equal_total(cfg: ModelConfig) -> ModelConfig:
    """A dense model of (about) the same total size: every block a SwiGLU as wide as all its experts.

    The articles' contrast: a dense model keeps every parameter "always active". Same trunk and
    attention; the FFN width is set so the FFN parameters match cfg's (within rounding).
    """
    p = count_params(cfg)
    ffn = p["dense_ffn"] + p["shared_experts"] + p["routed_experts"] + p["router"]
    width = max(1, round(ffn / (3 * cfg.dim * cfg.n_layers)))
    return cfg.replace(n_dense_layers=cfg.n_layers, inter_dim=width)


def dense_equal_active(cfg: ModelConfig) -> ModelConfig:
    """A dense model with (about) the same ACTIVE parameters and FLOPs per token as cfg.

    Every block a SwiGLU as wide as the mean FFN a token meets in cfg: leading dense blocks,
    shared and chosen experts and the router, averaged over blocks. `moe.config.dense_baseline`
    instead gives every block the MoE blocks' width, so it is smaller when cfg's dense blocks
    are wider (the toy: 4.9% fewer active parameters).
    """
    p = count_params(cfg)
    ffn = p["dense_ffn"] + p["shared_experts"] + p["routed_experts_active"] + p["router"]
    width = max(1, round(ffn / (3 * cfg.dim * cfg.n_layers)))
    return cfg.replace(n_dense_layers=cfg.n_layers, inter_dim=width)


# ---------------------------------------------------------------------------- FLOPs
def attention_context_flops(cfg: ModelConfig, context: float, absorbed: bool = False) -> float:
    """Per token per layer: scores (q.k) plus weighted values (p.v) over `context` keys.

    MHA/GQA: 2*H*d*L each. MLA as trained (naive): keys are H*(nope+rope) wide, values H*v.
    MLA absorbed (decode): attend over the latent directly, scores H*(C+R), values H*C wide.
    """
    H, L = cfg.n_heads, context
    if cfg.attn == "mha":
        return 4 * H * cfg.mha_head_dim * L
    if absorbed:
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        return 2 * H * (C + R) * L + 2 * H * C * L
    return 2 * H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) * L + 2 * H * cfg.v_head_dim * L


def _matmul_flops(ws: list[Weight], groups: tuple[str, ...]) -> int:
    return sum(2 * w.numel for w in ws if w.group in groups)


def forward_flops_per_token(cfg: ModelConfig, context: float = 0.0, absorbed: bool = False,
                            include_mtp: bool = False) -> dict[str, float]:
    """Forward FLOPs for one token that attends to `context` keys, by part, and their "total".

    Every projection is applied once per token, so its cost is 2 * its weights; a routed MoE
    layer pays only its K chosen experts. MLA's absorbed form moves W_uk / W_uv from the keys
    to the query and output, which costs exactly as much per token as the naive form.
    """
    ws = weight_list(cfg)
    out: dict[str, float] = {
        "attention_proj": _matmul_flops(ws, ("attention",)),
        "attention_context": cfg.n_layers * attention_context_flops(cfg, context, absorbed),
        "dense_ffn": _matmul_flops(ws, ("dense_ffn",)),
        "shared_experts": _matmul_flops(ws, ("shared_experts",)),
        "routed_experts": 2 * count_params(cfg)["routed_experts_active"],
        "router": _matmul_flops(ws, ("router",)),
        "head": 2 * cfg.dim * cfg.vocab_size,  # the head is a matmul even when tied
    }
    if include_mtp and cfg.n_mtp:
        p = count_params(cfg)
        norms = sum(w.numel for w in mtp_weight_list(cfg) if w.group == "norms")
        per_depth = (attention_context_flops(cfg, context, absorbed) + 2 * cfg.dim * cfg.vocab_size)
        out["mtp"] = 2 * (p["mtp_active"] - norms) + cfg.n_mtp * per_depth
    out["total"] = sum(out.values())
    return out


def training_flops(cfg: ModelConfig, tokens: float, seq_len: int | None = None,
                   include_mtp: bool = True) -> dict[str, float]:
    """Training compute two ways: 3x the forward count (causal mean context (S+1)/2), and 6*N*D.

    N for 6ND = active parameters that do matmuls (active minus the input embedding, whose
    lookup is free). The 3x-forward figure also counts attention over the context and MTP.
    """
    S = seq_len or cfg.max_seq_len
    fwd = forward_flops_per_token(cfg, context=(S + 1) / 2, include_mtp=include_mtp)["total"]
    n = count_params(cfg)["active"] - cfg.vocab_size * cfg.dim * (not cfg.tie_embeddings)
    return {"tokens": tokens, "seq_len": S, "per_token": 3 * fwd, "total": 3 * fwd * tokens,
            "n_for_6nd": n, "six_n_d": 6 * n * tokens}


# ---------------------------------------------------------------------------- memory
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}
PRECISIONS = tuple(BYTES_PER_PARAM)
FP8_GROUPS = ("attention", "dense_ffn", "shared_experts", "routed_experts", "mtp_proj")


def fp8_scale_count(ws: list[Weight]) -> int:
    """fp32 scales of DeepSeek's block quantisation: ceil(out/128) * ceil(in/128) per matrix."""
    return sum(math.ceil(w.shape[0] / FP8_BLOCK) * math.ceil(w.shape[1] / FP8_BLOCK) * w.copies
               for w in ws if w.group in FP8_GROUPS)


def weight_bytes(cfg: ModelConfig, precision: str, include_mtp: bool = False) -> float:
    """Bytes to hold the weights.

    fp32 / bf16: 4 / 2 bytes per parameter. fp8 follows DeepSeek-V3's released checkpoint: the
    linear layers (attention, FFN, experts, MTP projection) in 1 byte plus an fp32 scale per
    128x128 block; embedding, head, router and norms stay bf16. int4 is a lower bound
    (0.5 byte for every parameter, no scales) for the "quantise it to fit" question.
    """
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"unknown precision {precision!r}; allowed: {list(PRECISIONS)}")
    ws = weight_list(cfg) + (mtp_weight_list(cfg) if include_mtp else [])
    if precision != "fp8":
        return BYTES_PER_PARAM[precision] * sum(w.numel for w in ws)
    low = sum(w.numel for w in ws if w.group in FP8_GROUPS)
    high = sum(w.numel for w in ws if w.group not in FP8_GROUPS)
    return 1.0 * low + 2.0 * high + 4.0 * fp8_scale_count(ws)


# Bytes per parameter of the training state (activations excluded), by recipe.
RECIPES: dict[str, dict[str, float]] = {
    # everything fp32: weights, gradients, Adam m and v (the weights are the master copy)
    "fp32-adamw": {"weights": 4, "grads": 4, "master": 0, "moments": 8},
    # classic mixed precision: bf16 weights and grads, fp32 master and fp32 moments
    "bf16-mixed-adamw": {"weights": 2, "grads": 2, "master": 4, "moments": 8},
    # DeepSeek-V3 (report sec. 3.3): bf16 moments, fp32 master weights and fp32 gradient
    # accumulation; bf16 working weights, cast to fp8 inside the GEMMs
    "deepseek-v3": {"weights": 2, "grads": 4, "master": 4, "moments": 4},
}


def training_state_bytes(cfg: ModelConfig, recipe: str, include_mtp: bool = True) -> dict[str, float]:
    """Weights + gradients + master copy + AdamW moments, in bytes; "optimizer" = master + moments."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; allowed: {list(RECIPES)}")
    p = count_params(cfg)
    n = p["total"] + (p["mtp"] if include_mtp else 0)
    out = {k: b * n for k, b in RECIPES[recipe].items()}
    out["optimizer"] = out["master"] + out["moments"]
    out["total"] = out["weights"] + out["grads"] + out["optimizer"]
    out["bytes_per_param"] = sum(RECIPES[recipe].values())
    return out


def cards_needed(n_bytes: float, card_gb: float = CONSUMER_CARD_GB) -> int:
    """How many cards of card_gb just to hold n_bytes (a lower bound: no KV cache, no activations)."""
    return math.ceil(n_bytes / (card_gb * GB))


# ---------------------------------------------------------------------------- activations
# What FP8 training changes for activations (DeepSeek-V3 report, section 3.3.3, "Low-Precision
# Activation"): the input of every FP8 linear layer, kept for its weight-gradient GEMM, is cached in
# FP8 with one fp32 scale per 1x128 tile, except the input of the linear after attention (wo),
# kept in DeepSeek's E5M6 (12 bits) with power-of-two scales, because attention's own backward
# reads it too. Router and head run in high precision: their inputs stay bf16. Not modelled: the
# SwiGLU inputs DeepSeek caches in FP8 (and recomputes the SwiGLU from), attention internals,
# norms, and activation recomputation in general.
ACTIVATION_STORAGES = ("bf16", "fp8")
_CACHED_BYTES = {"bf16": {"fp8": 2.0, "e5m6": 2.0, "high": 2.0},  # bytes per number, by how it is kept
                 "fp8": {"fp8": 1.0, "e5m6": 1.5, "high": 2.0}}


def linear_inputs(cfg: ModelConfig, include_mtp: bool = True) -> list[tuple[str, int, str, int]]:
    """(group, width, kind, copies per token) of each distinct linear-layer input, for all layers.

    kind: "fp8" (an FP8 GEMM reads it), "e5m6" (attention output, the input of wo), "high"
    (router, head). One tensor feeding several linears (x into wq and wkv_a) is counted once;
    each of a token's K routed experts gets its own copy of the token (copies = K * layers).
    """
    D, K, I = cfg.dim, cfg.n_activated_experts, cfg.moe_inter_dim

    def block(n: int, use_moe: bool) -> list[tuple[str, int, str, int]]:
        if cfg.attn == "mla":
            attn = [("attention", D, "fp8", n), ("attention", cfg.kv_lora_rank, "fp8", n),
                    ("attention", cfg.n_heads * cfg.v_head_dim, "e5m6", n)]
            if cfg.q_lora_rank:
                attn.append(("attention", cfg.q_lora_rank, "fp8", n))
        else:
            attn = [("attention", D, "fp8", n), ("attention", cfg.n_heads * cfg.mha_head_dim, "e5m6", n)]
        if not use_moe:
            return attn + [("dense_ffn", D, "fp8", n), ("dense_ffn", cfg.inter_dim, "fp8", n)]
        ffn = [("router", D, "high", n), ("routed_experts", D, "fp8", n * K), ("routed_experts", I, "fp8", n * K)]
        if cfg.n_shared_experts:
            ffn += [("shared_experts", D, "fp8", n), ("shared_experts", cfg.n_shared_experts * I, "fp8", n)]
        return attn + ffn

    out = block(cfg.n_dense_layers, False) + block(cfg.n_moe_layers, True) + [("head", D, "high", 1)]
    if include_mtp and cfg.n_mtp:
        mtp = [("mtp_proj", 2 * D, "fp8", cfg.n_mtp)] + block(cfg.n_mtp, cfg.n_moe_layers > 0)
        out += [("mtp", w, kind, c) for _, w, kind, c in mtp] + [("mtp", D, "high", cfg.n_mtp)]  # its head
    return [e for e in out if e[3] > 0]


def linear_input_bytes_per_token(cfg: ModelConfig, storage: str = "fp8", include_mtp: bool = True) -> dict[str, float]:
    """Bytes per token of the cached linear-layer inputs, by group and "total".

    storage "bf16": every input in bf16 (2 bytes). "fp8": DeepSeek-V3's caching (above): 1 byte
    (E4M3) or 1.5 bytes (E5M6) per number plus a 4-byte scale per started 128 numbers; bf16 for
    router and head inputs.
    """
    if storage not in _CACHED_BYTES:
        raise ValueError(f"unknown storage {storage!r}; allowed: {list(ACTIVATION_STORAGES)}")
    out: dict[str, float] = {}
    for group, width, kind, copies in linear_inputs(cfg, include_mtp):
        b = width * _CACHED_BYTES[storage][kind]
        if storage == "fp8" and kind != "high":
            b += 4 * math.ceil(width / FP8_BLOCK)
        out[group] = out.get(group, 0.0) + b * copies
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------- KV cache
def kv_cache_elems(cfg: ModelConfig, absorbed: bool = True) -> int:
    """Cached numbers per token per layer.

    MHA/GQA: K and V for every key/value head, 2 * n_kv_heads * head_dim (MHA: n_kv = n_heads).
    MLA naive: the expanded per-head keys (nope + rope) and values, H * (nope + rope + v).
    MLA absorbed (what moe.attention caches): the latent and the shared RoPE key, C + R.
    """
    if cfg.attn == "mha":
        return 2 * cfg.kv_heads * cfg.mha_head_dim
    if absorbed:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16", absorbed: bool = True) -> dict[str, float]:
    """KV-cache bytes for one token: "per_layer" and over all layers ("per_token")."""
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {list(PRECISIONS)}")
    per_layer = kv_cache_elems(cfg, absorbed) * BYTES_PER_PARAM[dtype]
    return {"per_layer": per_layer, "per_token": per_layer * cfg.n_layers}


def kv_cache_variants(cfg: ModelConfig, gqa_groups: int = 8) -> dict[str, int]:
    """Cached numbers per token per layer if cfg's heads used MHA, GQA, MQA or (for MLA) MLA.

    Uses cfg's head count and key/value widths, so the rows differ only in what is cached:
    the comparison of the DeepSeek-V2 paper's Table 1.
    """
    H = cfg.n_heads
    if cfg.attn == "mha":
        dk = dv = cfg.mha_head_dim
    else:
        dk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    g = math.gcd(H, gqa_groups)
    out = {"MHA": H * (dk + dv), f"GQA ({g} groups)": g * (dk + dv), "MQA": dk + dv}
    if cfg.attn == "mla":
        out["MLA"] = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return out


# ---------------------------------------------------------------------------- cost
def training_cost(gpu_hours: float, price_per_gpu_hour: float) -> float:
    """Rental cost of the GPU-hours: the only thing the famous $5.6M measures."""
    return gpu_hours * price_per_gpu_hour


def implied_utilisation(flops: float, gpu_hours: float, peak_tflops: float = H800_PEAK_BF16_TFLOPS) -> float:
    """Fraction of peak the GPUs must have sustained to do `flops` in `gpu_hours`."""
    return flops / (gpu_hours * 3600 * peak_tflops * 1e12)


def deepseek_v3_cost() -> dict[str, float]:
    """The report's arithmetic: 2.788M H800-hours x $2 = $5.576M (final run only)."""
    hours = sum(DEEPSEEK_V3_GPU_HOURS.values())
    return {"gpu_hours": hours, "price_per_gpu_hour": DEEPSEEK_V3_PRICE_PER_GPU_HOUR,
            "cost_usd": training_cost(hours, DEEPSEEK_V3_PRICE_PER_GPU_HOUR),
            **{f"gpu_hours_{k.replace(' ', '_').replace('-', '_')}": v for k, v in DEEPSEEK_V3_GPU_HOURS.items()}}


# ---------------------------------------------------------------------------- expert-parallel traffic
# moe/parallel.py sends one row of D numbers per (token, expert) assignment whose expert lives
# on another rank, four times per MoE layer and training step: the forward dispatch (token ->
# expert) and combine (expert -> token), and their gradients in the backward (the combine's
# gradient travels token -> expert, the dispatch's expert -> token). Routing is taken as
# uniform (what the balancing aims at): an assignment stays on its rank with chance 1 / ep.
GPUS_PER_NODE = 8  # an H800/H100 node: 8 GPUs on NVLink, InfiniBand between nodes (DeepSeek-V3's cluster)
COMM_DTYPES = ("fp32", "bf16", "fp8")


def _row_bytes(cfg: ModelConfig, dtype: str) -> dict[str, float]:
    """Bytes of one row each way. fp8 is DeepSeek-V3's recipe (report 3.3.2): rows towards the experts
    (forward dispatch, the combine's gradient) in FP8 with an fp32 scale per 128 values; rows back
    (forward combine, the dispatch's gradient) in BF16."""
    if dtype not in COMM_DTYPES:
        raise ValueError(f"--comm-dtype must be one of {', '.join(COMM_DTYPES)}, got {dtype!r}")
    D = cfg.dim
    if dtype == "fp8":
        return {"to_experts": D + 4 * math.ceil(D / FP8_BLOCK), "to_tokens": 2 * D}
    return {"to_experts": BYTES_PER_PARAM[dtype] * D, "to_tokens": BYTES_PER_PARAM[dtype] * D}


def ep_moe_layers(cfg: ModelConfig) -> int:
    """MoE layers a token passes in training: the MoE blocks, plus one per MTP module (its block is MoE)."""
    return cfg.n_moe_layers + (cfg.n_mtp if cfg.n_moe_layers else 0)


def ep_traffic(cfg: ModelConfig, ep: int, dtype: str = "bf16", max_nodes: int | None = None,
               batch_tokens: float | None = None, gpus_per_node: int = GPUS_PER_NODE) -> dict:
    """Bytes the expert-parallel all-to-alls send per token and per training step.

    ep ranks hold the E experts (E / ep each). Per token and MoE layer, K * (ep - 1) / ep rows
    leave the token's rank each way. max_nodes (DeepSeek-V3's node-limited routing, M = 4): the
    ranks fill ep / gpus_per_node nodes, each token's experts sit on at most M of them, and a
    token crosses to a node once (then NVLink forwards it to the GPUs holding its experts
    there); so at most M rows per token cross nodes instead of up to K.
    """
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    if ep < 1 or E % ep:
        raise ValueError(f"--ep must be a divisor of n_routed_experts={E}, got {ep}")
    rows = K * (ep - 1) / ep
    b = _row_bytes(cfg, dtype)
    layer = {"dispatch_fwd": rows * b["to_experts"], "combine_fwd": rows * b["to_tokens"],
             "combine_bwd": rows * b["to_experts"], "dispatch_bwd": rows * b["to_tokens"]}
    layer["total"] = sum(layer.values())
    n_layers = ep_moe_layers(cfg)
    out = {"ep": ep, "dtype": dtype, "experts_per_rank": E // ep, "moe_layers": n_layers,
           "rows_per_token_per_layer": rows, "row_bytes": b, "bytes_per_token_per_layer": layer,
           "bytes_per_token": layer["total"] * n_layers}
    if batch_tokens is not None:
        if batch_tokens <= 0:
            raise ValueError(f"--batch-tokens must be > 0, got {batch_tokens}")
        out["batch_tokens"] = batch_tokens
        out["bytes_per_step"] = out["bytes_per_token"] * batch_tokens
    if max_nodes is not None:
        nodes = math.ceil(ep / gpus_per_node)
        if not 1 <= max_nodes <= nodes:
            raise ValueError(f"--nodes must be between 1 and the {nodes} node(s) that {ep} ranks fill "
                             f"({gpus_per_node} GPUs per node), got {max_nodes}")
        per_node = E / nodes  # experts a node holds
        # one row per assignment on another node (what moe.parallel sends), vs one per node touched:
        # without a limit the K experts touch each other node with chance 1 - C(E - E/n, K) / C(E, K)
        naive = K * (nodes - 1) / nodes
        touched = (nodes - 1) * (1 - math.comb(int(E - per_node), K) / math.comb(E, K))
        limited = min(max_nodes, K) * (nodes - 1) / nodes  # the M nodes drawn alike, each holding >= 1 expert
        two_way = b["to_experts"] + b["to_tokens"]
        out["node_limited"] = {
            "nodes": nodes, "gpus_per_node": gpus_per_node, "max_nodes": max_nodes,
            "cross_node_rows_per_token_per_layer": {"per_assignment": naive, "once_per_node": touched,
                                                    "node_limited": limited, "node_limited_max": min(max_nodes, K)},
            "cross_node_bytes_per_token": {"per_assignment": 2 * naive * two_way * n_layers,
                                           "node_limited": 2 * limited * two_way * n_layers},
            "reduction": naive / limited if limited else float("inf"),
        }
    return out


# ---------------------------------------------------------------------------- summary
def default_context(cfg: ModelConfig) -> int:
    """4096 tokens (DeepSeek-V3's pre-training length), or max_seq_len when that is shorter."""
    return min(4096, cfg.max_seq_len)


def summary(cfg: ModelConfig, context: int | None = None, kv_dtype: str = "bf16", tokens: float | None = None,
            gpu_hours: float | None = None, price: float = DEEPSEEK_V3_PRICE_PER_GPU_HOUR,
            card_gb: float = CONSUMER_CARD_GB, peak_tflops: float = H800_PEAK_BF16_TFLOPS,
            gpus: int | None = None, ep: int | None = None, nodes: int | None = None, comm_dtype: str = "bf16",
            batch_tokens: float | None = None) -> dict:
    """Everything the calculator prints, as one JSON-ready dict."""
    context = default_context(cfg) if context is None else context
    if context <= 0:
        raise ValueError(f"--context must be a positive number of tokens, got {context}")
    if card_gb <= 0:
        raise ValueError(f"--card-gb must be > 0, got {card_gb}")
    for flag, v in (("--gpus", gpus), ("--gpu-hours", gpu_hours), ("--tokens", tokens)):
        if v is not None and v <= 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    p = count_params(cfg)
    dense = dense_equal_total(cfg)
    fwd = forward_flops_per_token(cfg, context)
    weights = {k: weight_bytes(cfg, k) for k in PRECISIONS}
    kv = kv_cache_bytes_per_token(cfg, kv_dtype)
    out = {
        "total_params": p["total"],
        "active_params": p["active"],
        "mtp_params": p["mtp"],
        "total_with_mtp_params": p["total_with_mtp"],
        "active_fraction": p["active"] / p["total"],
        "params": p,
        "context": context,
        "flops_per_token": {
            "forward": fwd["total"],
            "forward_matmul": fwd["total"] - fwd["attention_context"],
            "forward_attention_context": fwd["attention_context"],
            # a training sequence of `context` tokens: causal, so a token sees (context + 1) / 2 keys on average
            "training": training_flops(cfg, 1, seq_len=context)["per_token"],
            "dense_equal_total_forward": forward_flops_per_token(dense, context)["total"],
            "breakdown": fwd,
        },
        "dense_equal_total_params": count_params(dense)["total"],
        "weight_gb": {k: v / GB for k, v in weights.items()},
        "card_gb": card_gb,
        "cards_needed": {k: cards_needed(v, card_gb) for k, v in weights.items()},
        "training_state_gb": {r: {k: (v / GB if k != "bytes_per_param" else v)
                                  for k, v in training_state_bytes(cfg, r).items()} for r in RECIPES},
        # inputs of linear layers cached for backward, per token (all layers, +MTP), and one sequence
        "linear_inputs_cached": {st: {"bytes_per_token": b["total"], "gb_at_context": b["total"] * context / GB}
                                 for st in ACTIVATION_STORAGES
                                 for b in [linear_input_bytes_per_token(cfg, st)]},
        "kv_cache": {
            "dtype": kv_dtype,
            "elems_per_token_per_layer": kv_cache_elems(cfg),
            "bytes_per_token_per_layer": kv["per_layer"],
            "bytes_per_token": kv["per_token"],
            "naive_bytes_per_token": kv_cache_bytes_per_token(cfg, kv_dtype, absorbed=False)["per_token"],
            "gb_at_context": kv["per_token"] * context / GB,
        },
    }
    train: dict = {}
    if tokens is not None:
        t = training_flops(cfg, tokens, seq_len=context)
        train.update(tokens=tokens, flops_3x_forward=t["total"], flops_6nd=t["six_n_d"])
    if gpu_hours is not None:
        train.update(gpu_hours=gpu_hours, price_per_gpu_hour=price, cost_usd=training_cost(gpu_hours, price))
        if gpus:
            train.update(gpus=gpus, days=gpu_hours / gpus / 24)
        if tokens is not None:
            train.update(peak_tflops=peak_tflops,
                         utilisation_6nd=implied_utilisation(train["flops_6nd"], gpu_hours, peak_tflops),
                         utilisation_3x_forward=implied_utilisation(train["flops_3x_forward"], gpu_hours, peak_tflops))
    if train:
        out["training"] = train
    if nodes is not None and ep is None:
        raise ValueError("--nodes (each token's experts on at most M nodes) needs --ep N, the expert-parallel ranks")
    if ep is not None:
        out["all_to_all"] = ep_traffic(cfg, ep, comm_dtype, nodes, batch_tokens)
        if gpus and "bytes_per_step" in out["all_to_all"]:
            out["all_to_all"]["bytes_per_step_per_gpu"] = out["all_to_all"]["bytes_per_step"] / gpus
    return out


# ---------------------------------------------------------------------------- formatting
def human(n: float, unit: str = "") -> str:
    """671026404352 -> '671.03B'; with a unit: 93.7e9, 'FLOP' -> '93.72 GFLOP'."""
    prefixes = (("T", "T"), ("B", "G"), ("M", "M"), ("K", "K")) if not unit else \
        (("T", "T"), ("G", "G"), ("M", "M"), ("K", "K"))
    for div, (count_sfx, unit_sfx) in zip((1e12, 1e9, 1e6, 1e3), prefixes):
        if abs(n) >= div:
            return f"{n / div:.2f}{count_sfx}" if not unit else f"{n / div:.2f} {unit_sfx}{unit}"
    text = f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"
    return f"{text} {unit}" if unit else text


def _rows(s: dict) -> list[tuple[str, str]]:
    """(label, value) rows shared by the single table and --compare."""
    p, f, kv = s["params"], s["flops_per_token"], s["kv_cache"]
    rows = [("total params", human(s["total_params"])),
            ("active params / token", f"{human(s['active_params'])} ({100 * s['active_fraction']:.1f}%)"),
            ("MTP params (separate)", human(s["mtp_params"]))]
    rows += [(f"  {g.replace('_', ' ')}", human(p[g])) for g in GROUPS]
    rows += [("context (attention, KV cache)", f"{s['context']} tokens"),
             ("forward FLOPs/token", human(f["forward"], "FLOP")),
             ("  matmuls", human(f["forward_matmul"], "FLOP")),
             ("  attention over context", human(f["forward_attention_context"], "FLOP")),
             ("  dense model, equal total", human(f["dense_equal_total_forward"], "FLOP")),
             ("training FLOPs/token (3x fwd, +MTP)", human(f["training"], "FLOP"))]
    rows += [(f"weights {k}", f"{human(v * GB, 'B')} = {s['cards_needed'][k]} x {s['card_gb']:g} GB")
             for k, v in s["weight_gb"].items()]
    rows += [(f"train state {r} (+MTP)", f"{human(v['total'] * GB, 'B')} ({v['bytes_per_param']:g} B/param)")
             for r, v in s["training_state_gb"].items()]
    act = s["linear_inputs_cached"]
    rows += [("linear inputs cached/token (+MTP)",
              f"bf16 {human(act['bf16']['bytes_per_token'], 'B')}, fp8 as DeepSeek "
              f"{human(act['fp8']['bytes_per_token'], 'B')} "
              f"(-{100 * (1 - act['fp8']['bytes_per_token'] / act['bf16']['bytes_per_token']):.0f}%)"),
             ("  one sequence at context", f"bf16 {human(act['bf16']['gb_at_context'] * GB, 'B')}, "
                                           f"fp8 {human(act['fp8']['gb_at_context'] * GB, 'B')}")]
    rows += [(f"KV cache/token ({kv['dtype']})",
              f"{human(kv['bytes_per_token'], 'B')} ({human(kv['bytes_per_token_per_layer'], 'B')}/layer)"),
             ("  naive, per-head K and V", human(kv["naive_bytes_per_token"], "B")),
             ("  one sequence at context", human(kv["gb_at_context"] * GB, "B"))]
    t = s.get("training")
    if t:
        if "tokens" in t:
            rows += [("train tokens", human(t["tokens"])),
                     ("train FLOPs, 3x forward", f"{t['flops_3x_forward']:.3g}"),
                     ("train FLOPs, 6 N_active D", f"{t['flops_6nd']:.3g}")]
        if "cost_usd" in t:
            rows += [("GPU-hours x price", f"{human(t['gpu_hours'])} x ${t['price_per_gpu_hour']:g} "
                                           f"= ${t['cost_usd']:,.0f}")]
        if "days" in t:
            rows += [("wall clock", f"{t['days']:.1f} days on {t['gpus']:,} GPUs")]
        if "utilisation_6nd" in t:
            rows += [(f"implied utilisation of {t['peak_tflops']:g} TF/s",
                      f"{100 * t['utilisation_6nd']:.1f}% (6ND), {100 * t['utilisation_3x_forward']:.1f}% (3x fwd)")]
    a = s.get("all_to_all")
    if a:
        layer = a["bytes_per_token_per_layer"]
        rows += [(f"all-to-all, EP over {a['ep']} ranks ({a['dtype']})",
                  f"{a['experts_per_rank']} experts/rank, {a['rows_per_token_per_layer']:.3g} rows/token/layer leave"),
                 ("  per token per MoE layer, fwd", f"dispatch {human(layer['dispatch_fwd'], 'B')} + combine "
                                                    f"{human(layer['combine_fwd'], 'B')}"),
                 ("  per token per MoE layer, bwd", f"dispatch {human(layer['dispatch_bwd'], 'B')} + combine "
                                                    f"{human(layer['combine_bwd'], 'B')}"),
                 (f"  per token ({a['moe_layers']} MoE layers, fwd+bwd)", human(a["bytes_per_token"], "B"))]
        if "bytes_per_step" in a:
            per_gpu = (f" ({human(a['bytes_per_step_per_gpu'], 'B')}/GPU)" if "bytes_per_step_per_gpu" in a else "")
            rows += [(f"  per step of {human(a['batch_tokens'])} tokens", human(a["bytes_per_step"], "B") + per_gpu)]
        n = a.get("node_limited")
        if n:
            r = n["cross_node_rows_per_token_per_layer"]
            rows += [(f"  cross-node rows/token/layer ({n['nodes']} nodes)",
                      f"{r['per_assignment']:.3g} per assignment, {r['once_per_node']:.3g} once per node, "
                      f"{r['node_limited']:.3g} (<= {r['node_limited_max']}) on <= {n['max_nodes']} nodes"),
                     ("  cross-node per token, fwd+bwd",
                      f"{human(n['cross_node_bytes_per_token']['per_assignment'], 'B')} -> "
                      f"{human(n['cross_node_bytes_per_token']['node_limited'], 'B')} node-limited "
                      f"({n['reduction']:.2g}x less)")]
    return rows


def format_table(name: str, s: dict) -> str:
    rows = _rows(s)
    w = max(len(r[0]) for r in rows)
    return "\n".join([name, "-" * len(name)] + [f"{a:<{w}}  {b}" for a, b in rows])


def format_compare(named: dict[str, dict]) -> str:
    cols = {n: dict(_rows(s)) for n, s in named.items()}
    labels = [r[0] for r in _rows(next(iter(named.values())))]
    for rows in cols.values():  # rows present in some columns only (e.g. none today) go last
        labels += [k for k in rows if k not in labels]
    w0 = max(len(x) for x in labels)
    widths = {n: max(len(n), *(len(v) for v in c.values())) for n, c in cols.items()}
    lines = [" " * w0 + "  " + "  ".join(f"{n:>{widths[n]}}" for n in cols)]
    for lab in labels:
        lines.append(f"{lab:<{w0}}  " + "  ".join(f"{cols[n].get(lab, '-'):>{widths[n]}}" for n in cols))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def _load(name_or_path: str, overrides: dict, is_file: bool = False) -> ModelConfig:
    """A preset name, or a path to a ModelConfig JSON file; then the --set overrides."""
    is_file = is_file or name_or_path.endswith(".json")
    cfg = ModelConfig.load(name_or_path) if is_file else get_preset(name_or_path)
    return cfg.replace(**overrides) if overrides else cfg


def run_calc(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    opts = dict(context=args.context, kv_dtype=args.kv_dtype, tokens=args.tokens, gpu_hours=args.gpu_hours,
                price=args.price, card_gb=args.card_gb, peak_tflops=args.peak_tflops, gpus=args.gpus,
                ep=args.ep, nodes=args.nodes, comm_dtype=args.comm_dtype, batch_tokens=args.batch_tokens)
    if args.compare:
        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        if not names:
            raise ValueError("--compare expects comma-separated presets or config files, e.g. toy,deepseek-v3")
        named = {n: summary(_load(n, overrides), **opts) for n in names}
        print(json.dumps(named, indent=2) if args.json else format_compare(named))
        return 0
    name = args.config or args.preset or "toy"
    if args.set:
        name += " with " + ", ".join(args.set)
    s = summary(_load(args.config or args.preset or "toy", overrides, is_file=bool(args.config)), **opts)
    print(json.dumps(s, indent=2) if args.json else format_table(name, s))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calc", help="parameters (total/active), FLOPs, memory, KV cache and cost from a config",
        description="Derive parameter counts, FLOPs, memory and KV-cache size from a ModelConfig "
                    "(nothing is allocated). Example: python -m moe calc --preset deepseek-v3")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default: toy)")
    src.add_argument("--config", default=None, help="a ModelConfig JSON file")
    src.add_argument("--compare", default=None, metavar="A,B,C",
                     help="side by side: comma-separated preset names or config .json files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", action="store_true", help="print JSON (keys include total_params, active_params)")
    p.add_argument("--context", type=int, default=None,
                   help="context length for attention FLOPs and KV cache (default: min(4096, max_seq_len))")
    p.add_argument("--kv-dtype", default="bf16", choices=PRECISIONS, help="KV-cache element type")
    p.add_argument("--tokens", type=positive_float, default=None, help="training tokens, e.g. 14.8e12")
    p.add_argument("--gpu-hours", type=positive_float, default=None, help="GPU-hours for the cost line, e.g. 2.788e6")
    p.add_argument("--price", type=non_negative_float, default=DEEPSEEK_V3_PRICE_PER_GPU_HOUR, help="$ per GPU-hour")
    p.add_argument("--gpus", type=int, default=None, help="GPUs running the GPU-hours (wall-clock days)")
    p.add_argument("--peak-tflops", type=positive_float, default=H800_PEAK_BF16_TFLOPS,
                   help="per-GPU peak for the implied utilisation (H800 dense BF16: 989.5)")
    p.add_argument("--card-gb", type=positive_float, default=CONSUMER_CARD_GB, help="consumer card memory in GB")
    p.add_argument("--ep", type=positive_int, default=None, metavar="N",
                   help="expert parallelism over N ranks: bytes the all-to-alls send per token and per step "
                        "(dispatch and combine, forward and backward; uniform routing)")
    p.add_argument("--nodes", type=positive_int, default=None, metavar="M",
                   help=f"with --ep: DeepSeek-V3's node-limited routing, each token's experts on at most M nodes "
                        f"of {GPUS_PER_NODE} GPUs (V3: M = 4 of 8), and the cross-node traffic it saves")
    p.add_argument("--comm-dtype", default="bf16", choices=COMM_DTYPES,
                   help="all-to-all element type; fp8 = DeepSeek-V3: rows to the experts in FP8 with a scale "
                        "per 128 values, rows back in BF16 (default: bf16)")
    p.add_argument("--batch-tokens", type=positive_float, default=None,
                   help="tokens per optimizer step (the global batch) for the per-step traffic; "
                        "DeepSeek-V3: 15360 x 4096 = 62.9e6")
    p.set_defaults(func=run_calc)
