"""The loss barrier: zero for a model with itself, zero after aligning a permuted copy, JSON and PNG out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cli_util import run_cli
from modelcypher.align.transform import apply, random_alignment
from modelcypher.arch.families import spec_for
from modelcypher.checkpoint import Checkpoint
from modelcypher.errors import UserError
from modelcypher.measure.barrier import barrier_curve, barrier_states, interpolate

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 12


def zoo_gpt2(path: Path, seed: int = 0) -> Path:
    """A random 2-layer character-level GPT-2 with its tokenizer, saved by the zoo."""
    from modelcypher.zoo import chartok, gpt2

    tok = chartok.build_char_tokenizer(sorted(set(TEXT)))
    torch.manual_seed(seed)
    model = gpt2.make_model(gpt2.TrainConfig(n_layer=2, n_head=4, n_embd=32, block_size=32), tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # far from the init, so the models differ a lot
    return gpt2.save(model, tok, path)


def permuted_copy(src: Path, dst: Path, residual: str, kinds: tuple[str, ...] = ("perm", "heads", "residual")) -> Path:
    ck = Checkpoint(src)
    sd = {n: ck.get(n) for n in ck.names}
    hidden = random_alignment(spec_for(ck.config, sd), kinds=kinds, residual=residual, seed=1)
    sd_b, config_b = apply(sd, ck.config, hidden)
    shutil.copytree(src, dst)
    (dst / "config.json").write_text(json.dumps(config_b))
    save_file({k: v.contiguous() for k, v in sd_b.items()}, str(dst / "model.safetensors"))
    return dst


def test_barrier_of_a_model_with_itself_is_zero_with_json_and_png(tmp_path):
    a = zoo_gpt2(tmp_path / "a")
    (tmp_path / "held_out.txt").write_text(TEXT)
    r = run_cli("barrier", a, a, "--data", tmp_path / "held_out.txt", "--json", tmp_path / "b.json",
                "--plot", tmp_path / "b.png", "--points", "13")
    assert r.returncode == 0, r.stderr
    assert "raw barrier" in r.stdout
    result = json.loads((tmp_path / "b.json").read_text())
    assert len(result["lambdas"]) == 13 and result["lambdas"][0] == 0 and result["lambdas"][-1] == 1
    assert result["tokens"] == len(TEXT)
    assert max(abs(x) for x in result["raw"]["excess"]) < 1e-5
    assert max(result["raw"]["loss"]) - min(result["raw"]["loss"]) < 1e-5
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("residual", ["permutation", "orthogonal"])
def test_aligning_a_permuted_copy_removes_its_barrier(tmp_path, residual):
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b", residual)
    result = barrier_curve(a, b, TEXT, points=11, align="weight", residual=residual)
    raw, aligned = result["raw"], result["aligned"]
    assert len(result["lambdas"]) == 11 and aligned["residual"] == residual
    assert raw["loss"][0] == pytest.approx(raw["loss"][-1], abs=1e-4)  # the same function at both ends
    assert aligned["loss"][0] == pytest.approx(raw["loss"][0], abs=1e-4)  # folding A keeps its function
    assert max(abs(x) for x in aligned["excess"]) < 1e-4  # aligned B is A again: a flat line
    assert abs(raw["loss"][5] - raw["loss"][0]) > 1e-2  # while the raw midpoint is another function


def test_barrier_cli_aligns_in_head_bases_too(tmp_path):
    """A copy moved by every symmetry, V-O and Q-K bases included, is flat once aligned with --vo --qk."""
    a = zoo_gpt2(tmp_path / "a")
    b = permuted_copy(a, tmp_path / "b", "orthogonal", kinds=("perm", "heads", "vo", "qk", "residual"))
    (tmp_path / "t.txt").write_text(TEXT)
    r = run_cli("barrier", a, b, "--data", tmp_path / "t.txt", "--align", "weight", "--vo", "--qk", "--restarts", "2",
                "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert max(abs(x) for x in result["aligned"]["excess"]) < 1e-3
    assert abs(result["raw"]["loss"][5] - result["raw"]["loss"][0]) > 1e-2  # the raw midpoint is another function


def test_barrier_states_takes_state_dicts_and_any_loss():
    from modelcypher.zoo.mlp import MLP

    torch.manual_seed(0)
    sd_a, sd_b = MLP([8, 16, 3]).state_dict(), MLP([8, 16, 3]).state_dict()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))

    def loss(sd):
        model = MLP([8, 16, 3])
        model.load_state_dict(sd)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    result = barrier_states(sd_a, sd_b, loss, points=11)
    assert result["lambdas"] == [i / 10 for i in range(11)]
    assert result["loss"][0] == pytest.approx(loss(sd_a)) and result["loss"][-1] == pytest.approx(loss(sd_b))
    assert result["excess"][0] == 0 and result["excess"][-1] == pytest.approx(0, abs=1e-7)
    assert result["barrier"] == max(result["excess"])
    mid = interpolate(sd_a, sd_b, 0.5)
    torch.testing.assert_close(mid["layers.0.weight"], (sd_a["layers.0.weight"] + sd_b["layers.0.weight"]) / 2)


def test_a_model_without_tokenizer_is_a_one_line_error(tmp_path, capsys):
    from modelcypher.cli import main

    a = zoo_gpt2(tmp_path / "a")
    for f in a.glob("tokenizer*"):
        f.unlink()
    (tmp_path / "t.txt").write_text(TEXT)
    capsys.readouterr()
    assert main(["barrier", str(a), str(a), "--data", str(tmp_path / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="reads features, not text"):
        from modelcypher.zoo.mlp import MLP, save_mlp

        save_mlp(MLP([4, 5, 2]), tmp_path / "mlp")
        barrier_curve(tmp_path / "mlp", tmp_path / "mlp", TEXT)
