import math

import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods.slerp import slerp
from modelcypher.merging.registry import REQUIRED, get_method

R = math.sqrt(2.0)


def test_registration():
    m = get_method("multislerp")
    assert m.base == "optional"
    assert m.model_params == {"weight": REQUIRED}
    assert m.global_params == {"normalize_weights": True, "eps": 1e-8}


def test_direction_is_the_weighted_mean_direction_and_radius_the_mean_norm(merge):
    # u = [1, 0], [0, 1]; weights 1/2 each: direction [1, 1] / sqrt 2; radius (3 + 1) / 2 = 2
    out = merge("multislerp", [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([R, R]))


def test_unnormalized_weights_scale_the_radius(merge):
    out = merge("multislerp", [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 1.0],
                normalize_weights=False)
    assert torch.allclose(out, torch.tensor([2.0 * R, 2.0 * R]))


def test_unequal_weights_tilt_the_direction(merge):
    # weights 3/4, 1/4 of u = [1, 0], [0, 1]: direction [3, 1] / sqrt 10; radius 3/4 * 2 + 1/4 * 2 = 2
    out = merge("multislerp", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])], weight=[3.0, 1.0])
    assert torch.allclose(out, torch.tensor([3.0, 1.0]) * 2.0 / math.sqrt(10.0))


def test_two_models_of_equal_norm_and_weight_give_the_slerp_midpoint(merge):
    g = torch.Generator().manual_seed(0)
    v0, v1 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    v1 = v1 * (v0.norm() / v1.norm())
    out = merge("multislerp", [v0, v1], weight=[1.0, 1.0])
    assert torch.allclose(out, slerp([v1], v0, t=0.5), atol=1e-6)


def test_with_a_base_interpolates_task_vectors(merge):
    base = torch.tensor([1.0, -1.0])
    out = merge("multislerp", [base + torch.tensor([3.0, 0.0]), base + torch.tensor([0.0, 1.0])], base,
                weight=[1.0, 1.0])
    assert torch.allclose(out, base + torch.tensor([R, R]))


def test_three_models(merge):
    # unit axes of R^3, equal weights: direction [1, 1, 1] / sqrt 3, radius (1 + 2 + 3) / 3 = 2
    xs = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0]), torch.tensor([0.0, 0.0, 3.0])]
    out = merge("multislerp", xs, weight=[1.0, 1.0, 1.0])
    assert torch.allclose(out, torch.full((3,), 2.0 / math.sqrt(3.0)))


def test_one_model_is_returned_as_is(merge):
    x = torch.tensor([1.0, 2.0])
    assert torch.equal(merge("multislerp", [x], torch.tensor([5.0, 5.0]), weight=[0.3]), x)


def test_antipodal_pair_falls_back_to_the_weighted_sum(merge):
    out = merge("multislerp", [torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([-1.0, 0.0]))


def test_cancelling_directions_of_three_models_are_refused():
    xs = [torch.tensor([1.0, 0.0]), torch.tensor([-0.5, math.sqrt(3) / 2]), torch.tensor([-0.5, -math.sqrt(3) / 2])]
    with pytest.raises(UserError, match="cancel"):
        get_method("multislerp").fn(xs, None, weight=[1.0, 1.0, 1.0])


@pytest.mark.parametrize("with_base", [False, True])
def test_streamed_blocks_equal_the_whole_tensor(merge, streamed, with_base):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    base = torch.randn(7, 5, generator=g) if with_base else None
    whole = merge("multislerp", xs, base, weight=[0.2, 0.5, 0.3])
    for rows in (1, 3):
        got = streamed("multislerp", xs, base, rows, weight=[0.2, 0.5, 0.3], normalize_weights=True, eps=1e-8)
        assert torch.allclose(got, whole, atol=1e-6)
