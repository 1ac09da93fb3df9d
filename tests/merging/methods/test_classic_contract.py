"""Contract checks shared by the classic methods: registration metadata and input safety."""

import inspect
import re

import pytest
import torch

from modelcypher.merging.registry import get_method

CLASSIC = [
    "linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough", "dfs",
]


@pytest.mark.parametrize("name", CLASSIC)
def test_metadata(name):
    m = get_method(name)
    assert m.name == name
    assert len(m.paper) > 20 and re.search(r"\b(19|20)\d\d\b", m.paper)  # names a year
    assert m.fn.__doc__
    params = inspect.signature(m.fn).parameters
    assert ("rng" in params) == m.random
    for p in [*m.model_params, *m.global_params]:
        assert (p if p != "lambda" else "lambda_") in params


@pytest.mark.parametrize("name", CLASSIC)
def test_runs_on_random_tensors_without_touching_inputs(name, merge, gen):
    g = gen(123)
    base = torch.randn(4, 6, generator=g)
    m = get_method(name)
    k = m.max_models or 3
    xs = [base + 0.1 * torch.randn(4, 6, generator=g) for _ in range(k)]
    kw = {"t": 0.3} if name == "slerp" else {}
    if m.random:
        kw["rng"] = gen(0)
    if "density" in m.model_params:
        kw["density"] = [0.5] * k
    out = merge(name, xs, None if m.base == "none" else base, **kw)
    assert torch.isfinite(out).all()
