import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from modelcypher.errors import UserError
from modelcypher.merging.statistics import fisher_diagonal, input_grams, linear_layouts


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _ids(n, length, seed=0):
    return torch.randint(0, 50, (n, length), generator=torch.Generator().manual_seed(seed))


def _seq_grad_sq(model, ids):
    params = [p for _, p in model.named_parameters()]
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
    ll = logp.gather(-1, ids[:, 1:, None]).mean()
    grads = torch.autograd.grad(ll, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.pow(2))
            for (n, p), g in zip(model.named_parameters(), grads, strict=True)}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fisher_equals_hand_computed_squared_gradient(name, request):
    model = request.getfixturevalue(name)
    ids = _ids(1, 10)
    f = fisher_diagonal(model, [ids])
    ref = _seq_grad_sq(model, ids)
    assert set(ref) <= set(f)
    for n, r in ref.items():
        assert f[n].shape == r.shape and f[n].dtype == torch.float32
        torch.testing.assert_close(f[n], r, atol=1e-10, rtol=1e-5)
    assert not any(p.grad is not None for p in model.parameters())


def test_fisher_is_mean_over_sequences_and_ignores_padding(gpt2):
    a, b = _ids(1, 8, 1), _ids(1, 6, 2)
    ra, rb = _seq_grad_sq(gpt2, a), _seq_grad_sq(gpt2, b)
    padded = torch.cat([a, torch.cat([b, torch.zeros(1, 2, dtype=torch.long)], 1)])
    mask = torch.ones_like(padded)
    mask[1, 6:] = 0
    f = fisher_diagonal(gpt2, [{"input_ids": padded, "attention_mask": mask}])
    for n in ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight", "transformer.ln_f.bias"):
        torch.testing.assert_close(f[n], 0.5 * (ra[n] + rb[n]), atol=1e-9, rtol=1e-4)
    # tied output head appears under its own name with the same values
    if "lm_head.weight" in f:
        torch.testing.assert_close(f["lm_head.weight"], f["transformer.wte.weight"])


def test_fisher_min_tokens(gpt2):
    with pytest.raises(UserError, match="at least 100"):
        fisher_diagonal(gpt2, [_ids(1, 5)], min_tokens=100)


def test_grams_keys_shapes_gpt2(gpt2):
    g = input_grams(gpt2, [_ids(4, 16)], min_tokens=16)
    layouts = linear_layouts(gpt2)
    assert set(g) == set(layouts)
    assert layouts["transformer.h.0.attn.c_attn.weight"] == "conv1d" and layouts["lm_head.weight"] == "linear"
    sd = gpt2.state_dict()
    for k, v in g.items():
        w = sd[k]
        in_f = w.shape[0] if layouts[k] == "conv1d" else w.shape[1]
        assert v.shape == (in_f, in_f) and v.dtype == torch.float32
        torch.testing.assert_close(v, v.T)
    assert g["transformer.h.0.mlp.c_proj.weight"].shape == (64, 64)
    # lm_head's input is the final hidden state
    ids = _ids(4, 16)
    h = gpt2(input_ids=ids, output_hidden_states=True).hidden_states[-1].reshape(-1, 16)
    torch.testing.assert_close(g["lm_head.weight"], h.T @ h / h.shape[0], atol=1e-5, rtol=1e-4)


def test_grams_llama_padding_and_min_tokens(llama):
    g = input_grams(llama, [_ids(3, 12)])
    assert g["model.layers.1.mlp.down_proj.weight"].shape == (24, 24)
    assert g["model.layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert "lm_head.weight" in g and all(k.endswith(".weight") for k in g)
    assert set(linear_layouts(llama).values()) == {"linear"}
    # padded positions do not count: right-padding a batch leaves the Grams unchanged
    ids = _ids(2, 14, 5)
    plain = input_grams(llama, [ids[:1], ids[1:, :10]], min_tokens=1)
    padded = ids.clone()
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    padded[1, 10:] = 0
    masked = input_grams(llama, [{"input_ids": padded, "attention_mask": mask}], min_tokens=1)
    for k in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        torch.testing.assert_close(masked[k], plain[k], atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="at least 24 tokens"):
        input_grams(llama, [_ids(1, 10)])
