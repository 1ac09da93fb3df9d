"""Calibrate the multi-task benchmark's recipes for a new model size, on the validation split only.

    python benchmarks/multitask_calibrate.py --layers 8 --width 512 --device cuda
    python benchmarks/multitask_calibrate.py --recipes full:1:200,full:10:200,full:5:400,full:10:400,\
full:30:400,full:10:800,lora:1:300,lora:10:300 --out benchmarks/results/multitask_4x128_anchor.json
                                            # the anchor weight (variant:anchor:steps[:modules]) on a scale's base

For one size it pre-trains the base (cached like the benchmark's), instructs it for several lengths and
reports each base's validation accuracies, picks the length whose average is nearest ``--target`` (the
4x128 base's level), then fine-tunes every task with each candidate recipe and scores task arithmetic
in memory over a few lambdas. What :data:`multitask.SCALES` holds for 8x512 was read off this probe
(``results/multitask_8x512_calibration.json``).

With ``--recipes`` it scores the fine-tunes' anchor weight and length instead, on the calibrated base of
``--scale``, with the benchmark's cached fine-tunes. A recipe is judged by the validation
average of its task arithmetic merge (best lambda), not by the normalized one: a stronger anchor makes
weaker fine-tunes, which alone raises merged / own. Nothing here touches the test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multitask as mt  # noqa: E402

from modelcypher.merging.registry import get_method  # noqa: E402
from modelcypher.zoo import gpt2, tasks  # noqa: E402

# name: (steps, lr, LoRA rank or 0 for a full fine-tune)
RECIPES = {"full_3e-4_200": (200, 3e-4, 0), "full_1e-4_300": (300, 1e-4, 0),
           "lora_1e-3_300": (300, 1e-3, 16), "lora_3e-4_400": (400, 3e-4, 16)}


def task_arithmetic(base, fts: dict, lam: float, device: str):
    """The registered ``task_arithmetic`` method applied tensor by tensor, in memory."""
    bsd = base.state_dict()
    merge = get_method("task_arithmetic").fn
    model = copy.deepcopy(base)
    model.load_state_dict({k: merge([f[k] for f in fts.values()], bsd[k], lambda_=lam) for k in bsd})
    return model.to(device)


def score(base, finetuned, lambdas, tok, data, dev: str) -> dict:
    """Validation accuracies of each task's fine-tune (``finetuned(task)``, a model) on its own task,
    and of their task arithmetic merge at every lambda."""
    fts, own = {}, {}
    for t in tasks.TASK_NAMES:
        m = finetuned(t).to(dev)
        own[t] = mt.evaluate(m, tok, data, 1)[t]
        fts[t] = m.cpu().state_dict()
    rec = {"own": own, "own_avg": mt._mean(own), "task_arithmetic": {}}
    for lam in lambdas:
        v = mt.evaluate(task_arithmetic(base, fts, lam, dev), tok, data, 1)
        rec["task_arithmetic"][lam] = {"avg": mt._mean(v), "norm": mt.normalized(v, own), "acc": v}
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--instruct-steps", default="150,250,400,600")
    ap.add_argument("--target", type=float, default=0.58, help="validation average wanted of the base")
    ap.add_argument("--out", default=str(mt.RESULTS / "multitask_calibration.json"))
    ap.add_argument("--recipes", default=None,
                    help="variant:anchor:steps[:attention],... to score on --scale's base (e.g. full:10:400)")
    ap.add_argument("--scale", default="4x128", choices=mt.SCALES, help="with --recipes: the base and recipes")
    args = ap.parse_args(argv)
    if args.recipes:
        return anchor_sweep(args)
    dev, t0 = args.device, time.perf_counter()
    log: dict = {"scale": f"{args.layers}x{args.width}"}

    def dump():
        Path(args.out).write_text(json.dumps(log, indent=1) + "\n")

    tok, data = mt.tokenizer(), mt.splits()
    pre_cfg = replace(mt.SCALES["8x512"].pretrain, n_layer=args.layers, n_head=args.width // 64, n_embd=args.width)
    pre = mt.get_pretrained(tok, pre_cfg, print, dev)
    log["pretrain"] = json.loads((pre / "train_meta.json").read_text())
    pretrained, pool = gpt2.load(pre)[0], mt.instruction_pool(data)
    curve, bases = {}, {}
    for n in map(int, args.instruct_steps.split(",")):
        bases[n] = mt.finetune(pretrained, pool, replace(mt.INSTRUCT, steps=n), tok, dev)
        curve[n] = mt.evaluate(bases[n].to(dev), tok, data, 1)
        bases[n].cpu()
        print(f"instruct {n}: val avg {mt._mean(curve[n]):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    log["curve"] = curve
    chosen = min(curve, key=lambda n: abs(mt._mean(curve[n]) - args.target))
    base, log["chosen_instruct"], log["finetunes"] = bases[chosen], chosen, {}
    anchors = mt.anchor_targets(copy.deepcopy(base).to(dev), tok)  # shared by every fine-tune below
    for name, (steps, lr, rank) in RECIPES.items():
        cfg = (replace(mt.LORA, steps=steps, lr=lr, lora_rank=rank, lora_alpha=3.0 * rank) if rank
               else replace(mt.FULL, steps=steps, lr=lr))
        rec = score(base, lambda t, cfg=cfg: mt.finetune(base, data[t][0], cfg, tok, dev, anchors),
                    (0.3, 0.5, 0.7, 1.0), tok, data, dev)
        best = max(rec["task_arithmetic"].values(), key=lambda r: r["avg"])
        print(f"{name}: own {rec['own_avg']:.3f}, task arithmetic norm {best['norm']:.3f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        log["finetunes"][name] = rec
        dump()
    log["seconds"] = time.perf_counter() - t0
    dump()
    return 0


LAMBDAS = (0.5, 0.7, 1.0, 1.3, 1.6, 2.0)  # a stronger anchor makes smaller task vectors: wider grid


def anchor_sweep(args) -> int:
    """Each variant's recipe with every anchor weight x length: own and task arithmetic accuracies."""
    dev, t0 = args.device, time.perf_counter()
    scale = mt.SCALES[args.scale]
    tok, data = mt.tokenizer(), mt.splits()
    base_path = mt.get_base(tok, data, scale.instruct, scale.pretrain, device=dev)
    base = gpt2.load(base_path)[0]
    log: dict = {"scale": args.scale, "criterion": "validation average of task arithmetic at its best lambda",
                 "recipes": {}}
    recipes = [(v, float(a), int(n), (m or ["all"])[0])
               for v, a, n, *m in (r.split(":") for r in args.recipes.split(","))]
    for variant, anchor, steps, modules in recipes:
        cfg = replace(scale.variants[variant], steps=steps, anchor=anchor, modules=modules)
        rec = {"config": asdict(cfg),
               **score(base, lambda t, cfg=cfg, variant=variant: gpt2.load(
                   mt.get_finetune(variant, cfg, t, base_path, data, tok, device=dev))[0], LAMBDAS, tok, data, dev)}
        lam, best = max(rec["task_arithmetic"].items(), key=lambda kv: kv[1]["avg"])
        rec["best"] = {"lambda": lam, **best}
        name = f"{variant}_anchor{anchor:g}_steps{steps}" + ("" if modules == "all" else f"_{modules}")
        log["recipes"][name] = rec
        print(f"{name}: own {rec['own_avg']:.3f}, task arithmetic avg {best['avg']:.3f} "
              f"(norm {best['norm']:.3f}, lambda {lam:g}) ({time.perf_counter() - t0:.0f}s)", flush=True)
        Path(args.out).write_text(json.dumps(log, indent=1) + "\n")
    for variant in dict.fromkeys(v for v, *_ in recipes):
        mine = {k: r for k, r in log["recipes"].items() if k.startswith(variant + "_")}
        log[f"chosen_{variant}"] = max(mine, key=lambda k: mine[k]["best"]["avg"])
        print(f"chosen for {variant}: {log[f'chosen_{variant}']}")
    log["seconds"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(log, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
