"""The checks of every exercise: pinned cases, hypothesis properties and their oracles.

Per exercise (CHECKS[name], in the order they run and print):
  - pinned cases: small inputs with hand-computed answers, each aimed at one classic mistake,
    with a hint saying what a failure most likely means;
  - properties: hypothesis draws random inputs (derandomized: the same examples on every
    run) and compares with the oracle: the package's own code where it has the function
    (moe.router.Router, moe.balance, moe.experts.expert_capacity), torch otherwise (torch.topk
    inside the Router, the float8 cast); moe.generate's acceptance rule is written out here
    because it lives inline in speculative_generate;
  - a few extras: the losses' gradients, no float8 dtypes in round_to_e4m3's submission, the
    whole e4m3 grid and a 100,000-value sweep.
Ties aside: random inputs with tied selection values are discarded (either expert is right).
When an answer is wrong and equals what a known-wrong solution (wrong.py) gives on the same
input, the message names that mistake.

Shapes: T tokens, E experts, K top-k, B sequences, S positions, V vocabulary, G groups.
"""

from __future__ import annotations

import ast
import math
import numbers
import textwrap
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from moe import balance
from moe.config import ModelConfig
from moe.exercises import EXERCISES
from moe.exercises.wrong import WRONG
from moe.router import Router

# moe.experts and moe.layer are imported where they are used: importing them loads torch._dynamo
# (for @torch.compiler.disable), about 2 s that grading one routing exercise need not wait for.

EXAMPLES = 40  # hypothesis examples per property check
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                             suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                             print_blob=False,  # no "explain" phase: ~100 more runs per failure, for no message
                             phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])
# for round_to_e4m3: its failure message shows only the values that differ, so shrinking the
# input list buys nothing and costs a second or more per wrong submission
NO_SHRINK_SETTINGS = settings(PROPERTY_SETTINGS, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])

Sources = list[tuple[str, str]]  # (label, code): one per .py file or notebook code cell


class Wrong(Exception):
    """A failed check; the message says what was wrong."""


@dataclass
class Check:
    title: str
    run: Callable[[Callable, Sources], None]  # (student function, submission sources); raises Wrong


# ------------------------------------------------------------------------------ calling student code
SUBMISSION_FILES: set[str] = set()  # filenames the submission's code was compiled under (grader fills it)


def describe(e: BaseException) -> str:
    """'TypeError: message (where)' for an exception raised by student code."""
    if isinstance(e, NotImplementedError):
        return "NotImplementedError: not written yet"
    where = [f for f in traceback.extract_tb(e.__traceback__) if f.filename in SUBMISSION_FILES]
    at = f" ({where[-1].filename} line {where[-1].lineno})" if where else ""
    return f"{type(e).__name__}: {e}{at}"


def _clone(v: Any) -> Any:
    return v.clone() if isinstance(v, torch.Tensor) else v


def show(v: Any) -> str:
    """A short, deterministic text for an input or output value."""
    if isinstance(v, torch.Tensor):
        if v.numel() > 64:
            return f"<tensor of shape {list(v.shape)}>"
        values = v.detach().tolist()
        if v.is_floating_point():
            return _floats(values)
        return str(values)
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)


def _floats(values: Any) -> str:
    if isinstance(values, list):
        return "[" + ", ".join(_floats(x) for x in values) + "]"
    return f"{values:.6g}"


def signature(name: str, args: dict[str, Any]) -> str:
    return f"{name}(" + ", ".join(f"{k}={show(v)}" for k, v in args.items()) + ")"


def call(name: str, fn: Callable, args: dict[str, Any]) -> Any:
    """fn(*args) on copies of the inputs; an exception from it becomes a failed check."""
    try:
        return fn(*[_clone(v) for v in args.values()])
    except NotImplementedError:
        raise Wrong("not written yet: the function raises NotImplementedError") from None
    except Exception as e:
        raise Wrong(f"{signature(name, args)} raised {describe(e)}") from None


# ------------------------------------------------------------------------------ comparing answers
def _not_tensor(got: Any, what: str) -> str | None:
    return None if isinstance(got, torch.Tensor) else f"{what} must be a torch.Tensor, got {type(got).__name__}"


def _expert_rows(e: torch.Tensor, T: int, K: int, E: int, what: str = "experts_TK") -> str | None:
    """Shape, dtype, range and distinctness of an experts_TK answer."""
    if (problem := _not_tensor(e, what)) is not None:
        return problem
    if tuple(e.shape) != (T, K):
        return f"{what} has shape {list(e.shape)}, expected [{T}, {K}] (T tokens, k experts each)"
    if e.is_floating_point() or e.dtype == torch.bool:
        return f"{what} must hold integer expert indices, got dtype {e.dtype}"
    if e.numel() and (e.min() < 0 or e.max() >= E):
        return f"{what} holds indices outside 0..{E - 1}: {show(e)}"
    s = e.sort(dim=-1).values
    dup = (s[:, 1:] == s[:, :-1]).any(dim=-1).nonzero().flatten().tolist()
    if dup:
        return f"token {dup[0]} chose the same expert twice: {show(e[dup[0]])}; the k experts must be distinct"
    return None


