"""The adversarial corpus: bad inputs and faults for every verb (merge, align, barrier, diagnose, and the later
extract-lora, compare, drift, transfer, evolve), each
run through the real command line and checked by :func:`harness.refuse` (exit 2, one line naming the
culprit, inputs unchanged, no output, no temporary entry, no child process left).

Each case is a function of a fresh :class:`harness.Work` returning ``(argv, culprit)``; ``CASES`` maps a
case id (``class-verb-what``) to it. Classes: ``loss`` (outputs that would destroy data), ``leak``
(files escaping a model folder), ``wrong`` (silent wrong models), ``trace`` (what once ended in a
traceback), ``bomb`` (a config out of proportion to its tensors), ``input`` (plain bad input).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from harness import INDEX, SHARD, Work, leftovers, refuse

from checkpoints import char_gpt2_set, finetune, load
from modelcypher.checkpoint.guard import output_lock

FC = "transformer.h.0.mlp.c_fc.weight"
ATTN = "transformer.h.1.attn.c_attn.weight"
WTE = "transformer.wte.weight"

CASES: dict[str, object] = {}
XFAIL: dict[str, str] = {}


def case(*ids: str, xfail: str | None = None):
    """Register a case builder under one id, or (parametrized by the id's suffix) several."""
    def deco(fn):
        for i in ids:
            CASES[i] = fn
            if xfail:
                XFAIL[i] = xfail
        return fn
    return deco


def verb_of(cid: str) -> str:
    return cid.split("-")[1]


def command(w: Work, verb: str, *flags) -> list:
    """The verb's usual command on ``w``'s models (merge and diagnose: a TIES config on all three)."""
    verbs = {"merge": w.merge, "align": w.align, "barrier": w.barrier, "diagnose": w.diagnose,
             "extract_lora": w.extract_lora, "compare": w.compare, "drift": w.drift, "transfer": w.transfer}
    return verbs[verb](*flags)


ALL = ("merge", "align", "barrier", "diagnose")
# the verbs added since (extract-lora spelled with "_" in case ids); each reads model m1 like the four above
LATER = ("extract_lora", "compare", "drift", "transfer")
LATER_OUT = ("extract_lora", "transfer")  # the later verbs that write a folder


def each(cls: str, what: str, verbs=ALL) -> list[str]:
    return [f"{cls}-{v}-{what}" for v in verbs]


# ============================================================================ loss of user data


@case("loss-merge-out-inside-input", "loss-align-out-inside-input", *each("loss", "out-inside-input", LATER_OUT))
def _(w, cid):
    w.out = w.m[1] / "sub"
    w.outputs = [w.out]
    return command(w, verb_of(cid)), "inside the input model"


@case("loss-align-out-inside-target")
def _(w, cid):
    w.out = w.m[0] / "aligned"
    w.outputs = [w.out]
    return w.align(), "inside the input model"


@case("loss-merge-out-is-input", "loss-align-out-is-input")
def _(w, cid):
    w.out, w.outputs = w.m[1], []
    return command(w, verb_of(cid), "--overwrite"), "is the input model"


@case("loss-merge-out-contains-inputs", "loss-align-out-contains-inputs")
def _(w, cid):
    w.out, w.outputs = w.root, []
    return command(w, verb_of(cid), "--overwrite"), "contains the input model"


@case("loss-merge-out-dot", "loss-align-out-dot")
def _(w, cid):
    empty = w.root / "empty"
    empty.mkdir()
    os.chdir(empty)
    argv = command(w, verb_of(cid), "--overwrite")
    argv[argv.index(w.out)] = "."
    w.outputs = []
    return argv, "current folder"


@case("loss-merge-out-parent-is-file", "loss-align-out-parent-is-file", *each("loss", "out-parent-is-file", LATER_OUT))
def _(w, cid):
    (w.root / "afile").write_text("x")
    w.inputs.append(w.root / "afile")
    w.out = w.root / "afile" / "out"
    w.outputs = [w.out]
    return command(w, verb_of(cid)), "is a file"


@case("loss-merge-out-exists", "loss-align-out-exists", *each("loss", "out-exists", LATER_OUT))
def _(w, cid):
    w.out.mkdir()
    (w.out / "keep.txt").write_text("mine")
    w.inputs.append(w.out)
    w.outputs = []
    return command(w, verb_of(cid)), "already exists"


@case("loss-merge-out-is-file-overwrite", "loss-align-out-is-file-overwrite")
def _(w, cid):
    w.out.write_text("mine")
    w.inputs.append(w.out)
    w.outputs = []
    return command(w, verb_of(cid), "--overwrite"), "not a folder"


@case("loss-merge-out-is-symlink", "loss-align-out-is-symlink")
def _(w, cid):
    (w.root / "elsewhere").mkdir()
    w.out.symlink_to(w.root / "elsewhere")
    w.inputs.append(w.root / "elsewhere")
    w.outputs = []
    return command(w, verb_of(cid), "--overwrite"), "symbolic link"


@case("loss-merge-out-locked", "loss-align-out-locked")
def _(w, cid):
    w.hold_lock = True  # the test holds the output's lock, as a concurrent run would
    return command(w, verb_of(cid)), "another run is writing"


@case("loss-merge-out-appears", "loss-align-out-appears")
def _(w, cid):
    w.appear = True  # the output folder appears while the run is writing
    w.outputs = []
    return command(w, verb_of(cid)), "appeared while this run was writing"


@case(*each("loss", "json-is-folder", ("barrier", "diagnose")))
def _(w, cid):
    (w.root / "d").mkdir()
    return command(w, verb_of(cid), "--json", w.root / "d"), "is a folder"


@case(*each("loss", "json-folder-missing", ("barrier", "diagnose")))
def _(w, cid):
    w.outputs = [w.root / "nope"]
    return command(w, verb_of(cid), "--json", w.root / "nope" / "r.json"), "does not exist"


@case(*each("loss", "json-parent-is-file", ("barrier", "diagnose")))
def _(w, cid):
    return command(w, verb_of(cid), "--json", w.comedy / "r.json"), "is a file"


@case(*each("loss", "json-over-model-config", ("barrier", "diagnose")))
def _(w, cid):
    return command(w, verb_of(cid), "--json", w.m[0] / "config.json"), "inside"


@case(*each("loss", "json-into-model-folder", ("barrier", "diagnose")))
def _(w, cid):
    w.outputs = [w.m[1] / "r.json"]
    return command(w, verb_of(cid), "--json", w.m[1] / "r.json"), "inside"


@case("loss-barrier-json-over-data")
def _(w, cid):
    return w.barrier("--json", w.comedy), "is the input"


@case("loss-diagnose-json-over-config")
def _(w, cid):
    argv = w.diagnose()
    return argv + ["--json", argv[1]], "is the input"


@case("loss-barrier-plot-is-folder")
def _(w, cid):
    (w.root / "d").mkdir()
    return w.barrier("--plot", w.root / "d"), "is a folder"


@case("loss-barrier-plot-into-model")
def _(w, cid):
    w.outputs = [w.m[1] / "p.png"]
    return w.barrier("--plot", w.m[1] / "p.png"), "inside"


@case("loss-barrier-plot-folder-missing")
def _(w, cid):
    return w.barrier("--plot", w.root / "nope" / "p.png"), "does not exist"


@case("loss-diagnose-plot-is-file")
def _(w, cid):
    return w.diagnose("--plot", w.comedy), "not a folder"


@case("loss-diagnose-plot-into-model")
def _(w, cid):
    w.outputs = [w.m[0] / "plots"]
    return w.diagnose("--plot", w.m[0] / "plots"), "inside"


@case("loss-diagnose-plot-parent-is-file")
def _(w, cid):
    return w.diagnose("--plot", w.comedy / "plots"), "is a file"


# ============================================================================ leaks


def _secret(w: Work):
    secret = w.root / "secret.txt"
    secret.write_text("private")
    w.inputs.append(secret)
    return secret


@case("leak-merge-tokenizer-link", "leak-align-tokenizer-link")
def _(w, cid):
    i = 0 if verb_of(cid) == "merge" else 1  # merge takes the base's tokenizer, align B's
    (w.m[i] / "tokenizer_config.json").unlink()
    (w.m[i] / "tokenizer_config.json").symlink_to(_secret(w))
    return command(w, verb_of(cid)), "tokenizer_config.json"


@case("leak-merge-generation-link", "leak-align-generation-link")
def _(w, cid):
    i = 0 if verb_of(cid) == "merge" else 1
    (w.m[i] / "generation_config.json").unlink()
    (w.m[i] / "generation_config.json").symlink_to(_secret(w))
    return command(w, verb_of(cid)), "generation_config.json"


@case(*each("leak", "shard-link-outside"), *each("leak", "shard-link-outside", LATER))
def _(w, cid):
    (w.root / "elsewhere").mkdir()
    (w.m[1] / SHARD).rename(w.root / "elsewhere" / SHARD)
    (w.m[1] / SHARD).symlink_to(w.root / "elsewhere" / SHARD)
    w.inputs.append(w.root / "elsewhere")
    return command(w, verb_of(cid)), "outside the model directory"


@case(*each("leak", "config-link-outside"), *each("leak", "config-link-outside", LATER))
def _(w, cid):
    (w.m[1] / "config.json").rename(w.root / "cfg.json")
    (w.m[1] / "config.json").symlink_to(w.root / "cfg.json")
    w.inputs.append(w.root / "cfg.json")
    return command(w, verb_of(cid)), "outside the model directory"


@case(*each("leak", "index-escapes"), *each("leak", "index-escapes", LATER))
def _(w, cid):
    (w.root / "outside.safetensors").write_bytes((w.m[1] / SHARD).read_bytes())
    w.inputs.append(w.root / "outside.safetensors")
    w.index(1, lambda idx: idx["weight_map"].update({FC: "../outside.safetensors"}))
    return command(w, verb_of(cid)), "points outside the model directory"


@case(*each("leak", "index-absolute"))
def _(w, cid):
    w.index(1, lambda idx: idx["weight_map"].update({FC: str(w.m[1] / SHARD)}))
    return command(w, verb_of(cid)), "points outside the model directory"


# ============================================================================ silent wrong models


@case("wrong-merge-weight-nan")
def _(w, cid):
    cfg = {"merge_method": "linear", "models": [{"model": str(w.m[1]), "parameters": {"weight": float("nan")}},
                                                {"model": str(w.m[2]), "parameters": {"weight": 1.0}}]}
    return w.merge(cfg=cfg), "NaN"


@case("wrong-merge-lambda-inf")
def _(w, cid):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(w.m[0]), "parameters": {"lambda": float("inf")},
           "models": [{"model": str(w.m[1])}, {"model": str(w.m[2])}]}
    return w.merge(cfg=cfg), "NaN or Inf"


