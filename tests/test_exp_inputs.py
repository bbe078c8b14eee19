"""experiments/*.py refuse bad flags up front: exit 2, one line naming the flag, nothing written."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.test_exp_dense_vs_moe import ROOT

SCRIPTS = ["balancing", "dense_vs_moe", "fp8", "interop_parity", "mtp", "parallel_traffic", "savings"]

BAD = [  # (script, flags, the flag the error names)
    *[("dense_vs_moe", f, f[0]) for f in (
        ["--lr", "-1"], ["--lr", "nan"], ["--device", "xyz"], ["--eval-interval", "-1"], ["--seq-len", "100000"],
        ["--data", "/nonexist.txt"], ["--steps", "0"], ["--batch-size", "-1"], ["--eval-windows", "0"],
        ["--threads", "0"], ["--seeds", "-1"], ["--seeds", "a,b"], ["--models", "moe,nope"],
        ["--models", "moe,moe"], ["--preset", "nope"])],
    *[("mtp", f, f[0]) for f in (
        ["--lr", "-1"], ["--eval-interval", "-1"], ["--seq-len", "100000"], ["--data", "/nonexist.txt"],
        ["--steps", "0"], ["--batch-size", "0"], ["--eval-windows", "-2"], ["--prompts", "0"],
        ["--prompt-len", "0"], ["--new", "-1"], ["--rounds", "0"], ["--threads", "0"], ["--seeds", "-1"],
        ["--depths", "3"], ["--depths", "1,1"], ["--depths", "x"], ["--new", "1000"], ["--preset", "nope"])],
    *[("fp8", f, f[0]) for f in (
        ["--steps", "0"], ["--seeds", "0"], ["--jobs", "0"], ["--steps", "-1"], ["--seeds", "-1"], ["--jobs", "-1"],
        ["--autocast-steps", "-1"], ["--steps", "x"])],
    *[("balancing", f, f[0]) for f in (["--steps", "0"], ["--seeds", "-1"], ["--jobs", "0"])],
    ("interop_parity", ["--threads", "0"], "--threads"),
    ("interop_parity", ["--threads", "-1"], "--threads"),
]


@pytest.fixture(scope="module")
def experiments():
    """Every script as a module, in sys.modules while the tests run (balancing's dataclass looks itself up)."""
    loaded = {}
    for name in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"exp_inputs_{name}", ROOT / "experiments" / f"{name}.py")
        loaded[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded[name])
    yield loaded
    for name in SCRIPTS:
        sys.modules.pop(f"exp_inputs_{name}")


def refused(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("script, flags, flag", BAD, ids=[f"{s}:{' '.join(f)}" for s, f, _ in BAD])
def test_bad_flag_is_refused_before_anything_is_written(experiments, capsys, tmp_path, script, flags, flag):
    out = tmp_path / "out"
    line = refused(capsys, experiments[script].main, ["--out", str(out), *flags])
    assert ": error: " in line and flag in line, line
    assert not out.exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_that_is_a_file_is_refused_untouched(experiments, capsys, tmp_path, script):
    f = tmp_path / "a_file"
    f.write_text("keep me\n")
    line = refused(capsys, experiments[script].main, ["--quick", "--out", str(f)])
    assert "--out" in line and "is a file" in line, line
    assert f.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