def compare_routing(got: Any, expected: tuple, args: dict, equal_nan: bool = False) -> str | None:
    if not (isinstance(got, (tuple, list)) and len(got) == 2):
        return f"expected a tuple (weights_TK, experts_TK), got {type(got).__name__}"
    w, e = got
    ew, ee = expected
    T, K = ee.shape
    if (problem := _not_tensor(w, "weights_TK")) is not None:
        return problem
    swapped = isinstance(e, torch.Tensor) and e.is_floating_point() and not w.is_floating_point()
    if (problem := _expert_rows(e, T, K, args["scores_TE"].shape[1])) is not None:
        return problem + (" (the order is (weights_TK, experts_TK))" if swapped else "")
    if tuple(w.shape) != (T, K) or not w.is_floating_point():
        return f"weights_TK must be a float tensor of shape [{T}, {K}], got {w.dtype} {list(w.shape)}"
    order, eorder = e.argsort(dim=-1), ee.argsort(dim=-1)
    ge, gw = e.gather(1, order), w.detach().gather(1, order)
    xe, xw = ee.gather(1, eorder), ew.gather(1, eorder)
    for t in range(T):
        if not (ge[t].tolist() == xe[t].tolist() and torch.allclose(gw[t].double(), xw[t].double(), rtol=1e-5,
                                                                      atol=1e-6, equal_nan=equal_nan)):
            pairs = lambda es, ws: "{" + ", ".join(f"{i}: {v:.6g}" for i, v in zip(es.tolist(), ws.tolist())) + "}"
            return (f"token {t}: expected {{expert: weight}} {pairs(xe[t], xw[t])}, "
                    f"got {pairs(ge[t], gw[t])}")
    return None


def compare_experts(got: Any, expected: torch.Tensor, args: dict, equal_nan: bool = False) -> str | None:
    T, K = expected.shape
    if (problem := _expert_rows(got, T, K, args["scores_TE"].shape[1])) is not None:
        return problem
    for t in range(T):
        want, have = sorted(expected[t].tolist()), sorted(got[t].tolist())
        if want != have:
            return f"token {t}: expected experts {want}, got {have}"
    return None


def compare_scalar(got: Any, expected: float, args: dict, equal_nan: bool = False) -> str | None:
    expected = float(expected)
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            return f"expected a scalar (a 0-d tensor), got a tensor of shape {list(got.shape)}"
        value = float(got.detach())
    elif isinstance(got, numbers.Real) and not isinstance(got, bool):
        value = float(got)
    else:
        return f"expected a scalar tensor, got {type(got).__name__}"
    if math.isclose(value, expected, rel_tol=1e-5, abs_tol=1e-6) or (equal_nan and math.isnan(value)
                                                                      and math.isnan(expected)):
        return None
    return f"expected {expected:.6g}, got {value:.6g}"


def compare_tensor(got: Any, expected: torch.Tensor, args: dict, equal_nan: bool = False) -> str | None:
    if (problem := _not_tensor(got, "the result")) is not None:
        return problem
    if got.shape != expected.shape or not got.is_floating_point():
        return f"expected a float tensor of shape {list(expected.shape)}, got {got.dtype} {list(got.shape)}"
    if torch.allclose(got.detach().double(), expected.double(), rtol=1e-5, atol=1e-6, equal_nan=equal_nan):
        return None
    return f"expected {show(expected)}, got {show(got)}"


def compare_exact(got: Any, expected: torch.Tensor, args: dict, equal_nan: bool = False) -> str | None:
    """Bit-for-bit values (float32), for round_to_e4m3; shows the first few differing inputs."""
    if (problem := _not_tensor(got, "the result")) is not None:
        return problem
    if got.shape != expected.shape or got.dtype != torch.float32:
        return f"expected a float32 tensor of shape {list(expected.shape)}, got {got.dtype} {list(got.shape)}"
    same = (got == expected) | (got.isnan() & expected.isnan() if equal_nan else False)
    if bool(same.all()):
        return None
    bad = (~same).flatten().nonzero().flatten()
    x, want, have = args["x"].flatten(), expected.flatten(), got.detach().flatten()
    shown = ", ".join(f"x={x[i].item():.9g} -> expected {want[i].item():.9g}, got {have[i].item():.9g}"
                      for i in bad[:4].tolist())
    return f"{bad.numel()} of {x.numel()} values differ: {shown}"


def compare_int(got: Any, expected: int, args: dict, equal_nan: bool = False) -> str | None:
    if isinstance(got, bool) or not isinstance(got, numbers.Integral):
        return f"expected an int, got {type(got).__name__} {got!r} (math.ceil returns an int)"
    return None if int(got) == expected else f"expected {expected}, got {int(got)}"


