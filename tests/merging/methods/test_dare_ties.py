import torch

from modelcypher.merging.registry import get_method

BASE = torch.zeros(2, 2)
TAU1 = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
TAU2 = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
XS = [BASE + TAU1, BASE + TAU2]


def test_registration():
    m = get_method("dare_ties")
    assert m.base == "required" and m.random
    assert m.global_params == {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False}
    assert "2311.03099" in m.paper and "2306.01708" in m.paper


def test_density_one_is_ties(merge, gen):
    # sum = [[4,-1],[2,3]]: (0,0) both agree -> 2; (0,1) only tau1's -2; (1,0) only tau1's 3;
    # (1,1) both -> 1.5
    out = merge("dare_ties", XS, BASE, rng=gen(0), normalize=True)
    assert torch.allclose(out, torch.tensor([[2.0, -2.0], [3.0, 1.5]]))
    assert torch.equal(out, merge("ties", XS, BASE))


def test_seeded(merge, gen):
    kw = {"density": [0.5, 0.5]}
    a = merge("dare_ties", XS, BASE, rng=gen(1), **kw)
    b = merge("dare_ties", XS, BASE, rng=gen(1), **kw)
    others = [merge("dare_ties", XS, BASE, rng=gen(s), **kw) for s in range(2, 6)]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, o) for o in others)


def test_elects_on_rescaled_deltas(merge, gen):
    # one model at density 0.5: the survivors (all agree with themselves) are tau / 0.5, the mean
    # over the single agreeing model keeps that value
    out = merge("dare_ties", [XS[0]], BASE, rng=gen(4), density=[0.5])
    assert torch.all(torch.isclose(out, torch.zeros(())) | torch.isclose(out, 2.0 * TAU1))
