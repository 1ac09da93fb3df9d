"""Why a refined transfer across families keeps about half of the direct LoRA's gain: the target, the fit,
and the data, measured apart (issue 23's "where the gain is small, say why").

On the models and adapters ``benchmarks/transfer.py`` left in its work directory (A: GPT-2, characters; B:
Llama, BPE; A's LoRA; B's direct LoRA; A's LoRA moved to B with general probes, training-free, with
``--refine 300``, and with ``--refine 300 --probe-lines``), the answer loss per character at the
characters where B begins a token (the only place ``--refine`` teaches, :mod:`modelcypher.transfer.refine`),
on the task's test lines and on the task lines the general probes hold (the refinement's own text):

- B, B with its direct LoRA, and the moved adapters;
- the refinement's target itself, ``q ∝ p_B p_A+ / p_A``: what B would score if it matched it exactly;
- a LoRA of the same rank trained on B (the direct recipe) with only the probes' task lines and their
  answers: the same text, read with labels;

and A's answer loss, with and without its adapter, on the probes' task lines read alone and after the lines
before them (what the refinement's target can teach, by how the probe text is cut).

Results: benchmarks/results/transfer_limits.{json,md}.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer_limits.py [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
import transfer as bench  # noqa: E402  (the models, their recipes, probes and scores)
from modelcypher.measure.anchors import Segment, token_segments  # noqa: E402
from modelcypher.measure.exact_match import Example  # noqa: E402
from modelcypher.transfer import refine  # noqa: E402
from modelcypher.zoo import tasks  # noqa: E402

CONTEXT_LINES = (0, 1, 4)


def answer_losses(tok_a, tok_b, lines, probe_text: str):
    """Two functions for ``lines`` (task examples): ``logprobs(side, model)``, a model's next-character
    log-probabilities where both tokenizers end a token (side 0: A's tokenizer, 1: B's), and ``loss`` of
    those, in nats per example over the answer's characters (B begins a token at each)."""
    alphabet = {c: i for i, c in enumerate(sorted(set(probe_text)))}
    texts = ["\n" + e.prompt + e.answer + "\n" for e in lines]
    segs = token_segments([Segment(t, ()) for t in texts], [tok_a, tok_b])
    segs = [Segment(s.text, tuple((a, c) for a, c in s.spans if c < len(s.text))) for s in segs]
    chars, answer = [], []
    for e, s in zip(lines, segs, strict=True):
        chars += [alphabet.get(s.text[c], len(alphabet)) for _, c in s.spans]
        answer += [c >= len("\n" + e.prompt) for _, c in s.spans]
    chars, answer = torch.tensor(chars), torch.tensor(answer)
    fcs = [refine.first_chars(t, alphabet) for t in (tok_a, tok_b)]
    rows = [refine.anchor_rows(t, segs, 256) for t in (tok_a, tok_b)]
    assert all(sum(len(p) for _, p in r) == len(chars) for r in rows)

    def logprobs(side: int, model) -> torch.Tensor:
        return refine.all_logprobs(model, rows[side], fcs[side], len(alphabet), "cpu")

    def loss(lp: torch.Tensor) -> float:
        return float(-lp[torch.arange(len(lp)), chars][answer].sum()) / len(lines)
    return logprobs, loss


