"""The classroom exercises: the reference passes, every known-wrong solution fails (and is named),
the pinned answers agree with the package, the hand-out and the command line behave."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.exercises import EXERCISES, checks, grader, handout, solutions
from moe.exercises import __main__ as cli
from moe.exercises.wrong import WRONG

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = Path(solutions.__file__)
ALL_WRONG = [(name, fn) for name in EXERCISES for fn in WRONG[name]]


def grade(path: Path, name: str = "all", seconds: float = 10.0) -> tuple[int, str]:
    """grade_file in this process (the child's work, without the child)."""
    import io

    out = io.StringIO()
    rc = grader.grade_file(path, name, seconds, out=out)
    return rc, out.getvalue()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "moe.exercises", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ------------------------------------------------------------------------------ reference and known-wrong
@pytest.mark.parametrize("name", EXERCISES)
def test_reference_passes_every_check(name):
    results = grader.run_checks(name, getattr(solutions, name))
    assert [r.line() for r in results if not r.passed] == []


def test_every_exercise_has_at_least_two_known_wrong_solutions():
    assert all(len(WRONG[name]) >= 2 for name in EXERCISES)
    assert all(fn.mistake for _, fn in ALL_WRONG)


def _documented_checks(name: str, mistake: str) -> list[int]:
    """The deterministic checks docs/exercises.md says this mistake fails."""
    doc = (ROOT / "docs" / "exercises.md").read_text()
    section = re.search(rf"### \d+\. `{name}\(.*?(?=\n### |\n## )", doc, re.S).group(0)
    match = re.search(rf"^- {re.escape(mistake)} \(checks? ([\d, ]+)\)$", section, re.M)
    assert match, f"docs/exercises.md does not list {mistake!r} under {name}"
    return [int(i) for i in match.group(1).split(",")]


@pytest.mark.parametrize("name,fn", ALL_WRONG, ids=[fn.__name__ for _, fn in ALL_WRONG])
def test_known_wrong_solution_fails_and_the_message_names_the_mistake(name, fn):
    results = grader.run_checks(name, fn)
    failed = [r for r in results if not r.passed]
    assert failed, f"{fn.__name__} passed the grader"
    messages = "\n".join(r.message for r in failed)
    if fn is WRONG["round_to_e4m3"][-1]:  # uses the float8 cast: the answers are right, the source is not
        assert [r.title for r in failed] == ["written without float8 dtypes"]
        assert "float8" in messages
    else:
        assert fn.mistake in messages
    deterministic = [i for i, r in enumerate(results, 1) if not r.passed and not r.title.endswith("(hypothesis)")]
    assert deterministic == _documented_checks(name, fn.mistake)


# ------------------------------------------------------------------------------ the pinned answers
def _router_oracle(name: str, args: dict):
    """The package's Router on logits whose sigmoid is the pinned scores."""
    scores_TE = args["scores_TE"]
    E = scores_TE.shape[1]
    if name == "topk_route":
        router = checks._router(E, args["k"], "sigmoid", args["route_scale"], args["normalize"], args["bias_E"])
    else:
        router = checks._router(E, args["k"], "sigmoid", bias_E=args["bias_E"], n_groups=args["n_groups"],
                                n_limited_groups=args["n_limited_groups"])
    with torch.no_grad():
        r = router(torch.logit(scores_TE.double()).float())
    return (r.weights_TK, r.experts_TK) if name == "topk_route" else r.experts_TK


def _oracle(name: str, args: dict):
    from moe import balance
    from moe.experts import expert_capacity

    if name in ("topk_route", "group_limited_topk"):
        return _router_oracle(name, args)
    if name == "switch_aux_loss":
        return float(balance.switch_aux_loss(*args.values()))
    if name == "seq_aux_loss":
        s, e = args["scores_BSE"], args["experts_BSK"]
        B, S, E = s.shape
        return float(balance.seq_aux_loss(s.reshape(B * S, E), e.reshape(B * S, -1), B))
    if name == "update_bias":
        return checks.package_update_bias(*args.values())
    if name == "expert_capacity":
        return expert_capacity(*args.values())
    if name == "round_to_e4m3":
        return args["x"].to(torch.float8_e4m3fn).float()
    if name == "accept_draft":
        return checks.accept_rule(*args.values())
    return checks.residual_rule(*args.values())


@pytest.mark.parametrize("name,case", [(n, c) for n in EXERCISES for c in checks.PINNED[n]],
                         ids=[f"{n}:{c.title}" for n in EXERCISES for c in checks.PINNED[n]])
def test_pinned_answers_agree_with_the_package(name, case):
    problem = checks.COMPARE[name](case.expected, _oracle(name, case.args), case.args)  # rtol 1e-5
    assert problem is None, problem


# ------------------------------------------------------------------------------ the hand-out
def test_strip_solutions_replaces_each_block_and_rejects_unbalanced_markers():
    text = "def f():\n    '''doc'''\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n"
    assert handout.strip_solutions(text) == ("def f():\n    '''doc'''\n    # YOUR CODE HERE\n"
                                             "    raise NotImplementedError()\n")
    for bad in ("    ### BEGIN SOLUTION\n", "    ### END SOLUTION\n",
                "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n"):
        with pytest.raises(ValueError, match="SOLUTION"):
            handout.strip_solutions(bad)


def test_handout_writes_the_student_version(tmp_path, capsys):
    assert cli.main(["handout", str(tmp_path / "hand")]) == 0
    py, nb = tmp_path / "hand" / "moe_exercises.py", tmp_path / "hand" / "moe_exercises.ipynb"
    text, notebook = py.read_text(), json.loads(nb.read_text())
    code = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    for source in (text, code):
        assert "SOLUTION" not in source
        assert source.count("raise NotImplementedError()") == len(EXERCISES)
        assert "select_TE.topk(k" not in source and "torch.frexp" not in source  # solution lines are gone
    assert notebook["nbformat"] == 4
    nbformat = pytest.importorskip("nbformat")  # installed with nbmake (the dev extra)
    nbformat.validate(nbformat.reads(nb.read_text(), as_version=4))
    code_cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in code_cells)
    titles = [c["source"][0] for c in notebook["cells"] if c["cell_type"] == "markdown"]
    assert all(any(f"`{name}`" in t for t in titles) for name in EXERCISES)
    module = runpy.run_path(str(py))
    for name in EXERCISES:
        with pytest.raises(NotImplementedError):
            module[name](*checks.PINNED[name][0].args.values())
    rc, out = grade(py)
    assert rc == 1 and "PASS " not in out and "not written yet" in out and "Traceback" not in out
    assert out.count("FAIL ") == sum(len(c) for c in checks.CHECKS.values())


