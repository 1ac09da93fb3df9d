"""The `modelcypher` command: one entry point with verbs, all sharing one error handler.

Heavy modules (torch, transformers) are imported inside each verb so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


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


def _demo(args: argparse.Namespace) -> int:
    from modelcypher.zoo.demo import run_demo

    run_demo(workdir=args.workdir, quick=args.quick, device=args.device)
    return 0


def _align(args: argparse.Namespace) -> int:
    from modelcypher.align.pipeline import align_checkpoint, align_universe
    from modelcypher.errors import UserError

    opts = _align_options(args)
    if opts.universe:
        if args.model_a is not None:
            raise UserError("--universe aligns the models onto a universe built from all of them: drop --to")
        report = align_universe(args.models, args.output, opts, device=args.device, overwrite=args.overwrite)
        m = report["movement"]
        how = (f"{report['method']} matching, residual {report['residual']}, {report['rounds']} rounds, the "
               f"universe's movement {m[0]:.3g} -> {m[-1]:.3g}")
        if "mixture_loss" in report:
            x = report["mixture_loss"]
            how += (f", then mixture loss {x[0]:.4f} -> {x[1]:.4f} in {report['steps']} steps on "
                    f"{report['tokens']} tokens of {report['probes']}")
        print(f"aligned {len(report['models'])} models onto their universe ({how}); max logit gap "
              f"{report['max_logit_gap']:.2g}; wrote {', '.join(report['outputs'])} in "
              f"{report['seconds']['total']:.1f}s")
        return 0
    if args.model_a is None or len(args.models) != 1:
        raise UserError("align takes one model and --to REFERENCE, or two or more models and --universe")
    report = align_checkpoint(args.models[0], args.model_a, args.output, opts, device=args.device,
                              overwrite=args.overwrite)
    how = f"{report['method']} matching, residual {report['residual']}"
    if "objective" in report:
        h = report["objective"]
        how += f", objective {h[0]:.6g} -> {h[-1]:.6g} in {report['sweeps']} sweeps"
        if "midpoint_loss" in report:
            m = report["midpoint_loss"]
            how += (f", then midpoint loss {m[0]:.4f} -> {m[1]:.4f} in {report['steps']} steps on "
                    f"{report['tokens']} tokens of {report['probes']}")
    else:
        how += f", {report['tokens']} probe tokens"
    print(f"aligned {report['model_b']} onto {report['model_a']} ({how}); max logit gap "
          f"{report['max_logit_gap']:.2g}; wrote {report['output']} in {report['seconds']['total']:.1f}s")
    return 0


def _barrier(args: argparse.Namespace) -> int:
    import json

    from modelcypher.hf import read_text
    from modelcypher.measure.barrier import barrier_curve, lambdas, plot_barrier

    lambdas(args.points)  # a bad --points fails before any work
    text = read_text(args.data)
    opts = _align_options(args) if args.method != "none" else None
    result = barrier_curve(args.model_a, args.model_b, text, points=args.points, max_tokens=args.max_tokens,
                           device=args.device, options=opts, probe_text=read_text(args.data_probe)
                           if args.data_probe else None)
    result["data"] = str(args.data)
    blob = json.dumps(result, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(blob)
    else:
        sys.stdout.write(blob)
    if args.plot:
        plot_barrier(result, args.plot)
    if args.json:
        line = f"raw barrier {result['raw']['barrier']:.4f}"
        if opts is not None:
            line += f", aligned ({opts.method}) barrier {result['aligned']['barrier']:.4f}"
        print(f"{line} over {result['tokens']} tokens; wrote {args.json}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    import json

    from modelcypher.measure.diagnose import diagnose_config, finite, plot_heatmaps, render_table

    report = diagnose_config(args.config, top_k=args.top_k, device=args.device)
    for w in report["warnings"]:
        print(f"modelcypher: warning: {w}", file=sys.stderr)
    print(render_table(report))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(finite(report), indent=2, allow_nan=False) + "\n")
        print(f"wrote {path}")
    if args.plot:
        paths = plot_heatmaps(report, args.plot)
        print(f"wrote {len(paths)} heatmaps into {args.plot}")
    return 0


# The alignment flags come from the fields of AlignOptions (modelcypher.options), one flag per field, so
# each default and help text is stated once; a verb may spell a flag its own way (barrier --align, --probe).
def _add_align_flags(p: argparse.ArgumentParser, spelled: dict[str, str] | None = None,
                     no_method: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """``no_method``: a first choice of ``method`` meaning "do not align", and the verb's default;
    ``skip``: fields the verb has no use for (their defaults hold)."""
    from typing import Literal, get_args, get_origin

    from modelcypher.options import AlignOptions

    spelled = spelled or {}
    for name, f in AlignOptions.model_fields.items():
        if name in skip:
            continue
        flag = spelled.get(name, "--" + name.replace("_", "-"))
        dest = "data_probe" if name == "data" else name
        default = no_method if name == "method" and no_method else f.default
        help_ = f.description + (f" (default {default})" if default not in (None, False) else "")
        if f.annotation is bool:
            p.add_argument(flag, dest=dest, action="store_true", help=help_)
        elif get_origin(f.annotation) is Literal:
            choices = ((no_method,) if name == "method" and no_method else ()) + get_args(f.annotation)
            p.add_argument(flag, dest=dest, default=default, choices=choices, help=help_)
        else:
            kind = f.annotation if f.annotation in (int, float) else str
            p.add_argument(flag, dest=dest, default=default, type=kind, metavar=name.upper(), help=help_)


def _align_options(args: argparse.Namespace):
    from modelcypher.options import AlignOptions

    values = {n: getattr(args, "data_probe" if n == "data" else n, None) for n in AlignOptions.model_fields}
    return AlignOptions.of(**values)


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

    a = sub.add_parser("align", help="permute/rotate model B onto model A (or several models onto their universe); "
                       "writes equivalent checkpoints")
    a.add_argument("models", nargs="+", metavar="MODEL",
                   help="the model to transform (with --universe: two or more models)")
    a.add_argument("--to", dest="model_a", help="the model to align onto (not with --universe)")
    a.add_argument("-o", "--output", required=True,
                   help="output model directory (with --universe: a directory of NN-name copies; must not exist)")
    _add_align_flags(a)
    a.add_argument("--device", default="auto")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=_align)

    b = sub.add_parser("barrier", help="loss along the straight line between two models (raw and aligned)")
    b.add_argument("model_a")
    b.add_argument("model_b")
    b.add_argument("--data", required=True, help="held-out text")
    _add_align_flags(b, {"method": "--align", "data": "--probe"}, no_method="none",
                     skip=("universe", "rounds", "alpha"))
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

    d = sub.add_parser("demo", help="train small Shakespeare models, merge them, print a table (offline)")
    d.add_argument("--workdir", default=None, help="where models are kept (default: a temporary directory)")
    d.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    d.add_argument("--device", default="auto")
    d.set_defaults(func=_demo)
    return p


def _import_heavy() -> None:
    """Import torch and the package's core with Python's cyclic garbage collector paused, then freeze
    what they made out of its sight. Those imports make about a million long-lived objects, and every
    full collection, during the imports and after, walks them all. Later collections see only what the
    work itself makes."""
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