def compare_bool(got: Any, expected: bool, args: dict, equal_nan: bool = False) -> str | None:
    if isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.numel() == 1:
        got = bool(got)
    if type(got).__name__ not in ("bool", "bool_"):
        return f"expected a bool, got {type(got).__name__} {got!r}"
    verdict = "accept" if expected else "reject"
    return None if bool(got) == expected else f"expected {expected} ({verdict}), got {bool(got)}"


COMPARE = {
    "topk_route": compare_routing,
    "group_limited_topk": compare_experts,
    "switch_aux_loss": compare_scalar,
    "seq_aux_loss": compare_scalar,
    "update_bias": compare_tensor,
    "expert_capacity": compare_int,
    "round_to_e4m3": compare_exact,
    "accept_draft": compare_bool,
    "residual_distribution": compare_tensor,
}


def diagnose(name: str, got: Any, args: dict) -> str:
    """Name the known mistakes whose output equals the student's on this input, if any does."""
    matches = []
    for wrong in WRONG.get(name, []):
        try:
            with torch.no_grad():
                out = wrong(*[_clone(v) for v in args.values()])
            if COMPARE[name](got, out, args, equal_nan=True) is None:
                matches.append(wrong.mistake)
        except Exception:
            continue
    if not matches:
        return ""
    return "\nthat is what a known mistake gives: " + "; or: ".join(matches)


def expect(name: str, fn: Callable, args: dict, expected: Any, hint: str = "") -> None:
    """Call the student's fn on args; raise Wrong saying what differs from `expected`."""
    got = call(name, fn, args)
    problem = COMPARE[name](got, expected, args)
    if problem is not None:
        raise Wrong(f"called {signature(name, args)}\n{problem}{diagnose(name, got, args)}"
                    + (f"\nhint: {hint}" if hint else ""))


# ------------------------------------------------------------------------------ check builders
@dataclass
class Case:
    title: str
    args: dict[str, Any]  # in signature order
    expected: Any  # computed by hand (tests/test_exercises.py checks the oracle agrees)
    hint: str


def pinned(name: str, case: Case) -> Check:
    return Check(case.title, lambda fn, sources: expect(name, fn, case.args, case.expected, case.hint))


def prop(name: str, title: str, cases: st.SearchStrategy, how: settings = PROPERTY_SETTINGS) -> Check:
    """Compare with the oracle on EXAMPLES inputs drawn by hypothesis (each case: (args, expected))."""

    def run(fn: Callable, sources: Sources) -> None:
        @how
        @given(cases)
        def property_(case):
            args, expected = case
            expect(name, fn, args, expected)

        try:
            property_()
        except Flaky as e:  # a failure that did not happen again on the same input
            inner = [x for x in _leaves(e) if isinstance(x, Wrong)]
            raise Wrong((str(inner[0]) if inner else str(e)) + "\n(the result changed between identical "
                        "calls: does your function use randomness?)") from None

    return Check(title, run)


def _leaves(e: BaseException) -> list[BaseException]:
    """The exceptions inside an exception group (hypothesis reports flaky failures as one)."""
    inner = getattr(e, "exceptions", None)
    return [e] if not inner else [x for sub in inner for x in _leaves(sub)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


seeds = st.integers(0, 2**32 - 1)


def _distinct(v: torch.Tensor) -> bool:
    """No ties inside any row: tied experts may come out of top-k in either order ("ties aside")."""
    s = v.sort(dim=-1).values
    return bool((s[..., 1:] != s[..., :-1]).all())


def _scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)


# ------------------------------------------------------------------------------ topk_route, group_limited_topk
def _router(E: int, k: int, score_func: str = "sigmoid", route_scale: float = 1.0, normalize: bool = True,
            bias_E: torch.Tensor | None = None, n_groups: int = 1, n_limited_groups: int = 1) -> Router:
    """The package's Router with an identity gate, so its input is the logits."""
    cfg = ModelConfig(dim=E, n_routed_experts=E, n_activated_experts=k, score_func=score_func,
                      route_scale=route_scale, norm_topk_prob=normalize,
                      bias_update_speed=1e-3 if bias_E is not None else 0.0,
                      n_expert_groups=n_groups, n_limited_groups=n_limited_groups)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
        if bias_E is not None:
            router.bias.copy_(bias_E)
    return router


@st.composite
def topk_route_cases(draw):
    T, E = draw(st.integers(1, 6)), draw(st.integers(2, 10))
    k = draw(st.integers(1, E))
    score_func = draw(st.sampled_from(["sigmoid", "softmax"]))
    with_bias, normalize = draw(st.booleans()), draw(st.booleans())
    route_scale = draw(st.sampled_from([1.0, 2.5, 0.75]))
    g = _gen(draw(seeds))
    logits_TE = torch.randn(T, E, generator=g) * 2
    bias_E = torch.randn(E, generator=g) * 0.2 if with_bias else None
    with torch.no_grad():
        r = _router(E, k, score_func, route_scale, normalize, bias_E)(logits_TE)
    assume(_distinct(r.scores_TE if bias_E is None else r.scores_TE + bias_E))
    args = dict(scores_TE=r.scores_TE, k=k, bias_E=bias_E, route_scale=route_scale, normalize=normalize)
    return args, (r.weights_TK, r.experts_TK)


