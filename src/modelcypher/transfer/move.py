"""``modelcypher transfer``: a PEFT LoRA adapter made for model A, moved to model B (another family,
width, depth or tokenizer) without training.

1. Both models read the same probe text; anchors are the character offsets where both tokenizers end a
   token, or its words (``measure.anchors``). Hooks pool, per block, what every adapted module reads and
   writes (:data:`.spaces.KINDS`).
2. Each block of A is paired with a block of B, in order, by the CKA of what the blocks write into the
   residual stream (:func:`block_pairs`: distinct blocks of B when B is deeper), or, with
   ``pairing="states"``, by the layer correspondence of the hidden states (``measure.maps``).
3. Per pair of blocks and space, a map fitted on the anchors (:func:`.spaces.fit_map`). The normed
   residual is mapped with the norm gains taken out (``z = (u - beta) / g``), since a symmetry of the
   residual stream rotates ``z``, not ``u``.
4. Per module of B, the target: A's updates' effect on A's anchors, carried into the module's output
   space by the output map. ``update="fit"`` (the default) fits B's update on B's own inputs to reproduce
   it (reduced-rank least squares, :func:`fit_update`), scaled by :func:`projection_gain` (the part of
   the target B's inputs cannot predict is left out of the fit; the gain restores its share along the
   target), then fits once more on what both models' modules read with the adapters on (a later update
   acts on inputs the earlier ones have changed). ``update="maps"`` carries each update through the maps
   instead, ``dW_B = Q_out^T dW_A P_in^T`` (``P_in`` takes a row of B's input space to A's, ``Q_out`` a row
   of A's output space to B's), scaled by its projection gain. Updates landing on one module of B are
   summed, re-factorized to rank ``r``, and written for B's module names.
5. With ``refine_steps``, the moved factors are then trained on the probe text to move B's next characters
   as A's adapter moves A's (:mod:`.refine`).

Memory: when the pooled activations of every block of both models exceed ``memory_gb``, a first pass
reads the hidden states alone (for the pairing), then B's blocks that receive updates are read in groups
(:func:`block_groups`), each with its blocks of A, one pass of each model per group and fit: the same
updates, bounded memory.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modelcypher.arch.families import family_of, layer_index, ties_embeddings
from modelcypher.checkpoint import Checkpoint
from modelcypher.checkpoint.guard import check_not_in_model, check_output_dir
from modelcypher.checkpoint.peft import LoraAdapter, lora_config, write_adapter
from modelcypher.errors import UserError
from modelcypher.hf import resolve_device
from modelcypher.measure.anchors import Pooled, default_probes, pool, segments, token_segments
from modelcypher.measure.compare import MAX_SEGMENT_CHARS, MIN_ANCHORS, Side, common, enough, open_side
from modelcypher.measure.compare import updates as block_writes
from modelcypher.measure.maps import cka, layer_correspondence
from modelcypher.transfer import refine
from modelcypher.transfer.spaces import KINDS, Roles, SpaceMap, fit_map, refactor, roles_of, updated

REPORT_FILE = "transfer_report.json"


@dataclass
class Update:
    """One adapted module of A: ``delta = left @ right`` in ``[out, in]`` layout."""

    name: str
    block: int
    kind: str  # q, k, v, o, mlp_in, mlp_out
    index: int  # which mlp_in module (up/gate), else 0
    left: torch.Tensor
    right: torch.Tensor


def module_kinds(roles: Roles, suffix: str) -> list[tuple[str, int]]:
    """The (kind, mlp_in index) a module of a block plays; GPT-2's c_attn plays q, k and v."""
    if roles.fused_qkv and suffix == roles.q:
        return [("q", 0), ("k", 0), ("v", 0)]
    found = [(k, 0) for k in ("q", "k", "v", "o", "mlp_out") if getattr(roles, k) == suffix]
    found += [("mlp_in", i) for i, m in enumerate(roles.mlp_in) if m == suffix]
    return found


