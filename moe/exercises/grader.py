"""The grader: loads a submission, runs the checks, prints a PASS or FAIL line per check.

What is checked lives in checks.py; this file is the machinery that makes grading safe to run
on anything a student writes:
  - a submission (.py, or a notebook's code cells with IPython magics blanked) runs statement
    by statement in a fresh module; a statement that raises is reported and grading goes on
    with what was defined; a SyntaxError fails every check with its message;
  - every check runs under a time limit (SIGALRM, where the platform has it) and every
    exception the student's code raises becomes a failed check with its message;
  - `python -m moe.exercises grade` runs all of this in a child process (`main` below), so a
    submission that hangs in C code or kills its own process cannot take the command down.
"""

from __future__ import annotations

import argparse
import ast
import json
import signal
import sys
import tempfile
import textwrap
import threading
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis.configuration import set_hypothesis_home_dir

from moe.exercises import CHILD_FAIL, CHILD_PASS, DEFAULT_TIME_LIMIT, EXERCISES
from moe.exercises.checks import CHECKS, SUBMISSION_FILES, Sources, Wrong, describe


class CheckTimeout(BaseException):
    """The time limit ran out. A BaseException, so `except Exception` in student code cannot swallow it."""


@dataclass
class Result:
    exercise: str
    title: str
    passed: bool
    message: str = ""

    def line(self) -> str:
        text = f"{'PASS' if self.passed else 'FAIL'} {self.exercise}: {self.title}"
        return text + ("\n" + textwrap.indent(self.message, "     ") if self.message else "")


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CheckTimeout in the main thread after `seconds`, then every 0.25 s (a bare except
    in student code cannot swallow it for good). A no-op where SIGALRM does not exist."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.25)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _function_sources(fn: Callable) -> Sources:
    import inspect

    try:
        return [(getattr(fn, "__name__", "function"), inspect.getsource(fn))]
    except (OSError, TypeError):
        return []


def run_checks(name: str, fn: Callable, sources: Sources | None = None,
               seconds: float = DEFAULT_TIME_LIMIT) -> list[Result]:
    """Every check of exercise `name` on the function fn; never raises for anything fn does."""
    sources = _function_sources(fn) if sources is None else sources
    results: list[Result] = []
    timed_out = False
    for check in CHECKS[name]:
        if timed_out:
            results.append(Result(name, check.title, False, "not run: an earlier check of this function ran out "
                                                            "of time"))
            continue
        try:
            with time_limit(seconds):
                check.run(fn, sources)
            results.append(Result(name, check.title, True))
        except Wrong as e:
            results.append(Result(name, check.title, False, str(e)))
        except CheckTimeout:
            timed_out = True
            results.append(Result(name, check.title, False, f"took longer than {seconds:g} s (an infinite loop?)"))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # an exception that escaped the checks, e.g. SystemExit from the student
            results.append(Result(name, check.title, False, f"stopped with {describe(e)}"))
    return results


# ------------------------------------------------------------------------------ loading a submission
@dataclass
class Submission:
    namespace: dict[str, Any]
    sources: Sources
    fatal: str | None = None  # could not be read or compiled: every check fails with this
    errors: list[str] = field(default_factory=list)  # top-level statements that raised (grading goes on)


