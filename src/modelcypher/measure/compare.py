"""``modelcypher compare``: how the layers of two models (any families, widths, depths, tokenizers)
correspond, measured on anchors both models read: spans of a probe text (:mod:`.anchors`).

Per layer pair: debiased linear CKA, mutual k-NN overlap, the intersection map's Jaccard overlap and a
Gromov-Wasserstein coupling of the anchor geometries (:mod:`.maps`). From the CKA matrix, a monotone
layer correspondence with a confidence per pair; from the CKA of the blocks' updates (a block's output
minus its input), the block of A each block of B most resembles, which names the repeats of a
depth-upscaled model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modelcypher.errors import UserError
from modelcypher.hf import load_causal_lm, load_tokenizer, resolve_device
from modelcypher.measure.anchors import Pooled, default_probes, pool, segments
from modelcypher.measure.maps import cka, gromov_wasserstein, intersection_jaccard, layer_correspondence, mutual_knn
from modelcypher.measure.plot import pyplot, save_png

MIN_ANCHORS = 32  # below this, k-NN sets and CKA say little (words of probe text both models cover)
MAX_SEGMENT_CHARS = 256
METRICS = ("cka", "mutual_knn", "jaccard", "gw_diagonal")


@dataclass
class Side:
    """One model ready to read probes: the model, its tokenizer, its context, its name."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    context: int


def open_side(path: str | Path, device: torch.device) -> Side:
    model, ctx = load_causal_lm(Path(path), device, who="compare needs", cap=1 << 20)
    return Side(str(path), model, load_tokenizer(Path(path), "to read the probe text with"), ctx)


def shared_segments(text: str, sides: list[Side]):
    # A character-level model needs a token per character: segments fit the smaller context.
    return segments(text, min(MAX_SEGMENT_CHARS, *(s.context for s in sides)))


def enough(segs, minimum: int, what: str) -> None:
    n = sum(len(s.spans) for s in segs)
    if n < minimum:
        raise UserError(f"{what}: the probe text gives {n} anchors (words); at least {minimum} are needed: "
                        f"give a longer --probes text (about {minimum} words or more)")


def common(pooled: list[Pooled], max_anchors: int, minimum: int, what: str) -> torch.Tensor:
    """Indices of the anchors every model covered, evenly thinned to ``max_anchors``."""
    keep = torch.stack([p.covered for p in pooled]).all(0).nonzero().flatten()
    if len(keep) < minimum:
        raise UserError(f"{what}: the probe text gives {len(keep)} anchors (words both models read); at least "
                        f"{minimum} are needed: give a longer --probes text (about {minimum} words or more)")
    if len(keep) > max_anchors:
        keep = keep[torch.linspace(0, len(keep) - 1, max_anchors).round().long()]
    return keep


def pair_metrics(xs: list[torch.Tensor], ys: list[torch.Tensor], k: int, top_k: int, gw_anchors: int) -> dict:
    """Every metric for every pair (row: layer of A, column: layer of B)."""
    la, lb = len(xs), len(ys)
    out = {m: np.full((la, lb), np.nan) for m in METRICS}
    out["gw_distance"] = np.full((la, lb), np.nan)
    n = xs[0].shape[0]
    sub = torch.linspace(0, n - 1, min(n, gw_anchors)).round().long()
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out["cka"][i, j] = cka(x, y)
            out["mutual_knn"][i, j] = mutual_knn(x, y, k)
            out["jaccard"][i, j] = intersection_jaccard(x, y, top_k)
            gw = gromov_wasserstein(x[sub], y[sub])
            out["gw_distance"][i, j], out["gw_diagonal"][i, j] = gw["distance"], gw["diagonal_mass"]
    return out


def updates(states: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b - a for a, b in zip(states[:-1], states[1:], strict=True)]


def compare_models(model_a: str | Path, model_b: str | Path, text: str | None = None, *, max_anchors: int = 1024,
                   k: int = 10, top_k: int = 8, gw_anchors: int = 256, device: str = "auto") -> dict:
    """The representation report of two models on ``text`` (default: the shipped probe corpus)."""
    dev = resolve_device(device)
    text = default_probes() if text is None else text
    enough(segments(text, MAX_SEGMENT_CHARS), MIN_ANCHORS, "compare")
    sides = [open_side(model_a, dev), open_side(model_b, dev)]
    segs = shared_segments(text, sides)
    pooled = [pool(s.model, s.tokenizer, segs, s.context, device=dev) for s in sides]
    keep = common(pooled, max_anchors, MIN_ANCHORS, "compare")
    xs, ys = ([h[keep] for h in p.states] for p in pooled)
    m = pair_metrics(xs, ys, k, top_k, gw_anchors)
    upd = np.array([[cka(u, v) for v in updates(ys)] for u in updates(xs)])
    corr = layer_correspondence(m["cka"])
    for pair in corr:
        i, j = pair["a"], pair["b"]
        pair.update({name: float(m[name][i, j]) for name in ("mutual_knn", "jaccard", "gw_diagonal")})
    source = [int(np.nanargmax(row)) for row in upd.T]
    repeats = {a: [b for b, s in enumerate(source) if s == a] for a in sorted(set(source))}
    return {
        "model_a": str(model_a), "model_b": str(model_b), "anchors": len(keep),
        "layers": [len(xs), len(ys)], "widths": [xs[0].shape[1], ys[0].shape[1]],
        "note": "layer 0 is the embeddings' output; layer i is block i's output",
        "matrices": {name: v.tolist() for name, v in m.items()} | {"update_cka": upd.tolist()},
        "correspondence": corr,
        "block_source": source,
        "repeats": {str(a): bs for a, bs in repeats.items() if len(bs) > 1},
    }


def render(report: dict) -> str:
    lines = [f"{report['model_a']} ({report['layers'][0] - 1} blocks, width {report['widths'][0]}) vs "
             f"{report['model_b']} ({report['layers'][1] - 1} blocks, width {report['widths'][1]}) on "
             f"{report['anchors']} anchors",
             "layer B -> layer A     CKA   conf  mutual-kNN  jaccard  GW-diag"]
    for p in report["correspondence"]:
        lines.append(f"  {p['b']:>5} -> {p['a']:<7} {p['similarity']:6.3f} {p['confidence']:6.3f} "
                     f"{p['mutual_knn']:10.3f} {p['jaccard']:8.3f} {p['gw_diagonal']:8.3f}")
    if report["repeats"]:
        rep = "; ".join(f"A block {a} in B blocks {bs}" for a, bs in report["repeats"].items())
        lines.append(f"repeated blocks (by the CKA of their updates): {rep}")
    return "\n".join(lines)


def plot_maps(report: dict, out_dir: str | Path) -> list[Path]:
    """One PNG heatmap per metric (rows: layers of A, columns: layers of B), the correspondence marked."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    names = [*METRICS, "gw_distance", "update_cka"]
    for name in names:
        arr = np.array(report["matrices"][name], dtype=float)
        fig, ax = plt.subplots(figsize=(1.5 + 0.35 * arr.shape[1], 1.2 + 0.35 * arr.shape[0]))
        im = ax.imshow(arr, aspect="auto", cmap="viridis", interpolation="nearest", origin="lower")
        if name != "update_cka":
            ax.plot([p["b"] for p in report["correspondence"]], [p["a"] for p in report["correspondence"]],
                    "w.-", lw=1)
        ax.set_xlabel(f"layer of B ({Path(report['model_b']).name})")
        ax.set_ylabel(f"layer of A ({Path(report['model_a']).name})")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        paths.append(save_png(fig, out_dir / f"{name}.png"))
    return paths
