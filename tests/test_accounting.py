"""moe.accounting: hand-computed cases, published figures, exact agreement with meta-device builds, CLI.

Tolerances against published figures (which are rounded): totals within 0.5%, active within
2%. DeepSeek-V2-Lite's "2.4B activated" excludes the input embedding (ours: 2.45B without it,
2.66B with it), so that one row compares active minus embedding, within 3%.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe.__main__ as cli
from moe import accounting as acc
from moe.config import PRESETS, ModelConfig, dense_baseline
from moe.model import Transformer

ROOT = Path(__file__).resolve().parents[1]

# vocab 10, dim 8, 2 layers (1 dense + 1 MoE), GQA 2 heads / 1 kv head of width 4,
# 4 experts top-2 of width 6, 1 shared expert
SMALL_MHA = ModelConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, attn="mha", n_kv_heads=1, head_dim=4,
                        inter_dim=16, n_dense_layers=1, n_routed_experts=4, n_activated_experts=2,
                        n_shared_experts=1, moe_inter_dim=6, n_expert_groups=1, n_limited_groups=1, max_seq_len=16)
# vocab 10, dim 16, 1 dense layer, MLA with query compression, tied embeddings
SMALL_MLA = ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, attn="mla", q_lora_rank=8, kv_lora_rank=4,
                        qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4, inter_dim=32, n_dense_layers=1,
                        tie_embeddings=True, max_seq_len=16)


def meta_numel(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def meta_groups(cfg: ModelConfig) -> dict[str, int]:
    """The real model's parameters sorted into count_params' groups by their names."""
    with torch.device("meta"):
        model = Transformer(cfg)
    out = dict.fromkeys([*acc.GROUPS, "mtp"], 0)
    for name, p in model.named_parameters():  # a tied head is reported once, as embed.weight
        leaf = name.split(".")[-2] if name.endswith(".weight") else ""
        if name.startswith("mtp."):
            g = "mtp"
        elif name == "embed.weight":
            g = "embedding"
        elif name == "head.weight":
            g = "head"
        elif ".experts." in name:
            g = "routed_experts"
        elif ".router." in name:
            g = "router"
        elif ".shared." in name:
            g = "shared_experts"
        elif leaf.endswith("norm"):
            g = "norms"
        elif ".attn." in name:
            g = "attention"
        elif ".ffn." in name:
            g = "dense_ffn"
        else:
            raise AssertionError(f"unclassified parameter {name}")
        out[g] += p.numel()
    return out


# ---------------------------------------------------------------- parameters, by hand
def test_count_params_small_gqa_by_hand():
    p = acc.count_params(SMALL_MHA)
    assert p["embedding"] == 10 * 8 and p["head"] == 10 * 8
    assert p["attention"] == 2 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8)  # wq, wk, wv, wo in 2 layers
    assert p["norms"] == 2 * 2 * 8 + 8  # two per block + final
    assert p["dense_ffn"] == 3 * 8 * 16
    assert p["router"] == 4 * 8
    assert p["routed_experts"] == 4 * 3 * 8 * 6
    assert p["shared_experts"] == 3 * 8 * 6
    assert p["total"] == 1720
    assert p["active"] == 1720 - (4 - 2) * 3 * 8 * 6 == 1432
    assert p["routed_experts_active"] == 2 * 3 * 8 * 6
    assert p["mtp"] == p["mtp_active"] == 0


def test_count_params_small_mla_tied_by_hand():
    p = acc.count_params(SMALL_MLA)
    assert p["embedding"] == 160 and p["head"] == 0  # tied: counted once
    # wq_a 16x8, wq_b 8x(2*6), wkv_a 16x(4+2), wkv_b 4x(2*(4+4)), wo (2*4)x16
    assert p["attention"] == 128 + 96 + 96 + 64 + 128
    assert p["norms"] == 8 + 4 + 16 + 16 + 16  # q_norm, kv_norm, attn_norm, ffn_norm, final
    assert p["total"] == p["active"] == 160 + 512 + 60 + 3 * 16 * 32


def test_mtp_module_by_hand():
    p = acc.count_params(SMALL_MLA.replace(n_mtp=1))
    block = (8 + 4 + 16 + 16) + 512 + 3 * 16 * 32  # norms, attention, dense FFN (no MoE layers)
    assert p["mtp"] == 16 + 16 + 2 * 16 * 16 + block + 16  # hnorm, enorm, proj, block, norm
    assert p["total"] == acc.count_params(SMALL_MLA)["total"]  # MTP stays out of the main total


def test_active_equals_total_without_idle_experts():
    assert acc.count_params(SMALL_MHA.replace(n_activated_experts=4))["active"] == acc.count_params(SMALL_MHA)["total"]
    dense = SMALL_MHA.replace(n_dense_layers=2)
    assert acc.count_params(dense)["active"] == acc.count_params(dense)["total"]


# ---------------------------------------------------------------- parameters, vs the built model
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_params_equals_meta_build_for_every_preset(name):
    cfg = PRESETS[name]
    p = acc.count_params(cfg)
    assert p["total"] + p["mtp"] == p["total_with_mtp"] == meta_numel(cfg)


@st.composite
def small_configs(draw) -> ModelConfig:
    n_layers = draw(st.integers(1, 3))
    E = draw(st.integers(1, 6))
    common = dict(
        vocab_size=draw(st.integers(2, 20)), n_layers=n_layers, max_seq_len=8,
        n_dense_layers=draw(st.integers(0, n_layers)), n_routed_experts=E,
        n_activated_experts=draw(st.integers(1, E)), n_shared_experts=draw(st.integers(0, 2)),
        moe_inter_dim=draw(st.integers(1, 6)), inter_dim=draw(st.integers(1, 12)),
        n_expert_groups=1, n_limited_groups=1, tie_embeddings=draw(st.booleans()), n_mtp=draw(st.integers(0, 2)),
    )
    n_heads = draw(st.integers(1, 4))
    if draw(st.sampled_from(["mha", "mla"])) == "mha":
        n_kv = draw(st.sampled_from([d for d in range(1, n_heads + 1) if n_heads % d == 0]))
        return ModelConfig(attn="mha", dim=draw(st.integers(2, 12)), n_heads=n_heads, n_kv_heads=n_kv,
                           head_dim=2 * draw(st.integers(1, 3)), **common)
    return ModelConfig(attn="mla", dim=draw(st.integers(2, 12)), n_heads=n_heads,
                       q_lora_rank=draw(st.integers(0, 5)), kv_lora_rank=draw(st.integers(1, 5)),
                       qk_nope_head_dim=draw(st.integers(0, 4)), qk_rope_head_dim=2 * draw(st.integers(1, 2)),
                       v_head_dim=draw(st.integers(1, 4)), **common)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_configs())
def test_count_params_equals_meta_build_for_random_configs(cfg):
    p = acc.count_params(cfg)
    assert p["total"] + p["mtp"] == meta_numel(cfg)
    real = meta_groups(cfg)
    for g in acc.GROUPS:
        assert p[g] == real[g], g
    assert p["mtp"] == real["mtp"]
    assert 0 < p["active"] <= p["total"]
    unused = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim
    assert p["total"] - p["active"] == unused


# ---------------------------------------------------------------- published figures
@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "mixtral-8x7b"])
def test_published_total_and_active(name):
    total, active = acc.PUBLISHED[name]
    p = acc.count_params(PRESETS[name])
    assert p["total"] / 1e9 == pytest.approx(total, rel=0.005)
    assert p["active"] / 1e9 == pytest.approx(active, rel=0.02)


def test_deepseek_v3_headline_numbers():
    p = acc.count_params(PRESETS["deepseek-v3"])
    assert round(p["total"] / 1e9, 1) == 671.0
    assert round(p["active"] / 1e9, 1) == 37.6  # 37.55B: embedding and head included
    # the released checkpoint's "685B" also stores its own embedding and head for the MTP layer
    V, D = PRESETS["deepseek-v3"].vocab_size, PRESETS["deepseek-v3"].dim
    assert (p["total_with_mtp"] + 2 * V * D) / 1e9 == pytest.approx(685, rel=0.005)


def test_deepseek_v3_split_of_the_weights_readme():
    """README_WEIGHTS.md of the release: 36.7B activated in the main model, 11.5B unique MTP parameters
    (2.4B activated). Our 37.55B / 11.61B reach those figures without the input embedding and without
    the MTP module's eh_proj (docs/claims.md, row 1; the remaining 0.07B of the main model is unexplained)."""
    cfg = PRESETS["deepseek-v3"]
    p = acc.count_params(cfg)
    eh_proj = sum(w.numel for w in acc.mtp_weight_list(cfg) if w.group == "mtp_proj")
    assert eh_proj == 2 * cfg.dim * cfg.dim
    assert round((p["active"] - p["embedding"]) / 1e9, 2) == 36.63  # published 36.7B "incl. embedding and head"
    assert round((p["mtp"] - eh_proj) / 1e9, 1) == 11.5  # published 11.5B
    assert round((p["mtp_active"] - eh_proj + p["embedding"] + p["head"]) / 1e9, 1) == 2.4  # published 2.4B


