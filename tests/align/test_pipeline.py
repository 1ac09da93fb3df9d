"""`modelcypher align` end to end: checkpoints on disk in, an equivalent checkpoint of B aligned onto A out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import randomize, tiny_mlp, tiny_model

from cli_util import run_cli, write_config
from modelcypher.align import pipeline
from modelcypher.align.equivalence import NotEquivalentError
from modelcypher.align.transform import Alignment, apply, fold_norms, random_alignment
from modelcypher.arch.families import spec_for
from modelcypher.checkpoint import Checkpoint

TEXT = "".join(f"{w} " for w in "to be or not to be that is the question whether tis nobler".split()) * 40


def save_dir(path: Path, config: dict, sd: dict[str, torch.Tensor], tokenizer_from: Path | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    if tokenizer_from is not None:
        for f in tokenizer_from.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copyfile(f, path / f.name)
    return path


def zoo_gpt2(path: Path, seed: int = 0, n_embd: int = 32, n_head: int = 4) -> Path:
    """A random 2-layer character-level GPT-2 saved by the zoo (model and tokenizer)."""
    from modelcypher.zoo import chartok, gpt2

    tok = chartok.build_char_tokenizer(sorted(set(TEXT)))
    torch.manual_seed(seed)
    model = gpt2.make_model(gpt2.TrainConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=64), tok)
    model.load_state_dict(randomize(model.state_dict(), seed))
    return gpt2.save(model, tok, path)


def permuted_copy(src: Path, dst: Path, residual: str = "permutation", seed: int = 3,
                  kinds: tuple[str, ...] = ("perm", "heads", "residual")) -> Path:
    ck = Checkpoint(src)
    sd = {n: ck.get(n) for n in ck.names}
    hidden = random_alignment(spec_for(ck.config, sd), kinds=kinds, residual=residual, seed=seed)
    sd_b, config_b = apply(sd, ck.config, hidden)
    return save_dir(dst, config_b, sd_b, tokenizer_from=src)


def state(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names}


def logits(path: Path, seed: int = 0) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).float().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_permuted_zoo_gpt2_aligns_back_to_the_original_weights(tmp_path):
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b")
    r = run_cli("align", b, "--to", a, "-o", tmp_path / "out", "--residual", "permutation")
    assert r.returncode == 0, r.stderr
    assert "objective" in r.stdout and "max logit gap" in r.stdout
    out, sa = state(tmp_path / "out"), state(a)
    assert out.keys() == sa.keys() and all(torch.equal(out[k], sa[k]) for k in sa)  # exact: moved, not changed
    torch.testing.assert_close(logits(tmp_path / "out"), logits(b), atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert tok.decode(tok("to be")["input_ids"]) == "to be"


def cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI's own entry point, in this process (the subprocess tests above cover `python -m`)."""
    from modelcypher.cli import main

    capsys.readouterr()  # drop what building the models printed
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_rotated_llama_aligns_back_in_the_folded_parameterization(tmp_path, capsys):
    config, sd_a = tiny_model("llama", tie=True)
    a = save_dir(tmp_path / "a", config, sd_a)
    b = permuted_copy(a, tmp_path / "b", residual="orthogonal")
    rc, _, err = cli(capsys, "align", b, "--to", a, "-o", tmp_path / "out")  # auto: orthogonal for RMSNorm
    assert rc == 0, err
    folded, folded_config = fold_norms(sd_a, config)
    out = state(tmp_path / "out")
    for k in folded:
        torch.testing.assert_close(out[k], folded[k], atol=1e-5, rtol=0, msg=k)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(tmp_path / "out"), logits(b), atol=1e-4, rtol=1e-4)


def test_activation_matching_from_probe_text_recovers_the_permutations(tmp_path):
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b")
    (tmp_path / "probe.txt").write_text(TEXT)
    report = pipeline.align_checkpoint(b, a, tmp_path / "out", method="activation", data=tmp_path / "probe.txt",
                                       residual="permutation")
    assert report["tokens"] == len(TEXT)
    out, sa = state(tmp_path / "out"), state(a)
    assert all(torch.equal(out[k], sa[k]) for k in sa)


def test_bf16_checkpoint_is_written_in_bf16_within_its_rounding(tmp_path):
    config, sd_a = tiny_model("qwen2", tie=True)
    a = save_dir(tmp_path / "a", config, {k: v.bfloat16() for k, v in sd_a.items()})
    b = permuted_copy(a, tmp_path / "b", residual="orthogonal")
    report = pipeline.align_checkpoint(b, a, tmp_path / "out")
    assert all(v.dtype == torch.bfloat16 for v in state(tmp_path / "out").values())
    assert report["residual"] == "orthogonal" and report["max_logit_gap"] > 0


