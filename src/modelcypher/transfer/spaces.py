"""Where each adapted module of a family reads and writes, and the maps between two models' spaces.

A transformer block's linear modules read one of three spaces and write one of four: the residual
stream after the attention norm or the MLP norm (``resid_attn``, ``resid_mlp``), the attention output
(``attn``, what the output projection reads), the MLP's neurons (``mlp``) and the residual stream itself
(``resid``, what the output projections write), plus the query, key and value spaces (``q``, ``k``,
``v``). :data:`ROLES` names, per family, the module of each role; a family missing there cannot be
transferred to or from (one record per family, like ``arch.families``).

A map between two models' versions of a space is fitted on anchor activations ``x_a`` ``[n, d_a]`` and
``x_b`` ``[n, d_b]`` as ``x_b ~ c x_a T``: orthogonal Procrustes with a scale (``T`` with orthonormal rows
or columns when the widths differ), or ridge regression when asked (``method="ridge"``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from modelcypher.errors import UserError

RIDGE = 1e-3  # ridge strength, relative to the mean variance of a dimension of x_a


@dataclass(frozen=True)
class Roles:
    """Module names inside block ``i`` (``block.format(i)`` is its prefix), by role."""

    block: str
    attn_norm: str
    mlp_norm: str
    q: str
    k: str
    v: str
    o: str
    mlp_in: tuple[str, ...]  # read the normed residual, write the MLP's neurons (gate/up, or c_fc)
    mlp_out: str
    final_norm: str  # the norm after the last block (full name)
    fused_qkv: bool = False  # GPT-2's c_attn: q, k, v are its thirds
    norm_bias: bool = False  # LayerNorm (a bias to remove before dividing by the gain)
    conv1d: bool = False  # weights stored [in, out]; PEFT then needs fan_in_fan_out


_LLAMA = Roles("model.layers.{}.", "input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
               "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", ("mlp.up_proj", "mlp.gate_proj"),
               "mlp.down_proj", "model.norm")
_GPT2 = Roles("transformer.h.{}.", "ln_1", "ln_2", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj",
              ("mlp.c_fc",), "mlp.c_proj", "transformer.ln_f", fused_qkv=True, norm_bias=True, conv1d=True)
ROLES: dict[str, Roles] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gpt2": _GPT2}

# (role, input space, output space) of every module kind
KINDS = {"q": ("resid_attn", "q"), "k": ("resid_attn", "k"), "v": ("resid_attn", "v"), "o": ("attn", "resid"),
         "mlp_in": ("resid_mlp", "mlp"), "mlp_out": ("mlp", "resid")}


def roles_of(config: dict, what: str) -> Roles:
    t = config.get("model_type")
    if t not in ROLES:
        raise UserError(f"{what}: model_type {t!r} has no transfer record; supported: {', '.join(ROLES)}")
    return ROLES[t]


@dataclass
class SpaceMap:
    """``x_b ~ scale * x_a @ t`` and back, ``x_a ~ x_b @ back``; ``fit``: relative residual on the anchors;
    ``det``/``locked`` for square orthogonal maps (``locked``: the anchors decide its handedness)."""

    t: torch.Tensor
    scale: float
    fit: float
    method: str
    det: float | None = None
    locked: bool | None = None
    back: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """``[d_a, d_b]``: a row of A's space into B's."""
        return self.scale * self.t

    def backward(self) -> torch.Tensor:
        """``[d_b, d_a]``: a row of B's space into A's."""
        return self.back

    def summary(self) -> dict:
        return {"method": self.method, "fit": self.fit, "scale": self.scale, "det": self.det, "locked": self.locked,
                "shape": list(self.t.shape)}


def fit_map(x_a: torch.Tensor, x_b: torch.Tensor, method: str = "orthogonal", scaled: bool = True) -> SpaceMap:
    """The map ``x_b ~ c x_a T`` fitted on anchors (rows).

    ``orthogonal``: ``T = U V^T`` from the SVD of ``x_a^T x_b`` (Procrustes; semi-orthogonal when the
    widths differ) and ``c = |x_b| / |x_a|``. For a square ``T`` with determinant -1 the anchors
    must lock the reflection: the best rotation (the last singular pair flipped) leaves ``2 c sigma_min``
    more squared residual; when that is no more than the map's own squared residual, the data do not
    decide the handedness and the rotation is kept, so a near-degenerate anchor set cannot mirror the
    space ("anchor-locked"). A reflection the anchors do lock is kept: a model's symmetries include them.
    ``ridge``: ``T = (x_a^T x_a + lambda I)^{-1} x_a^T x_b`` (``c = 1``), any linear map.

    The scale is the ratio of the two spaces' norms on the anchors (``c = |x_b| / |x_a|``), so the map is
    a similarity and the way back its exact inverse (``T^T / c``). The least-squares scale would shrink by
    the spaces' correlation ``rho`` and its inverse grow by ``1 / rho``: an update moved with both (back on
    its input side, forward on its output side) came out ``1 / rho^2`` too large, 4 to 40 times between
    two families, and broke the target model. A ridge map's way back is fitted in its own direction (ridge
    from ``x_b`` to ``x_a``), not inverted, for the same reason.
    """
    a, b = x_a.double(), x_b.double()
    if method == "ridge":
        t, back = _ridge(a, b), _ridge(b, a)
        m = SpaceMap(t, 1.0, 0.0, "ridge", back=back)
    else:
        u, s, vh = torch.linalg.svd(a.T @ b, full_matrices=False)
        t = u @ vh
        det = locked = None
        if t.shape[0] == t.shape[1]:
            det = float(torch.linalg.det(t))
            c = float(s.sum() / a.square().sum().clamp_min(1e-300))
            misfit = float((b - c * a @ t).square().sum())
            locked = 2 * c * float(s[-1]) > max(misfit, 1e-12 * float(b.square().sum()))
            if det < 0 and not locked:
                u = u.clone()
                u[:, -1] = -u[:, -1]
                t, det = u @ vh, 1.0
        c = float(b.norm() / a.norm().clamp_min(1e-300)) if scaled else 1.0
        m = SpaceMap(t, c, 0.0, "orthogonal", det, locked, back=t.T / c)
    m.fit = float((b - a @ m.forward()).norm() / b.norm().clamp_min(1e-300))
    return m


def _ridge(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``argmin_T |y - x T|^2 + lambda |T|^2``, ``lambda`` relative to the mean variance of a column of ``x``."""
    gram = x.T @ x
    lam = RIDGE * float(torch.trace(gram)) / gram.shape[0]
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ y)


