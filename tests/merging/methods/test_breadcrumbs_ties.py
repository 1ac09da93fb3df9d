import torch

from modelcypher.merging.registry import get_method

BASE = torch.zeros(4)
XS = [torch.tensor([4.0, -3.0, 2.0, -1.0]), torch.tensor([-4.0, 1.0, 3.0, 2.0])]
# gamma .25 / density .5 masks: d1 = [0,-3,2,0], d2 = [0,0,3,2]; sum [0,-3,5,2], signs [0,-,+,+]


def test_registration():
    m = get_method("breadcrumbs_ties")
    assert m.base == "required"
    assert m.model_params == {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    assert m.global_params == {"normalize": False, "lambda": 1.0, "int8_mask": False}
    assert "2312.06795" in m.paper and "2306.01708" in m.paper


def test_masks_then_disjoint_mean(merge):
    out = merge("breadcrumbs_ties", XS, BASE, density=[0.5, 0.5], gamma=[0.25, 0.25], normalize=True)
    # (0): nothing -> 0; (1): -3/1; (2): (2+3)/2; (3): 2/1
    assert torch.equal(out, torch.tensor([0.0, -3.0, 2.5, 2.0]))


def test_sign_conflict_drops_minority(merge):
    # unmasked (gamma 0, density 1): sum [0,-2,5,1]: (0) tie -> 0; (1) only -3; (2) both; (3) only 2
    out = merge("breadcrumbs_ties", XS, BASE, gamma=[0.0, 0.0], normalize=False)
    assert torch.equal(out, torch.tensor([0.0, -3.0, 5.0, 2.0]))