def test_zoo_mlp_aligns_in_its_own_format(tmp_path):
    config, sd_a = tiny_mlp()
    a = save_dir(tmp_path / "a", config, sd_a)
    b = permuted_copy(a, tmp_path / "b")
    report = pipeline.align_checkpoint(b, a, tmp_path / "out")
    out = state(tmp_path / "out")
    assert all(torch.equal(out[k], sd_a[k]) for k in sd_a)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config
    assert report["family"] == "modelcypher-mlp"
    with pytest.raises(pipeline.UserError, match="feature vectors, not text"):
        pipeline.align_checkpoint(b, a, tmp_path / "out2", method="activation", data=tmp_path / "x.txt")


def bad_pair(tmp_path: Path, case: str) -> tuple[Path, Path, list[str], str]:
    a = zoo_gpt2(tmp_path / "a")
    if case == "family":
        config, sd = tiny_model("llama")
        return a, save_dir(tmp_path / "b", config, sd), [], "models differ in family"
    if case == "shape":
        # wider, and with larger heads: only head counts may differ between widths (tests/align/test_lift.py)
        return a, zoo_gpt2(tmp_path / "b", n_embd=48), [], "differ in head size (12 vs 8) at h.0.heads"
    if case == "unknown family":
        a, b = (save_dir(tmp_path / n, {"model_type": "opt"}, {"w": torch.zeros(2)}) for n in ("a2", "b"))
        return a, b, [], "no symmetry spec for model_type 'opt'; supported: llama, mistral"
    (tmp_path / "short.txt").write_text("to be or not")
    args = ["--method", "activation", "--data", str(tmp_path / "short.txt")]
    return a, permuted_copy(a, tmp_path / "b"), args, "too short for activation matching: 12 tokens"


