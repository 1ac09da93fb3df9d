"""The fused CPU loops give the torch formulas' results to the bit."""

import pytest
import torch

from modelcypher.merging.methods import _kernels
from modelcypher.merging.registry import get_method

pytest.importorskip("numba")
_kernels.warm_up()  # synchronously: until it is done, usable() says no


def _special(g: torch.Generator, shape, levels: int = 5) -> torch.Tensor:
    """Values on a coarse grid (many equal magnitudes, so cuts fall inside ties), plus NaN, infinities,
    signed zeros, a subnormal and a large value."""
    t = torch.randint(-levels, levels + 1, shape, generator=g).float() / 8
    flat = t.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-40, 3e38])
    return t[torch.randperm(t.shape[0], generator=g)]


def _both(fn):
    """``fn()`` with the fused loops, then with the torch formulas."""
    assert _kernels.usable(torch.zeros(1))
    fused = fn()
    real = _kernels.usable
    try:
        _kernels.usable = lambda *ts: False
        plain = fn()
    finally:
        _kernels.usable = real
    return fused, plain


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("weights", [[1.0, 0.5, 2.0], [1.0, -1.0, 0.5], [0.0, 1.0, 1.0], [0.3, 0.9]])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_disjoint_merge(weights, normalize, with_base):
    from modelcypher.merging.methods._sparsify import disjoint_merge_

    g = torch.Generator().manual_seed(len(weights) * 4 + 2 * normalize + with_base)
    cs = [_special(g, (23, 19)) * w for w in weights]  # contributions c_i = w_i d_i
    base = torch.randn(23, 19, generator=g) if with_base else None
    fused, plain = _both(lambda: disjoint_merge_([c.clone() for c in cs], weights, normalize, 0.7, base))
    assert _same_bits(fused, plain)


@pytest.mark.parametrize("density", [0.0, 0.13, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rows", [1, 7, 41])
def test_ties_streamed(density, rows):
    """Whole-tensor cuts over blocks of rows, equal magnitudes kept in flat order across blocks."""
    from modelcypher.merging.methods.ties import ties_blocks

    g = torch.Generator().manual_seed(rows)
    base = torch.randn(41, 9, generator=g)
    xs = [base + _special(g, (41, 9)) for _ in range(3)]

    def run():
        def passes():
            return (([x[a:a + rows] for x in xs], base[a:a + rows]) for a in range(0, 41, rows))

        return torch.cat(list(ties_blocks(passes, base.numel(), weight=[1.0, -0.6, 1.4],
                                          density=[density, 0.4, density], lambda_=0.7)))

    fused, plain = _both(run)
    assert _same_bits(fused, plain)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_registered_methods(method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    xs = [base + 0.1 * torch.randn(64, 48, generator=g) for _ in range(4)]
    fn = get_method(method).fn
    params = {"density": 0.4, "weight": [1.0, 0.5, 0.8, 1.2], "lambda_": 0.9}
    if get_method(method).random:
        fused, plain = _both(lambda: fn(xs, base, rng=torch.Generator().manual_seed(7), **params))
    else:
        fused, plain = _both(lambda: fn(xs, base, **params))
    assert _same_bits(fused, plain)
