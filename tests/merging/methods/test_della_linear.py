import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods._drop import magprune_keep_prob
from modelcypher.merging.registry import get_method

ROW = torch.tensor([0.1, -0.4, 0.3, 0.2, -0.5])
# density .5, epsilon .2: 5 ranks spaced over [0.3, 0.7]; |.| ranks 0.5>0.4>0.3>0.2>0.1
P = torch.tensor([0.3, 0.6, 0.5, 0.4, 0.7])


def test_registration():
    m = get_method("della_linear")
    assert m.base == "required" and m.random
    assert m.model_params == {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    assert m.global_params == {"normalize": False, "lambda": 1.0, "rescale": True, "int8_mask": False}
    assert "2406.11617" in m.paper


def test_keep_probabilities_ranked_per_row():
    assert torch.allclose(magprune_keep_prob(ROW, 0.5, 0.2), P)
    two_rows = torch.tensor([[1.0, 2.0, 3.0], [30.0, -20.0, 10.0]])
    assert torch.allclose(magprune_keep_prob(two_rows, 0.5, 0.1),
                          torch.tensor([[0.4, 0.5, 0.6], [0.6, 0.5, 0.4]]))
    # equal magnitudes: the smaller index ranks higher
    assert torch.allclose(magprune_keep_prob(torch.tensor([[2.0, -2.0, 1.0]]), 0.5, 0.1),
                          torch.tensor([[0.6, 0.5, 0.4]]))


def test_keep_probabilities_stay_in_unit_interval():
    # epsilon is capped at min(density, 1 - density): [0.9, 1.0] instead of [0.85, 1.05]
    assert torch.allclose(magprune_keep_prob(torch.tensor([1.0, 2.0, 3.0]), 0.95, 0.1),
                          torch.tensor([0.9, 0.95, 1.0]))
    p = magprune_keep_prob(torch.randn(7, 33), 0.02, 0.5)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert torch.allclose(p.mean(dim=1), torch.full((7,), 0.02))


def test_empirical_keep_rate_and_expectation(merge, gen):
    n = 20000
    tau = ROW.expand(n, 5)  # every row identical -> column j has keep probability P[j]
    out = merge("della_linear", [tau], torch.zeros(n, 5), rng=gen(0), density=[0.5], epsilon=[0.2])
    kept = out != 0
    assert torch.allclose(kept.float().mean(dim=0), P, atol=0.02)
    # survivors are rescaled by 1/p: tau_j / P_j
    assert torch.allclose(out[kept], (ROW / P).expand(n, 5)[kept])
    assert torch.allclose(out.mean(dim=0), ROW, atol=0.015)


def test_density_one_is_task_arithmetic_and_seeded(merge, gen):
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    xs = [base + torch.tensor([[1.0, -1.0], [0.5, 2.0]]), base + torch.tensor([[2.0, 1.0], [-1.0, 1.0]])]
    out = merge("della_linear", xs, base, rng=gen(0), weight=[1.0, 0.5])
    assert torch.equal(out, merge("task_arithmetic", xs, base, weight=[1.0, 0.5]))
    kw = {"density": [0.5, 0.5], "epsilon": [0.3, 0.3]}
    a = merge("della_linear", xs, base, rng=gen(5), **kw)
    assert torch.equal(a, merge("della_linear", xs, base, rng=gen(5), **kw))
    assert any(not torch.equal(a, merge("della_linear", xs, base, rng=gen(s), **kw)) for s in range(6, 10))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_epsilon_reaching_outside_the_unit_interval_is_refused(merge, gen, method):
    """density +- epsilon must lie inside (0, 1), as in mergekit: 0.66 + 0.35 is not."""
    with pytest.raises(UserError, match="epsilon"):
        merge(method, [torch.ones(4, 3)], torch.zeros(4, 3), rng=gen(0), density=[0.66], epsilon=[0.35])
