"""``extract-lora``: truncated SVD per module, written as an adapter ``peft`` loads."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import modelcypher
from checkpoints import build, load, save
from cli_util import run_cli, snapshot
from modelcypher.adapters.low_rank import low_rank_factors
from modelcypher.errors import UserError

IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 77, 3]])


def test_low_rank_factors_truncate_the_svd():
    """diag(3, 2, 1) at rank 2: B A = diag(3, 2, 0), energy kept (9 + 4) / 14."""
    d = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    a, b, kept = low_rank_factors(d, 2)
    assert a.shape == (2, 3) and b.shape == (3, 2)
    torch.testing.assert_close(b @ a, torch.diag(torch.tensor([3.0, 2.0, 0.0])), rtol=0, atol=1e-6)
    assert kept == pytest.approx(13 / 14)
    # the two factors carry the singular values evenly
    torch.testing.assert_close(a.norm(dim=1), b.norm(dim=0))


def test_sv_epsilon_cuts_the_rank_relative_to_the_largest_value():
    d = torch.diag(torch.tensor([10.0, 5.0, 0.5, 0.01]))
    assert low_rank_factors(d, 4, sv_epsilon=0.04)[0].shape[0] == 3  # 0.5 > 0.04 * 10: kept
    assert low_rank_factors(d, 4, sv_epsilon=0.06)[0].shape[0] == 2  # 0.5 <= 0.06 * 10: cut
    assert low_rank_factors(d, 1, sv_epsilon=0.001)[0].shape[0] == 1  # --rank bounds it first
    assert low_rank_factors(d, 4, sv_epsilon=1e-4)[0].shape[0] == 4
    a, b, kept = low_rank_factors(torch.zeros(3, 4), 2)
    assert kept == 1.0 and torch.equal(b @ a, torch.zeros(3, 4))


def _rank_r_finetune(family: str, r: int, seed: int = 5, heads: bool = True) -> torch.nn.Module:
    """The base plus an update of rank exactly r on every weight matrix (and, when ``heads``, a dense
    change to the embeddings and head)."""
    model = build(family)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2:
                continue
            if "embed" in name or "wte" in name or "wpe" in name or "lm_head" in name:
                if heads:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
                continue
            u, v = torch.randn(p.shape[0], r, generator=g), torch.randn(r, p.shape[1], generator=g)
            p.add_(u @ v * 0.05)
    return model


@pytest.mark.parametrize("family,heads", [("llama", True), ("gpt2", False), ("gpt2", True)])
def test_extracted_adapter_of_rank_r_finetune_reproduces_its_logits(tmp_path, family, heads):
    """GPT-2 ties its head to the embedding: the head gets the embedding's new rows too."""
    base_dir = save(build(family), tmp_path / "base")
    ft_dir = save(_rank_r_finetune(family, 3, heads=heads), tmp_path / "ft")
    before = snapshot(base_dir, ft_dir)
    rep = modelcypher.extract_lora(ft_dir, base_dir, tmp_path / "ad", rank=3)
    assert snapshot(base_dir, ft_dir) == before  # inputs untouched
    assert all(m.rank == 3 and m.kept == pytest.approx(1.0, abs=1e-6) for m in rep.modules.values())
    assert len(rep.modules) == {"llama": 3 * 7, "gpt2": 2 * 4}[family]
    model = peft.PeftModel.from_pretrained(load(base_dir, family), tmp_path / "ad").eval()
    with torch.no_grad():
        got, want = model(IDS).logits, load(ft_dir, family)(IDS).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    saved = json.loads((tmp_path / "ad" / "extract_report.json").read_text())
    assert set(saved["modules"]) == set(rep.modules)
    if heads and family == "llama":
        assert sorted(saved["modules_to_save"]) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_tied_embedding_factored_with_embed_lora_reproduces_logits(tmp_path):
    """--embed-lora on GPT-2 (tied head): the embedding and its head carry the same low-rank update."""
    base = build("gpt2")
    base_dir = save(base, tmp_path / "base")
    ft = _rank_r_finetune("gpt2", 2, heads=False)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        wte = ft.transformer.wte.weight
        wte.add_(torch.randn(wte.shape[0], 2, generator=g) @ torch.randn(2, wte.shape[1], generator=g) * 0.05)
    ft_dir = save(ft, tmp_path / "ft")
    rep = modelcypher.extract_lora(ft_dir, base_dir, tmp_path / "ad", rank=2, embed_lora=True)
    assert {"transformer.wte", "lm_head"} <= set(rep.modules)
    model = peft.PeftModel.from_pretrained(load(base_dir, "gpt2"), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, load(ft_dir, "gpt2")(IDS).logits, rtol=1e-4, atol=1e-4)
    # read back as base+adapter, the head's copy of the update is dropped: the embedding's stands for both
    from modelcypher.checkpoint.adapted import AdaptedCheckpoint

    ck = AdaptedCheckpoint(base_dir, tmp_path / "ad")
    torch.testing.assert_close(ck.get("transformer.wte.weight"), ft.transformer.wte.weight, rtol=1e-4, atol=1e-5)


def test_embed_lora_and_lower_rank_keep_less_energy(tmp_path):
    """--embed-lora factors the embeddings and head; a rank below the update's keeps the top singular
    values' share, and peft's merged weights equal the extracted factors' product."""
    base_dir = save(build("llama"), tmp_path / "base")
    ft_dir = save(_rank_r_finetune("llama", 4), tmp_path / "ft")
    rep = modelcypher.extract_lora(ft_dir, base_dir, tmp_path / "ad", rank=2, embed_lora=True)
    assert "model.embed_tokens" in rep.modules and "lm_head" in rep.modules and not rep.modules_to_save
    assert all(0 < m.kept < 1 for m in rep.modules.values())
    merged = peft.PeftModel.from_pretrained(load(base_dir, "llama"), tmp_path / "ad").merge_and_unload().state_dict()
    from modelcypher.checkpoint import Checkpoint

    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        delta = ft.get(name) - base.get(name)
        a, b, _ = low_rank_factors(delta, 2)
        torch.testing.assert_close(merged[name] - base.get(name), b @ a, rtol=1e-4, atol=1e-5, msg=name)


def test_extract_lora_cli_and_bad_inputs(tmp_path):
    base_dir = save(build("llama"), tmp_path / "base")
    ft_dir = save(_rank_r_finetune("llama", 2), tmp_path / "ft")
    gpt2 = save(build("gpt2"), tmp_path / "gpt2")
    wide = save(build("llama", vocab_size=101), tmp_path / "wide")
    r = run_cli("extract-lora", ft_dir, "--base", base_dir, "-o", tmp_path / "ad", "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert "kept 1.0000" in r.stdout and (tmp_path / "ad" / "adapter_model.safetensors").is_file()
    for args, words in [(["--rank", "0"], "--rank: 0: must be at least 1"), (["--base", gpt2], "differ in family"),
                        (["--base", wide], "has shape"), (["--base", tmp_path / "nope"], "no such model")]:
        argv = [ft_dir, "--base", base_dir, "-o", tmp_path / "bad", *args]
        r = run_cli("extract-lora", *argv)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="same weights"):
        modelcypher.extract_lora(base_dir, base_dir, tmp_path / "same")
    assert not (tmp_path / "same").exists() and not list(tmp_path.glob(".*factors*"))
