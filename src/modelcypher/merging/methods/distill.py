"""Distilled merge coefficients: task arithmetic with one coefficient per task and output unit, fitted
on the models' own text.

    merged = base + Σ_i c_i ⊙ (x_i - base)

where ``c_i`` holds one coefficient per output unit of the parameter (a row of an ``nn.Linear`` weight,
a column of a GPT-2 ``Conv1D``, an entry of a bias or norm; broadcast over the other axis) for model
i. The coefficients are fitted before the merge, all models at once, by Adam on
``Σ_i KL(p_{θ_i} || p_merged)`` over each model's own text (``parameters: {data: path}``): the merged
model is taught to predict what each fine-tune predicts on that fine-tune's text. They start at
``init`` (task arithmetic with ``lambda = init``); ``steps`` Adam steps of size ``lr`` follow, each on
one batch of text per model (see ``modelcypher.merging.statistics.distilled_coefficients``). ``sequences``:
``blocks`` (default) cuts each text into blocks of the context (at most 256 tokens); ``lines`` makes
each non-empty line a sequence of its own, with the line break before it (a file of one example per
line: every example then starts at the first position, as it did in training).

Learned merge coefficients follow AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575: one coefficient
per task and layer, by entropy minimization on unlabelled inputs); distilling the fine-tunes into the
merged model follows ProDistill (Xu et al., ICML 2025, arXiv 2502.12706: few-shot, layer by layer, on
features). Here the teacher signal is each fine-tune's output distribution on its own text, which
needs no labels and ignores what no model can predict (the KL is zero where the teacher and the merge
agree, however uncertain both are), and the coefficients are per output unit.

Statistic: ``distill`` — a list, one coefficient tensor per entry of ``xs`` (None where a tensor has
none: it is then merged by task arithmetic with ``lambda = init``). Fitting holds the base, every task
vector (float32) and one model in memory: a method for models that fit in memory several times over.
"""

from __future__ import annotations

from modelcypher.errors import UserError
from modelcypher.merging.methods._inputs import f32
from modelcypher.merging.registry import register


@register(
    "distill",
    base="required",
    paper="learned coefficients after AdaMerging (arXiv 2310.02575), fitted by distillation after "
          "ProDistill (arXiv 2502.12706)",
    global_params=("steps", "lr", "init", "sequences"),
    stats=("distill",),
)
def distill(xs, base, *, distill=None, steps: int = 300, lr: float = 0.01, init: float = 1.0,
            sequences: str = "blocks", base_distill=None):
    b = f32(base)
    if distill is None or any(c is None for c in distill):
        return b + sum(float(init) * (f32(x) - b) for x in xs)
    if len(distill) != len(xs):
        raise UserError(f"distill: {len(distill)} coefficient tensors for {len(xs)} models")
    out = b.clone()
    for x, c in zip(xs, distill, strict=True):
        out += c.to(b.device) * (f32(x) - b)
    return out
