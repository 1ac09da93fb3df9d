"""distill: task arithmetic with per-unit coefficients, fitted by distilling each model into the merge."""

from __future__ import annotations

import copy

import torch
import transformers as tf

from modelcypher.merging.registry import get_method
from modelcypher.merging.statistics import distilled_coefficients, linear_layouts, unit_axis


def test_merge_is_base_plus_coefficients_times_task_vectors_per_unit():
    fn = get_method("distill").fn
    base = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    x1, x2 = base + 1.0, base - torch.tensor([[2.0, 0.0, 4.0], [0.0, 2.0, 2.0]])
    c1, c2 = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [0.25]])  # one per row
    want = torch.tensor([[1 + 0.5 - 2, 2 + 0.5, 3 + 0.5 - 4], [4 + 2, 5 + 2 - 0.5, 6 + 2 - 0.5]])
    torch.testing.assert_close(fn([x1, x2], base, distill=[c1, c2]), want)
    # without coefficients (a tensor the fit did not cover): task arithmetic with lambda = init
    torch.testing.assert_close(fn([x1, x2], base, distill=None, init=0.5), base + 0.5 * ((x1 - base) + (x2 - base)))


def test_units_are_rows_of_linear_and_columns_of_conv1d():
    assert unit_axis("a.weight", (4, 3), {"a.weight": "linear"}) == 0
    assert unit_axis("a.weight", (3, 4), {"a.weight": "conv1d"}) == 1
    assert unit_axis("emb.weight", (10, 4), {}) == 1 and unit_axis("b", (4,), {}) == 0
    assert unit_axis("conv", (2, 3, 4), {}) is None


def tiny_gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=23, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()


def task_setup(n_models: int):
    base_model = tiny_gpt2(0)
    base = {n: p.detach().float() for n, p in base_model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    tvs = [{n: 0.05 * torch.randn(p.shape, generator=g) for n, p in base.items()} for _ in range(n_models)]
    batches = [[torch.randint(0, 23, (4, 12), generator=g) for _ in range(3)] for _ in range(n_models)]
    return base_model, base, tvs, batches


def kl(model, base, tvs, coef, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for tv, bs in zip(tvs, batches, strict=True):
            for ids in bs:
                teacher = {n: base[n] + tv[n] for n in base}
                t = torch.log_softmax(torch.func.functional_call(model, teacher, (ids,)).logits, -1)
                m = {n: base[n] + sum(c[n] * v[n] for c, v in zip(coef, tvs, strict=True)) for n in base}
                s = torch.log_softmax(torch.func.functional_call(model, m, (ids,)).logits, -1)
                total += float((t.exp() * (t - s)).sum(-1).mean())
    return total


def test_one_model_is_pulled_toward_its_own_task_vector():
    """With one model the teacher is base + tau itself: from a shrunk start the coefficients climb
    toward 1 (the zero of the KL), and the module's own parameters are never changed."""
    model, base, tvs, batches = task_setup(1)
    before = copy.deepcopy(model.state_dict())
    start = [{n: torch.full((1,) * v.dim(), 0.2) for n, v in base.items()}]
    coef = distilled_coefficients(model, base, tvs, batches, steps=30, lr=0.05, init=0.2)
    moved = torch.cat([c.flatten() for c in coef[0].values()])
    assert float(moved.mean()) > 0.3  # up from 0.2, toward 1
    assert kl(model, base, tvs, coef, batches) < 0.5 * kl(model, base, tvs, start, batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_fit_lowers_the_distillation_loss_and_shapes_follow_the_units():
    model, base, tvs, batches = task_setup(3)
    start = [{n: torch.ones([s if a == unit_axis(n, tuple(v.shape), linear_layouts(model)) else 1
                             for a, s in enumerate(v.shape)]) for n, v in base.items()} for _ in tvs]
    coef = distilled_coefficients(model, base, tvs, batches, steps=40, lr=0.02, init=1.0)
    assert [list(c) for c in coef] == [list(base)] * 3
    for c, s in zip(coef, start, strict=True):
        assert all(c[n].shape == s[n].shape for n in base)
    n = "transformer.h.0.mlp.c_fc.weight"  # Conv1D [in, out]: one coefficient per output column
    assert coef[0][n].shape == (1, base[n].shape[1])
    assert kl(model, base, tvs, coef, batches) < 0.8 * kl(model, base, tvs, start, batches)
