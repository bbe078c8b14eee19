"""Convert between this project's Transformer and transformers' DeepseekV3 and Mixtral.

    cfg, model = from_hf(hf_model)                      # or from_hf(state_dict, config=hf_config)
    hf_config, state_dict = to_hf(model)                # the layout of checkpoints on disk

What changes between the two (nothing is guessed: every tensor has one rule, `Entry.op`):
  - names: `model.layers.3.self_attn.kv_a_proj_with_mqa.weight` <-> `layers.3.attn.wkv_a.weight`, ...
  - routed experts: ours are stacked, w1/w3 [E, D, I] and w2 [E, I, D] (x @ w); checkpoints hold
    one nn.Linear per expert (`experts.N.{gate,up,down}_proj`, Mixtral `experts.N.{w1,w3,w2}`,
    [out, in]), transformers 5 fuses them in memory (`experts.gate_up_proj` [E, 2I, D],
    `experts.down_proj` [E, D, I]). from_hf reads every layout; to_hf writes either.
  - RoPE channels (DeepseekV3): DeepSeek and transformers (rope_interleave=True) rotate the
    pairs (2i, 2i+1) of the rope part of each query head and of the shared rope key; ours rotates
    (i, i + R/2). Same rotation, other channel order: the rope rows of wq / wq_b (per head) and
    of wkv_a are permuted, ours = theirs[0, 2, 4, ..., 1, 3, 5, ...].
  - MTP (DeepseekV3, layer n_layers + k of the checkpoint): DeepSeek's `eh_proj` takes
    [embedding; hidden] (as vLLM and SGLang feed it), ours [hidden; embedding] (the paper's
    order): its two column halves swap. Its `embed_tokens` and `shared_head.head` are copies of
    the main model's (README_WEIGHTS.md: "shares parameters"); ours share them, so from_hf checks
    they are equal. transformers' DeepseekV3ForCausalLM drops these weights on load: read them
    from the checkpoint files (moe.interop.convert does).
  - FP8 (DeepSeek's release): float8_e4m3fn weights with a float32 `weight_scale_inv` per
    128 x 128 block are dequantised (`dequantize_fp8`).
  - config: see config_from_hf / config_to_hf; anything we cannot represent is an error naming
    the field and its value.
Where transformers differs from DeepSeek's reference, we follow the reference (docs/interop.md).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from moe.config import ModelConfig

ARCHS = {"deepseek_v3": "DeepseekV3ForCausalLM", "mixtral": "MixtralForCausalLM"}
EXPERT_LAYOUTS = ("per_expert", "fused")
FP8_BLOCK = 128  # DeepSeek-V3's weight quantisation block (quantization_config.weight_block_size)
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3 (and DeepSeek's reference) q_a/kv_a norms: always 1e-6
DEFAULT_BIAS_UPDATE_SPEED = 1e-3  # V3's gamma; our router keeps a correction bias only when this is > 0


# ------------------------------------------------------------------------------ config
def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return config.to_dict()
    raise ValueError(f"config must be a transformers config or a dict of config.json, got {type(config).__name__}")


def _unsupported(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"unsupported transformers config: {field}={value!r} ({allowed})")


def architecture(hf: dict[str, Any]) -> str:
    """'deepseek_v3' or 'mixtral', from model_type."""
    arch = hf.get("model_type")
    if arch not in ARCHS:
        raise _unsupported("model_type", arch, f"supported: {', '.join(ARCHS)}")
    return arch


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings whichever way the config spells them (transformers 5 `rope_parameters`,
    older `rope_scaling` + `rope_theta`, DeepSeek's released config.json)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def _yarn_from_hf(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
    """Our YaRN fields from transformers' rope parameters, refusing what the reference cannot do."""
    max_pos = hf["max_position_embeddings"]
    if rope["rope_type"] == "default":  # plain RoPE over the whole context; rope_factor 1 keeps it so
        return dict(original_seq_len=max_pos, rope_factor=1.0)
    if rope["rope_type"] != "yarn":
        raise _unsupported("rope_parameters.rope_type", rope["rope_type"], "supported: 'default', 'yarn'")
    original = rope.get("original_max_position_embeddings") or max_pos
    factor = rope.get("factor") or max_pos / original
    if max_pos <= original:  # transformers applies YaRN anyway; the reference only past the original context
        raise _unsupported("rope_parameters.original_max_position_embeddings", original,
                           f"YaRN needs it below max_position_embeddings={max_pos}")
    if not rope.get("truncate", True):
        raise _unsupported("rope_parameters.truncate", rope["truncate"], "the reference rounds the ramp ends")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "supported: 1.0")
    # transformers multiplies cos and sin by attention_factor (= mscale(mscale) / mscale(mscale_all_dim)
    # when both are given, else mscale(1)) and the softmax scale by mscale(mscale_all_dim)^2; the
    # reference has only the second: the first must be 1
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    m = lambda k: 0.1 * k * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = m(mscale) / m(mscale_all_dim) if mscale and mscale_all_dim else m(1.0)
    if abs(attention_factor - 1.0) > 1e-12:
        raise _unsupported("rope_parameters (mscale, mscale_all_dim, attention_factor)",
                           (mscale, mscale_all_dim, rope.get("attention_factor")),
                           "the reference scales the softmax only: mscale must equal mscale_all_dim")
    return dict(original_seq_len=int(original), rope_factor=float(factor),
                beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                mscale=float(mscale_all_dim or 0.0))


