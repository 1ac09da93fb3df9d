"""End to end through the CLI: real checkpoints in, a model transformers loads out."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints import CONFIGS, base_tokens, build, family_set, finetune, load, save, state, word_tokenizer
from cli_util import run_cli, write_config
from modelcypher.merging.methods.slerp import slerp


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_linear_merge_of_sharded_bf16_checkpoints_loads_in_transformers(tmp_path, family):
    base, a, b = family_set(tmp_path, family, 2, dtype=torch.bfloat16, shard="20KB")
    cfg = write_config(tmp_path / "m.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(a), "parameters": {"weight": 3.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
    })
    r = run_cli("merge", cfg, "-o", tmp_path / "out", "--max-shard-size", "40KB")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    sa, sb, so = state(a), state(b), state(out)
    assert set(so) == set(sa)
    for n in so:
        want = ((3 * sa[n] + sb[n]) / 4).bfloat16().float()
        torch.testing.assert_close(so[n], want, atol=1e-2, rtol=1e-2)
    model = load(out, family)
    ids = torch.randint(0, 97, (2, 7))
    assert torch.isfinite(model(ids).logits).all()


def test_ties_output_equals_method_on_every_tensor(tmp_path):
    base, a, b = family_set(tmp_path, "llama", 2)
    cfg = write_config(tmp_path / "m.yaml", {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"density": 0.3}},
                   {"model": str(b), "parameters": {"density": 0.7}}],
        "parameters": {"lambda": 0.8},
    })
    assert run_cli("merge", cfg, "-o", tmp_path / "out").returncode == 0
    from modelcypher.merging.registry import get_method

    ties = get_method("ties").fn
    s0, sa, sb, so = state(base), state(a), state(b), state(tmp_path / "out")
    for n in so:
        want = ties([sa[n], sb[n]], s0[n], weight=[1.0, 1.0], density=[0.3, 0.7], normalize=True, lambda_=0.8)
        torch.testing.assert_close(so[n], want)


def test_slerp_gradient_and_filters_follow_the_layer_index(tmp_path):
    base, other = family_set(tmp_path, "llama", 1)  # 3 layers
    cfg = write_config(tmp_path / "m.yaml", {
        "merge_method": "slerp", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(other)}],
        "parameters": {"t": [{"filter": "mlp", "value": 1.0}, {"value": [0.0, 1.0]}]},
    })
    assert run_cli("merge", cfg, "-o", tmp_path / "out").returncode == 0
    s0, s1, so = state(base), state(other), state(tmp_path / "out")
    q = "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(so[q.format(0)], s0[q.format(0)])  # t = 0 at the first layer
    torch.testing.assert_close(so[q.format(2)], s1[q.format(2)])  # t = 1 at the last
    torch.testing.assert_close(so[q.format(1)], slerp([s1[q.format(1)]], s0[q.format(1)], t=0.5))
    torch.testing.assert_close(so["model.layers.0.mlp.up_proj.weight"], s1["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(so["model.embed_tokens.weight"], s0["model.embed_tokens.weight"])  # before layers
    torch.testing.assert_close(so["lm_head.weight"], s0["lm_head.weight"])  # outside the layers: the first value


def test_passthrough_slices_stack_layers_and_relayer_the_config(tmp_path):
    a = save(build("qwen2", seed=1), tmp_path / "a")
    b = save(build("qwen2", seed=2), tmp_path / "b")
    cfg = write_config(tmp_path / "m.yaml", {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(b), "layer_range": [1, 2]}]}],
    })
    r = run_cli("merge", cfg, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["num_hidden_layers"] == 3 and len(conf["layer_types"]) == 3
    sa, sb, so = state(a), state(b), state(tmp_path / "out")
    k = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(so[k.format(0)], sa[k.format(0)]) and torch.equal(so[k.format(1)], sa[k.format(1)])
    assert torch.equal(so[k.format(2)], sb[k.format(1)])
    assert torch.equal(so["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert load(tmp_path / "out", "qwen2")(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 97)


def test_layer_pattern_picks_each_layer_from_its_letter(tmp_path):
    a = save(build("gpt2", seed=1, n_layer=4), tmp_path / "a")
    b = save(build("gpt2", seed=2, n_layer=4), tmp_path / "b")
    cfg = write_config(tmp_path / "m.yaml", {"merge_method": "passthrough", "layer_pattern": "ABBA",
                                             "models": [{"model": str(a)}, {"model": str(b)}]})
    assert run_cli("merge", cfg, "-o", tmp_path / "out").returncode == 0
    sa, sb, so = state(a), state(b), state(tmp_path / "out")
    k = "transformer.h.{}.mlp.c_fc.weight"
    for i, src in enumerate([sa, sb, sb, sa]):
        assert torch.equal(so[k.format(i)], src[k.format(i)])
    assert torch.equal(so["transformer.wte.weight"], sa["transformer.wte.weight"])


def test_dare_is_reproducible_from_the_seed(tmp_path):
    base, a, b = family_set(tmp_path, "gpt2", 2)
    cfg = write_config(tmp_path / "m.yaml", {
        "merge_method": "dare_ties", "base_model": str(base),
        "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"density": 0.5}})
    for out, seed in [("o1", 1), ("o2", 1), ("o3", 2)]:
        assert run_cli("merge", cfg, "-o", tmp_path / out, "--random-seed", seed).returncode == 0
    s1, s2, s3 = (state(tmp_path / o) for o in ("o1", "o2", "o3"))
    k = "transformer.h.0.mlp.c_fc.weight"
    assert all(torch.equal(s1[n], s2[n]) for n in s1)
    assert not torch.equal(s1[k], s3[k])


def test_mixed_tied_and_untied_heads_are_merged_as_transformers_loads_them(tmp_path):
    tied = build("llama", seed=0, tie_word_embeddings=True)
    untied = finetune(build("llama", seed=0, tie_word_embeddings=False), seed=5)
    save(tied, tmp_path / "tied")
    save(untied, tmp_path / "untied")
    assert "lm_head.weight" not in state(tmp_path / "tied")
    cfg = write_config(tmp_path / "m.yaml", {"merge_method": "linear",
                                             "models": [{"model": str(tmp_path / "tied")},
                                                        {"model": str(tmp_path / "untied")}]})
    r = run_cli("merge", cfg, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["tie_word_embeddings"] is False
    so, st, su = state(tmp_path / "out"), state(tmp_path / "tied"), state(tmp_path / "untied")
    torch.testing.assert_close(so["lm_head.weight"], (st["model.embed_tokens.weight"] + su["lm_head.weight"]) / 2)
    merged = load(tmp_path / "out", "llama")
    torch.testing.assert_close(merged.lm_head.weight, so["lm_head.weight"])


def test_pytorch_bin_inputs_and_single_file_output(tmp_path):
    base = build("gpt2")
    save(base, tmp_path / "a", safe=False)
    save(finetune(base, 3), tmp_path / "b", safe=False)
    assert (tmp_path / "a" / "pytorch_model.bin").is_file()
    cfg = write_config(tmp_path / "m.yaml", {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "a"),
                                             "models": [{"model": str(tmp_path / "b")}],
                                             "parameters": {"lambda": 0.5}, "out_dtype": "float16"})
    r = run_cli("merge", cfg, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    sa, sb, so = state(tmp_path / "a"), state(tmp_path / "b"), state(tmp_path / "out")
    n = "transformer.h.1.attn.c_attn.weight"
    torch.testing.assert_close(so[n], (sa[n] + 0.5 * (sb[n] - sa[n])).half().float())
    assert load(tmp_path / "out", "gpt2").dtype == torch.float32  # loads; config says float16


def test_tokenizer_files_come_from_tokenizer_source(tmp_path):
    """Models of one vocabulary: the output's tokenizer is the source's files, as they are."""
    base, a = family_set(tmp_path, "gpt2", 1)
    word_tokenizer(base_tokens(97), model_max_length=111).save_pretrained(base)
    word_tokenizer(base_tokens(97), model_max_length=222).save_pretrained(a)
    for src, want in [("base", base), (str(a), a)]:
        cfg = write_config(tmp_path / "m.yaml", {"merge_method": "linear", "base_model": str(base),
                                                 "models": [{"model": str(base)}, {"model": str(a)}],
                                                 "tokenizer_source": src})
        out = tmp_path / f"out-{want.name}"
        assert run_cli("merge", cfg, "-o", out).returncode == 0
        for f in ("tokenizer.json", "tokenizer_config.json"):
            assert (out / f).read_bytes() == (want / f).read_bytes()
    assert "linear" in (tmp_path / "out-gpt2-ft0" / "README.md").read_text()


def test_dry_run_writes_nothing_and_public_api_matches_cli(tmp_path):
    base, a = family_set(tmp_path, "mistral", 1)
    cfg = {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(a)}]}
    r = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out", "--dry-run")
    assert r.returncode == 0 and "dry run" in r.stdout
    assert not (tmp_path / "out").exists()
    import modelcypher

    plan = modelcypher.merge(cfg, tmp_path / "api", device="cpu")
    assert len(plan.tasks) == len(state(base))
    assert (tmp_path / "api" / "model.safetensors").is_file()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dfs", "della_linear", "ties"])
def test_row_blocks_give_the_whole_tensor_result(tmp_path, monkeypatch, method):
    """Row-local and streamed methods computed over blocks of rows write exactly what one whole call
    computes."""
    import modelcypher.merging.run as run
    from modelcypher.api import merge
    from modelcypher.merging.registry import get_method

    base, a, b = family_set(tmp_path, "llama", 2, dtype=torch.bfloat16)
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(a)}, {"model": str(b)}]}
    if method == "della_linear":
        cfg["models"] = [{"model": str(a), "parameters": {"density": 1.0}}, {"model": str(b)}]
    if method == "ties":
        cfg["models"] = [{"model": str(a), "parameters": {"density": 0.3}}, {"model": str(b)}]
        cfg["parameters"] = {"density": 0.6}
    merge(cfg, tmp_path / "whole", device="cpu")
    monkeypatch.setattr(run, "BLOCK_ELEMENTS", 100)  # embeddings: blocks of 3 rows of 32
    assert len(run.row_blocks(run.TensorTask("e", (), None, {}, (97, 32), torch.float32), True)) == 33
    merge(cfg, tmp_path / "blocks", device="cpu")
    whole, blocks = state(tmp_path / "whole"), state(tmp_path / "blocks")
    assert get_method(method).rowwise or get_method(method).stream
    for n in whole:
        torch.testing.assert_close(blocks[n], whole[n], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_multi_pass_methods_give_the_same_merge_held_or_read_again(tmp_path, monkeypatch, method):
    """Multi-pass methods keep a tensor's raw blocks between passes (up to HOLD_BYTES) or read them
    again: the same output to the bit, over many blocks per tensor."""
    import modelcypher
    from modelcypher.merging import run

    base, a, b = family_set(tmp_path, "llama", 2, dtype=torch.bfloat16)
    models = [{"model": str(a), "parameters": {"density": 0.4}}, {"model": str(b), "parameters": {"density": 0.6}}]
    cfg = ({"merge_method": "ties", "base_model": str(base), "models": models} if method == "ties" else
           {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(a)}],
            "parameters": {"t": 0.3}})
    monkeypatch.setattr(run, "BLOCK_ELEMENTS", 256)
    modelcypher.merge(cfg, tmp_path / "held")
    monkeypatch.setattr(run, "HOLD_BYTES", 0)
    modelcypher.merge(cfg, tmp_path / "read")
    held, read = state(tmp_path / "held"), state(tmp_path / "read")
    assert set(held) == set(read)
    for n in held:
        assert torch.equal(held[n], read[n]), n


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_tensors_computed_side_by_side_give_the_same_merge(tmp_path, monkeypatch, method):
    """One worker or several, short queues or not: the same output to the bit (DARE is seeded per tensor)."""
    import modelcypher
    from modelcypher.merging import run

    base, a, b = family_set(tmp_path, "llama", 2, dtype=torch.bfloat16, shard="20KB")
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"density": 0.5}} for m in (a, b)]}
    monkeypatch.setattr(run, "BLOCK_ELEMENTS", 256)
    monkeypatch.setattr(run, "cpu_workers", lambda: (1, 1))
    modelcypher.merge(cfg, tmp_path / "one", device="cpu")
    monkeypatch.setattr(run, "cpu_workers", lambda: (3, 1))
    monkeypatch.setattr(run, "QUEUED_BLOCKS", 2)
    modelcypher.merge(cfg, tmp_path / "three", device="cpu")
    one, three = state(tmp_path / "one"), state(tmp_path / "three")
    assert set(one) == set(three)
    for n in one:
        assert torch.equal(one[n], three[n]), n
