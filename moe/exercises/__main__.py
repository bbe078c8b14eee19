"""python -m moe.exercises {list,handout,grade}: hand out the exercises and grade submissions.

`grade` checks its arguments here, then runs the grader in a child process with a time budget:
a submission that hangs or kills its process fails instead of taking this command down.
Exit status: 0 pass, 1 fail, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from moe.cli import positive_float
from moe.exercises import CHILD_FAIL, CHILD_PASS, DEFAULT_TIME_LIMIT, EXERCISES

CHILD = ("import os, sys; from moe.exercises.grader import main; rc = main(sys.argv[1:]); "
         "sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)")
MAX_CHECKS = 10  # per exercise, for the child's time budget (the grader has at most 8)


def _need_hypothesis() -> None:
    if importlib.util.find_spec("hypothesis") is None:
        raise ValueError("the grader needs hypothesis: pip install hypothesis (or the dev extra: "
                         "pip install -e '.[dev]')")


def cmd_list(args: argparse.Namespace) -> int:
    _need_hypothesis()
    from moe.exercises import solutions
    from moe.exercises.checks import CHECKS

    for name in EXERCISES:
        summary = getattr(solutions, name).__doc__.strip().splitlines()[0]
        print(f"{name:<22} {len(CHECKS[name])} checks  {summary}")
    return 0


def cmd_handout(args: argparse.Namespace) -> int:
    from moe.exercises.handout import write_handout

    for path in write_handout(args.dir, solutions=args.solutions, overwrite=args.overwrite):
        print(f"wrote {path}")
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    if args.name != "all" and args.name not in EXERCISES:
        raise ValueError(f"unknown exercise {args.name!r}; allowed: all, {', '.join(EXERCISES)}")
    path = Path(args.submission)
    if not path.is_file():
        raise FileNotFoundError(f"submission not found: {path}")
    if path.suffix not in (".py", ".ipynb"):
        raise ValueError(f"SUBMISSION must be a .py or .ipynb file, got {str(path)!r}")
    _need_hypothesis()
    n_exercises = len(EXERCISES) if args.name == "all" else 1
    budget = 120 + args.time_limit * (MAX_CHECKS * n_exercises + 10)  # + imports, + loading the submission
    env = dict(os.environ, MPLBACKEND="Agg")
    root = str(Path(__file__).resolve().parents[2])  # the child imports this same moe
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-c", CHILD, str(path), args.name, "--time-limit", str(args.time_limit)]
    sys.stdout.flush()
    try:
        rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, env=env, timeout=budget).returncode
    except subprocess.TimeoutExpired:
        print(f"FAIL {args.name}: grading stopped after {budget:g} s: the submission hung the grader")
        return 1
    if rc in (CHILD_PASS, CHILD_FAIL):
        return 0 if rc == CHILD_PASS else 1
    print(f"FAIL {args.name}: the grader process ended early (exit status {rc}): the submission exited "
          "or crashed it (sys.exit/os._exit, a signal, out of memory?)")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe.exercises",
        description="Graded classroom exercises on DeepSeek-V3's MoE techniques: routing, balancing, FP8, "
                    "speculative sampling.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="the exercises, their number of checks and what each asks for")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("handout", help="write the student version (moe_exercises.py and .ipynb) into DIR",
                       description="Write DIR/moe_exercises.py and DIR/moe_exercises.ipynb: every function "
                                   "body between ### BEGIN SOLUTION and ### END SOLUTION replaced by "
                                   "raise NotImplementedError().")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--solutions", action="store_true",
                   help="keep the solution blocks: the teacher's copy (nbgrader's source notebook)")
    p.add_argument("--overwrite", action="store_true", help="replace hand-out files already in DIR")
    p.set_defaults(func=cmd_handout)
    p = sub.add_parser("grade", help="grade one exercise (or all) in a .py or .ipynb; exit 0 pass, 1 fail",
                       description="Print a PASS or FAIL line per check, with what was wrong. NAME 'all' "
                                   "grades every exercise function the submission defines.")
    p.add_argument("name", metavar="NAME", help=f"all, or one of: {', '.join(EXERCISES)}")
    p.add_argument("submission", metavar="SUBMISSION", help="a .py file or a notebook (its code cells)")
    p.add_argument("--time-limit", type=positive_float, default=DEFAULT_TIME_LIMIT, metavar="SECONDS",
                   help=f"per check; a check that runs longer fails (default {DEFAULT_TIME_LIMIT:g})")
    p.set_defaults(func=cmd_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
