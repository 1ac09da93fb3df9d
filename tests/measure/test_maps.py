"""Representation maps against their definitions: CKA equals the U-statistic it estimates, is invariant
to rotations and scaling; k-NN overlap, intersection maps and the GW coupling are 1 for a rotated copy;
the layer correspondence is monotone and follows the diagonal it is given."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from modelcypher.measure.maps import (
    cka,
    feature_hsic,
    gromov_wasserstein,
    intersection_jaccard,
    layer_correspondence,
    mutual_knn,
)


def hsic_u_statistic(k: torch.Tensor, l: torch.Tensor) -> float:
    """Unbiased HSIC straight from its definition: the mean over ordered distinct quadruples (i, j, q, r)
    of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += float(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q])
        count += 1
    return total / count


def test_cka_equals_the_u_statistic_on_hand_made_matrices():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, -1.0], [-2.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, -1.0, 2.0], [4.0, 0.0, 0.0], [-1.0, 2.0, 1.0],
                      [0.5, 0.5, 0.5]], dtype=torch.float64)
    k, l = x @ x.T, y @ y.T
    want = hsic_u_statistic(k, l) / np.sqrt(hsic_u_statistic(k, k) * hsic_u_statistic(l, l))
    assert cka(x, y) == pytest.approx(want, abs=1e-12)
    assert feature_hsic(x, y) == pytest.approx(hsic_u_statistic(k, l), abs=1e-10)
    assert 0 < abs(want) < 1


def test_cka_is_one_under_rotation_and_scale_and_near_zero_for_independent_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert cka(x, 3 * x @ q) == pytest.approx(1.0, abs=1e-12)
    lift = torch.linalg.qr(torch.randn(24, 16, generator=g, dtype=torch.float64))[0].T  # 16 x 24, orthonormal rows
    assert cka(x, x @ lift) == pytest.approx(1.0, abs=1e-12)
    assert abs(cka(x, torch.randn(200, 16, generator=g, dtype=torch.float64))) < 0.05  # debiased: ~0, not ~d/n


def test_neighbourhoods_intersection_maps_and_gw_recognize_a_permuted_scaled_copy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, 12, dtype=torch.float64)
    y = 2.0 * x[:, torch.randperm(12, generator=g)]
    assert mutual_knn(x, y, k=5) == 1.0
    assert intersection_jaccard(x, y, k=3) == 1.0
    gw = gromov_wasserstein(x, y)
    assert gw["diagonal_mass"] == pytest.approx(1.0, abs=1e-6) and gw["distance"] < 1e-9
    other = torch.randn(64, 12, generator=g, dtype=torch.float64)
    assert mutual_knn(x, other, k=5) < 0.3 and gromov_wasserstein(x, other)["diagonal_mass"] < 0.5


def test_layer_correspondence_is_monotone_and_finds_the_diagonal_and_a_stretch():
    s = np.eye(4) * 0.5 + 0.4
    assert [(p["a"], p["b"]) for p in layer_correspondence(s)] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert all(p["confidence"] > 0 for p in layer_correspondence(s)[1:-1])
    # B repeats A's layer 1 twice: columns 1 and 2 both resemble row 1.
    s = np.array([[1.0, 0.2, 0.2, 0.1], [0.2, 0.9, 0.9, 0.2], [0.1, 0.3, 0.3, 0.2], [0.1, 0.2, 0.2, 1.0]])
    assert [p["a"] for p in layer_correspondence(s)] == [0, 1, 1, 3]