def lora_factors(adapter: LoraAdapter, f) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's update ``left @ right`` (``[out, r] @ [r, in]``; PEFT keeps Linear's layout for Conv1D
    too), its scale in ``left``."""
    return adapter.tensor(f.b).double() * f.scale, adapter.tensor(f.a).double()


def read_updates(adapter: LoraAdapter, roles: Roles) -> list[Update]:
    out = []
    if adapter.full:
        name = next(iter(adapter.full))
        raise UserError(f"{adapter.path}: saves tensor {name!r} whole (modules_to_save); only LoRA factors of "
                        "attention and MLP projections can be transferred")
    for name, f in adapter.factors.items():
        block = layer_index(name)
        prefix = roles.block.format(block) if block is not None else None
        kinds = module_kinds(roles, name[len(prefix):-len(".weight")]) if prefix and name.startswith(prefix) else []
        if f.embedding or not kinds:
            raise UserError(f"{adapter.path}: cannot transfer the update of {name!r}: only attention and MLP "
                            "projections inside blocks are transferred")
        left, right = lora_factors(adapter, f)
        rows = left.shape[0] // len(kinds)
        for j, (kind, index) in enumerate(kinds):
            out.append(Update(name, block, kind, index, left[j * rows:(j + 1) * rows], right))
    return out


def hooks(side: Side, roles: Roles, blocks: Iterable[int]) -> dict[str, tuple[torch.nn.Module, str]]:
    """Per block: the inputs of the residual readers, attention output and MLP neurons; the outputs of
    the query, key and value projections."""
    mods = dict(side.model.named_modules())
    out = {}
    for i in blocks:
        blk = roles.block.format(i)
        out[f"{i}.resid_attn"] = (mods[blk + roles.q], "input")
        out[f"{i}.resid_mlp"] = (mods[blk + roles.mlp_in[0]], "input")
        out[f"{i}.attn"] = (mods[blk + roles.o], "input")
        out[f"{i}.mlp"] = (mods[blk + roles.mlp_out], "input")
        for kind in ("q", "k", "v"):
            out[f"{i}.{kind}"] = (mods[blk + getattr(roles, kind)], "output")
    return out


def split_qkv(pooled: dict[str, torch.Tensor], roles: Roles, blocks: Iterable[int],
              widths: tuple[int, int, int]) -> None:
    """GPT-2's fused c_attn output, cut into its query, key and value thirds."""
    if not roles.fused_qkv:
        return
    for i in blocks:
        full = pooled[f"{i}.q"]
        a, b, _ = widths
        pooled[f"{i}.q"], pooled[f"{i}.k"], pooled[f"{i}.v"] = full[:, :a], full[:, a:a + b], full[:, a + b:]


