"""Representation maps between two models: pure functions of anchor matrices.

Every function takes the same anchors seen by both models: ``x`` is ``[n, d_a]`` (row ``i`` is model A's
representation of anchor ``i``), ``y`` is ``[n, d_b]``; widths may differ, the rows must not.

- :func:`cka`: debiased linear CKA (Song et al. 2012's unbiased HSIC; Nguyen et al. 2021), invariant to
  orthogonal maps and isotropic scaling of either side, unbiased in the number of anchors.
- :func:`mutual_knn`: the share of each anchor's ``k`` nearest neighbours (cosine) the two models agree on.
- :func:`intersection_jaccard`: the "intersection map": dimensions of A matched to dimensions of B by
  correlation (linear assignment), then per anchor the Jaccard overlap of the top-``k`` most active
  dimensions, A's carried through the matching.
- :func:`gromov_wasserstein`: POT's Gromov-Wasserstein coupling of the two anchor geometries (distance
  matrices); the mass it puts on the diagonal says whether the geometry alone identifies the anchors.
- :func:`layer_correspondence`: a monotone map of one model's layers onto the other's by dynamic
  programming over a similarity matrix, with a confidence per pair.
"""

from __future__ import annotations

import numpy as np
import torch

from modelcypher.align.solvers import solve_lap


def feature_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of the linear kernels ``K = x x^T``, ``L = y y^T`` (diagonals zeroed:
    ``K~``, ``L~``), ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2 1'K~L~1 / (n-2)] / (n(n-3))``, without
    forming either ``n x n`` kernel: every term in ``O(n d^2)`` (``tr(K~L~) = |x^T y|^2 - sum_i |x_i|^2
    |y_i|^2``, ``K~1 = x (x^T 1) - diag(K)``)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    kd, ld = x.square().sum(1), y.square().sum(1)
    k1 = x @ x.sum(0) - kd  # K~ 1
    l1 = y @ y.sum(0) - ld
    trace = (x.T @ y).square().sum() - (kd * ld).sum()
    term = trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 * (k1 @ l1) / (n - 2)
    return term / (n * (n - 3))


def cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Debiased linear CKA of anchors ``x`` ``[n, d_a]`` and ``y`` ``[n, d_b]`` (needs ``n >= 4``).

    ``HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L))`` with linear kernels; NaN when either side is
    constant over the anchors. Unlike the biased estimator it does not drift towards 1 when the width
    approaches the number of anchors.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] < 4:
        raise ValueError("cka needs the same n >= 4 anchors on both sides")
    den = (feature_hsic(x, x) * feature_hsic(y, y)).sqrt()
    return float(feature_hsic(x, y) / den) if den > 0 else float("nan")


