"""Token anchors: where a character model and a BPE model both end a token, each has read exactly the same
prefix of the text, and the anchor's representation in each is its state after that prefix."""

from __future__ import annotations

import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import cross_models as cm
from modelcypher.measure.anchors import pool, segments, token_segments


def bpe(text: str) -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok)


def ends(tok, text: str) -> set[int]:
    return {b for a, b in tok(text, return_offsets_mapping=True)["offset_mapping"] if b > a}


@torch.no_grad()
def test_token_anchors_sit_where_both_tokenizers_end_a_token_and_hold_the_state_after_that_prefix(tmp_path):
    text = cm.probe_text(3000)
    char, word = cm.tokenizer(), bpe(text)
    segs = token_segments(segments(text, 200), [char, word])
    for seg in segs[:5]:
        common = ends(char, seg.text) & ends(word, seg.text)
        assert [e for _, e in seg.spans] == sorted(common)
        assert len(common) < len(ends(char, seg.text))  # BPE merges characters: fewer anchors than characters
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(word), n_embd=32, n_layer=2, n_head=4, n_positions=256)
    gpt2 = tf.GPT2LMHeadModel(cfg).eval()
    llama = tf.AutoModelForCausalLM.from_pretrained(cm.llama(tmp_path / "l")).eval()
    seg = segs[1]
    for model, tok in ((gpt2, word), (llama, char)):
        pooled = pool(model, tok, [seg], 256)
        for k in (0, len(seg.spans) // 2, len(seg.spans) - 1):
            enc = tok(seg.text, add_special_tokens=False, return_offsets_mapping=True)
            t = [b for _, b in enc["offset_mapping"]].index(seg.spans[k][1])  # the token ending the prefix
            ids = torch.tensor([enc["input_ids"][:t + 1]])  # that prefix alone, nothing after it
            last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(pooled.states[-1][k].float(), last, rtol=1e-4, atol=1e-4)


def test_probe_lines_are_read_alone_between_their_line_breaks():
    text = "ab cd\n\n  \nefg\n" + "x" * 30 + " y\n"
    segs = segments(text, 16, lines=True)
    # blank lines dropped; each line framed by its breaks, words at their offsets there; a long line cut as usual
    assert [s.text for s in segs] == ["\nab cd\n", "\nefg\n", "x" * 16, "y"]  # (a too-long word is cut)
    assert segs[0].spans == ((1, 3), (4, 6)) and segs[1].spans == ((1, 4),)
    assert segments(text, 16) != segs  # by default pieces run across lines
