import pytest
import torch

from modelcypher.merging.registry import get_method

# 2x3 example, 3 models, density 2/3 (keep 4 of 6 entries per model), weights [1, 1, 0.5].
BASE = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
TAU1 = torch.tensor([[3.0, -1.0, 0.5], [2.0, -4.0, 1.0]])
TAU2 = torch.tensor([[-2.0, 2.0, 1.0], [0.5, -3.0, -6.0]])
TAU3 = torch.tensor([[1.0, 4.0, -2.0], [-1.0, 0.5, 3.0]])
XS = [BASE + TAU1, BASE + TAU2, BASE + TAU3]
W = [1.0, 1.0, 0.5]
D = [2.0 / 3.0] * 3
# Trim (ties in magnitude -> smaller flat index kept):
#   tau1 |.| = 3 1 .5 / 2 4 1 -> keep 4,3,2 and the first 1 (index 1): [[3,-1,0],[2,-4,0]]
#   tau2 |.| = 2 2 1 / .5 3 6 -> keep 6,3,2,2:                         [[-2,2,0],[0,-3,-6]]
#   tau3 |.| = 1 4 2 / 1 .5 3 -> keep 4,3,2 and the first 1 (index 0): [[1,4,-2],[0,0,3]]
# Weighted c_i: c1 = [[3,-1,0],[2,-4,0]], c2 = [[-2,2,0],[0,-3,-6]], c3 = [[.5,2,-1],[0,0,1.5]]
# Sum = [[1.5,3,-1],[2,-7,-4.5]] -> elected signs [[+,+,-],[+,-,-]]
# Agreeing: (0,0) c1,c3: 3.5/1.5   (0,1) c2,c3: 4/1.5   (0,2) c3: -1/0.5
#           (1,0) c1: 2/1          (1,1) c1,c2: -7/2    (1,2) c2: -6/1   (c3's 1.5 disagrees)
NUM = torch.tensor([[3.5, 4.0, -1.0], [2.0, -7.0, -6.0]])
MEAN = torch.tensor([[3.5 / 1.5, 4.0 / 1.5, -2.0], [2.0, -3.5, -6.0]])


def test_registration():
    m = get_method("ties")
    assert m.base == "required"
    assert m.model_params == {"weight": 1.0, "density": 1.0}
    assert m.global_params == {"normalize": True, "lambda": 1.0, "int8_mask": False}
    assert "2306.01708" in m.paper


def test_trim_elect_disjoint_mean(merge):
    out = merge("ties", XS, BASE, weight=W, density=D)
    expected = torch.tensor([[1.0 + 7.0 / 3.0, 2.0 + 8.0 / 3.0, 1.0], [6.0, 1.5, 0.0]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out, BASE + MEAN, atol=1e-6)


def test_not_normalized_and_lambda(merge):
    out = merge("ties", XS, BASE, weight=W, density=D, normalize=False, lambda_=0.5)
    assert torch.allclose(out, torch.tensor([[2.75, 4.0, 2.5], [5.0, 1.5, 3.0]]), atol=1e-6)
    assert torch.allclose(out, BASE + 0.5 * NUM, atol=1e-6)


def test_density_one_no_conflict_is_mean(merge):
    # all deltas positive -> every model agrees everywhere -> plain (weighted) mean of the deltas
    base = torch.zeros(2, 2)
    xs = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[3.0, 2.0], [1.0, 0.5]])]
    out = merge("ties", xs, base, weight=[1.0, 3.0])
    assert torch.allclose(out, torch.tensor([[2.5, 2.0], [1.5, 1.375]]))


def test_exact_tie_elects_nothing(merge):
    base = torch.zeros(1)
    out = merge("ties", [torch.tensor([1.0]), torch.tensor([-1.0])], base)
    assert torch.equal(out, torch.zeros(1))


def test_density_zero_is_base(merge):
    assert torch.equal(merge("ties", XS, BASE, density=[0.0, 0.0, 0.0]), BASE)


def _quantized(g: torch.Generator, shape, levels: int = 7) -> torch.Tensor:
    """Random values on a coarse grid: many entries share a magnitude, so the cut falls inside ties."""
    return torch.randint(-levels, levels + 1, shape, generator=g).float() / 8


def _streamed(xs, base, rows_per_block, **params):
    """``ties_blocks`` fed blocks of ``rows_per_block`` rows, the blocks' results concatenated."""
    from modelcypher.merging.methods.ties import ties_blocks

    cuts = range(0, base.shape[0], rows_per_block)

    def passes():
        return (([x[a:a + rows_per_block] for x in xs], base[a:a + rows_per_block]) for a in cuts)

    return torch.cat(list(ties_blocks(passes, base.numel(), **params)))


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("with_base", [True, False])
def test_streamed_blocks_equal_the_whole_tensor(merge, density, with_base):
    """Blocks of rows, trimmed from streamed histograms, give exactly the whole-tensor result."""
    g = torch.Generator().manual_seed(int(density * 10) + with_base)
    base = torch.randn(37, 11, generator=g) if with_base else torch.zeros(37, 11)
    xs = [base + _quantized(g, (37, 11)) for _ in range(3)]
    params = {"weight": [1.0, 0.5, 2.0], "density": [density, density / 2, density]}
    whole = merge("ties", xs, base, **params)
    for rows in (1, 4, 36, 37):
        for normalize in (True, False):
            want = whole if normalize else merge("ties", xs, base, normalize=False, **params)
            got = _streamed(xs, base, rows, normalize=normalize, lambda_=1.0, **params)
            assert torch.equal(got, want), (rows, normalize)