def knn_sets(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each anchor's ``k`` nearest other anchors by cosine similarity ``[n, k]``."""
    z = torch.nn.functional.normalize(x.double(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> float:
    """Mean over anchors of ``|N_A(i) & N_B(i)| / k`` (1: same neighbourhoods; about ``k / n`` by chance)."""
    n = x.shape[0]
    k = min(k, n - 1)
    a, b = knn_sets(x, k), knn_sets(y, k)
    hit = torch.zeros(n, n, dtype=torch.bool)
    hit.scatter_(1, a, True)
    return float(hit.gather(1, b).sum() / (n * k))


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every dimension of ``x`` with every dimension of ``y`` ``[d_a, d_b]``."""
    def z(t):
        t = t.double() - t.double().mean(0)
        return t / t.norm(dim=0).clamp_min(1e-12)

    return z(x).T @ z(y)


def dimension_matching(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """For each dimension of A, its matched dimension of B (``-1`` when B is narrower and none is left):
    the linear assignment maximizing the summed absolute correlation."""
    c = correlation(x, y).abs()
    da, db = c.shape
    if da > db:
        c = torch.cat([c, torch.zeros(da, da - db, dtype=c.dtype)], 1)
    elif db > da:
        c = torch.cat([c, torch.zeros(db - da, db, dtype=c.dtype)], 0)
    perm = solve_lap(c)[:da]
    return torch.where(perm < db, perm, torch.full_like(perm, -1))


def intersection_jaccard(x: torch.Tensor, y: torch.Tensor, k: int = 8) -> float:
    """Mean over anchors of the Jaccard overlap between B's top-``k`` active dimensions and A's top-``k``
    carried into B by :func:`dimension_matching`. Activity is the absolute z-score of a dimension over the
    anchors, so a dimension with a large offset is not active everywhere."""
    match = dimension_matching(x, y)

    def top(t):
        t = t.double()
        score = ((t - t.mean(0)) / t.std(0).clamp_min(1e-12)).abs()
        return score.topk(min(k, t.shape[1]), dim=1).indices

    ta, tb = match[top(x)], top(y)
    inter = (ta[:, :, None] == tb[:, None, :]).any(2).sum(1).double()
    union = ta.shape[1] + tb.shape[1] - inter
    return float((inter / union).mean())


def distance_matrix(x: torch.Tensor) -> np.ndarray:
    """Euclidean distances between centered anchors, scaled to a largest distance of 1."""
    x = x.double() - x.double().mean(0)
    d = torch.cdist(x, x)
    return (d / d.max().clamp_min(1e-12)).numpy()


def gromov_wasserstein(x: torch.Tensor, y: torch.Tensor) -> dict:
    """POT's Gromov-Wasserstein coupling of the two anchor geometries (uniform weights, square loss).

    Returns the GW discrepancy, the coupling's mass on the diagonal (1: the geometry alone pairs every
    anchor with itself; ``1/n``: no better than chance) and the coupling itself.
    """
    c1, c2 = distance_matrix(x), distance_matrix(y)
    n = len(c1)
    p = np.full(n, 1.0 / n)
    import ot  # POT loads scipy.optimize and more: only the verbs that compare spaces pay for it

    coupling, log = ot.gromov.gromov_wasserstein(c1, c2, p, p, loss_fun="square_loss", log=True)
    return {"distance": float(log["gw_dist"]), "diagonal_mass": float(np.trace(coupling)), "coupling": coupling}


def layer_correspondence(sim: np.ndarray | torch.Tensor) -> list[dict]:
    """A monotone map from the columns (layers of B) onto the rows (layers of A) of a similarity matrix.

    Every layer ``j`` of B gets one layer ``f(j)`` of A with ``f`` non-decreasing, ``f(0) = 0`` and
    ``f(last) = last`` (embeddings meet embeddings, outputs meet outputs), maximizing the summed similarity
    (dynamic programming, ``O(L_a^2 L_b)``). A deeper B maps several of its layers onto one of A (its
    repeats); a shallower B skips layers of A. The confidence of a pair is its similarity minus the best
    similarity of layer ``j`` with any layer of A more than one step away from ``f(j)``: how clearly the
    data prefer this region of A (0 or less: not at all).
    """
    s = np.asarray(sim, dtype=np.float64)
    s = np.where(np.isfinite(s), s, -1.0)
    la, lb = s.shape
    best = np.full((lb, la), -np.inf)
    back = np.zeros((lb, la), dtype=np.int64)
    best[0, 0] = s[0, 0]
    for j in range(1, lb):
        run = np.maximum.accumulate(best[j - 1])  # best over f(j-1) <= i
        arg = np.zeros(la, dtype=np.int64)
        for i in range(1, la):
            arg[i] = arg[i - 1] if best[j - 1, arg[i - 1]] >= best[j - 1, i] else i
        best[j] = run + s[:, j]
        back[j] = arg
    path = [la - 1]
    for j in range(lb - 1, 0, -1):
        path.append(int(back[j, path[-1]]))
    path.reverse()
    out = []
    for j, i in enumerate(path):
        far = [s[k, j] for k in range(la) if abs(k - i) > 1]
        out.append({"a": i, "b": j, "similarity": float(s[i, j]),
                    "confidence": float(s[i, j] - max(far)) if far else float(s[i, j])})
    return out