@case("wrong-merge-float16-overflow")
def _(w, cid):
    w.edit_tensors(1, lambda sd: sd.update({FC: sd[FC] * 1e8}))
    cfg = {"merge_method": "linear", "dtype": "float16",
           "models": [{"model": str(w.m[1]), "parameters": {"weight": 0.5}},
                      {"model": str(w.m[2]), "parameters": {"weight": 0.5}}]}
    return w.merge(cfg=cfg), FC


@case(*each("wrong", "input-nan"), *each("wrong", "input-nan", LATER))
def _(w, cid):
    w.poison(1, FC, float("nan"))
    return command(w, verb_of(cid)), FC


@case(*each("wrong", "input-inf"), *each("wrong", "input-inf", LATER))
def _(w, cid):
    w.poison(1, ATTN, float("-inf"))
    return command(w, verb_of(cid)), ATTN


@case(*each("wrong", "header-overlap"), *each("wrong", "header-overlap", LATER))
def _(w, cid):
    def fn(h, body):
        a, b = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[:2]
        h[b]["data_offsets"] = [h[b]["data_offsets"][0] - 4, h[b]["data_offsets"][1] - 4]
    w.edit_header(1, fn)
    return command(w, verb_of(cid)), "overlaps"


@case(*each("wrong", "header-gap"), *each("wrong", "header-gap", LATER))
def _(w, cid):
    def fn(h, body):
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        h[last]["data_offsets"] = [o + 8 for o in h[last]["data_offsets"]]
        return body + bytes(8)
    w.edit_header(1, fn)
    return command(w, verb_of(cid)), "gap"


