import torch

from modelcypher.merging.registry import get_method

BASE = torch.zeros(4)
# counts of updating models [2, 1, 1, 1]: model 1 shares 1 entry and alone updates 2 -> rho 1/2;
# model 2 shares 1 and alone updates 1 -> rho 1
XS = [torch.tensor([1.0, 2.0, 4.0, 0.0]), torch.tensor([3.0, 0.0, 0.0, 5.0])]


def test_registration():
    m = get_method("ramplus_tl")
    assert m.base == "required" and m.global_params == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}


def test_unique_updates_boosted_by_the_overlap_ratio(merge):
    # r = 0.5, alpha = 1: lambda = 1 + 0.5 * [0.5, 1] = [1.25, 1.5]; the shared entry 0 averaged
    out = merge("ramplus_tl", XS, BASE, r=0.5, alpha=1.0)
    assert torch.allclose(out, torch.tensor([2.0, 2.5, 5.0, 7.5]))


def test_ratio_clamped_to_alpha(merge):
    # defaults r = 0.1, alpha = 0.2: both ratios clamp to 0.2 -> lambda 1.02
    out = merge("ramplus_tl", XS, BASE)
    assert torch.allclose(out, torch.tensor([2.0, 2.04, 4.08, 5.1]))


def test_r_zero_is_ram(merge):
    assert torch.equal(merge("ramplus_tl", XS, BASE, r=0.0), merge("ram", XS, BASE))


def test_no_unique_updates(merge):
    # all shared: rho = shared / epsilon, clamped; nothing to boost, the mean everywhere
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    assert torch.allclose(merge("ramplus_tl", xs, torch.zeros(2), r=0.5, alpha=1.0), torch.tensor([2.0, 3.0]))


def test_streamed_blocks_equal_the_whole_tensor(merge, streamed):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    xs = [base + torch.randn(7, 5, generator=g) * (torch.rand(7, 5, generator=g) > 0.5) for _ in range(3)]
    params = dict(r=0.5, alpha=1.0, epsilon=1e-5)
    whole = merge("ramplus_tl", xs, base, **params)
    for rows in (1, 3):
        assert torch.allclose(streamed("ramplus_tl", xs, base, rows, **params), whole)
