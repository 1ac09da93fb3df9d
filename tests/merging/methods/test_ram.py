import torch

from modelcypher.merging.registry import get_method

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])


def test_registration():
    m = get_method("ram")
    assert m.base == "required" and m.global_params == {"epsilon": 1e-5} and m.stream is not None


def test_shared_updates_averaged_unique_kept_whole(merge):
    # entry 0 both (mean 2); entry 1 none; entry 2 model 1 alone (kept whole); entry 3 model 2 alone
    xs = [BASE + torch.tensor([1.0, 0.0, 2.0, 0.0]), BASE + torch.tensor([3.0, 0.0, 0.0, -4.0])]
    assert torch.allclose(merge("ram", xs, BASE), BASE + torch.tensor([2.0, 0.0, 2.0, -4.0]))


def test_updates_below_epsilon_do_not_count(merge):
    # entry 0: model 2's 0.3 is not an update -> model 1's 1 alone; entry 1: 0.3 alone is dropped
    xs = [BASE + torch.tensor([1.0, 0.0, 0.0, 0.0]), BASE + torch.tensor([0.3, 0.3, 0.0, 0.0])]
    assert torch.allclose(merge("ram", xs, BASE, epsilon=0.5), BASE + torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_streamed_blocks_equal_the_whole_tensor(merge, streamed):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 5, generator=g)
    xs = [base + torch.randn(7, 5, generator=g) * (torch.rand(7, 5, generator=g) > 0.5) for _ in range(3)]
    whole = merge("ram", xs, base, epsilon=1e-5)
    assert torch.equal(streamed("ram", xs, base, 2, epsilon=1e-5), whole)
