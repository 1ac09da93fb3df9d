"""Per-model statistics the data-driven merge methods need, collected from a transformers model.

- ``fisher_diagonal``: for ``fisher`` (Fisher merging),
- ``input_grams``: for ``regmean`` and ``null_space``,
- ``distilled_coefficients``: for ``distill`` (all models at once),
- ``linear_layouts``: which weights are ``nn.Linear`` ``[out, in]`` and which GPT-2 ``Conv1D`` ``[in, out]``.

A batch is a ``LongTensor`` of token ids ``[batch, seq]`` (or ``[seq]``), or a mapping with
``input_ids`` and optionally ``attention_mask`` (positions with mask 0 are padding and are ignored).
Batches are moved to the model's device. These functions return plain dicts; caching is the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from modelcypher.errors import UserError


def _is_conv1d(mod: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``, ``y = x W + b``), told by its class so that
    merging never imports transformers for it: any model that has one was built by transformers."""
    return type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers.")


def _batches(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Normalise batches to (input_ids [B, L], attention_mask [B, L] as bool) on the model's device."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out = []
    for b in batches:
        if isinstance(b, Mapping):
            ids, mask = b["input_ids"], b.get("attention_mask")
        else:
            ids, mask = b, None
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
            mask = None if mask is None else torch.as_tensor(mask).unsqueeze(0)
        if ids.dim() != 2:
            raise UserError(f"token batches must be [batch, seq]; got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        out.append((ids.to(device).long(), mask.to(device)))
    return out


def _target_mask(mask: torch.Tensor) -> torch.Tensor:
    """Which next-token targets count: position t predicts t+1; both must be real tokens."""
    return mask[:, :-1] & mask[:, 1:]


def fisher_diagonal(model: nn.Module, batches: Iterable, min_tokens: int = 1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of every parameter on the model's own data.

    ``F = (1/N) Σ_n (∇_θ ℓ_n)²`` over the N sequences of ``batches``, where
    ``ℓ_n = mean_t log p_θ(x_{t+1} | x_{≤t})`` is the mean log-likelihood of sequence n's own next tokens
    (the *empirical* Fisher: targets are the data tokens, not samples from the model). One gradient per
    sequence, so the square is taken per example as in Fisher merging, not of a batch-averaged gradient;
    using the per-token mean makes the scale independent of sequence length.

    Keys are ``model.named_parameters(remove_duplicate=False)`` names (a tied weight appears under each of
    its names, with the same tensor); values are float32 on the parameter's device, of its shape.
    Computed in eval mode (no dropout); parameters are differentiated whether or not they require grad,
    and the model's ``requires_grad`` flags, training mode and ``.grad`` fields are left as they were.
    Raises ``UserError`` when the batches hold fewer than ``min_tokens`` next-token targets.
    """
    data = _batches(model, batches)
    n_targets = sum(int(_target_mask(m).sum()) for _, m in data)
    if n_targets < max(1, min_tokens):
        raise UserError(f"fisher_diagonal needs at least {max(1, min_tokens)} next-token targets; "
                        f"the batches hold {n_targets}")
    named = list(model.named_parameters(remove_duplicate=False))
    unique: dict[int, nn.Parameter] = {}
    for _, p in named:
        unique.setdefault(id(p), p)
    params = list(unique.values())
    flags = [p.requires_grad for p in params]
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    was_training = model.training
    model.eval()
    n_seq = 0
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for ids, mask in data:
                for row in range(ids.shape[0]):
                    i, m = ids[row : row + 1], mask[row : row + 1]
                    tm = _target_mask(m)
                    if not bool(tm.any()):
                        continue
                    logits = model(input_ids=i, attention_mask=m.long()).logits
                    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                    ll = logp.gather(-1, i[:, 1:].unsqueeze(-1)).squeeze(-1)[tm].mean()
                    grads = torch.autograd.grad(ll, params, allow_unused=True)
                    for a, g in zip(acc, grads, strict=True):
                        if g is not None:
                            a += g.float().pow(2)
                    n_seq += 1
    finally:
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    by_id = {id(p): a / n_seq for p, a in zip(params, acc, strict=True)}
    return {name: by_id[id(p)] for name, p in named}


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {f"{name}.weight" if name else "weight": mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) or _is_conv1d(mod)}


def linear_layouts(model: nn.Module) -> dict[str, str]:
    """``{weight name: "linear" | "conv1d"}`` for every ``nn.Linear`` ([out, in]) and ``Conv1D`` ([in, out])."""
    return {k: ("linear" if isinstance(m, nn.Linear) else "conv1d") for k, m in _linear_modules(model).items()}


def _in_features(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.weight.shape[0]


def input_grams(model: nn.Module, batches: Iterable, min_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Gram matrix of the inputs of every ``nn.Linear`` and ``Conv1D``: ``G = Xᵀ X / n`` (float32, [in, in]).

    ``X`` stacks the layer's input vectors at every real (non-padding) token position, ``n`` their count.
    Keys are the weight's state-dict name (``<module name>.weight``), e.g. ``model.layers.0.mlp.up_proj.weight``
    or ``transformer.h.0.attn.c_attn.weight``. A tied output head (``lm_head``) is its own module and gets
    its own Gram (the final hidden states). Inputs of a layer that are not ``[batch, seq, in]`` (layers
    applied to flattened or routed tokens) are counted row by row without a padding mask.

    ``min_tokens`` defaults to the largest input width among the hooked layers, the fewest tokens for
    which every Gram can have full rank; fewer raises ``UserError`` saying how many are needed.
    """
    data = _batches(model, batches)
    mods = _linear_modules(model)
    need = max((_in_features(m) for m in mods.values()), default=1) if min_tokens is None else min_tokens
    have = sum(int(m.sum()) for _, m in data)
    if have < need:
        raise UserError(f"input_grams needs at least {need} tokens (the widest layer input) to estimate the "
                        f"Gram matrices; the batches hold {have}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}

    def hook_for(key: str):
        def hook(_mod, inputs):
            x = inputs[0]
            mask = current["mask"]
            if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).float()
            g = x.T @ x
            if key in sums:
                sums[key] += g
            else:
                sums[key] = g
            counts[key] = counts.get(key, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in mods.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, mask in data:
                current["mask"] = mask
                model(input_ids=ids, attention_mask=mask.long())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / max(counts[k], 1) for k in sums}


def unit_axis(name: str, shape: tuple[int, ...], layouts: Mapping[str, str]) -> int | None:
    """The axis of a parameter's output units: rows of an ``nn.Linear`` weight, columns of a ``Conv1D``
    (and of any other matrix, e.g. an embedding: its features), entries of a vector; None for other
    shapes (one coefficient for the whole tensor)."""
    if len(shape) == 1:
        return 0
    if len(shape) == 2:
        return 0 if layouts.get(name) == "linear" else 1
    return None


def distilled_coefficients(model: nn.Module, base: Mapping[str, torch.Tensor],
                           task_vectors: list[Mapping[str, torch.Tensor]], batches: list[list],
                           *, steps: int = 300, lr: float = 1e-2, init: float = 1.0, seed: int = 0,
                           log=None) -> list[dict[str, torch.Tensor]]:
    """Per model, a coefficient for each output unit of each parameter (:func:`unit_axis`), fitted so that
    ``base + Σ_i c_i ⊙ τ_i`` predicts, on each model's own text, what that model predicts.

    ``model``: a module of the family (its parameters are replaced, never changed); ``base``: its
    parameters (state-dict names, float32); ``task_vectors[i]``: ``θ_i - base`` for the same names;
    ``batches[i]``: model i's token batches. Each step draws one batch per model and descends by Adam
    ``Σ_i KL(p_{θ_i} || p_merged)`` over the real tokens, the teacher ``θ_i = base + τ_i`` evaluated in
    the same module. The coefficients start at ``init`` (task arithmetic with that lambda). Returns, per
    model, ``{name: c}`` with ``c`` of the parameter's shape but 1 on every axis other than the units.
    """
    data = [_batches(model, b) for b in batches]
    if any(not d for d in data):
        raise UserError("distilled_coefficients needs at least one batch of text per model")
    layouts = linear_layouts(model)
    names = list(base)
    device = next(iter(base.values())).device
    coef = []
    for _ in task_vectors:
        per = {}
        for n in names:
            axis = unit_axis(n, tuple(base[n].shape), layouts)
            shape = [s if a == axis else 1 for a, s in enumerate(base[n].shape)]
            per[n] = torch.full(shape, float(init), device=device, requires_grad=True)
        coef.append(per)
    opt = torch.optim.Adam([c for per in coef for c in per.values()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            merged = {n: base[n] + sum(c[n] * tv[n] for c, tv in zip(coef, task_vectors, strict=True)) for n in names}
            loss = 0.0
            for tv, d in zip(task_vectors, data, strict=True):
                ids, mask = d[int(torch.randint(len(d), (), generator=g))]
                with torch.no_grad():
                    teacher = {n: base[n] + tv[n] for n in names}
                    t_logp = torch.log_softmax(torch.func.functional_call(
                        model, teacher, (ids,), {"attention_mask": mask.long()}).logits.float(), -1)[mask]
                logp = torch.log_softmax(torch.func.functional_call(
                    model, merged, (ids,), {"attention_mask": mask.long()}).logits.float(), -1)[mask]
                loss = loss + nn.functional.kl_div(logp, t_logp, reduction="batchmean", log_target=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log and (step % max(1, steps // 5) == 0 or step == steps - 1):
                log(f"  distillation step {step + 1}/{steps}: KL {float(loss) / len(task_vectors):.4f} per model")
    finally:
        model.train(was_training)
    return [{n: c.detach().clone() for n, c in per.items()} for per in coef]
