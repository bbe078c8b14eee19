"""Balancing modes (--balance), the logged load statistics, the link to transformers' loss, and
experiments/balancing.py --quick. The pitfalls are in tests/test_balance_pitfalls.py."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import pytest
import torch

from moe import balance
from moe.balance import BALANCE_FIELDS, MODES, mode_fields, mode_of
from moe.checkpoint import load_checkpoint, read_metrics
from moe.config import PRESETS
from moe.model import Transformer
from moe.train import train
from tests.test_cli import FAST, run
from tests.test_train import TINY, tiny_run, write_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ modes
def test_every_mode_sets_exactly_the_balancing_fields():
    assert {"none", "aux", "seq_aux", "aux_free", "aux_free+seq_aux", "aux_free+z"} <= set(MODES)
    for name, fields in MODES.items():
        assert set(fields) == set(BALANCE_FIELDS), name
        cfg = PRESETS["toy"].replace(**mode_fields(name))
        assert mode_of(cfg) == name
        losses = Transformer(cfg)(torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 9)))[1]
        expected = {k for k, f in (("aux", "aux_loss_alpha"), ("seq_aux", "seq_aux_loss_alpha"),
                                   ("z", "z_loss_coef")) if fields[f] > 0}
        assert set(losses) - {"ce", "loss"} == expected, name
        has_bias = Transformer(cfg).layers[-1].ffn.router.bias is not None
        assert has_bias == (fields["bias_update_speed"] > 0), name
    assert all(v == 0 for v in MODES["none"].values())
    assert mode_of(PRESETS["toy"].replace(aux_loss_alpha=0.123)) is None
    with pytest.raises(ValueError, match="unknown balancing mode 'aux_fre'; allowed: none, aux"):
        mode_fields("aux_fre")


def test_cli_balance_sets_the_mode_and_set_still_overrides(tmp_path, capsys):
    text = write_text(tmp_path / "text.txt")
    out = str(tmp_path / "run")
    cfg = tmp_path / "tiny.json"
    TINY.save(cfg)
    code, _, err = run(["train", "--config", str(cfg), "--balance", "aux", "--set", "aux_loss_alpha=0.05",
                        "--data", text, "--steps", "2", "--out", out, "--bias-freeze-frac", "0.5", *FAST], capsys)
    assert code == 0, err
    ckpt = load_checkpoint(out)
    assert ckpt.config.aux_loss_alpha == 0.05 and ckpt.config.bias_update_speed == 0.0
    assert ckpt.config.seq_aux_loss_alpha == 0.0  # the tiny config's 1e-4 is replaced by the mode's 0
    assert ckpt.train_config["bias_freeze_frac"] == 0.5
    assert all("aux" in r and "bias" not in r for r in read_metrics(out))
    code, _, err = run(["train", "--balance", "aux_fre", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "invalid choice: 'aux_fre'" in err
    code, _, err = run(["train", "--bias-freeze-frac", "1.5", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "expected a number in [0, 1], got '1.5'" in err


def test_bias_freeze_frac_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"bias_freeze_frac must be a number in \[0, 1\], got -0.1"):
        train(tiny_run(tmp_path, bias_freeze_frac=-0.1), TINY)


# ------------------------------------------------------------------------------ what is logged
def test_metrics_log_loads_entropy_and_bias_every_step(tmp_path):
    tc = tiny_run(tmp_path, steps=4, eval_interval=0)
    train(tc, TINY.replace(bias_update_speed=0.01))
    records = read_metrics(tc.out)
    E = TINY.n_routed_experts
    for r in records:
        assert len(r["tokens_per_expert"]) == len(r["router_entropy"]) == len(r["bias"]) == TINY.n_moe_layers
        assert all(sum(c) == 4 * 32 * 2 for c in r["tokens_per_expert"])
        assert all(0 < h <= math.log2(E) + 1e-6 for h in r["router_entropy"])
        assert all(len(b) == E for b in r["bias"])
    assert records[0]["bias"] == [[0.0] * E]  # step 1 routed with the initial bias
    assert records[-1]["bias"] != records[0]["bias"]


def test_router_entropy_hand_computed():
    uniform = torch.full((3, 8), 0.4)  # sigmoid scores, normalised to 1/8 each
    torch.testing.assert_close(balance.router_entropy_bits(uniform), torch.full((3,), 3.0))
    two = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(balance.router_entropy_bits(two), torch.tensor([1.0]))


# ------------------------------------------------------------------------------ transformers' loss
def test_transformers_load_balancing_loss_is_top_k_times_ours_over_all_layers_at_once():
    """transformers' load_balancing_loss_func (Mixtral, Qwen-MoE, ...) takes softmax of each layer's
    logits and computes one Switch loss over all layers' tokens at once, with f_i not divided by
    top_k: it equals top_k * switch_aux_loss of the concatenation. One layer: top_k * ours."""
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    E, K, T = 8, 2, 64
    logits = [torch.randn(T, E) * 2 for _ in range(3)]
    ours = lambda ls: balance.switch_aux_loss(torch.cat(ls).softmax(-1), torch.cat(ls).softmax(-1).topk(K).indices)
    theirs = lambda ls: hf.load_balancing_loss_func(tuple(ls), num_experts=E, top_k=K)
    torch.testing.assert_close(theirs(logits[:1]), K * ours(logits[:1]))
    torch.testing.assert_close(theirs(logits), K * ours(logits))
    # ... which is not the mean of the per-layer values that this code sums
    per_layer = sum(ours([lg]) for lg in logits) / len(logits)
    assert abs(float(theirs(logits) - K * per_layer)) > 1e-3


# ------------------------------------------------------------------------------ the experiment
@pytest.mark.slow
def test_balancing_experiment_quick(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("balancing_experiment", ROOT / "experiments" / "balancing.py")
    exp = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "balancing_experiment", exp)  # its dataclass looks itself up there
    spec.loader.exec_module(exp)
    assert exp.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    n_layers = PRESETS["toy"].n_moe_layers
    for mode in exp.COMPARE:
        r = res[mode]
        assert math.isfinite(r["val_ce"]) and 0 < r["val_ce"] < math.log(256) + 0.5, mode
        assert len(r["max_over_mean_load"]) == n_layers
        assert all(1.0 <= v <= PRESETS["toy"].n_routed_experts / 2 + 1e-6 for v in r["max_over_mean_load"]), mode
        assert 0 <= r["dropped_fraction"]["1.25"] <= r["dropped_fraction"]["1"] < 1
        for layer in res["specialisation"][mode]["layers"]:
            assert 0 <= layer["mi_bits"] <= layer["mi_max_bits"] + 1e-9 <= 1 + 1e-9
    assert set(res["collapse"]) == set(exp.COLLAPSE)
    assert res["settings"]["balanced_floor_window"] < res["settings"]["balanced_floor_per_step"]
    pic = res["specialisation"]["picture"]
    assert len(pic["text"]) == len(pic["top_expert"]) == 4 * res["settings"]["seq_len"]
    for name in ("load", "heatmap", "bias", "collapse", "domains", "routing"):
        assert (tmp_path / f"balancing_{name}.png").stat().st_size > 1000
    assert "<pre" in (tmp_path / "balancing_routing.html").read_text()
    assert "| aux_free |" in (tmp_path / "table.md").read_text()


def test_seq_aux_loss_takes_non_contiguous_inputs():
    """Scores and choices sliced out of larger tensors (strided views) give the same loss as copies."""
    g = torch.Generator().manual_seed(0)
    scores_TE = torch.rand(12, 16, generator=g)[:, ::2]  # stride 2 along experts
    experts_TK = torch.rand(12, 8, generator=g).topk(4, dim=-1).indices.t().contiguous().t()[:, :2]
    assert not scores_TE.is_contiguous() and not experts_TK.is_contiguous()
    valid_T = torch.ones(24, dtype=torch.bool)[::2]
    got = balance.seq_aux_loss(scores_TE, experts_TK, batch=3, valid_T=valid_T)
    want = balance.seq_aux_loss(scores_TE.contiguous(), experts_TK.contiguous(), batch=3, valid_T=valid_T.contiguous())
    torch.testing.assert_close(got, want)
