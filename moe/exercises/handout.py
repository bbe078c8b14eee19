"""The hand-out: the student version of solutions.py, as a .py file and as a notebook.

One source: the text of solutions.py, where every `### BEGIN SOLUTION` ... `### END SOLUTION`
block (nbgrader's markers) becomes `raise NotImplementedError()`. The notebook has a markdown
cell of instructions per exercise (its docstring) and a code cell with the function, marked as
an nbgrader solution cell; it is plain nbformat-4 JSON with no outputs. `solutions=True` keeps
the solution blocks: the teacher's copy, and nbgrader's source notebook.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

from moe.config import atomic_write_text
from moe.exercises import EXERCISES

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STEM = "moe_exercises"  # the hand-out's file names: moe_exercises.py, moe_exercises.ipynb


def solutions_text() -> str:
    return (Path(__file__).parent / "solutions.py").read_text(encoding="utf-8")


def strip_solutions(text: str) -> str:
    """Replace each solution block, markers included, by nbgrader's stub at the block's indent."""
    out, start = [], None
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        marker = line.strip()
        if marker == BEGIN:
            if start is not None:
                raise ValueError(f"line {lineno}: {BEGIN} inside the block opened on line {start}")
            indent = line[: len(line) - len(line.lstrip())]
            out += [f"{indent}# YOUR CODE HERE\n", f"{indent}raise NotImplementedError()\n"]
            start = lineno
        elif marker == END:
            if start is None:
                raise ValueError(f"line {lineno}: {END} without {BEGIN}")
            start = None
        elif start is None:
            out.append(line)
    if start is not None:
        raise ValueError(f"line {start}: {BEGIN} without {END}")
    return "".join(out)


def _markdown(cell_id: str, text: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text.splitlines(keepends=True)}


def _code(cell_id: str, text: str, solution: bool = False) -> dict:
    metadata = {}
    if solution:  # nbgrader: an autograded-answer cell
        metadata["nbgrader"] = {"grade": False, "grade_id": cell_id, "locked": False, "schema_version": 3,
                                "solution": True, "task": False}
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": metadata, "outputs": [],
            "source": text.strip("\n").splitlines(keepends=True)}


def notebook(text: str) -> dict:
    """The notebook of a hand-out text: the module docstring, the imports, then per exercise its
    docstring as markdown and its code without the docstring."""
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    first = min(functions[name].lineno for name in EXERCISES)
    title, _, intro = (ast.get_docstring(tree) or "").partition("\n")
    imports = "".join(lines[tree.body[0].end_lineno: first - 1])
    cells = [_markdown("intro", f"# {title}\n{intro}"), _code("imports", imports)]
    for i, name in enumerate(EXERCISES, 1):
        fn = functions[name]
        doc = fn.body[0]
        source = lines[fn.lineno - 1: doc.lineno - 1] + lines[doc.end_lineno: fn.end_lineno]
        cells += [_markdown(f"{name}-doc", f"## {i}. `{name}`\n\n{ast.get_docstring(fn)}"),
                  _code(name, "".join(source), solution=True)]
    cells += [_markdown("grade-doc", "## Grade yourself\n\nSave the notebook, then run the cell below (or the same "
                                     "command in a terminal, from this folder)."),
              _code("grade", f"import sys\n!{{sys.executable}} -m moe.exercises grade all {STEM}.ipynb")]
    return {"cells": cells,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


def write_handout(folder: str | Path, solutions: bool = False, overwrite: bool = False) -> list[Path]:
    """Write STEM.py and STEM.ipynb into folder (created if needed); returns their paths."""
    folder = Path(folder)
    text = solutions_text() if solutions else strip_solutions(solutions_text())
    paths = [folder / f"{STEM}.py", folder / f"{STEM}.ipynb"]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise FileExistsError(f"{path} exists (a student's work?); pass --overwrite to replace it")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"DIR must be a folder, but {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths[0], text)
    atomic_write_text(paths[1], json.dumps(notebook(text), indent=1, ensure_ascii=False) + "\n")
    return paths
