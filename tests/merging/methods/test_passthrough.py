import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method


def test_registration():
    m = get_method("passthrough")
    assert m.base == "none" and m.min_models == 1 and m.max_models == 1


def test_copies_the_model(merge):
    x = torch.tensor([[1.5, -2.0, 3.0]])
    out = merge("passthrough", [x])
    assert torch.equal(out, x)
    out[0, 0] = 99.0
    assert x[0, 0] == 1.5


def test_exactly_one_model(merge):
    with pytest.raises(UserError):
        merge("passthrough", [torch.zeros(2), torch.ones(2)])


def test_scale_multiplies_the_copy(merge):
    x = torch.tensor([[1.5, -2.0, 3.0]])
    assert torch.equal(merge("passthrough", [x], scale=[0.5]), torch.tensor([[0.75, -1.0, 1.5]]))
    assert torch.equal(x, torch.tensor([[1.5, -2.0, 3.0]]))  # the input untouched
