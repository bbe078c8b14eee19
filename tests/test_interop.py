"""transformers' DeepseekV3 and Mixtral in and out: logits, generation, round trips, MTP, FP8, CLI.

Tiny random transformers models (norms and the correction bias randomised too, so a norm or a
bias that is dropped shows), fp32 on CPU. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

from moe.__main__ import main  # noqa: E402
from moe.balance import switch_aux_loss  # noqa: E402
from moe.checkpoint import load_model  # noqa: E402
from moe.config import PRESETS, ModelConfig  # noqa: E402
from moe.generate import generate  # noqa: E402
from moe.interop.hf import (  # noqa: E402
    aux_alpha_from_hf,
    config_from_hf,
    config_to_hf,
    dequantize_fp8,
    from_hf,
    hf_entries,
    rope_permutation,
    to_hf,
)
from moe.model import Transformer  # noqa: E402
from moe.router import Router  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
VOCAB, POSITIONS = 300, 128


def deepseek_config(**kw) -> DeepseekV3Config:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                topk_group=2, first_k_dense_replace=2, n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                max_position_embeddings=POSITIONS, rope_parameters=dict(YARN), num_nextn_predict_layers=0,
                attn_implementation="eager")
    base.update(kw)
    return DeepseekV3Config(**base)


def mixtral_config(**kw) -> MixtralConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=POSITIONS,
                router_aux_loss_coef=0.02, attn_implementation="eager")
    base.update(kw)
    return MixtralConfig(**base)


def load_experiment():
    """experiments/interop_parity.py as a module: the parity experiment and these tests randomise alike."""
    path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "interop_parity.py"
    spec = importlib.util.spec_from_file_location("interop_parity", path)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    return experiment


randomised = load_experiment().randomised


DEEPSEEK_VARIANTS = {
    "q_lora-yarn-groups-bias-2dense": {},
    "no_q_lora-yarn-3dense": dict(q_lora_rank=None, first_k_dense_replace=3),
    "rotate_half-plain_rope-tied": dict(rope_interleave=False, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 5000.0},
                                        tie_word_embeddings=True, n_group=1, topk_group=1, norm_topk_prob=False),
}


def build_pair(variant: str):
    if variant == "mixtral":
        hf = randomised(MixtralForCausalLM(mixtral_config()))
    else:
        hf = randomised(DeepseekV3ForCausalLM(deepseek_config(**DEEPSEEK_VARIANTS[variant])))
    cfg, ours = from_hf(hf)
    return hf, cfg, ours


@pytest.fixture(scope="module", params=list(DEEPSEEK_VARIANTS))
def deepseek(request):
    return build_pair(request.param)


@pytest.fixture(scope="module")
def mixtral():
    return build_pair("mixtral")


@pytest.fixture(scope="module", params=[*DEEPSEEK_VARIANTS, "mixtral"])
def pair(request):
    """Each DeepseekV3 variant and Mixtral: (transformers model, our config, our model)."""
    return build_pair(request.param)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 120), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------ logits
@torch.no_grad()
def test_deepseek_logits_equal_transformers(deepseek, tokens):
    hf, cfg, ours = deepseek
    assert cfg.attn == "mla" and cfg.n_dense_layers == hf.config.first_k_dense_replace
    ref = hf(tokens).logits
    torch.testing.assert_close(ours(tokens)[0], ref, rtol=0, atol=1e-4)


@torch.no_grad()
def test_mixtral_logits_equal_transformers(mixtral, tokens):
    hf, cfg, ours = mixtral
    assert (cfg.attn, cfg.kv_heads, cfg.n_shared_experts, cfg.score_func) == ("mha", 2, 0, "softmax")
    torch.testing.assert_close(ours(tokens)[0], hf(tokens).logits, rtol=0, atol=1e-4)


def test_the_yarn_variant_runs_past_the_original_context(deepseek, tokens):
    hf, cfg, _ = deepseek
    if hf.config.rope_parameters["rope_type"] == "yarn":
        assert cfg.max_seq_len > cfg.original_seq_len and tokens.shape[1] > cfg.original_seq_len
        assert (cfg.rope_factor, cfg.mscale) == (4.0, 0.707)


@torch.no_grad()
def test_rope_permutation_turns_interleaved_pairs_into_rotate_half():
    """At every position of the table, rotating interleaved pairs then permuting == permuting then
    rotating halves; without the permutation the scores differ."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    from moe.rope import apply_rope, rope_tables

    R, S = 8, POSITIONS
    cos, sin = rope_tables(R, S, 10000.0)
    q, k = torch.randn(1, 1, S, R), torch.randn(1, 1, S, R)
    emb = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]
    q_hf, k_hf = apply_rotary_pos_emb_interleave(q, k, *emb)
    perm = rope_permutation(R)
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    ours = lambda x: apply_rope(x[..., perm].transpose(1, 2), cos, sin).transpose(1, 2)
    torch.testing.assert_close(ours(q) @ ours(k).transpose(-1, -2), q_hf @ k_hf.transpose(-1, -2))
    naive = lambda x: apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    assert not torch.allclose(naive(q) @ naive(k).transpose(-1, -2), q_hf @ k_hf.transpose(-1, -2), atol=1e-3)