def test_deepseek_v2_lite_published_active_excludes_embedding():
    cfg = PRESETS["deepseek-v2-lite"]
    total, active = acc.PUBLISHED["deepseek-v2-lite"]
    p = acc.count_params(cfg)
    assert p["total"] / 1e9 == pytest.approx(total, rel=0.005)
    assert (p["active"] - p["embedding"]) / 1e9 == pytest.approx(active, rel=0.03)


def test_dense_equal_total_matches_size_and_is_all_active():
    for name in ["deepseek-v3", "deepseek-v2", "mixtral-8x7b"]:
        cfg = PRESETS[name]
        dense = acc.dense_equal_total(cfg)
        p, d = acc.count_params(cfg), acc.count_params(dense)
        assert dense.n_moe_layers == 0 and d["active"] == d["total"]
        assert d["total"] == pytest.approx(p["total"], rel=1e-3)


def test_dense_equal_active_matches_active_size_and_flops():
    for name in ["toy", "deepseek-v3", "deepseek-v2", "mixtral-8x7b"]:
        cfg = PRESETS[name]
        dense = acc.dense_equal_active(cfg)
        p, d = acc.count_params(cfg), acc.count_params(dense)
        assert dense.n_moe_layers == 0 and d["active"] == d["total"]
        # one unit of width is 3 * dim * n_layers parameters: rounding is all that may differ
        assert abs(d["active"] - p["active"]) <= 1.5 * cfg.dim * cfg.n_layers
        assert acc.forward_flops_per_token(dense)["total"] == pytest.approx(
            acc.forward_flops_per_token(cfg)["total"], rel=1e-3)
    toy = acc.count_params(PRESETS["toy"])
    assert acc.count_params(dense_baseline(PRESETS["toy"]))["active"] < 0.96 * toy["active"]  # why it exists


