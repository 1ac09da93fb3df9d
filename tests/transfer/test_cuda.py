"""`transfer` on the GPU (skipped without CUDA): the moved adapter is the one the CPU moves (its logits on B
within float32 rounding), and `--refine` trains on the GPU and lowers its loss."""

from __future__ import annotations

import pytest
import torch

import cross_models as cm
from modelcypher.transfer.move import transfer_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer-cuda")
    a = cm.llama(root / "a", seed=0)
    adapter = cm.lora(a, root / "adapter", cm.LLAMA_TARGETS, std=0.05)
    return root, a, adapter, cm.gpt2(root / "b", hidden=48, layers=2), cm.probe_text(3000)


def test_transfer_on_cuda_moves_the_adapter_the_cpu_moves(models, tmp_path):
    _, a, adapter, b, text = models
    for dev in ("cpu", "cuda"):
        transfer_adapter(adapter, a, b, tmp_path / dev, text=text, rank=4, device=dev)
    ids = torch.tensor([cm.tokenizer()(cm.probe_text(120, "tragedy"), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        cpu, cuda = (cm.with_adapter(b, tmp_path / d)(input_ids=ids).logits for d in ("cpu", "cuda"))
        base = cm.load(b)(input_ids=ids).logits
    assert (cuda - cpu).abs().max() < 1e-3 * (cpu - base).abs().max()


def test_refinement_on_cuda_lowers_its_loss(models, tmp_path):
    _, a, adapter, b, text = models
    rep = transfer_adapter(adapter, a, b, tmp_path / "refined", text=text, rank=4, refine_steps=30, device="cuda")
    assert rep["refine"]["kept"] and rep["refine"]["kl_after"] < 0.9 * rep["refine"]["kl_before"]