@case(*each("wrong", "header-trailing-bytes"))
def _(w, cid):
    w.edit_header(1, lambda h, body: body + bytes(16))
    return command(w, verb_of(cid)), "after the last tensor"


@case(*each("wrong", "header-negative-shape"))
def _(w, cid):
    w.edit_header(1, lambda h, body: h[FC].update(shape=[-h[FC]["shape"][0], h[FC]["shape"][1]]))
    return command(w, verb_of(cid)), FC


@case(*each("wrong", "header-overflowing-shape"))
def _(w, cid):
    w.edit_header(1, lambda h, body: h[FC].update(shape=[2**40, 2**40]))
    return command(w, verb_of(cid)), FC


@case(*each("wrong", "header-dtype-bytes"))
def _(w, cid):
    w.edit_header(1, lambda h, body: h[FC].update(dtype="F16"))
    return command(w, verb_of(cid)), FC


@case(*each("wrong", "header-unknown-dtype"), *each("wrong", "header-unknown-dtype", LATER))
def _(w, cid):
    w.edit_header(1, lambda h, body: h[FC].update(dtype="F24"))
    return command(w, verb_of(cid)), "unknown dtype"


@case(*each("wrong", "header-offsets-reversed", ("merge", "align")))
def _(w, cid):
    w.edit_header(1, lambda h, body: h[FC].update(data_offsets=h[FC]["data_offsets"][::-1]))
    return command(w, verb_of(cid)), FC