def _require(hf: dict[str, Any], field: str, allowed: tuple, default: Any = None) -> None:
    value = hf.get(field, default)
    if value not in allowed:
        raise _unsupported(field, value, f"supported: {', '.join(map(repr, allowed))}")


def config_from_hf(config: Any, n_mtp: int = 0, **overrides: Any) -> ModelConfig:
    """Our ModelConfig for a transformers DeepseekV3 / Mixtral config (object or config.json dict).

    n_mtp: MTP modules present in the weights (transformers' config says how many the checkpoint
    had, not whether they were loaded). overrides: any ModelConfig field (e.g. max_seq_len).
    """
    hf = _as_dict(config)
    arch = architecture(hf)
    try:
        return _config_from_hf(hf, arch, n_mtp, overrides)
    except KeyError as e:
        raise ValueError(f"the {arch} config has no {e.args[0]!r}, which the conversion needs") from None


def _config_from_hf(hf: dict[str, Any], arch: str, n_mtp: int, overrides: dict[str, Any]) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    _require(hf, "attention_bias", (False,), False)
    rope = _rope(hf)
    common = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], max_seq_len=hf["max_position_embeddings"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope["rope_theta"]), init_std=float(hf.get("initializer_range", 0.02)),
        n_activated_experts=hf["num_experts_per_tok"],
    )
    if arch == "deepseek_v3":
        kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        if kv_heads != hf["num_attention_heads"]:
            raise _unsupported("num_key_value_heads", kv_heads, "MLA expands keys for every head: must equal "
                               f"num_attention_heads={hf['num_attention_heads']}")
        if common["norm_eps"] != LATENT_NORM_EPS:
            raise _unsupported("rms_norm_eps", common["norm_eps"], "transformers' DeepseekV3 normalises the MLA "
                               "latents with 1e-6 whatever rms_norm_eps is; this project uses one norm_eps: 1e-6")
        _require(hf, "scoring_func", ("sigmoid",), "sigmoid")  # transformers' DeepseekV3 router is sigmoid-only
        _require(hf, "topk_method", ("noaux_tc",), "noaux_tc")
        _require(hf, "moe_layer_freq", (1,), 1)
        cfg = dict(
            common, attn="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], inter_dim=hf["intermediate_size"],
            n_dense_layers=min(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"]),
            n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
            moe_inter_dim=hf["moe_intermediate_size"], n_expert_groups=hf.get("n_group") or 1,
            n_limited_groups=hf.get("topk_group") or 1, score_func="sigmoid",
            route_scale=float(hf.get("routed_scaling_factor", 1.0)), norm_topk_prob=bool(hf.get("norm_topk_prob")),
            bias_update_speed=DEFAULT_BIAS_UPDATE_SPEED, n_mtp=n_mtp,
        )
        if cfg["n_shared_experts"] == 0:
            raise _unsupported("n_shared_experts", 0, "transformers' DeepseekV3 always builds shared experts")
    else:
        window = hf.get("sliding_window")
        if window is not None and window < hf["max_position_embeddings"]:
            raise _unsupported("sliding_window", window, "supported: null (full causal attention)")
        if hf.get("router_jitter_noise", 0.0):
            raise _unsupported("router_jitter_noise", hf["router_jitter_noise"], "supported: 0.0")
        if rope["rope_type"] != "default":
            raise _unsupported("rope_parameters.rope_type", rope["rope_type"], "Mixtral: supported 'default'")
        E, K, L = hf["num_local_experts"], hf["num_experts_per_tok"], hf["num_hidden_layers"]
        cfg = dict(
            common, attn="mha", n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"), inter_dim=hf["intermediate_size"], n_dense_layers=0,
            n_routed_experts=E, n_shared_experts=0, moe_inter_dim=hf["intermediate_size"], score_func="softmax",
            route_scale=1.0, norm_topk_prob=True, aux_loss_alpha=aux_alpha_from_hf(
                float(hf.get("router_aux_loss_coef", 0.0)), K, L),
        )
    cfg.update(_yarn_from_hf(hf, rope))
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}")
    cfg.update(overrides)
    return ModelConfig(**cfg)


