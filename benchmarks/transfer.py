"""Adapter transfer across families, measured: a LoRA trained on model A for a task, moved to model B by
``modelcypher transfer``, against B alone and against a LoRA of the same rank trained on B directly.

A: a GPT-2-style model reading characters (the zoo's Shakespeare tokenizer). B: a Llama-style model
(RoPE, SwiGLU, grouped-query attention), wider and deeper, reading a byte-level BPE tokenizer trained here
with ``tokenizers``. Also the same-family pair: A and A' (A's recipe, another seed). Every model is
pre-trained on the same text (the comedies, with lines of the zoo's other tasks mixed in), then
instructed on the five other zoo tasks (loss on the answers, plus windows of the pre-training text so
that it still models text: a base that follows the task format, like the instruct models adapters are made
for); then a rank-8 LoRA learns the held-out task ``up`` (a word in capitals), answers only.

Reported (benchmarks/results/transfer.md and .json): per target model, the task's exact match and the
answer's loss (nats per answer, summed over its tokens) for the base, the direct LoRA and the moved one;
the share of the direct LoRA's gain the moved one keeps (by loss and by exact match); the drift (KL of
next-token distributions on control text: the histories, which no model was trained on) of both
adapters; the three-space report of the moved one; moved with word anchors and with token anchors, with
general probe text and with text of the adapter's domain, and with one option changed at a time
(``--gain function``, ``--gain none``, ``--update maps``, ``--map ridge``, ``--pairing states``,
``--refine 300``, and ``--refine 300 --probe-lines``: the probes hold the task's lines one per line); a sweep
over the moved rank and the number of anchors. Models and adapters are kept in ``--workdir`` and reused
when their recipe is unchanged (``recipe.json`` beside each).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer.py [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modelcypher.measure.anchors import default_probes
from modelcypher.measure.drift import drift, kl_drift
from modelcypher.measure.exact_match import Example, exact_match
from modelcypher.measure.loss import lm_loss
from modelcypher.transfer.move import transfer_adapter
from modelcypher.zoo import chartok, shakespeare, tasks

TASK = "up"
RANK = 8
RESULTS = Path(__file__).parent / "results"
GPT2_TARGETS = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Recipe:
    """How one model of the benchmark is made (pre-training, instruction, the direct LoRA)."""

    family: str  # gpt2 (character tokenizer) or llama (BPE)
    width: int
    layers: int
    seed: int
    pretrain_steps: int
    instruct_steps: int
    instruct_lr: float
    instruct_text_batch: int  # windows of pre-training text in each instruction step (it keeps modelling text)
    lora_steps: int
    lora_lr: float


# B is wider and deeper and reads BPE fragments of random letter strings: at A's instruction recipe
# (600 steps at 1e-3) its answer loss stayed at 2.1 nats per token, so it is instructed longer and faster.
FULL = {"A": Recipe("gpt2", 128, 4, 0, 1500, 600, 1e-3, 8, 400, 2e-3),
        "A2": Recipe("gpt2", 128, 4, 1, 1500, 600, 1e-3, 8, 400, 2e-3),
        "B": Recipe("llama", 192, 6, 2, 1500, 1200, 3e-3, 8, 600, 3e-3)}
QUICK = {"A": Recipe("gpt2", 64, 2, 0, 300, 150, 1e-3, 8, 100, 2e-3),
         "A2": Recipe("gpt2", 64, 2, 1, 300, 150, 1e-3, 8, 100, 2e-3),
         "B": Recipe("llama", 128, 3, 2, 300, 300, 3e-3, 8, 150, 3e-3)}


def bpe_tokenizer(text: str, vocab: int = 512) -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator([text[i:i + 10000] for i in range(0, len(text), 10000)], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``ids``: inputs and next-token targets."""
    starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
    x = torch.stack([ids[s:s + seq + 1] for s in starts])
    return x[:, :-1], x[:, 1:]


def train(model, ids: torch.Tensor, steps: int, lr: float, seq: int = 128, batch: int = 16, seed: int = 0):
    """Next-token training on random windows of ``ids``."""
    g = torch.Generator().manual_seed(seed)
    return _fit(model, lambda: [windows(ids, batch, seq, g)], steps, lr, warmup=50)


