"""The fused CPU loops give the torch formulas' results to the bit."""

import pytest
import torch

from modelcypher.merging.methods import _kernels
from modelcypher.merging.registry import get_method

if _kernels.library() is None:  # an optional build: without a C compiler the torch formulas work alone
    pytest.skip("the compiled loops are not built", allow_module_level=True)


def _special(g: torch.Generator, shape, levels: int = 5) -> torch.Tensor:
    """Values on a coarse grid (many equal magnitudes, so cuts fall inside ties), plus NaN, infinities,
    signed zeros, a subnormal and a large value."""
    t = torch.randint(-levels, levels + 1, shape, generator=g).float() / 8
    flat = t.view(-1)
    flat[:6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-40, 3e38])
    return t[torch.randperm(t.shape[0], generator=g)]


def _both(fn):
    """``fn()`` with the fused loops, then with the torch formulas."""
    assert _kernels.usable(torch.zeros(1))
    fused = fn()
    real = _kernels.usable
    try:
        _kernels.usable = lambda *ts: False
        plain = fn()
    finally:
        _kernels.usable = real
    return fused, plain


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("weights", [[1.0, 0.5, 2.0], [1.0, -1.0, 0.5], [0.0, 1.0, 1.0], [0.3, 0.9]])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_disjoint_merge(weights, normalize, with_base):
    from modelcypher.merging.methods._consensus import disjoint_merge_

    g = torch.Generator().manual_seed(len(weights) * 4 + 2 * normalize + with_base)
    cs = [_special(g, (23, 19)) * w for w in weights]  # contributions c_i = w_i d_i
    base = torch.randn(23, 19, generator=g) if with_base else None
    fused, plain = _both(lambda: disjoint_merge_([c.clone() for c in cs], weights, normalize, 0.7, base))
    assert _same_bits(fused, plain)


BF16 = torch.bfloat16
# (the models' dtype, the base's): the loops read bfloat16 blocks as stored, in any mix with float32
# (float16 blocks reach the torch formulas, which widen them)
DTYPES = [(torch.float32, torch.float32), (BF16, BF16), (BF16, torch.float32), (torch.float32, BF16),
          (torch.float16, torch.float16)]


