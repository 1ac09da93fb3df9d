import math

import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import REQUIRED, get_method

H = math.sqrt(2.0) / 2.0  # sin(pi/4) / sin(pi/2): both slerp weights at t = 1/2 between orthogonal vectors


def test_registration():
    m = get_method("nuslerp")
    assert m.base == "optional" and m.min_models == 2 and m.max_models == 2
    assert m.model_params == {"weight": REQUIRED}
    assert m.global_params == {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert m.stream is not None


def test_equal_weights_give_the_midpoint(merge):
    out = merge("nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([H, H]))


def test_t_is_the_second_weight_over_the_sum(merge):
    # t = 2 / (1 + 2) = 2/3 of a right angle: weights sin(pi/6), sin(pi/3)
    out = merge("nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, 2.0])
    assert torch.allclose(out, torch.tensor([0.5, math.sqrt(3.0) / 2.0]))


def test_cancelling_weights_give_t_one_half(merge):
    out = merge("nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], weight=[1.0, -1.0])
    assert torch.allclose(out, torch.tensor([H, H]))


def test_with_a_base_interpolates_task_vectors(merge):
    base = torch.tensor([1.0, 1.0])
    out = merge("nuslerp", [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])], base, weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([1.0 + H, 1.0 + H]))


X0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
X1 = torch.tensor([[0.0, 1.0], [0.0, 4.0]])


def test_rows_are_interpolated_separately(merge):
    # row 0: orthogonal unit vectors -> [H, H]; row 1: parallel -> lerp [0, 3]
    out = merge("nuslerp", [X0, X1], weight=[1.0, 1.0], nuslerp_flatten=False)
    assert torch.allclose(out, torch.tensor([[H, H], [0.0, 3.0]]))


def test_flatten_interpolates_the_whole_tensor(merge):
    # flattened: <x0, x1> = 8, |x0| = sqrt(5), |x1| = sqrt(17)
    theta = math.acos(8.0 / math.sqrt(85.0))
    s = math.sin(theta / 2.0) / math.sin(theta)
    out = merge("nuslerp", [X0, X1], weight=[1.0, 1.0])
    assert torch.allclose(out, s * (X0 + X1))


def test_row_wise_interpolates_columns(merge):
    # columns of X0.T, X1.T are the rows above
    out = merge("nuslerp", [X0.T.contiguous(), X1.T.contiguous()], weight=[1.0, 1.0], nuslerp_flatten=False,
                nuslerp_row_wise=True)
    assert torch.allclose(out, torch.tensor([[H, H], [0.0, 3.0]]).T)


def test_one_dimensional_tensor_is_one_vector_in_every_mode(merge):
    v0, v1 = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 5.0])
    for flatten, row_wise in [(True, False), (False, False), (False, True)]:
        out = merge("nuslerp", [v0, v1], weight=[1.0, 1.0], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
        assert torch.allclose(out, H * (v0 + v1))


def test_zero_vector_falls_back_to_lerp(merge):
    out = merge("nuslerp", [torch.zeros(2), torch.tensor([1.0, 2.0])], weight=[3.0, 1.0])
    assert torch.allclose(out, torch.tensor([0.25, 0.5]))


def test_antiparallel_falls_back_to_lerp(merge):
    out = merge("nuslerp", [torch.tensor([1.0, 2.0]), torch.tensor([-3.0, -6.0])], weight=[1.0, 1.0])
    assert torch.allclose(out, torch.tensor([-1.0, -2.0]))


def test_needs_two_models():
    with pytest.raises(UserError, match="exactly two"):
        get_method("nuslerp").fn([torch.ones(2)], None, weight=[1.0])


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_streamed_blocks_equal_the_whole_tensor(merge, streamed, flatten, row_wise, with_base):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 5, generator=g) for _ in range(2)]
    base = torch.randn(7, 5, generator=g) if with_base else None
    params = dict(weight=[0.3, 0.9], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    whole = merge("nuslerp", xs, base, **params)
    for rows in (1, 3, 7):
        assert torch.allclose(streamed("nuslerp", xs, base, rows, **params), whole, atol=1e-6)