@case("wrong-merge-int-into-float")
def _(w, cid):
    w.edit_tensors(1, lambda sd: sd.update({FC: sd[FC].round().to(torch.int32)}))
    cfg = {"merge_method": "linear", "models": [{"model": str(w.m[1]), "parameters": {"weight": 0.5}},
                                                {"model": str(w.m[2]), "parameters": {"weight": 0.5}}]}
    return w.merge(cfg=cfg), FC


# ============================================================================ tracebacks owed one line


@case(*each("trace", "config-not-utf8"))
def _(w, cid):
    (w.m[1] / "config.json").write_bytes(b'{"model_type": "gpt2\xff\xfe"}')
    return command(w, verb_of(cid)), "config.json"


@case(*each("trace", "config-not-object"))
def _(w, cid):
    (w.m[1] / "config.json").write_text("[1, 2]")
    return command(w, verb_of(cid)), "config.json"


@case(*each("trace", "index-value-list"))
def _(w, cid):
    w.index(1, lambda idx: idx["weight_map"].update({FC: [SHARD]}))
    return command(w, verb_of(cid)), FC


@case(*each("trace", "index-value-null", ("merge", "align")))
def _(w, cid):
    w.index(1, lambda idx: idx["weight_map"].update({FC: None}))
    return command(w, verb_of(cid)), FC


@case(*each("trace", "index-not-utf8", ("barrier", "diagnose")))
def _(w, cid):
    w.index(1)
    (w.m[1] / INDEX).write_bytes(b"\xff" * 10)
    return command(w, verb_of(cid)), INDEX


@case(*each("trace", "yaml-not-utf8", ("merge", "diagnose")))
def _(w, cid):
    argv = command(w, verb_of(cid))
    argv[1].write_bytes(b"merge_method: ties\nbase_model: \xff\xfe\n")
    return argv, str(argv[1])


@case(*each("trace", "yaml-other-extension", ("merge", "diagnose")))
def _(w, cid):
    argv = command(w, verb_of(cid))
    path = argv[1].with_suffix(".cfg")
    argv[1].rename(path)
    w.inputs = [p for p in w.inputs if p != argv[1]] + [path]
    path.write_text(path.read_text() + "colour: 1\n")
    argv[1] = path
    return argv, "colour"


@case("trace-merge-models-empty-no-base")
def _(w, cid):
    return w.merge(cfg={"merge_method": "linear", "models": []}), "models"


@case("trace-merge-weight-string")
def _(w, cid):
    cfg = {"merge_method": "linear", "models": [{"model": str(w.m[1]), "parameters": {"weight": "abc"}},
                                                {"model": str(w.m[2])}]}
    return w.merge(cfg=cfg), "weight"


@case("trace-merge-t-string")
def _(w, cid):
    cfg = {"merge_method": "slerp", "base_model": str(w.m[0]), "parameters": {"t": "half"},
           "models": [{"model": str(w.m[1])}]}
    return w.merge(cfg=cfg), "t"


@case(*each("trace", "device-meta"))
def _(w, cid):
    return command(w, verb_of(cid), "--device", "meta"), "meta"


@case(*each("trace", "device-mps", ("merge", "align")))
def _(w, cid):
    return command(w, verb_of(cid), "--device", "mps"), "mps"