def aux_alpha_from_hf(router_aux_loss_coef: float, top_k: int, n_moe_layers: int) -> float:
    """Our aux_loss_alpha giving the same total loss as transformers' router_aux_loss_coef.

    transformers (load_balancing_loss_func) pools the router logits of all layers and returns
    E * sum_e (assignments_e / T) * P_e, which is top_k x our per-layer E * sum_e f_e P_e
    (f_e = assignments_e / (T K)); we add our term once per MoE layer. With every layer routing
    alike: coef * K * l = alpha * L * l. (When layers differ, pooling then multiplying is not
    the mean of the per-layer products; the two losses then differ slightly.)
    """
    return router_aux_loss_coef * top_k / max(n_moe_layers, 1)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for transformers (DeepseekV3 for attn='mla', Mixtral for 'mha')."""
    from moe.rope import yarn_on

    if cfg.capacity_factor is not None:
        raise _unsupported_ours("capacity_factor", cfg.capacity_factor, "transformers is dropless: None")
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std, hidden_act="silu",
        num_experts_per_tok=cfg.n_activated_experts,
    )
    if yarn_on(cfg):
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
                "beta_slow": cfg.beta_slow, "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.attn == "mla":
        checks = [("score_func", cfg.score_func, "sigmoid", "transformers' DeepseekV3 router is sigmoid-only"),
                  ("norm_eps", cfg.norm_eps, LATENT_NORM_EPS, "its MLA latent norms always use 1e-6"),
                  ("n_shared_experts", cfg.n_shared_experts > 0, True, "DeepseekV3 always has shared experts: >= 1")]
        if cfg.n_expert_groups > 1:  # with no bias our groups score by their max, transformers' by a top-2 sum
            checks.append(("bias_update_speed", cfg.bias_update_speed > 0, True,
                           "group-limited routing in transformers scores groups by the top-2 sum of the "
                           "bias rule: needs the correction bias, bias_update_speed > 0"))
        for field, value, want, why in checks:
            if value != want:
                raise _unsupported_ours(field, getattr(cfg, field), why)
        return dict(
            common, architectures=[ARCHS["deepseek_v3"]], model_type="deepseek_v3",
            num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim, intermediate_size=cfg.inter_dim, first_k_dense_replace=cfg.n_dense_layers,
            n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
            moe_intermediate_size=cfg.moe_inter_dim, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
            routed_scaling_factor=cfg.route_scale, norm_topk_prob=cfg.norm_topk_prob, scoring_func="sigmoid",
            topk_method="noaux_tc", rope_interleave=True, attention_bias=False, rope_parameters=rope,
            num_nextn_predict_layers=cfg.n_mtp,
        )
    checks = [("n_shared_experts", cfg.n_shared_experts, 0), ("n_dense_layers", cfg.n_dense_layers, 0),
              ("score_func", cfg.score_func, "softmax"), ("norm_topk_prob", cfg.norm_topk_prob, True),
              ("route_scale", cfg.route_scale, 1.0), ("n_expert_groups", cfg.n_expert_groups, 1),
              ("bias_update_speed", cfg.bias_update_speed, 0.0), ("n_mtp", cfg.n_mtp, 0)]
    for field, value, want in checks:
        if value != want:
            raise _unsupported_ours(field, value, f"Mixtral needs {want!r}")
    if rope["rope_type"] != "default":
        raise _unsupported_ours("max_seq_len", cfg.max_seq_len, f"YaRN is on (> original_seq_len="
                                f"{cfg.original_seq_len}); Mixtral is converted with plain RoPE only")
    return dict(
        common, architectures=[ARCHS["mixtral"]], model_type="mixtral", num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.mha_head_dim, intermediate_size=cfg.moe_inter_dim, num_local_experts=cfg.n_routed_experts,
        rope_parameters=rope, sliding_window=None, router_jitter_noise=0.0,
        router_aux_loss_coef=cfg.aux_loss_alpha * max(cfg.n_moe_layers, 1) / cfg.n_activated_experts,
    )


def _unsupported_ours(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"cannot convert to transformers: {field}={value!r} ({why})")


# ------------------------------------------------------------------------------ the tensor table
@dataclass(frozen=True)
class Entry:
    """One transformers tensor and the rule that makes it from (and into) ours."""

    hf: str  # transformers / checkpoint name
    ours: tuple[str, ...]  # our state-dict name(s) it fills
    op: str  # "copy", "rope_q", "rope_kv", "expert_in", "expert_out", "gate_up", "down", "eh_proj", "same_as"
    expert: int | None = None  # the slot of a stacked [E, ...] tensor, for per-expert entries


def _block_entries(cfg: ModelConfig, arch: str, hf: str, ours: str, use_moe: bool, layout: str) -> list[Entry]:
    out: list[Entry] = []

    def add(h: str, o: str | tuple[str, ...], op: str = "copy", expert: int | None = None) -> None:
        names = (o,) if isinstance(o, str) else o
        out.append(Entry(hf + h, tuple(ours + n for n in names), op, expert))

    add("input_layernorm.weight", "attn_norm.weight")
    add("post_attention_layernorm.weight", "ffn_norm.weight")
    if arch == "deepseek_v3":
        if cfg.q_lora_rank:
            add("self_attn.q_a_proj.weight", "attn.wq_a.weight")
            add("self_attn.q_a_layernorm.weight", "attn.q_norm.weight")
            add("self_attn.q_b_proj.weight", "attn.wq_b.weight", "rope_q")
        else:
            add("self_attn.q_proj.weight", "attn.wq.weight", "rope_q")
        add("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight", "rope_kv")
        add("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight")
        add("self_attn.kv_b_proj.weight", "attn.wkv_b.weight")
        add("self_attn.o_proj.weight", "attn.wo.weight")
    else:
        for h, o in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            add(f"self_attn.{h}_proj.weight", f"attn.{o}.weight")
    if not use_moe:
        for h, o in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            add(f"mlp.{h}_proj.weight", f"ffn.{o}.weight")
        return out
    # Mixtral checkpoints say block_sparse_moe and w1/w3/w2; transformers 5 renames them on load
    moe = "block_sparse_moe" if arch == "mixtral" and layout == "per_expert" else "mlp"
    add(f"{moe}.gate.weight", "ffn.router.weight")
    if arch == "deepseek_v3":
        add("mlp.gate.e_score_correction_bias", "ffn.router.bias")
        for h, o in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            add(f"mlp.shared_experts.{h}_proj.weight", f"ffn.shared.{o}.weight")
    if layout == "fused":
        add(f"{moe}.experts.gate_up_proj", ("ffn.experts.w1", "ffn.experts.w3"), "gate_up")
        add(f"{moe}.experts.down_proj", "ffn.experts.w2", "down")
        return out
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(cfg.n_routed_experts):
        for h, o in zip(names, ("w1", "w3", "w2")):
            add(f"{moe}.experts.{e}.{h}.weight", f"ffn.experts.{o}", "expert_out" if o == "w2" else "expert_in", e)
    return out


def hf_entries(cfg: ModelConfig, layout: str = "per_expert") -> list[Entry]:
    """Every transformers tensor of cfg's model, in checkpoint order, with its rule."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, EXPERT_LAYOUTS))}, got {layout!r}")
    arch = "deepseek_v3" if cfg.attn == "mla" else "mixtral"
    out = [Entry("model.embed_tokens.weight", ("embed.weight",), "copy")]
    for i in range(cfg.n_layers):
        out += _block_entries(cfg, arch, f"model.layers.{i}.", f"layers.{i}.", i >= cfg.n_dense_layers, layout)
    out.append(Entry("model.norm.weight", ("norm.weight",), "copy"))
    out.append(Entry("lm_head.weight", ("embed.weight" if cfg.tie_embeddings else "head.weight",),
                     "same_as" if cfg.tie_embeddings else "copy"))
    for k in range(cfg.n_mtp):  # DeepSeek's MTP modules follow the main layers
        hf, ours = f"model.layers.{cfg.n_layers + k}.", f"mtp.{k}."
        out += [Entry(hf + "embed_tokens.weight", ("embed.weight",), "same_as"),
                Entry(hf + "enorm.weight", (ours + "enorm.weight",), "copy"),
                Entry(hf + "hnorm.weight", (ours + "hnorm.weight",), "copy"),
                Entry(hf + "eh_proj.weight", (ours + "proj.weight",), "eh_proj"),
                Entry(hf + "shared_head.norm.weight", (ours + "norm.weight",), "copy"),
                Entry(hf + "shared_head.head.weight", ("embed.weight" if cfg.tie_embeddings else "head.weight",),
                      "same_as")]
        out += _block_entries(cfg, arch, hf, ours + "block.", cfg.n_moe_layers > 0, layout)
    return out


