"""mergekit's own configs, run unchanged: every config of its repository's ``examples/`` and every merge
of its ``tests/test_basic_merges.py`` (the tokenizer and chat-template tests are mirrored in
``test_tokenizer_merge.py``), with the Hugging Face models they name replaced by tiny local stand-ins of the
same family (Llama for the Llama-2 13B fine-tunes, 40 layers deep so their layer ranges stand as written;
Mistral; Granite; GPT-2).

Each config is merged by ModelCypher as written, and by mergekit 0.1.5 with its ``dtype`` set to float32:
ModelCypher always computes in float32 and casts once (README, Compatibility), so its output must be
mergekit's float32 result rounded to the config's dtype, within one unit in the last place of that dtype
(the rounding of a value that sits on a rounding boundary may go either way).

DARE and DELLA drop entries at random, from different generators in the two tools: there the parity is in
distribution (the share of entries kept), as in ``test_mergekit_parity.py``.
The LLaVA merges of mergekit's tests are left out: vision-language checkpoints are not a family here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from checkpoints import build, finetune, save, state
from modelcypher import api
from modelcypher.checkpoint import Checkpoint
from modelcypher.errors import UserError

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, None: torch.float32}

EXAMPLES = {  # mergekit's examples/, as written there; the model names are the stand-ins' keys
    "arcee_fusion": """
models:
  - model: {model_a}
  - model: {model_b}
merge_method: arcee_fusion
base_model: {model_a}
dtype: bfloat16
""",
    "bio-merge": """
models:
  - model: {mistral_instruct}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {biomistral}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {mistral_base}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "gradient-slerp": """
slices:
  - sources:
      - model: {orca}
        layer_range: [0, 40]
      - model: {platypus}
        layer_range: [0, 40]
merge_method: slerp
base_model: {orca}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float16
""",
    "linear": """
models:
  - model: {orca}
    parameters:
      weight: 1.0
  - model: {wizardlm}
    parameters:
      weight: 0.3
  - model: {platypus}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer": """
slices:
  - sources:
    - model: {orca}
      layer_range: [0, 24]
  - sources:
    - model: {platypus}
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "ties": """
models:
  - model: {orca}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {platypus}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {wizardmath}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {llama2}
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}


def two(method: str, a: str = "model_a", b: str = "model_b", base: str | None = None, **params) -> dict:
    """mergekit's ``two_model_config``: weights 0.6 and 0.4, bfloat16."""
    cfg = {"merge_method": method, "models": [{"model": "{" + a + "}", "parameters": {"weight": 0.6}},
                                              {"model": "{" + b + "}", "parameters": {"weight": 0.4}}],
           "dtype": "bfloat16"}
    if base:
        cfg["base_model"] = "{" + base + "}"
    if params:
        cfg["parameters"] = params
    return cfg


def nuslerp(base, row_wise, flatten):
    return two("nuslerp", base=base, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)


