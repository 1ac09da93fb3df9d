"""BERT (``BertForMaskedLM``): post-LayerNorm, so the residual admits permutations only.

A LayerNorm sits on the residual stream itself (``LN(x + f(x))``), with nothing around it to absorb a
folded gain; it commutes with a permutation of its gain and bias but with no other orthogonal matrix.
The masked-LM head reads the residual through ``cls.predictions.transform`` into a second hidden space,
which the decoder (tied to the word embeddings) reads. The tie forces that space to carry the residual's
permutation, so the residual group covers it as well: the two axes of ``transform.dense`` both belong to
the residual group.
"""

from __future__ import annotations

from modelcypher.arch.symmetry import Group, Heads, Probe, Slot, SymmetrySpec, detect_prefix


def spec(config: dict, names: set[str] | None = None) -> SymmetrySpec:
    p = detect_prefix(names, "bert.", "embeddings.word_embeddings.weight")
    d, n_heads = config["hidden_size"], config["num_attention_heads"]
    heads = Heads(n_heads, n_heads, d // n_heads)
    e = f"{p}embeddings."
    embed, head = e + "word_embeddings.weight", "cls.predictions.decoder.weight"

    def norm(prefix: str) -> list[Slot]:
        return [Slot(prefix + ".weight", 0, "diag"), Slot(prefix + ".bias", 0)]

    groups: list[Group] = []
    residual = [Slot(embed, 1), Slot(e + "position_embeddings.weight", 1), Slot(e + "token_type_embeddings.weight", 1)]
    residual += norm(e + "LayerNorm")
    probes = [Probe(e + "LayerNorm", "output")]
    for i in range(config["num_hidden_layers"]):
        lyr = f"{p}encoder.layer.{i}."
        att, out = lyr + "attention.self.", lyr + "attention.output."
        q = [Slot(att + f"query.{t}", 0, space="query") for t in ("weight", "bias")]
        k = [Slot(att + f"key.{t}", 0, space="query") for t in ("weight", "bias")]
        v = [Slot(att + f"value.{t}", 0, space="query") for t in ("weight", "bias")]
        o = Slot(out + "dense.weight", 1, "in", space="query")
        groups.append(Group(f"layer.{i}.heads", "heads", n_heads, (*q, *k, *v, o), heads, (Probe(out + "dense"),)))
        groups.append(Group(f"layer.{i}.vo", "vo", n_heads, (*v, o), heads))
        k_in = [Slot(s.tensor, s.axis, "in", s.space) for s in k]
        groups.append(Group(f"layer.{i}.qk", "qk", n_heads, (*q, *k_in), heads))
        groups.append(
            Group(
                f"layer.{i}.mlp", "perm", config["intermediate_size"],
                (
                    Slot(lyr + "intermediate.dense.weight", 0),
                    Slot(lyr + "intermediate.dense.bias", 0),
                    Slot(lyr + "output.dense.weight", 1, "in"),
                ),
                probes=(Probe(lyr + "output.dense"),),
            )
        )
        residual += [Slot(att + f"{x}.weight", 1, "in") for x in ("query", "key", "value")]
        residual += [Slot(out + "dense.weight", 0), Slot(out + "dense.bias", 0), *norm(out + "LayerNorm")]
        residual += [Slot(lyr + "intermediate.dense.weight", 1, "in")]
        residual += [Slot(lyr + "output.dense.weight", 0), Slot(lyr + "output.dense.bias", 0)]
        residual += norm(lyr + "output.LayerNorm")
        probes += [Probe(out + "LayerNorm", "output"), Probe(lyr + "output.LayerNorm", "output")]
    t = "cls.predictions.transform."
    residual += [Slot(t + "dense.weight", 1, "in"), Slot(t + "dense.weight", 0), Slot(t + "dense.bias", 0)]
    residual += [*norm(t + "LayerNorm"), Slot(head, 1, "in")]
    probes.append(Probe(t + "LayerNorm", "output"))
    groups.append(Group("residual", "residual", d, tuple(residual), probes=tuple(probes)))
    tied = bool(config.get("tie_word_embeddings", True))
    return SymmetrySpec("bert", tuple(groups), "postnorm", (), (embed, head), tied)