@case(*each("trace", "device-cuda-absent"))
def _(w, cid):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return command(w, verb_of(cid), "--device", "cuda:7"), "cuda:7"


@case("trace-align-lr-nan")
def _(w, cid):
    return w.align("--method", "learned", "--lr", "nan"), "lr"


@case("trace-align-steps-zero")
def _(w, cid):
    return w.align("--steps", "0"), "steps"


@case("trace-barrier-max-tokens-negative")
def _(w, cid):
    return w.barrier("--max-tokens", "-5"), "--max-tokens"


@case("trace-barrier-points-one")
def _(w, cid):
    return w.barrier("--points", "1"), "--points"


@case("trace-diagnose-top-k-zero")
def _(w, cid):
    return w.diagnose("--top-k", "0"), "--top-k"


@case(*each("trace", "architectures-unknown", ("align", "barrier")))
def _(w, cid):
    for i in (0, 1):
        w.edit_config(i, architectures=["NoSuchModelForCausalLM"])
    return command(w, verb_of(cid)), "NoSuchModelForCausalLM"


@case(*each("trace", "filesystem-full"))
def _(w, cid):
    w.fsize = 4096  # RLIMIT_FSIZE: writes beyond it fail with EFBIG, as on a full filesystem
    flags = ("--json", w.root / "r.json") if verb_of(cid) in ("barrier", "diagnose") else ()
    w.outputs.append(w.root / "r.json")
    if verb_of(cid) == "barrier":
        w.fsize = 64
    return command(w, verb_of(cid), *flags), "File too large"


@case(*each("trace", "filesystem-read-only"))
def _(w, cid):
    ro = "/proc/modelcypher-out"  # a filesystem nobody may create files in, root included
    if verb_of(cid) in ("merge", "align"):
        argv = command(w, verb_of(cid))
        argv[argv.index(w.out)] = ro
        return argv, "/proc"
    if verb_of(cid) == "barrier":
        return w.barrier("--json", ro), "/proc"
    return w.diagnose("--plot", ro), "/proc"


# ============================================================================ resource bombs


@case(*each("bomb", "layers-1e9"))
def _(w, cid):
    w.edit_config(1, n_layer=10**9)
    return command(w, verb_of(cid)), "claims 1000000000 layers"


@case(*each("bomb", "layers-negative", ("merge", "barrier")))
def _(w, cid):
    w.edit_config(1, n_layer=-3)
    return command(w, verb_of(cid)), "claims -3 layers"


# ============================================================================ plain bad input


@case(*each("input", "model-missing"), *each("input", "model-missing", LATER))
def _(w, cid):
    import shutil

    shutil.rmtree(w.m[1])
    w.inputs.remove(w.m[1])
    return command(w, verb_of(cid)), "m1"


@case(*each("input", "no-config"), *each("input", "no-config", LATER))
def _(w, cid):
    (w.m[1] / "config.json").unlink()
    return command(w, verb_of(cid)), "no config.json"


@case(*each("input", "no-weights"), *each("input", "no-weights", LATER))
def _(w, cid):
    (w.m[1] / SHARD).unlink()
    return command(w, verb_of(cid)), "no weights"


@case(*each("input", "truncated-shard"), *each("input", "truncated-shard", LATER))
def _(w, cid):
    data = (w.m[1] / SHARD).read_bytes()
    (w.m[1] / SHARD).write_bytes(data[:-100])
    return command(w, verb_of(cid)), "truncated"


@case(*each("input", "header-garbage"), *each("input", "header-garbage", LATER))
def _(w, cid):
    data = bytearray((w.m[1] / SHARD).read_bytes())
    data[8:40] = b"{" * 32
    (w.m[1] / SHARD).write_bytes(bytes(data))
    return command(w, verb_of(cid)), SHARD


@case(*each("input", "index-missing-shard"), *each("input", "index-missing-shard", LATER))
def _(w, cid):
    w.index(1, lambda idx: idx["weight_map"].update({FC: "model-00009-of-00009.safetensors"}))
    return command(w, verb_of(cid)), "does not exist"


@case(*each("input", "pickle-payload", ("merge", "barrier")))
def _(w, cid):
    (w.m[1] / SHARD).unlink()

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(w.root / "pwned"),))

    torch.save({"x": Boom()}, w.m[1] / "pytorch_model.bin")
    w.outputs.append(w.root / "pwned")
    return command(w, verb_of(cid)), "weights_only"