# ---------------------------------------------------------------- FLOPs
def test_matmul_flops_are_twice_the_active_matmul_weights():
    for cfg in [SMALL_MHA, PRESETS["deepseek-v3"], PRESETS["mixtral-8x7b"]]:
        p = acc.count_params(cfg)
        f = acc.forward_flops_per_token(cfg, context=0)
        assert f["attention_context"] == 0
        assert f["total"] == 2 * (p["active"] - p["embedding"] - p["norms"])


def test_tied_head_still_costs_a_matmul():
    f = acc.forward_flops_per_token(SMALL_MLA, context=0)
    assert f["head"] == 2 * 16 * 10
    assert f["total"] == 2 * (512 + 3 * 16 * 32) + 2 * 16 * 10


def test_attention_context_flops_by_hand():
    # GQA: scores and values over 10 keys, 2 heads of width 4 (kv sharing saves memory, not FLOPs)
    assert acc.attention_context_flops(SMALL_MHA, 10) == 2 * 2 * 4 * 10 + 2 * 2 * 4 * 10
    # MLA naive: keys 4+2 wide, values 4; absorbed: latent 4 (+2 rope) for scores, 4 for values
    assert acc.attention_context_flops(SMALL_MLA, 10) == 2 * 2 * 6 * 10 + 2 * 2 * 4 * 10
    assert acc.attention_context_flops(SMALL_MLA, 10, absorbed=True) == 2 * 2 * 6 * 10 + 2 * 2 * 4 * 10
    v3 = PRESETS["deepseek-v3"]
    assert acc.attention_context_flops(v3, 1, absorbed=True) == 2 * 128 * 576 + 2 * 128 * 512
    f = acc.forward_flops_per_token(SMALL_MHA, context=10)
    assert f["attention_context"] == SMALL_MHA.n_layers * acc.attention_context_flops(SMALL_MHA, 10)