def norm_params(ck: Checkpoint, roles: Roles, block: int | None, norm: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm's gain and bias: ``norm`` in block ``block``, or the full name ``norm`` when ``block`` is None."""
    full = norm if block is None else roles.block.format(block) + norm
    # the original gpt2 checkpoints store the base model's tensors without its prefix
    base = next((n for n in (full, full.partition(".")[2]) if n + ".weight" in ck), None)
    if base is None:
        where = "the final norm" if block is None else f"the norm before block {block}'s projections"
        raise UserError(f"{ck.path}: no tensor {full}.weight ({where})")
    b = ck.get(base + ".bias").double() if roles.norm_bias and base + ".bias" in ck else None
    return ck.get(base + ".weight").double(), b


def qkv_widths(config: dict) -> tuple[int, int, int]:
    d = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    hd = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    return heads * hd, kv * hd, kv * hd


FIT_RIDGE = 1e-8  # keeps the normal equations solvable; relative to the mean variance of an input dimension
MIN_COS = 0.25  # below this alignment with A's carried effect, a moved update is boosted no further


def projection_gain(produced: torch.Tensor, target: torch.Tensor) -> float:
    """The factor ``g`` that makes a moved update's effect on B's anchors (``produced``), projected on A's
    update's effect carried into B's output space (``target``), equal to it: ``g = |t|^2 / <p, t>``.

    Where the maps fit exactly, ``p = t`` and ``g = 1``. Where the two models' spaces correlate only in part,
    B's inputs carry A's in part, and the moved update does only that share of A's work along ``t`` (the
    rest lands elsewhere): ``g`` restores the share along ``t`` (2-3x between GPT-2 and Llama here, 1-2x
    between two GPT-2s). Scaling by a least-squares map's inverse did more (1 / rho^2, 4-40x) and drove
    the target model off (KL 10-13 on control text). An update whose effect does not point along ``t`` at
    all (``<p, t> <= 0``) would work against A's: it gets ``g = 0``."""
    dot = float((produced * target).sum())
    if dot <= 0:
        return 0.0
    t, p = float(target.norm()), float(produced.norm())
    return (t / p) / max(dot / (t * p), MIN_COS)


def without_norm(u: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A norm's output with its gain and bias taken out (``z = (u - beta) / g``): what a symmetry of the
    residual stream rotates (a folded copy moves the gain into the next weights)."""
    return (u - (0 if bias is None else bias)) / gain.clamp_min(1e-12)


class Maps:
    """The maps between A's block ``i`` and B's block ``j`` spaces, fitted on demand and kept."""

    def __init__(self, xa: dict, xb: dict, states: tuple[list, list], cks: tuple[Checkpoint, Checkpoint],
                 roles: tuple[Roles, Roles], method: str):
        self.xa, self.xb, self.states, self.cks, self.roles, self.method = xa, xb, states, cks, roles, method
        self.cache: dict[tuple[int, int, str], SpaceMap] = {}
        self.gains: dict[tuple[int, int, str], tuple] = {}

    def space(self, i: int, j: int, space: str) -> SpaceMap:
        key = (i, j, space)
        if key not in self.cache:
            if space == "resid":
                self.cache[key] = fit_map(self.states[0][i], self.states[1][j], self.method)
            elif space.startswith("resid_"):
                norm = "attn_norm" if space == "resid_attn" else "mlp_norm"
                (ga, ba), (gb, bb) = (norm_params(ck, r, k, getattr(r, norm))
                                      for ck, r, k in zip(self.cks, self.roles, (i, j), strict=True))
                za, zb = without_norm(self.xa[f"{i}.{space}"], ga, ba), without_norm(self.xb[f"{j}.{space}"], gb, bb)
                self.cache[key] = fit_map(za, zb, self.method)
                self.gains[key] = (ga, gb)
            else:
                self.cache[key] = fit_map(self.xa[f"{i}.{space}"], self.xb[f"{j}.{space}"], self.method)
        return self.cache[key]

    def p_in(self, i: int, j: int, space: str) -> torch.Tensor:
        """``[in_b, in_a]``: a row of B's input space in A's."""
        m = self.space(i, j, space)
        if space.startswith("resid_"):
            ga, gb = self.gains[(i, j, space)]
            return (m.backward() / gb.clamp_min(1e-12)[:, None]) * ga[None, :]
        return m.backward()

    def q_out(self, i: int, j: int, space: str) -> torch.Tensor:
        """``[out_a, out_b]``: a row of A's output space in B's (MLP neurons unscaled: the scale fitted after
        the nonlinearity, which the down projection reads, is not the scale before it, which an up or gate
        update writes)."""
        m = self.space(i, j, space)
        return m.t if space == "mlp" else m.forward()


def block_width(side: Side, roles: Roles) -> int:
    """The numbers pooled per anchor for one block (:func:`hooks`: each hook's input or output width)."""
    width = 0
    for module, where in hooks(side, roles, [0]).values():
        w = module.weight  # [in, out] for GPT-2's Conv1D, [out, in] for Linear
        width += w.shape[0 if (where == "input") == roles.conv1d else 1]
    return width


def block_groups(block_of: dict[int, int], per_block: list[int], budget: float) -> list[tuple[list, list]]:
    """The blocks of B that receive updates, in consecutive groups whose pooled activations, with those of
    the blocks of A paired with them, fit ``budget`` bytes (at least one block of B a group); each group
    as (its blocks of A, its blocks of B)."""
    groups: list[tuple[list, list]] = []
    size = 0
    for j in sorted(set(block_of.values())):
        mine = [i for i, b in block_of.items() if b == j]
        cost = per_block[1] + per_block[0] * len(mine)
        if not groups or size + cost > budget:
            groups.append(([], []))
            size = 0
        groups[-1][0].extend(mine)
        groups[-1][1].append(j)
        size += cost
    return [(sorted(a), b) for a, b in groups]


def block_pairs(sim: torch.Tensor) -> dict[int, int]:
    """Each block of A paired with a block of B, in order, maximizing the summed similarity ``sim[i, j]``
    (dynamic programming): distinct blocks of B when B is at least as deep (an update never lands twice on
    one block while others stay untouched), otherwise some blocks of B take several of A's."""
    n_a, n_b = sim.shape
    strict = n_a <= n_b
    best = torch.full((n_a, n_b), float("-inf"), dtype=torch.float64)
    back = torch.zeros((n_a, n_b), dtype=torch.long)
    best[0] = sim[0]
    for i in range(1, n_a):
        for j in range(n_b):
            prev = best[i - 1, :j] if strict else best[i - 1, :j + 1]
            if len(prev) and torch.isfinite(prev.max()):
                back[i, j] = int(prev.argmax())
                best[i, j] = prev.max() + sim[i, j]
    j = int(best[-1].argmax())
    pairs = {}
    for i in range(n_a - 1, -1, -1):
        pairs[i] = j
        j = int(back[i, j])
    return pairs


def target_module(roles: Roles, block: int, kind: str, index: int) -> tuple[str, str]:
    """B's module (name) for a kind, and which part of its rows (``all``, or q/k/v of a fused one)."""
    if kind == "mlp_in":
        name = roles.mlp_in[min(index, len(roles.mlp_in) - 1)]
    else:
        name = getattr(roles, kind)
    part = kind if roles.fused_qkv and kind in ("q", "k", "v") else "all"
    return roles.block.format(block) + name, part


def transfer_adapter(adapter_dir: str | Path, model_a: str | Path, model_b: str | Path, out: str | Path, *,
                     text: str | None = None, rank: int | None = 16, method: str = "orthogonal",
                     max_anchors: int = 16000, anchors: str = "tokens", pairing: str = "updates",
                     gain: str = "projection", update: str = "fit", refine_steps: int = 0, memory_gb: float = 8.0,
                     lines: bool = False, device: str = "auto", overwrite: bool = False) -> dict:
    """Move the LoRA adapter at ``adapter_dir`` (made for ``model_a``) to ``model_b``; write it to ``out``.
    ``lines``: read each line of the probe text alone (``measure.anchors.segments``)."""
    if method not in ("orthogonal", "ridge"):
        raise UserError(f"--map {method!r}: expected orthogonal or ridge")
    if pairing not in ("updates", "states"):
        raise UserError(f"--pairing {pairing!r}: expected updates or states")
    if gain not in ("projection", "function", "none"):
        raise UserError(f"--gain {gain!r}: expected projection, function or none")
    if update not in ("fit", "maps"):
        raise UserError(f"--update {update!r}: expected fit or maps")
    if anchors not in ("tokens", "words"):
        raise UserError(f"--anchors {anchors!r}: expected tokens or words")
    if refine_steps < 0:
        raise UserError(f"--refine {refine_steps}: must be 0 (no refinement) or more (steps)")
    if not memory_gb > 0:
        raise UserError(f"--memory-gb {memory_gb}: must be a positive number")
    check_output_dir(out, [adapter_dir, model_a, model_b], overwrite=overwrite)  # before any work
    check_not_in_model(Path(out) / "x")
    adapter = LoraAdapter(adapter_dir)
    ck_a, ck_b = Checkpoint(model_a), Checkpoint(model_b)
    roles_a, roles_b = roles_of(ck_a.config, str(model_a)), roles_of(ck_b.config, str(model_b))
    fam = family_of(ck_a.config)
    tied = [head for _, head in fam.tied] if ties_embeddings(ck_a.config) else []
    adapter.check_base(ck_a.names, ck_a.shape, str(model_a), conv1d=fam.conv1d, tied=tied)
    updates = read_updates(adapter, roles_a)
    text = default_probes() if text is None else text
    enough(segments(text, MAX_SEGMENT_CHARS, lines=lines), MIN_ANCHORS, "transfer")

    dev = resolve_device(device)
    sides = [open_side(model_a, dev), open_side(model_b, dev)]
    segs = segments(text, min(MAX_SEGMENT_CHARS, *(s.context for s in sides)), lines=lines)
    if anchors == "tokens":
        segs = token_segments(segs, [s.tokenizer for s in sides])
    all_roles = (roles_a, roles_b)
    n_blocks = [s.model.config.num_hidden_layers for s in sides]
    n_spans = sum(len(s.spans) for s in segs)
    per_block = [8 * n_spans * block_width(s, r) for s, r in zip(sides, all_roles, strict=True)]  # bytes pooled
    budget = memory_gb * 2**30
    at_once = sum(b * n for b, n in zip(per_block, n_blocks, strict=True)) <= budget
    # One pass of each model reads every block when their activations fit the budget; otherwise a first
    # pass reads the hidden states alone and the blocks are read in groups (more passes, bounded memory).
    first = [pool(s.model, s.tokenizer, segs, s.context, hooks(s, r, range(n)) if at_once else {}, dev)
             for s, r, n in zip(sides, all_roles, n_blocks, strict=True)]
    keep = common(first, max_anchors, MIN_ANCHORS, "transfer")
    states = tuple([h[keep] for h in p.states] for p in first)
    first = [Pooled([], p.hooked, p.covered) for p in first]  # the states of every span: kept only at the anchors

    if pairing == "updates":
        writes = [block_writes(h) for h in states]  # what each block writes into the residual stream
        block_of = block_pairs(torch.tensor([[cka(x, y) for y in writes[1]] for x in writes[0]]))
        del writes  # as large as the hidden states
    else:
        sim = [[cka(x, y) for x in states[0]] for y in states[1]]  # rows: layers of B, columns: layers of A
        block_of = {p["b"] - 1: max(p["a"] - 1, 0) for p in layer_correspondence(sim) if p["b"] >= 1}
    groups = [(list(range(n_blocks[0])), list(range(n_blocks[1])))] if at_once else \
        block_groups(block_of, per_block, budget)

    def read(k: int, blocks: list[int], changes: Mapping[str, tuple] | None = None) -> Pooled:
        """Model k's pooled states and the activations of its ``blocks``, computing with the low-rank
        ``changes`` (``name: (left, right)``) added to its weights."""
        if changes is None and at_once:
            p = first[k]
            first[k] = Pooled(p.states, {}, p.covered)  # read once: not held through the later passes
        else:
            side, roles = sides[k], all_roles[k]
            with updated(side.model, changes or {}):
                p = pool(side.model, side.tokenizer, segs, side.context, hooks(side, roles, blocks), dev)
        hooked = {key: v[keep] for key, v in p.hooked.items()}
        split_qkv(hooked, all_roles[k], blocks, qkv_widths((ck_a, ck_b)[k].config))
        return Pooled([h[keep] for h in p.states], hooked, p.covered)

    qkv_b = qkv_widths(ck_b.config)
    factors, gains, rows, outs, map_fits = {}, {}, {}, {}, {}
    for blocks_a, blocks_b in groups:
        xa, xb = read(0, blocks_a).hooked, read(1, blocks_b).hooked
        widest = max(v.shape[1] for v in (*xa.values(), *xb.values()))
        if len(keep) < widest:
            raise UserError(f"transfer: the probe text gives {len(keep)} anchors ({anchors} both models read), fewer "
                            f"than the widest space it maps ({widest} dimensions): give a --probes text of at least "
                            f"{widest} words (several times that for models that are not exact copies)")
        maps = Maps(xa, xb, states, (ck_a, ck_b), all_roles, method)
        mine = [u for u in updates if u.block in blocks_a]
        outs |= {(u.name, u.kind): carried_left(u, block_of[u.block], maps) for u in mine}
        goal = targets(mine, block_of, outs, roles_b, xa, qkv_b)
        if update == "maps":
            f, g = moved_through_maps(mine, block_of, maps, outs, roles_b, xb, qkv_b, rank, gain)
            rows |= {n: module_report(n, goal[n], xb, a_f, b_f) for n, (a_f, b_f) in f.items()}
        else:
            f, g = fitted(goal, xb, rank, gain)
        factors |= f
        gains |= g
        map_fits |= {f"A{i}->B{j}:{sp}": m.summary() for (i, j, sp), m in maps.cache.items()}
    if not factors:
        raise UserError(f"{adapter_dir}: the adapter has no LoRA factors to transfer")

    if update == "fit" or gain == "function" or refine_steps:  # A with its own adapter
        own = {n[:-len(".weight")]: lora_factors(adapter, f) for n, f in adapter.factors.items()}
    if update == "fit":
        # Once more on what the modules read with the adapters on: a later module's update acts on inputs
        # that the earlier updates have already changed, in A as in B.
        first_fit, factors = low_rank(factors), {}
        for blocks_a, blocks_b in groups:
            xa_on, xb_on = read(0, blocks_a, own).hooked, read(1, blocks_b, first_fit).hooked
            goal = targets([u for u in updates if u.block in blocks_a], block_of, outs, roles_b, xa_on, qkv_b)
            f, g = fitted(goal, xb_on, rank, gain)
            rows |= {n: module_report(n, goal[n], xb_on, a_f, b_f) for n, (a_f, b_f) in f.items()}
            factors |= f
            gains |= g
    rows = [rows[n] | {"gain": gains[n]} for n in sorted(factors)]
    overall = 1.0
    if gain == "function":
        # The projection gain once more, model to model, one factor for the whole adapter: how A's adapter
        # moves A's last hidden states, carried into B by their map, against how the new one moves B's.
        norms = [norm_params(ck, r, None, r.final_norm) for ck, r in ((ck_a, roles_a), (ck_b, roles_b))]
        za, zb = (without_norm(states[k][-1], *norms[k]) for k in (0, 1))
        za2 = without_norm(read(0, [], own).states[-1], *norms[0])
        zb2 = without_norm(read(1, [], low_rank(factors)).states[-1], *norms[1])
        overall = projection_gain(zb2 - zb, (za2 - za) @ fit_map(za, zb, method).forward())
        factors = {n: (a, overall * b) for n, (a, b) in factors.items()}
    refined = None
    if refine_steps:
        chars = segs if anchors == "tokens" else token_segments(segs, [s.tokenizer for s in sides])
        moved, refined = refine.refine_in_characters(sides, own, low_rank(factors), chars, text, refine_steps, dev)
        factors = {n: (right, left) for n, (left, right) in moved.items()}
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    r0 = max(ranks.values())
    config = lora_config(target_modules=sorted(factors), r=r0, lora_alpha=r0,
                         rank_pattern={n: r for n, r in ranks.items() if r != r0},
                         alpha_pattern={n: r for n, r in ranks.items() if r != r0},
                         fan_in_fan_out=roles_b.conv1d, base_model_name_or_path=str(model_b))
    report = {"adapter": str(adapter_dir), "model_a": str(model_a), "model_b": str(model_b), "output": str(out),
              "anchors": len(keep), "anchor_kind": anchors, "pairing": pairing, "map": method, "update": update,
              "gain": gain, "probe_lines": lines,
              "overall_gain": overall, "rank": r0, "refine": refined,
              "correspondence": [{"block_a": a, "block_b": b} for a, b in sorted(block_of.items())],
              "block_groups": [{"blocks_a": a, "blocks_b": b,
                                "pooled_gb": (len(a) * per_block[0] + len(b) * per_block[1]) / 2**30}
                               for a, b in groups],
              "modules": rows,
              "maps": map_fits}
    entries, tensors = [], {}
    for n, (a_f, b_f) in factors.items():
        for key, t in ((f"{n}.lora_A.weight", a_f), (f"{n}.lora_B.weight", b_f)):
            entries.append((key, tuple(t.shape), torch.float32))
            tensors[key] = t.float().contiguous()
    write_adapter(out, config, entries, tensors.__getitem__, overwrite=overwrite,
                  extra_files={REPORT_FILE: json.dumps(report, indent=2) + "\n"})
    return report


def low_rank(factors: Factors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's update as ``(left, right)`` (``left @ right``) from its LoRA factors ``(A, B)``."""
    return {n: (b, a) for n, (a, b) in factors.items()}


@dataclass
class Target:
    """What B's new update of one module should do on the anchors: A's updates' effect on A's anchors,
    carried into the module's output space (``[n, out_b]``; a fused q/k/v module's thirds in their rows),
    the key of the space it reads, the summed rank of those updates, and the maps used."""

    effect: torch.Tensor
    space_in: str
    rank: int
    maps: set[str]


def part_offset(part: str, qkv_b: tuple[int, int, int]) -> int:
    """Where a part's rows begin in B's module (q, k, v: thirds of a fused projection)."""
    return (0, 0, qkv_b[0], qkv_b[0] + qkv_b[1])[("all", "q", "k", "v").index(part)]


def carried_left(u: Update, j: int, maps: Maps) -> torch.Tensor:
    """``[r, out_b]``: A's update's output factor carried into block ``j`` of B's output space (all that
    the targets need of the maps: kept instead of them, which are as large as the spaces squared)."""
    return u.left.T @ maps.q_out(u.block, j, KINDS[u.kind][1])


def carried(u: Update, out: torch.Tensor, xa: dict) -> torch.Tensor:
    """What A's update ``u`` does on A's anchors (inputs ``xa``), carried into B's output space by its
    carried output factor ``out`` (:func:`carried_left`): the target of B's update."""
    return xa[f"{u.block}.{KINDS[u.kind][0]}"] @ u.right.T @ out


def targets(updates: list[Update], block_of: dict[int, int], outs: dict, roles_b: Roles, xa: dict,
            qkv_b: tuple[int, int, int]) -> dict[str, Target]:
    """Per module of B, A's updates' effect on A's anchors (inputs ``xa``) carried into its output space."""
    out: dict[str, Target] = {}
    for u in updates:
        i, j = u.block, block_of[u.block]
        space_in, space_out = KINDS[u.kind]
        name, part = target_module(roles_b, j, u.kind, u.index)
        effect = carried(u, outs[u.name, u.kind], xa)
        if name not in out:
            width = sum(qkv_b) if part != "all" else effect.shape[1]
            out[name] = Target(torch.zeros(effect.shape[0], width, dtype=torch.float64), f"{j}.{space_in}", 0, set())
        lo = part_offset(part, qkv_b)
        out[name].rank += u.left.shape[1]
        out[name].effect[:, lo:lo + effect.shape[1]] += effect
        out[name].maps |= {f"A{i}->B{j}:{space_in}", f"A{i}->B{j}:{space_out}"}
    return out


def fit_update(x: torch.Tensor, t: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The update ``dW = left @ right`` of rank ``rank`` whose effect ``x @ dW.T`` on the inputs ``x``
    (``[n, in]``) best reproduces ``t`` (``[n, out]``): reduced-rank ridge regression (the ridge solution
    ``W``, then its fitted values' top ``rank`` right singular vectors ``V``: ``dW = V V^T W^T``)."""
    gram = x.T @ x
    lam = FIT_RIDGE * float(torch.trace(gram)) / gram.shape[0]
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), x.T @ t)  # [in, out]
    v = torch.linalg.svd(x @ w, full_matrices=False)[2][:rank].T  # [out, r]
    return v, v.T @ w.T


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # per module of B, its LoRA factors (A, B)


def fitted(goal: dict[str, Target], xb: dict, rank: int | None, gain: str) -> tuple[Factors, dict[str, list[float]]]:
    """Each module's update fitted on B's own inputs ``xb`` to reproduce its target, scaled by the
    projection gain (the fit reproduces only the part of the target that B's inputs predict); and the
    gains."""
    factors, gains = {}, defaultdict(list)
    for name, tg in goal.items():
        x = xb[tg.space_in].double()
        r = tg.rank if rank is None else min(rank, tg.rank)  # no more rank than A's updates had
        left, right = fit_update(x, tg.effect, r)
        g = projection_gain(x @ right.T @ left.T, tg.effect) if gain != "none" else 1.0
        gains[name].append(g)
        b_f, a_f, _ = refactor(g * left, right, r)
        factors[name] = (a_f, b_f)
    return factors, gains


def moved_through_maps(updates: list[Update], block_of: dict[int, int], maps: Maps, outs: dict, roles_b: Roles,
                       xb: dict, qkv_b: tuple[int, int, int], rank: int | None,
                       gain: str) -> tuple[Factors, dict[str, list[float]]]:
    """Each update carried by the maps (``dW_B = Q_out^T dW_A P_in^T``; ``outs``: each update's output factor
    already carried, ``(Q_out^T left)^T``, :func:`carried_left`), scaled by its projection gain; those landing
    on one module of B summed and re-factorized to rank ``rank``; and the gains."""
    parts: dict[str, list] = defaultdict(list)
    gains: dict[str, list[float]] = defaultdict(list)
    for u in updates:
        i, j = u.block, block_of[u.block]
        space_in = KINDS[u.kind][0]
        out = outs[u.name, u.kind]
        name, part = target_module(roles_b, j, u.kind, u.index)
        left, right = out.T, u.right @ maps.p_in(i, j, space_in).T
        produced = xb[f"{j}.{space_in}"] @ right.T @ left.T
        g = projection_gain(produced, carried(u, out, maps.xa)) if gain != "none" else 1.0
        gains[name].append(g)
        if part != "all":  # a third of a fused q/k/v projection: zero rows elsewhere
            full = torch.zeros(sum(qkv_b), left.shape[1], dtype=left.dtype)
            lo = part_offset(part, qkv_b)
            full[lo:lo + left.shape[0]] = left
            left = full
        parts[name].append((g * left, right))
    factors = {}
    for name, pairs in parts.items():
        lefts, rights = zip(*pairs, strict=True)
        r_max = sum(x.shape[1] for x in lefts) if rank is None else rank
        b_f, a_f, _ = refactor(torch.cat(lefts, 1), torch.cat(rights, 0), r_max)
        factors[name] = (a_f, b_f)
    return factors, gains


def module_report(name: str, tg: Target, xb: dict, a_f: torch.Tensor, b_f: torch.Tensor) -> dict:
    """How well B's new update (LoRA factors ``a_f``, ``b_f``) reproduces, on B's anchors, A's update carried
    into B's output space."""
    produced = xb[tg.space_in] @ a_f.T @ b_f.T
    err = float((produced - tg.effect).norm() / tg.effect.norm().clamp_min(1e-300))
    return {"module": name, "update_error": err, "maps": sorted(tg.maps)}