@case(*each("input", "family-differs", ("merge", "align", "barrier")))
def _(w, cid):
    w.edit_config(1, model_type="llama")
    return command(w, verb_of(cid)), "m1" if verb_of(cid) != "merge" else "architecture"


@case(*each("input", "tensor-missing", ("merge", "align", "barrier")))
def _(w, cid):
    w.edit_tensors(1, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    return command(w, verb_of(cid)), "transformer.h.1.mlp.c_fc.bias"


@case("input-barrier-data-missing")
def _(w, cid):
    argv = w.barrier()
    argv[argv.index(w.comedy)] = w.root / "nope.txt"
    return argv, "nope.txt"


@case("input-barrier-data-not-utf8")
def _(w, cid):
    w.comedy.write_bytes(b"\xff\xfe" * 100)
    return w.barrier(), "comedy.txt"


@case("input-align-activation-without-data")
def _(w, cid):
    return w.align("--method", "activation"), "--data"


@case("input-diagnose-no-base")
def _(w, cid):
    return w.diagnose(cfg={"merge_method": "linear", "models": [{"model": str(w.m[1])}, {"model": str(w.m[2])}]}), \
        "base_model"


@case("input-merge-unknown-method")
def _(w, cid):
    return w.merge(cfg={"merge_method": "nonesuch", "models": [{"model": str(w.m[1])}]}), "nonesuch"


@case(*each("input", "usage-no-output", ("merge", "align")))
def _(w, cid):
    argv = command(w, verb_of(cid))
    i = argv.index("-o")
    return argv[:i] + argv[i + 2:], "-o/--output" if verb_of(cid) == "align" else "no output directory"


# ============================================================================ running a case


# ============================================================================ the later verbs' own inputs


@case(*each("loss", "json-is-folder", ("compare", "drift")))
def _(w, cid):
    (w.root / "report").mkdir()
    w.inputs.append(w.root / "report")
    return command(w, verb_of(cid), "--json", w.root / "report"), "is a folder"


@case(*each("loss", "json-folder-missing", ("compare", "drift")))
def _(w, cid):
    return command(w, verb_of(cid), "--json", w.root / "nope" / "r.json"), "does not exist"


@case(*each("loss", "json-into-model-folder", ("compare", "drift")))
def _(w, cid):
    return command(w, verb_of(cid), "--json", w.m[1] / "report.json"), "inside"


@case("input-compare-probes-missing", "input-drift-probes-missing", "input-transfer-probes-missing")
def _(w, cid):
    argv = command(w, verb_of(cid))
    argv[argv.index(w.comedy)] = w.root / "nope.txt"
    return argv, "nope.txt"


@case("input-compare-probes-not-utf8", "input-drift-probes-not-utf8", "input-transfer-probes-not-utf8")
def _(w, cid):
    w.comedy.write_bytes(b"\xff\xfe" * 500)
    return command(w, verb_of(cid)), "comedy.txt"


@case("input-extract_lora-rank-zero")
def _(w, cid):
    return w.extract_lora("--rank", "0"), "--rank"


@case("input-extract_lora-same-model")
def _(w, cid):
    argv = w.extract_lora()
    argv[argv.index(w.m[1])] = w.m[0]
    return argv, "same"


@case("input-transfer-adapter-config-not-json")
def _(w, cid):
    (w.lora / "adapter_config.json").write_text("{not json")
    return w.transfer(), "adapter_config.json"


@case("input-transfer-adapter-not-lora")
def _(w, cid):
    p = w.lora / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "peft_type": "IA3"}))
    return w.transfer(), "IA3"


@case("input-transfer-adapter-pickle")
def _(w, cid):
    from safetensors.torch import load_file

    sd = load_file(w.lora / "adapter_model.safetensors")
    (w.lora / "adapter_model.safetensors").unlink()
    torch.save({"weights": sd, "payload": os.system}, w.lora / "adapter_model.bin")
    return w.transfer(), "adapter_model.bin"


@case("input-transfer-adapter-factor-shape")
def _(w, cid):
    from safetensors.torch import load_file, save_file

    path = w.lora / "adapter_model.safetensors"
    sd = load_file(path)
    name = next(n for n in sd if "lora_A" in n)
    sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
    save_file(sd, path)
    return w.transfer(), "do not fit rank 2"