def read_sources(path: Path) -> Sources:
    """The code of a .py file, or of each code cell of a notebook (IPython magics blanked to `pass`)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        return [(str(path), text)]
    cells = json.loads(text)["cells"]
    sources = []
    for i, cell in enumerate(cells, 1):
        if cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if src.lstrip().startswith("%%"):  # a cell magic: the cell is not Python
            continue
        lines = [line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
                 for line in src.splitlines()]
        sources.append((f"{path} cell {i}", "\n".join(lines) + "\n"))
    return sources


def load_submission(path: str | Path, seconds: float = DEFAULT_TIME_LIMIT) -> Submission:
    """Run a submission's top-level statements one by one in a fresh module, continuing past errors."""
    path = Path(path)
    try:
        sources = read_sources(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return Submission({}, [], fatal=f"cannot read {path}: {type(e).__name__}: {e}")
    trees = []
    for label, code in sources:
        try:
            trees.append((label, ast.parse(code, filename=label)))
        except (SyntaxError, ValueError) as e:
            line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
            return Submission({}, sources, fatal=f"{label}{line}: {type(e).__name__}: {getattr(e, 'msg', e)}")
    import __future__

    flags = 0
    for _, tree in trees:
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                flags |= sum(getattr(__future__, a.name).compiler_flag for a in node.names
                             if hasattr(__future__, a.name))
    # registered (dataclasses and pickle look modules up) but without __file__: hypothesis mines the
    # constants of local modules that have one, which would make the examples depend on the submission
    module = types.ModuleType("submission")
    sys.modules["submission"] = module
    sub = Submission(module.__dict__, sources)
    for label, tree in trees:
        SUBMISSION_FILES.add(label)
        for stmt in tree.body:
            try:
                code = compile(ast.Module(body=[stmt], type_ignores=[]), label, "exec", flags=flags, dont_inherit=True)
                with time_limit(seconds):
                    exec(code, sub.namespace)
            except KeyboardInterrupt:
                raise
            except CheckTimeout:
                sub.errors.append(f"{label} line {stmt.lineno}: took longer than {seconds:g} s, stopped")
            except BaseException as e:
                sub.errors.append(f"{label} line {stmt.lineno}: {type(e).__name__}: {e}")
    return sub


def grade_file(path: str | Path, name: str, seconds: float = DEFAULT_TIME_LIMIT, out=None) -> int:
    """Grade exercise `name` (or "all": every exercise function the file defines); 0 = pass, 1 = fail."""
    out = out or sys.stdout  # kept: a submission that replaces sys.stdout does not silence the report
    say = lambda text: print(text, file=out, flush=True)
    sub = load_submission(path, seconds)
    names = EXERCISES if name == "all" else (name,)
    if sub.fatal:
        for n in names:
            for check in CHECKS[n]:
                say(Result(n, check.title, False, f"the submission cannot be loaded: {sub.fatal}").line())
        say(f"FAIL: {path} cannot be loaded")
        return 1
    for error in sub.errors:
        say(f"WARN {error} (grading goes on with what was defined)")
    found = [n for n in names if n in sub.namespace]
    if name == "all":
        if not found:
            say(f"FAIL all: no exercise function in {path}; expected any of: {', '.join(EXERCISES)}")
            return 1
        if len(found) < len(names):
            say(f"not in the submission, not graded: {', '.join(n for n in names if n not in found)}")
    n_passed = n_checks = 0
    for n in names:
        fn = sub.namespace.get(n)
        if fn is None and name == "all":
            continue  # listed above as not graded
        if fn is None or not callable(fn):
            what = "not found" if fn is None else f"not a function (its type is {type(fn).__name__})"
            say(Result(n, f"{what} in {path}: define a function named {n}", False).line())
            n_checks += 1
            continue
        results = run_checks(n, fn, sub.sources, seconds)
        for r in results:
            say(r.line())
        ok = sum(r.passed for r in results)
        say(f"{n}: {ok} of {len(results)} checks passed")
        n_passed, n_checks = n_passed + ok, n_checks + len(results)
    verdict = "PASS" if n_passed == n_checks else "FAIL"
    say(f"{verdict}: {n_passed} of {n_checks} checks passed")
    return 0 if verdict == "PASS" else 1


def main(argv: list[str] | None = None) -> int:
    """The child process of `python -m moe.exercises grade` (arguments already checked there).

    Returns CHILD_PASS or CHILD_FAIL; the caller ends the process with os._exit, so threads a
    submission started cannot keep it alive."""
    parser = argparse.ArgumentParser(prog="moe.exercises.grader")
    parser.add_argument("submission")
    parser.add_argument("name")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead
    # hypothesis keeps a cache in ./.hypothesis; not in the student's folder
    with tempfile.TemporaryDirectory(prefix="moe-grader-") as home:
        set_hypothesis_home_dir(home)
        rc = grade_file(args.submission, args.name, args.time_limit)
    return CHILD_PASS if rc == 0 else CHILD_FAIL