def test_mtp_forward_flops_by_hand():
    cfg = SMALL_MLA.replace(n_mtp=1)
    f = acc.forward_flops_per_token(cfg, context=3, include_mtp=True)
    block = 2 * (512 + 3 * 16 * 32) + acc.attention_context_flops(cfg, 3)
    assert f["mtp"] == 2 * (2 * 16 * 16) + block + 2 * 16 * 10  # proj, block, shared head


def test_training_flops_three_times_forward_and_6nd():
    cfg = SMALL_MHA
    t = acc.training_flops(cfg, tokens=1000, seq_len=9)
    fwd = acc.forward_flops_per_token(cfg, context=5, include_mtp=True)["total"]  # mean causal context (9+1)/2
    assert t["per_token"] == 3 * fwd and t["total"] == 3000 * fwd
    assert t["six_n_d"] == 6 * (1432 - 80) * 1000
    v3 = acc.training_flops(PRESETS["deepseek-v3"], acc.DEEPSEEK_V3_TRAIN_TOKENS, seq_len=4096)
    assert v3["six_n_d"] == pytest.approx(3.25e24, rel=0.01)


# ---------------------------------------------------------------- memory
def test_weight_bytes_by_precision():
    n = acc.count_params(SMALL_MHA)["total"]
    assert acc.weight_bytes(SMALL_MHA, "fp32") == 4 * n
    assert acc.weight_bytes(SMALL_MHA, "bf16") == 2 * n
    assert acc.weight_bytes(SMALL_MHA, "int4") == n / 2
    p = acc.count_params(SMALL_MHA)
    low = p["attention"] + p["dense_ffn"] + p["shared_experts"] + p["routed_experts"]
    # every matrix here is smaller than 128x128: one fp32 scale each (4 attention, 3 dense, 3 shared, 4*3 experts)
    assert acc.weight_bytes(SMALL_MHA, "fp8") == low + 2 * (n - low) + 4 * (2 * 4 + 3 + 3 + 12)
    with pytest.raises(ValueError, match="precision"):
        acc.weight_bytes(SMALL_MHA, "fp16")


def test_fp8_block_scales_one_per_128x128():
    assert acc.fp8_scale_count([acc.Weight("attention", "w", (256, 200), copies=3)]) == 3 * 2 * 2
    assert acc.fp8_scale_count([acc.Weight("norms", "n", (256,))]) == 0


