"""The main job end to end: `modelcypher demo --quick` trains, merges through the public API, reports."""

import math

from cli_util import run_cli


def test_demo_quick_trains_merges_and_prints_the_table(tmp_path):
    r = run_cli("demo", "--quick", "--workdir", tmp_path / "demo", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line.split()[-3:] for line in r.stdout.splitlines()
            if line.startswith(("base", "fine-tune", "merge:"))}
    assert {"base", "fine-tune comedy", "fine-tune tragedy", "merge: ties", "merge: slerp"} <= set(rows)
    assert all(math.isfinite(float(v)) for vals in rows.values() for v in vals)
    # the geometry: two models from different seeds, their barrier raw and aligned, merged both ways
    assert "loss barrier between them: raw" in r.stdout and "after data-free weight matching" in r.stdout
    assert "plain average" in r.stdout and "merge of the aligned pair" in r.stdout
    assert (tmp_path / "demo" / "barrier.png").is_file()
    assert (tmp_path / "demo" / "merged-seeds-aligned" / "model.safetensors").is_file()
    for method in ("linear", "ties", "dare_ties", "model_stock"):
        assert (tmp_path / "demo" / f"merged-{method}" / "model.safetensors").is_file()
        assert (tmp_path / "demo" / f"merged-{method}" / "tokenizer.json").is_file()