def refactor(left: torch.Tensor, right: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``left @ right`` (``[out, r0] @ [r0, in]``) as the best rank-``rank`` product ``B @ A`` (truncated
    SVD through two thin QRs, never the dense matrix), and the share of its energy the truncation drops."""
    q1, r1 = torch.linalg.qr(left.double())
    q2, r2 = torch.linalg.qr(right.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    r = max(1, min(rank, int((s > s[0] * 1e-10).sum()) if s.numel() and s[0] > 0 else 1))
    root = s[:r].sqrt()
    dropped = float(s[r:].square().sum() / s.square().sum().clamp_min(1e-300))
    return (q1 @ u[:, :r]) * root, root[:, None] * (vh[:r] @ q2.T), dropped


@contextmanager
def updated(model: torch.nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """``model`` computing as if each named module's weight had its low-rank update ``left @ right``
    (``[out, r] @ [r, in]``) added: a forward hook adds ``x right^T left^T`` to the module's output, as a
    LoRA layer does (the same for GPT-2's Conv1D, whose output is laid out alike). The weights are never
    touched and no dense update is formed: memory stays that of the factors."""
    mods = dict(model.named_modules())
    handles = []

    def hook(mod, args, out, left, right):
        x = args[0]
        return out + (x @ right.to(x).T) @ left.to(x).T

    try:
        for name, (left, right) in factors.items():
            # the original gpt2 checkpoints name the base model's tensors without its prefix
            mod = mods[name] if name in mods else next(m for n, m in mods.items() if n.endswith("." + name))
            handles.append(mod.register_forward_hook(functools.partial(hook, left=left, right=right)))
        yield
    finally:
        for h in handles:
            h.remove()
