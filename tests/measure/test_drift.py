"""`drift`: zero for a model against itself, the KL it reports is the KL of the two models' logits, a
PEFT adapter is read and its update measured, tasks are parsed, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import cross_models as cm
from cli_util import run_cli
from modelcypher.errors import UserError
from modelcypher.measure.drift import drift, read_task


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    base = cm.llama(root / "base", seed=0)
    model = get_peft_model(cm.load(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.save_pretrained(root / "adapter")
    (root / "control.txt").write_text(cm.probe_text(1500, "tragedy"))
    return root, base, root / "adapter"


def test_a_model_against_itself_has_no_drift(pair):
    root, base, _ = pair
    rep = drift(base, base, (root / "control.txt").read_text(), device="cpu")
    assert rep["probabilities"]["kl"] == pytest.approx(0, abs=1e-12) and rep["probabilities"]["top1_agreement"] == 1
    assert all(v == pytest.approx(1, abs=1e-9) for v in rep["representations"]["cka"])
    assert rep["weights"] == []


def test_adapter_drift_is_the_kl_of_the_logits_and_its_update_is_measured(pair, tmp_path):
    root, base, adapter = pair
    text = (root / "control.txt").read_text()
    rep = drift(base, adapter, text, device="cpu")
    from peft import PeftModel

    b = cm.load(base)
    c = PeftModel.from_pretrained(cm.load(base), adapter).eval()
    ids = torch.tensor([cm.tokenizer()(text, add_special_tokens=False)["input_ids"][:128]])
    with torch.no_grad():
        lp, lq = F.log_softmax(b(ids).logits.double(), -1), F.log_softmax(c(ids).logits.double(), -1)
    want = float((lp.exp() * (lp - lq)).sum(-1).mean())
    assert rep["probabilities"]["kl"] == pytest.approx(want, rel=0.05) and want > 1e-4  # same text, windows of 128
    changed = {w["tensor"] for w in rep["weights"]}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")}
    assert all(0 <= w["subspace_overlap"] <= 1 and w["stable_rank"] <= 4 + 1e-6 for w in rep["weights"])
    r = run_cli("drift", base, adapter, "--data", root / "control.txt", "--json", tmp_path / "d.json",
                "--plot", tmp_path / "d.png", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "d.json").read_text())
    assert saved["probabilities"]["kl"] == pytest.approx(rep["probabilities"]["kl"])
    assert (tmp_path / "d.png").stat().st_size > 0 and "KL" in r.stdout


def test_task_files_and_bad_input(pair, tmp_path):
    root, base, _ = pair
    (tmp_path / "t.txt").write_text("rev[abc]cba\nsay hi\thello\n\n")
    assert read_task(tmp_path / "t.txt") == [("rev[abc]", "cba"), ("say hi", "hello")]
    rep = drift(base, base, (root / "control.txt").read_text(), read_task(tmp_path / "t.txt"), device="cpu")
    t = rep["probabilities"]["task"]
    assert t["exact_match_base"] == t["exact_match_changed"] and t["examples"] == 2
    (tmp_path / "bad.txt").write_text("no answer here\n")
    with pytest.raises(UserError, match="bad.txt:1"):
        read_task(tmp_path / "bad.txt")
    with pytest.raises(UserError, match="at least 32"):
        drift(base, base, "a few words", device="cpu")