def train_answers(model, rows: list[tuple[torch.Tensor, int]], steps: int, lr: float, seed: int = 0,
                  batch: int = 32, text: torch.Tensor | None = None, text_batch: int = 0):
    """Training on task lines with the loss on the answers only (``rows``: ids and where the answer begins);
    with ``text``, each step also on ``text_batch`` windows of it (its loss added), so the model still
    models text, as instruct models do (on answers alone it forgot: 5.1 nats a character on Shakespeare
    against 2.5 before, and the BPE model fell below a uniform guess)."""
    g = torch.Generator().manual_seed(seed)

    def batches():
        idx = torch.randint(0, len(rows), (batch,), generator=g).tolist()
        width = max(len(rows[i][0]) for i in idx)
        x = torch.zeros(batch, width, dtype=torch.long)
        y = torch.full((batch, width), -100)
        for r, i in enumerate(idx):
            full, k = rows[i]
            x[r, :len(full)] = full
            y[r, k:len(full)] = full[k:]
        lm = [windows(text, text_batch, 128, g)] if text is not None and text_batch else []
        return [(x[:, :-1], y[:, 1:]), *lm]
    return _fit(model, batches, steps, lr, warmup=30)


def _fit(model, batches, steps: int, lr: float, warmup: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.zeros(())
    for step in range(steps):
        loss = sum(F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(), ignore_index=-100)
                   for x, y in batches())
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * (1 - step / steps))
        opt.step()
    model.eval()
    return float(loss.detach())


REFINE = 300  # steps of --refine
# the CLI's option names to transfer_adapter's
OPTION = {"map": "method", "refine": "refine_steps", "probe-lines": "lines"}

# (anchors, how many, probe text, other options): the defaults on both probe texts and with word anchors,
# then one option changed at a time
VARIANTS = (("words", 4096, "general", {}), ("tokens", 16000, "general", {}), ("tokens", 16000, "domain", {}),
            *(("tokens", 16000, probe, extra)
              for extra in ({"gain": "function"}, {"gain": "none"}, {"update": "maps"}, {"map": "ridge"},
                            {"pairing": "states"}, {"refine": REFINE}, {"refine": REFINE, "probe-lines": True})
              for probe in ("general", "domain")))


# (row, the adapter's model, the target, variants): A's LoRA to B and to A'; and the other way across
# families, B's direct LoRA moved to A (against A's own LoRA), default and --update maps.
PAIRS = (("B (Llama, BPE)", "A", "B", VARIANTS), ("A' (GPT-2, char, other seed)", "A", "A2", VARIANTS),
         ("A (GPT-2, char) from B's LoRA", "B", "A",
          tuple(("tokens", 16000, probe, extra)
                for extra in ({}, {"update": "maps"}, {"refine": REFINE}, {"refine": REFINE, "probe-lines": True})
                for probe in ("general", "domain"))))


def task_text(examples) -> str:
    return "".join("\n" + e.line for e in examples)


def answer_rows(tok, examples) -> list[tuple[torch.Tensor, int]]:
    """Each example's ids (``\nPROMPTANSWER\n``) and where its answer begins: BPE may merge across the
    prompt's end, so the answer begins after the longest prefix shared with the prompt's own ids."""
    rows = []
    for e in examples:
        prompt, full = encode(tok, "\n" + e.prompt), encode(tok, "\n" + e.prompt + e.answer + "\n")
        k = 0
        while k < min(len(prompt), len(full)) and prompt[k] == full[k]:
            k += 1
        rows.append((full, k))
    return rows


@torch.no_grad()
def answer_nll(model, tok, examples) -> float:
    """The answer's summed NLL (nats, answer and newline) given the prompt, per example."""
    nll = 0.0
    for full, k in answer_rows(tok, examples):
        logits = model(input_ids=full[None, :-1]).logits[0]
        nll += float(F.cross_entropy(logits[k - 1:], full[k:], reduction="sum"))
    return nll / len(examples)


@torch.no_grad()
def task_scores(model, tok, examples) -> dict:
    """Exact match of greedy decoding and the answer's summed NLL (:func:`answer_nll`)."""
    em = exact_match(model, tok, [Example("\n" + e.prompt, e.answer) for e in examples])
    return {"exact_match": em, "answer_nll": answer_nll(model, tok, examples)}


def load(path: Path, adapter: Path | None = None):
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model


def share(base: float, direct: float, moved: float) -> float | None:
    gain = direct - base
    return (moved - base) / gain if abs(gain) > 1e-9 else None


def cached(path: Path, recipe: dict, make) -> Path:
    """``make(path)`` unless ``path`` already holds what ``recipe`` makes."""
    stamp = path / "recipe.json"
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return path
    make(path)
    stamp.write_text(json.dumps(recipe, indent=1) + "\n")
    return path


