import math

import pytest
import torch

from modelcypher.errors import UserError
from modelcypher.merging.registry import REQUIRED, get_method

BASE = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
OTHER = torch.tensor([[-1.0, 0.5], [2.0, -3.0]])


def test_registration():
    m = get_method("slerp")
    assert m.base == "required" and m.min_models == 1 and m.max_models == 1
    assert m.global_params["t"] is REQUIRED
    assert m.global_params["DOT_THRESHOLD"] == 1.0 - 1e-6


def test_endpoints_are_exact(merge):
    assert torch.equal(merge("slerp", [OTHER], BASE, t=0.0), BASE)
    assert torch.equal(merge("slerp", [OTHER], BASE, t=1.0), OTHER)


def test_orthogonal_equal_norm_keeps_norm(merge):
    v0 = torch.tensor([3.0, 4.0, 0.0])
    v1 = torch.tensor([0.0, 0.0, 5.0])
    out = merge("slerp", [v1], v0, t=0.5)
    # theta = pi/2: both weights sin(pi/4) = sqrt(2)/2
    h = math.sqrt(2.0) / 2.0
    assert torch.allclose(out, torch.tensor([3.0 * h, 4.0 * h, 5.0 * h]))
    assert math.isclose(float(out.norm()), 5.0, rel_tol=1e-6)  # lerp would give 5/sqrt(2)


def test_orthogonal_one_third(merge):
    # theta = pi/2, t = 1/3: weights sin(pi/3), sin(pi/6)
    out = merge("slerp", [torch.tensor([0.0, 1.0])], torch.tensor([1.0, 0.0]), t=1.0 / 3.0)
    assert torch.allclose(out, torch.tensor([math.sqrt(3.0) / 2.0, 0.5]))


def test_interpolates_original_vectors_not_unit_ones(merge):
    # angle from normalized copies (pi/2), weights applied to the original [2, 0] and [0, 1]
    out = merge("slerp", [torch.tensor([0.0, 1.0])], torch.tensor([2.0, 0.0]), t=0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(2.0), math.sqrt(2.0) / 2.0]))


def test_colinear_equals_lerp(merge):
    out = merge("slerp", [torch.tensor([2.0, 4.0, 6.0])], torch.tensor([1.0, 2.0, 3.0]), t=0.25)
    assert torch.allclose(out, torch.tensor([1.25, 2.5, 3.75]))


def test_antiparallel_equals_lerp(merge):
    out = merge("slerp", [torch.tensor([-2.0, -4.0])], torch.tensor([1.0, 2.0]), t=0.5)
    assert torch.allclose(out, torch.tensor([-0.5, -1.0]))


def test_zero_norm_equals_lerp(merge):
    out = merge("slerp", [torch.tensor([1.0, 2.0])], torch.zeros(2), t=0.5)
    assert torch.allclose(out, torch.tensor([0.5, 1.0]))


def test_dot_threshold_parameter(merge):
    # 45 degrees: slerp by default, lerp when the threshold is below cos 45 = 0.707
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(merge("slerp", [v1], v0, t=0.5, DOT_THRESHOLD=0.5), torch.tensor([1.0, 0.5]))
    # slerp: theta = pi/4, weights sin(pi/8)/sin(pi/4) = 0.5411961 on both
    assert torch.allclose(merge("slerp", [v1], v0, t=0.5), torch.tensor([1.0823922, 0.5411961]))


def test_needs_one_other_model(merge):
    with pytest.raises(UserError):
        merge("slerp", [OTHER, OTHER], BASE, t=0.5)


@pytest.mark.parametrize("case", ["random", "colinear", "zero"])
def test_streamed_blocks_equal_the_whole_tensor(merge, case):
    """The runner's block-by-block slerp (norms and dot summed over a first pass) gives the whole-tensor
    result, on every row blocking, in both the slerp and the lerp-fallback regimes."""
    from modelcypher.merging.methods.slerp import slerp_blocks

    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(37, 11, generator=g)
    v1 = {"random": torch.randn(37, 11, generator=g), "colinear": 2 * v0, "zero": torch.zeros(37, 11)}[case]
    whole = merge("slerp", [v1], v0, t=0.3)
    for rows in (1, 4, 36, 37):
        cuts = range(0, 37, rows)

        def passes(rows=rows, cuts=cuts):
            return (([v1[a:a + rows]], v0[a:a + rows]) for a in cuts)

        got = torch.cat(list(slerp_blocks(passes, v0.numel(), t=0.3)))
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("theta", [2e-3, 5e-2])
def test_small_angle_from_float32_sums(merge, theta):
    """Small angles (2e-3 rad is just above the lerp threshold) between float32 vectors of different
    norms: the result matches slerp computed in float64 to float32 precision."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4096, generator=g, dtype=torch.float64)
    w = torch.randn(4096, generator=g, dtype=torch.float64)
    w -= (w @ a) / (a @ a) * a
    w *= a.norm() / w.norm()
    t = 0.3
    v0, v1 = a, 1.5 * (a * math.cos(theta) + w * math.sin(theta))
    want = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
    got = merge("slerp", [v1.float()], v0.float(), t=t).double()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    if theta > 1e-2:  # here slerp and lerp differ by far more than the error
        lerp = (1 - t) * v0 + t * v1
        assert (lerp - want).abs().max() > 100 * (got - want).abs().max()
