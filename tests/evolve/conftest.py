"""Tiny character GPT-2s (a base and two 'fine-tunes' of it) with their tokenizer, held-out text and a
task file, and one local Ray for the tests that search in this process."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelcypher.zoo import chartok, gpt2, shakespeare

CFG = gpt2.TrainConfig(n_layer=4, n_head=2, n_embd=16, block_size=32)


def _moved(model, seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """``base``, ``ft-a``, ``ft-b`` (dense task vectors of different sizes), ``heldout.txt``, ``tasks.jsonl``."""
    root = tmp_path_factory.mktemp("evolve")
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    torch.manual_seed(0)
    base = gpt2.make_model(CFG, tok).eval()
    gpt2.save(base, tok, root / "base")
    gpt2.save(_moved(base, 1, 0.05), tok, root / "ft-a")
    gpt2.save(_moved(base, 2, 0.02), tok, root / "ft-b")
    (root / "heldout.txt").write_text(shakespeare.text()[:1500])
    rows = [{"prompt": f"\nrev[{w}]", "answer": w[::-1]} for w in ("abc", "stone", "plum", "ox")]
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the searches run in this process (each would otherwise start its own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()



@pytest.fixture
def killed_search():
    """Run ``modelcypher evolve SEARCH -o OUT`` as a real process (its own group, with its embedded Ray)
    and SIGKILL the group as soon as it prints a line starting with ``after``."""

    def run(search: Path, out: Path, after: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.Popen([sys.executable, "-m", "modelcypher", "evolve", str(search), "-o", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                             start_new_session=True)  # its own group: the kill takes its Ray processes too
        try:
            for line in p.stdout:
                if line.startswith(after):
                    break
        finally:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    return run