@pytest.mark.parametrize("case", ["family", "shape", "unknown family", "short probe"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    a, b, extra, message = bad_pair(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = cli(capsys, "align", b, "--to", a, "-o", tmp_path / "out", *extra)
    assert rc == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary directory


def test_a_non_equivalent_result_is_refused_and_not_written(tmp_path, monkeypatch):
    config, sd = tiny_model("llama")
    a = save_dir(tmp_path / "a", config, sd)
    ck = Checkpoint(a)
    original = pipeline.transform_tensor
    monkeypatch.setattr(pipeline, "transform_tensor", lambda w, *args: original(w, *args) * 1.01)
    with pytest.raises(NotEquivalentError, match="not equivalent"):
        pipeline.write_verified(ck, spec_for(config, sd), Alignment({}), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_large_models_are_checked_layer_chunk_by_chunk(tmp_path, monkeypatch):
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=24, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8).to_dict()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    a = save_dir(tmp_path / "a", config, randomize(model.state_dict(), 0))
    b = permuted_copy(a, tmp_path / "b", residual="orthogonal")
    monkeypatch.setattr(pipeline, "CHECK_PARAMS", 5000)
    monkeypatch.setattr(pipeline, "CHECK_VOCAB_ROWS", 16)
    assert pipeline.check_chunks(Checkpoint(b)) == [[0], [1], [2], [3]]
    pipeline.align_checkpoint(b, a, tmp_path / "out")
    # A transform that breaks one layer only is caught by that layer's chunk.
    original = pipeline.transform_tensor
    broken = lambda w, entries, ops: original(w, entries, ops).flip(0) if w.shape == (24, 32) else original(  # noqa: E731
        w, entries, ops)
    monkeypatch.setattr(pipeline, "transform_tensor", broken)
    with pytest.raises(NotEquivalentError):
        pipeline.align_checkpoint(b, a, tmp_path / "out2")


def test_merge_with_align_section_equals_merging_the_base_with_itself(tmp_path, capsys):
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b")
    self_merge = {"merge_method": "linear", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(a)}]}
    aligned_merge = {**self_merge, "models": [{"model": str(a)}, {"model": str(b)}],
                     "align": {"method": "weight", "residual": "permutation"}}
    for name, cfg in (("self", self_merge), ("aligned", aligned_merge)):
        rc, _, err = cli(capsys, "merge", write_config(tmp_path / f"{name}.yaml", cfg), "-o", tmp_path / name)
        assert rc == 0, err
    want, got = state(tmp_path / "self"), state(tmp_path / "aligned")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not (tmp_path / "aligned" / ".aligned").exists()


def test_merge_with_orthogonal_alignment_computes_the_base_function(tmp_path):
    from modelcypher.api import merge

    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b", residual="orthogonal")
    merge({"merge_method": "linear", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
           "align": {"method": "weight"}}, tmp_path / "out", device="cpu")
    torch.testing.assert_close(logits(tmp_path / "out"), logits(a), atol=1e-4, rtol=1e-4)


def test_vo_and_qk_bases_from_the_command_line_and_a_merge_config(tmp_path, capsys):
    """A Llama copy moved by every symmetry (Q-K: rotations of the rotary pairs) aligns back with --vo --qk,
    and a merge config asking for them merges it with the base into the base's function."""
    config, sd_a = tiny_model("llama")
    a = save_dir(tmp_path / "a", config, sd_a)
    b = permuted_copy(a, tmp_path / "b", residual="orthogonal", kinds=("perm", "heads", "vo", "qk", "residual"))
    rc, _, err = cli(capsys, "align", b, "--to", a, "-o", tmp_path / "out", "--vo", "--qk")
    assert rc == 0, err
    folded, _ = fold_norms(sd_a, config)
    out = state(tmp_path / "out")
    for k in folded:
        torch.testing.assert_close(out[k], folded[k], atol=1e-3, rtol=0, msg=k)
    from modelcypher.api import merge

    merge({"merge_method": "linear", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
           "align": {"method": "weight", "vo": True, "qk": True}}, tmp_path / "merged", device="cpu")
    torch.testing.assert_close(logits(tmp_path / "merged"), logits(a), atol=1e-4, rtol=1e-4)


def test_learned_matching_from_the_command_line_writes_an_equivalent_model(tmp_path, capsys):
    a, b = zoo_gpt2(tmp_path / "a", seed=0), zoo_gpt2(tmp_path / "b", seed=1)
    (tmp_path / "train.txt").write_text(TEXT)
    rc, out, err = cli(capsys, "align", b, "--to", a, "-o", tmp_path / "out", "--method", "learned",
                       "--data", tmp_path / "train.txt", "--steps", "5", "--lr", "1e-2")
    assert rc == 0, err
    assert "then midpoint loss" in out and "in 5 steps" in out
    torch.testing.assert_close(logits(tmp_path / "out"), logits(b), atol=1e-4, rtol=1e-4)


def test_learned_matching_without_data_samples_its_probes_from_the_models(tmp_path, capsys):
    a, b = zoo_gpt2(tmp_path / "a", seed=0), zoo_gpt2(tmp_path / "b", seed=1)
    report = pipeline.align_checkpoint(b, a, tmp_path / "out", method="learned", steps=3, lr=1e-2)
    assert report["probes"] == "text sampled from the two models" and report["tokens"] > 0
    torch.testing.assert_close(logits(tmp_path / "out"), logits(b), atol=1e-4, rtol=1e-4)
    again = pipeline.align_checkpoint(b, a, tmp_path / "again", method="learned", steps=3, lr=1e-2)
    assert again["midpoint_loss"] == report["midpoint_loss"]  # seeded probes, seeded steps
    (tmp_path / "held_out.txt").write_text(TEXT)
    rc, out, err = cli(capsys, "barrier", a, b, "--data", tmp_path / "held_out.txt", "--align", "learned")
    assert rc == 0, err
    assert json.loads(out)["aligned"]["probes"] == "text sampled from the two models"  # never the held-out text


def test_learned_matching_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = zoo_gpt2(tmp_path / "a", seed=0), zoo_gpt2(tmp_path / "b", seed=1)
    (tmp_path / "t.txt").write_text(TEXT)
    rc, _, err = cli(capsys, "align", b, "--to", a, "-o", tmp_path / "out", "--method", "learned",
                     "--residual", "permutation", "--data", "t.txt")
    assert rc == 2 and "learned matching refines an orthogonal residual" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_merge_with_learned_alignment_runs_with_or_without_data(tmp_path, capsys):
    a, b = zoo_gpt2(tmp_path / "a", seed=0), zoo_gpt2(tmp_path / "b", seed=1)
    (tmp_path / "train.txt").write_text(TEXT)
    cfg = {"merge_method": "linear", "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
           "align": {"method": "activation"}}
    rc, _, err = cli(capsys, "merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "m")
    assert rc == 2 and "method activation needs data" in err and len(err.strip().splitlines()) == 1, err
    cfg["align"] = {"method": "learned", "steps": 3}  # probes sampled from the models
    rc, _, err = cli(capsys, "merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "m0")
    assert rc == 0, err
    cfg["align"].update(data=str(tmp_path / "train.txt"))
    rc, _, err = cli(capsys, "merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "m")
    assert rc == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False  # folded


def test_an_aligned_data_driven_merge_reuses_its_statistics(tmp_path):
    """Statistics are cached by the user's models and the alignment's settings, not by the aligned copies'
    temporary paths: the second identical merge computes nothing, and other settings compute anew."""
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b")
    (tmp_path / "text.txt").write_text(TEXT)
    cfg = {"merge_method": "fisher", "models": [{"model": str(a)}, {"model": str(b)}],
           "parameters": {"data": str(tmp_path / "text.txt")}, "align": {"method": "weight", "residual": "permutation"}}
    path = write_config(tmp_path / "m.yaml", cfg)
    first = run_cli("merge", path, "-o", tmp_path / "out")
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("computing fisher") == 2
    again = run_cli("merge", path, "-o", tmp_path / "out", "--overwrite")
    assert again.returncode == 0 and "computing" not in again.stdout, again.stdout + again.stderr
    assert len(list((tmp_path / "out.stats").glob("fisher-*.safetensors"))) == 2
    cfg["align"]["seed"] = 1  # another alignment: new statistics for the aligned model, not the reference
    other = run_cli("merge", write_config(tmp_path / "m.yaml", cfg), "-o", tmp_path / "out", "--overwrite")
    assert other.returncode == 0 and other.stdout.count("computing fisher") == 1, other.stdout + other.stderr