def probe_sets(train_ex, val_ex) -> dict[str, str]:
    """Two probe texts: general text (the shipped probes, Shakespeare, the task's validation lines), and text
    of the adapter's domain (500 of its training lines, 200 lines of each other task, the shipped probes)."""
    return {"general": default_probes() + "\n" + shakespeare.text("comedy")[-20_000:] + task_text(val_ex),
            "domain": task_text(train_ex[:500]) + "".join(
                task_text(tasks.make_splits(t, (200, 0, 0), seed=5)[0]) for t in tasks.TASK_NAMES if t != TASK)
            + "\n" + default_probes()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small models and few steps (a smoke run, minutes)")
    ap.add_argument("--workdir", default="/tmp/mc_transfer_bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    recipes = QUICK if args.quick else FULL
    work = Path(args.workdir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    train_ex, val_ex, test_ex = tasks.make_splits(TASK, (2000, 100, 300), seed=0)
    corpus = shakespeare.text("comedy")
    rng = random.Random(0)
    # pre-training text: the comedies, then lines of every zoo task but ours (the format)
    other = [e for t in tasks.TASK_NAMES if t != TASK for e in tasks.make_splits(t, (2000, 0, 0), seed=1)[0]]
    rng.shuffle(other)
    pretrain_text = corpus + task_text(other)
    toks = {"gpt2": chartok.build_char_tokenizer(shakespeare.vocab()), "llama": bpe_tokenizer(pretrain_text)}
    log = {"setting": "quick" if args.quick else "full", "task": TASK, "rank": RANK,
           "recipes": {k: asdict(r) for k, r in recipes.items()}}

    def build(name: str, r: Recipe) -> tuple[Path, Path, object]:
        tok = toks[r.family]

        def save(model, path, what):
            model.save_pretrained(path)
            tok.save_pretrained(path)
            print(f"{what} ({time.time() - t0:.0f}s)", flush=True)

        def pretrain(path):
            torch.manual_seed(r.seed)
            if r.family == "gpt2":
                model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tok), n_embd=r.width, n_layer=r.layers,
                                                         n_head=r.width // 32, n_positions=256))
            else:
                model = tf.LlamaForCausalLM(tf.LlamaConfig(
                    vocab_size=len(tok), hidden_size=r.width, intermediate_size=2 * r.width,
                    num_hidden_layers=r.layers, num_attention_heads=r.width // 32, num_key_value_heads=2,
                    max_position_embeddings=256, tie_word_embeddings=False))
            loss = train(model, encode(tok, pretrain_text), r.pretrain_steps, 3e-3, seed=r.seed)
            save(model, path, f"pre-trained {name}: loss {loss:.3f}")

        def instruct(path):
            torch.manual_seed(r.seed)
            model = tf.AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32)
            loss = train_answers(model, answer_rows(tok, other), r.instruct_steps, r.instruct_lr, seed=r.seed,
                                 text=encode(tok, pretrain_text), text_batch=r.instruct_text_batch)
            save(model, path, f"instructed {name}: loss {loss:.3f} (answers + text)")

        def lora(path):
            torch.manual_seed(r.seed)
            model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            gpt2 = r.family == "gpt2"
            model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, fan_in_fan_out=gpt2,
                                                     target_modules=GPT2_TARGETS if gpt2 else LLAMA_TARGETS))
            loss = train_answers(model, answer_rows(tok, train_ex), r.lora_steps, r.lora_lr, seed=r.seed)
            save(model, path, f"LoRA on {name}: answer loss {loss:.3f}")

        key = {"pretrain_text_chars": len(pretrain_text), **asdict(r)}
        pre = cached(work / f"{name}-pretrained", {k: key[k] for k in key if not k.startswith(("instruct", "lora"))},
                     pretrain)
        base = cached(work / name, {k: key[k] for k in key if not k.startswith("lora")}, instruct)
        return base, cached(work / f"lora-{name}", key, lora), tok

    a, lora_a, char = build("A", recipes["A"])
    probe_texts = probe_sets(train_ex, val_ex)
    probes = probe_texts["general"]
    control = shakespeare.text("history")[:6000]  # a genre no model read
    a_scores = {"base": task_scores(load(a), char, test_ex), "lora": task_scores(load(a, lora_a), char, test_ex)}
    print(f"A: {json.dumps(a_scores)}", flush=True)

    rows = {}
    built = {"A": (a, lora_a, char)}
    for name, src, key, variants in PAIRS:
        if key not in built:
            built[key] = build(key, recipes[key])
        target, direct, tok = built[key]
        model_src, lora_src, _ = built[src]
        base_m, direct_m = load(target), load(target, direct)
        s_base, s_direct = task_scores(base_m, tok, test_ex), task_scores(direct_m, tok, test_ex)
        ctl = encode(tok, control)
        row = {"base": s_base, "direct": s_direct, "drift_direct": kl_drift(base_m, direct_m, ctl, 128), "moved": {},
               "base_control_nll": lm_loss(base_m, ctl, 128)}
        for anchors, n_anchors, probe, extra in variants:
            variant = f"{anchors}, {probe} probes" + "".join(
                f", --{k}" if v is True else f", --{k} {v}" for k, v in extra.items())
            moved = work / (f"moved-{src}-{key}-{anchors}-{probe}" + "".join(
                f"-{k}" if v is True else f"-{v}" for k, v in extra.items()))
            t1 = time.time()
            rep = transfer_adapter(lora_src, model_src, target, moved, text=probe_texts[probe], rank=RANK,
                                   anchors=anchors, max_anchors=n_anchors, device="cpu", overwrite=True,
                                   **{OPTION.get(k, k): v for k, v in extra.items()})
            secs = time.time() - t1
            moved_m = load(target, moved)
            s = task_scores(moved_m, tok, test_ex)
            row["moved"][variant] = {
                **s, "transfer_seconds": secs, "anchors": rep["anchors"],
                "kept_by_loss": share(-s_base["answer_nll"], -s_direct["answer_nll"], -s["answer_nll"]),
                "kept_by_exact_match": share(s_base["exact_match"], s_direct["exact_match"], s["exact_match"]),
                "drift": kl_drift(base_m, moved_m, ctl, 128),
                "update_error_mean": sum(m["update_error"] for m in rep["modules"]) / len(rep["modules"]),
                "map_fit_mean": sum(m["fit"] for m in rep["maps"].values()) / len(rep["maps"])}
        rows[name] = row
        print(f"{name}: {json.dumps({k: row[k] for k in ('base', 'direct', 'moved')})} ({time.time() - t0:.0f}s)",
              flush=True)
        if src != "A":  # the other direction: its variants only
            continue
        three = drift(target, work / f"moved-{src}-{key}-tokens-general", control,
                      [(e.prompt, e.answer) for e in test_ex[:30]], device="cpu")
        row["three_space (token anchors)"] = {
            "cka_per_layer": three["representations"]["cka"],
            "weights_relative_norm_mean": sum(w["relative_norm"] for w in three["weights"])
            / max(1, len(three["weights"])),
            "weights_subspace_overlap_mean": sum(w["subspace_overlap"] for w in three["weights"])
            / max(1, len(three["weights"]))}
        sweep = []
        for r in (2, 8, 16):
            for n_anchors in (1000, 16000):
                out = work / f"sweep-{key}"
                try:
                    transfer_adapter(lora_a, a, target, out, text=probes, rank=r, anchors="tokens",
                                     max_anchors=n_anchors, device="cpu", overwrite=True)
                except Exception as e:  # too few anchors for the widest space: recorded, not fatal
                    sweep.append({"rank": r, "anchors": n_anchors, "error": str(e)})
                    continue
                s = task_scores(load(target, out), tok, test_ex[:100])
                sweep.append({"rank": r, "anchors": n_anchors, **s,
                              "kept_by_loss": share(-s_base["answer_nll"], -s_direct["answer_nll"],
                                                    -s["answer_nll"])})
        row["sweep (token anchors, first 100 test examples)"] = sweep
    log.update({"A": a_scores, "targets": rows, "seconds": time.time() - t0})
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"transfer{suffix}.json").write_text(json.dumps(log, indent=2) + "\n")
    lines = [f"# Adapter transfer ({log['setting']} setting, task `{TASK}`, LoRA rank {RANK})", "",
             f"A (GPT-2, char): exact match {a_scores['base']['exact_match']:.2f} -> "
             f"{a_scores['lora']['exact_match']:.2f} with its LoRA; answer NLL {a_scores['base']['answer_nll']:.2f}"
             f" -> {a_scores['lora']['answer_nll']:.2f}", "",
             "| target | anchors, probes | base EM | direct EM | moved EM | base NLL | direct NLL | moved NLL | "
             "kept (loss) | kept (EM) | KL direct | KL moved |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "n/a" if x is None else f"{x:.2f}"
    for name, r in rows.items():
        for variant, m in r["moved"].items():
            lines.append(f"| {name} | {variant} ({m['anchors']}) | {r['base']['exact_match']:.2f} | "
                         f"{r['direct']['exact_match']:.2f} | {m['exact_match']:.2f} | {r['base']['answer_nll']:.2f} | "
                         f"{r['direct']['answer_nll']:.2f} | {m['answer_nll']:.2f} | {f(m['kept_by_loss'])} | "
                         f"{f(m['kept_by_exact_match'])} | {r['drift_direct']['kl']:.4f} | {m['drift']['kl']:.4f} |")
    lines += ["", "Each base still models text (next-token loss on the control text, nats a token: "
              + ", ".join(f"{name}: {r['base_control_nll']:.2f}" for name, r in rows.items()) + ")."]
    lines += ["", f"Total {log['seconds']:.0f}s on the CPU (models reused from the work directory when their "
              f"recipe was unchanged). Sweeps, the three-space report and map fits: transfer{suffix}.json."]
    (RESULTS / f"transfer{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