def _search(w, **changes) -> list:
    cfg = {"merge_method": "task_arithmetic", "base_model": str(w.m[0]), "models": [str(w.m[1]), str(w.m[2])],
           "search": {"weight": {"min": 0.0, "max": 1.0}}, "objective": {"loss": str(w.comedy)},
           "optimizer": {"population": 2, "generations": 1, "seed": 0}, **changes}
    return ["evolve", w.config(cfg, name="search.yaml"), "-o", w.out]


@case("input-evolve-unknown-key")
def _(w, cid):
    return _search(w, searh={"t": {"min": 0, "max": 1}}), "searh"


@case("input-evolve-bounds-out-of-domain")
def _(w, cid):
    return _search(w, search={"density": {"min": -0.5, "max": 0.5}}), "density"


@case("input-evolve-nothing-to-search")
def _(w, cid):
    return _search(w, search={}), "search"


@case("input-evolve-parameter-not-of-method")
def _(w, cid):
    return _search(w, search={"gamma": {"min": 0.0, "max": 0.5}}), "gamma"


@case("input-evolve-objective-text-missing")
def _(w, cid):
    return _search(w, objective={"loss": str(w.root / "nope.txt")}), "nope.txt"


@case("input-evolve-model-missing")
def _(w, cid):
    import shutil

    shutil.rmtree(w.m[1])
    w.inputs.remove(w.m[1])
    return _search(w), "m1"


@case("input-evolve-workers-zero")
def _(w, cid):
    return _search(w) + ["--workers", "0"], "--workers"


@case("loss-evolve-out-inside-input")
def _(w, cid):
    w.out = w.m[1] / "runs"
    w.outputs = [w.out]
    return _search(w), "inside"


