import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method

BASE = torch.tensor([1.0, 1.0])
# tau1 = [1, 0], tau2 = [1, sqrt 3]: 60 degrees apart, cos = 1/2, different norms
X1 = torch.tensor([2.0, 1.0])
X2 = torch.tensor([2.0, 1.0 + 3.0**0.5])


def test_registration():
    m = get_method("model_stock")
    assert m.base == "required" and m.min_models == 2
    assert m.model_params == {"weight": 1.0} and m.global_params == {"filter_wise": False}
    assert "2403.19522" in m.paper


def test_two_models_sixty_degrees(merge):
    # t = 2 * 0.5 / (1 + 0.5) = 2/3; mean = [2, 1.8660254]; result = 2/3 mean + 1/3 base
    out = merge("model_stock", [X1, X2], BASE)
    assert torch.allclose(out, torch.tensor([5.0 / 3.0, 1.5773503]))


def test_three_models(merge):
    # pairwise cosines of [1,0,0], [0,1,0], [1,1,0]/.. : 0, 1/sqrt2, 1/sqrt2 -> mean c = sqrt2/3
    base = torch.zeros(3)
    xs = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([2.0, 2.0, 0.0])]
    c = 2.0**0.5 / 3.0
    t = 3 * c / (1 + 2 * c)  # = 0.6785983
    out = merge("model_stock", xs, base)
    assert torch.allclose(out, torch.tensor([t * 1.0, t * 1.0, 0.0]))  # mean = [1, 1, 0]


def test_filter_wise(merge):
    base = torch.zeros(2, 2)
    xs = [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    # per row: row 0 orthogonal -> t = 0 -> base row; row 1 identical -> t = 1 -> mean row
    out = merge("model_stock", xs, base, filter_wise=True)
    assert torch.allclose(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    # whole tensor: cos = 1 / (sqrt2 sqrt2) = 1/2 -> t = 2/3; mean = [[.5,.5],[1,0]]
    out = merge("model_stock", xs, base)
    assert torch.allclose(out, torch.tensor([[1.0 / 3.0, 1.0 / 3.0], [2.0 / 3.0, 0.0]]))


def test_degenerate_cases_give_base(merge):
    # cos = -1 for two models: 1 + cos = 0, t has no finite value -> base; a zero delta has no angle -> base
    assert torch.equal(merge("model_stock", [BASE + 1.0, BASE - 2.0], BASE), BASE)
    assert torch.equal(merge("model_stock", [BASE.clone(), X1], BASE), BASE)
    assert torch.equal(merge("model_stock", [BASE.clone(), BASE.clone()], BASE), BASE)


def test_needs_two_models(merge):
    with pytest.raises(UserError):
        merge("model_stock", [X1], BASE)
