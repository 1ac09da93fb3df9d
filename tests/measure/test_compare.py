"""`compare` on real checkpoints: a model against itself under a hidden rotation, a depth-upscaled copy
made by our own passthrough merge, models of two families with different tokenizers, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cross_models as cm
from cli_util import run_cli, write_config
from modelcypher.errors import UserError
from modelcypher.measure.compare import compare_models


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a = cm.llama(root / "a", seed=0, layers=4)
    return root, cm.folded(a, root / "a-folded")


def test_a_model_against_its_rotated_copy_has_cka_one_on_the_diagonal_and_the_identity_correspondence(base):
    root, a = base
    b = cm.rotated(a, root / "a-rotated", seed=3)
    rep = compare_models(a, b, cm.probe_text(2000), device="cpu")
    cka = np.array(rep["matrices"]["cka"])
    assert np.allclose(np.diag(cka), 1.0, atol=1e-6)
    assert [(p["a"], p["b"]) for p in rep["correspondence"]] == [(i, i) for i in range(5)]
    # The embeddings of a repeated word are equal: ties in its neighbourhood; after a block, none.
    assert np.allclose(np.diag(np.array(rep["matrices"]["mutual_knn"]))[1:], 1.0)
    assert np.diag(np.array(rep["matrices"]["gw_diagonal"]))[1:].min() > 0.99
    assert rep["repeats"] == {}


def test_a_depth_upscaled_model_has_its_repeats_found(base):
    root, a = base
    cfg = write_config(root / "up.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(a), "layer_range": [1, 4]}]}]})
    assert run_cli("merge", cfg, "-o", root / "up").returncode == 0
    (root / "up" / "tokenizer.json").exists() or cm.tokenizer().save_pretrained(root / "up")
    rep = compare_models(a, root / "up", cm.probe_text(2000), device="cpu")
    assert rep["layers"] == [5, 7]
    assert rep["block_source"] == [0, 1, 2, 1, 2, 3]
    assert rep["repeats"] == {"1": [1, 3], "2": [2, 4]}
    corr = [p["a"] for p in rep["correspondence"]]
    assert corr == sorted(corr) and corr[0] == 0 and corr[-1] == 4


def test_cli_compares_two_families_with_different_widths_and_writes_json_and_heatmaps(base, tmp_path):
    root, a = base
    g = cm.gpt2(root / "gpt2", hidden=48, layers=2)
    r = run_cli("compare", a, g, "--json", tmp_path / "maps.json", "--plot", tmp_path / "maps", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "maps.json").read_text())
    assert rep["widths"] == [32, 48] and rep["layers"] == [5, 3] and rep["anchors"] >= 1000
    assert np.array(rep["matrices"]["cka"]).shape == (5, 3)
    assert "layer B -> layer A" in r.stdout
    assert {p.name for p in (tmp_path / "maps").iterdir()} >= {"cka.png", "mutual_knn.png", "jaccard.png",
                                                                  "gw_diagonal.png"}


def test_too_little_probe_text_is_one_line_saying_how_much_is_needed(base, tmp_path):
    _, a = base
    with pytest.raises(UserError, match="at least 32 are needed"):
        compare_models(a, a, "only a few words here", device="cpu")
    (tmp_path / "p.txt").write_text("too short")
    r = run_cli("compare", a, a, "--probes", tmp_path / "p.txt", "--json", tmp_path / "x.json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "at least 32" in r.stderr
    assert not (tmp_path / "x.json").exists()
