"""GPT-2 (``GPT2LMHeadModel``): pre-LayerNorm, learned positions, GELU MLP, tied embeddings.

Conv1D weights are ``[in, out]``, so readers carry the residual on axis 0 and writers on axis 1.
``attn.c_attn`` fuses q, k and v along its output axis: three ranges of ``n_embd`` units each, all in
the head group's ``query`` space (GPT-2 has one KV head per query head). Learned positions leave every
invertible Q-K basis exact. An orthogonal residual must fix
the all-ones direction (LayerNorm centres), and each LayerNorm's gain folds into the next Conv1D.
"""

from __future__ import annotations

from modelcypher.arch.symmetry import Group, Heads, NormFold, Probe, Slot, SymmetrySpec, detect_prefix


def spec(config: dict, names: set[str] | None = None) -> SymmetrySpec:
    p = detect_prefix(names, "transformer.", "wte.weight")
    d, n_heads = config["n_embd"], config["n_head"]
    heads = Heads(n_heads, n_heads, d // n_heads)
    inner = config.get("n_inner") or 4 * d
    embed, head = f"{p}wte.weight", "lm_head.weight"

    groups: list[Group] = []
    residual = [Slot(embed, 1), Slot(f"{p}wpe.weight", 1)]
    folds: list[NormFold] = []
    for i in range(config["n_layer"]):
        h = f"{p}h.{i}."
        qkv = [
            Slot(h + t, ax, space="query", start=k * d, stop=(k + 1) * d)
            for k in range(3)
            for t, ax in (("attn.c_attn.weight", 1), ("attn.c_attn.bias", 0))
        ]
        o = Slot(h + "attn.c_proj.weight", 0, "in", space="query")
        groups.append(Group(f"h.{i}.heads", "heads", n_heads, (*qkv, o), heads, (Probe(h + "attn.c_proj"),)))
        v = [s for s in qkv if s.start == 2 * d]
        groups.append(Group(f"h.{i}.vo", "vo", n_heads, (*v, o), heads))
        q = [s for s in qkv if s.start == 0]
        k = [Slot(s.tensor, s.axis, "in", s.space, s.start, s.stop) for s in qkv if s.start == d]
        groups.append(Group(f"h.{i}.qk", "qk", n_heads, (*q, *k), heads))
        groups.append(
            Group(
                f"h.{i}.mlp", "perm", inner,
                (Slot(h + "mlp.c_fc.weight", 1), Slot(h + "mlp.c_fc.bias", 0), Slot(h + "mlp.c_proj.weight", 0, "in")),
                probes=(Probe(h + "mlp.c_proj"),),
            )
        )
        for ln, reader, writer in (("ln_1", "attn.c_attn", "attn.c_proj"), ("ln_2", "mlp.c_fc", "mlp.c_proj")):
            r = Slot(h + reader + ".weight", 0, "in")
            folds.append(NormFold(h + ln + ".weight", h + ln + ".bias", (r,), (h + reader + ".bias",)))
            residual += [
                Slot(h + ln + ".weight", 0, "diag"), Slot(h + ln + ".bias", 0), r,
                Slot(h + writer + ".weight", 1), Slot(h + writer + ".bias", 0),
            ]
    residual += [Slot(f"{p}ln_f.weight", 0, "diag"), Slot(f"{p}ln_f.bias", 0), Slot(head, 1, "in")]
    folds.append(NormFold(f"{p}ln_f.weight", f"{p}ln_f.bias", (Slot(head, 1, "in"),), (None,)))
    probes = tuple(Probe(f"{p}h.{i}.{ln}") for i in range(config["n_layer"]) for ln in ("ln_1", "ln_2"))
    groups.append(Group("residual", "residual", d, tuple(residual), probes=(*probes, Probe(f"{p}ln_f"))))
    tied = bool(config.get("tie_word_embeddings", True))
    return SymmetrySpec("gpt2", tuple(groups), "layernorm", tuple(folds), (embed, head), tied)
