"""The loss barrier between two models: loss along the straight line between their weights.

As in Frankle et al. 2020 and Git Re-Basin (Ainsworth et al. 2023):
``B(A, B) = max_lambda [L((1 - lambda) theta_A + lambda theta_B) - ((1 - lambda) L(theta_A) + lambda L(theta_B))]``
on held-out data, over a grid of lambda with both
ends included (so the barrier is never negative). ``barrier_states`` is the core, on state dicts and a
loss callback (any model, any data); ``barrier_curve`` measures two checkpoint directories on text, raw
and (when asked) after aligning B onto A; ``plot_barrier`` draws the curves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from modelcypher.align.equivalence import apply_verified
from modelcypher.align.pipeline import check_pair, lifted, match, spec_of
from modelcypher.align.transform import fold_norms
from modelcypher.arch.families import family_of
from modelcypher.checkpoint import Checkpoint
from modelcypher.errors import UserError
from modelcypher.hf import causal_lm, context_length, resolve_device, token_ids, untied_model
from modelcypher.measure.loss import lm_loss
from modelcypher.measure.plot import pyplot, save_png
from modelcypher.options import AlignOptions

StateDict = Mapping[str, torch.Tensor]
LOSS_CONTEXT = 1024  # windows of the held-out text: the model's context, at most this long


def interpolate(sd_a: StateDict, sd_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
    """``(1 - lam) A + lam B`` for every floating tensor, in float32; other tensors come from A."""
    if sd_a.keys() != sd_b.keys():
        raise UserError(f"cannot interpolate: tensors differ ({sorted(sd_a.keys() ^ sd_b.keys())[:3]})")
    out = {}
    for k, a in sd_a.items():
        if a.is_floating_point():
            out[k] = torch.lerp(a.float(), sd_b[k].float(), lam)
        else:
            out[k] = a
    return out


def lambdas(points: int) -> list[float]:
    if points < 2:
        raise UserError(f"--points {points}: need at least 2 (11 or more recommended)")
    return [i / (points - 1) for i in range(points)]


def barrier_of(lams: list[float], losses: list[float]) -> dict:
    """The curve's excess over the straight line between its ends, and its maximum (the barrier)."""
    first, last = losses[0], losses[-1]
    linear = [(1 - t) * first + t * last for t in lams]
    excess = [x - y for x, y in zip(losses, linear, strict=True)]
    return {"loss": losses, "linear": linear, "excess": excess, "barrier": max(excess)}


def barrier_states(sd_a: StateDict, sd_b: StateDict, loss: Callable[[dict[str, torch.Tensor]], float],
                   points: int = 11) -> dict:
    """Loss at ``points`` evenly spaced lambdas from A (0) to B (1): ``{"lambdas", "loss", "linear",
    "excess", "barrier"}``. ``loss`` takes an interpolated float32 state dict."""
    lams = lambdas(points)
    return {"lambdas": lams, **barrier_of(lams, [float(loss(interpolate(sd_a, sd_b, t))) for t in lams])}


# ----------------------------------------------------------------------------- language models on text


def lm_loss_fn(template: torch.nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int = 16):
    """A loss callback for ``barrier_states``: next-token loss of ``ids`` under a state dict."""
    holder = untied_model(template).to(device)
    block = context_length(template.config, LOSS_CONTEXT)

    def loss(sd: dict[str, torch.Tensor]) -> float:
        holder.load_state_dict(sd, strict=True)
        return lm_loss(holder, ids, block, batch_size, device)

    return loss


