import torch

from modelcypher.merging.registry import get_method

# 2x3 example, 3 models, density 2/3 (keep 4 of 6 entries per model), weights [1, 1, 0.5].
BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 1.0]])
TAU2 = torch.tensor([[-2.0, 2.0, 1.0], [0.5, -3.0, -6.0]])
TAU3 = torch.tensor([[1.0, 4.0, -2.0], [-1.0, 0.5, 3.0]])
XS = [BASE + TAU1, BASE + TAU2, BASE + TAU3]
W = [1.0, 1.0, 0.5]
D = [2.0 / 3.0] * 3
# Trim (ties in magnitude -> smaller flat index kept):
#   tau1 |.| = 3 1 .5 / 2 4 1 -> keep 4,3,2 and the first 1 (index 1): [[3,-1,0],[2,-4,0]]
#   tau2 |.| = 2 2 1 / .5 3 6 -> keep 6,3,2,2:                         [[-2,2,0],[0,-3,-6]]
#   tau3 |.| = 1 4 2 / 1 .5 3 -> keep 4,3,2 and the first 1 (index 0): [[1,4,-2],[0,0,3]]
# Weighted c_i: c1 = [[3,-1,0],[2,-4,0]], c2 = [[-2,2,0],[0,-3,-6]], c3 = [[.5,2,-1],[0,0,1.5]]
# Sum = [[1.5,3,-1],[2,-7,-4.5]] -> elected signs [[+,+,-],[+,-,-]]
# Agreeing: (0,0) c1,c3: 3.5/1.5   (0,1) c2,c3: 4/1.5   (0,2) c3: -1/0.5
#           (1,0) c1: 2/1          (1,1) c1,c2: -7/2    (1,2) c2: -6/1   (c3's 1.5 disagrees)
NUM = torch.tensor([[3.5, 4.0, -1.0], [2.0, -7.0, -6.0]])
MEAN = torch.tensor([[3.5 / 1.5, 4.0 / 1.5, -2.0], [2.0, -3.5, -6.0]])


def test_registration():
    m = get_method("ties")
    assert m.base == "required"
    assert m.model_params == {"weight": 1.0, "density": 1.0}
    assert m.global_params == {"normalize": True, "lambda": 1.0}
    assert "2306.01708" in m.paper


def test_trim_elect_disjoint_mean(merge):
    out = merge("ties", XS, BASE, weight=W, density=D)
    expected = torch.tensor([[1.0 + 7.0 / 3.0, 2.0 + 8.0 / 3.0, 1.0], [6.0, 1.5, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out, BASE + MEAN, atol=1e-6)


def test_not_normalized_and_lambda(merge):
    out = merge("ties", XS, BASE, weight=W, density=D, normalize=False, lambda_=0.5)
    assert torch.allclose(out, torch.tensor([[2.75, 4.0, 2.5], [5.0, 1.5, 3.0]]), atol=1e-6)
    assert torch.allclose(out, BASE + 0.5 * NUM, atol=1e-6)


def test_density_one_no_conflict_is_mean(merge):
    # all deltas positive -> every model agrees everywhere -> plain (weighted) mean of the deltas
    base = torch.zeros(2, 2)
    xs = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0, 2.0], [1.0, 0.5]])]
    out = merge("ties", xs, base, weight=[1.0, 3.0])
    assert torch.allclose(out, torch.tensor([[2.5, 2.0], [1.5, 1.375]]))


def test_exact_tie_elects_nothing(merge):
    base = torch.zeros(1)
    out = merge("ties", [torch.tensor([1.0]), torch.tensor([-1.0])], base)
    assert torch.equal(out, torch.zeros(1))


def test_density_zero_is_base(merge):
    assert torch.equal(merge("ties", XS, BASE, density=[0.0, 0.0, 0.0]), BASE)
