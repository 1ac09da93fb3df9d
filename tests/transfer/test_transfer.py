"""`transfer` moves a PEFT LoRA adapter across models. Exact case: B is A under a hidden symmetry (norms
folded, residual rotated, units and heads permuted, value/output and query/key bases rotated) and under
Qwen2's record; the moved adapter on B reproduces A-with-adapter's logits through transformers and peft.
Across families it writes an adapter peft loads; bad input is one line and writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import cross_models as cm
from cli_util import run_cli
from modelcypher.errors import UserError
from modelcypher.transfer.move import transfer_adapter


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    a = cm.llama(root / "a", seed=0)
    # factors of std 0.05: an update about the size of the weights (0.3 made the adapted model chaotic, softmax
    # saturated, so that float32 rounding decides its outputs)
    adapter = cm.lora(a, root / "adapter", cm.LLAMA_TARGETS, std=0.05)
    b = cm.as_qwen2(cm.rotated(a, root / "a-rotated", seed=7), root / "b-qwen2")
    (root / "probes.txt").write_text(cm.probe_text(3000))
    return root, a, adapter, b


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exact_case_reproduces_the_adapted_logits_on_a_hidden_symmetric_qwen2_copy(models, tmp_path):
    root, a, adapter, b = models
    rep = transfer_adapter(adapter, a, b, tmp_path / "moved", text=(root / "probes.txt").read_text(), device="cpu")
    assert [(c["block_a"], c["block_b"]) for c in rep["correspondence"]] == [(0, 0), (1, 1), (2, 2)]
    # the updates are fitted once more on float32 passes of both adapted models: exact up to their rounding
    assert len(rep["modules"]) == 21 and max(m["update_error"] for m in rep["modules"]) < 1e-4
    assert all(m["fit"] < 1e-6 for m in rep["maps"].values())
    assert (rep["update"], rep["gain"]) == ("fit", "projection")
    assert all(abs(g - 1) < 1e-4 for m in rep["modules"] for g in m["gain"])
    ids = torch.tensor([cm.tokenizer()(cm.probe_text(200, "tragedy"), add_special_tokens=False)["input_ids"]])
    want = logits(cm.with_adapter(a, adapter), ids)
    got = logits(cm.with_adapter(b, tmp_path / "moved"), ids)
    base = logits(cm.load(b), ids)
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-3
    assert (base - want).abs().max() / scale > 1e-2  # the adapter matters: the test can fail
    saved = json.loads((tmp_path / "moved" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and "model.layers.0.self_attn.q_proj" in saved["target_modules"]


def test_cli_with_word_anchors_state_pairing_no_gain_and_updates_through_the_maps_is_exact_too(models, tmp_path):
    root, a, adapter, b = models
    r = run_cli("transfer", adapter, "--from", a, "--to", b, "-o", tmp_path / "moved", "--probes",
                root / "probes.txt", "--anchors", "words", "--pairing", "states", "--gain", "none",
                "--update", "maps", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "moved" / "transfer_report.json").read_text())
    assert (rep["anchor_kind"], rep["pairing"], rep["gain"], rep["update"]) == ("words", "states", "none", "maps")
    assert all(g == 1.0 for m in rep["modules"] for g in m["gain"])
    assert max(m["update_error"] for m in rep["modules"]) < 1e-6  # no pass of an adapted model: exact
    ids = torch.tensor([cm.tokenizer()(cm.probe_text(200, "tragedy"), add_special_tokens=False)["input_ids"]])
    want = logits(cm.with_adapter(a, adapter), ids)
    got = logits(cm.with_adapter(b, tmp_path / "moved"), ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-3


def test_the_function_gain_is_one_and_exact_on_a_hidden_symmetric_copy(models, tmp_path):
    """``gain="function"``: A's adapter and the moved one move the last hidden states alike (through the
    map), so the one factor for the whole adapter is 1 and the logits are A-with-adapter's; the models the
    gain ran the adapters through are left as they were."""
    root, a, adapter, b = models
    rep = transfer_adapter(adapter, a, b, tmp_path / "moved", text=(root / "probes.txt").read_text(), gain="function",
                           device="cpu")
    assert rep["gain"] == "function" and rep["overall_gain"] == pytest.approx(1.0, abs=1e-5)
    ids = torch.tensor([cm.tokenizer()(cm.probe_text(200, "tragedy"), add_special_tokens=False)["input_ids"]])
    want = logits(cm.with_adapter(a, adapter), ids)
    got = logits(cm.with_adapter(b, tmp_path / "moved"), ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-3


def test_exact_case_on_a_wider_residual_stream(models, tmp_path):
    root, a, adapter, _ = models
    b = cm.lifted(cm.rotated(a, tmp_path / "rot", seed=11), tmp_path / "wide", 48)
    ids = torch.tensor([cm.tokenizer()(cm.probe_text(200, "tragedy"), add_special_tokens=False)["input_ids"]])
    assert torch.allclose(logits(cm.load(b), ids), logits(cm.load(a), ids), atol=1e-4)  # the lift is exact
    rep = transfer_adapter(adapter, a, b, tmp_path / "moved", text=(root / "probes.txt").read_text(), device="cpu")
    resid = [m for k, m in rep["maps"].items() if k.endswith(":resid_attn")]
    assert all(m["shape"] == [32, 48] and m["scale"] == pytest.approx(1.5**0.5) for m in resid)
    want = logits(cm.with_adapter(a, adapter), ids)
    got = logits(cm.with_adapter(b, tmp_path / "moved"), ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-3


def test_across_families_writes_an_adapter_peft_loads_for_b(models, tmp_path):
    root, a, adapter, _ = models
    g = cm.gpt2(root / "gpt2-b", hidden=48, layers=2)
    r = run_cli("transfer", adapter, "--from", a, "--to", g, "-o", tmp_path / "moved", "--probes",
                root / "probes.txt", "--rank", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "moved" / "transfer_report.json").read_text())
    gains = [g for m in rep["modules"] for g in m["gain"]]
    assert all(0 <= x < float("inf") for x in gains) and any(abs(x - 1) > 0.05 for x in gains)  # spaces fit in part
    assert {m["module"].split(".", 3)[3] for m in rep["modules"]} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj"}
    assert rep["rank"] == 3
    model = cm.with_adapter(g, tmp_path / "moved")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(logits(model, ids), logits(cm.load(g), ids))
    # --gain function: the same updates times one factor for the whole adapter
    r = run_cli("transfer", adapter, "--from", a, "--to", g, "-o", tmp_path / "moved-f", "--probes",
                root / "probes.txt", "--rank", "3", "--gain", "function", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rep_f = json.loads((tmp_path / "moved-f" / "transfer_report.json").read_text())
    k = rep_f["overall_gain"]
    assert 0 < k < float("inf") and k != 1.0 and rep["overall_gain"] == 1.0
    one, scaled = (cm.with_adapter(g, tmp_path / d) for d in ("moved", "moved-f"))
    for (n, p1), (_, p2) in zip(one.named_parameters(), scaled.named_parameters(), strict=True):
        if "lora_B" in n:
            assert torch.allclose(p2, k * p1, rtol=1e-5, atol=1e-7), n


def test_blocks_read_in_groups_within_a_memory_bound_give_the_same_adapter(models, tmp_path):
    """Under ``memory_gb`` too small for every block at once, each block of B is read in its own group (with
    the blocks of A paired with it): more passes, the same updates, maps and report."""
    root, a, adapter, _ = models
    g = cm.gpt2(root / "gpt2-groups", hidden=48, layers=2)
    text = (root / "probes.txt").read_text()
    whole = transfer_adapter(adapter, a, g, tmp_path / "whole", text=text, rank=3, device="cpu")
    grouped = transfer_adapter(adapter, a, g, tmp_path / "grouped", text=text, rank=3, device="cpu", memory_gb=1e-9)
    assert len(whole["block_groups"]) == 1 and len(grouped["block_groups"]) == 2
    assert sorted(i for grp in grouped["block_groups"] for i in grp["blocks_a"]) == [0, 1, 2]
    assert [grp["blocks_b"] for grp in grouped["block_groups"]] == [[0], [1]]
    assert whole["maps"].keys() == grouped["maps"].keys()
    for m, n in zip(whole["modules"], grouped["modules"], strict=True):
        assert m["module"] == n["module"] and m["update_error"] == pytest.approx(n["update_error"], rel=1e-6)
    one, two = (cm.with_adapter(g, tmp_path / d) for d in ("whole", "grouped"))
    lora = [(n, p1, p2) for (n, p1), (_, p2) in zip(one.named_parameters(), two.named_parameters(), strict=True)
            if "lora_" in n]
    assert lora and all(torch.allclose(p1, p2, rtol=1e-5, atol=1e-7) for _, p1, p2 in lora)


def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    root, a, adapter, b = models
    text = (root / "probes.txt").read_text()
    other = cm.llama(tmp_path / "wide", seed=1, hidden=48)
    with pytest.raises(UserError, match="which do not fit|has shape"):
        transfer_adapter(adapter, other, b, tmp_path / "o1", text=text, device="cpu")  # adapter for another base
    with pytest.raises(UserError, match="at least 64 words"):
        transfer_adapter(adapter, a, b, tmp_path / "o2", text=cm.probe_text(300), anchors="words", device="cpu")
    with pytest.raises(UserError, match="at least 32 are needed"):
        transfer_adapter(adapter, a, b, tmp_path / "o2", text="too short", device="cpu")
    with pytest.raises(UserError, match="not a PEFT adapter"):
        transfer_adapter(a, a, b, tmp_path / "o3", text=text, device="cpu")
    bert = tmp_path / "bert"
    shutil.copytree(a, bert)
    cfg = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3"}))
    with pytest.raises(UserError, match="no transfer record"):
        transfer_adapter(adapter, a, bert, tmp_path / "o4", text=text, device="cpu")
    r = run_cli("transfer", a, "--from", a, "--to", b, "-o", tmp_path / "o5")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("modelcypher: error:")
    with pytest.raises(UserError, match="--memory-gb 0: must be a positive number"):
        transfer_adapter(adapter, a, b, tmp_path / "o6", text=text, memory_gb=0, device="cpu")
    r = run_cli("transfer", adapter, "--from", a, "--to", b, "-o", tmp_path / "o7", "--memory-gb", "-1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["modelcypher: error: transfer: argument "
                                                                   "--memory-gb: -1: must be a positive number"]
    with pytest.raises(UserError, match="--refine -3: must be 0"):
        transfer_adapter(adapter, a, b, tmp_path / "o8", text=text, refine_steps=-3, device="cpu")
    r = run_cli("transfer", adapter, "--from", a, "--to", b, "-o", tmp_path / "o9", "--refine", "-2")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["modelcypher: error: transfer: argument "
                                                                   "--refine: -2: must be 0 or more"]
    assert not any(p.name.startswith(("o", ".o")) for p in tmp_path.iterdir())