def in_context_loss(model, tok, lines, k: int) -> float:
    """A model's answer loss (nats per example) on ``lines``, each read after the ``k`` lines before it, as a
    piece of probe text cut across lines reads it (``k = 0``: alone, as the task is trained and asked)."""
    shown = [Example("".join(b.line + "\n" for b in lines[max(0, i - k):i]) + e.prompt, e.answer)
             for i, e in enumerate(lines)]
    return bench.answer_nll(model, tok, shown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the models of transfer.py --quick")
    ap.add_argument("--workdir", default="/tmp/mc_transfer_bench", help="transfer.py's --workdir")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    need = ["A", "B", "lora-A", "lora-B", "moved-A-B-tokens-general", "moved-A-B-tokens-general-300",
            "moved-A-B-tokens-general-300-probe-lines"]
    if missing := [n for n in need if not (work / n).is_dir()]:
        raise SystemExit(f"{work} lacks {', '.join(missing)}: run benchmarks/transfer.py"
                         f"{' --quick' if args.quick else ''} --workdir {args.workdir} first")
    recipe = (bench.QUICK if args.quick else bench.FULL)["B"]
    train_ex, val_ex, test_ex = tasks.make_splits(bench.TASK, (2000, 100, 300), seed=0)
    probes = bench.probe_sets(train_ex, val_ex)["general"]
    tok_a, tok_b = (tf.AutoTokenizer.from_pretrained(work / k) for k in ("A", "B"))
    a, a_plus = bench.load(work / "A"), bench.load(work / "A", work / "lora-A")

    # B trained directly on the probes' task lines alone (their answers as labels), the direct recipe
    torch.manual_seed(recipe.seed)
    few = get_peft_model(bench.load(work / "B"), LoraConfig(r=bench.RANK, lora_alpha=2 * bench.RANK,
                                                            target_modules=bench.LLAMA_TARGETS))
    bench.train_answers(few, bench.answer_rows(tok_b, val_ex), recipe.lora_steps, recipe.lora_lr, seed=recipe.seed)
    few.eval()
    models = {"B": bench.load(work / "B"), "B, direct LoRA": bench.load(work / "B", work / "lora-B"),
              "B, moved (training-free)": bench.load(work / "B", work / "moved-A-B-tokens-general"),
              "B, moved and refined (--refine 300)": bench.load(work / "B", work / "moved-A-B-tokens-general-300"),
              "B, moved and refined, each probe line alone (--refine 300 --probe-lines)":
                  bench.load(work / "B", work / "moved-A-B-tokens-general-300-probe-lines"),
              "B, LoRA on the probes' task lines only": few}
    result = {"setting": "quick" if args.quick else "full", "probe_task_lines": len(val_ex), "splits": {}}
    for split, lines in (("test lines", test_ex), ("the probes' task lines", val_ex)):
        logprobs, loss = answer_losses(tok_a, tok_b, lines, probes)
        la, la_plus = logprobs(0, a), logprobs(0, a_plus)
        lb = logprobs(1, models["B"])
        rows = {"A": loss(la), "A with its LoRA": loss(la_plus),
                "target of the refinement, q ∝ p_B p_A+ / p_A": loss(torch.log_softmax(lb + la_plus - la, 1))}
        rows |= {name: loss(logprobs(1, m)) for name, m in models.items()}
        base, direct = rows["B"], rows["B, direct LoRA"]
        result["splits"][split] = {n: {"loss": v, "kept": bench.share(-base, -direct, -v)} for n, v in rows.items()}
    tok_scores = {name: bench.task_scores(m, tok_b, test_ex) for name, m in models.items()}
    base, direct = (tok_scores[k]["answer_nll"] for k in ("B", "B, direct LoRA"))
    result["token_level_test"] = {n: {**s, "kept": bench.share(-base, -direct, -s["answer_nll"])}
                                  for n, s in tok_scores.items()}
    # Why reading the probes a line at a time matters: A's adapter was trained on lines alone
    result["in_context"] = {name: {k: in_context_loss(m, tok_a, val_ex, k) for k in CONTEXT_LINES}
                            for name, m in (("A", a), ("A with its LoRA", a_plus))}
    result["seconds"] = time.time() - t0
    out = Path(__file__).parent / "results"
    suffix = "_quick" if args.quick else ""
    (out / f"transfer_limits{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    splits = list(result["splits"])
    lines = [f"# Where a refined transfer across families loses its gain ({result['setting']} setting)", "",
             "Answer loss (nats per example) at the answer characters where B begins a token, and the share of "
             "B's direct LoRA's gain it keeps; last column: the usual token-level share on the test lines "
             "(`transfer.py`'s measure).", "",
             "| model | " + " | ".join(f"{s}: loss | kept" for s in splits) + " | test, token-level kept |",
             "|---|" + "---|---|" * len(splits) + "---|"]
    for name in result["splits"][splits[0]]:
        cells = [f"{result['splits'][s][name]['loss']:.2f} | {result['splits'][s][name]['kept']:.0%}" for s in splits]
        tl = result["token_level_test"].get(name)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {format(tl['kept'], '.0%') if tl else ''} |")
    lines += ["", "A's answer loss on the probes' task lines, each read after the k lines before it (as a piece "
              "of probe text cut across lines reads most of them; k = 0: alone, as `--probe-lines` reads them):", "",
              "| model | " + " | ".join(f"k = {k}" for k in CONTEXT_LINES) + " |",
              "|---|" + "---|" * len(CONTEXT_LINES)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in by_k.values()) + " |"
              for name, by_k in result["in_context"].items()]
    lines += ["", f"{len(val_ex)} task lines in the general probes; {time.time() - t0:.0f}s on the CPU."]
    (out / f"transfer_limits{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