@st.composite
def group_limited_cases(draw):
    G, n = draw(st.integers(2, 4)), draw(st.integers(2, 4))  # groups, experts per group
    E, M, T = G * n, draw(st.integers(1, G)), draw(st.integers(1, 6))
    k = draw(st.integers(1, M * n))
    offset = draw(st.sampled_from([0.0, -2.0]))  # -2: every selection value is negative
    g = _gen(draw(seeds))
    logits_TE = torch.randn(T, E, generator=g) * 2
    bias_E = torch.randn(E, generator=g) * 0.3 + offset
    with torch.no_grad():
        r = _router(E, k, "sigmoid", bias_E=bias_E, n_groups=G, n_limited_groups=M)(logits_TE)
    select_TE = r.scores_TE + bias_E
    assume(_distinct(select_TE) and _distinct(select_TE.view(T, G, n).topk(2, dim=-1).values.sum(dim=-1)))
    args = dict(scores_TE=r.scores_TE, k=k, n_groups=G, n_limited_groups=M, bias_E=bias_E)
    return args, r.experts_TK


def _t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


PINNED: dict[str, list[Case]] = {
    "topk_route": [
        Case("the bias picks the experts, the unbiased scores weigh them",
             dict(scores_TE=_t([[0.9, 0.1, 0.5, 0.3], [0.2, 0.6, 0.4, 0.8]]), k=2, bias_E=_t([0.0, 1.0, 0.0, 0.0]),
                  route_scale=1.0, normalize=True),
             (_t([[0.1, 0.9], [0.6 / 1.4, 0.8 / 1.4]]), _t([[1, 0], [1, 3]], torch.int64)),
             "select the top-k of scores + bias, but gather the weights from scores_TE: the bias never "
             "changes a weight"),
        Case("normalised weights: the chosen scores divided by their sum, times route_scale",
             dict(scores_TE=_t([[0.1, 0.6, 0.3, 0.2]]), k=2, bias_E=None, route_scale=2.5, normalize=True),
             (_t([[0.6 / 0.9 * 2.5, 0.3 / 0.9 * 2.5]]), _t([[1, 2]], torch.int64)),
             "divide the k chosen scores by their sum (not a softmax), then multiply by route_scale"),
        Case("normalize=False keeps the raw scores, still times route_scale",
             dict(scores_TE=_t([[0.7, 0.2, 0.9, 0.4]]), k=2, bias_E=None, route_scale=2.0, normalize=False),
             (_t([[1.8, 1.4]]), _t([[2, 0]], torch.int64)),
             "without normalize the weights are route_scale times the chosen scores"),
    ],
    "group_limited_topk": [
        Case("a group's score is the sum of its two largest selection values",
             dict(scores_TE=_t([[0.9, 0.1, 0.01, 0.6, 0.55, 0.01, 0.41, 0.4, 0.39]]), k=2, n_groups=3,
                  n_limited_groups=1, bias_E=torch.zeros(9)),
             _t([[3, 4]], torch.int64),
             "score each group by the sum of its top-2 selection values (topk(2).values.sum), "
             "not by its max or its total"),
        Case("the top-k spans all kept groups, and only them",
             dict(scores_TE=_t([[0.9, 0.8, 0.85, 0.05, 0.7, 0.6]]), k=3, n_groups=3, n_limited_groups=2,
                  bias_E=torch.zeros(6)),
             _t([[0, 1, 4]], torch.int64),
             "keep the n_limited_groups best groups, then take the top-k over all of their experts together"),
        Case("the bias counts in the group scores and in the final top-k",
             dict(scores_TE=_t([[0.6, 0.5, 0.4, 0.3]]), k=1, n_groups=2, n_limited_groups=1,
                  bias_E=_t([0.0, 0.0, 0.5, 0.0])),
             _t([[2]], torch.int64),
             "selection = scores + bias, used both to rank the groups and to pick the experts"),
        Case("masked groups are never chosen, even when every selection value is negative",
             dict(scores_TE=_t([[0.3, 0.25, 0.1, 0.4]]), k=2, n_groups=2, n_limited_groups=1,
                  bias_E=_t([-1.0, -1.0, -1.0, -1.0])),
             _t([[0, 1]], torch.int64),
             "mask the experts of the dropped groups with -inf (not 0): a masked expert must lose to any "
             "real selection value"),
    ],
    "switch_aux_loss": [
        Case("uniform load gives 1.0 (f_i counts the T*K assignments)",
             dict(scores_TE=torch.full((2, 4), 0.25), experts_TK=_t([[0, 1], [2, 3]], torch.int64)), 1.0,
             "f_i = (assignments to expert i) / (T * K), and the loss is E * sum_i f_i * P_i"),
        Case("P_i averages every expert's score, normalised per token",
             dict(scores_TE=_t([[1.0, 0.5, 0.5], [0.2, 0.2, 0.6]]), experts_TK=_t([[0], [2]], torch.int64)),
             3 * (0.5 * 0.35 + 0.5 * 0.425),
             "P_i = mean over the T tokens of s_ti / sum_j s_tj, over all E experts (sigmoid scores do "
             "not sum to 1)"),
    ],
    "seq_aux_loss": [
        Case("per sequence, then averaged (not over the whole batch)",
             dict(scores_BSE=_t([[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.1, 0.9]]]),
                  experts_BSK=_t([[[0], [0]], [[1], [1]]], torch.int64)), 1.8,
             "compute f and P for each sequence on its own, E * sum_i f_i * P_i per sequence, then the "
             "mean over the B sequences"),
        Case("uniform load gives 1.0 (f_i counts the sequence's S*K assignments)",
             dict(scores_BSE=torch.full((1, 2, 4), 0.25), experts_BSK=_t([[[0, 1], [2, 3]]], torch.int64)), 1.0,
             "f_i = (the sequence's assignments to expert i) / (S * K)"),
        Case("P_i averages every expert's score, normalised per token",
             dict(scores_BSE=_t([[[1.0, 0.5, 0.5], [0.2, 0.2, 0.6]]]), experts_BSK=_t([[[0], [2]]], torch.int64)),
             3 * (0.5 * 0.35 + 0.5 * 0.425),
             "P_i = mean over the S positions of s_ti / sum_j s_tj, over all E experts"),
    ],
    "update_bias": [
        Case("underloaded experts go up by gamma, overloaded ones down",
             dict(bias_E=torch.zeros(4), tokens_per_expert_E=_t([10.0, 0.0, 5.0, 5.0]), gamma=0.1),
             _t([-0.1, 0.1, 0.0, 0.0]),
             "bias + gamma * sign(mean load - load): below the mean -> +gamma, above -> -gamma"),
        Case("a fixed step gamma * sign, zero at the mean load; integer counts",
             dict(bias_E=_t([0.5, -0.25, 0.0]), tokens_per_expert_E=_t([1, 2, 3], torch.int64), gamma=0.01),
             _t([0.51, -0.25, -0.01]),
             "the step is gamma times the SIGN of the imbalance; counts may be integers (convert with "
             ".float() before taking the mean)"),
    ],
    "expert_capacity": [
        Case("top_k counts: every token makes k assignments", dict(capacity_factor=1.0, n_tokens=8, top_k=2,
                                                                   n_experts=4), 4,
             "capacity = ceil(capacity_factor * n_tokens * top_k / n_experts)"),
        Case("a fraction of a slot rounds up", dict(capacity_factor=1.25, n_tokens=10, top_k=2, n_experts=8), 4,
             "round UP (math.ceil): 3.125 slots need 4"),
        Case("an exact number of slots is kept as is", dict(capacity_factor=1.0, n_tokens=64, top_k=2,
                                                            n_experts=8), 16,
             "ceil of an integer is that integer"),
    ],
    "round_to_e4m3": [
        Case("values that are already e4m3 stay unchanged (and the shape is kept)",
             dict(x=_t([[0.0, 1.0, -1.0, 1.125, 0.5625], [2.0**-6, 2.0**-9, 448.0, -448.0, 240.0]])),
             _t([[0.0, 1.0, -1.0, 1.125, 0.5625], [2.0**-6, 2.0**-9, 448.0, -448.0, 240.0]]),
             "return a float32 tensor of x's shape; e4m3 values must come back exactly"),
        Case("round to nearest, ties to the even neighbour",
             dict(x=_t([1.03, 1.07, 1.0625, 1.1875, -1.0625, 17.0, 19.0, 300.0])),
             _t([1.0, 1.125, 1.0, 1.25, -1.0, 16.0, 20.0, 288.0]),
             "round to the nearest e4m3 value; exactly halfway, take the one whose last mantissa bit is 0 "
             "(torch.round rounds half to even)"),
        Case("below 2**-6: subnormals, multiples of 2**-9",
             dict(x=_t([2.0**-9, 3 * 2.0**-10, 2.0**-10, 0.001, 0.0009, 0.012, 1e-30, -0.005])),
             _t([2.0**-9, 2.0**-8, 0.0, 2.0**-9, 0.0, 6 * 2.0**-9, 0.0, -3 * 2.0**-9]),
             "below the smallest normal 2**-6 the spacing stays 2**-9: do not flush to zero, do not keep "
             "shrinking the step"),
        Case("magnitudes above 448 saturate to +-448",
             dict(x=_t([449.0, 464.0, 479.9, 480.0, 1000.0, 1e30, 3.4e38, -500.0, -1e38])),
             _t([448.0] * 7 + [-448.0, -448.0]),
             "e4m3fn has no infinity: clamp the magnitude to 448"),
    ],
    "accept_draft": [
        Case("p/q = 0.5: accepted when u = 0.3",
             dict(p_V=_t([0.2, 0.5, 0.3]), q_V=_t([0.4, 0.4, 0.2]), draft=0, u=0.3), True,
             "accept iff u < min(1, p_V[draft] / q_V[draft])"),
        Case("p/q = 0.5: rejected when u = 0.7",
             dict(p_V=_t([0.2, 0.5, 0.3]), q_V=_t([0.4, 0.4, 0.2]), draft=0, u=0.7), False,
             "accept iff u < min(1, p_V[draft] / q_V[draft]): the main model's p over the drafter's q"),
        Case("u exactly at p/q is rejected (the test is u < ratio)",
             dict(p_V=_t([0.25, 0.5, 0.25]), q_V=_t([0.5, 0.25, 0.25]), draft=0, u=0.5), False,
             "use a strict u < ratio"),
        Case("a draft the main model likes more (p >= q) is always accepted, even at u = 0.99",
             dict(p_V=_t([0.2, 0.5, 0.3]), q_V=_t([0.4, 0.4, 0.2]), draft=2, u=0.99), True,
             "min(1, p/q) is 1 when p >= q, and u < 1 always"),
        Case("a draft the main model gives probability 0 is always rejected, even at u = 0",
             dict(p_V=_t([0.0, 0.6, 0.4]), q_V=_t([0.5, 0.25, 0.25]), draft=0, u=0.0), False,
             "p/q = 0 there, and u < 0 never holds"),
    ],
    "residual_distribution": [
        Case("max(p - q, 0), normalised to sum to 1",
             dict(p_V=_t([0.5, 0.3, 0.2, 0.0]), q_V=_t([0.1, 0.2, 0.3, 0.4])), _t([0.8, 0.2, 0.0, 0.0]),
             "clamp p - q at 0, then divide by its sum"),
        Case("p == q leaves nothing: return p itself",
             dict(p_V=_t([0.25, 0.25, 0.5]), q_V=_t([0.25, 0.25, 0.5])), _t([0.25, 0.25, 0.5]),
             "when max(p - q, 0) is all zero, dividing gives 0/0 = NaN; return p_V instead"),
    ],
}


