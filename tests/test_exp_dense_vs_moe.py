"""experiments/dense_vs_moe.py --quick: results.json keys, fair model sizes, curves, figures."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("dvm")
    dvm = load_experiment("dense_vs_moe")
    res = dvm.main(["--quick", "--out", str(out)])
    return out, res


@pytest.mark.slow
def test_quick_writes_results_with_the_three_models_and_spreads(quick):
    out, res = quick
    saved = json.loads((out / "results.json").read_text())
    assert saved["val_loss"] == pytest.approx(res["val_loss"])
    for key in ("moe", "dense_active", "dense_total", "moe_fine"):
        losses = [r["val_loss"] for r in saved["models"][key]["runs"]]
        assert len(losses) == 2 and all(0 < v < math.log(256) for v in losses)  # 2 seeds, better than uniform
        assert saved["val_loss"][key] == pytest.approx(sum(losses) / 2)
        s = saved["val_loss_spread"][key]
        assert s["n_seeds"] == 2 and s["min"] <= saved["val_loss"][key] <= s["max"] and s["std"] >= 0
        assert saved["val_bits_per_byte"][key] == pytest.approx(saved["val_loss"][key] / math.log(2))
    d = saved["paired"]["moe_minus_dense_active"]
    assert d["mean"] == pytest.approx(saved["val_loss"]["moe"] - saved["val_loss"]["dense_active"])
    table = (out / "table.md").read_text()
    assert all(m["label"] in table for m in saved["models"].values())


@pytest.mark.slow
def test_quick_compares_models_of_equal_active_and_equal_total_size(quick):
    m = quick[1]["models"]
    moe = m["moe"]
    assert m["dense_active"]["active_params"] == pytest.approx(moe["active_params"], rel=1e-3)
    assert m["dense_active"]["forward_flops_per_token"] == pytest.approx(moe["forward_flops_per_token"], rel=1e-2)
    assert m["dense_total"]["total_params"] == pytest.approx(moe["total_params"], rel=5e-3)
    assert m["dense_total"]["forward_flops_per_token"] > 1.5 * moe["forward_flops_per_token"]
    assert m["moe_fine"]["active_params"] == pytest.approx(moe["active_params"], rel=1e-2)
    assert m["moe_fine"]["config_changes"] == {"n_routed_experts": 16, "n_activated_experts": 4,
                                               "n_shared_experts": 2, "moe_inter_dim": 48}
    for name in ("dense_active", "dense_total"):
        assert m[name]["active_params"] == m[name]["total_params"]  # dense: everything is active


@pytest.mark.slow
def test_quick_curves_share_the_token_grid_and_figures_are_small(quick):
    out, res = quick
    grids = {name: [r["curve"]["tokens"] for r in model["runs"]] for name, model in res["models"].items()}
    first = next(iter(grids.values()))[0]
    assert first == sorted(first) and first[-1] == res["meta"]["tokens"]
    assert all(g == first for runs in grids.values() for g in runs)  # same data and tokens for every model
    for model in res["models"].values():
        for r in model["runs"]:
            assert r["curve"]["elapsed_s"] == sorted(r["curve"]["elapsed_s"]) and r["tokens_per_s"] > 0
    assert len(list((out / "metrics").glob("*.jsonl"))) == 8
    for png in ("dense_vs_moe.png", "dense_vs_moe_time.png"):
        size = (out / png).stat().st_size
        assert 10_000 < size < 150_000


def test_bad_flags_exit_with_a_usage_error(tmp_path, capsys):
    dvm = load_experiment("dense_vs_moe")
    with pytest.raises(SystemExit) as e:
        dvm.main(["--quick", "--out", str(tmp_path), "--models", "moe,bogus"])
    assert e.value.code == 2 and "allowed: moe, dense_active, dense_total, moe_fine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dvm.main(["--quick", "--out", str(tmp_path), "--set", "n_dense_layers=4"])
    assert "no MoE layer" in capsys.readouterr().err


def test_fine_grained_keeps_active_and_total_size():
    from moe.accounting import count_params
    from moe.config import PRESETS

    dvm = load_experiment("dense_vs_moe")
    toy = PRESETS["toy"]
    fine = dvm.fine_grained(toy)
    a, b = count_params(toy), count_params(fine)
    # only the router grows (one row per extra expert and layer)
    assert b["total"] - a["total"] == b["router"] - a["router"] == 8 * toy.dim * toy.n_moe_layers
    assert b["active"] - a["active"] == b["router"] - a["router"]
    with pytest.raises(ValueError, match="divisible by the granularity factor 2"):
        dvm.fine_grained(toy.replace(moe_inter_dim=95))
