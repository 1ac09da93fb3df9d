"""`transfer --refine`: the moved adapter trained so that it moves B's next characters as A's adapter moves
A's. Each token's first character is read right (byte-level BPE and characters); the per-character
distribution is a distribution; across tokenizers the refinement lowers its loss and writes an adapter peft
loads; in the exact case (already at the target) it leaves the adapter as it is."""

from __future__ import annotations

import json

import pytest
import tokenizers as tk
import torch
import transformers as tf

import cross_models as cm
from cli_util import run_cli
from modelcypher.measure.anchors import segments, token_offsets, token_segments
from modelcypher.transfer import refine as R
from modelcypher.transfer.move import transfer_adapter


def bpe(text: str, vocab: int = 300) -> tf.PreTrainedTokenizerFast:
    tok = tk.Tokenizer(tk.models.BPE(unk_token=None))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([text], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    text = cm.probe_text(3000)
    a = cm.llama(root / "a", seed=0)
    adapter = cm.lora(a, root / "adapter", cm.LLAMA_TARGETS, std=0.05)
    tok = bpe(cm.probe_text(20000, start=0))
    torch.manual_seed(3)
    # its vocabulary padded past the tokenizer's, as real models' often are
    g = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok) + 7, n_embd=32, n_layer=2, n_head=4, n_positions=256))
    g.save_pretrained(root / "gpt2-bpe")
    tok.save_pretrained(root / "gpt2-bpe")
    return root, text, a, adapter, root / "gpt2-bpe", tok


@pytest.mark.parametrize("which", ["bpe", "chars"])
def test_every_token_maps_to_its_first_character(models, which):
    _, text, *_, tok = models
    tok = tok if which == "bpe" else cm.tokenizer()
    alphabet = {c: i for i, c in enumerate(sorted(set(text)))}
    fc = R.first_chars(tok, alphabet)
    ids, offs = token_offsets(tok, text)
    assert len(ids) > 100
    assert all(int(fc[t]) == alphabet[text[a]] for t, (a, b) in zip(ids, offs, strict=True) if b > a)
    assert int(fc[tok.convert_tokens_to_ids(tok.eos_token)]) == len(alphabet) if which == "bpe" else True


def test_next_character_log_probabilities_are_a_distribution_and_a_char_model_s_own(models):
    root, text, a, *_ = models
    model, tok = cm.load(a), cm.tokenizer()
    alphabet = {c: i for i, c in enumerate(sorted(set(text)))}
    fc = R.first_chars(tok, alphabet)
    segs = token_segments(segments(text, 128), [tok])
    rows = R.anchor_rows(tok, segs, 256)
    lp = R.all_logprobs(model, rows, fc, len(alphabet), "cpu")
    assert len(lp) == sum(len(p) for _, p in rows) > 1000
    assert torch.allclose(lp.logsumexp(1), torch.zeros(len(lp)), atol=1e-5)
    # a character model's next-character distribution is its next-token distribution
    ids, pos = rows[0]
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, pos], -1)
    c = tok.convert_tokens_to_ids("e")
    assert torch.allclose(lp[:len(pos), alphabet["e"]], own[:, c], atol=1e-5)


def test_refinement_across_tokenizers_lowers_its_loss_and_writes_an_adapter_peft_loads(models, tmp_path):
    root, text, a, adapter, g, tok = models
    plain = transfer_adapter(adapter, a, g, tmp_path / "plain", text=text, rank=4, device="cpu")
    rep = transfer_adapter(adapter, a, g, tmp_path / "refined", text=text, rank=4, refine_steps=40, device="cpu")
    assert plain["refine"] is None
    r = rep["refine"]
    assert r["steps"] == 40 and r["anchors"] > 500 and r["kept"]
    assert r["kl_after"] < 0.9 * r["kl_before"]
    saved = json.loads((tmp_path / "refined" / "transfer_report.json").read_text())
    assert saved["refine"]["kl_after"] == r["kl_after"]
    ids = torch.tensor([tok(cm.probe_text(200, "tragedy"))["input_ids"]])
    with torch.no_grad():
        one, two = (cm.with_adapter(g, tmp_path / d)(input_ids=ids).logits for d in ("plain", "refined"))
    assert not torch.allclose(one, two, atol=1e-4)


def test_refinement_leaves_an_exact_transfer_as_it_is(tmp_path):
    a = cm.llama(tmp_path / "a", seed=0)
    adapter = cm.lora(a, tmp_path / "adapter", cm.LLAMA_TARGETS, std=0.05)
    b = cm.rotated(a, tmp_path / "b", seed=7)
    text = cm.probe_text(3000)
    rep = transfer_adapter(adapter, a, b, tmp_path / "moved", text=text, refine_steps=10, device="cpu")
    assert rep["refine"]["kl_before"] < 1e-5 and not rep["refine"]["kept"]
    ids = torch.tensor([cm.tokenizer()(cm.probe_text(200, "tragedy"), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = cm.with_adapter(a, adapter)(input_ids=ids).logits
        got = cm.with_adapter(b, tmp_path / "moved")(input_ids=ids).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-3


def test_probe_lines_refine_on_each_line_read_alone(models, tmp_path):
    root, text, a, adapter, g, tok = models
    (tmp_path / "probes.txt").write_text(text)
    r = run_cli("transfer", adapter, "--from", a, "--to", g, "-o", tmp_path / "lines", "--probes",
                tmp_path / "probes.txt", "--probe-lines", "--refine", "5", "--rank", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "lines" / "transfer_report.json").read_text())
    by = {lines: sum(len(p) for _, p in R.anchor_rows(tok, token_segments(segments(text, 256, lines=lines),
                                                                           [cm.tokenizer(), tok]), 256))
          for lines in (False, True)}
    assert rep["probe_lines"] and rep["refine"]["anchors"] == by[True] != by[False]