@torch.no_grad()
def test_converting_without_the_permutation_breaks_parity(tokens):
    hf = randomised(DeepseekV3ForCausalLM(deepseek_config()))
    wrong = dict(hf.config.to_dict(), rope_interleave=False)  # claim rotate-half: rows are not permuted
    _, ours = from_hf(hf.state_dict(), config=wrong)
    assert (ours(tokens)[0] - hf(tokens).logits).abs().max() > 1e-2


# ------------------------------------------------------------------------------ generation
def test_greedy_generation_equals_transformers_generate(pair):
    hf, _, ours = pair
    prompt = [5, 17, 250, 3, 99, 42, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert generate(ours, prompt, 20, temperature=0.0) == ref[0, len(prompt):].tolist()


# ------------------------------------------------------------------------------ round trips
def test_to_hf_of_from_hf_reproduces_the_state_dict(pair):
    hf, _, ours = pair
    hf_config, fused = to_hf(ours, layout="fused")  # transformers 5's in-memory layout
    ref = hf.state_dict()
    assert set(fused) == set(ref)
    # to_hf writes DeepSeek's interleaved RoPE layout; a rotate-half source differs in those rows only
    permuted = ("q_proj", "q_b_proj", "kv_a_proj_with_mqa") if not getattr(hf.config, "rope_interleave", True) else ()
    assert hf_config.get("rope_interleave", True)
    for name, t in ref.items():
        assert torch.equal(fused[name], t) != any(p in name for p in permuted), name
    _, per_expert = to_hf(ours)  # the layout of checkpoints on disk
    assert any(".experts.0." in n for n in per_expert) and not any("gate_up_proj" in n for n in per_expert)
    _, again = from_hf(per_expert, config=hf_config)
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_to_hf_saved_loads_in_transformers_with_the_same_logits(pair, tmp_path, tokens):
    hf, _, ours = pair
    hf_config, state_dict = to_hf(ours)
    cls = type(hf)
    if hf_config.get("tie_word_embeddings"):
        state_dict.pop("lm_head.weight")
    from safetensors.torch import save_file

    save_file(state_dict, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    loaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, hf(tokens).logits, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ routing differences
def test_dropped_groups_are_masked_with_minus_infinity_not_zero():
    """DeepSeek's reference and transformers 5 mask the experts of dropped groups with -inf; older
    transformers (4.x DeepseekV3TopkRouter) used 0. With a negative correction bias every kept
    score is below 0, so the old rule picks experts of dropped groups; ours never does."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = ModelConfig(dim=16, n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3,
                      score_func="sigmoid", bias_update_speed=1e-3, route_scale=2.5)
    ours = Router(cfg)
    with torch.no_grad():
        ours.bias.copy_(-2.0 + 0.1 * torch.randn(8))
    hf = DeepseekV3TopkRouter(deepseek_config(hidden_size=16))
    hf.load_state_dict({"weight": ours.weight.detach(), "e_score_correction_bias": ours.bias})
    x = torch.randn(64, 16)
    r = ours(x)
    _, w_hf, i_hf = hf(x)
    order = i_hf.sort(dim=-1)
    torch.testing.assert_close(r.experts_TK.sort(-1).values, order.values)
    torch.testing.assert_close(r.weights_TK.gather(1, r.experts_TK.sort(-1).indices), w_hf.gather(1, order.indices))
    # the old rule, written out: mask dropped groups with 0
    select = r.scores_TE + ours.bias
    groups = select.view(64, 4, 2).topk(2, -1).values.sum(-1).topk(2, -1).indices
    keep = torch.zeros(64, 4, dtype=torch.bool).scatter_(1, groups, True)
    old = select.view(64, 4, 2).masked_fill(~keep[..., None], 0.0).view(64, 8).topk(3, -1).indices
    outside = ~keep.repeat_interleave(2, 1).gather(1, old)
    assert outside.any()  # the old rule routes to dropped groups
    assert keep.repeat_interleave(2, 1).gather(1, r.experts_TK).all()  # ours never does


def test_router_aux_loss_coef_maps_to_our_alpha():
    """transformers pools all layers' logits and gets top_k x our per-layer loss; we sum layers."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    E, K, L, T = 8, 2, 3, 50
    logits = torch.randn(T, E)
    scores = logits.softmax(-1)
    experts = scores.topk(K, -1).indices
    ours_per_layer = switch_aux_loss(scores, experts)
    hf_one = load_balancing_loss_func((logits,), E, K)
    torch.testing.assert_close(hf_one, K * ours_per_layer)
    coef = 0.02
    hf_total = coef * load_balancing_loss_func((logits,) * L, E, K)  # every layer routing alike
    torch.testing.assert_close(hf_total, L * aux_alpha_from_hf(coef, K, L) * ours_per_layer)
    cfg = config_from_hf(mixtral_config(num_hidden_layers=L).to_dict())
    assert cfg.aux_loss_alpha == pytest.approx(coef * K / L)
    assert config_to_hf(cfg)["router_aux_loss_coef"] == pytest.approx(coef)


# ------------------------------------------------------------------------------ configs
DEEPSEEK_V3_CONFIG_JSON = {  # the fields of DeepSeek-V3's released config.json that the converter reads
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-06,
    "rope_theta": 10000, "tie_word_embeddings": False, "attention_bias": False, "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
ARCH_FIELDS = ["vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "tie_embeddings", "norm_eps", "rope_theta",
               "original_seq_len", "rope_factor", "beta_fast", "beta_slow", "mscale", "attn", "q_lora_rank",
               "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "inter_dim", "n_dense_layers",
               "n_routed_experts", "n_shared_experts", "n_activated_experts", "moe_inter_dim", "n_expert_groups",
               "n_limited_groups", "score_func", "route_scale", "norm_topk_prob", "n_mtp"]


def test_deepseek_v3_release_config_gives_the_preset():
    cfg = config_from_hf(DEEPSEEK_V3_CONFIG_JSON, n_mtp=1)
    preset = PRESETS["deepseek-v3"]
    assert {f: getattr(cfg, f) for f in ARCH_FIELDS} == {f: getattr(preset, f) for f in ARCH_FIELDS}
    assert cfg.bias_update_speed > 0  # the correction bias exists, as in the checkpoint


def test_mixtral_config_gives_the_preset():
    hf = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
          "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
          "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu", "router_aux_loss_coef": 0.02}
    cfg = config_from_hf(hf)
    preset = PRESETS["mixtral-8x7b"]
    fields = [f for f in ARCH_FIELDS if f not in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                    "qk_rope_head_dim", "v_head_dim", "inter_dim", "beta_fast",
                                                    "beta_slow", "mscale")] + ["n_kv_heads", "aux_loss_alpha"]
    assert {f: getattr(cfg, f) for f in fields} == {f: getattr(preset, f) for f in fields}
    assert cfg.mha_head_dim == preset.mha_head_dim


BAD_HF = [
    ("deepseek", {"model_type": "llama"}, "model_type"),
    ("deepseek", {"hidden_act": "gelu"}, "hidden_act"),
    ("deepseek", {"attention_bias": True}, "attention_bias"),
    ("deepseek", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek", {"topk_method": "greedy"}, "topk_method"),
    ("deepseek", {"rms_norm_eps": 1e-5}, "rms_norm_eps"),
    ("deepseek", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek", {"rope_parameters": dict(YARN, mscale=1.0)}, "mscale"),
    ("deepseek", {"rope_parameters": dict(YARN, original_max_position_embeddings=POSITIONS)},
     "original_max_position_embeddings"),
    ("deepseek", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
]


@pytest.mark.parametrize("arch, change, field", BAD_HF, ids=[f"{a}-{f}" for a, _, f in BAD_HF])
def test_unsupported_transformers_options_are_named(arch, change, field):
    hf = (deepseek_config() if arch == "deepseek" else mixtral_config()).to_dict()
    hf.update(change)
    with pytest.raises(ValueError, match=field):
        config_from_hf(hf)


@pytest.mark.parametrize("change, field", [
    (dict(score_func="softmax"), "score_func"), (dict(capacity_factor=1.25), "capacity_factor"),
    (dict(bias_update_speed=0.0, n_expert_groups=4, n_limited_groups=2), "bias_update_speed"),
    (dict(attn="mha", n_shared_experts=1), "n_shared_experts"),
    (dict(attn="mha", n_shared_experts=0, score_func="softmax", n_dense_layers=0, bias_update_speed=0.0,
          n_expert_groups=1, n_limited_groups=1, max_seq_len=8192), "max_seq_len"),
])
def test_what_transformers_cannot_hold_is_named(change, field):
    cfg = PRESETS["toy"].replace(**change)
    with pytest.raises(ValueError, match=field):
        config_to_hf(cfg)


def test_unknown_and_missing_tensors_are_named(deepseek):
    hf, _, _ = deepseek
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="self_attn.extra.weight"):
        from_hf(sd, config=hf.config)
    sd = dict(hf.state_dict())
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match="norm.weight"):
        from_hf(sd, config=hf.config)


def test_a_transformers_model_has_no_mtp_weights_and_from_hf_says_so():
    hf = DeepseekV3ForCausalLM(deepseek_config(num_nextn_predict_layers=1))
    with pytest.warns(UserWarning, match="num_nextn_predict_layers=1"):
        cfg, _ = from_hf(hf)
    assert cfg.n_mtp == 0


# ------------------------------------------------------------------------------ MTP
@pytest.fixture(scope="module")
def ours_with_mtp():
    hf = randomised(DeepseekV3ForCausalLM(deepseek_config(num_hidden_layers=3)))
    cfg, _ = from_hf(hf)
    model = Transformer(cfg.replace(n_mtp=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
        for m in model.modules():
            if isinstance(m, Router):
                m.bias.normal_(0, 0.2)
    return model.eval()


def test_mtp_weights_round_trip(ours_with_mtp):
    cfg = ours_with_mtp.cfg
    hf_config, sd = to_hf(ours_with_mtp)
    n = cfg.n_layers
    for part in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head"):
        assert f"model.layers.{n}.{part}.weight" in sd, part
    assert f"model.layers.{n}.mlp.experts.7.down_proj.weight" in sd and hf_config["num_nextn_predict_layers"] == 1
    cfg2, again = from_hf(sd, config=hf_config)
    assert cfg2.n_mtp == 1
    for name, t in ours_with_mtp.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    sd[f"model.layers.{n}.embed_tokens.weight"] = sd[f"model.layers.{n}.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match="embed_tokens"):
        from_hf(sd, config=hf_config)


@torch.no_grad()
def test_mtp_module_equals_the_vllm_order_with_transformers_block(ours_with_mtp):
    """DeepSeek's checkpoint feeds eh_proj [enorm(embedding); hnorm(hidden)] (vLLM, SGLang); ours
    [hidden; embedding]. The MTP layer computed from the converted tensors the checkpoint's way,
    with transformers' own decoder layer, equals our MTP module."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
        DeepseekV3RMSNorm,
        DeepseekV3RotaryEmbedding,
    )

    model, cfg = ours_with_mtp, ours_with_mtp.cfg
    hf_config, sd = to_hf(model, layout="fused")
    n, p = cfg.n_layers, f"model.layers.{cfg.n_layers}."
    config = DeepseekV3Config(**{**hf_config, "attn_implementation": "sdpa"})
    layer = DeepseekV3DecoderLayer(config, layer_idx=n)
    mtp_only = ("embed_tokens.", "enorm.", "hnorm.", "eh_proj.", "shared_head.")
    block = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    layer.load_state_dict({k: v for k, v in block.items() if not k.startswith(mtp_only)})
    enorm, hnorm, head_norm = (DeepseekV3RMSNorm(cfg.dim, cfg.norm_eps).requires_grad_(False) for _ in range(3))
    enorm.weight.copy_(sd[p + "enorm.weight"])
    hnorm.weight.copy_(sd[p + "hnorm.weight"])
    head_norm.weight.copy_(sd[p + "shared_head.norm.weight"])
    S = 40
    h = torch.randn(1, S, cfg.dim)
    next_tokens = torch.randint(0, VOCAB, (1, S))
    emb = torch.nn.functional.embedding(next_tokens, sd[p + "embed_tokens.weight"])
    x = torch.cat([enorm(emb), hnorm(h)], dim=-1) @ sd[p + "eh_proj.weight"].T  # the checkpoint's order
    pos = torch.arange(S)[None]
    y = layer(x, position_embeddings=DeepseekV3RotaryEmbedding(config)(x, pos), position_ids=pos)
    ref = head_norm(y) @ sd[p + "shared_head.head.weight"].T
    module = model.mtp[0]
    out, _ = module(h, model.embed(next_tokens), model.rope_cos[:S], model.rope_sin[:S])
    torch.testing.assert_close(model.head(module.norm(out)), ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------ FP8
def quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's recipe, written out block by block: scale = amax / 448, q = w / scale in E4M3."""
    rows, cols = w.shape
    scale = torch.empty(math.ceil(rows / block), math.ceil(cols / block))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = blk.abs().max().clamp_min(1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (blk / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].float() * scale[i, j]
    return out


def test_fp8_block_dequantisation_partial_blocks():
    w = torch.randn(300, 200) * torch.logspace(-2, 1, 300)[:, None]  # blocks with very different ranges
    q, scale = quantize_blocks(w)
    assert scale.shape == (3, 2)
    torch.testing.assert_close(dequantize_fp8(q, scale), dequantize_blocks(q, scale), rtol=0, atol=0)
    # E4M3 rounds to 3 mantissa bits (half a step: 2^-4 relative), subnormals to steps of 2^-9 x scale
    s = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((dequantize_fp8(q, scale) - w).abs() <= w.abs() * 2 ** -4 + s * 2 ** -10 + 1e-12).all()
    with pytest.raises(ValueError, match="weight_scale_inv"):
        dequantize_fp8(q, scale[:2])


def test_fp8_checkpoint_converts_to_its_dequantised_weights(tmp_path):
    """A DeepSeek-style FP8 checkpoint (every 2-D weight but the embedding, head and routers in E4M3
    with a weight_scale_inv per 128x128 block, as the release) converts to exactly the weights its
    blocks dequantise to, here computed block by block."""
    from safetensors.torch import save_file

    hf = randomised(DeepseekV3ForCausalLM(deepseek_config(hidden_size=160, num_hidden_layers=3)))
    hf_config, files = to_hf(from_hf(hf)[1])  # the checkpoint layout: one Linear per expert
    reference = dict(files)
    for name, t in list(files.items()):
        if t.dim() == 2 and not any(s in name for s in ("embed_tokens", "lm_head", "mlp.gate.weight")):
            q, scale = quantize_blocks(t)
            files[name], files[name[:-len("weight")] + "weight_scale_inv"] = q, scale
            reference[name] = dequantize_blocks(q, scale)
    assert sum(t.dtype == torch.float8_e4m3fn for t in files.values()) > 40
    assert any(t.shape[0] > 128 or t.shape[1] > 128 for t in files.values() if t.dtype == torch.float8_e4m3fn)
    save_file(files, str(tmp_path / "model.safetensors"))
    hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    assert main(["convert", "--from-hf", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    model, ckpt = load_model(str(tmp_path / "run"))
    assert ckpt.state["source"]["fp8_dequantised"]
    _, expected = from_hf(reference, config=hf_config)
    for name, t in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], t, rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------ the CLI
def save_hf(model, folder, **kw) -> str:
    model.save_pretrained(folder, **kw)
    return str(folder)


def test_convert_cli_round_trip_sharded_with_mtp(ours_with_mtp, tmp_path, capsys):
    """ours (with MTP) -> transformers folder in several shards -> ours: every tensor back, MTP included,
    which transformers' from_pretrained would drop."""
    from moe.checkpoint import save_weights_checkpoint
    from moe.interop.hf import our_specs

    cfg = ours_with_mtp.cfg
    specs = our_specs(cfg, torch.float32)
    sd = ours_with_mtp.state_dict()
    save_weights_checkpoint(str(tmp_path / "a"), cfg, specs,
                            lambda write: [write(n, None, sd[n]) for n in specs], {}, {"test": True})
    total_gb = sum(t.numel() * 4 for t in sd.values()) / 1e9
    assert main(["convert", "--to-hf", str(tmp_path / "a"), "--out", str(tmp_path / "hf"), "--quiet",
                 "--shard-size", str(total_gb / 3.5)]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert any(k.startswith(f"model.layers.{cfg.n_layers}.eh_proj") for k in index["weight_map"])
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    back, _ = load_model(str(tmp_path / "b"))
    assert back.cfg.n_mtp == 1
    for name, t in sd.items():
        assert torch.equal(back.state_dict()[name], t), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf")  # MTP layer: unexpected, dropped
    assert not any(k.startswith(f"model.layers.{cfg.n_layers}.") for k in loaded.state_dict())


def test_convert_cli_to_one_file_with_mtp(ours_with_mtp, tmp_path):
    """In one file the MTP layer's embed_tokens and shared_head.head are the main model's tensors a second
    time: each must be written as its own copy (safetensors refuses shared storage)."""
    from moe.checkpoint import save_weights_checkpoint
    from moe.interop.hf import our_specs

    cfg = ours_with_mtp.cfg
    specs = our_specs(cfg, torch.float32)
    sd = ours_with_mtp.state_dict()
    save_weights_checkpoint(str(tmp_path / "a"), cfg, specs,
                            lambda write: [write(n, None, sd[n]) for n in specs], {}, {"test": True})
    assert main(["convert", "--to-hf", str(tmp_path / "a"), "--out", str(tmp_path / "hf"), "--quiet"]) == 0
    from safetensors.torch import load_file

    hf = load_file(tmp_path / "hf" / "model.safetensors")
    n = cfg.n_layers
    assert torch.equal(hf[f"model.layers.{n}.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    back, _ = load_model(str(tmp_path / "b"))
    for name, t in sd.items():
        assert torch.equal(back.state_dict()[name], t), name


def test_convert_cli_from_a_saved_transformers_model_then_generate(mixtral, tmp_path, capsys):
    hf, _, ours = mixtral
    src = save_hf(hf, tmp_path / "hf", max_shard_size="50KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # copied along (not a usable tokenizer)
    assert main(["convert", "--from-hf", src, "--out", str(tmp_path / "run"), "--dtype", "bf16", "--quiet"]) == 0
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    model, ckpt = load_model(str(tmp_path / "run"))
    assert ckpt.tensors["embed.weight"].dtype == torch.bfloat16 and ckpt.state["weights_only"]
    assert ckpt.tensors["layers.0.ffn.router.weight"].dtype == torch.bfloat16
    for name, t in ours.state_dict().items():  # bf16 storage: equal to bf16 rounding
        torch.testing.assert_close(model.state_dict()[name], t.to(torch.bfloat16).float(), rtol=0, atol=0)
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--tokenizer", "bytes", "--greedy", "--max-new-tokens", "5",
                 "--prompt", "ab", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["info", str(tmp_path / "run")]) == 0
    # weights only: train cannot resume it, and says so in one line (it was a KeyError traceback)
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "converted weights only" in err and err.count("\n") == 1


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", "--from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    assert main(["convert", "--from-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert main(["convert", "--to-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert main(["convert", "--from-hf", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_convert_cli_refuses_to_overwrite_and_misplaced_flags(mixtral, tmp_path, capsys):
    src = save_hf(mixtral[0], tmp_path / "hf")
    out = str(tmp_path / "run")
    assert main(["convert", "--from-hf", src, "--out", out, "--quiet", "--set", "max_seq_len=64"]) == 0
    assert load_model(out)[0].cfg.max_seq_len == 64
    assert main(["convert", "--from-hf", src, "--out", out, "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", "--from-hf", src, "--out", out, "--quiet", "--overwrite"]) == 0
    assert main(["convert", "--from-hf", src, "--out", out, "--layout", "fused"]) == 2
    assert main(["convert", "--to-hf", out, "--out", str(tmp_path / "hf")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_hf_entries_cover_both_expert_layouts():
    cfg = config_from_hf(deepseek_config().to_dict())
    per_expert = {e.hf for e in hf_entries(cfg)}
    fused = {e.hf for e in hf_entries(cfg, "fused")}
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in per_expert
    assert "model.layers.2.mlp.experts.gate_up_proj" in fused
    with pytest.raises(ValueError, match="layout"):
        hf_entries(cfg, "stacked")


def test_generate_uses_the_converted_tokenizer(mixtral, tmp_path, capsys):
    """convert copies a transformers tokenizer into OUT/tokenizer; generate streams text with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf, _, ours = mixtral
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz .")}
    vocab.update({f"<w{i}>": i for i in range(len(vocab), VOCAB - 1)}, **{"[UNK]": VOCAB - 1})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.Split("", "isolated"), decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    src = save_hf(hf, tmp_path / "hf")
    tokenizer.save_pretrained(src)
    assert main(["convert", "--from-hf", src, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    prompt = "the cat"
    ids = tokenizer.encode(prompt)
    want = tokenizer.decode(ids + generate(ours, ids, 12, temperature=0.0))
    capsys.readouterr()
    for stream in ([], ["--no-stream"]):
        assert main(["generate", str(tmp_path / "run"), "--greedy", "--max-new-tokens", "12", "--prompt", prompt,
                     *stream]) == 0
        assert capsys.readouterr().out == want + "\n"


def test_generate_caches_only_the_positions_it_needs(monkeypatch):
    """A converted DeepSeek-V3 says max_seq_len 163840: a cache that long would be 23 GB (fp32)."""
    cfg = PRESETS["toy"].replace(max_seq_len=1 << 16, n_mtp=1)
    model = Transformer(cfg).eval()
    sizes = []
    real = Transformer.new_cache
    monkeypatch.setattr(Transformer, "new_cache", lambda self, b, n=None, **kw: sizes.append(n) or real(self, b, n))
    generate(model, [1, 2, 3], 5, temperature=0.0)
    from moe.generate import speculative_generate

    speculative_generate(model, [1, 2, 3], 5)
    assert sizes == [3 + 5 + 1] * 2


def test_interop_parity_experiment_quick(tmp_path):
    experiment = load_experiment()
    n = torch.get_num_threads()
    try:
        assert experiment.main(["--out", str(tmp_path), "--quick"]) == 0
    finally:
        torch.set_num_threads(n)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 4 and sum(r["yarn"] for r in results.values()) == 2
    for r in results.values():
        assert r["max_abs_logit_diff"] < 1e-4 < r["max_abs_logit"]
        assert r["greedy_equal"] and r["from_hf_of_to_hf_exact"] and r["to_hf_of_from_hf_exact"] in (True, None)
