"""Running one hostile case through the real command line and checking every promise of a refusal.

A case gets its own copies of three tiny character-level GPT-2 checkpoints (a base and two fine-tunes,
with their tokenizer) and two texts, mutates them, and runs ``modelcypher.cli.main`` in this process
with stdout and stderr captured. A refusal must: exit 2; print exactly one line on stderr, starting
``modelcypher: error:`` and naming the culprit; leave every file of the inputs byte-for-byte as it was;
leave no output, no temporary entry and no lock file anywhere under the case's folder; and leave no
child process behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from modelcypher.checkpoint.guard import LOCK_TAG, TMP_TAG
from modelcypher.cli import main

SHARD = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Work:
    """One case's folder: models ``m[0]`` (base), ``m[1]``, ``m[2]``, texts, and the output path."""

    root: Path
    m: list[Path]
    comedy: Path
    tragedy: Path
    out: Path
    inputs: list[Path] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)

    @classmethod
    def copy_of(cls, source: Path, root: Path) -> Work:
        for name in ("m0", "m1", "m2", "comedy.txt", "tragedy.txt", "lora"):
            src = source / name
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, root / name)
        w = cls(root, [root / "m0", root / "m1", root / "m2"], root / "comedy.txt", root / "tragedy.txt",
                root / "out")
        w.inputs = [*w.m, w.comedy, w.tragedy, w.lora]
        w.outputs = [w.out, root / "compare.json", root / "drift.json"]
        return w

    # ------------------------------------------------------------------ commands

    def config(self, cfg: dict | None = None, name: str = "m.yaml", **extra) -> Path:
        if cfg is None:
            cfg = {"merge_method": "ties", "base_model": str(self.m[0]),
                   "models": [{"model": str(p), "parameters": {"density": 0.5, "weight": 0.5}} for p in self.m[1:]],
                   **extra}
        path = self.root / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.inputs.append(path)
        return path

    def merge(self, *flags, cfg: dict | None = None, **extra) -> list:
        return ["merge", self.config(cfg, **extra), "-o", self.out, *flags]

    def align(self, *flags, b: int = 1, a: int = 0) -> list:
        return ["align", self.m[b], "--to", self.m[a], "-o", self.out, *flags]

    def barrier(self, *flags, a: int = 0, b: int = 1) -> list:
        return ["barrier", self.m[a], self.m[b], "--data", self.comedy, "--points", "3", "--max-tokens", "256",
                *flags]

    def diagnose(self, *flags, cfg: dict | None = None) -> list:
        return ["diagnose", self.config(cfg), *flags]

    # the verbs that measure and move adapters: each reads model m1 (and m0)

    @property
    def lora(self) -> Path:
        """A PEFT LoRA adapter of m0 (m1's update, extracted at rank 2)."""
        return self.root / "lora"

    def extract_lora(self, *flags) -> list:
        return ["extract-lora", self.m[1], "--base", self.m[0], "-o", self.out, "--rank", "2", *flags]

    def compare(self, *flags) -> list:
        return ["compare", self.m[0], self.m[1], "--probes", self.comedy, "--max-anchors", "64",
                "--json", self.root / "compare.json", *flags]

    def drift(self, *flags) -> list:
        return ["drift", self.m[0], self.m[1], "--data", self.comedy, "--json", self.root / "drift.json", *flags]

    def transfer(self, *flags) -> list:
        return ["transfer", self.lora, "--from", self.m[0], "--to", self.m[1], "-o", self.out, "--probes",
                self.comedy, "--max-anchors", "256", *flags]

    # ------------------------------------------------------------------ mutations

    def edit_config(self, i: int, **kv) -> None:
        p = self.m[i] / "config.json"
        cfg = json.loads(p.read_text())
        cfg.update(kv)
        p.write_text(json.dumps(cfg))

    def edit_tensors(self, i: int, fn) -> None:
        sd = load_file(self.m[i] / SHARD)
        fn(sd)
        save_file(sd, self.m[i] / SHARD, metadata={"format": "pt"})

    def poison(self, i: int, name: str, value: float) -> None:
        def fn(sd):
            sd[name] = sd[name].clone()
            sd[name].view(-1)[3] = value

        self.edit_tensors(i, fn)

    def header(self, i: int) -> tuple[dict, bytes]:
        data = (self.m[i] / SHARD).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        return json.loads(data[8:8 + n]), data[8 + n:]

    def write_header(self, i: int, header: dict, body: bytes) -> None:
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        (self.m[i] / SHARD).write_bytes(struct.pack("<Q", len(blob)) + blob + body)

    def edit_header(self, i: int, fn) -> None:
        header, body = self.header(i)
        body = fn(header, body) or body
        self.write_header(i, header, body)

    def index(self, i: int, fn=None) -> None:
        """Give model ``i`` an index naming its one shard for every tensor, then let ``fn`` edit it."""
        header, _ = self.header(i)
        wm = {k: SHARD for k in header if k != "__metadata__"}
        idx = {"metadata": {}, "weight_map": wm}
        if fn is not None:
            fn(idx)
        (self.m[i] / INDEX).write_text(json.dumps(idx))

    def tensor_names(self, i: int = 0) -> list[str]:
        return [k for k in self.header(i)[0] if k != "__metadata__"]


def snapshot(*paths: Path) -> dict[str, str]:
    """Every file under ``paths`` (folders walked, links recorded as links) by its SHA-256."""


    out = {}
    for p in paths:
        p = Path(p)
        for f in sorted([p, *p.rglob("*")] if p.is_dir() else [p]):
            if f.is_symlink():
                out[str(f)] = "link:" + str(f.readlink())
            elif f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TMP_TAG in p.name or LOCK_TAG in p.name or p.name.endswith(".stats")]


def _children() -> set[int]:
    """This process's live children (from /proc: every thread's list), zombies included."""
    pids = set()
    for f in Path("/proc/self/task").glob("*/children"):
        pids |= {int(p) for p in f.read_text().split()}
    return pids


def run(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def refuse(w: Work, argv: list, culprit: str, check_left: bool = True) -> str:
    """Run ``argv`` and check every promise of a refusal; returns the error line."""
    before = snapshot(*w.inputs)
    children = _children()
    threads = torch.get_num_threads()
    rc, _, err = run(argv)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("modelcypher: error: "), err
    assert culprit in lines[0], lines[0]
    assert snapshot(*w.inputs) == before, "an input changed"
    for o in w.outputs:
        assert not o.exists(), f"{o} was written"
    if check_left:
        assert leftovers(w.root) == [], leftovers(w.root)
    assert _children() <= children, "a child process was left"
    assert torch.get_num_threads() == threads
    return lines[0]


def succeed(argv: list) -> str:
    rc, out, err = run(argv)
    assert rc == 0, err
    return out
