"""``modelcypher drift``: did a change (an adapter, a fine-tune, a transfer) keep the model what it was,
and did the skill arrive? The three-space report of two models that share a tokenizer:

- probabilities: the KL divergence ``KL(P_base || P_changed)`` of next-token distributions on control text
  (mean over tokens, and the share of tokens whose top choice stays the same); with a task file, the
  exact-match accuracy of both models;
- representations: per layer, the debiased CKA and mutual k-NN overlap of the two models' hidden states
  on the control text's words (:mod:`.maps`);
- weights: per changed matrix, the update's norm (absolute and relative to the weight) and the overlap of
  its top singular subspace with the weight's own (1: the update only rescales directions the weight
  already uses; about ``r / d``: new directions).

The changed model is a model directory or a PEFT adapter directory for the base (``adapter_config.json``).
A task file has one example a line: ``prompt<TAB>answer``, or the zoo's ``name[input]answer`` (the prompt
ends at the first ``]``); the model is given a newline and the prompt and must write the answer, then a
newline (greedy decoding).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modelcypher.errors import UserError
from modelcypher.hf import context_length, load_causal_lm, load_tokenizer, read_text, resolve_device
from modelcypher.measure.anchors import pool, segments
from modelcypher.measure.compare import MAX_SEGMENT_CHARS, MIN_ANCHORS, common, enough
from modelcypher.measure.exact_match import Example, exact_match
from modelcypher.measure.maps import cka, mutual_knn
from modelcypher.measure.plot import pyplot, save_png

KL_CONTEXT = 512
SUBSPACE_RANK = 8


def load_changed(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    """The model at ``path``: a full model, or ``base`` with the PEFT adapter at ``path`` merged in."""
    if not (path / "adapter_config.json").is_file():
        model, _ = load_causal_lm(path, next(base.parameters()).device, who="drift needs")
        return model
    try:
        from peft import PeftModel  # optional: only adapters need it
    except ImportError:
        raise UserError(f"{path} is a PEFT adapter: reading it needs the peft package (pip install peft)") from None
    try:
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).merge_and_unload().eval()
    except Exception as e:  # peft raises many types for an adapter that does not fit
        raise UserError(f"{path}: cannot apply this adapter to the base model ({str(e).splitlines()[0]})") from None


def kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` of each row (last axis) of two tensors of log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


@torch.no_grad()
def kl_drift(p: torch.nn.Module, q: torch.nn.Module, ids: torch.Tensor, context: int) -> dict:
    """Mean per-token ``KL(p || q)`` (nats) and top-1 agreement over consecutive windows of ``ids``."""
    dev = next(p.parameters()).device
    kl, agree, n = 0.0, 0, 0
    for w in ids[: len(ids) // context * context].view(-1, context).split(8) if len(ids) >= context else [ids[None]]:
        lp = F.log_softmax(p(input_ids=w.to(dev)).logits.double(), -1)
        lq = F.log_softmax(q(input_ids=w.to(dev)).logits.double(), -1)
        kl += float(kl_rows(lp, lq).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        n += lp.shape[0] * lp.shape[1]
    return {"kl": kl / n, "top1_agreement": agree / n, "tokens": n}


def read_task(path: str | Path) -> list[tuple[str, str]]:
    out = []
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        if "\t" in line:
            prompt, answer = line.split("\t", 1)
        elif "]" in line:
            k = line.index("]") + 1
            prompt, answer = line[:k], line[k:]
        else:
            raise UserError(f"{path}:{i}: expected 'prompt<TAB>answer' or 'name[input]answer'")
        out.append((prompt, answer))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def task_accuracy(model: torch.nn.Module, tokenizer, examples: list[tuple[str, str]]) -> float:
    """Share of examples whose greedy continuation of ``"\\n" + prompt`` is the answer, then a newline."""
    return exact_match(model, tokenizer, [Example("\n" + prompt, answer, "\n") for prompt, answer in examples])


def weight_drift(base: torch.nn.Module, changed: torch.nn.Module, rank: int = SUBSPACE_RANK) -> list[dict]:
    """Per matrix that changed: ``|dW|``, ``|dW| / |W|``, the update's stable rank and the overlap of the
    top-``rank`` left singular subspaces of ``dW`` and ``W`` (``|U_dW^T U_W|_F^2 / rank``)."""
    sd_b, sd_c = base.state_dict(), changed.state_dict()
    rows = []
    for name, w in sd_b.items():
        c = sd_c.get(name)
        if c is None or w.dim() != 2 or c.shape != w.shape:
            continue
        d = (c.double() - w.double()).cpu()
        norm = float(d.norm())
        if norm <= 1e-7 * float(w.norm()):
            continue
        r = min(rank, *d.shape)
        ud, sd, _ = torch.linalg.svd(d, full_matrices=False)
        uw = torch.linalg.svd(w.double().cpu(), full_matrices=False)[0]
        overlap = float((ud[:, :r].T @ uw[:, :r]).square().sum() / r)
        rows.append({"tensor": name, "norm": norm, "relative_norm": norm / max(float(w.norm()), 1e-12),
                     "stable_rank": float(sd.square().sum() / sd[0].square()), "subspace_overlap": overlap})
    return rows


def drift(model_b: str | Path, changed: str | Path, text: str, task: list[tuple[str, str]] | None = None, *,
          max_anchors: int = 512, device: str = "auto") -> dict:
    """The three-space report of ``changed`` against ``model_b`` on control ``text`` (and a task)."""
    dev = resolve_device(device)
    enough(segments(text, MAX_SEGMENT_CHARS), MIN_ANCHORS, "drift")
    base, ctx = load_causal_lm(Path(model_b), dev, who="drift needs", cap=KL_CONTEXT)
    tok = load_tokenizer(Path(model_b), "to read the control text with")
    other = load_changed(base, Path(changed))
    if other.config.vocab_size != base.config.vocab_size:
        raise UserError(f"drift compares models that share a tokenizer: {model_b} has {base.config.vocab_size} "
                        f"tokens, {changed} {other.config.vocab_size}")
    ids = torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    report = {"model_b": str(model_b), "changed": str(changed),
              "probabilities": kl_drift(base, other, ids, min(ctx, context_length(other.config, KL_CONTEXT)))}
    if task is not None:
        report["probabilities"]["task"] = {"examples": len(task), "exact_match_base": task_accuracy(base, tok, task),
                                           "exact_match_changed": task_accuracy(other, tok, task)}
    segs = segments(text, min(MAX_SEGMENT_CHARS, ctx))
    pooled = [pool(m, tok, segs, ctx, device=dev) for m in (base, other)]
    keep = common(pooled, max_anchors, MIN_ANCHORS, "drift")
    xs, ys = ([h[keep] for h in p.states] for p in pooled)
    report["representations"] = {"anchors": len(keep), "cka": [cka(x, y) for x, y in zip(xs, ys, strict=True)],
                                 "mutual_knn": [mutual_knn(x, y) for x, y in zip(xs, ys, strict=True)]}
    report["weights"] = weight_drift(base, other)
    return report


def render(report: dict) -> str:
    p = report["probabilities"]
    lines = [f"{report['changed']} against {report['model_b']}",
             f"probabilities: KL {p['kl']:.4g} nats/token, top-1 agreement {p['top1_agreement']:.3f} "
             f"over {p['tokens']} tokens"]
    if "task" in p:
        t = p["task"]
        lines.append(f"  task exact match: {t['exact_match_base']:.3f} -> {t['exact_match_changed']:.3f} "
                     f"({t['examples']} examples)")
    r = report["representations"]
    lines.append(f"representations ({r['anchors']} anchors), CKA per layer: "
                 + " ".join(f"{v:.3f}" for v in r["cka"]))
    w = report["weights"]
    if w:
        rel = np.array([x["relative_norm"] for x in w])
        ov = np.array([x["subspace_overlap"] for x in w])
        lines.append(f"weights: {len(w)} matrices changed, |dW|/|W| mean {rel.mean():.4g} (max {rel.max():.4g}), "
                     f"top-{SUBSPACE_RANK} subspace overlap with W mean {ov.mean():.3f}")
    else:
        lines.append("weights: no matrix changed")
    return "\n".join(lines)


def plot_drift(report: dict, path: str | Path) -> Path:
    """One PNG, three panels: weights (relative norm and subspace overlap per matrix), representations
    (CKA and k-NN per layer), probabilities (KL, top-1 agreement, task accuracy)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    w = report["weights"]
    ax = axes[0]
    ax.bar(np.arange(len(w)) - 0.2, [x["relative_norm"] for x in w], 0.4, label="|dW|/|W|")
    ax.bar(np.arange(len(w)) + 0.2, [x["subspace_overlap"] for x in w], 0.4, label="subspace overlap")
    ax.set_xticks(range(len(w)), [x["tensor"].replace(".weight", "")[-28:] for x in w], rotation=90, fontsize=6)
    ax.set_title("weights", fontsize=9)
    ax.legend(fontsize=7)
    r = report["representations"]
    axes[1].plot(r["cka"], "o-", label="CKA")
    axes[1].plot(r["mutual_knn"], "s-", label="mutual k-NN")
    axes[1].set_xlabel("layer")
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("representations", fontsize=9)
    axes[1].legend(fontsize=7)
    p = report["probabilities"]
    names, vals = ["KL (nats)", "top-1 agree"], [p["kl"], p["top1_agreement"]]
    if "task" in p:
        names += ["task base", "task changed"]
        vals += [p["task"]["exact_match_base"], p["task"]["exact_match_changed"]]
    axes[2].bar(names, vals)
    axes[2].set_title("probabilities", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
