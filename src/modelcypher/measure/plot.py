"""matplotlib for the figures the verbs write, imported on first use (it takes a second) and drawing
off-screen."""

from __future__ import annotations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