# ------------------------------------------------------------------------------ the balance losses
@st.composite
def switch_cases(draw):
    T, E = draw(st.integers(1, 12)), draw(st.integers(2, 8))
    K = draw(st.integers(1, E))
    g = _gen(draw(seeds))
    scores_TE = _scores(torch.randn(T, E, generator=g) * 2, draw(st.sampled_from(["sigmoid", "softmax"])))
    experts_TK = torch.rand(T, E, generator=g).argsort(dim=-1)[:, :K].contiguous()
    return dict(scores_TE=scores_TE, experts_TK=experts_TK), float(balance.switch_aux_loss(scores_TE, experts_TK))


@st.composite
def seq_cases(draw):
    B, S, E = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 8))
    K = draw(st.integers(1, E))
    g = _gen(draw(seeds))
    scores_BSE = _scores(torch.randn(B, S, E, generator=g) * 2, draw(st.sampled_from(["sigmoid", "softmax"])))
    experts_BSK = torch.rand(B, S, E, generator=g).argsort(dim=-1)[..., :K].contiguous()  # the package views it
    expected = balance.seq_aux_loss(scores_BSE.reshape(B * S, E), experts_BSK.reshape(B * S, K), B)
    return dict(scores_BSE=scores_BSE, experts_BSK=experts_BSK), float(expected)


