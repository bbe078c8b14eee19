"""Graded classroom exercises: the functions behind DeepSeek-V3's MoE, written by students.

  solutions.py  the reference solutions, each body between nbgrader's `### BEGIN SOLUTION` /
                `### END SOLUTION` markers; the one source of the hand-out
  handout.py    the student version (.py and .ipynb) generated from solutions.py
  grader.py     loads a submission, runs pinned cases and hypothesis properties against the
                package (or torch) as oracle, prints a PASS/FAIL line per check
  wrong.py      known-wrong solutions (the classic mistakes); each must fail the grader, and the
                grader names the mistake when a submission matches one

python -m moe.exercises {list,handout,grade} --help. Nothing here imports torch at import time,
so the command line can check its arguments before the grader starts.
"""

# the exercises in hand-out order; each is a function of that name in solutions.py
EXERCISES = (
    "topk_route",
    "group_limited_topk",
    "switch_aux_loss",
    "seq_aux_loss",
    "update_bias",
    "expert_capacity",
    "round_to_e4m3",
    "accept_draft",
    "residual_distribution",
)

DEFAULT_TIME_LIMIT = 10.0  # seconds per check (and per top-level statement of a submission)
CHILD_PASS, CHILD_FAIL = 10, 11  # the grading child's exit codes; anything else: it was killed or exited early