def test_fp8_saves_75_percent_vs_fp32_and_50_vs_bf16_on_v3():
    v3 = PRESETS["deepseek-v3"]
    fp8, fp32, bf16 = (acc.weight_bytes(v3, k) for k in ("fp8", "fp32", "bf16"))
    assert 0.745 < 1 - fp8 / fp32 < 0.75  # a little under 75%: scales, bf16 embedding/head/router/norms
    assert 0.495 < 1 - fp8 / bf16 < 0.50
    assert fp8 / 1e9 == pytest.approx(673.2, abs=0.1)


def test_training_state_by_recipe():
    p = acc.count_params(SMALL_MLA.replace(n_mtp=1))
    n = p["total"] + p["mtp"]
    cfg = SMALL_MLA.replace(n_mtp=1)
    fp32 = acc.training_state_bytes(cfg, "fp32-adamw")
    assert fp32["total"] == 16 * n and fp32["optimizer"] == 8 * n and fp32["bytes_per_param"] == 16
    ds = acc.training_state_bytes(cfg, "deepseek-v3")
    assert ds["total"] == 14 * n and ds["moments"] == 4 * n and ds["master"] == 4 * n
    assert acc.training_state_bytes(cfg, "bf16-mixed-adamw")["total"] == 16 * n
    with pytest.raises(ValueError, match="recipe"):
        acc.training_state_bytes(cfg, "sgd")


def test_linear_inputs_cached_by_hand_toy():
    """Toy: 4 MLA layers (no query compression), 1 dense + 3 MoE, top-2 of 8 experts of width 96, 1 shared."""
    cfg = PRESETS["toy"]
    # per layer: attention x 128 (fp8), kv latent 64 (fp8), attention output 4 x 32 = 128 (E5M6)
    # dense: x 128, hidden 384; MoE: router x 128 (bf16), 2 expert copies of x 128 and hidden 96,
    # shared x 128 and hidden 96; head x 128 (bf16)
    numbers = 4 * (128 + 64 + 128) + (128 + 384) + 3 * (128 + 2 * 128 + 2 * 96 + 128 + 96) + 128
    assert acc.linear_input_bytes_per_token(cfg, "bf16")["total"] == 2 * numbers == 8640
    tile = 4  # one fp32 scale per started 1x128 tile; 384 = 3 tiles
    attention = 4 * ((128 + tile) + (64 + tile) + (1.5 * 128 + tile))
    dense = (128 + tile) + (384 + 3 * tile)
    moe_layers = 3 * (2 * 128 + 2 * (128 + tile) + 2 * (96 + tile) + (128 + tile) + (96 + tile))
    fp8 = acc.linear_input_bytes_per_token(cfg, "fp8")
    assert fp8["total"] == attention + dense + moe_layers + 2 * 128 == 5224
    assert fp8["router"] == 3 * 256 and fp8["head"] == 256  # stay bf16
    with_mtp = acc.linear_input_bytes_per_token(cfg.replace(n_mtp=1), "bf16")
    # the MTP module: projection input 2 x 128, one MoE block, its head input
    assert with_mtp["mtp"] == 2 * (256 + (128 + 64 + 128) + (128 + 2 * 128 + 2 * 96 + 128 + 96) + 128)
    with pytest.raises(ValueError, match="storage"):
        acc.linear_input_bytes_per_token(cfg, "int8")


def test_fp8_activation_caching_saves_less_than_half_on_v3():
    s = acc.summary(PRESETS["deepseek-v3"])["linear_inputs_cached"]
    saving = 1 - s["fp8"]["bytes_per_token"] / s["bf16"]["bytes_per_token"]
    assert 0.40 < saving < 0.45  # not 50%: scales, E5M6 for the attention output, bf16 router and head


def test_cards_needed():
    assert acc.cards_needed(24e9) == 1 and acc.cards_needed(24e9 + 1) == 2
    assert acc.cards_needed(acc.weight_bytes(PRESETS["deepseek-v3"], "fp8")) == 29


