"""Adapter transfer across families, measured: a LoRA trained on model A for a task, moved to model B by
``modelcypher transfer``, against B alone and against a LoRA of the same rank trained on B directly.

A: a GPT-2-style model reading characters (the zoo's Shakespeare tokenizer). B: a Llama-style model
(RoPE, SwiGLU, grouped-query attention), wider and deeper, reading a byte-level BPE tokenizer trained here
with ``tokenizers``. Both are pre-trained here on the same text (Shakespeare with the zoo's task lines
mixed in, so that both know the format), then a rank-r LoRA learns one zoo task (``up``: a word in
capitals). Also the same-family pair: A and A' (A's recipe, another seed).

Reported (benchmarks/results/transfer.md and .json): per target model, the task's exact match and the
answer's loss (nats per answer, summed over its tokens) for the base, the direct LoRA and the moved one;
the share of the direct LoRA's gain the moved one keeps (by loss and by exact match); the drift (KL of
next-token distributions on held-out Shakespeare) of both adapters; the three-space report of the moved
one; a sweep over the moved rank and the number of anchors.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer.py [--quick] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from modelcypher.measure.anchors import default_probes
from modelcypher.measure.drift import drift, kl_drift
from modelcypher.transfer.move import transfer_adapter
from modelcypher.zoo import chartok, shakespeare, tasks

TASK = "up"
RESULTS = Path(__file__).parent / "results"


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


def train(model, ids: torch.Tensor, steps: int, lr: float, seq: int = 128, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq + 1] for s in starts])
        loss = F.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        lr_now = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        opt.step()
    model.eval()
    return float(loss)


def task_text(examples) -> str:
    return "".join("\n" + e.line for e in examples)


@torch.no_grad()
def task_scores(model, tok, examples) -> dict:
    """Exact match (greedy) and the answer's summed NLL (nats) given the prompt."""
    hits, nll = 0, 0.0
    for e in examples:
        prompt = encode(tok, "\n" + e.prompt)
        full = encode(tok, "\n" + e.prompt + e.answer + "\n")
        # BPE may merge across the prompt's end: score the tokens after the longest shared prefix
        k = 0
        while k < min(len(prompt), len(full)) and prompt[k] == full[k]:
            k += 1
        logits = model(input_ids=full[None, :-1]).logits[0]
        nll += float(F.cross_entropy(logits[k - 1:], full[k:], reduction="sum"))
        ids = prompt[None]
        for _ in range(len(e.answer) + 2):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
            out = tok.decode(ids[0, len(prompt):])
            if "\n" in out:
                break
        hits += out.split("\n")[0] == e.answer and "\n" in out
    return {"exact_match": hits / len(examples), "answer_nll": nll / len(examples)}


def lora_on(base_dir: Path, tok, train_ids, out: Path, rank: int, steps: int, targets, seed: int) -> Path:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                             fan_in_fan_out="c_attn" in targets))
    train(model, train_ids, steps, 2e-3, seed=seed)
    model.save_pretrained(out)
    return out


def load(path: Path, adapter: Path | None = None):
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, adapter).eval() if adapter else model


