"""TSV-M: Task Singular Vectors merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

For a 2-D parameter, every task matrix ``Δ_i = x_i - base`` is reduced to its top singular components,
``Δ_i ≈ U_i S_i V_iᵀ`` keeping ``k_i = max(1, floor(fraction · min(m, n)))`` components, with
``fraction = 1/T`` by default (T = number of task models). The bases are stacked side by side,
``U = [U_1 … U_T]`` (m × Σk_i) and ``V = [V_1 … V_T]`` (n × Σk_i), and each stack is replaced by its
polar factor (the closest matrix with orthonormal columns, ``P Qᵀ`` from the thin SVD ``P Σ Qᵀ`` of the
stack), which decorrelates the tasks' singular directions. The merged task matrix is
``Û diag(S_1 … S_T) V̂ᵀ`` and the result is ``base + lambda · Û S V̂ᵀ``.

Tensors that are not 2-D (biases, norms) get ``base + lambda · mean_i Δ_i`` (task arithmetic with
``1/T``), as in the paper.

Singular components below ``1e-6 · σ_max`` of their task (float32 round-off level) are dropped before
orthogonalization: they carry no energy, and their arbitrary bases would otherwise rotate the other
tasks' directions. For real (full-rank) task matrices this never triggers; it makes the merge exact on
exactly low-rank tasks. On CPU, task matrices up to 4M entries are formed and decomposed in float64
(the difference of two float32 tensors is exact there).

SVD does not care which axis is the input, so the layout ([out, in] for ``nn.Linear`` or [in, out] for
GPT-2 ``Conv1D``) does not matter here.
"""

from __future__ import annotations

import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods._task import mean_update
from modelcypher.merging.registry import register

NEGLIGIBLE = 1e-6  # singular values below this share of the task's largest are treated as zero
EXACT_ENTRIES = 4_000_000  # task matrices up to this size are formed and decomposed in float64 on CPU


def svd_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for a CPU matrix of up to ``EXACT_ENTRIES`` entries (the difference of two float32
    tensors is exact there), else float32."""
    return torch.float64 if t.device.type == "cpu" and t.numel() <= EXACT_ENTRIES else torch.float32


def _polar(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor of ``a`` (m × r): ``P Qᵀ`` from ``a = P Σ Qᵀ``."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_merge_matrix(deltas: list[torch.Tensor], fraction: float | None = None) -> torch.Tensor:
    """The TSV-M merged task matrix (without ``lambda``) of 2-D task matrices of one shape."""
    t = len(deltas)
    frac = 1.0 / t if fraction is None else float(fraction)
    if not 0.0 < frac <= 1.0:
        raise UserError(f"tsv: fraction must be in (0, 1], got {fraction}")
    m, n = deltas[0].shape
    k = max(1, int(frac * min(m, n)))
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        tol = NEGLIGIBLE * float(s[0]) if s.numel() else 0.0
        keep = min(k, int((s > tol).sum()))
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].T)
    s_cat = torch.cat(ss)
    if s_cat.numel() == 0:  # every task vector is zero
        return torch.zeros_like(deltas[0], dtype=torch.float32)
    u_hat = _polar(torch.cat(us, dim=1))
    v_hat = _polar(torch.cat(vs, dim=1))
    return ((u_hat * s_cat) @ v_hat.T).to(torch.float32)


@register(
    "tsv",
    base="required",
    paper="Task Singular Vectors: Reducing Task Interference in Model Merging (arXiv 2412.00081)",
    global_params=("lambda", "fraction"),
)
def tsv(xs, base, *, lambda_: float = 1.0, fraction: float | None = None):
    """TSV-M. ``fraction``: share of each task's singular components kept (default ``1/T``)."""
    b = base.float()
    if b.dim() != 2:
        return mean_update(xs, base, lambda_)
    dt = svd_dtype(b)
    merged = tsv_merge_matrix([x.to(dt) - base.to(dt) for x in xs], fraction)
    return b + float(lambda_) * merged
