"""The output's tokenizer: ``tokenizer_source``, the ``tokenizer:`` section (union, base or a model's
vocabulary; per-token rules; padding) and ``chat_template``.

The models mirror mergekit's own tokenizer tests: a base with a 64-token vocabulary; ``chatml``, 64 tokens
and two added ones (66 rows); ``padded``, 64 rows but four added tokens beyond them; ``mixed``, the base's
tokens in another order, missing ten of them and with ten of its own; ``notok``, no tokenizer at all.
Every merge is checked against mergekit 0.1.5's on the same config, token by token (mergekit orders the
tokens it adds by hash, so ids of added tokens may differ between its runs), and the outputs load and run
in transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import base_tokens, build, finetune, save, state, word_tokenizer
from cli_util import run_cli, write_config
from modelcypher import api
from modelcypher.errors import UserError
from modelcypher.merging import run
from modelcypher.merging.vocab import TEMPLATES

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
MIXED = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(63, 12, -1)] + [f"_new_{k}" for k in range(10)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tok")
    base = build("llama", vocab_size=64, num_hidden_layers=2)
    made = {
        "base": (base, word_tokenizer(base_tokens(64))),
        "chatml": (build("llama", seed=1, vocab_size=66, num_hidden_layers=2),
                   word_tokenizer(base_tokens(64), ["<|im_start|>", "<|im_end|>"])),
        "padded": (finetune(base, 3), word_tokenizer(base_tokens(64), [f"<UNUSED_{i}>" for i in range(4)])),
        "mixed": (build("llama", seed=2, vocab_size=64, num_hidden_layers=2), word_tokenizer(MIXED)),
        # BPE (what mergekit can cut back to a model's rows), four added tokens beyond its 64 rows
        "padded_bpe": (finetune(base, 4), word_tokenizer(base_tokens(64), [f"<UNUSED_{i}>" for i in range(4)],
                                                         bpe=True)),
        "notok": (finetune(base, 5), None),  # read as having the base's vocabulary (mergekit's assumption)
    }
    out = {}
    for name, (model, tok) in made.items():
        save(model, root / name)
        if tok is not None:
            tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def mergekit_run(config: dict, out: Path) -> None:
    options = mergekit_merge.MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True)
    mergekit_merge.run_merge(mergekit_config.MergeConfiguration.model_validate(config), str(out), options)


def merge_both(text: str, models: dict[str, str], tmp_path: Path) -> tuple[Path, Path]:
    config = yaml.safe_load(text.format(**models))
    api.merge(config, tmp_path / "ours", device="cpu")
    mergekit_run(config, tmp_path / "theirs")
    return tmp_path / "ours", tmp_path / "theirs"


def vocab(path: Path) -> dict[str, int]:
    return AutoTokenizer.from_pretrained(path).get_vocab()


def assert_same_merge(ours: Path, theirs: Path) -> None:
    """The same tokens (and added tokens, special or not), vocab_size, and every tensor within float32
    rounding, a vocabulary tensor's rows compared token by token and its padding rows as they are."""
    to, tt = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    vo, vt = to.get_vocab(), tt.get_vocab()
    assert sorted(vo) == sorted(vt)
    assert sorted((a.content, a.special) for a in to.added_tokens_decoder.values()) == \
        sorted((a.content, a.special) for a in tt.added_tokens_decoder.values())
    size = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert size == json.loads((theirs / "config.json").read_text())["vocab_size"]
    so, st = state(ours), state(theirs)
    assert sorted(so) == sorted(st)
    order = torch.tensor([vt[t] for t, _ in sorted(vo.items(), key=lambda kv: kv[1])])
    for name, t in st.items():
        if name in VOCAB:
            assert so[name].shape[0] == size
            t = torch.cat([t[order], t[len(vt):]])
        scale = float(t.abs().max()) or 1.0
        torch.testing.assert_close(so[name], t, rtol=1e-5, atol=2e-6 * scale, msg=lambda m, n=name: f"{n}: {m}")


