"""The `modelcypher` command: one entry point with verbs, all sharing one error handler.

Heavy modules (torch, transformers) are imported inside each verb so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time


def _merge(args: argparse.Namespace) -> int:
    from modelcypher.api import merge

    t0 = time.perf_counter()
    plan = merge(args.config, args.output, device=args.device, max_shard_size=args.max_shard_size,
                 random_seed=args.random_seed, allow_nonfinite=args.allow_nonfinite,
                 truncate_vocab=args.truncate_vocab, overwrite=args.overwrite, dry_run=args.dry_run,
                 progress=not args.no_progress and sys.stderr.isatty())
    gb = plan.nbytes / 1e9
    summary = (f"{plan.method.name}: {len(plan.tasks)} tensors, {gb:.3f} GB from {len(plan.models)} models")
    if args.dry_run:
        print(f"dry run, nothing written. {summary}")
        for n in plan.notes:
            print(f"note: {n}")
    else:
        print(f"wrote {args.output} ({summary}) in {time.perf_counter() - t0:.1f}s")
        _print_kept(plan)
    return 0


def _print_kept(plan) -> None:
    """Per layer, the share of each model's task vector that a filtering method kept."""
    from modelcypher.arch.families import layer_index

    rows: dict[str, list[list[float]]] = {}
    for name, rep in plan.reports.items():
        if "kept" in rep:
            layer = layer_index(name)
            rows.setdefault("-" if layer is None else str(layer), []).append(rep["kept"])
    if not rows:
        return
    models = [plan.names[mi] for mi, _ in plan.tasks[0].sources]
    print("kept share of each task vector (energy), per layer: " + ", ".join(models))
    for layer, reps in sorted(rows.items(), key=lambda kv: (kv[0] == "-", int(kv[0]) if kv[0] != "-" else 0)):
        means = [sum(r[i] for r in reps) / len(reps) for i in range(len(models))]
        print(f"  layer {layer:>3}: " + "  ".join(f"{m:.3f}" for m in means))


