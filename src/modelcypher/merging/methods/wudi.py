"""WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099): data-free interference minimisation.

The paper shows that the task vector of a linear layer approximately spans the inputs the layer saw
during fine-tuning, so the task vector's own rows stand in for task i's data. For a linear weight it
solves, per layer,

    minimise over τ_m   L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²

with τ_i = x_i − base in the ``[out, in]`` orientation (so ``τ_iᵀ`` holds task i's input-side
directions as columns), starting from ``τ_m = Σ_i τ_i`` and running Adam for ``steps`` steps at learning
rate ``lr`` (paper defaults: 300 steps, lr 1e-5). The result is ``base + lambda · τ_m``.

Implementation: L is a quadratic, ``L = tr(τ_m A τ_mᵀ) − 2 tr(τ_m Bᵀ) + c`` with
``A = Σ_i τ_iᵀ τ_i / ‖τ_i‖²`` ([in, in]) and ``B = Σ_i τ_i τ_iᵀ τ_i / ‖τ_i‖²`` ([out, in]), so the exact
gradient is ``2 (τ_m A − B)``: one matmul per step, no autograd graph. Memory per layer is about five
weight-sized tensors plus one [in, in] matrix; the runner hands over one tensor at a time, so wide
layers are handled one at a time on whatever device the tensors arrive on (CUDA when the runner uses it).

Layout: ``layout="linear"`` (default) treats a 2-D weight as ``nn.Linear`` ``[out, in]``;
``layout="conv1d"`` treats it as GPT-2 ``Conv1D`` ``[in, out]`` (the method transposes in and out).

Tensors that are not 2-D (biases, norm scales) get ``base + lambda · mean_i τ_i`` (task arithmetic with
``1/T``). We choose the mean rather than the sum: WUDI's argument only covers linear maps, and
summing T shifts of a norm scale or bias overshoots each task's own value T-fold where tasks agree.
Zero task vectors are left out of the objective (they would divide by zero and carry no direction).
"""

from __future__ import annotations

import torch

from modelcypher.errors import UserError
from modelcypher.merging.methods._task import mean_update
from modelcypher.merging.registry import register

LAYOUTS = ("linear", "conv1d")


def wudi_objective(tau_m: torch.Tensor, taus: list[torch.Tensor]) -> float:
    """The WUDI objective ``Σ_i ‖(τ_m − τ_i) τ_iᵀ‖_F² / ‖τ_i‖_F²`` (``[out, in]`` orientation)."""
    total = 0.0
    for t in taus:
        nrm = float(t.double().pow(2).sum())
        if nrm > 0:
            total += float(((tau_m.double() - t.double()) @ t.double().T).pow(2).sum()) / nrm
    return total


def wudi_optimize(taus: list[torch.Tensor], steps: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """Minimise the WUDI objective by Adam from ``Σ τ_i``; task vectors given as ``[out, in]``."""
    taus = [t.float() for t in taus]
    tau_m = torch.stack(taus).sum(0)
    live = [t for t in taus if float(t.pow(2).sum()) > 0]
    if not live or steps <= 0:
        return tau_m
    a = torch.zeros(tau_m.shape[1], tau_m.shape[1], dtype=torch.float32, device=tau_m.device)
    b = torch.zeros_like(tau_m)
    for t in live:
        g = (t.T @ t) / t.pow(2).sum()
        a += g
        b += t @ g
    param = torch.nn.Parameter(tau_m)
    opt = torch.optim.Adam([param], lr=lr)
    for _ in range(int(steps)):
        with torch.no_grad():
            param.grad = 2.0 * (param @ a - b)
        opt.step()
    return param.detach()


@register(
    "wudi",
    base="required",
    paper="Whoever Started the Interference Should End It (WUDI-Merging, arXiv 2503.08099)",
    global_params=("lambda", "steps", "lr", "layout"),
)
def wudi(xs, base, *, lambda_: float = 1.0, steps: int = 300, lr: float = 1e-5, layout: str = "linear"):
    if layout not in LAYOUTS:
        raise UserError(f"wudi: layout must be one of {LAYOUTS}, got {layout!r}")
    if base.dim() != 2:
        return mean_update(xs, base, lambda_)
    b = base.float()
    taus = [x.float() - b for x in xs]
    if layout == "conv1d":
        taus = [t.T for t in taus]
    tau_m = wudi_optimize(taus, steps=int(steps), lr=float(lr))
    if layout == "conv1d":
        tau_m = tau_m.T
    return b + float(lambda_) * tau_m.contiguous()
