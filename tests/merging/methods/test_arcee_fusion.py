import torch

from modelcypher.merging.methods.arcee_fusion import importance
from modelcypher.merging.registry import get_method


def test_registration():
    m = get_method("arcee_fusion")
    assert m.base == "required" and m.min_models == 1 and m.max_models == 1
    assert m.model_params == {} and m.global_params == {}


def test_keeps_only_outliers_of_importance(merge):
    # one row: its divergence K > 0 is shared, so importance = K |x - b| = K [1..7, 100]; sorted
    # quartiles (indices floor(q * 7) = 1, 3, 5): 2K, 4K, 6K -> threshold 4K + 1.5 * 4K = 10K: only 100
    base = torch.zeros(8)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0])
    out = merge("arcee_fusion", [x], base)
    assert torch.equal(out, torch.tensor([0.0] * 7 + [100.0]))


def test_importance_is_change_times_row_divergence():
    b = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.softmax(torch.tensor([1.0, 0.0]), 0) + 1e-8
    q = torch.tensor([0.5, 0.5]) + 1e-8
    kl = float((p * (p / q).log()).sum())
    imp = importance(x, b)
    assert torch.allclose(imp, torch.tensor([[kl, 0.0], [0.0, 0.0]]))


def test_each_entry_is_the_model_or_the_base_by_the_tukey_rule(merge):
    g = torch.Generator().manual_seed(0)
    b = torch.randn(16, 12, generator=g)
    x = b + 0.1 * torch.randn(16, 12, generator=g) * torch.rand(16, 1, generator=g) * 5
    out = merge("arcee_fusion", [x], b)
    imp = importance(x, b).reshape(-1).sort().values
    n = imp.numel()
    q1, q2, q3 = (imp[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    take = importance(x, b) >= q2 + 1.5 * (q3 - q1)
    assert 0 < int(take.sum()) < n
    assert torch.equal(out, torch.where(take, x, b))


def test_streamed_blocks_equal_the_whole_tensor(merge, streamed):
    g = torch.Generator().manual_seed(1)
    # (400, 300): over the 65536 entries sampled to place the quartiles; tiny ones: the lower quartile is the
    # smallest entry
    for shape in [(400, 300), (40, 30), (3, 1), (1, 4), (9, 2)]:
        b = torch.randn(shape, generator=g)
        x = b + torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g)
        whole = merge("arcee_fusion", [x], b)
        imp = importance(x, b).reshape(-1).sort().values
        n = imp.numel()
        q1, q2, q3 = (imp[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
        assert torch.equal(whole, torch.where(importance(x, b) >= q2 + 1.5 * (q3 - q1), x, b))
        for rows in (1, 7):
            assert torch.equal(streamed("arcee_fusion", [x], b, rows), whole)
