"""python -m moe train / info / generate: a full round trip, and a clear error for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moe.__main__ import main
from tests.test_train import TINY, write_text

FAST = ["--batch-size", "4", "--seq-len", "16", "--eval-windows", "4", "--no-progress", "--no-plots",
        "--threads", "1", "--device", "cpu"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def files(tmp_path):
    cfg = tmp_path / "tiny.json"
    TINY.save(cfg)
    return {"cfg": str(cfg), "text": write_text(tmp_path / "text.txt")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A trained tiny run (4 steps) that the generate/info tests read."""
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "tiny.json"
    TINY.save(cfg)
    text = write_text(d / "text.txt")
    assert main(["train", "--config", str(cfg), "--data", text, "--steps", "4", "--eval-interval", "2",
                 "--out", str(d / "run"), *FAST]) == 0
    return str(d / "run")


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m moe argv`, argparse exits included."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------ the happy path
def test_train_info_generate_resume(tmp_path, files, capsys):
    out = str(tmp_path / "run")
    code, stdout, _ = run(["train", "--config", files["cfg"], "--data", files["text"], "--steps", "4",
                           "--eval-interval", "2", "--out", out, *FAST], capsys)
    assert code == 0
    assert "validation loss" in stdout and "unigram baseline" in stdout

    code, stdout, _ = run(["info", out], capsys)
    assert code == 0 and "parameters: total" in stdout and "step 4" in stdout and "val_loss" in stdout
    code, stdout, _ = run(["info", out, "--json"], capsys)
    info = json.loads(stdout)
    assert info["step"] == 4 and info["config"]["dim"] == TINY.dim
    assert info["params"]["active"] < info["params"]["total"]

    code, stdout, stderr = run(["generate", out, "--prompt", "the ", "--max-new-tokens", "12", "--greedy",
                                "--device", "cpu"], capsys)
    assert code == 0 and stdout.startswith("the ") and "12 tokens" in stderr

    code, stdout, _ = run(["train", "--resume", out, "--steps", "6", *FAST], capsys)
    assert code == 0 and "step 6" in stdout


def test_speculative_generate_reports_acceptance(tmp_path, files, capsys):
    out = str(tmp_path / "mtp")
    assert run(["train", "--config", files["cfg"], "--set", "n_mtp=1", "--data", files["text"], "--steps", "2",
                "--out", out, *FAST], capsys)[0] == 0
    code, stdout, stderr = run(["generate", out, "--speculative", "--greedy", "--max-new-tokens", "10",
                                "--device", "cpu"], capsys)
    assert code == 0
    assert "MTP drafts accepted" in stderr and "tokens per main-model forward" in stderr


@pytest.mark.parametrize("command", ["train", "generate", "info"])
def test_help_is_available(command, capsys):
    code, stdout, _ = run([command, "--help"], capsys)
    assert code == 0 and "usage:" in stdout and "Example" in stdout


def test_python_dash_m_entry_point(run_dir):
    r = subprocess.run([sys.executable, "-m", "moe", "info", run_dir], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "parameters: total" in r.stdout


# ------------------------------------------------------------------------------ bad inputs
def _bad_train_cases(tmp_path, files):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    short = tmp_path / "short.txt"
    short.write_text("a few words. " * 23 + "a")  # 300 bytes: 30 of them for validation
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{dim: 3")
    out = str(tmp_path / "x")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('{"attn": "m\xe9a"}'.encode("latin-1"))
    base = ["train", "--out", out, "--config", files["cfg"], "--data", files["text"]]
    cases = [
        (["train", "--out", str(a_file)], f"--out {a_file} is a file, not a folder"),
        (["train", "--out", str(a_file / "run")], f"cannot be created: {a_file} is a file"),
        (["train", "--out", out, "--preset", "deepseek-v3"], "training it needs about"),
        ([*base, "--data", "/dev/zero", "--max-data-mb", "1", "--seq-len", "16"], "data file is larger than 1 MiB"),
        ([*base, "--max-data-mb", "0"], "argument --max-data-mb: expected a positive integer"),
        (["train", "--out", out, "--config", str(latin1)], "latin1.json is not UTF-8"),
        ([*base, "--set", "capacity_factor=inf"], "capacity_factor must be a finite number or None, got inf"),
        (["train", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        ([*base, "--ep-size", "2"], "ep_size applies with parallel='ep' only"),
        (["train", "--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
        (["train", "--batch-size", "-3"], "argument --batch-size: expected a positive integer"),
        (["train", "--seq-len", "1.5"], "argument --seq-len: expected a positive integer"),
        (["train", "--grad-accum", "0"], "argument --grad-accum: expected a positive integer"),
        (["train", "--lr", "-1"], "argument --lr: expected a finite number > 0"),
        (["train", "--lr", "nan"], "argument --lr: expected a finite number > 0"),
        (["train", "--min-lr", "x"], "argument --min-lr: expected a number >= 0"),
        (["train", "--warmup", "-1"], "argument --warmup: expected an integer >= 0"),
        (["train", "--weight-decay", "-0.1"], "argument --weight-decay: expected a finite number >= 0"),
        (["train", "--grad-clip", "inf"], "argument --grad-clip: expected a finite number >= 0"),
        (["train", "--eval-interval", "-5"], "argument --eval-interval: expected an integer >= 0"),
        (["train", "--eval-windows", "0"], "argument --eval-windows: expected a positive integer"),
        (["train", "--save-interval", "a"], "argument --save-interval: expected an integer >= 0"),
        (["train", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
        (["train", "--threads", "0"], "argument --threads: expected a positive integer"),
        (["train", "--stop-at", "0"], "argument --stop-at: expected a positive integer"),
        (["train", "--preset", "gpt5"], "argument --preset: invalid choice: 'gpt5'"),
        (["train", "--preset", "toy", "--config", files["cfg"]], "not allowed with argument"),
        (["train", "--out", out, "--config", str(tmp_path / "nope.json")], "config file not found"),
        (["train", "--out", out, "--config", str(bad_json)], "config is not valid JSON"),
        ([*base, "--set", "dim"], "--set expects key=value, got 'dim'"),
        ([*base, "--set", "colour=red"], "--set: unknown field 'colour'"),
        ([*base, "--set", "dim=big"], "--set dim: cannot parse 'big' as int"),
        ([*base, "--set", "dim=0"], "dim must be a positive integer, got 0"),
        ([*base, "--set", "n_activated_experts=9"], "n_activated_experts (9) must be <= n_routed_experts (4)"),
        (["train", "--out", out, "--data", str(tmp_path / "missing.txt")], "data file not found"),
        (["train", "--out", out, "--data", str(empty)], "data file is empty"),
        (["train", "--out", out, "--data", str(binary)], "data file looks binary"),
        (["train", "--out", out, "--data", str(tmp_path)], "data path is a directory"),
        ([*base, "--seq-len", "999"], "seq_len=999 exceeds the model's max_seq_len=64"),
        (["train", "--out", out, "--config", files["cfg"], "--data", str(short), "--seq-len", "60"],
         "too short: its validation split has 30 bytes, but seq_len=60 needs at least 61"),
        ([*base, "--device", "tpu"], "unknown device 'tpu'"),
        ([*base, "--lr", "0.001", "--min-lr", "0.01"], "min_lr must be a number in [0, lr=0.001]"),
        (["train", "--resume", str(tmp_path / "nothing")], "run folder not found"),
        (["train", "--resume", str(tmp_path)], "no checkpoint in"),
    ]
    if not torch.cuda.is_available():
        cases.append(([*base, "--device", "cuda"], "CUDA is not available"))
    return cases


def test_every_bad_train_flag_gives_one_clear_error(tmp_path, files, capsys):
    for argv, message in _bad_train_cases(tmp_path, files):
        code, stdout, stderr = run(argv, capsys)
        assert code == 2, (argv, code, stderr)
        assert message in stderr, (argv, stderr)
        assert "Traceback" not in stderr
        assert not stdout.strip() or "usage" not in stdout


def test_resume_errors(run_dir, tmp_path, capsys):
    code, _, stderr = run(["train", "--resume", run_dir, "--set", "dim=48", "--no-progress"], capsys)
    # --set changes the run's own config (not the toy preset's), so only the field it changed is named
    assert code == 2 and stderr.strip().endswith("different model config: dim: checkpoint 32, requested 48")
    code, _, stderr = run(["train", "--resume", os.path.join(run_dir, "ckpt-00000004"), "--steps", "6"], capsys)
    assert code == 2 and f"continue the run (from its LATEST) with --resume {run_dir}" in stderr
    code, _, stderr = run(["train", "--resume", run_dir, "--out", str(tmp_path / "elsewhere")], capsys)
    assert code == 2 and "drop --out" in stderr
    code, _, stderr = run(["train", "--config", "/nonexistent.json", "--resume", run_dir], capsys)
    assert code == 2 and "config file not found" in stderr


def test_resume_of_a_damaged_checkpoint_names_the_checkpoint_file(run_dir, tmp_path, capsys):
    """With or without --set, the checkpoint is verified before its config is read."""
    import shutil

    damaged = str(tmp_path / "run")
    shutil.copytree(run_dir, damaged)
    os.unlink(os.path.join(damaged, "ckpt-00000004", "config.json"))
    for extra in ([], ["--set", "bias_update_speed=0.01"]):
        code, _, stderr = run(["train", "--resume", damaged, "--steps", "6", *extra], capsys)
        assert code == 2 and "checkpoint file missing" in stderr and "config.json" in stderr, stderr


def test_training_into_an_existing_run_needs_a_choice(run_dir, files, capsys):
    code, _, stderr = run(["train", "--config", files["cfg"], "--data", files["text"], "--out", run_dir, *FAST],
                          capsys)
    assert code == 2 and "already holds a run" in stderr and "--resume" in stderr


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "2"], "argument --top-p: expected a number in (0, 1], got '2'"),
    (["--top-p", "0"], "argument --top-p: expected a number in (0, 1]"),
    (["--top-k", "0"], "argument --top-k: expected a positive integer"),
    (["--temperature", "-1"], "argument --temperature: expected a finite number >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected a positive integer"),
    (["--num-samples", "x"], "argument --num-samples: expected a positive integer"),
    (["--seed", "x"], "argument --seed: invalid int value"),
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x" * 100], "the prompt is 100 tokens but the model's max_seq_len is 64"),
    (["--prompt", "x" * 64], "max_seq_len is 64, which leaves no room for a new token"),
    (["--speculative"], "--speculative needs an MTP module"),
    (["--device", "quantum"], "unknown device 'quantum'"),
])
def test_bad_generate_flags(run_dir, flags, message, capsys):
    code, stdout, stderr = run(["generate", run_dir, "--device", "cpu", *flags] if "--device" not in flags
                               else ["generate", run_dir, *flags], capsys)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert stdout == ""  # nothing (not even the prompt) is printed before the input is checked


def test_generate_and_info_on_missing_or_broken_runs(tmp_path, run_dir, capsys):
    for command in ("generate", "info"):
        code, _, stderr = run([command, str(tmp_path / "nope")], capsys)
        assert code == 2 and "run folder not found" in stderr
        code, _, stderr = run([command, str(tmp_path)], capsys)
        assert code == 2 and "no checkpoint in" in stderr


def test_a_full_disk_at_a_checkpoint_is_one_clear_line(tmp_path, files, capsys, monkeypatch):
    import errno

    from moe import checkpoint

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_durable", full)
    code, _, stderr = run(["train", "--config", files["cfg"], "--data", files["text"], "--steps", "2",
                           "--out", str(tmp_path / "run"), *FAST], capsys)
    assert code == 2 and "Traceback" not in stderr
    assert "model.safetensors: cannot write checkpoint (No space left on device)" in stderr


def test_an_unwritable_corpus_cache_falls_back_to_memory(tmp_path, monkeypatch, capsys):
    from moe import data

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setenv("MOE_CACHE_DIR", str(a_file / "cache"))  # cannot be created: a file is in the way
    corpus = data.load_embedded_corpus()
    assert len(corpus.train) > 100_000 and corpus.domains == ("prose", "code")
    assert "warning: cannot cache the corpus" in capsys.readouterr().err


def _fake_generate(tokens: list[int], interrupt: bool = False):
    """A stand-in for moe.generate.generate that emits the given bytes (then Ctrl-C, if asked)."""
    def fake(model, prompt, max_new_tokens, *args, on_token=None, **kwargs):
        for t in tokens:
            if on_token is not None:
                on_token(t)
        if interrupt:
            raise KeyboardInterrupt
        return list(tokens)
    return fake


def test_control_bytes_are_escaped_on_a_terminal_unless_raw(run_dir, capsys, monkeypatch):
    from moe import generate as gen

    monkeypatch.setattr(gen, "generate", _fake_generate([27, 91, 50, 74, 7, 10]))  # ESC [2J BEL \n
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    for stream in ([], ["--no-stream"]):
        code, stdout, _ = run(["generate", run_dir, "--device", "cpu", "--prompt", "x", *stream], capsys)
        assert code == 0 and stdout.startswith("x\\x1b[2J\\x07\n") and "\x1b" not in stdout
        code, stdout, _ = run(["generate", run_dir, "--device", "cpu", "--prompt", "x", "--raw", *stream], capsys)
        assert code == 0 and stdout.startswith("x\x1b[2J\x07\n")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)  # a pipe or file gets the bytes
    code, stdout, _ = run(["generate", run_dir, "--device", "cpu", "--prompt", "x"], capsys)
    assert code == 0 and stdout.startswith("x\x1b[2J")


def test_ctrl_c_while_generating_exits_130_without_a_traceback(run_dir, capsys, monkeypatch):
    from moe import generate as gen

    monkeypatch.setattr(gen, "generate", _fake_generate([104, 105], interrupt=True))
    code, stdout, stderr = run(["generate", run_dir, "--device", "cpu", "--prompt", "x"], capsys)
    assert code == 130 and stdout == "xhi\n" and "[interrupted]" in stderr and "Traceback" not in stderr


def test_generation_cut_by_max_seq_len_says_so(run_dir, capsys):
    code, stdout, stderr = run(["generate", run_dir, "--device", "cpu", "--prompt", "x" * 60,
                                "--max-new-tokens", "10"], capsys)
    assert code == 0 and "[4 tokens in" in stderr and "stopped at max_seq_len=64" in stderr


def test_generate_help_shows_true_defaults(capsys):
    code, stdout, _ = run(["generate", "--help"], capsys)
    assert code == 0 and "(default: True)" not in stdout and "(default: False)" not in stdout
    assert "--raw" in stdout and "(default: stream tokens as they come)" in " ".join(stdout.split())
