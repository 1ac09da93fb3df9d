"""The digits MLP: trains offline, reproducibly, and round-trips through its checkpoint directory."""

from __future__ import annotations

import json

import torch

from modelcypher.zoo.mlp import evaluate, load_digits_split, load_mlp, save_mlp, train_mlp


def test_training_is_reproducible_and_learns(tmp_path):
    data = load_digits_split()
    a = train_mlp(0, hidden=(32, 32, 32), epochs=10, data=data)
    b = train_mlp(0, hidden=(32, 32, 32), epochs=10, data=data)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert evaluate(a, data.x_test, data.y_test)[1] > 0.85

    save_mlp(a, tmp_path / "mlp")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert config == {"model_type": "modelcypher-mlp", "sizes": [64, 32, 32, 32, 10]}
    loaded = load_mlp(tmp_path / "mlp")
    torch.testing.assert_close(loaded(data.x_test), a(data.x_test), rtol=0, atol=0)