def share(base: float, direct: float, moved: float) -> float | None:
    gain = direct - base
    return (moved - base) / gain if abs(gain) > 1e-9 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small models and few steps (minutes on 2 CPU cores)")
    ap.add_argument("--workdir", default="/tmp/mc_transfer_bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    q = args.quick
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pre_steps, lora_steps = (400, 300) if q else (3000, 1000)
    rank = 8
    train_ex, val_ex, test_ex = tasks.make_splits(TASK, (2000, 100, 100 if q else 300), seed=0)
    text = shakespeare.text("comedy")
    corpus = text[: 400_000 if q else 2_000_000]
    held_out = text[-20_000:]
    rng = random.Random(0)
    # pre-training text: Shakespeare with task lines of every zoo task but ours mixed in (the format)
    other = [e for t in tasks.TASK_NAMES if t != TASK for e in tasks.make_splits(t, (500, 0, 0), seed=1)[0]]
    rng.shuffle(other)
    pretrain_text = corpus + task_text(other)

    char = chartok.build_char_tokenizer(shakespeare.vocab())
    bpe = bpe_tokenizer(pretrain_text)
    log = {"setting": "quick" if q else "full", "task": TASK, "rank": rank, "pretrain_steps": pre_steps,
           "lora_steps": lora_steps}

    def pretrain(name, model, tok, seed):
        torch.manual_seed(seed)
        loss = train(model, encode(tok, pretrain_text), pre_steps, 3e-3, seed=seed)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        print(f"pre-trained {name}: loss {loss:.3f} ({time.time() - t0:.0f}s)", flush=True)
        return work / name

    d_a, d_b = (64, 96) if q else (128, 192)
    torch.manual_seed(0)
    a = pretrain("A-gpt2-char", tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=len(char), n_embd=d_a, n_layer=2, n_head=4, n_positions=256)), char, 0)
    a2 = pretrain("A2-gpt2-char-seed1", tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=len(char), n_embd=d_a, n_layer=2, n_head=4, n_positions=256)), char, 1)
    b = pretrain("B-llama-bpe", tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=len(bpe), hidden_size=d_b, intermediate_size=2 * d_b, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)),
        bpe, 2)

    gpt2_targets = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    llama_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora_a = lora_on(a, char, encode(char, task_text(train_ex)), work / "lora-A", rank, lora_steps, gpt2_targets, 0)
    print(f"LoRA on A trained ({time.time() - t0:.0f}s)", flush=True)
    probes = default_probes() + "\n" + held_out[:30_000] + task_text(val_ex)
    control = held_out[-6000:]
    (work / "control.txt").write_text(control)

    rows = {}
    for name, target, tok, targets in (("B (Llama, BPE)", b, bpe, llama_targets),
                                       ("A' (GPT-2, char, other seed)", a2, char, gpt2_targets)):
        direct = lora_on(target, tok, encode(tok, task_text(train_ex)), work / f"lora-direct-{target.name}", rank,
                         lora_steps, targets, 0)
        moved = work / f"lora-moved-{target.name}"
        t1 = time.time()
        rep = transfer_adapter(lora_a, a, target, moved, text=probes, rank=rank, device="cpu")
        secs = time.time() - t1
        base_m, direct_m, moved_m = load(target), load(target, direct), load(target, moved)
        s_base, s_direct, s_moved = (task_scores(m, tok, test_ex) for m in (base_m, direct_m, moved_m))
        ctl = encode(tok, control)
        row = {"base": s_base, "direct": s_direct, "moved": s_moved, "transfer_seconds": secs,
               "anchors": rep["anchors"],
               "kept_by_loss": share(-s_base["answer_nll"], -s_direct["answer_nll"], -s_moved["answer_nll"]),
               "kept_by_exact_match": share(s_base["exact_match"], s_direct["exact_match"], s_moved["exact_match"]),
               "drift_direct": kl_drift(base_m, direct_m, ctl, 128), "drift_moved": kl_drift(base_m, moved_m, ctl, 128),
               "update_error_mean": sum(m["update_error"] for m in rep["modules"]) / len(rep["modules"]),
               "map_fit_mean": sum(m["fit"] for m in rep["maps"].values()) / len(rep["maps"])}
        three = drift(target, moved, control, [(e.prompt, e.answer) for e in test_ex[:30]], device="cpu")
        row["three_space"] = {"cka_per_layer": three["representations"]["cka"],
                              "weights_relative_norm_mean": sum(w["relative_norm"] for w in three["weights"])
                              / max(1, len(three["weights"])),
                              "weights_subspace_overlap_mean": sum(w["subspace_overlap"] for w in three["weights"])
                              / max(1, len(three["weights"]))}
        sweep = []
        for r in (2, 8):
            for n_anchors in (300, 4000):
                out = work / f"sweep-{target.name}-{r}-{n_anchors}"
                try:
                    transfer_adapter(lora_a, a, target, out, text=probes, rank=r, max_anchors=n_anchors, device="cpu")
                except Exception as e:  # too few anchors for the widest space: recorded, not fatal
                    sweep.append({"rank": r, "anchors": n_anchors, "error": str(e)})
                    continue
                s = task_scores(load(target, out), tok, test_ex[:50])
                sweep.append({"rank": r, "anchors": n_anchors, **s})
        row["sweep (first 50 test examples)"] = sweep
        rows[name] = row
        print(f"{name}: {json.dumps({k: row[k] for k in ('base', 'direct', 'moved', 'kept_by_loss')})} "
              f"({time.time() - t0:.0f}s)", flush=True)
    a_scores = {"base": task_scores(load(a), char, test_ex), "lora": task_scores(load(a, lora_a), char, test_ex)}
    log.update({"A": a_scores, "targets": rows, "seconds": time.time() - t0})
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if q else ""
    (RESULTS / f"transfer{suffix}.json").write_text(json.dumps(log, indent=2) + "\n")
    lines = [f"# Adapter transfer ({log['setting']} setting, task `{TASK}`, LoRA rank {rank})", "",
             f"A (GPT-2, char): exact match {a_scores['base']['exact_match']:.2f} -> "
             f"{a_scores['lora']['exact_match']:.2f} with its LoRA; answer NLL {a_scores['base']['answer_nll']:.2f}"
             f" -> {a_scores['lora']['answer_nll']:.2f}", "",
             "| target | base EM | direct EM | moved EM | base NLL | direct NLL | moved NLL | kept (loss) | "
             "kept (EM) | KL direct | KL moved |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        def f(x):
            return "n/a" if x is None else f"{x:.2f}"
        lines.append(f"| {name} | {r['base']['exact_match']:.2f} | {r['direct']['exact_match']:.2f} | "
                     f"{r['moved']['exact_match']:.2f} | {r['base']['answer_nll']:.2f} | "
                     f"{r['direct']['answer_nll']:.2f} | {r['moved']['answer_nll']:.2f} | {f(r['kept_by_loss'])} | "
                     f"{f(r['kept_by_exact_match'])} | {r['drift_direct']['kl']:.4f} | {r['drift_moved']['kl']:.4f} |")
    lines += ["", f"Total {log['seconds']:.0f}s on the CPU. Sweeps, the three-space report and map fits: "
              f"transfer{suffix}.json."]
    (RESULTS / f"transfer{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
