"""matplotlib for the figures the verbs write, imported on first use (it takes a second) and drawing
off-screen; every figure is written atomically, like any other output."""

from __future__ import annotations

from pathlib import Path

from modelcypher.checkpoint.guard import atomic_file


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as PNG (temp file, then rename) and close it."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