def rope_permutation(rope_dim: int) -> torch.Tensor:
    """Interleaved pairs (2i, 2i+1) -> rotate-half pairs (i, i + R/2): ours = theirs[perm]."""
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def _permute_rope_rows(w: torch.Tensor, cfg: ModelConfig, op: str, inverse: bool) -> torch.Tensor:
    R = cfg.qk_rope_head_dim
    perm = rope_permutation(R)
    if inverse:
        perm = torch.argsort(perm)
    if op == "rope_kv":  # rows: kv_lora_rank latent, then the shared rope key
        C = cfg.kv_lora_rank
        return torch.cat([w[:C], w[C:][perm]])
    heads = w.reshape(cfg.n_heads, cfg.qk_nope_head_dim + R, -1)  # rows: per head, nope then rope
    nope, rope = heads.split([cfg.qk_nope_head_dim, R], dim=1)
    return torch.cat([nope, rope[:, perm]], dim=1).reshape(w.shape)


def entry_from_hf(entry: Entry, t: torch.Tensor, cfg: ModelConfig,
                  interleaved: bool = True) -> list[tuple[str, int | None, torch.Tensor]]:
    """The pieces of our state dict one transformers tensor gives: (name, expert slot or None, tensor)."""
    op, name = entry.op, entry.ours[0]
    if op in ("rope_q", "rope_kv"):
        return [(name, None, _permute_rope_rows(t, cfg, op, inverse=False) if interleaved else t)]
    if op in ("expert_in", "expert_out"):
        return [(name, entry.expert, t.t())]
    if op == "gate_up":  # [E, 2I, D]: gate rows then up rows
        gate, up = t.split(cfg.moe_inter_dim, dim=1)
        return [(entry.ours[0], None, gate.transpose(1, 2)), (entry.ours[1], None, up.transpose(1, 2))]
    if op == "down":  # [E, D, I]
        return [(name, None, t.transpose(1, 2))]
    if op == "eh_proj":  # their columns [embedding | hidden], ours [hidden | embedding]
        emb, hidden = t.split(cfg.dim, dim=1)
        return [(name, None, torch.cat([hidden, emb], dim=1))]
    if op in ("copy", "same_as"):
        return [(name, None, t)]
    raise AssertionError(op)