def barrier_curve(model_a_dir: str | Path, model_b_dir: str | Path, text: str, *, points: int = 11,
                  max_tokens: int = 65536, device: str | torch.device = "cpu", align: str | None = None,
                  options: AlignOptions | None = None, probe_text: str | None = None, **settings) -> dict:
    """Loss of held-out ``text`` (tokenized by A's tokenizer) between two checkpoints of one family.

    ``align``: also the curve after aligning B onto A by ``"weight"``, ``"activation"`` or ``"learned"``
    matching, with ``options`` (or its fields as keywords, e.g. ``residual="orthogonal", vo=True``).
    Probes: ``probe_text``, else for activation matching ``text`` itself and for learned matching text
    sampled from the two models, never the held-out text it is measured on. With an orthogonal residual
    A is measured with its norms folded, the same function in the parameterization the aligned B is
    written in.
    """
    ck_a, ck_b = Checkpoint(model_a_dir), Checkpoint(model_b_dir)
    if family_of(ck_a.config).reads != "tokens":
        raise UserError(f"{ck_a.path}: a {ck_a.config.get('model_type')} model reads features, not text; use "
                        "modelcypher.measure.barrier.barrier_states with a loss on its data")
    opts = options if options is not None else AlignOptions.of(method=align, **settings) if align else None
    if opts is not None and opts.universe:
        raise UserError("the barrier is measured between two models: universe matching does not apply")
    with lifted(ck_b, ck_a) as ck_b_wide:
        return _barrier(ck_a, ck_b_wide, text, points, max_tokens, device, opts, probe_text,
                        None if ck_b_wide is ck_b else ck_b)


def _barrier(ck_a: Checkpoint, ck_b: Checkpoint, text: str, points: int, max_tokens: int,
             device: str | torch.device, opts: AlignOptions | None, probe_text: str | None,
             narrow: Checkpoint | None) -> dict:
    """``barrier_curve`` on B as given or, when ``narrow`` is set, B lifted from it into A's widths (then
    A is measured with its norms folded, as the lifted B is written)."""
    check_pair(ck_a, ck_b)
    device = resolve_device(device)
    ids = token_ids(ck_a.path, text, max_tokens)
    if len(ids) < 2:
        raise UserError(f"held-out text gives {len(ids)} tokens with the tokenizer of {ck_a.path}; need at least 2")

    raw_a = {n: ck_a.get(n) for n in ck_a.names}
    raw_b = {n: ck_b.get(n) for n in ck_b.names}
    config_a = ck_a.config
    if narrow is not None:
        raw_a, config_a = fold_norms(raw_a, config_a)
    model_a, sd_a = causal_lm(config_a, raw_a)
    _, sd_b = causal_lm(ck_b.config, raw_b)
    loss = lm_loss_fn(model_a, ids, device)
    result = {"model_a": str(ck_a.path), "model_b": str((narrow or ck_b).path), "tokens": len(ids), "points": points,
              "raw": barrier_states(sd_a, sd_b, loss, points)}
    if narrow is not None:  # raw interpolation is not defined across widths: "raw" is B lifted, unaligned
        result["lifted"] = {"from": spec_of(narrow).residual.size, "to": spec_of(ck_a).residual.size}
    result["lambdas"] = result["raw"].pop("lambdas")
    if opts is not None:
        probes = probe_text if probe_text is not None or opts.method == "learned" else text
        found, facts = match(ck_b, ck_a, spec_of(ck_a), opts, device, probes)
        aligned_b, config_b = apply_verified(raw_b, ck_b.config, found)
        if facts["residual"] == "orthogonal":
            raw_a, config_a = fold_norms(raw_a, config_a)
        _, sd_a2 = causal_lm(config_a, raw_a)
        _, sd_b2 = causal_lm(config_b, aligned_b)
        curve = barrier_states(sd_a2, sd_b2, loss, points)
        del curve["lambdas"]
        result["aligned"] = {"method": opts.method, **facts, **curve}
    return result


# ----------------------------------------------------------------------------- plot and CLI


def plot_barrier(result: dict, png: str | Path, title: str | None = None) -> Path:
    """Loss against lambda for each curve of ``result`` (raw, aligned), with its straight line dashed."""
    plt = pyplot()
    lams = result["lambdas"]
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = {k: v for k, v in result.items() if isinstance(v, dict) and "loss" in v}
    palette = plt.get_cmap("tab10").colors
    for i, (name, c) in enumerate(curves.items()):
        color = palette[i % len(palette)]
        label = f"{name}: barrier {c['barrier']:.3f}"
        ax.plot(lams, c["loss"], "o-", color=color, label=label, markersize=4)
        ax.plot(lams, c["linear"], "--", color=color, alpha=0.5, linewidth=1)
    ax.set_xlabel("lambda  (0 = model A, 1 = model B)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title or "Loss along the line between two models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_png(fig, png, dpi=120)
