"""The data-free interference methods end to end: CLI merge of sharded bf16 Qwen2 checkpoints, the
result loaded and run by transformers, each tensor what the method computes on the inputs."""

from __future__ import annotations

import pytest
import torch

from checkpoints import family_set, load, state
from cli_util import run_cli, write_config
from modelcypher.merging.registry import get_method


@pytest.fixture(scope="module")
def qwen_set(tmp_path_factory):
    return family_set(tmp_path_factory.mktemp("interference"), "qwen2", 3, dtype=torch.bfloat16, shard="40KB")


@pytest.mark.parametrize("method,params", [("tsv", {"lambda": 1.2}), ("wudi", {"lambda": 1.0, "steps": 20}),
                                           ("iso_c", {"lambda": 1.3})])
def test_cli_merge_runs_and_computes_the_method(qwen_set, tmp_path, method, params):
    base, *fts = qwen_set
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(p)} for p in fts],
           "parameters": params, "dtype": "float32"}
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    merged, b, xs = state(tmp_path / "out"), state(base), [state(p) for p in fts]
    fn = get_method(method).fn
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.norm.weight"):
        want = fn([x[name] for x in xs], b[name], **kwargs)
        torch.testing.assert_close(merged[name], want, atol=1e-5, rtol=1e-5)
    model = load(tmp_path / "out", "qwen2")
    with torch.no_grad():
        logits = model(torch.arange(12).reshape(2, 6)).logits
    assert torch.isfinite(logits).all()