def entry_to_hf(entry: Entry, get: Callable[[str, int | None], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """The transformers tensor of entry, from ours (get(name, expert slot or None))."""
    op = entry.op
    if op in ("rope_q", "rope_kv"):
        return _permute_rope_rows(get(entry.ours[0], None), cfg, op, inverse=True)
    if op in ("expert_in", "expert_out"):
        return get(entry.ours[0], entry.expert).t()
    if op == "gate_up":
        return torch.cat([get(n, None).transpose(1, 2) for n in entry.ours], dim=1)
    if op == "down":
        return get(entry.ours[0], None).transpose(1, 2)
    if op == "eh_proj":
        hidden, emb = get(entry.ours[0], None).split(cfg.dim, dim=1)
        return torch.cat([emb, hidden], dim=1)
    return get(entry.ours[0], None)


# ------------------------------------------------------------------------------ FP8
def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """DeepSeek's FP8 weights: q (float8_e4m3fn [rows, cols]) * scale_inv of its 128 x 128 block, fp32.

    Edge blocks of shapes that are not multiples of 128 are partial (README_WEIGHTS.md: padded
    before quantising, the padding removed after): moe.fp8.dequantize with 128x128 blocks.
    """
    rows, cols = q.shape
    want = (math.ceil(rows / block), math.ceil(cols / block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"FP8 weight of shape {tuple(q.shape)} needs a weight_scale_inv of shape {want} "
                         f"(one per {block}x{block} block), got {tuple(scale_inv.shape)}")
    from moe.fp8 import dequantize

    return dequantize(q, scale_inv.float(), "block", block)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


# ------------------------------------------------------------------------------ state dicts
def mtp_layers_in(names: Iterable[str], n_layers: int) -> int:
    """How many MTP layers (model.layers.{n_layers + k}.*) the names hold."""
    found = set()
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= n_layers:
            found.add(int(parts[2]))
    expected = set(range(n_layers, n_layers + len(found)))
    if found != expected:
        raise ValueError(f"MTP layers must follow the main layers: expected {sorted(expected)}, found {sorted(found)}")
    return len(found)


class StateDictBuilder:
    """Collects converted pieces into our tensors, checking that each is filled exactly once.

    write(name, expert, tensor) for each piece; `tensors` holds the result. Stacked expert
    tensors are filled slot by slot. Used in memory (from_hf) and, with a file as the store,
    by the streaming converter.
    """

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], store: Callable | None = None):
        self.specs = specs
        self.filled: dict[str, set[int | None]] = {name: set() for name in specs}
        self.store = store  # store(name, expert, tensor); None = keep them in self.tensors
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, name: str, expert: int | None, t: torch.Tensor) -> None:
        if name not in self.specs:
            raise ValueError(f"converted tensor {name} does not exist in this model")
        shape, dtype = self.specs[name]
        want = shape[1:] if expert is not None else shape
        if tuple(t.shape) != tuple(want):
            slot = f"[{expert}]" if expert is not None else ""
            raise ValueError(f"{name}{slot}: shape {tuple(t.shape)} from the checkpoint, {tuple(want)} expected")
        got = self.filled[name]
        if None in got or expert in got or (expert is None and got):
            raise ValueError(f"{name} is given twice by the checkpoint (two layouts of the same weights?)")
        got.add(expert)
        t = t.to(dtype)
        if self.store is not None:
            self.store(name, expert, t)
            return
        if expert is None:
            self.tensors[name] = t.contiguous()
        else:
            full = self.tensors.setdefault(name, torch.empty(shape, dtype=dtype))
            full[expert] = t

    def missing(self) -> list[str]:
        out = []
        for name, (shape, _) in self.specs.items():
            got = self.filled[name]
            if None in got:
                continue
            if len(shape) == 3 and name.endswith(("experts.w1", "experts.w2", "experts.w3")):
                out += [f"{name}[{e}]" for e in range(shape[0]) if e not in got]
            else:
                out.append(name)
        return out


