"""The CUDA path: every method merges on the GPU to what it computes on the CPU (skipped without CUDA).

Random methods draw their masks from a generator on the tensor's device, so CPU and CUDA masks differ;
for them the CUDA merge must be reproducible from its seed and keep the CPU merge's statistics.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import char_gpt2_set, family_set, state
from modelcypher.api import merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# method: (per-model parameters, global parameters)
WEIGHT_METHODS = {
    "linear": ({"weight": 1.0}, {}), "task_arithmetic": ({"weight": 1.0}, {"lambda": 0.8}),
    "ties": ({"weight": 1.0, "density": 0.4}, {}), "breadcrumbs": ({"weight": 1.0, "density": 0.5}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.5}, {}), "model_stock": ({}, {}), "dfs": ({}, {}),
    "tsv": ({}, {"lambda": 1.0}), "wudi": ({}, {"lambda": 1.0}), "iso_c": ({}, {"lambda": 1.0}),
}
RANDOM_METHODS = {m: ({"weight": 1.0, "density": 0.5}, {}) for m in ("dare_linear", "dare_ties", "della")}


@pytest.fixture(scope="module")
def llama_set(tmp_path_factory):
    return family_set(tmp_path_factory.mktemp("cuda"), "llama", 3)


def _config(method, params, base, fts):
    per_model, glob = params
    models = [{"model": str(p), "parameters": dict(per_model)} for p in fts]
    return {"merge_method": method, "base_model": str(base), "models": models, "parameters": glob}


def _merge(cfg, out, device, seed=0):
    merge(cfg, out, device=device, random_seed=seed)
    return state(out)


@pytest.mark.parametrize("method", sorted(WEIGHT_METHODS))
def test_cuda_merge_equals_cpu_merge(llama_set, tmp_path, method):
    base, *fts = llama_set
    cfg = _config(method, WEIGHT_METHODS[method], base, fts)
    cpu, gpu = _merge(cfg, tmp_path / "cpu", "cpu"), _merge(cfg, tmp_path / "gpu", "cuda")
    assert set(cpu) == set(gpu)
    for n in cpu:  # float32 arithmetic in another order (and WUDI's Adam steps): round-off only
        torch.testing.assert_close(gpu[n], cpu[n], atol=2e-4, rtol=1e-3, msg=f"{method}: {n}")


def test_slerp_on_cuda_equals_cpu(llama_set, tmp_path):
    _, a, b, _ = llama_set
    cfg = {"merge_method": "slerp", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
           "parameters": {"t": [0.2, 0.7]}}
    cpu, gpu = _merge(cfg, tmp_path / "cpu", "cpu"), _merge(cfg, tmp_path / "gpu", "cuda")
    for n in cpu:
        torch.testing.assert_close(gpu[n], cpu[n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(RANDOM_METHODS))
def test_random_methods_on_cuda_are_seeded_and_unbiased(llama_set, tmp_path, method):
    base, *fts = llama_set
    cfg = _config(method, RANDOM_METHODS[method], base, fts)
    a, b = _merge(cfg, tmp_path / "a", "cuda", seed=7), _merge(cfg, tmp_path / "b", "cuda", seed=7)
    c = _merge(cfg, tmp_path / "c", "cuda", seed=8)
    cpu = _merge(cfg, tmp_path / "cpu", "cpu", seed=7)
    name = "model.layers.1.mlp.down_proj.weight"
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed, same merge
    assert not torch.equal(a[name], c[name])  # another seed, other masks
    s0 = state(base)
    d_gpu, d_cpu = a[name] - s0[name], cpu[name] - s0[name]
    # Same drop rate and rescaling: the merged deltas' scale agrees within sampling noise.
    assert abs(float(d_gpu.norm() / d_cpu.norm()) - 1) < 0.1


def test_data_methods_on_cuda_equal_cpu(tmp_path):
    paths = char_gpt2_set(tmp_path)
    for method in ("regmean", "fisher", "null_space"):
        cfg = {"merge_method": method, "base_model": str(paths[0]),
               "models": [{"model": str(paths[1]), "parameters": {"data": str(tmp_path / "comedy.txt")}},
                          {"model": str(paths[2]), "parameters": {"data": str(tmp_path / "tragedy.txt")}}]}
        cpu = _merge(cfg, tmp_path / f"{method}-cpu", "cpu")
        gpu = _merge(cfg, tmp_path / f"{method}-gpu", "cuda")
        for n in cpu:  # statistics from forward/backward passes on each device: round-off only
            torch.testing.assert_close(gpu[n], cpu[n], atol=1e-3, rtol=1e-2, msg=f"{method}: {n}")
