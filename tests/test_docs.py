"""The README's and docs' examples run as written."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

from moe.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: pathlib.Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


PYTHON = [(p.name, i, code) for p in PAGES for i, code in enumerate(blocks(p, "python"))]
CALC = [line.split("#")[0].strip() for p in PAGES for code in blocks(p, "bash") for line in code.splitlines()
        if line.startswith("python -m moe calc")]


def test_the_readme_has_examples():
    assert any(name == "README.md" for name, _, _ in PYTHON) and CALC


@pytest.mark.parametrize("page, index, code", PYTHON, ids=[f"{p}-{i}" for p, i, _ in PYTHON])
def test_python_examples_run(page, index, code, one_thread):
    import torch

    namespace = {"__name__": "__doc_example__"}
    exec(compile(code, f"{page} example {index}", "exec"), namespace)
    for name, value in namespace.items():  # and what they compute is a number, not NaN
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.is_meta:
            assert torch.isfinite(value).all(), f"{page} example {index}: {name} is not finite"


@pytest.mark.parametrize("command", CALC)
def test_calculator_commands_run(command, capsys):
    assert main(shlex.split(command)[3:]) == 0
    assert capsys.readouterr().out.strip()
