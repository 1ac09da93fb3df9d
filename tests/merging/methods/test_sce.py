import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
TAU1 = torch.tensor([1.0, -2.0, 0.0, 3.0])
TAU2 = torch.tensor([3.0, 1.0, 0.0, -1.0])
XS = [BASE + TAU1, BASE + TAU2]
# energies: mean(tau1^2) = 14/4 = 3.5, mean(tau2^2) = 11/4 = 2.75 -> weights 0.56, 0.44
# sums [4, -1, 0, 2] -> elected signs [+, -, + (a zero sum counts as +), +]
# entry 0: both agree -> 0.56 * 1 + 0.44 * 3 = 1.88; entry 1: tau1 alone -> -2;
# entry 2: zeros never agree -> 0; entry 3: tau1 alone -> 3


def test_registration():
    m = get_method("sce")
    assert m.base == "required"
    assert m.global_params == {"select_topk": 1.0, "int8_mask": False}


def test_calculate_and_erase(merge):
    out = merge("sce", XS, BASE)
    assert torch.allclose(out, BASE + torch.tensor([1.88, -2.0, 0.0, 3.0]))


def test_select_keeps_the_highest_variance_entries(merge):
    # variances over the two models: [1, 2.25, 0, 4]; 3 nonzero; 0.7 * 3 -> 2 kept: entries 3 and 1
    # tau1 -> [0, -2, 0, 3], tau2 -> [0, 1, 0, -1]; signs [-, +] elected: tau1 alone at both
    out = merge("sce", XS, BASE, select_topk=0.7)
    assert torch.allclose(out, BASE + torch.tensor([0.0, -2.0, 0.0, 3.0]))
    # 0.5 * 3 -> 1 kept: entry 3 only
    assert torch.allclose(merge("sce", XS, BASE, select_topk=0.5), BASE + torch.tensor([0.0, 0.0, 0.0, 3.0]))
    # nothing kept: the base
    assert torch.equal(merge("sce", XS, BASE, select_topk=0.0), BASE)


def test_weights_follow_energy_at_any_scale(merge):
    # the same task vectors scaled by 1e-4 (energies ~1e-8): the same weights, the result scaled alike
    out = merge("sce", [1e-4 * TAU1, 1e-4 * TAU2], torch.zeros(4))
    assert torch.allclose(out, 1e-4 * torch.tensor([1.88, -2.0, 0.0, 3.0]), atol=1e-10, rtol=1e-5)


def test_zero_sum_elects_the_positive_sign(merge):
    out = merge("sce", [BASE + 1.0, BASE - 1.0], BASE)
    assert torch.allclose(out, BASE + 1.0)


def test_no_change_gives_the_base(merge):
    assert torch.equal(merge("sce", [BASE.clone(), BASE.clone()], BASE), BASE)


def test_select_topk_out_of_range_is_refused():
    with pytest.raises(UserError, match="select_topk"):
        get_method("sce").fn(XS, BASE, select_topk=1.5)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_streamed_blocks_equal_the_whole_tensor(merge, streamed, select_topk):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 250, generator=g)  # over the 65536 entries sampled to place the cut
    xs = [base + torch.randn(300, 250, generator=g) for _ in range(3)]
    whole = merge("sce", xs, base, select_topk=select_topk)
    kept = (whole != base).sum()
    assert int(kept) <= int(select_topk * base.numel()) + 1
    for rows in (7, 300):
        got = streamed("sce", xs, base, rows, select_topk=select_topk, int8_mask=False)
        assert torch.allclose(got, whole, atol=1e-6)


def test_equal_variances_are_selected_in_flat_order(merge, streamed):
    # every entry has variance 1: the 0.5 * 8 = 4 selected are the first four; each sums to 0, so +
    # is elected and the first model's 1 is taken there
    base = torch.zeros(4, 2)
    xs = [torch.ones(4, 2), -torch.ones(4, 2)]
    expected = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    assert torch.equal(merge("sce", xs, base, select_topk=0.5), expected)
    assert torch.equal(streamed("sce", xs, base, 1, select_topk=0.5, int8_mask=False), expected)
