"""Command line: python -m moe {train,generate,info,calc,...} --help."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module registers its own subcommands through `register(subparsers)`.
CLI_MODULES = ("moe.train", "moe.generate", "moe.info", "moe.accounting", "moe.interop.convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m moe",
        description="A compact Mixture-of-Experts transformer (DeepSeek-V3 techniques at toy scale).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in CLI_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves first): no traceback
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the disk or the file system said no: which path, and why
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
