"""A small ReLU MLP trained on scikit-learn's bundled digits (8x8 images, 10 classes), offline.

The model family ``modelcypher-mlp`` exists so that alignment and barriers can be shown end to end in
seconds: two seeds give two models whose raw average is poor and whose aligned average is good.
A checkpoint is a directory with ``config.json`` (``model_type``, ``sizes``) and ``model.safetensors``
(``layers.{i}.weight`` / ``layers.{i}.bias``). Training is reproducible from the seed: the seed drives
initialization, the train/test split and the batch order, all through private generators.

The family registers itself as any package outside ModelCypher would: a :class:`Family` record (its
symmetry spec, its model class, its inputs), found through the ``modelcypher.families`` entry point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn

from modelcypher.arch.families import Family, register
from modelcypher.arch.symmetry import Group, Probe, Slot, SymmetrySpec

MODEL_TYPE = "modelcypher-mlp"


class MLP(nn.Module):
    def __init__(self, sizes: list[int]):
        super().__init__()
        self.sizes = list(sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)

    @property
    def config(self) -> dict:
        return {"model_type": MODEL_TYPE, "sizes": self.sizes}


def mlp_from_config(config: dict) -> MLP:
    return MLP(config["sizes"])


def spec(config: dict, names: set[str] | None = None) -> SymmetrySpec:
    """One permutation per hidden layer.

    ReLU also admits a positive rescaling of each unit; it is left out, because permutations already make
    the two models' units correspond and rescaling would only trade weight norm between layers.
    """
    sizes = config["sizes"]
    groups = tuple(
        Group(
            f"hidden.{i}", "perm", sizes[i + 1],
            (Slot(f"layers.{i}.weight", 0), Slot(f"layers.{i}.bias", 0), Slot(f"layers.{i + 1}.weight", 1, "in")),
            probes=(Probe(f"layers.{i + 1}"),),
        )
        for i in range(len(sizes) - 2)
    )
    return SymmetrySpec(MODEL_TYPE, groups)


def random_features(config: dict, n_inputs: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n_inputs, config["sizes"][0], generator=generator)


FAMILY = register(Family(MODEL_TYPE, (MODEL_TYPE,), "num_hidden_layers", (), (), False, symmetry=spec,
                         structure_keys=("sizes",), build=mlp_from_config, random_inputs=random_features,
                         reads="features"))


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """Digits scaled to [0, 1], split at random by ``seed``."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


def train_mlp(
    seed: int,
    hidden: tuple[int, ...] = (128, 128, 128),
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 3e-3,
    data: Digits | None = None,
) -> MLP:
    """Train an MLP ``64 -> hidden -> 10`` with Adam; the same seed gives the same weights."""
    data = data or load_digits_split()
    gen = torch.Generator().manual_seed(seed)
    model = MLP([data.x_train.shape[1], *hidden, 10])
    with torch.no_grad():
        for layer in model.layers:  # PyTorch's default init, driven by our generator
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=gen)
        for idx in order.split(batch_size):
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy)."""
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def save_mlp(model: MLP, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def load_mlp(path: str | Path) -> MLP:
    path = Path(path)
    model = mlp_from_config(json.loads((path / "config.json").read_text()))
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    return model.eval()
