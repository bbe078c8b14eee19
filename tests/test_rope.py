"""YaRN: hand-computed frequency tables, the softmax scale, the on/off rule, transformers' DeepseekV3.

The hand numbers, for DeepSeek-V3 (d = 64 rope channels, theta = 1e4, 4096 original positions,
s = 40, beta 32/1): pair i turns L f_i / (2 pi) times over L positions, so the ramp runs from
i = 64 ln(4096 / (32 * 2 pi)) / (2 ln 1e4) = 10.47 -> 10 to i = 64 ln(4096 / (2 pi)) / (2 ln 1e4)
= 22.51 -> 23. Pair i keeps (1 - r) + r / 40 of its frequency, r = clamp((i - 10) / 13, 0, 1):
1 up to i = 10, 1 - (1/13)(39/40) = 0.925 at 11, 0.55 at 16, 0.1 at 22, 1/40 from 23 on: 21 of
the 32 pairs change. Softmax scale: (0.1 ln 40 + 1)^2 = 1.36889^2 = 1.87385 (V3, mscale 1);
(0.0707 ln 40 + 1)^2 = 1.26081^2 = 1.58963 (V2 and V2-Lite, mscale 0.707).
"""

import math

import pytest
import torch

from moe.accounting import summary
from moe.attention import MHA, MLA
from moe.config import PRESETS, ModelConfig
from moe.model import Transformer
from moe.rope import (
    cfg_frequencies,
    rope_frequencies,
    softmax_scale_factor,
    yarn_correction_range,
    yarn_frequencies,
    yarn_on,
)

V3 = PRESETS["deepseek-v3"]


def test_deepseek_v3_correction_range_by_hand():
    assert yarn_correction_range(64, 1e4, 4096, 32, 1) == (10, 23)


def test_deepseek_v3_frequency_table_by_hand():
    kept = (yarn_frequencies(64, 1e4, 4096, 40.0, 32, 1) / rope_frequencies(64, 1e4)).tolist()
    by_hand = {0: 1.0, 5: 1.0, 10: 1.0, 11: 0.925, 16: 0.55, 22: 0.1, 23: 0.025, 31: 0.025}
    for i, share in by_hand.items():
        assert kept[i] == pytest.approx(share, rel=1e-5), i
    assert sum(abs(k - 1.0) > 1e-6 for k in kept) == 21  # the "21 of 32 pairs"
    assert rope_frequencies(64, 1e4)[16].item() == pytest.approx(0.01)  # 1e4^(-32/64)


def test_softmax_scale_factor_by_hand():
    assert softmax_scale_factor(V3) == pytest.approx(1.87385, abs=1e-5)
    assert softmax_scale_factor(PRESETS["deepseek-v2"]) == pytest.approx(1.58963, abs=1e-5)
    assert softmax_scale_factor(PRESETS["deepseek-v2-lite"]) == pytest.approx(1.58963, abs=1e-5)
    assert softmax_scale_factor(PRESETS["toy"]) == 1.0  # 256 positions <= 4096: off
    assert softmax_scale_factor(PRESETS["mixtral-8x7b"]) == 1.0  # no YaRN


def test_yarn_is_on_only_past_the_original_context():
    assert yarn_on(V3) and yarn_on(PRESETS["deepseek-v2-lite"])
    assert not yarn_on(V3.replace(max_seq_len=4096))
    assert not yarn_on(PRESETS["toy"]) and not yarn_on(PRESETS["mixtral-8x7b"])
    off = V3.replace(max_seq_len=4096)
    torch.testing.assert_close(cfg_frequencies(off, 64), rope_frequencies(64, 1e4), rtol=0, atol=0)
    assert softmax_scale_factor(off) == 1.0


def tiny(**kw):
    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=256, original_seq_len=64,
                rope_factor=4.0, beta_fast=32.0, beta_slow=1.0, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=8, inter_dim=64, moe_inter_dim=16, n_routed_experts=4)
    base.update(kw)
    return ModelConfig(**base)


def test_attention_scales_use_mscale():
    cfg = tiny(mscale=0.5)
    m = (0.1 * 0.5 * math.log(4.0) + 1) ** 2
    assert MLA(cfg).softmax_scale == pytest.approx((8 + 8) ** -0.5 * m)
    mha = tiny(attn="mha", head_dim=8, mscale=0.5)
    assert MHA(mha).softmax_scale == pytest.approx(8 ** -0.5 * m)
    assert MLA(tiny(max_seq_len=64)).softmax_scale == pytest.approx(16 ** -0.5)  # off


def test_model_rope_tables_use_yarn_frequencies():
    cfg = tiny()
    model = Transformer(cfg)
    freqs = yarn_frequencies(8, cfg.rope_theta, 64, 4.0, 32.0, 1.0)
    torch.testing.assert_close(model.rope_cos[100], torch.cos(100 * freqs))
    assert not torch.allclose(freqs, rope_frequencies(8, cfg.rope_theta))


@pytest.mark.parametrize("field, value", [("original_seq_len", 0), ("rope_factor", 0.5), ("beta_fast", 1.0),
                                          ("beta_slow", 0.0), ("mscale", -1.0), ("beta_fast", "32")])
def test_bad_yarn_fields_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


def test_calculator_counts_do_not_depend_on_yarn():
    for name in ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite"):
        on = PRESETS[name]
        off = on.replace(original_seq_len=on.max_seq_len)
        assert yarn_on(on) and not yarn_on(off)
        assert summary(on) == summary(off), name


def test_frequencies_and_scale_equal_transformers_deepseek_v3_yarn():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    for mscale in (1.0, 0.707):
        cfg = V3.replace(mscale=mscale)
        hf = DeepseekV3Config(
            vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
            kv_lora_rank=16, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=8, max_position_embeddings=163840,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                             "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale,
                             "original_max_position_embeddings": 4096})
        rotary = DeepseekV3RotaryEmbedding(hf)
        torch.testing.assert_close(cfg_frequencies(cfg, 64), rotary.inv_freq, rtol=1e-6, atol=0)
        assert rotary.attention_scaling == 1.0  # mscale == mscale_all_dim: no cos/sin scaling
        with torch.device("meta"):
            ours = MLA(cfg).softmax_scale
        assert ours == pytest.approx(DeepseekV3Attention(hf, 0).scaling, rel=1e-12)
