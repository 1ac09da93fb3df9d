"""Every user mistake: one clear line naming the culprit, a non-zero exit, inputs untouched, no output."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from checkpoints import build, family_set, finetune, save
from cli_util import run_cli, snapshot, write_config


@pytest.fixture()
def trio(tmp_path):
    return family_set(tmp_path, "llama", 2, shard="20KB")


def ties_cfg(base, *models, **extra):
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"density": 0.5}} for m in models], **extra}


def refuse(tmp_path, cfg: dict | str, *flags: str, match: str, inputs=()):
    """Run a merge that must fail: check the message, the exit code, the inputs and the output dir."""
    path = tmp_path / "bad.yaml"
    if isinstance(cfg, str):
        path.write_text(cfg)
    else:
        write_config(path, cfg)
    before = snapshot(*inputs)
    out = tmp_path / "out"
    r = run_cli("merge", path, "-o", out, *flags)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcypher: error:"), r.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "modelcypher-" in p.name]
    assert snapshot(*inputs) == before
    return lines[0]


def test_missing_model_path(tmp_path, trio):
    refuse(tmp_path, ties_cfg(trio[0], trio[1], tmp_path / "nope"), match="nope")


def test_not_a_model_dir(tmp_path, trio):
    (tmp_path / "empty").mkdir()
    refuse(tmp_path, ties_cfg(trio[0], tmp_path / "empty"), match="no config.json")


def test_truncated_safetensors(tmp_path, trio):
    shard = sorted(trio[1].glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    refuse(tmp_path, ties_cfg(*trio), match="truncated", inputs=trio)


def test_corrupt_safetensors_header(tmp_path, trio):
    shard = sorted(trio[2].glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{" * n
    shard.write_bytes(bytes(data))
    refuse(tmp_path, ties_cfg(*trio), match=shard.name, inputs=trio)


def test_index_naming_a_missing_shard(tmp_path, trio):
    index = trio[1] / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "model-99999-of-99999.safetensors"
    index.write_text(json.dumps(idx))
    refuse(tmp_path, ties_cfg(*trio), match="does not exist", inputs=trio)


def test_index_escaping_the_model_dir(tmp_path, trio):
    index = trio[1] / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    shard = next(iter(idx["weight_map"].values()))
    (tmp_path / "outside.safetensors").write_bytes((trio[1] / shard).read_bytes())
    idx["weight_map"] = {k: ("../outside.safetensors" if v == shard else v) for k, v in idx["weight_map"].items()}
    index.write_text(json.dumps(idx))
    refuse(tmp_path, ties_cfg(*trio), match="outside the model directory", inputs=trio)


def test_shapes_differ(tmp_path, trio):
    wide = save(build("llama", intermediate_size=48), tmp_path / "wide")
    msg = refuse(tmp_path, ties_cfg(trio[0], trio[1], wide), match="different shapes", inputs=trio)
    assert "mlp" in msg


def test_tensor_missing_from_one_model(tmp_path):
    from safetensors.torch import load_file, save_file

    base, a = family_set(tmp_path, "gpt2", 1)
    sd = load_file(a / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.bias"]
    save_file(sd, a / "model.safetensors", metadata={"format": "pt"})
    refuse(tmp_path, ties_cfg(base, a), match="transformer.h.1.mlp.c_fc.bias")


def test_different_architectures(tmp_path, trio):
    gpt = save(build("gpt2"), tmp_path / "gpt")
    refuse(tmp_path, ties_cfg(trio[0], trio[1], gpt), match="differ in architecture")


def save_base_and_poisoned(tmp_path, weight, index, value: float) -> None:
    """A GPT-2 base at ``tmp_path/base`` and a fine-tune of it at ``tmp_path/bad`` whose ``weight``
    (a function of the model) holds ``value`` at ``index``."""
    base = build("gpt2")
    bad = finetune(base, 1)
    with torch.no_grad():
        weight(bad)[index] = value
    save(base, tmp_path / "base")
    save(bad, tmp_path / "bad")


def test_nonfinite_input_refused_unless_allowed(tmp_path):
    save_base_and_poisoned(tmp_path, lambda m: m.transformer.h[0].mlp.c_fc.weight, (0, 0), float("nan"))
    cfg = ties_cfg(tmp_path / "base", tmp_path / "bad")
    refuse(tmp_path, cfg, match="transformer.h.0.mlp.c_fc.weight", inputs=[tmp_path / "base", tmp_path / "bad"])
    r = run_cli("merge", write_config(tmp_path / "ok.yaml", cfg), "-o", tmp_path / "out", "--allow-nonfinite")
    assert r.returncode == 0, r.stderr


def test_vocab_sizes_differ_points_to_truncation(tmp_path):
    base = save(build("llama", vocab_size=97), tmp_path / "base")
    big = save(finetune(build("llama", vocab_size=101), 1), tmp_path / "big")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(big)}]}
    refuse(tmp_path, cfg, match="--truncate-vocab")
    r = run_cli("merge", write_config(tmp_path / "ok.yaml", cfg), "-o", tmp_path / "out", "--truncate-vocab")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 97
    from checkpoints import load

    assert load(tmp_path / "out", "llama")(torch.tensor([[1, 96]])).logits.shape == (1, 2, 97)


@pytest.mark.parametrize("cfg,match", [
    ({"merge_method": "ties", "models": [{"model": "x"}], "colour": 1}, "colour: unknown key"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "tokenizer_source": "y"},
     "tokenizer_source: 'y' is not 'union', 'base' nor one of the models"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "tokenizer_source": "union", "tokenizer": {}},
     "give one of tokenizer_source or tokenizer"),
    ({"merge_method": "linear", "modules": {"vision_tower": {"models": [{"model": "x"}]}}},
     "modules: no module 'vision_tower'; the architectures merged here have one module, 'default'"),
    ({"merge_method": "linear", "models": [{"model": "x"}], "modules": {"default": {"models": [{"model": "x"}]}}},
     "exactly one of 'models', 'slices' or 'modules'"),
    ({"merge_method": "linear", "models": [{"model": "a"}], "slices": []}, "exactly one of"),
    ("merge_method: [unclosed", "invalid YAML"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": {"a": 1}}}]},
     "models.0.parameters.weight: expected a number"),
])
def test_config_mistakes(tmp_path, cfg, match):
    refuse(tmp_path, cfg, match=match)


def test_method_mistakes(tmp_path, trio):
    base, a, b = trio
    refuse(tmp_path, {"merge_method": "nonesuch", "models": [{"model": str(a)}]}, match="unknown merge_method")
    refuse(tmp_path, {"merge_method": "ties", "models": [{"model": str(a)}, {"model": str(b)}]},
           match="needs a base_model")
    refuse(tmp_path, ties_cfg(base, a, parameters={"densty": 0.5}), match="has no parameter 'densty'")
    refuse(tmp_path, {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(a)}]},
           match="needs parameter 't'")
    two = [{"model": str(a)}, {"model": str(b)}]
    refuse(tmp_path, {"merge_method": "slerp", "base_model": str(base), "models": two, "parameters": {"t": 0.5}},
           match="exactly 1")


def test_existing_output_is_never_overwritten_silently(tmp_path, trio):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("merge", write_config(tmp_path / "m.yaml", ties_cfg(*trio)), "-o", out)
    assert r.returncode != 0 and "already exists" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("merge", tmp_path / "m.yaml", "-o", out, "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_unsafe_pickle_is_never_loaded(tmp_path):
    import os

    base, a = family_set(tmp_path, "gpt2", 1)
    (a / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Boom()}, a / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    refuse(tmp_path, ties_cfg(base, a), match="weights_only")
    assert not (tmp_path / "pwned").exists()


def test_interrupted_merge_leaves_nothing(tmp_path, trio, monkeypatch):
    import modelcypher.merging.run as run

    calls = {"n": 0}
    real = run.compute_blocks

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run, "compute_blocks", flaky)
    from modelcypher.api import merge

    with pytest.raises(KeyboardInterrupt):
        merge(ties_cfg(*trio), tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_output_inside_an_input_is_refused(tmp_path, trio):
    path = write_config(tmp_path / "m.yaml", ties_cfg(*trio))
    r = run_cli("merge", path, "-o", trio[0] / "merged")
    assert r.returncode != 0 and "inside the input model" in r.stderr
    assert not (trio[0] / "merged").exists()


def test_a_failing_tensor_stops_every_worker(tmp_path, monkeypatch):
    """The runner computes tensors side by side: a tensor that fails while others wait on a full queue
    for the writer still ends the merge with its own error, the threads restored, nothing left."""
    import modelcypher.merging.run as run
    from modelcypher.api import merge
    from modelcypher.errors import UserError

    save_base_and_poisoned(tmp_path, lambda m: m.transformer.h[1].attn.c_attn.weight, (3, 5), float("inf"))
    monkeypatch.setattr(run, "BLOCK_ELEMENTS", 64)  # many blocks per tensor
    monkeypatch.setattr(run, "QUEUED_BLOCKS", 1)  # a tensor ahead of its turn waits at once
    monkeypatch.setattr(run, "cpu_workers", lambda: (3, 1))
    threads = torch.get_num_threads()
    cfg = {"merge_method": "linear", "models": [{"model": str(tmp_path / "base")}, {"model": str(tmp_path / "bad")}]}
    with pytest.raises(UserError, match="transformer.h.1.attn.c_attn.weight"):
        merge(cfg, tmp_path / "out", device="cpu")
    assert torch.get_num_threads() == threads
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