def gradient_check(name: str, shape: tuple[int, ...], K: int,
                   package_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Check:
    """The loss must stay differentiable: its gradient w.r.t. the scores equals the package's."""

    def run(fn: Callable, sources: Sources) -> None:
        g = _gen(0)
        scores = torch.randn(*shape, generator=g).sigmoid()
        experts = torch.rand(*shape, generator=g).argsort(dim=-1)[..., :K].contiguous()
        leaf = scores.clone().requires_grad_()
        (want,) = torch.autograd.grad(package_loss(leaf, experts), leaf)
        mine = scores.clone().requires_grad_()
        try:
            loss = fn(mine, experts.clone())
        except Exception as e:
            raise Wrong(f"{name}(scores of shape {list(shape)}, experts with K={K}) raised {describe(e)}") from None
        if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
            raise Wrong("the loss carries no gradient back to the scores: keep it a tensor computed from them "
                        "(no .item(), .detach(), float() or torch.tensor(...) on the way)")
        try:
            (have,) = torch.autograd.grad(loss.sum(), mine, allow_unused=True)
        except Exception as e:
            raise Wrong(f"backward through the loss raised {describe(e)}") from None
        if have is None:
            raise Wrong("the loss does not depend on the scores: no gradient reaches scores")
        if not torch.allclose(have, want, rtol=1e-4, atol=1e-6):
            i = (have - want).abs().argmax()
            where = list(torch.unravel_index(i, have.shape))
            raise Wrong(f"for scores of shape {list(shape)} and K={K}, the gradient with respect to the scores "
                        f"differs from the package's: at index {[int(j) for j in where]} it should be "
                        f"{want.flatten()[i]:.6g}, got {have.flatten()[i]:.6g} (if the value checks fail too, "
                        "fix those first)")

    return Check("differentiable: the gradient with respect to the scores matches moe.balance's", run)


# ------------------------------------------------------------------------------ update_bias, expert_capacity
def package_update_bias(bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """moe.balance.update_bias, run on a one-layer MoE holding this bias and these loads."""
    from moe.layer import MoE

    cfg = ModelConfig(dim=4, n_routed_experts=len(bias_E), n_activated_experts=1, n_shared_experts=0,
                      moe_inter_dim=2, bias_update_speed=gamma)
    layer = MoE(cfg)
    with torch.no_grad():
        layer.router.bias.copy_(bias_E)
        layer.tokens_per_expert_E.copy_(tokens_per_expert_E.float())
    balance.update_bias(layer)
    return layer.router.bias.clone()


@st.composite
def update_bias_cases(draw):
    E = draw(st.integers(1, 16))
    gamma = draw(st.sampled_from([1e-3, 0.01, 0.05]))
    integer = draw(st.booleans())
    g = _gen(draw(seeds))
    counts_E = torch.randint(0, draw(st.sampled_from([3, 50])), (E,), generator=g)
    bias_E = torch.randn(E, generator=g) * 0.1
    args = dict(bias_E=bias_E, tokens_per_expert_E=counts_E if integer else counts_E.float(), gamma=gamma)
    return args, package_update_bias(bias_E, counts_E, gamma)


@st.composite
def capacity_cases(draw):
    from moe.experts import expert_capacity

    E = draw(st.integers(1, 256))
    args = dict(capacity_factor=draw(st.integers(1, 32)) / 8, n_tokens=draw(st.integers(1, 4096)),
                top_k=draw(st.integers(1, min(E, 8))), n_experts=E)
    return args, expert_capacity(**args)


# ------------------------------------------------------------------------------ round_to_e4m3
def _torch_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def _float8_uses(sources: Sources) -> list[str]:
    """Where the code names a float8 dtype (identifiers and strings; docstrings do not count)."""
    hits = []
    for label, code in sources:
        try:
            tree = ast.parse(textwrap.dedent(code))
        except SyntaxError:
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            text = (node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute)
                    else node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings else "")
            if "float8" in text.lower():
                hits.append(f"{label} line {node.lineno}")
    return sorted(set(hits), key=hits.index)


def no_float8(fn: Callable, sources: Sources) -> None:
    call("round_to_e4m3", fn, {"x": torch.tensor([1.0])})  # a stub that does not run yet does not pass
    hits = _float8_uses(sources)
    if hits:
        raise Wrong(f"the submission uses torch's float8 dtypes ({', '.join(hits[:3])}); the exercise is to "
                    "round without them (frexp, powers of two and torch.round are enough)")


def e4m3_grid_check(fn: Callable, sources: Sources) -> None:
    """Every finite e4m3 value, every midpoint between neighbours, and the float32s just beside those."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    pos = values[values.isfinite() & (values >= 0)].unique()  # sorted, 0 .. 448
    mids = (pos[1:] + pos[:-1]) / 2
    beside = torch.cat([torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(1e9))])
    x = torch.cat([pos, mids, beside])
    x = torch.cat([x, -x])
    expect("round_to_e4m3", fn, {"x": x}, _torch_e4m3(x),
           "every e4m3 value must map to itself, and a midpoint to the even neighbour")


def e4m3_sweep_check(fn: Callable, sources: Sources) -> None:
    """100,000 random float32 values, every binade from 2**-14 to 2**11 equally likely."""
    g = _gen(0)
    n = 100_000
    exponent = torch.randint(127 - 14, 127 + 11, (n,), generator=g, dtype=torch.int32)
    mantissa = torch.randint(0, 2**23, (n,), generator=g, dtype=torch.int32)
    x = (exponent * 2**23 + mantissa).view(torch.float32)
    x = torch.where(torch.rand(n, generator=g) < 0.5, -x, x)
    expect("round_to_e4m3", fn, {"x": x}, _torch_e4m3(x))


@st.composite
def e4m3_cases(draw):
    anywhere = st.floats(width=32, allow_nan=False, allow_infinity=False)  # hypothesis favours extremes
    in_range = st.floats(-500.0, 500.0, width=32)  # where rounding happens
    eighths = st.integers(-4096, 4096).map(lambda n: n / 8)  # many exact ties from 2 up
    values = draw(st.lists(st.one_of(anywhere, in_range, eighths), min_size=1, max_size=8))
    x = torch.tensor(values, dtype=torch.float32)
    return {"x": x}, _torch_e4m3(x)


# ------------------------------------------------------------------------------ speculative sampling
def accept_rule(p_V: torch.Tensor, q_V: torch.Tensor, draft: int, u: float) -> bool:
    """moe.generate.speculative_generate's test, written out: accept iff u < min(1, p/q)."""
    accept_prob = float(p_V[draft] / q_V[draft].clamp_min(1e-30))
    return u < min(1.0, accept_prob)


def residual_rule(p_V: torch.Tensor, q_V: torch.Tensor) -> torch.Tensor:
    """moe.generate.speculative_generate's resampling distribution, written out."""
    residual_V = (p_V - q_V).clamp_min(0.0)
    return residual_V / residual_V.sum() if residual_V.sum() > 0 else p_V


def _distributions(draw, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    V = draw(st.integers(1, 12))
    p_V = (torch.randn(V, generator=g) * 2).softmax(dim=-1)
    q_V = (torch.randn(V, generator=g) * 2).softmax(dim=-1)
    if draw(st.booleans()):  # a top-k-truncated main model: zeros in p
        p_V = p_V * (torch.rand(V, generator=g) < 0.5)
        p_V = p_V / p_V.sum() if p_V.sum() > 0 else q_V.clone()
    if draw(st.integers(0, 3)) == 0:
        q_V = p_V.clone()
    return p_V, q_V


@st.composite
def accept_cases(draw):
    p_V, q_V = _distributions(draw, _gen(draw(seeds)))
    support = q_V.nonzero().flatten().tolist()  # the drafter sampled the draft, so q_V[draft] > 0
    draft = support[draw(st.integers(0, len(support) - 1))]
    u = draw(st.floats(0.0, 1.0, exclude_max=True))
    assume(abs(u - float(p_V[draft] / q_V[draft])) > 1e-6)  # no float-rounding coin flips at the boundary
    return dict(p_V=p_V, q_V=q_V, draft=draft, u=u), accept_rule(p_V, q_V, draft, u)


@st.composite
def residual_cases(draw):
    p_V, q_V = _distributions(draw, _gen(draw(seeds)))
    return dict(p_V=p_V, q_V=q_V), residual_rule(p_V, q_V)


# ------------------------------------------------------------------------------ the checks of every exercise
def _pinned(name: str) -> list[Check]:
    return [pinned(name, case) for case in PINNED[name]]


CHECKS: dict[str, list[Check]] = {
    "topk_route": _pinned("topk_route") + [
        prop("topk_route", "matches moe.router.Router on random inputs (hypothesis)", topk_route_cases())],
    "group_limited_topk": _pinned("group_limited_topk") + [
        prop("group_limited_topk", "matches moe.router.Router's group-limited routing on random inputs (hypothesis)",
             group_limited_cases())],
    "switch_aux_loss": _pinned("switch_aux_loss") + [
        gradient_check("switch_aux_loss", (6, 4), 2, balance.switch_aux_loss),
        prop("switch_aux_loss", "matches moe.balance.switch_aux_loss on random inputs (hypothesis)", switch_cases())],
    "seq_aux_loss": _pinned("seq_aux_loss") + [
        gradient_check("seq_aux_loss", (3, 4, 5), 2,
                       lambda s, e: balance.seq_aux_loss(s.reshape(12, 5), e.reshape(12, 2), 3)),
        prop("seq_aux_loss", "matches moe.balance.seq_aux_loss on random inputs (hypothesis)", seq_cases())],
    "update_bias": _pinned("update_bias") + [
        prop("update_bias", "matches moe.balance.update_bias on a MoE layer, random loads (hypothesis)",
             update_bias_cases())],
    "expert_capacity": _pinned("expert_capacity") + [
        prop("expert_capacity", "matches moe.experts.expert_capacity on random sizes (hypothesis)",
             capacity_cases())],
    "round_to_e4m3": [Check("written without float8 dtypes", no_float8)] + _pinned("round_to_e4m3") + [
        Check("matches torch's float8 cast at every e4m3 value, midpoint and the floats beside them",
              e4m3_grid_check),
        prop("round_to_e4m3", "matches torch's float8 cast on random float32 values (hypothesis)", e4m3_cases(),
             NO_SHRINK_SETTINGS),
        Check("matches torch's float8 cast on 100,000 random float32 values from 2**-14 to 2**11",
              e4m3_sweep_check)],
    "accept_draft": _pinned("accept_draft") + [
        prop("accept_draft", "matches moe.generate's acceptance rule on random distributions (hypothesis)",
             accept_cases())],
    "residual_distribution": _pinned("residual_distribution") + [
        prop("residual_distribution", "matches moe.generate's resampling distribution on random "
             "distributions (hypothesis)", residual_cases())],
}
assert set(CHECKS) == set(EXERCISES) == set(COMPARE) == set(WRONG)
