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


def comma_list(ok: Callable[[str], object], expected: str, empty_ok: bool = False) -> Callable[[str], str]:
    """An argparse `type=`: a comma list whose every item passes ok ('' too if empty_ok), kept as the string."""
    return checked(str, lambda s: (empty_ok and s == "") or all(ok(v) for v in s.split(",")),
                   f"a comma list of {expected}")


def one_of(allowed: tuple[str, ...], empty_ok: bool = False) -> Callable[[str], str]:
    """An argparse `type=`: a comma list of allowed values (e.g. CHOICES["expert_impl"])."""
    return comma_list(allowed.__contains__, "|".join(allowed), empty_ok)


def config_from(ap: argparse.ArgumentParser, preset: str, sets: list[str]):
    """--preset NAME with the --set changes, for scripts: a bad one is ap.error naming the flag (exit 2)."""
    from moe.config import get_preset, parse_overrides

    try:
        cfg = get_preset(preset)
    except ValueError as e:
        ap.error(f"--preset: {e}")
    try:
        return cfg.replace(**parse_overrides(sets))
    except ValueError as e:  # parse_overrides names --set; an impossible config names only its fields
        ap.error(str(e) if str(e).startswith("--set") else f"--set: {e}")


def out_folder(s: str) -> str:
    """An argparse `type=` for --out: a folder that exists or can be made, and is writable (checked before
    anything runs; moe.checkpoint.check_out_dir)."""
    from moe.checkpoint import check_out_dir

    try:
        check_out_dir(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def training_inputs(ap: argparse.ArgumentParser, tc):
    """tc (a moe.train.TrainConfig) checked and its --data loaded, for scripts that train many runs: a bad
    one is ap.error (exit 2) before the first run starts. Returns the corpus."""
    from moe.data import load_corpus

    try:
        tc.validate()
    except ValueError as e:
        ap.error(str(e))
    try:
        return load_corpus(tc.data, tc.seq_len)
    except (OSError, ValueError) as e:
        ap.error(f"--data: {e}")
