"""Shared fixture: call a merge method through the registry and check the interface contract."""

from __future__ import annotations

import pytest
import torch

from modelcypher.merging.registry import get_method


def _call(name, xs, base=None, **params):
    """``get_method(name).fn(xs, base, **params)``, asserting inputs are untouched and the output is
    a new float32 tensor of the models' shape."""
    method = get_method(name)
    xs_before = [x.clone() for x in xs]
    base_before = None if base is None else base.clone()
    out = method.fn(list(xs), base, **params)
    for x, b in zip(xs, xs_before, strict=True):
        assert torch.equal(x, b), f"{name} modified an input model tensor"
    if base is not None:
        assert torch.equal(base, base_before), f"{name} modified the base tensor"
    assert out.dtype == torch.float32
    assert out.shape == xs[0].shape
    for t in [*xs, *([] if base is None else [base])]:
        assert out.data_ptr() != t.data_ptr(), f"{name} returned an input tensor instead of a new one"
    return out


@pytest.fixture
def merge():
    return _call


@pytest.fixture
def gen():
    """``gen(seed)``: a CPU ``torch.Generator`` seeded with ``seed``."""

    def make(seed: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(seed)
        return g

    return make


def _streamed(name, xs, base, rows, **params):
    """The method's ``stream`` fed blocks of ``rows`` rows (as the runner does), results concatenated."""
    method = get_method(name)
    n = xs[0].shape[0]

    def passes():
        for a in range(0, n, rows):
            yield [x[a:a + rows] for x in xs], None if base is None else base[a:a + rows]

    return torch.cat(list(method.stream(passes, xs[0].numel(), **params)))


@pytest.fixture
def streamed():
    return _streamed