# ---------------------------------------------------------------- KV cache
def test_kv_cache_mha_gqa_mla_by_hand():
    mix = PRESETS["mixtral-8x7b"]  # GQA: 8 kv heads of 128
    assert acc.kv_cache_elems(mix) == 2 * 8 * 128
    assert acc.kv_cache_bytes_per_token(mix, "bf16") == {"per_layer": 4096, "per_token": 32 * 4096}
    assert acc.kv_cache_elems(mix.replace(n_kv_heads=None)) == 2 * 32 * 128  # MHA
    v3 = PRESETS["deepseek-v3"]
    assert acc.kv_cache_elems(v3) == 512 + 64  # latent + shared rope key
    assert acc.kv_cache_elems(v3, absorbed=False) == 128 * (128 + 64 + 128)
    assert acc.kv_cache_bytes_per_token(v3, "fp8")["per_layer"] == 576
    variants = acc.kv_cache_variants(v3, gqa_groups=8)
    assert variants == {"MHA": 128 * 320, "GQA (8 groups)": 8 * 320, "MQA": 320, "MLA": 576}


def test_kv_cache_matches_what_the_model_allocates():
    for cfg in [SMALL_MHA, SMALL_MLA]:
        with torch.device("meta"):
            cache = Transformer(cfg).new_cache(batch=1, max_len=1)[0]
        assert sum(t.numel() for t in cache.values()) == acc.kv_cache_elems(cfg)


# ---------------------------------------------------------------- cost
def test_deepseek_cost_arithmetic():
    c = acc.deepseek_v3_cost()
    assert c["gpu_hours"] == 2_788_000
    assert c["cost_usd"] == pytest.approx(5_576_000)
    assert acc.training_cost(1000, 2.5) == 2500
    # 1 GPU-hour at 1 PFLOP/s peak is 3.6e18 FLOPs
    assert acc.implied_utilisation(1.8e18, 1, peak_tflops=1000) == pytest.approx(0.5)


def test_summary_is_json_and_has_the_contract_keys():
    s = acc.summary(PRESETS["toy"], tokens=1e6, gpu_hours=10, price=3)
    s2 = json.loads(json.dumps(s))
    assert s2["total_params"] == acc.count_params(PRESETS["toy"])["total"]
    assert s2["training"]["cost_usd"] == 30
    assert s2["context"] == PRESETS["toy"].max_seq_len  # min(4096, max_seq_len)
    assert s2["flops_per_token"]["training"] == acc.training_flops(PRESETS["toy"], 1, seq_len=256)["per_token"]
    with pytest.raises(ValueError, match="context"):
        acc.summary(PRESETS["toy"], context=0)


# ---------------------------------------------------------------- CLI
@pytest.fixture
def run_cli(monkeypatch, capsys):
    """python -m moe ... with only the calc command registered (others may be under construction)."""
    monkeypatch.setattr(cli, "CLI_MODULES", ("moe.accounting",))

    def run(*argv: str) -> tuple[int, str, str]:
        rc = cli.main(list(argv))
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def test_cli_calc_table_v3(run_cli):
    rc, out, _ = run_cli("calc", "--preset", "deepseek-v3")
    assert rc == 0
    assert "671.03B" in out and "37.55B" in out and "24 GB" in out


def test_cli_calc_json(run_cli):
    rc, out, _ = run_cli("calc", "--preset", "mixtral-8x7b", "--json")
    d = json.loads(out)
    p = acc.count_params(PRESETS["mixtral-8x7b"])
    assert rc == 0 and d["total_params"] == p["total"] and d["active_params"] == p["active"]


def test_cli_calc_set_and_config_file(run_cli, tmp_path):
    _, out, _ = run_cli("calc", "--preset", "mixtral-8x7b", "--set", "n_activated_experts=8", "--json")
    d = json.loads(out)
    assert d["active_params"] == d["total_params"]
    path = tmp_path / "cfg.json"
    PRESETS["deepseek-v2-lite"].save(path)
    _, out, _ = run_cli("calc", "--config", str(path), "--json")
    assert json.loads(out)["total_params"] == acc.count_params(PRESETS["deepseek-v2-lite"])["total"]


