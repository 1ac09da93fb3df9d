import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modelcypher.zoo import gpt2, shakespeare
from modelcypher.zoo.chartok import build_char_tokenizer, encode_ids

TINY = gpt2.TrainConfig(
    n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=8, steps=30, lr=1e-2, warmup_steps=5, seed=3
)


@pytest.fixture(scope="module")
def data():
    tok = build_char_tokenizer(shakespeare.vocab())
    train, val, _ = shakespeare.split(shakespeare.text("comedy")[:400_000])
    return tok, train, val


@pytest.fixture(scope="module")
def tiny(data):
    tok, train, val = data
    return gpt2.train(train, val, TINY, tok)


def test_loss_goes_down_from_uniform(data, tiny):
    tok, train, val = data
    torch.manual_seed(TINY.seed)
    fresh = gpt2.make_model(TINY, tok)
    before = gpt2.eval_loss(fresh, val, tok, max_tokens=4096)
    assert before == pytest.approx(math.log(len(tok)), abs=0.2)
    after = gpt2.eval_loss(tiny, val, tok, max_tokens=4096)
    assert after < before - 0.8
    assert not tiny.training
    assert tiny.config.n_positions == 32 and tiny.config.vocab_size == len(tok)


def test_training_is_bit_reproducible(data, tiny):
    tok, train, val = data
    log = []
    again = gpt2.train(train, val, TINY.with_(eval_interval=10), tok, log=log)
    for (name, a), (_, b) in zip(tiny.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [r["step"] for r in log] == [10, 20, 30]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    other = gpt2.train(train, None, TINY.with_(seed=4, steps=2), tok)
    assert not torch.equal(other.transformer.wte.weight, tiny.transformer.wte.weight)


def test_bf16_autocast_trains_and_is_reproducible(data):
    tok, train, _ = data
    cfg = TINY.with_(steps=5, bf16=True)
    a = gpt2.train(train, None, cfg, tok)
    b = gpt2.train(train, None, cfg, tok)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_finetune_starts_from_init_and_leaves_it_alone(data, tiny):
    tok, train, val = data
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    ft = gpt2.train(train, None, TINY.with_(steps=3, n_layer=7, lr=1e-3), tok, init=tiny)
    assert ft.config.n_layer == 1  # architecture comes from init
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    drift = max((a - b).abs().max().item() for a, b in zip(ft.parameters(), tiny.parameters(), strict=True))
    assert 0 < drift < 0.1


def test_save_and_reload_give_identical_logits(data, tiny, tmp_path):
    tok, _, val = data
    out = gpt2.save(tiny, tok, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    x = encode_ids(val[:64], tok2).reshape(2, 32)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, tiny(input_ids=x).logits)
    assert tok2.decode(tok2(val[:500])["input_ids"]) == val[:500]
    m2, t2 = gpt2.load(out)
    assert gpt2.eval_loss(m2, val, t2, max_tokens=2000) == gpt2.eval_loss(tiny, val, tok, max_tokens=2000)


def test_sample_is_seeded(data, tiny):
    tok, _, _ = data
    a = gpt2.sample(tiny, tok, "ROMEO.\n", n_chars=40, seed=1)
    assert len(a) == 40 and a == gpt2.sample(tiny, tok, "ROMEO.\n", n_chars=40, seed=1)