PARITY = {
    # mergekit's test_source_union, with a model of its own token order
    "union": """
merge_method: linear
base_model: {base}
models: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {padded}, parameters: {{weight: 1}}}},
         {{model: {chatml}, parameters: {{weight: 1}}}}, {{model: {mixed}, parameters: {{weight: 0.5}}}}]
dtype: float32
tokenizer_source: union
""",
    # the base's rows fill what a model lacks, and the base is the method's own
    "union_task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models: [{{model: {chatml}, parameters: {{weight: 0.7}}}}, {{model: {mixed}, parameters: {{weight: 0.4}}}},
         {{model: {notok}, parameters: {{weight: 0.3}}}}]
parameters: {{lambda: 0.9}}
dtype: float32
tokenizer: {{source: union}}
""",
    # mergekit's test_force_token and test_model_token_id, a zero row and padding
    "union_tokens_padded": """
merge_method: linear
base_model: {base}
models: [{{model: {base}, parameters: {{weight: 1}}}}, {{model: {chatml}, parameters: {{weight: 2}}}}]
dtype: float32
tokenizer:
  source: union
  pad_to_multiple_of: 16
  tokens:
    _tok_10: {{source: {chatml}, force: true}}
    _tok_11: {{source: {base}, force: true}}
    _tok_20: {{source: {{kind: model_token, model: {chatml}, token_id: 64}}, force: true}}
    _tok_21: {{source: {{kind: model_token, model: {base}, token: <s>}}, force: true}}
    _tok_22: {{source: {{kind: zero}}, force: true}}
    <|im_end|>: {{source: {{kind: zero}}}}
    brand_new: {{source: {{kind: model_token, model: {chatml}, token: <|im_start|>}}}}
""",
    # a model's vocabulary; a multiple that the vocabulary is not near
    "model_source": """
merge_method: task_arithmetic
base_model: {base}
models: [{{model: {padded}, parameters: {{weight: 0.7}}}}, {{model: {chatml}, parameters: {{weight: 0.5}}}}]
dtype: float32
tokenizer: {{source: {chatml}, pad_to_multiple_of: 7, tokens: {{_tok_10: {{source: {chatml}, force: true}}}}}}
""",
    # a base whose tokenizer runs past its rows: cut back to them
    "base_cut_to_its_rows": """
merge_method: linear
base_model: {padded_bpe}
models: [{{model: {padded_bpe}, parameters: {{weight: 1}}}}, {{model: {base}, parameters: {{weight: 1}}}}]
dtype: float32
tokenizer: {{source: base, tokens: {{_tok_21: {{source: {{kind: model_token, model: {base}, token: <s>}},
                                              force: true}}}}}}
""",
    "slerp_union": """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {chatml}}}]
