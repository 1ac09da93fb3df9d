import torch

from modelcypher.merging.registry import REQUIRED, get_method

A = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0])
B = torch.tensor([0.05, -0.2, 1.0, 1.0, 1.9])


def test_registration():
    m = get_method("nearswap")
    assert m.base == "required" and m.min_models == 1 and m.max_models == 1 and m.rowwise
    assert m.global_params == {"t": REQUIRED}


def test_swaps_where_near_and_moves_by_t_elsewhere(merge):
    # |a - b| = .05, .2, 1, 0, .1 against t = 0.1: swap entries 0, 3, 4; move entries 1, 2 by 0.1 toward b
    out = merge("nearswap", [B], A, t=0.1)
    assert torch.allclose(out, torch.tensor([0.05, -0.1, 0.1, 1.0, 1.9]))
    assert torch.allclose(out, A + (B - A).clamp(-0.1, 0.1))


def test_swaps_exactly_where_the_difference_is_below_t(merge):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    out = merge("nearswap", [b], a, t=0.5)
    near = (a - b).abs() < 0.5
    assert torch.allclose(out[near], b[near])
    assert torch.allclose((out - a).abs()[~near], torch.full(((~near).sum(),), 0.5))


def test_zero_t_returns_the_base(merge):
    assert torch.equal(merge("nearswap", [B], A, t=0.0), A)


def test_differences_below_the_floor_interpolate(merge):
    # |a - b| = 5e-7 < 1e-6: w = t / 1e-6 = 0.1
    out = merge("nearswap", [torch.tensor([5e-7])], torch.tensor([0.0]), t=1e-7)
    assert torch.allclose(out, torch.tensor([5e-8]))
