import torch

from modelcypher.merging.registry import get_method

BASE = torch.zeros(2, 2)
XS = [torch.tensor([[1.0, -2.0], [3.0, 1.0]]), torch.tensor([[3.0, 1.0], [-1.0, 2.0]])]


def test_registration():
    m = get_method("della")
    assert m.base == "required" and m.random
    assert m.model_params == {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    assert m.global_params == {"normalize": True, "lambda": 1.0, "rescale": True, "int8_mask": False}
    assert "2406.11617" in m.paper


def test_density_one_is_ties(merge, gen):
    # sum [[4,-1],[2,3]]: (0,0) both -> 2, (0,1) only -2, (1,0) only 3, (1,1) both -> 1.5; lambda 2
    out = merge("della", XS, BASE, rng=gen(0), lambda_=2.0)
    assert torch.allclose(out, torch.tensor([[4.0, -4.0], [6.0, 3.0]]))
    assert torch.equal(out, merge("ties", XS, BASE, lambda_=2.0))


def test_single_model_survivors_rescaled_per_rank(merge, gen):
    # one row [1, -2] at density .5, epsilon .2: keep probabilities [0.3, 0.7]
    x = torch.tensor([1.0, -2.0])
    outs = {tuple(merge("della", [x], torch.zeros(2), rng=gen(s), density=[0.5], epsilon=[0.2]).tolist())
            for s in range(40)}
    allowed = {0.0, 1.0 / 0.3}, {0.0, -2.0 / 0.7}
    for o in outs:
        assert any(abs(o[0] - a) < 1e-5 for a in allowed[0])
        assert any(abs(o[1] - a) < 1e-5 for a in allowed[1])
    assert len(outs) > 1
