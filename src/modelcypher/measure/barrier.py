"""The loss barrier between two models: loss along the straight line between their weights.

SYMMETRIES.md section 5: ``B(A, B) = max_lambda [L((1 - lambda) theta_A + lambda theta_B)
- ((1 - lambda) L(theta_A) + lambda L(theta_B))]`` on held-out data, over a grid of lambda with both
ends included (so the barrier is never negative). ``barrier_states`` is the core, on state dicts and a
loss callback (any model, any data); ``barrier_curve`` measures two checkpoint directories on text, raw
and (when asked) after aligning B onto A; ``plot_barrier`` draws the curves.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from modelcypher.errors import UserError

StateDict = Mapping[str, torch.Tensor]


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


def lm_states(config: dict, sd: StateDict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A float32 model of ``config`` holding ``sd`` and its full state dict (a tied head spelled out)."""
    from modelcypher.align.equivalence import DEFAULT_CLASS, build_model

    if config.get("model_type") in DEFAULT_CLASS:
        model = build_model(config, sd)
    else:  # a family without a symmetry spec: any causal LM transformers knows
        import transformers

        try:
            hf_config = transformers.CONFIG_MAPPING[config.get("model_type")].from_dict(dict(config))
            model = transformers.AutoModelForCausalLM.from_config(hf_config).float().eval()
        except (ValueError, KeyError) as e:
            raise UserError(f"cannot build a causal language model of type {config.get('model_type')!r} "
                            f"({str(e).splitlines()[0]})") from None
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
        if unexpected:
            raise UserError(f"checkpoint does not fit {type(model).__name__}: unexpected {unexpected[:3]}")
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        raise UserError(f"the barrier measures next-token loss; {config.get('model_type')} is not a causal LM")
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def untied_model(model: torch.nn.Module) -> torch.nn.Module:
    """An empty model of the same class with the output head untied, to hold any interpolation."""
    import copy

    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "get_text_config"):
        cfg.get_text_config().tie_word_embeddings = False
    return type(model)(cfg).float().eval()


def lm_loss_fn(template: torch.nn.Module, ids: torch.Tensor, device: torch.device, batch_size: int = 16):
    """A loss callback for ``barrier_states``: next-token loss of ``ids`` under a state dict."""
    from modelcypher.measure.loss import lm_loss

    holder = untied_model(template).to(device)
    block = context_of(template.config)

    def loss(sd: dict[str, torch.Tensor]) -> float:
        holder.load_state_dict(sd, strict=True)
        return lm_loss(holder, ids, block, batch_size, device)

    return loss


def context_of(config) -> int:
    n = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None) or 1024
    return min(int(n), 1024)


def barrier_curve(model_a_dir: str | Path, model_b_dir: str | Path, text: str, *, points: int = 11,
                  max_tokens: int = 65536, device: str | torch.device = "cpu", align: str | None = None,
                  residual: str = "auto", max_sweeps: int = 20, seed: int = 0,
                  probe_text: str | None = None, vo: bool = False, qk: bool = False, restarts: int = 1) -> dict:
    """Loss of held-out ``text`` (tokenized by A's tokenizer) between two checkpoints of one family.

    ``align``: also the curve after aligning B onto A by ``"weight"``, ``"activation"`` or ``"learned"``
    matching (probes: ``probe_text``, else for activation matching ``text`` itself and for learned matching
    text sampled from the two models, never the held-out text it is measured on); with
    an orthogonal residual A is measured with its
    norms folded, the same function in the parameterization the aligned B is written in. ``vo``, ``qk``:
    weight matching also matches each head's V-O and Q-K bases; ``restarts``: its descents, best kept.
    """
    from modelcypher.align import apply_verified, fold_norms
    from modelcypher.align.pipeline import _device, check_pair, load_tokenizer, match, spec_of
    from modelcypher.checkpoint import Checkpoint

    ck_a, ck_b = Checkpoint(model_a_dir), Checkpoint(model_b_dir)
    if ck_a.config.get("model_type") == "modelcypher-mlp":
        raise UserError(f"{ck_a.path}: a modelcypher-mlp model reads features, not text; use "
                        "modelcypher.measure.barrier.barrier_states with a loss on its data")
    check_pair(ck_a, ck_b)
    device = _device(device)
    tok = load_tokenizer(ck_a.path)
    ids = tok(text[: 8 * max_tokens], add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UserError(f"held-out text gives {len(ids)} tokens with the tokenizer of {ck_a.path}; need at least 2")
    ids = torch.tensor(ids, dtype=torch.long)

    raw_a = {n: ck_a.get(n) for n in ck_a.names}
    raw_b = {n: ck_b.get(n) for n in ck_b.names}
    model_a, sd_a = lm_states(ck_a.config, raw_a)
    _, sd_b = lm_states(ck_b.config, raw_b)
    loss = lm_loss_fn(model_a, ids, device)
    result = {"model_a": str(ck_a.path), "model_b": str(ck_b.path), "tokens": len(ids), "points": points,
              "raw": barrier_states(sd_a, sd_b, loss, points)}
    result["lambdas"] = result["raw"].pop("lambdas")
    if align:
        found, facts = match(ck_b, ck_a, spec_of(ck_a), method=align, data=None, residual=residual,
                             max_sweeps=max_sweeps, seed=seed, device=device, vo=vo, qk=qk, restarts=restarts,
                             text=probe_text if probe_text is not None or align == "learned" else text)
        aligned_b, config_b = apply_verified(raw_b, ck_b.config, found)
        if facts["residual"] == "orthogonal":
            raw_a, config_a = fold_norms(raw_a, ck_a.config)
        else:
            config_a = ck_a.config
        _, sd_a2 = lm_states(config_a, raw_a)
        _, sd_b2 = lm_states(config_b, aligned_b)
        curve = barrier_states(sd_a2, sd_b2, loss, points)
        del curve["lambdas"]
        result["aligned"] = {"method": align, **facts, **curve}
    return result


# ----------------------------------------------------------------------------- plot and CLI


def plot_barrier(result: dict, png: str | Path, title: str | None = None) -> Path:
    """Loss against lambda for each curve of ``result`` (raw, aligned), with its straight line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def cli_barrier(args: argparse.Namespace) -> int:
    from modelcypher.align.pipeline import read_text

    lambdas(args.points)  # a bad --points fails before any work
    text = read_text(args.data)
    align = None if args.align == "none" else args.align
    result = barrier_curve(args.model_a, args.model_b, text, points=args.points, max_tokens=args.max_tokens,
                           device=args.device, align=align, residual=args.residual,
                           probe_text=read_text(args.probe) if args.probe else None, vo=args.vo, qk=args.qk,
                           restarts=args.restarts)
    result["data"] = str(args.data)
    blob = json.dumps(result, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(blob)
    else:
        sys.stdout.write(blob)
    if args.plot:
        plot_barrier(result, args.plot)
    if args.json:
        line = f"raw barrier {result['raw']['barrier']:.4f}"
        if align:
            line += f", aligned ({align}) barrier {result['aligned']['barrier']:.4f}"
        print(f"{line} over {result['tokens']} tokens; wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0
