"""Matplotlib figures used by the experiments and the notebooks.

Every function takes plain numbers (or library results), draws one figure, and returns the
matplotlib Figure; `save(fig, path)` writes it. The Agg backend is forced so plots work on
headless machines and in CI.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save(fig: Figure, path: str | os.PathLike) -> str:
    """Write fig to path (creating the folder) and close it; returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
