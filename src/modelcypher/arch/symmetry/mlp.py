"""The plain ReLU MLP of ``modelcypher.zoo.mlp``: one permutation per hidden layer.

ReLU also admits a positive rescaling of each unit; it is left out, because permutations already make
the two models' units correspond and rescaling would only trade weight norm between layers.
"""

from __future__ import annotations

from modelcypher.arch.symmetry import Group, Probe, Slot, SymmetrySpec


def spec(config: dict, names: set[str] | None = None) -> SymmetrySpec:
    sizes = config["sizes"]
    groups = tuple(
        Group(
            f"hidden.{i}", "perm", sizes[i + 1],
            (
                Slot(f"layers.{i}.weight", 0),
                Slot(f"layers.{i}.bias", 0),
                Slot(f"layers.{i + 1}.weight", 1, "in"),
            ),
            probes=(Probe(f"layers.{i + 1}"),),
        )
        for i in range(len(sizes) - 2)
    )
    return SymmetrySpec("modelcypher-mlp", groups)
