"""argparse value types shared by the subcommands: bad flags fail with one clear line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def checked(cast: Callable[[str], float], ok: Callable[[float], bool], expected: str,
            unparsable: str | None = None) -> Callable[[str], float]:
    """An argparse `type=` that casts, then checks: 'expected <expected>, got '<value>''."""

    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {unparsable or expected}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v

    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a finite number > 0", "a number > 0")
non_negative_float = checked(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0",
                             "a number >= 0")
probability = checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
