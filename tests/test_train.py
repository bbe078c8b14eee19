"""Training loop: loss goes down, resume is bit for bit, checkpoints are atomic and verified."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys

import pytest
import torch

from moe import train as train_mod
from moe.checkpoint import load_checkpoint, read_metrics
from moe.config import PRESETS
from moe.device import resolve_device
from moe.model import Transformer
from moe.train import TrainConfig, TrainingDiverged, train

# A model small enough that a training step takes milliseconds on a CPU.
TINY = PRESETS["toy"].replace(dim=32, n_layers=2, n_heads=2, max_seq_len=64, kv_lora_rank=16,
                              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, inter_dim=64,
                              moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2,
                              n_expert_groups=2, n_limited_groups=1, n_mtp=0)

SENTENCES = ["the cat sat on the mat. ", "a dog ran in the park. ", "def add(a, b):\n    return a + b\n",
             "the sun is hot and the sea is wide. ", "for i in range(10):\n    print(i)\n"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_text(path, n: int = 400) -> str:
    """A small, learnable UTF-8 text file (a fixed mix of a few sentences)."""
    text = "".join(SENTENCES[(i * 7 + i // 3) % len(SENTENCES)] for i in range(n))
    path.write_text(text, encoding="utf-8")
    return str(path)


def tiny_run(tmp_path, name: str = "run", **changes) -> TrainConfig:
    base = TrainConfig(out=str(tmp_path / name), steps=20, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-3,
                       warmup_steps=3, eval_interval=10, eval_windows=8, seed=0, device="cpu",
                       data=write_text(tmp_path / "text.txt"), progress=False, plots=False)
    return dataclasses.replace(base, **changes)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ the loop
def test_short_run_lowers_the_loss(tmp_path):
    tc = tiny_run(tmp_path, steps=40, eval_interval=40)
    result = train(tc, TINY)
    records = read_metrics(tc.out)
    assert [r["step"] for r in records] == list(range(1, 41))
    first = sum(r["ce"] for r in records[:3]) / 3
    last = sum(r["ce"] for r in records[-3:]) / 3
    assert first > math.log(256) - 0.5
    assert last < first - 1.5
    assert result.val_loss < result.unigram_loss  # already beats byte frequencies


def test_metrics_record_the_promised_fields(tmp_path):
    tc = tiny_run(tmp_path, steps=4, eval_interval=2, seq_len=16, grad_accum=2)
    train(tc, TINY.replace(n_mtp=1, aux_loss_alpha=0.01, z_loss_coef=1e-3))
    records = read_metrics(tc.out)
    for r in records:
        for key in ("step", "loss", "ce", "mtp", "aux", "seq_aux", "z", "lr", "grad_norm", "tokens_per_s",
                    "load_max_over_mean"):
            assert key in r, key
        assert len(r["load_max_over_mean"]) == TINY.n_moe_layers + 1  # + the MTP block's MoE
        assert r["tokens"] == r["step"] * 4 * 16 * 2
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("tokens_per_expert" in r and "unigram_loss" in r for r in evals)
    # grad_accum=2 micro-batches of 4 x 16 tokens, top-2: each main MoE layer counted 2 * 64 * 2
    # assignments; the MTP block sees 15 positions per sequence
    *main, mtp = evals[-1]["tokens_per_expert"]
    assert all(sum(row) == 2 * 64 * 2 for row in main)
    assert sum(mtp) == 2 * 4 * 15 * 2


def test_lr_schedule_warms_up_then_decays_to_min():
    tc = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [train_mod.lr_at(s, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_balancing_bias_moves_and_stats_are_reset(tmp_path):
    tc = tiny_run(tmp_path, steps=5, eval_interval=0)
    result = train(tc, TINY)
    from moe.layer import moe_layers

    layers = moe_layers(result.model)
    assert any(m.router.bias.abs().sum() > 0 for m in layers)
    assert all(m.tokens_per_expert_E.sum() == 0 for m in layers)  # reset after the last step/eval


# ------------------------------------------------------------------------------ resume
def test_resume_is_bit_for_bit(tmp_path):
    straight = train(tiny_run(tmp_path, "straight", steps=20), TINY)
    half = train(tiny_run(tmp_path, "split", steps=20, stop_at=10), TINY)
    assert half.step == 10 and half.stopped_early
    resumed = train(tiny_run(tmp_path, "split", steps=20), resume=True)
    assert resumed.step == 20
    a, b = state_of(straight.model), state_of(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the logged losses agree too, and the split run's log has each step once
    la = [r["loss"] for r in read_metrics(straight.out)]
    lb = [r["loss"] for r in read_metrics(resumed.out)]
    assert la == lb


def test_resume_trains_with_the_weight_decay_and_betas_it_is_given(tmp_path, monkeypatch):
    """load_state_dict restores each group's old hyperparameters; the resume's own (as its train.json
    records them) must win."""
    built = []
    real = train_mod.build_optimizer
    monkeypatch.setattr(train_mod, "build_optimizer", lambda model, tc: built.append(real(model, tc)) or built[-1])
    train(tiny_run(tmp_path, steps=4, stop_at=2, weight_decay=0.1), TINY)
    tc = tiny_run(tmp_path, steps=4, weight_decay=0.05, beta1=0.8, beta2=0.9)
    train(tc, resume=True)
    groups = built[-1].param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # matrices decay, norms and biases do not
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)
    assert built[-1].state  # the moments were restored all the same
    saved = json.loads((pathlib.Path(tc.out) / "ckpt-00000004" / "train.json").read_text())
    assert (saved["weight_decay"], saved["beta1"], saved["beta2"]) == (0.05, 0.8, 0.9)


def test_resume_of_a_checkpoint_folder_is_refused_untouched(tmp_path):
    """Resuming ckpt-* itself would train inside it, and the run's next save would delete it."""
    tc = tiny_run(tmp_path, steps=2, eval_interval=0)
    train(tc, TINY)
    folder = pathlib.Path(tc.out) / "ckpt-00000002"
    before = sorted(os.listdir(folder))
    with pytest.raises(ValueError, match=r"--resume takes a run folder.*--resume .*run$"):
        train(dataclasses.replace(tc, out=str(folder), steps=3), resume=True)
    assert sorted(os.listdir(folder)) == before