def test_cli_calc_cost_line(run_cli):
    _, out, _ = run_cli("calc", "--preset", "deepseek-v3", "--tokens", "14.8e12", "--gpu-hours", "2.788e6",
                        "--gpus", "2048", "--json")
    t = json.loads(out)["training"]
    assert t["cost_usd"] == pytest.approx(5.576e6) and 0.3 < t["utilisation_6nd"] < 0.35
    assert t["days"] == pytest.approx(2.788e6 / 2048 / 24)
    _, out, _ = run_cli("calc", "--preset", "deepseek-v3", "--gpu-hours", "2.788e6", "--gpus", "2048")
    assert "$5,576,000" in out and "56.7 days on 2,048 GPUs" in out


def test_cli_calc_compare(run_cli):
    rc, out, _ = run_cli("calc", "--compare", "toy,deepseek-v3,mixtral-8x7b")
    header = out.splitlines()[0].split()
    assert rc == 0 and header == ["toy", "deepseek-v3", "mixtral-8x7b"]
    assert "671.03B" in out and "46.70B" in out
    _, out, _ = run_cli("calc", "--compare", "toy,deepseek-v2", "--json")
    assert set(json.loads(out)) == {"toy", "deepseek-v2"}


@pytest.mark.parametrize("argv, message", [
    (["--preset", "gpt-5"], "unknown preset 'gpt-5'"),
    (["--set", "dim"], "expects key=value"),
    (["--set", "no_such_field=1"], "unknown field"),
    (["--set", "dim=wide"], "cannot parse"),
    (["--set", "n_activated_experts=99"], "n_activated_experts"),
    (["--compare", "toy,nope"], "unknown preset 'nope'"),
    (["--config", "/no/such/file.json"], "not found"),
    (["--context", "0"], "context"),
    (["--gpu-hours", "10", "--gpus", "0"], "--gpus"),
])
def test_cli_calc_bad_input_is_one_line_exit_2(run_cli, argv, message):
    rc, out, err = run_cli("calc", *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value", [("--peak-tflops", "0"), ("--peak-tflops", "-5"), ("--price", "-1"),
                                         ("--tokens", "nan"), ("--gpu-hours", "inf"), ("--card-gb", "nan"),
                                         ("--batch-tokens", "0"), ("--ep", "0"), ("--nodes", "-1")])
def test_cli_calc_refuses_numbers_outside_their_range(monkeypatch, capsys, flag, value):
    """0 peak TFLOP/s once divided by zero; a negative price or NaN tokens printed nonsense."""
    monkeypatch.setattr(cli, "CLI_MODULES", ("moe.accounting",))
    with pytest.raises(SystemExit) as e:
        cli.main(["calc", "--tokens", "1e12", "--gpu-hours", "1e6", "--gpus", "8", flag, value])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and "Traceback" not in err
    assert f"argument {flag}: expected a finite number" in err or f"argument {flag}: expected a positive" in err


# ---------------------------------------------------------------- experiment
def test_savings_quick_writes_figures_and_results(tmp_path):
    spec = importlib.util.spec_from_file_location("savings", ROOT / "experiments" / "savings.py")
    savings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(savings)
    assert savings.main(["--out", str(tmp_path), "--quick"]) == 0
    for name in ["params.png", "memory.png", "kv_cache.png", "flops.png", "results.json"]:
        assert (tmp_path / name).stat().st_size > 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["presets"]["deepseek-v3"]["total_params"] == acc.count_params(PRESETS["deepseek-v3"])["total"]
    assert math.isclose(res["claims"]["deepseek_v3_cost"]["cost_usd"], 5.576e6)