@pytest.mark.parametrize("density", [0.0, 0.13, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rows", [1, 7, 41])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_ties_streamed(density, rows, dtypes):
    """Whole-tensor cuts over blocks of rows, equal magnitudes kept in flat order across blocks; raw
    bfloat16 blocks give the result of their float32 values."""
    from modelcypher.merging.methods.ties import ties_blocks

    g = torch.Generator().manual_seed(rows)
    base = torch.randn(41, 9, generator=g).to(dtypes[1])
    xs = [(base.float() + _special(g, (41, 9))).to(dtypes[0]) for _ in range(3)]

    def run(xs=xs, base=base):
        def passes():
            return (([x[a:a + rows] for x in xs], base[a:a + rows]) for a in range(0, 41, rows))

        return torch.cat(list(ties_blocks(passes, base.numel(), weight=[1.0, -0.6, 1.4],
                                          density=[density, 0.4, density], lambda_=0.7)))

    fused, plain = _both(run)
    assert _same_bits(fused, plain)
    widened, _ = _both(lambda: run([x.float() for x in xs], base.float()))
    assert _same_bits(fused, widened)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("dtype", [torch.float32, BF16, torch.float16])
def test_registered_methods(method, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    xs = [(base + 0.1 * torch.randn(64, 48, generator=g)).to(dtype) for _ in range(4)]
    base = base.to(dtype)
    fn = get_method(method).fn
    params = {"density": 0.4, "weight": [1.0, 0.5, 0.8, 1.2], "lambda_": 0.9}
    if get_method(method).random:
        fused, plain = _both(lambda: fn(xs, base, rng=torch.Generator().manual_seed(7), **params))
    else:
        fused, plain = _both(lambda: fn(xs, base, **params))
    assert _same_bits(fused, plain)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_dare_on_raw_blocks(density):
    """DARE's drop reads bfloat16 blocks as stored: the coins and the result of their float32 values."""
    from modelcypher.merging.methods._drop import dropped_contribution

    g = torch.Generator().manual_seed(5)
    base, x = torch.randn(33, 17, generator=g).to(BF16), torch.randn(33, 17, generator=g).to(BF16)
    raw, plain = _both(lambda: dropped_contribution(x, base, density, torch.Generator().manual_seed(1), 0.8))
    widened = dropped_contribution(x.float(), base.float(), density, torch.Generator().manual_seed(1), 0.8)
    assert raw.dtype == torch.float32 and _same_bits(raw, plain) and _same_bits(raw, widened)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_dare_ties_with_every_kind_of_density(dtype):
    """Densities 0 (nothing kept, no coins), 1 (everything, no coins) and between, special values."""
    from modelcypher.merging.methods._consensus import dropped_merge

    g = torch.Generator().manual_seed(11)
    base = torch.randn(37, 13, generator=g).to(dtype)
    xs = [(base.float() + _special(g, (37, 13))).to(dtype) for _ in range(4)]
    dens, w = [0.0, 0.45, 1.0, 0.7], [1.0, -0.5, 0.8, 1.3]
    fused, plain = _both(lambda: dropped_merge(xs, base, dens, torch.Generator().manual_seed(3), w, True, 0.9))
    assert _same_bits(fused, plain)


@pytest.mark.parametrize("width", [0, 1, 4095, 4096, 70_000, 2**31 - 1])
def test_select_rank_matches_a_sort(width):
    """The radix select over magnitude bits in [lo, lo + width]: one level (a narrow range) or three
    (the whole range), many duplicates, every rank from the top and the bottom."""
    g = torch.Generator().manual_seed(width)
    lo = 0 if width == 2**31 - 1 else 123_456
    v = (lo + torch.randint(0, width + 1, (5000,), generator=g, dtype=torch.int64)).to(torch.int32)
    v[:1000] = v[1000:2000]  # duplicates
    desc = v.sort(descending=True).values
    for r in (1, 2, 999, 2500, 4999, 5000):
        got = _kernels.select_rank(v.clone(), r, lo, lo + width)
        want = int(desc[r - 1])
        assert got == (want, int((v > want).sum()), int((v == want).sum())), r


@pytest.mark.parametrize("dtypes", DTYPES[:4], ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_window_loops_agree_with_the_torch_formula(dtypes):
    """Both loops of the counting pass (AVX-512 where the CPU has it, and the portable one) give what
    window_bits gives: the count above, and the window's entries in flat order (lengths off the
    16-entry steps, special values, equal magnitudes)."""
    from modelcypher.merging.methods._trim import magnitude_bits, window_bits

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4099, generator=g).to(dtypes[1])
    x = (base.float() + _special(g, (4099,))).to(dtypes[0])
    bits = magnitude_bits(x.float() - base.float())
    quarter = 0x3E800000  # the bits of 0.25, a magnitude many entries share
    for lo, hi in [(0, 0x7FFFFFFF), (int(bits.median()), int(bits.sort().values[3300])), (quarter, quarter)]:
        want = window_bits(bits, lo, hi)
        for loop in ("window", "window_portable"):
            above, inside = _kernels.window(x, base, lo, hi, loop=loop)
            assert above == want[0] and torch.equal(inside, want[1]), (lo, hi, loop)


def _load_in_a_process(env: dict, copy_to=None) -> str:
    """What :func:`_kernels.library` gives in a fresh process (with ``env``), from the installed package
    or from a copy of it in ``copy_to``."""
    import os
    import subprocess
    import sys

    code = "from modelcypher.merging.methods import _kernels as k\nprint(k.library() is not None)"
    if copy_to is not None:
        code = f"import sys; sys.path.insert(0, {str(copy_to)!r})\n" + code
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_turned_off_by_the_environment():
    assert _load_in_a_process({"MODELCYPHER_KERNELS": "torch"}) == "False"
    assert _load_in_a_process({"MODELCYPHER_KERNELS": ""}) == "True"


def test_a_library_built_from_another_source_is_not_used(tmp_path):
    """A stale build (the C source edited since) could take other arguments: the loader refuses it."""
    import shutil
    from pathlib import Path

    import modelcypher

    pkg = tmp_path / "modelcypher"
    shutil.copytree(Path(modelcypher.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    assert _load_in_a_process({}, copy_to=tmp_path) == "True"
    c = pkg / "merging" / "methods" / "_loops.c"
    c.write_text(c.read_text() + "\n/* edited */\n")
    assert _load_in_a_process({}, copy_to=tmp_path) == "False"
