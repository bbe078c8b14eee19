"""The walkthrough notebooks: committed without outputs, and each one a complete lesson.

Executing them is nbmake's job (`make test` runs `pytest --nbmake notebooks`); these tests pin
the hygiene check that `make nbcheck` runs and the shape every notebook shares: an opening that
says what the learner will understand and which paper section it follows, and an ending with a
summary and exercises.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK_ARGS = ["--verify", "--keep-id"]  # what `make nbcheck` passes to nbstripout


def run_check(paths: list[pathlib.Path]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbstripout", *CHECK_ARGS, *map(str, paths)],
                          capture_output=True, text=True, timeout=60)


def write_notebook(path: pathlib.Path, outputs: bool = False, execution_count: int | None = None) -> pathlib.Path:
    code = new_code_cell("print(1)")
    code["id"] = "1"
    code.execution_count = execution_count
    if outputs:
        code.outputs = [new_output("stream", name="stdout", text="1\n")]
    md = new_markdown_cell("# title")
    md["id"] = "0"
    nbformat.write(new_notebook(cells=[md, code]), path)
    return path


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


def test_committed_notebooks_have_no_outputs_or_execution_counts():
    r = run_check(NOTEBOOKS)
    assert r.returncode == 0, f"notebooks with outputs (strip them with nbstripout):\n{r.stdout}{r.stderr}"


def test_the_check_fails_on_outputs_and_on_execution_counts(tmp_path):
    clean = write_notebook(tmp_path / "clean.ipynb")
    with_output = write_notebook(tmp_path / "output.ipynb", outputs=True, execution_count=1)
    with_count = write_notebook(tmp_path / "count.ipynb", execution_count=3)
    before = with_output.read_bytes()
    assert run_check([clean]).returncode == 0
    r = run_check([with_output])
    assert r.returncode != 0 and "output.ipynb" in r.stdout
    assert run_check([with_count]).returncode != 0
    assert run_check([clean, with_output]).returncode != 0  # one dirty notebook fails the lot
    assert with_output.read_bytes() == before  # a check, not a strip


def test_make_test_runs_the_check():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert f"-m nbstripout {' '.join(CHECK_ARGS)} notebooks/*.ipynb" in makefile
    target = re.search(r"^test:(.*)$", makefile, flags=re.M)
    assert target and "nbcheck" in target.group(1).split()


def _headed(source: str, heading: str) -> bool:
    return re.search(rf"^## {heading}\s*$", source, flags=re.M) is not None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_is_a_complete_lesson(path):
    cells = nbformat.read(path, as_version=4).cells
    opening = cells[0]
    assert opening.cell_type == "markdown"
    assert opening.source.startswith(f"# {path.stem[:2]} · "), "title: '# NN · topic'"
    assert "**By the end you will understand**" in opening.source
    paper = re.search(r"\*\*Paper:\*\*(.*)", opening.source, flags=re.S)
    assert paper and re.search(r"section \d", paper.group(1)), "name the paper section the notebook follows"

    # ends with a summary, then exercises, with nothing after them
    summary = [i for i, c in enumerate(cells) if c.cell_type == "markdown" and _headed(c.source, "Summary")]
    assert summary, "a '## Summary' section"
    last = cells[-1]
    assert last.cell_type == "markdown" and _headed(last.source, "Exercises")
    assert summary[-1] >= len(cells) - 2
    exercises = last.source.split("## Exercises", 1)[1]
    assert len(re.findall(r"^\d+\. ", exercises, flags=re.M)) >= 3, "at least three exercises"

    code = [c.source for c in cells if c.cell_type == "code"]
    assert code and all(src.strip() for src in code)
    assert any(re.search(r"^(from moe[ .]|import moe)", src, flags=re.M) for src in code), "uses the package"


def test_the_readme_course_table_links_every_notebook():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    course = readme.split("\n## Course\n", 1)
    assert len(course) == 2, "README has a '## Course' section"
    section = re.split(r"^## ", course[1], flags=re.M)[0]
    for path in NOTEBOOKS:
        assert f"(notebooks/{path.name})" in section, f"README's course table misses {path.name}"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if "02" <= p.stem[:2] <= "07"], ids=lambda p: p.stem)
def test_the_walkthroughs_link_the_pitfalls_page(path):
    """Notebooks 02-07 each close with a link to the known bugs of their topic."""
    last = nbformat.read(path, as_version=4).cells[-1]
    assert "(../docs/pitfalls.md)" in last.source
