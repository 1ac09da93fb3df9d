"""Settings that several verbs share, each default stated once.

``AlignOptions`` is how to align one model onto another: the ``align`` verb, ``barrier --align`` and a
merge config's ``align:`` section all read it, and the CLI makes its flags from its fields (their
descriptions are the flags' help). It sits on the lowest floor because the merge config, below
alignment, carries it too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelcypher.errors import UserError

MatchMethod = Literal["weight", "activation", "learned"]


class AlignOptions(BaseModel):
    """How to find the transforms that bring model B onto model A."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: MatchMethod = Field(
        "weight", description="weight: data-free Git Re-Basin matching; activation: correlations on probe "
        "text; learned: weight matching, then the rotations refined on the midpoint's loss on the probe text "
        "(without one, on text sampled from the two models)")
    data: str | None = Field(
        None, description="probe text for activation (required) or learned (optional) matching: training "
        "text, not held out")
    residual: Literal["auto", "orthogonal", "permutation", "none"] = Field(
        "auto", description="the residual-stream transform (auto: orthogonal where exact, else permutation)")
    vo: bool = Field(False, description="weight matching: also match each head's V-O basis")
    qk: bool = Field(False, description="weight matching: also match each head's Q-K basis (under RoPE a "
                     "rotation of each rotary pair)")
    max_sweeps: int = Field(20, ge=1, description="weight matching: coordinate-descent sweeps at most")
    restarts: int = Field(1, ge=1, description="weight matching: descents from this many visiting orders; "
                          "the best objective wins")
    probe_tokens: int = Field(65536, ge=1, description="activation and learned matching: probe tokens at "
                              "most (read from the probe text, or sampled from the models)")
    steps: int = Field(200, ge=1, description="learned matching: Adam steps")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="learned matching: step size")
    seed: int = Field(0, description="seed of the visiting orders, sampled probes and learned steps")
    universe: bool = Field(False, description="align every model onto a universe built from all of them "
                           "(two or more models; cycle-consistent) instead of onto one reference")
    rounds: int = Field(10, ge=1, description="universe matching: rounds at most (each aligns every model "
                        "onto the universe, then averages them into the next one)")
    alpha: float = Field(0.1, gt=0, allow_inf_nan=False, description="learned universe matching: "
                         "lambda ~ Dirichlet(alpha 1) over the models")

    @classmethod
    def of(cls, **values) -> AlignOptions:
        """Options from keyword values (None: the default); a bad value is one line naming it."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise UserError(f"{where}: {err['msg']}") from None