BASIC = {  # mergekit's tests/test_basic_merges.py
    "granite_copy": {"merge_method": "passthrough", "models": [{"model": "{granite_a}"}], "dtype": "bfloat16"},
    "granite_linear": two("linear", "granite_a", "granite_b"),
    "granite_slerp": {**two("slerp", "granite_a", "granite_b", base="granite_a", t=0.5),
                      "models": [{"model": "{granite_a}"}, {"model": "{granite_b}"}]},
    "gpt2_copy": {"merge_method": "passthrough", "models": [{"model": "{gpt2_like}"}], "dtype": "bfloat16"},
    "gpt2_stack": {"merge_method": "passthrough", "dtype": "bfloat16",
                   "slices": [{"sources": [{"model": "{gpt2_like}", "layer_range": [0, 12]}]}] * 2},
    "passthrough_scale": {"merge_method": "passthrough", "models": [
        {"model": "{model_a}", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
    "linear": two("linear"),
    "slerp": two("slerp", base="model_a", t=0.35),
    **{f"nuslerp_{'base' if base else 'no_base'}_row_wise_{r}_flatten_{f}": nuslerp(base, r, f)
       for base in (None, "model_c") for r in (False, True) for f in (False, True)},
    "nuslerp_weights_summing_to_zero": {**nuslerp("model_c", False, False), "models": [
        {"model": "{model_a}", "parameters": {"weight": -0.5}}, {"model": "{model_b}", "parameters": {"weight": 0.5}}]},
    "task_arithmetic": two("task_arithmetic", base="model_c"),
    "breadcrumbs": two("breadcrumbs", base="model_c"),
    "ties": two("ties", base="model_c", density=0.3),
    "sce": two("sce", base="model_c", select_topk=0.5),
    "ram": two("ram", base="model_c"),
    "ramplus_tl": two("ramplus_tl", base="model_c", r=0.05, alpha=1.0),
    "multislerp": two("multislerp", base="model_c"),
    "model_stock": two("model_stock", "model_b", "model_c", base="model_a"),
    "model_stock_filter_wise": two("model_stock", "model_b", "model_c", base="model_a", filter_wise=True),
    "arcee_fusion": two("arcee_fusion", base="model_a"),
    "nearswap": two("nearswap", base="model_a", t=0.0001),
    "karcher": two("karcher", base="model_c", max_iter=5, tol=1e-5),
}
RANDOM = {
    "dare_ties": two("dare_ties", base="model_c", density=0.66),
    "della": two("della", base="model_c", density=0.66, epsilon=0.05, **{"lambda": 0.5}),
}


def _granite(seed: int) -> torch.nn.Module:
    cfg = tf.GraniteConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return tf.GraniteForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    deep = dict(num_hidden_layers=40, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                num_key_value_heads=1)
    llama2 = build("llama", **deep)
    mistral = build("mistral")
    built = {
        # the examples: fine-tunes of one base, as the models they stand for are
        "llama2": llama2, "orca": finetune(llama2, 1), "platypus": finetune(llama2, 2),
        "wizardlm": finetune(llama2, 3), "wizardmath": finetune(llama2, 4),
        "mistral_base": mistral, "mistral_instruct": finetune(mistral, 5), "biomistral": finetune(mistral, 6),
        # mergekit's tests: independently initialized models, as its make_picollama etc. make them
        "model_a": build("llama", seed=11), "model_b": build("llama", seed=12), "model_c": build("llama", seed=13),
        "granite_a": _granite(14), "granite_b": _granite(15),
        "gpt2_like": build("gpt2", n_layer=12),
    }
    return {k: str(save(m, root / k)) for k, m in built.items()}


def filled(cfg: dict | str, models: dict[str, str]) -> dict:
    text = cfg if isinstance(cfg, str) else yaml.safe_dump(cfg)
    return yaml.safe_load(text.replace("'{", "{").replace("}'", "}").format(**models))


def mergekit_run(config: dict, out: Path) -> None:
    options = mergekit_merge.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0)
    mergekit_merge.run_merge(mergekit_config.MergeConfiguration.model_validate(config), str(out), options)


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder in the dtype it is stored in."""
    ck = Checkpoint(path)
    return {n: ck.get(n) for n in ck.names}


def both(cfg: dict, tmp_path: Path) -> tuple[dict, dict]:
    """Ours as written; mergekit's computed in float32."""
    api.merge(copy.deepcopy(cfg), tmp_path / "modelcypher", device="cpu")
    mergekit_run({**cfg, "dtype": "float32"}, tmp_path / "mergekit")
    return stored(tmp_path / "modelcypher"), state(tmp_path / "mergekit")


def assert_rounded_alike(ours: dict, theirs: dict, dtype: torch.dtype) -> None:
    """``ours`` is ``theirs`` (float32) rounded to ``dtype``, within one unit in its last place."""
    assert sorted(ours) == sorted(theirs)
    eps = torch.finfo(dtype).eps
    for name, t in theirs.items():
        assert ours[name].dtype == dtype, name
        scale = float(t.abs().max()) or 1.0
        torch.testing.assert_close(ours[name].float(), t.to(dtype).float(), rtol=eps, atol=eps * 1e-3 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


CASES = {**{f"examples/{k}": v for k, v in EXAMPLES.items()}, **{f"test_basic_merges/{k}": v for k, v in BASIC.items()}}


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_config_gives_mergekits_tensors(case, models, tmp_path):
    cfg = filled(CASES[case], models)
    ours, theirs = both(cfg, tmp_path)
    assert_rounded_alike(ours, theirs, DTYPES[cfg.get("dtype")])


def test_the_44_layer_frankenmerge_loads_with_its_44_layers(models, tmp_path):
    api.merge(filled(EXAMPLES["orcamini-platy-44layer"], models), tmp_path / "out", device="cpu")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 44
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()


def test_passthrough_scale_zeroes_o_proj_and_keeps_the_head(models, tmp_path):
    api.merge(filled(BASIC["passthrough_scale"], models), tmp_path / "out", device="cpu")
    out = state(tmp_path / "out")
    assert all((t == 0).all() for n, t in out.items() if "o_proj" in n)
    assert out["lm_head.weight"].count_nonzero() > 0


@pytest.mark.parametrize("case", list(RANDOM))
def test_random_drops_keep_the_same_share(case, models, tmp_path):
    """The share of entries where the merge moved away from the base agrees within 2 points."""
    cfg = filled(RANDOM[case], models)
    ours, theirs = both(cfg, tmp_path)
    base = state(Path(models["model_c"]))
    shares = []
    for result in (ours, theirs):
        moved = sum(int((result[n].float() != base[n].to(result[n].dtype).float()).sum()) for n in base)
        shares.append(moved / sum(t.numel() for t in base.values()))
    assert abs(shares[0] - shares[1]) < 0.02, shares


def test_della_epsilon_out_of_range_is_refused_by_both(models, tmp_path):
    cfg = filled(two("della", base="model_c", density=0.66, epsilon=1.35, **{"lambda": 0.5}), models)
    with pytest.raises(UserError, match="epsilon"):
        api.merge(copy.deepcopy(cfg), tmp_path / "ours", device="cpu")
    with pytest.raises(ValueError):
        mergekit_run(cfg, tmp_path / "theirs")
