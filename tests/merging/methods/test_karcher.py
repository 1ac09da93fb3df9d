import math

import torch

from modelcypher.merging.methods.slerp import slerp
from modelcypher.merging.registry import get_method

H = math.sqrt(2.0) / 2.0


def test_registration():
    m = get_method("karcher")
    assert m.base == "none" and m.model_params == {}
    assert m.global_params == {"max_iter": 10, "tol": 1e-5}


def test_two_points_give_the_slerp_midpoint_scaled_by_the_mean_norm(merge):
    # directions [1, 0] and [0, 1]: midpoint [H, H]; mean norm (2 + 4) / 2 = 3
    out = merge("karcher", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])
    assert torch.allclose(out, torch.tensor([3.0 * H, 3.0 * H]))


def test_two_random_points_of_equal_norm_give_slerp_at_one_half(merge):
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    v1 = v1 * (v0.norm() / v1.norm())
    assert torch.allclose(merge("karcher", [v0, v1]), slerp([v1], v0, t=0.5), atol=1e-6)


def test_symmetric_points_give_their_center(merge):
    xs = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])]
    assert torch.allclose(merge("karcher", xs), torch.full((3,), 1.0 / math.sqrt(3.0)))


def _log_map_mean(xs: list[torch.Tensor], m: torch.Tensor) -> torch.Tensor:
    """sum_i theta_i / sin(theta_i) (u_i - cos(theta_i) m): zero at the Karcher mean m (float64)."""
    m = m.double() / m.double().norm()
    total = torch.zeros_like(m)
    for x in xs:
        u = x.double() / x.double().norm()
        cos = float(u @ m)
        theta = math.acos(max(-1.0, min(1.0, cos)))
        total += theta / math.sin(theta) * (u - cos * m)
    return total


def test_result_is_a_stationary_point_of_the_squared_distances(merge):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(5, generator=g) for _ in range(4)]
    m = merge("karcher", xs, max_iter=200, tol=1e-12)
    assert float(_log_map_mean(xs, m).norm()) < 1e-5
    # the first iterate (normalized mean of directions) is not yet the mean
    first = merge("karcher", xs, max_iter=0)
    assert float(_log_map_mean(xs, first).norm()) > 1e-3
    # radius: the mean of the norms
    assert math.isclose(float(m.norm()), sum(float(x.norm()) for x in xs) / 4, rel_tol=1e-6)


def test_zero_model_is_left_out_of_the_direction_but_counts_in_the_radius(merge):
    out = merge("karcher", [torch.tensor([3.0, 0.0]), torch.zeros(2)])
    assert torch.allclose(out, torch.tensor([1.5, 0.0]))


def test_one_model_is_returned_and_all_zero_models_give_zero(merge):
    x = torch.tensor([1.0, -2.0])
    assert torch.equal(merge("karcher", [x]), x)
    assert torch.equal(merge("karcher", [torch.zeros(2), torch.zeros(2)]), torch.zeros(2))


def test_streamed_blocks_equal_the_whole_tensor(merge, streamed):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    whole = merge("karcher", xs)
    for rows in (1, 3):
        assert torch.allclose(streamed("karcher", xs, None, rows, max_iter=10, tol=1e-5), whole, atol=1e-6)
