import torch
from transformers import AutoTokenizer

from modelcypher.zoo import shakespeare
from modelcypher.zoo.chartok import build_char_tokenizer, decode_ids, encode_ids


def _tok():
    return build_char_tokenizer(shakespeare.vocab())


def test_round_trip_exact():
    tok = _tok()
    assert len(tok) == len(shakespeare.vocab()) + 2
    samples = [
        shakespeare.text()[:20_000],
        "  leading and trailing spaces  ",
        "\n\nnewlines\n \n  indented\n",
        "a",
        "",
    ]
    for s in samples:
        ids = tok(s)["input_ids"]
        assert len(ids) == len(s)
        assert tok.decode(ids) == s


def test_unknown_characters_map_to_unk():
    tok = _tok()
    ids = tok("a\u00e9b~")["input_ids"]
    assert ids[1] == tok.unk_token_id and ids[3] == tok.unk_token_id
    assert encode_ids("a\u00e9b~\U0001f600", tok).tolist() == tok("a\u00e9b~\U0001f600")["input_ids"]


def test_fast_path_agrees_with_tokenizer():
    tok = _tok()
    text = shakespeare.text()[1_000_000:1_060_000]
    ids = encode_ids(text, tok)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert ids.tolist() == tok(text)["input_ids"]
    assert decode_ids(ids, tok) == text


def test_saved_dir_loads_with_autotokenizer(tmp_path):
    tok = _tok()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = shakespeare.text("history")[:30_000] + "\u00e9 end\n"
    ids = loaded(text)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert ids == encode_ids(text, loaded).tolist() == encode_ids(text, tok).tolist()
    assert loaded.decode(ids[:-6]) == text[:-6]
    assert loaded.unk_token == "<unk>" and loaded.eos_token == "<eos>"