def _extract_lora(args: argparse.Namespace) -> int:
    from modelcypher.api import extract_lora

    t0 = time.perf_counter()
    rep = extract_lora(args.finetune, args.base, args.output, rank=args.rank, sv_epsilon=args.sv_epsilon,
                       embed_lora=args.embed_lora, overwrite=args.overwrite, log=print)
    kept = [m.kept for m in rep.modules.values()]
    print(f"wrote {args.output}: {len(rep.modules)} LoRA modules (mean kept {sum(kept) / max(len(kept), 1):.4f}), "
          f"{len(rep.modules_to_save)} tensors whole, in {time.perf_counter() - t0:.1f}s")
    if rep.not_carried:
        print(f"note: {len(rep.not_carried)} tensors outside weight matrices differ and are not carried "
              f"(e.g. {rep.not_carried[0]}); see extract_report.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from modelcypher.zoo.demo import run_demo

    run_demo(workdir=args.workdir, quick=args.quick, device=args.device)
    return 0


def _align(args: argparse.Namespace) -> int:
    from modelcypher.align.pipeline import cli_align

    return cli_align(args)


def _barrier(args: argparse.Namespace) -> int:
    from modelcypher.measure.barrier import cli_barrier

    return cli_barrier(args)


def _diagnose(args: argparse.Namespace) -> int:
    from modelcypher.measure.diagnose import cli_diagnose

    return cli_diagnose(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelcypher", description="Align and merge neural networks with geometry.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    m = sub.add_parser("merge", help="merge models described by a mergekit-style YAML config")
    m.add_argument("config", help="YAML config (merge_method, base_model, models or slices, parameters)")
    m.add_argument("-o", "--output", required=True, help="output model directory (must not exist)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    m.add_argument("--dry-run", action="store_true", help="validate and plan only; write nothing")
    m.add_argument("--random-seed", type=int, default=0, help="seed for DARE/DELLA drops (default 0)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge tensors containing NaN/Inf")
    m.add_argument("--truncate-vocab", action="store_true",
                   help="when vocabulary sizes differ, keep the first rows of the base (or first) model's size")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=_merge)

    a = sub.add_parser("align", help="permute/rotate model B onto model A; writes an equivalent checkpoint of B")
    a.add_argument("model_b", help="the model to transform")
    a.add_argument("--to", required=True, dest="model_a", help="the model to align onto")
    a.add_argument("-o", "--output", required=True, help="output model directory (must not exist)")
    a.add_argument("--method", choices=["weight", "activation", "learned"], default="weight",
                   help="learned: weight matching, then the rotations refined on the midpoint's loss on --data "
                   "(without --data, on text sampled from the two models)")
    a.add_argument("--residual", choices=["auto", "orthogonal", "permutation", "none"], default="auto",
                   help="the residual-stream transform (auto: orthogonal where exact, else permutation)")
    a.add_argument("--data", help="probe text for --method activation (required) or learned (optional): training "
                   "text, not held out")
    a.add_argument("--vo", action="store_true", help="also match each head's V-O basis (weight matching)")
    a.add_argument("--qk", action="store_true", help="also match each head's Q-K basis (weight matching; "
                   "under RoPE a rotation of each rotary pair)")
    a.add_argument("--max-sweeps", type=int, default=20)
    a.add_argument("--restarts", type=int, default=1,
                   help="weight matching: descents from this many visiting orders; the best objective wins")
    a.add_argument("--steps", type=int, default=200, help="learned matching: Adam steps (default 200)")
    a.add_argument("--lr", type=float, default=1e-3, help="learned matching: step size (default 1e-3)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=_align)

    b = sub.add_parser("barrier", help="loss along the straight line between two models (raw and aligned)")
    b.add_argument("model_a")
    b.add_argument("model_b")
    b.add_argument("--data", required=True, help="held-out text")
    b.add_argument("--align", choices=["none", "weight", "activation", "learned"], default="none",
                   help="also measure the pair after aligning B onto A")
    b.add_argument("--residual", choices=["auto", "orthogonal", "permutation", "none"], default="auto")
    b.add_argument("--vo", action="store_true", help="--align weight: also match each head's V-O basis")
    b.add_argument("--qk", action="store_true", help="--align weight: also match each head's Q-K basis")
    b.add_argument("--restarts", type=int, default=1, help="--align weight: descents from this many visiting "
                   "orders; the best objective wins")
    b.add_argument("--probe", help="probe text for --align activation (default: the held-out text) or learned "
                   "(training text; default: text sampled from the two models, never the held-out text)")
    b.add_argument("--points", type=int, default=11, help="interpolation points (>= 11 recommended)")
    b.add_argument("--json", help="write the curves as JSON here (default: stdout)")
    b.add_argument("--plot", help="write a PNG plot here")
    b.add_argument("--max-tokens", type=int, default=65536)
    b.add_argument("--device", default="auto")
    b.set_defaults(func=_barrier)

    g = sub.add_parser("diagnose", help="how much the task vectors of a merge config interfere, before merging")
    g.add_argument("config", help="the merge config (needs a base_model)")
    g.add_argument("--json", help="write the full report as JSON here")
    g.add_argument("--plot", help="write PNG heatmaps into this directory")
    g.add_argument("--top-k", type=int, default=None, help="k for top-k energy and subspace overlap")
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_diagnose)

    x = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from a fine-tune minus its base (truncated SVD)")
    x.add_argument("finetune", help="the fine-tuned model directory")
    x.add_argument("--base", required=True, help="the base model directory it was tuned from")
    x.add_argument("-o", "--output", required=True, help="output adapter directory (must not exist)")
    x.add_argument("--rank", type=int, default=32, help="LoRA rank per module (default 32)")
    x.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this share of the largest (default 0: keep --rank)")
    x.add_argument("--embed-lora", action="store_true",
                   help="factor embeddings and the output head too (default: kept whole as modules_to_save)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.set_defaults(func=_extract_lora)

    d = sub.add_parser("demo", help="train small Shakespeare models, merge them, print a table (offline)")
    d.add_argument("--workdir", default=None, help="where models are kept (default: a temporary directory)")
    d.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=_demo)
    return p


def _import_heavy() -> None:
    """Import torch and the package's core with Python's cyclic garbage collector paused, then freeze
    what they made out of its sight. Those imports make about a million long-lived objects, and every
    full collection, during the imports and after, walks them all: a sixth of a 200M-parameter merge's
    time on 2 cores. Later collections see only what the work itself makes."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import modelcypher.api  # noqa: F401  (torch, safetensors, pydantic)
        import modelcypher.merging.methods  # noqa: F401
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from modelcypher.errors import UserError

    _import_heavy()
    try:
        return args.func(args)
    except UserError as e:
        print(f"modelcypher: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelcypher: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
