import torch

from modelcypher.merging.registry import get_method

BASE = torch.tensor([1.0, 1.0])
X1 = torch.tensor([2.0, 3.0])  # tau1 = [1, 2]
X2 = torch.tensor([0.0, 1.0])  # tau2 = [-1, 0]


def test_registration():
    m = get_method("task_arithmetic")
    assert m.base == "required"
    assert m.global_params == {"normalize": False, "lambda": 1.0, "int8_mask": False}
    assert "2212.04089" in m.paper


def test_default_adds_task_vectors(merge):
    # base + tau1 + tau2 = [1, 1] + [0, 2]
    assert torch.equal(merge("task_arithmetic", [X1, X2], BASE), torch.tensor([1.0, 3.0]))


def test_weights_and_lambda(merge):
    # 1*tau1 + 0.5*tau2 = [0.5, 2]; * 2 = [1, 4]; + base = [2, 5]
    out = merge("task_arithmetic", [X1, X2], BASE, weight=[1.0, 0.5], lambda_=2.0)
    assert torch.allclose(out, torch.tensor([2.0, 5.0]))


def test_normalize(merge):
    # [0.5, 2] / 1.5 = [1/3, 4/3]; * 2 = [2/3, 8/3]; + 1
    out = merge("task_arithmetic", [X1, X2], BASE, weight=[1.0, 0.5], lambda_=2.0, normalize=True)
    assert torch.allclose(out, torch.tensor([5.0 / 3.0, 11.0 / 3.0]))


def test_lambda_zero_is_base(merge):
    assert torch.equal(merge("task_arithmetic", [X1, X2], BASE, lambda_=0.0), BASE)