def our_specs(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor our checkpoint stores (tied head left out), from a meta build."""
    from moe.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    specs = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "head.weight":
            continue
        keep_fp32 = name.endswith("router.bias")  # the correction bias stays fp32 (moe/router.py)
        specs[name] = (tuple(t.shape), torch.float32 if keep_fp32 or dtype is None else dtype)
    return specs


def convert_from_hf(cfg: ModelConfig, names: Iterable[str], get: Callable[[str], torch.Tensor],
                    builder: StateDictBuilder, interleaved: bool = True,
                    progress: Callable[[str], None] | None = None) -> None:
    """Feed every transformers tensor (names, get(name) -> tensor) through its rule into builder.

    FP8 weights are dequantised with their weight_scale_inv; `same_as` tensors (tied head, the
    MTP copies of embedding and head) must equal the tensor they copy; anything else that is not
    in the table is an error naming it.
    """
    table: dict[str, Entry] = {}
    for layout in EXPERT_LAYOUTS:
        for entry in hf_entries(cfg, layout):
            table.setdefault(entry.hf, entry)
    names = list(names)
    present = set(names)
    unknown = [n for n in names if n not in table and not n.endswith(("weight_scale_inv", "rotary_emb.inv_freq"))]
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise ValueError(f"tensors this converter does not know: {', '.join(unknown[:8])}{more}")
    for name in names:
        if progress is not None:
            progress(name)
        entry = table.get(name)
        if entry is None:
            continue
        t = get(name)
        if is_fp8(t):
            scale_name = name[: -len("weight")] + "weight_scale_inv"
            if scale_name not in present:
                raise ValueError(f"{name} is {t.dtype} but the checkpoint has no {scale_name} to dequantise it")
            t = dequantize_fp8(t, get(scale_name))
        if entry.op == "same_as":
            _check_same(entry, t, get, cfg)
            continue
        for piece in entry_from_hf(entry, t, cfg, interleaved):
            builder.write(*piece)
    missing = builder.missing()
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"the checkpoint lacks weights of this model: {', '.join(missing[:8])}{more}")


def _check_same(entry: Entry, t: torch.Tensor, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> None:
    source = "model.embed_tokens.weight" if entry.ours[0] == "embed.weight" else "lm_head.weight"
    other = get(source)
    if is_fp8(other):
        other = dequantize_fp8(other, get(source[: -len("weight")] + "weight_scale_inv"))
    if other.shape != t.shape or not torch.equal(other.to(t.dtype), t):
        raise ValueError(f"{entry.hf} differs from {source}: this project's model shares them (the MTP module "
                         "reuses the main embedding and head; tie_word_embeddings ties the head)")


# ------------------------------------------------------------------------------ public API
def from_hf(model_or_state_dict: Any, config: Any = None, **overrides: Any):
    """(ModelConfig, Transformer) from a transformers DeepseekV3/Mixtral model, or from a state dict
    with its config (an object or the config.json dict). overrides: ModelConfig fields.

    The model comes back in fp32 and eval mode. A transformers *model* has no MTP weights
    (DeepseekV3ForCausalLM drops model.layers.61.* on load); pass the checkpoint's tensors, or use
    `python -m moe convert`, to keep them.
    """
    from moe.model import Transformer

    if isinstance(model_or_state_dict, dict):
        state_dict = model_or_state_dict
        if config is None:
            raise ValueError("from_hf(state_dict) needs config= (the transformers config or config.json dict)")
    else:
        state_dict = model_or_state_dict.state_dict()
        config = config if config is not None else model_or_state_dict.config
    hf = _as_dict(config)
    architecture(hf)
    n_mtp = mtp_layers_in(state_dict, hf["num_hidden_layers"])
    promised = hf.get("num_nextn_predict_layers", 0) or 0
    if promised > n_mtp:
        warnings.warn(f"the config has num_nextn_predict_layers={promised} but the weights hold {n_mtp} MTP "
                      "layers: transformers drops them on load; convert from the checkpoint files to keep them",
                      stacklevel=2)
    cfg = config_from_hf(hf, n_mtp=n_mtp, **overrides)
    builder = StateDictBuilder(our_specs(cfg, torch.float32))
    convert_from_hf(cfg, state_dict, state_dict.__getitem__, builder, bool(hf.get("rope_interleave", True)))
    model = Transformer(cfg)
    tensors = builder.tensors
    if cfg.tie_embeddings:
        tensors["head.weight"] = tensors["embed.weight"]
    model.load_state_dict(tensors, strict=True)
    return cfg, model.eval()


def to_hf(model: Any, layout: str = "per_expert") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, state dict) for transformers: layout 'per_expert' is how checkpoints are stored
    (save it and load with from_pretrained); 'fused' is transformers 5's in-memory layout
    (hf_model.load_state_dict(state_dict) works directly). MTP modules go to model.layers.{n_layers + k}."""
    cfg: ModelConfig = model.cfg
    hf_config = config_to_hf(cfg)
    ours = model.state_dict()
    get = lambda name, expert: (ours[name] if expert is None else ours[name][expert]).detach()
    out = {e.hf: entry_to_hf(e, get, cfg).contiguous() for e in hf_entries(cfg, layout)}
    return hf_config, out
