import torch

from modelcypher.merging.registry import get_method

TAU = torch.tensor([1.0, -9.0, 5.0, 3.0, -10.0, 2.0, 8.0, -4.0, 6.0, 7.0])
BASE = torch.arange(10, dtype=torch.float32)


def test_registration():
    m = get_method("breadcrumbs")
    assert m.base == "required" and not m.random
    assert m.model_params == {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    assert m.global_params == {"normalize": False, "lambda": 1.0, "int8_mask": False}
    assert "2312.06795" in m.paper


def test_mask_keeps_the_middle_band(merge):
    # magnitude ranks: 10 9 8 7 6 | 5 4 3 2 1; gamma 0.1 drops the top 1 (-10), density 0.5 keeps
    # the next 5 (-9, 8, 7, 6, 5), the 4 smallest are dropped.
    masked = torch.tensor([0.0, -9.0, 5.0, 0.0, 0.0, 0.0, 8.0, 0.0, 6.0, 7.0])
    out = merge("breadcrumbs", [BASE + TAU], BASE, density=[0.5], gamma=[0.1], weight=[2.0])
    assert torch.equal(out, torch.tensor([0.0, -17.0, 12.0, 3.0, 4.0, 5.0, 22.0, 7.0, 20.0, 23.0]))
    assert torch.equal(out, BASE + 2.0 * masked)


def test_default_gamma_drops_top_percent(merge):
    tau = torch.arange(1, 101, dtype=torch.float32)  # 100 entries: the top 1% is the single 100
    out = merge("breadcrumbs", [tau], torch.zeros(100), density=[0.99])  # density 1 (default) prunes nothing
    expected = tau.clone()
    expected[99] = 0.0
    assert torch.equal(out, expected)


def test_gamma_zero_is_magnitude_trim(merge):
    out = merge("breadcrumbs", [BASE + TAU], BASE, density=[0.3], gamma=[0.0])
    assert torch.equal(out - BASE, torch.tensor([0.0, -9.0, 0, 0, -10.0, 0, 8.0, 0, 0, 0]))


def test_weighted_sum_of_two_masked_models(merge):
    base = torch.zeros(4)
    xs = [torch.tensor([4.0, -3.0, 2.0, -1.0]), torch.tensor([-4.0, 1.0, 3.0, 2.0])]
    # gamma .25 drops each model's largest entry, density .5 keeps the next two:
    #   d1 = [0,-3,2,0], d2 = [0,0,3,2]; 1*d1 + 0.5*d2, lambda 2
    out = merge("breadcrumbs", xs, base, density=[0.5, 0.5], gamma=[0.25, 0.25], weight=[1.0, 0.5],
                lambda_=2.0)
    assert torch.equal(out, torch.tensor([0.0, -6.0, 7.0, 2.0]))