@case("input-evolve-resume-without-state")
def _(w, cid):
    return _search(w) + ["--resume"], str(w.out)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A character-level GPT-2 base with its tokenizer, two small fine-tunes of it, and two texts."""
    root = tmp_path_factory.mktemp("adversarial-models")
    base_dir = char_gpt2_set(root)[0]
    base = load(base_dir, "gpt2")
    for i in (1, 2):
        finetune(base, seed=i, scale=0.002).save_pretrained(root / f"m{i}")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # B random too, so the adapter changes the model
    lora = get_peft_model(load(base_dir, "gpt2"), LoraConfig(r=2, target_modules=["c_attn", "c_fc"],
                                                               init_lora_weights=False))
    lora.save_pretrained(root / "lora")
    return root


def _params():
    for cid in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=XFAIL[cid])] if cid in XFAIL else []
        yield pytest.param(cid, marks=marks, id=cid)


@pytest.mark.parametrize("cid", list(_params()))
def test_refused(cid, source, tmp_path, tmp_path_factory, monkeypatch):
    w = Work.copy_of(source, tmp_path)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    argv, culprit = CASES[cid](w, cid)
    if getattr(w, "appear", False):
        _appear_during_run(monkeypatch, w)
    hold = getattr(w, "hold_lock", False)
    with _locked(w.out) if hold else _nothing(), _fsize(getattr(w, "fsize", None)):
        refuse(w, argv, culprit, check_left=not hold)
    assert leftovers(w.root) == []
    assert not (tmp_path / "pwned").exists()
    if getattr(w, "appear", False):
        assert (w.out / "theirs.txt").read_text() == "theirs" and len(list(w.out.iterdir())) == 1


def test_corpus_size():
    assert len(CASES) >= 100
    for verb in ALL:
        assert sum(verb_of(c) == verb for c in CASES) >= 20, verb
    for verb in LATER:
        assert sum(verb_of(c) == verb for c in CASES) >= 14, verb


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _locked(out):
    return output_lock(out)


class _fsize:
    def __init__(self, limit):
        self.limit = limit

    def __enter__(self):
        if self.limit is not None:
            self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))
        return self

    def __exit__(self, *a):
        if self.limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        return False


def _appear_during_run(monkeypatch, w: Work) -> None:
    """Make ``w.out`` appear (another run, the user) after the run checked it and before it renames."""
    import modelcypher.align.pipeline as pipeline
    import modelcypher.merging.run as run

    def appear(real):
        def wrapped(*a, **k):
            result = real(*a, **k)
            if not w.out.exists():
                w.out.mkdir()
                (w.out / "theirs.txt").write_text("theirs")
            return result
        return wrapped

    monkeypatch.setattr(run, "_copy_files", appear(run._copy_files))
    monkeypatch.setattr(pipeline, "copy_files", appear(pipeline.copy_files))


# ============================================================================ what must still work


def test_cache_snapshot_is_accepted_and_links_are_not_published(source, tmp_path, monkeypatch):
    """A Hugging Face cache snapshot (files linking to ../../blobs) merges, and the output holds plain
    files, not links."""
    from harness import succeed

    w = Work.copy_of(source, tmp_path)
    repo = tmp_path / "models--org--m1"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in w.m[0].iterdir():
        (blobs / f"h{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(f"../../blobs/h{f.name}")
    cfg = {"merge_method": "linear", "models": [{"model": str(snap), "parameters": {"weight": 0.5}},
                                                {"model": str(w.m[1]), "parameters": {"weight": 0.5}}]}
    succeed(w.merge(cfg=cfg))
    assert (w.out / "tokenizer.json").is_file() and not (w.out / "tokenizer.json").is_symlink()
    assert (w.out / "tokenizer.json").read_bytes() == (w.m[0] / "tokenizer.json").read_bytes()


def test_stale_temporary_folders_of_killed_runs_are_cleaned(source, tmp_path):
    """A run killed outright leaves its temporary folder; the next run writing beside it removes it
    (its process is gone) and leaves a live process's alone."""
    from harness import succeed

    w = Work.copy_of(source, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.modelcypher-tmp-{dead.pid}-0123abcd"
    live = tmp_path / f".other.modelcypher-tmp-{os.getpid()}-0123abcd"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    succeed(w.merge())
    assert not stale.exists() and live.exists() and (w.out / "config.json").is_file()


def test_a_sigkilled_run_is_cleaned_by_the_next(source, tmp_path):
    """SIGKILL mid-write leaves a temporary folder; the next run to the same output cleans it up."""
    import signal
    import time

    from harness import succeed

    w = Work.copy_of(source, tmp_path)
    cfg = w.config()
    code = ("import sys, time\nimport modelcypher.merging.run as run\nreal = run.execute\n"
            "def slow(*a, **k):\n    print('writing', flush=True)\n    time.sleep(60)\n"
            "run.execute = slow\nfrom modelcypher.cli import main\n"
            f"main(['merge', {str(cfg)!r}, '-o', {str(w.out)!r}, '--device', 'cpu'])\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    left = [x for x in tmp_path.iterdir() if "modelcypher-tmp" in x.name]
    assert len(left) == 1, "a killed run leaves its temporary folder"
    time.sleep(0.1)
    succeed(w.merge())
    assert [x for x in tmp_path.iterdir() if "modelcypher-" in x.name] == []
    assert (w.out / "config.json").is_file()


def test_two_runs_to_one_output_exactly_one_wins(source, tmp_path):
    w = Work.copy_of(source, tmp_path)
    cfg = w.config()
    procs = [subprocess.Popen([sys.executable, "-m", "modelcypher", "merge", str(cfg), "-o", str(w.out),
                               "--device", "cpu"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert len(loser.strip().splitlines()) == 1 and str(w.out) in loser
    assert [x for x in tmp_path.iterdir() if "modelcypher-" in x.name] == []


def test_barrier_plot_is_written_exactly_where_it_says(source, tmp_path):
    from harness import succeed

    w = Work.copy_of(source, tmp_path)
    out = succeed(w.barrier("--plot", tmp_path / "curve", "--json", tmp_path / "b.json"))
    assert (tmp_path / "curve").is_file() and not (tmp_path / "curve.png").exists()
    assert (tmp_path / "curve").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "curve") in out


def test_nonfinite_merge_is_written_only_when_allowed(source, tmp_path):
    from harness import succeed

    w = Work.copy_of(source, tmp_path)
    w.poison(1, FC, float("nan"))
    cfg = {"merge_method": "linear", "models": [{"model": str(w.m[1]), "parameters": {"weight": 0.5}},
                                                {"model": str(w.m[2]), "parameters": {"weight": 0.5}}]}
    succeed(w.merge("--allow-nonfinite", cfg=cfg))
    from modelcypher.checkpoint import Checkpoint

    ck = Checkpoint(w.out, allow_nonfinite=True)
    assert torch.isnan(ck.get(FC)).any()
