"""experiments/mtp.py --quick: results.json keys, acceptance and speed-up against their bounds, figure."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_exp_dense_vs_moe import load_experiment


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtp")
    res = load_experiment("mtp").main(["--quick", "--out", str(out)])
    return out, res


@pytest.mark.slow
def test_quick_writes_the_headline_keys(quick):
    out, res = quick
    saved = json.loads((out / "results.json").read_text())
    assert 0 <= saved["acceptance_rate"] <= 1 and 0 <= saved["acceptance_rate_sampled"] <= 1
    assert saved["speedup"] > 0 and saved["speedup_bound"] > 0 and saved["draft_cost"] > 0
    assert saved["same_tokens_as_plain"] is True  # greedy speculative == plain greedy, every prompt and seed
    assert set(saved["val_loss"]) == {"n_mtp_0", "n_mtp_1", "n_mtp_2"}
    assert all(0 < v < math.log(256) for v in saved["val_loss"].values())
    assert [len(saved["draft_accuracy"][k]) for k in ("n_mtp_1", "n_mtp_2")] == [1, 2]
    assert set(saved["modes"]) == {"n_mtp_1/draft_len_1", "n_mtp_2/draft_len_1", "n_mtp_2/draft_len_2"}
    assert "two_beats_one" in saved["two_drafts_vs_one"]
    assert "DeepSeek-V3 (published)" in (out / "table.md").read_text()
    assert 10_000 < (out / "mtp.png").stat().st_size < 150_000


@pytest.mark.slow
def test_quick_measurements_respect_their_bounds(quick):
    for mode in quick[1]["modes"].values():
        for kind in ("greedy", "sampled"):
            m = mode[kind]
            assert len(m["acceptance_by_depth"]) == mode["draft_len"]
            # tokens per verify forward = 1 + a1 + a1*a2 exactly, minus the last step cut by max_new_tokens
            assert m["tokens_per_verify"]["mean"] <= m["bound_tokens_per_verify"]["mean"] + 1e-9
            assert m["tokens_per_verify"]["mean"] > m["bound_tokens_per_verify"]["mean"] - 0.25
            assert 1 <= m["tokens_per_verify"]["mean"] <= 1 + mode["draft_len"]
        g = mode["greedy"]
        assert g["speedup_bound"]["mean"] == pytest.approx(
            g["bound_tokens_per_verify"]["mean"] / (1 + g["draft_cost"]["mean"]), rel=0.2)  # mean of ratios


def test_expected_tokens_per_verify():
    mtp = load_experiment("mtp")
    assert mtp.expected_tokens_per_verify([0.9]) == pytest.approx(1.9)
    assert mtp.expected_tokens_per_verify([0.8, 0.5]) == pytest.approx(1 + 0.8 + 0.4)
    assert mtp.expected_tokens_per_verify([0.0, 1.0]) == 1.0


def test_bad_depths_are_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_experiment("mtp").main(["--quick", "--out", str(tmp_path), "--depths", "0,3"])
    assert e.value.code == 2 and "n_mtp values must be 0, 1 or 2" in capsys.readouterr().err
