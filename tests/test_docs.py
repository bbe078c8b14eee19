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


# ------------------------------------------------------------------------------ tests the docs name
def test_definitions() -> dict[str, set[str]]:
    """file (tests/test_x.py) -> the test functions it defines."""
    return {f"tests/{f.name}": set(re.findall(r"^def (test_\w+)\(", f.read_text(encoding="utf-8"), flags=re.M))
            for f in (ROOT / "tests").glob("test_*.py")}


test_definitions.__test__ = False  # a helper, not a test


def test_every_test_named_in_pitfalls_exists():
    """docs/pitfalls.md names each test as `tests/FILE.py::NAME` (optionally `[case]`): each must exist
    there, and no test is named without its file, so a renamed or deleted test fails here."""
    text = (ROOT / "docs" / "pitfalls.md").read_text(encoding="utf-8")
    defs = test_definitions()
    refs = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)(?:\[[^\]`]*\])?`", text)
    assert len(refs) >= 50
    missing = [f"{f}::{name}" for f, name in refs if name not in defs.get(f, set())]
    assert not missing, f"docs/pitfalls.md names tests that do not exist: {missing}"
    bare = re.findall(r"(?<![/\w:])(test_\w+)\b(?!\.py)", text)
    assert not bare, f"docs/pitfalls.md names tests without their file: {bare}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_tests_named_in_the_docs_exist(page):
    """Every test a page names exists somewhere in tests/ (a name cut short with `_...` as a prefix)."""
    names = set().union(*test_definitions().values())
    text = page.read_text(encoding="utf-8")
    cited = re.findall(r"(?<![/\w])(test_\w+)\b(?!\.py)", text)
    missing = [c for c in cited if c not in names and not (c.endswith("_") and any(n.startswith(c) for n in names))]
    assert not missing, f"{page.name} names tests that do not exist: {missing}"


def test_the_pitfalls_page_is_linked_both_ways():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    balancing = (ROOT / "docs" / "balancing.md").read_text(encoding="utf-8")
    pitfalls = (ROOT / "docs" / "pitfalls.md").read_text(encoding="utf-8")
    assert "(docs/pitfalls.md)" in readme and "(pitfalls.md)" in balancing and "(balancing.md)" in pitfalls