def test_the_thread_count_is_restored_when_setup_refuses(tmp_path):
    threads = torch.get_num_threads()
    refused = [{"parallel": "dp"}] + ([{"device": "cuda"}] if not torch.cuda.is_available() else [])
    for change in refused:
        with pytest.raises(ValueError):
            train(tiny_run(tmp_path, threads=threads + 1, **change), TINY)
        assert torch.get_num_threads() == threads


def test_overwrite_starts_afresh_over_a_corrupt_latest(tmp_path):
    tc = tiny_run(tmp_path, steps=2, eval_interval=0)
    os.makedirs(tc.out)
    pathlib.Path(tc.out, "LATEST").write_text("garbage\n")
    with pytest.raises(ValueError, match="corrupt"):
        train(tc, TINY)
    assert train(dataclasses.replace(tc, overwrite=True), TINY).step == 2
    assert load_checkpoint(tc.out).step == 2


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    tc = tiny_run(tmp_path, steps=6, eval_interval=3, save_interval=3)
    train(tc, TINY)
    path = os.path.join(tc.out, "ckpt-00000006")
    assert os.path.isdir(path)
    # pretend the run crashed at step 8 after its last save at step 6
    with open(os.path.join(tc.out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n" + json.dumps({"step": 8, "loss": 1.0}) + "\n{\"st")
    train(dataclasses.replace(tc, steps=8), resume=True)
    steps = [r["step"] for r in read_metrics(tc.out)]
    assert steps == list(range(1, 9))


def test_resume_with_a_different_config_fails_clearly(tmp_path):
    tc = tiny_run(tmp_path, steps=2)
    train(tc, TINY)
    with pytest.raises(ValueError, match=r"different model config: dim: checkpoint 32, requested 48"):
        train(dataclasses.replace(tc, steps=4), TINY.replace(dim=48), resume=True)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    tc = tiny_run(tmp_path, steps=2)
    train(tc, TINY)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tc, TINY)
    result = train(dataclasses.replace(tc, overwrite=True), TINY)
    assert result.step == 2
    assert [r["step"] for r in read_metrics(tc.out)] == [1, 2]


def test_resume_without_a_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        train(tiny_run(tmp_path, "nothing"), resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        train(tiny_run(tmp_path, "empty"), resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    tc = tiny_run(tmp_path, steps=6, eval_interval=2)
    real_forward = Transformer.forward
    calls = {"n": 0}

    def forward(self, tokens, targets=None, *args, **kwargs):
        logits, losses = real_forward(self, tokens, targets, *args, **kwargs)
        if targets is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                losses["loss"] = losses["loss"] * float("nan")
        return logits, losses

    monkeypatch.setattr(Transformer, "forward", forward)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*ckpt-00000002"):
        train(tc, TINY)
    monkeypatch.undo()
    assert load_checkpoint(tc.out).step == 2
    resumed = train(tc, resume=True)  # and the run can go on from there
    assert resumed.step == 6


def test_bad_train_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train(tiny_run(tmp_path, steps=0), TINY)
    with pytest.raises(ValueError, match="min_lr must be"):
        train(tiny_run(tmp_path, lr=1e-3, min_lr=1e-2), TINY)
    with pytest.raises(ValueError, match="seq_len=128 exceeds the model's max_seq_len=64"):
        train(tiny_run(tmp_path, seq_len=128), TINY)
    with pytest.raises(ValueError, match="unknown device"):
        train(tiny_run(tmp_path, device="tpu"), TINY)
    for mode in ("none", "dp"):  # once silently ignored
        with pytest.raises(ValueError, match="ep_size applies with parallel='ep' only"):
            train(tiny_run(tmp_path, parallel=mode, ep_size=2), TINY)
    assert not os.path.exists(tmp_path / "run")  # refused before the run folder was made


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_request_without_cuda_is_clear():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_plots_are_written(tmp_path):
    tc = tiny_run(tmp_path, steps=4, eval_interval=2, plots=True)
    train(tc, TINY)
    assert sorted(os.listdir(os.path.join(tc.out, "plots"))) == ["expert_load.png", "loss.png"]


def test_resume_past_the_end_asks_for_more_steps(tmp_path):
    tc = tiny_run(tmp_path, steps=2)
    train(tc, TINY)
    with pytest.raises(ValueError, match="already at step 2: pass --steps larger than 2"):
        train(tc, resume=True)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, monkeypatch):
    import signal

    tc = tiny_run(tmp_path, steps=10, eval_interval=0)
    real_forward = Transformer.forward
    calls = {"n": 0}

    def forward(self, tokens, targets=None, *args, **kwargs):
        if targets is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return real_forward(self, tokens, targets, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", forward)
    result = train(tc, TINY)
    monkeypatch.undo()
    assert result.interrupted and result.stopped_early and result.step == 3
    assert load_checkpoint(tc.out).step == 3
    assert train(tc, resume=True).step == 10


# ------------------------------------------------------------------------------ bad input destroys nothing
def test_overwrite_checks_everything_before_deleting_the_old_run(tmp_path):
    tc = tiny_run(tmp_path, steps=2)
    train(tc, TINY)
    before = sorted(os.listdir(tc.out))
    for bad, message in [({"data": str(tmp_path / "typo.txt")}, "data file not found"),
                         ({"seq_len": 999}, "seq_len=999 exceeds"),
                         ({"device": "tpu"}, "unknown device")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            train(dataclasses.replace(tc, overwrite=True, **bad), TINY)
        assert sorted(os.listdir(tc.out)) == before
        assert load_checkpoint(tc.out).step == 2


def test_a_second_writer_is_refused(tmp_path):
    from moe.checkpoint import RunLock

    tc = tiny_run(tmp_path, steps=2)
    train(tc, TINY)
    with RunLock(tc.out), pytest.raises(ValueError, match="being written by another train process"):
        train(dataclasses.replace(tc, steps=4), resume=True)
    assert train(dataclasses.replace(tc, steps=4), resume=True).step == 4  # free again


def test_resume_removes_half_written_checkpoints(tmp_path):
    tc = tiny_run(tmp_path, steps=2)
    train(tc, TINY)
    stale = pathlib.Path(tc.out, ".tmp-ckpt-abc123")
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    train(dataclasses.replace(tc, steps=3), resume=True)
    assert not stale.exists()


def test_a_model_too_big_for_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "available_bytes", lambda device: 10**5)  # 100 kB free
    with pytest.raises(ValueError, match=r"needs about .* GB .* has 0.0 GB available, enough for about 6.25K "
                                         r"parameters.*python -m moe calc"):
        train(tiny_run(tmp_path), TINY)
    assert not os.path.exists(tiny_run(tmp_path).out)  # nothing was created


def test_data_larger_than_the_cap_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"data file is larger than 1 MiB: /dev/zero; raise the limit with "
                                         "--max-data-mb"):
        train(tiny_run(tmp_path, data="/dev/zero", max_data_mb=1), TINY)


def test_progress_in_a_log_is_lines_not_carriage_returns(tmp_path, capsys):
    train(tiny_run(tmp_path, steps=20, eval_interval=0, progress=True), TINY)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if "step " in line and "/20" in line]
    assert [line.split("step ")[1].split("/")[0] for line in lines] == [str(s) for s in range(1, 21)]
    assert all("loss" in line and "tok/s" in line for line in lines)


def test_a_loaded_ipykernel_module_is_not_a_notebook(monkeypatch):
    """Test runners import ipykernel; only a running Jupyter shell gets the tqdm widget."""
    import types

    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert not train_mod._in_notebook()
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: type("ZMQInteractiveShell", (), {})()
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert train_mod._in_notebook()