parameters: {{t: 0.3}}
dtype: float32
tokenizer_source: union
""",
}


@pytest.mark.parametrize("case", list(PARITY))
def test_same_vocabulary_and_tensors_as_mergekit(models, tmp_path, case):
    assert_same_merge(*merge_both(PARITY[case], models, tmp_path))


def test_union_keeps_the_base_ids_and_a_token_one_model_has_keeps_its_row(models, tmp_path):
    """The defining properties, by hand: the base's tokens keep their ids; a token only one model has
    takes that model's row in every input, so a normalized linear merge writes that row; a token a model
    lacks takes the base's row in it; and the output runs in transformers with its tokenizer."""
    cfg = {"merge_method": "linear", "base_model": models["base"], "tokenizer_source": "union", "dtype": "float32",
           "models": [{"model": models[m], "parameters": {"weight": 1.0}} for m in ("base", "chatml", "mixed")]}
    out = tmp_path / "out"
    api.merge(cfg, out, device="cpu")
    v = vocab(out)
    assert all(v[t] == i for i, t in enumerate(base_tokens(64)))
    assert len(v) == 64 + 2 + 10
    e = state(out)["model.embed_tokens.weight"]
    eb, ec, em = (state(models[m])["model.embed_tokens.weight"] for m in ("base", "chatml", "mixed"))
    torch.testing.assert_close(e[v["<|im_start|>"]], ec[64])
    torch.testing.assert_close(e[v["_new_3"]], em[MIXED.index("_new_3")])
    # _tok_5: base and chatml have it, mixed lacks it (so reads the base's row)
    torch.testing.assert_close(e[v["_tok_5"]], (eb[5] + ec[5] + eb[5]) / 3)
    # _tok_40: everyone has it, mixed at another id
    torch.testing.assert_close(e[v["_tok_40"]], (eb[40] + ec[40] + em[MIXED.index("_tok_40")]) / 3)

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("_tok_5 <|im_start|> _new_3 _tok_40", return_tensors="pt").input_ids
    assert ids[0].tolist() == [v["_tok_5"], v["<|im_start|>"], v["_new_3"], v["_tok_40"]]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(model.get_input_embeddings()(ids)[0], e[ids[0]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, len(v)) and torch.isfinite(logits).all()


def test_source_base_adds_new_tokens_and_a_bare_token_is_zero(models, tmp_path):
    """``source: base`` with tokens the base lacks (mergekit 0.1.5 fails here: its base tokenizer is
    changed while its permutations are read): they follow the base's ids, with their rules' rows; a token
    listed without a source and found in no model is zeros; padding rows are the mean row."""
    cfg = {"merge_method": "linear", "base_model": models["base"], "dtype": "float32",
           "models": [{"model": models["base"], "parameters": {"weight": 1.0}},
                      {"model": models["padded"], "parameters": {"weight": 1.0}}],
           "tokenizer": {"source": "base", "tokens": {"<|im_start|>": {"source": {
               "kind": "model_token", "model": models["base"], "token_id": 7}}, "brand_new": {}}},
           "pad_to_multiple_of": 8}
    out = tmp_path / "out"
    plan = api.merge(cfg, out, device="cpu")
    assert any("padded to 72 rows" in n for n in plan.notes)
    v = vocab(out)
    assert v["<|im_start|>"] == 64 and v["brand_new"] == 65 and len(v) == 66
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 72
    e = state(out)["model.embed_tokens.weight"]
    eb, ep = state(models["base"])["model.embed_tokens.weight"], state(models["padded"])["model.embed_tokens.weight"]
    torch.testing.assert_close(e[64], eb[7])
    assert (e[65] == 0).all()
    mean = (torch.cat([eb, eb[7:8], eb[:1] * 0]).mean(0) + torch.cat([ep, eb[7:8], eb[:1] * 0]).mean(0)) / 2
    torch.testing.assert_close(e[66:], mean.expand(6, -1))


def test_rows_read_in_blocks_give_the_whole_tensor_result(models, tmp_path, monkeypatch):
    """A row-local method reads a vocabulary tensor in blocks of rows (memory bounded by the block, not
    the vocabulary): the result is the one of reading it whole."""
    cfg = yaml.safe_load(PARITY["union_tokens_padded"].format(**models))
    api.merge(cfg, tmp_path / "whole", device="cpu")
    monkeypatch.setattr(run, "BLOCK_ELEMENTS", 5 * 32)  # blocks of 5 rows
    api.merge(cfg, tmp_path / "blocks", device="cpu")
    a, b = state(tmp_path / "whole"), state(tmp_path / "blocks")
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_gather_gives_each_input_its_own_row_or_the_mean_of_the_fills_rows():
    """The row layout by its definition, on tensors of scattered, permuted and missing rows: any block of
    rows is those rows of the whole; an input's row is its own where it has one, else the mean of the
    fill's rows (zeros for an empty fill), and padding rows are the given means."""
    import numpy as np

    from modelcypher.merging.vocab import RowMap, gather

    rng = np.random.default_rng(0)
    n, width = 300, 4
    tensors = [torch.randn(n, width, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    own = [np.arange(n), rng.permutation(n), np.arange(n)]
    own[1][rng.choice(n, 120, replace=False)] = -1
    own[2][rng.choice(n, 120, replace=False)] = -1
    fills = {}
    for t in range(n):
        if t % 37 == 0:
            fills[t] = ()
            own[0][t] = own[1][t] = own[2][t] = -1
        elif own[1][t] < 0 or own[2][t] < 0:
            fills[t] = ((0, t),) + (((1, int(own[1][t])),) if own[1][t] >= 0 else ())
    rm = RowMap(((0, "x"), (1, "x"), (2, "x")), tuple(own), fills, n + 4)
    means = [torch.full((width,), float(i)) for i in range(3)]
    whole = gather(rm, lambda s, rows: tensors[s][rows], slice(0, n + 4), means)
    for a, b in [(0, 1), (5, 64), (250, 304), (299, 302)]:
        part = gather(rm, lambda s, rows: tensors[s][rows], slice(a, b), means)
        for i in range(3):
            assert torch.equal(part[i], whole[i][a:b])
    for i in range(3):
        for t in range(n):
            r = own[i][t]
            want = tensors[i][r] if r >= 0 else (torch.stack([tensors[s][q] for s, q in fills[t]]).mean(0)
                                                  if fills[t] else torch.zeros(width))
            torch.testing.assert_close(whole[i][t], want)
        assert torch.equal(whole[i][n:], means[i].expand(4, -1))


# ----------------------------------------------------------------------------- chat templates


def linear(models: dict[str, str], *names: str, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": models[n], "parameters": {"weight": 0.5}} for n in names],
            **extra}


CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def test_named_chat_template_renders_its_format_and_lives_in_tokenizer_config(models, tmp_path):
    api.merge(linear(models, "base", "padded", chat_template="chatml"), tmp_path / "out", device="cpu")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.chat_template == (TEMPLATES / "chatml.jinja").read_text()
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_renders_as_mergekits_and_every_named_template_renders(models, tmp_path):
    cfg = yaml.safe_load(PARITY["union"].format(**models)) | {"chat_template": "chatml"}
    api.merge(cfg, tmp_path / "ours", device="cpu")
    mergekit_run(cfg, tmp_path / "theirs")
    ours, theirs = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("ours", "theirs"))
    chat = [{"role": "system", "content": "Be brief."}, *CHAT, {"role": "user", "content": "Bye"}]
    assert ours.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(chat, tokenize=False)
    for path in sorted(TEMPLATES.glob("*.jinja")):
        text = ours.apply_chat_template(chat, chat_template=path.read_text(), tokenize=False)
        assert "Be brief." in text and "Bye" in text, path.stem


def test_auto_takes_the_most_common_template_and_a_literal_is_kept(models, tmp_path):
    root = tmp_path / "m"
    paths = {}
    for name, template in [("x", "{{ 'X' }}{% for m in messages %}{{ m.content }}{% endfor %}"),
                           ("y", "{{ 'Y' }}{% for m in messages %}{{ m.content }}{% endfor %}"), ("z", None)]:
        paths[name] = root / name
        save(build("llama", vocab_size=64, num_hidden_layers=2), paths[name])
        tok = word_tokenizer(base_tokens(64))
        if template:
            tok.chat_template = template
        tok.save_pretrained(paths[name])
    paths["x2"] = root / "x2"
    save(build("llama", vocab_size=64, num_hidden_layers=2), paths["x2"])
    AutoTokenizer.from_pretrained(paths["x"]).save_pretrained(paths["x2"])
    ps = {k: str(v) for k, v in paths.items()}
    api.merge(linear(ps, "z", "y", "x", "x2", chat_template="auto"), tmp_path / "auto", device="cpu")
    assert AutoTokenizer.from_pretrained(tmp_path / "auto").apply_chat_template(CHAT, tokenize=False) == "XHiHello."
    literal = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    api.merge(linear(ps, "z", "y", chat_template=literal, tokenizer_source="union"), tmp_path / "lit", device="cpu")
    assert AutoTokenizer.from_pretrained(tmp_path / "lit").chat_template == literal
    plan = api.merge(linear(ps, "z", "z", chat_template="auto"), tmp_path / "none", device="cpu")
    assert any("auto found no template" in n for n in plan.notes)
    assert not AutoTokenizer.from_pretrained(tmp_path / "none").chat_template


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("tokenizer,match", [
    ({"source": "nonesuch"}, "tokenizer.source: 'nonesuch' is not 'union', 'base' nor one of the models"),
    ({"tokens": {"a": {"source": "elsewhere"}}}, "tokenizer.tokens.a.source: model 'elsewhere' is not one of"),
    ({"tokens": {"a": {"source": {"kind": "model_token", "model": "elsewhere", "token_id": 3}}}},
     "tokenizer.tokens.a.source: model 'elsewhere' is not one of"),
    ({"tokens": {"a": {"source": {"kind": "model_token", "model": "{base}", "token_id": 3, "token": "<s>"}}}},
     "give exactly one of token_id or token"),
    ({"tokens": {"a": {"source": {"kind": "model_token", "model": "{base}", "token": "nope"}}}},
     "tokenizer.tokens.a.source: token 'nope' is not in the vocabulary of"),
    ({"tokens": {"a": {"source": {"kind": "model_token", "model": "{chatml}", "token_id": 66}}}},
     "token_id 66 is beyond the 66 rows of"),
    ({"tokens": {"a": {"source": "{padded}"}}}, "has no token 'a'"),
    ({"pad_to_multiple_of": 0}, "tokenizer.pad_to_multiple_of: Input should be greater than or equal to 1"),
])
def test_bad_tokenizer_settings_are_one_line(models, tmp_path, tokenizer, match):
    tk = json.loads(json.dumps(tokenizer).replace("{base}", models["base"]).replace("{chatml}", models["chatml"])
                    .replace("{padded}", models["padded"]))
    cfg = linear(models, "base", "chatml", "padded", base_model=models["base"], tokenizer=tk)
    with pytest.raises(UserError, match=match.replace("(", r"\(").replace("[", r"\[")):
        api.merge(cfg, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_command_line(models, tmp_path):
    for cfg, match in [
        (linear(models, "base", "padded", chat_template="nonesuch"), "chat_template: 'nonesuch' is not a template"),
        (linear(models, "base", tokenizer_source="union", tokenizer={"source": "base"}),
         "give one of tokenizer_source or tokenizer"),
    ]:
        r = run_cli("merge", write_config(tmp_path / "bad.yaml", cfg), "-o", tmp_path / "out")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("modelcypher: error:"), r.stderr
        assert match in lines[0], lines[0]
        assert not (tmp_path / "out").exists()


def test_aligned_copies_are_named_in_the_tokenizer_section_too():
    """An ``align:`` merge plans over aligned copies: the tokenizer section's models follow them."""
    from modelcypher.align.prealign import rename_models
    from modelcypher.merging.config import parse_config

    cfg = parse_config({"merge_method": "linear", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                        "tokenizer": {"source": "b", "tokens": {
                            "x": {"source": "a"}, "y": {"source": {"kind": "model_token", "model": "b", "token": "t"}},
                            "z": {"source": {"kind": "zero"}}}}})
    out = rename_models(cfg, {"a": "A", "b": "B"})
    tk = out.tokenizer
    assert (tk.source, tk.tokens["x"].source, tk.tokens["y"].source.model) == ("B", "A", "B")
    assert cfg.tokenizer.source == "b"  # the config as given is left as it was


def test_a_pipeline_stage_is_named_in_the_tokenizer_section(models, tmp_path):
    """A later stage names an earlier one as its tokenizer source and a token's source."""
    docs = [{"name": "ext", "merge_method": "linear", "models": [{"model": models["chatml"]}]},
            {"merge_method": "linear", "base_model": models["base"], "dtype": "float32",
             "models": [{"model": models["base"]}, {"model": "ext"}],
             "tokenizer": {"source": "ext", "tokens": {"<|im_start|>": {"source": "ext", "force": True}}}}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    api.merge(path, tmp_path / "out", device="cpu")
    v = vocab(tmp_path / "out")
    assert v == vocab(models["chatml"])
    torch.testing.assert_close(state(tmp_path / "out")["model.embed_tokens.weight"][v["<|im_start|>"]],
                               state(models["chatml"])["model.embed_tokens.weight"][64])
