import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import get_method

X1 = torch.tensor([[1.0, 2.0], [-1.0, 0.0]])
X2 = torch.tensor([[3.0, 6.0], [1.0, 4.0]])


def test_registration():
    m = get_method("linear")
    assert m.base == "none"
    assert m.model_params == {"weight": 1.0}
    assert m.global_params == {"normalize": True}
    assert "2203.05482" in m.paper


def test_default_is_plain_mean(merge):
    out = merge("linear", [X1, X2])
    assert torch.equal(out, torch.tensor([[2.0, 4.0], [0.0, 2.0]]))


def test_weighted_normalized(merge):
    # (1*X1 + 3*X2) / 4
    out = merge("linear", [X1, X2], weight=[1.0, 3.0])
    assert torch.allclose(out, torch.tensor([[2.5, 5.0], [0.5, 3.0]]))


def test_weighted_not_normalized(merge):
    # 1*X1 + 3*X2
    out = merge("linear", [X1, X2], weight=[1.0, 3.0], normalize=False)
    assert torch.allclose(out, torch.tensor([[10.0, 20.0], [2.0, 12.0]]))


def test_single_model_is_identity(merge):
    assert torch.equal(merge("linear", [X1], weight=[0.3]), X1)


def test_zero_weight_sum_rejected(merge):
    with pytest.raises(UserError):
        merge("linear", [X1, X2], weight=[1.0, -1.0])


def test_wrong_number_of_weights(merge):
    with pytest.raises(UserError):
        merge("linear", [X1, X2], weight=[1.0])


def test_shape_mismatch_rejected(merge):
    with pytest.raises(UserError):
        merge("linear", [X1, torch.ones(2)])