def test_handout_refuses_to_overwrite_and_solutions_copy_passes(tmp_path, capsys):
    assert cli.main(["handout", str(tmp_path)]) == 0
    assert cli.main(["handout", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["handout", str(tmp_path), "--solutions", "--overwrite"]) == 0
    assert "### BEGIN SOLUTION" in (tmp_path / "moe_exercises.py").read_text()
    rc, out = grade(tmp_path / "moe_exercises.ipynb")  # the notebook loader, on a passing notebook
    assert rc == 0, out
    assert out.strip().splitlines()[-1] == f"PASS: {sum(len(c) for c in checks.CHECKS.values())} of " \
                                           f"{sum(len(c) for c in checks.CHECKS.values())} checks passed"


# ------------------------------------------------------------------------------ grading files
def test_grade_one_exercise_exit_codes(tmp_path):
    assert grade(SOLUTIONS, "topk_route")[0] == 0
    rc, out = grade(SOLUTIONS, "all")
    assert rc == 0 and "FAIL" not in out and "WARN" not in out
    wrong = tmp_path / "sub.py"
    wrong.write_text("import torch\n\ndef topk_route(scores_TE, k, bias_E=None, route_scale=1.0, normalize=True):\n"
                     "    w, e = scores_TE.topk(k, dim=-1)\n    return w / w.sum(-1, keepdim=True) * route_scale, e\n")
    rc, out = grade(wrong, "topk_route")
    assert rc == 1 and "the bias was ignored when selecting the experts" in out
    rc, out = grade(wrong, "all")  # only the functions found are graded
    assert rc == 1 and "not in the submission, not graded: group_limited_topk" in out
    rc, out = grade(wrong, "expert_capacity")
    assert rc == 1 and "FAIL expert_capacity: not found" in out


def test_broken_submissions_fail_cleanly(tmp_path):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def topk_route(:\n    pass\n")
    rc, out = grade(syntax, "topk_route")
    assert rc == 1 and out.count("FAIL topk_route") == len(checks.CHECKS["topk_route"])
    assert "cannot be loaded" in out and "line 1" in out and "SyntaxError" in out

    mixed = tmp_path / "mixed.py"
    mixed.write_text("import torch\nundefined_name + 1\nwhile True:\n    pass\n"
                     "def expert_capacity(capacity_factor, n_tokens, top_k, n_experts):\n    return 1 // 0\n"
                     "def update_bias(bias_E, tokens_per_expert_E, gamma):\n    while True:\n        pass\n"
                     "def accept_draft(p_V, q_V, draft, u):\n    try:\n        while True:\n            pass\n"
                     "    except BaseException:\n        while True:\n            pass\n"
                     "round_to_e4m3 = 3\n")
    rc, out = grade(mixed, "all", seconds=0.3)
    assert rc == 1 and "Traceback" not in out
    assert "WARN" in out and "line 2: NameError" in out  # a top-level error is reported, grading goes on
    assert "line 3: took longer than 0.3 s, stopped" in out
    assert "ZeroDivisionError: integer division or modulo by zero" in out and "mixed.py line 6" in out
    assert "took longer than 0.3 s" in out and "not run: an earlier check" in out
    assert "FAIL round_to_e4m3: not a function (its type is int)" in out
    assert out.count("FAIL accept_draft") == len(checks.CHECKS["accept_draft"])  # a bare except cannot hide a loop


def test_notebook_cells_magics_and_errors(tmp_path):
    cells = [{"cell_type": "markdown", "source": ["# title"]},
             {"cell_type": "code", "source": ["%matplotlib inline\n", "import math\n", "!pip install nothing"]},
             {"cell_type": "code", "source": "%%bash\necho not python"},
             {"cell_type": "code", "source": ["def expert_capacity(capacity_factor, n_tokens, top_k, n_experts):\n",
                                              "    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)"]},
             {"cell_type": "code", "source": ["expert_capacity(1, 2)"]}]
    nb = tmp_path / "sub.ipynb"
    nb.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {}}))
    rc, out = grade(nb, "all")
    assert rc == 0, out
    assert f"WARN {nb} cell 5 line 1: TypeError" in out
    nb.write_text("{not json")
    rc, out = grade(nb, "expert_capacity")
    assert rc == 1 and "cannot read" in out


