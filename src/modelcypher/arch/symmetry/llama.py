"""Llama, Mistral and Qwen2 (``*ForCausalLM``): pre-RMSNorm, RoPE, SwiGLU, grouped-query attention.

Groups per layer: the SwiGLU hidden units (``perm``), the heads (``heads``, GQA-aware), the per-KV-head
V-O basis (``vo``) and Q-K basis (``qk``: with RoPE only a scaled rotation of each rotary pair); one
residual group for the whole stack (orthogonal after folding each RMSNorm gain into its readers).
Biases: Qwen2 has q/k/v biases; Llama has them on q/k/v/o with ``attention_bias`` and on the MLP with
``mlp_bias``; Mistral has none.
"""

from __future__ import annotations

from modelcypher.arch.symmetry import Group, Heads, NormFold, Probe, Slot, SymmetrySpec, detect_prefix


def spec(config: dict, names: set[str] | None = None) -> SymmetrySpec:
    p = detect_prefix(names, "model.", "embed_tokens.weight")
    d = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    heads = Heads(
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        head_dim=config.get("head_dim") or d // n_heads,
        rope=True,
    )
    qkv_bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias"))
    o_bias = config["model_type"] == "llama" and bool(config.get("attention_bias"))
    mlp_bias = config["model_type"] == "llama" and bool(config.get("mlp_bias"))
    embed, head = f"{p}embed_tokens.weight", "lm_head.weight"

    groups: list[Group] = []
    residual = [Slot(embed, 1, "out")]
    folds: list[NormFold] = []
    for i in range(config["num_hidden_layers"]):
        a, m = f"{p}layers.{i}.self_attn.", f"{p}layers.{i}.mlp."
        ln1, ln2 = f"{p}layers.{i}.input_layernorm.weight", f"{p}layers.{i}.post_attention_layernorm.weight"

        mlp = [Slot(m + "gate_proj.weight", 0), Slot(m + "up_proj.weight", 0), Slot(m + "down_proj.weight", 1, "in")]
        if mlp_bias:
            mlp += [Slot(m + "gate_proj.bias", 0), Slot(m + "up_proj.bias", 0)]
        groups.append(
            Group(f"layers.{i}.mlp", "perm", config["intermediate_size"], tuple(mlp), probes=(Probe(m + "down_proj"),))
        )

        q = [Slot(a + "q_proj.weight", 0, space="query"), Slot(a + "o_proj.weight", 1, "in", space="query")]
        kv = [Slot(a + "k_proj.weight", 0, space="kv"), Slot(a + "v_proj.weight", 0, space="kv")]
        if qkv_bias:
            q.append(Slot(a + "q_proj.bias", 0, space="query"))
            kv += [Slot(a + "k_proj.bias", 0, space="kv"), Slot(a + "v_proj.bias", 0, space="kv")]
        groups.append(Group(f"layers.{i}.heads", "heads", n_heads, tuple(q + kv), heads, (Probe(a + "o_proj"),)))
        vo = [Slot(a + "v_proj.weight", 0, space="kv"), Slot(a + "o_proj.weight", 1, "in", space="query")]
        if qkv_bias:
            vo.append(Slot(a + "v_proj.bias", 0, space="kv"))
        groups.append(Group(f"layers.{i}.vo", "vo", heads.n_kv_heads, tuple(vo), heads))
        qk = [Slot(a + "q_proj.weight", 0, space="query"), Slot(a + "k_proj.weight", 0, "in", space="kv")]
        if qkv_bias:
            qk += [Slot(a + "q_proj.bias", 0, space="query"), Slot(a + "k_proj.bias", 0, "in", space="kv")]
        groups.append(Group(f"layers.{i}.qk", "qk", heads.n_kv_heads, tuple(qk), heads))

        attn_readers = tuple(Slot(a + f"{x}_proj.weight", 1, "in") for x in "qkv")
        mlp_readers = (Slot(m + "gate_proj.weight", 1, "in"), Slot(m + "up_proj.weight", 1, "in"))
        folds.append(
            NormFold(ln1, None, attn_readers, tuple(a + f"{x}_proj.bias" if qkv_bias else None for x in "qkv"))
        )
        mlp_biases = (m + "gate_proj.bias", m + "up_proj.bias") if mlp_bias else (None, None)
        folds.append(NormFold(ln2, None, mlp_readers, mlp_biases))
        residual += [Slot(ln1, 0, "diag"), *attn_readers, Slot(a + "o_proj.weight", 0, "out")]
        if o_bias:
            residual.append(Slot(a + "o_proj.bias", 0, "out"))
        residual += [Slot(ln2, 0, "diag"), *mlp_readers, Slot(m + "down_proj.weight", 0, "out")]
        if mlp_bias:
            residual.append(Slot(m + "down_proj.bias", 0, "out"))

    norm = f"{p}norm.weight"
    residual += [Slot(norm, 0, "diag"), Slot(head, 1, "in")]
    folds.append(NormFold(norm, None, (Slot(head, 1, "in"),), (None,)))
    probes = tuple(
        Probe(f"{p}layers.{i}.{n}") for i in range(config["num_hidden_layers"])
        for n in ("input_layernorm", "post_attention_layernorm")
    ) + (Probe(f"{p}norm"),)
    groups.append(Group("residual", "residual", d, tuple(residual), probes=probes))
    tied = bool(config.get("tie_word_embeddings", False))
    return SymmetrySpec(config["model_type"], tuple(groups), "rmsnorm", tuple(folds), (embed, head), tied)
