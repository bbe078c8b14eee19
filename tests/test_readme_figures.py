"""The README's figures exist, are small, and the numbers quoted beside them are those of the run
that drew them (docs/img/*.results.json, copied there by `make figures`)."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from tests.test_exp_dense_vs_moe import load_experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXPERIMENTS = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
IMG = ROOT / "docs" / "img"


def results(name: str) -> dict:
    return json.loads((IMG / f"{name}.results.json").read_text(encoding="utf-8"))


def test_the_readme_opens_with_the_headline_figure():
    first_image = re.search(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert first_image and first_image.group(1) == "docs/img/dense_vs_moe.png"
    assert README.index(first_image.group(0)) < README.index("\n## ")  # before the first section


@pytest.mark.parametrize("page", ["README.md", "docs/experiments.md", "docs/claims.md"])
def test_every_linked_figure_exists_and_is_small(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    links = set(re.findall(r"\((?:\.\./)?(?:docs/)?img/([\w.-]+\.png)\)", text))
    assert links or page == "docs/claims.md"
    for name in links:
        assert (IMG / name).is_file(), f"{page} links docs/img/{name}, which is missing: run make figures"
        assert (IMG / name).stat().st_size < 150_000


def test_make_figures_rebuilds_every_figure_of_the_readme_and_the_experiments_page():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    target = makefile[makefile.index("\nfigures:"):]
    target = target[:target.index("\n\n")]
    for text in (README, EXPERIMENTS):
        for name in re.findall(r"\((?:docs/)?img/([\w.-]+\.png)\)", text):
            assert name in target, f"docs/img/{name} is not rebuilt by make figures"


def test_the_quoted_tables_come_from_the_committed_results():
    dvm, mtp = load_experiment("dense_vs_moe"), load_experiment("mtp")
    d, m = results("dense_vs_moe"), results("mtp")
    assert dvm.format_table(d) in README and dvm.format_table(d) in EXPERIMENTS
    assert mtp.format_decode_table(m) in README and mtp.format_table(m) in EXPERIMENTS
    assert not d["meta"]["quick"] and not m["meta"]["quick"]  # the full budgets, not CI's
    assert len(d["meta"]["seeds"]) >= 3 and len(m["meta"]["seeds"]) >= 3