def test_round_to_e4m3_rejects_float8_in_the_submission(tmp_path):
    sub = tmp_path / "sub.py"
    sub.write_text('import torch\nFP8 = getattr(torch, "float8_e4m3fn")\n\n'
                   'def round_to_e4m3(x):\n    """Like x.to(torch.float8_e4m3fn) (a docstring may say so)."""\n'
                   '    return x.to(FP8).float()\n')
    rc, out = grade(sub, "round_to_e4m3")
    assert rc == 1 and "FAIL round_to_e4m3: written without float8 dtypes" in out and f"{sub} line 2" in out
    assert out.count("PASS ") == len(checks.CHECKS["round_to_e4m3"]) - 1  # the values are right


# ------------------------------------------------------------------------------ the command line
def test_list_and_bad_arguments(tmp_path, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXERCISES)
    assert cli.main(["grade", "nope", str(SOLUTIONS)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown exercise 'nope'; allowed: all, topk_route") and "Traceback" not in err
    assert cli.main(["grade", "all", str(tmp_path / "missing.py")]) == 2
    assert "submission not found" in capsys.readouterr().err
    (tmp_path / "sub.txt").write_text("x = 1\n")
    assert cli.main(["grade", "all", str(tmp_path / "sub.txt")]) == 2
    assert ".py or .ipynb" in capsys.readouterr().err


@pytest.mark.slow  # three child processes, each importing torch
def test_cli_grades_in_a_child_process_that_cannot_take_it_down(tmp_path):
    handout.write_handout(tmp_path)
    sub = tmp_path / "moe_exercises.py"
    stub = "    # YOUR CODE HERE\n    raise NotImplementedError()\n"
    text = sub.read_text()
    at = text.index(stub, text.index("def accept_draft"))  # the student writes one function
    sub.write_text("import threading, time\n"
                   "threading.Thread(target=time.sleep, args=(600,)).start()  # must not keep the grader alive\n"
                   + text[:at] + "    return bool(u < min(1.0, float(p_V[draft] / q_V[draft])))\n"
                   + text[at + len(stub):])
    p = run_cli("grade", "accept_draft", str(sub), timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS accept_draft: u exactly at p/q is rejected (the test is u < ratio)" in p.stdout

    p = run_cli("grade", "all", str(sub), timeout=60)  # the rest of the hand-out is not written yet
    assert p.returncode == 1 and "FAIL topk_route" in p.stdout and "not written yet" in p.stdout
    assert "accept_draft: 6 of 6 checks passed" in p.stdout and "Traceback" not in p.stdout + p.stderr

    sub.write_text("import os\nos._exit(0)\n")  # the child ends early, without a verdict: a FAIL
    p = run_cli("grade", "all", str(sub))
    assert p.returncode == 1 and "the grader process ended early" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr


def test_docs_name_every_check_and_mistake():
    doc = (ROOT / "docs" / "exercises.md").read_text()
    missing = [c.title for name in EXERCISES for c in checks.CHECKS[name] if c.title not in doc]
    missing += [fn.mistake for _, fn in ALL_WRONG if fn.mistake not in doc]
    assert missing == []


@pytest.mark.slow
def test_solutions_notebook_runs_in_jupyter_and_its_last_cell_grades_it(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    handout.write_handout(tmp_path, solutions=True)
    nb = nbformat.read(tmp_path / "moe_exercises.ipynb", as_version=4)
    nbformat.validate(nb)
    nbclient.NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    total = sum(len(c) for c in checks.CHECKS.values())
    assert f"PASS: {total} of {total} checks passed" in out, out
