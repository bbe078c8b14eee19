import json
import stat

import pytest

from moe.config import PRESETS, ModelConfig, dense_baseline, get_preset, parse_overrides, with_umask

TOY = PRESETS["toy"]


@pytest.mark.parametrize(
    "changes, fields",
    [
        ({"n_activated_experts": 9}, ["n_activated_experts", "n_routed_experts"]),
        ({"n_expert_groups": 3}, ["n_routed_experts", "n_expert_groups"]),
        ({"n_limited_groups": 5}, ["n_limited_groups", "n_expert_groups"]),
        ({"n_expert_groups": 8, "n_limited_groups": 1, "n_activated_experts": 2}, ["n_limited_groups"]),
        ({"attn": "mha", "dim": 130, "n_heads": 4}, ["dim", "n_heads"]),
        ({"attn": "mha", "n_kv_heads": 3}, ["n_kv_heads", "n_heads"]),
        ({"attn": "mha", "head_dim": 7}, ["head_dim"]),
        ({"attn": "gqa"}, ["attn", "'mha', 'mla'"]),
        ({"score_func": "relu"}, ["score_func", "'softmax', 'sigmoid'"]),
        ({"expert_impl": "fast"}, ["expert_impl"]),
        ({"dim": 0}, ["dim"]),
        ({"vocab_size": -1}, ["vocab_size"]),
        ({"n_layers": 2, "n_dense_layers": 3}, ["n_dense_layers", "n_layers"]),
        ({"kv_lora_rank": 0}, ["kv_lora_rank"]),
        ({"qk_rope_head_dim": 15}, ["qk_rope_head_dim"]),
        ({"capacity_factor": 0.0}, ["capacity_factor"]),
        ({"route_scale": 0.0}, ["route_scale"]),
        ({"aux_loss_alpha": -1.0}, ["aux_loss_alpha"]),
        ({"n_shared_experts": -1}, ["n_shared_experts"]),
        ({"n_mtp": -1}, ["n_mtp"]),
        ({"max_seq_len": 0}, ["max_seq_len"]),
    ],
)
def test_invalid_configs_name_the_fields(changes, fields):
    with pytest.raises(ValueError) as e:
        TOY.replace(**changes)
    for f in fields:
        assert f in str(e.value)


def test_every_preset_is_valid_and_frozen():
    for cfg in PRESETS.values():
        cfg.validate()
        with pytest.raises(AttributeError):
            cfg.dim = 1  # frozen
    assert {"toy", "deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "mixtral-8x7b"} <= set(PRESETS)


def test_json_round_trip_and_replace(tmp_path):
    for cfg in PRESETS.values():
        assert ModelConfig.from_json(cfg.to_json()) == cfg
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "sub" / "cfg.json"
    TOY.save(path)
    assert ModelConfig.load(path) == TOY
    assert not [p for p in path.parent.iterdir() if p.name != "cfg.json"]  # no temp files left
    assert stat.S_IMODE(path.stat().st_mode) == with_umask(0o666)  # not the temp file's private 0600
    c2 = TOY.replace(dim=64)
    assert c2.dim == 64 and TOY.dim == 128


def test_bad_serialised_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown ModelConfig field.*'nope'"):
        ModelConfig.from_dict({**TOY.to_dict(), "nope": 1})
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json("{dim: 3")
    with pytest.raises(ValueError, match="must be an object"):
        ModelConfig.from_json(json.dumps([1, 2]))
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ModelConfig.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        TOY.replace(dimm=3)
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*allowed"):
        get_preset("gpt5")


def test_parse_overrides_types_and_errors():
    got = parse_overrides(["dim=64", "route_scale=2.5", "tie_embeddings=true", "capacity_factor=none",
                           "score_func=softmax"])
    assert got == {"dim": 64, "route_scale": 2.5, "tie_embeddings": True, "capacity_factor": None,
                   "score_func": "softmax"}
    assert parse_overrides(["capacity_factor=1.25"]) == {"capacity_factor": 1.25}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["dim"])
    with pytest.raises(ValueError, match="unknown field 'dimm'"):
        parse_overrides(["dimm=3"])
    with pytest.raises(ValueError, match="dim: cannot parse 'x'"):
        parse_overrides(["dim=x"])


def test_dense_baseline_matches_active_ffn_width():
    cfg = PRESETS["deepseek-v3"]
    dense = dense_baseline(cfg)
    assert dense.n_dense_layers == dense.n_layers == cfg.n_layers
    assert dense.inter_dim == (8 + 1) * 2048
    assert dense_baseline(dense) == dense


@pytest.mark.parametrize(
    "changes, message",
    [
        # booleans: a JSON string "false" would be truthy and train the opposite of what info prints
        ({"tie_embeddings": "false"}, "tie_embeddings must be true or false"),
        ({"norm_topk_prob": "no"}, "norm_topk_prob must be true or false"),
        ({"norm_topk_prob": 1}, "norm_topk_prob must be true or false"),
        # numbers of the wrong type used to surface as TypeError tracebacks
        ({"capacity_factor": "1.0"}, "capacity_factor must be a finite number or None"),
        ({"qk_nope_head_dim": True}, "qk_nope_head_dim must be an integer"),
        ({"dim": 128.0}, "dim must be an integer"),
        ({"n_kv_heads": 2.0}, "n_kv_heads must be an integer or None"),
        ({"attn": None}, "attn must be a string"),
        # NaN passes `< 0` checks; inf overflowed in the capacity computation
        ({"capacity_factor": float("inf")}, "capacity_factor must be a finite number"),
        ({"norm_eps": float("nan")}, "norm_eps must be a finite number"),
        ({"bias_update_speed": float("nan")}, "bias_update_speed must be a finite number"),
        ({"route_scale": float("-inf")}, "route_scale must be a finite number"),
        ({"mtp_loss_weight": -0.1}, "mtp_loss_weight must be a finite number >= 0"),
    ],
)
def test_every_field_is_type_checked_and_finite(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**TOY.to_dict(), **changes})


def test_set_overrides_reject_non_finite_numbers():
    for raw in ("inf", "nan", "-inf"):
        with pytest.raises(ValueError, match="capacity_factor must be a finite number"):
            TOY.replace(**parse_overrides([f"capacity_factor={raw}"]))


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin1.json"
    bad.write_bytes('{"dim": 128, "attn": "m\xe9a"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"config file .*latin1.json is not UTF-8"):
        ModelConfig.load(bad)
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"tie_embeddings": "false"}))
    with pytest.raises(ValueError, match=r"config file .*typed.json: tie_embeddings must be true or false"):
        ModelConfig.load(typed)
    nan = tmp_path / "nan.json"
    nan.write_text('{"bias_update_speed": NaN}')  # Python's json accepts the literal; we must not
    with pytest.raises(ValueError, match="bias_update_speed must be a finite number"):
        ModelConfig.load(nan)


def test_deepseek_presets_use_the_published_init_std():
    for name in ("deepseek-v3", "deepseek-v2", "deepseek-v2-lite"):
        assert PRESETS[name].init_std == 0.006, name