@pytest.mark.parametrize("k", [0, 1, 5, 50, 199, 200, 407])
def test_top_k_cuts_match_a_stable_sort(k):
    """The streamed cut keeps the k largest magnitudes, equal magnitudes by smaller flat index."""
    from modelcypher.merging.methods._trim import cut_mask_, magnitude_bits, top_k_cuts

    g = torch.Generator().manual_seed(k)
    t = _quantized(g, (37, 11), levels=5)
    t[3, 4], t[7, 0] = float("inf"), -1e-30  # extremes of the float range
    order = torch.sort(t.abs().reshape(-1), descending=True, stable=True).indices
    want = torch.zeros(t.numel(), dtype=torch.bool)
    want[order[:k]] = True
    for rows in (1, 5, 37):
        blocks = [magnitude_bits(t[a:a + rows]) for a in range(0, 37, rows)]
        (cut,) = top_k_cuts(lambda blocks=blocks: ({0: b} for b in blocks), [k], t.numel())
        kept, seen = [], 0
        for b in blocks:
            inside, seen = cut_mask_(b.clone(), cut, seen)
            kept.append(inside == -1)
        assert torch.equal(torch.cat(kept).reshape(-1), want), rows


def _kept_by_cut(t, k, rows, high=None):
    """The entries the streamed cut keeps (flat bools), over blocks of ``rows`` rows."""
    from modelcypher.merging.methods import _trim as sp

    blocks = [sp.magnitude_bits(t[a:a + rows]) for a in range(0, t.shape[0], rows)]
    (cut,) = sp.top_k_cuts(lambda: ({0: b} for b in blocks), [k], t.numel(), high=high or sp.high_counts)
    kept, seen = [], 0
    for b in blocks:
        inside, seen = sp.cut_mask_(b.clone(), cut, seen)
        kept.append(inside == -1)
    return torch.cat(kept).reshape(-1)


def _stable_top_k(t, k):
    order = torch.sort(t.abs().reshape(-1), descending=True, stable=True).indices
    want = torch.zeros(t.numel(), dtype=torch.bool)
    want[order[:k]] = True
    return want


@pytest.mark.parametrize("k", [1, 300, 2048, 4000])
def test_sampled_window_finds_the_cut_in_two_passes(k, monkeypatch):
    """With a sample smaller than the tensor, the window around the sampled k-th holds the true k-th
    (no histogram pass), and the cut is exact, ties broken by flat order."""
    from modelcypher.merging.methods import _trim as sp

    monkeypatch.setattr(sp, "SAMPLE", 256)
    g = torch.Generator().manual_seed(k)
    t = torch.cat([torch.randn(64, 48, generator=g), _quantized(g, (32, 48), levels=9)])
    histograms = []
    kept = _kept_by_cut(t, k, rows=10, high=lambda b: histograms.append(1) or sp.high_counts(b))
    assert sp.sample_stride(t.numel()) > 1 and not histograms
    assert torch.equal(kept, _stable_top_k(t, k))


def test_a_window_that_misses_falls_back_to_histograms(monkeypatch):
    """A sample that misrepresents the tensor (every sampled entry large, all others small) places the
    window wrong; the histogram passes still give the exact cut."""
    from modelcypher.merging.methods import _trim as sp

    monkeypatch.setattr(sp, "SAMPLE", 64)
    t = torch.full((37, 11), 1e-3) * torch.arange(1, 408).reshape(37, 11) / 407
    stride = sp.sample_stride(t.numel())
    assert stride == 7
    t.view(-1)[::stride] = torch.arange(1, 60, dtype=torch.float32)
    histograms = []
    kept = _kept_by_cut(t, 200, rows=37, high=lambda b: histograms.append(1) or sp.high_counts(b))
    assert histograms and torch.equal(kept, _stable_top_k(t, 200))


def _where_consensus(deltas, weights, normalize):
    """TIES elect + disjoint merge written with boolean masks, as a reference."""
    cs = [d * w for d, w in zip(deltas, weights, strict=True)]
    total = sum(cs[1:], cs[0].clone())
    up, down = total > 0, total < 0
    num, den = torch.zeros_like(total), torch.zeros_like(total)
    for c, w in zip(cs, weights, strict=True):
        agree = torch.where(up, c > 0, down & (c < 0))
        num += torch.where(agree, c, 0.0)
        den += agree * w
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0) if normalize else num


@pytest.mark.parametrize("weights", [[1.0, 0.5, 2.0], [1.0, -1.0, 0.5], [0.0, 1.0, 1.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_float_agreement_matches_boolean_masks_bit_for_bit(weights, normalize):
    """The consensus built from float agreement factors equals the boolean-mask formula to the bit,
    zeros' signs, infinities and NaN included."""
    from modelcypher.merging.methods._consensus import sign_consensus

    g = torch.Generator().manual_seed(len(weights) + normalize)
    ds = [_quantized(g, (13, 17), levels=3) for _ in range(3)]
    ds[0][0, :3] = torch.tensor([float("nan"), float("inf"), -0.0])
    ds[1][0, 1] = float("-inf")
    got, want = sign_consensus(ds, weights, normalize), _where_consensus(ds, weights, normalize)
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert bool(same.all())
