"""The `modelcypher` command: one entry point with verbs, all sharing one error handler.

Heavy modules (torch, transformers) are imported inside each verb so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

# mergekit-yaml's flags, so its users' command lines run: those that only tune mergekit's own machinery
# are accepted and do nothing (said in --help), those that would lower safety are refused with the reason.
_NO_EFFECT = {
    "--lazy-unpickle": "checkpoints are always read lazily, and pickles never",
    "--low-cpu-memory": "tensors stream one at a time already",
    "--read-to-gpu": "--device decides where the arithmetic runs",
    "--multi-gpu": "one device per merge",
    "--gpu-rich": "--device decides where the arithmetic runs",
    "--clone-tensors": "repeated layers are written as copies already",
    "--async-write": "writing already overlaps reading and arithmetic",
    "--write-threads": "writing already overlaps reading and arithmetic",
    "--lora-merge-cache": "a model+lora reference is applied as it is read, nothing is cached",
    "--lora-merge-dtype": "a LoRA is applied in float32",
    "--transformers-cache": "models are local directories; nothing is downloaded",
    "--safe-serialization": "the output is always safetensors",
}
_REFUSED = {
    "--trust-remote-code": "code shipped with a model is never run",
    "--no-safe-serialization": "pickled weights are never written",
}


def _merge(args: argparse.Namespace) -> int:
    from modelcypher.api import merge
    from modelcypher.errors import UserError

    for flag, why in _REFUSED.items():
        if getattr(args, f"refused{flag.replace('-', '_')}"):
            raise UserError(f"{flag}: {why}")
    if args.out and args.output and Path(args.out) != Path(args.output):
        raise UserError(f"two outputs given: {args.out} and -o {args.output}")
    out = args.out or args.output
    if out is None:
        raise UserError("no output directory: modelcypher merge CONFIG OUT (or -o OUT)")
    if args.num_threads:
        import torch

        torch.set_num_threads(args.num_threads)
    t0 = time.perf_counter()
    plan = merge(Path(args.config), out, device=args.device, max_shard_size=args.max_shard_size,
                 random_seed=args.random_seed, allow_nonfinite=args.allow_nonfinite,
                 truncate_vocab=args.truncate_vocab, overwrite=args.overwrite, dry_run=args.dry_run,
                 progress=not args.no_progress and sys.stderr.isatty(), allow_crimes=args.allow_crimes,
                 copy_tokenizer=args.copy_tokenizer, write_model_card=args.write_model_card,
                 intermediate_dir=args.intermediate_dir)
    gb = plan.nbytes / 1e9
    summary = (f"{plan.method.name}: {len(plan.tasks)} tensors, {gb:.3f} GB from {len(plan.models)} models")
    if args.dry_run:
        print(f"dry run, nothing written. {summary}")
    else:
        print(f"wrote {out} ({summary}) in {time.perf_counter() - t0:.1f}s")
        _print_kept(plan)
    for n in plan.notes:
        print(f"note: {n}")
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


def _evolve(args: argparse.Namespace) -> int:
    from modelcypher.api import evolve

    report = evolve(args.search, args.output, workers=args.workers, ray_address=args.ray_address, resume=args.resume,
                    progress=lambda line: print(line, flush=True))
    print(f"best fitness {report['best_fitness']:.6g} after {report['evaluations']} candidates; wrote "
          f"{Path(args.output) / 'best.yaml'}, report.json and fitness.png")
    return 0


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
    from modelcypher.checkpoint.guard import check_output_file, json_text, write_file
    from modelcypher.hf import read_text
    from modelcypher.measure.barrier import barrier_curve, lambdas, plot_barrier

    lambdas(args.points)  # a bad --points fails before any work
    inputs = [args.model_a, args.model_b, args.data, args.data_probe]
    for out in (args.json, args.plot):  # before any work: a bad output path fails at once
        if out:
            check_output_file(out, inputs)
    text = read_text(args.data)
    opts = _align_options(args) if args.method != "none" else None
    result = barrier_curve(args.model_a, args.model_b, text, points=args.points, max_tokens=args.max_tokens,
                           device=args.device, options=opts, probe_text=read_text(args.data_probe)
                           if args.data_probe else None)
    result["data"] = str(args.data)
    blob = json_text(result)
    if args.json:
        write_file(args.json, blob, inputs)
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


def _check_reports(args: argparse.Namespace, inputs: list, plot_folder: bool) -> None:
    """Before any work: a bad --json or --plot path fails at once, naming itself."""
    from modelcypher.checkpoint.guard import check_output_file, check_output_folder

    if args.json:
        check_output_file(args.json, inputs)
    if args.plot:
        (check_output_folder if plot_folder else check_output_file)(args.plot, inputs)


def _write_reports(args: argparse.Namespace, report: dict, inputs: list, plot) -> None:
    """The report as JSON to --json and its figures (``plot(report, path)``) to --plot, each named."""
    from modelcypher.checkpoint.guard import write_json

    if args.json:
        print(f"wrote {write_json(args.json, report, inputs)}")
    if args.plot:
        written = plot(report, args.plot)
        print(f"wrote {len(written)} figures into {args.plot}" if isinstance(written, list) else f"wrote {written}")


def _diagnose(args: argparse.Namespace) -> int:
    from modelcypher.measure.diagnose import diagnose_config, plot_heatmaps, render_table

    config = Path(args.config)  # a path, whatever its extension: never read as YAML text
    _check_reports(args, [config], plot_folder=True)
    report = diagnose_config(config, top_k=args.top_k, device=args.device)
    for w in report["warnings"]:
        print(f"modelcypher: warning: {w}", file=sys.stderr)
    print(render_table(report))
    _write_reports(args, report, [config], plot_heatmaps)
    return 0


def _probes(path: str | None) -> str | None:
    from modelcypher.hf import read_text

    return read_text(path) if path else None


def _compare(args: argparse.Namespace) -> int:
    from modelcypher.measure.compare import compare_models, plot_maps, render

    inputs = [args.model_a, args.model_b] + ([args.probes] if args.probes else [])
    _check_reports(args, inputs, plot_folder=True)
    report = compare_models(args.model_a, args.model_b, _probes(args.probes), max_anchors=args.max_anchors,
                            k=args.k, top_k=args.top_k, device=args.device)
    print(render(report))
    _write_reports(args, report, inputs, plot_maps)
    return 0


def _drift(args: argparse.Namespace) -> int:
    from modelcypher.hf import read_text
    from modelcypher.measure.drift import drift, plot_drift, read_task, render

    inputs = [args.model_b, args.changed, args.data] + ([args.task] if args.task else [])
    _check_reports(args, inputs, plot_folder=False)
    task = read_task(args.task) if args.task else None
    report = drift(args.model_b, args.changed, read_text(args.data), task, device=args.device)
    print(render(report))
    _write_reports(args, report, inputs, plot_drift)
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from modelcypher.transfer.move import transfer_adapter

    report = transfer_adapter(args.adapter, args.model_a, args.model_b, args.output, text=_probes(args.probes),
                              rank=args.rank, method=args.map, max_anchors=args.max_anchors, anchors=args.anchors,
                              pairing=args.pairing, gain=args.gain, update=args.update, refine_steps=args.refine,
                              memory_gb=args.memory_gb, lines=args.probe_lines, device=args.device,
                              overwrite=args.overwrite)
    errs = [m["update_error"] for m in report["modules"]]
    print(f"moved {len(report['modules'])} modules onto {report['model_b']} at rank {report['rank']} "
          f"({report['anchors']} {report['anchor_kind']} anchors, {report['map']} maps); "
          "update error on the anchors: mean "
          f"{sum(errs) / len(errs):.3g}, max {max(errs):.3g}; wrote {report['output']}")
    for c in report["correspondence"]:
        print(f"  block {c['block_a']} of A -> block {c['block_b']} of B")
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


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end in one line, as every other user mistake does."""

    def error(self, message: str):
        verb = self.prog.removeprefix("modelcypher").strip()
        self.exit(2, f"modelcypher: error: {verb + ': ' if verb else ''}{message}\n")


def _int_from(text: str, low: int, rule: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < low:
        raise argparse.ArgumentTypeError(f"{text}: must be {rule}")
    return n


def _steps(text: str) -> int:
    return _int_from(text, 0, "0 or more")


def _positive_int(text: str) -> int:
    return _int_from(text, 1, "at least 1")


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: must be a positive number")
    return x


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda, cuda:N or auto")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelcypher", description="Align and merge neural networks with geometry.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    m = sub.add_parser("merge", help="merge models described by a mergekit-style YAML config")
    m.add_argument("config", help="YAML config (merge_method, base_model, models or slices, parameters); several "
                   "YAML documents make a pipeline (mergekit-multi's format)")
    m.add_argument("out", nargs="?", metavar="OUT", help="output model directory (must not exist), or -o OUT")
    m.add_argument("-o", "--output", help="output model directory (must not exist)")
    m.add_argument("--device", default="auto", type=_device, help="cpu, cuda, cuda:N or auto (default: auto)")
    m.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="same as --device cuda")
    m.add_argument("--max-shard-size", "--out-shard-size", dest="max_shard_size", default="5GB",
                   help="largest safetensors shard: 2GB, 2GiB, or mergekit's 5B (billion bytes) (default 5GB)")
    m.add_argument("--dry-run", action="store_true", help="validate and plan only; write nothing")
    m.add_argument("--random-seed", type=int, default=0, help="seed for DARE/DELLA drops (default 0)")
    m.add_argument("--allow-nonfinite", action="store_true", help="merge tensors containing NaN/Inf")
    m.add_argument("--truncate-vocab", "--unsafe-truncate-embeddings", dest="truncate_vocab", action="store_true",
                   help="when vocabulary sizes differ, keep the first rows of the base (or first) model's size")
    m.add_argument("--allow-crimes", action="store_true",
                   help="merge models of different architectures where their tensors' names and shapes agree")
    m.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the tokenizer_source's tokenizer to the output (default: yes)")
    m.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True,
                   help="write README.md describing the merge (default: yes)")
    m.add_argument("--intermediate-dir", "-I", metavar="DIR",
                   help="a pipeline's stages other than its output, reused while unchanged (default: OUT.pipeline)")
    m.add_argument("--num-threads", type=_positive_int, help="torch threads for the arithmetic")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true", help="no progress bar")
    m.add_argument("-v", "--verbose", action="count", default=0, help="accepted; the output is already complete")
    compat = m.add_argument_group("mergekit-yaml flags with nothing to do here (accepted, no effect)")
    for flag, why in _NO_EFFECT.items():
        if flag in ("--lora-merge-cache", "--transformers-cache", "--write-threads", "--lora-merge-dtype"):
            compat.add_argument(flag, metavar="VALUE", help=why)
        else:
            compat.add_argument(flag, action="store_true", help=why)
    for flag, why in _REFUSED.items():
        compat.add_argument(flag, dest=f"refused{flag.replace('-', '_')}", action="store_true",
                            help=f"refused: {why}")
    m.set_defaults(func=_merge)

    a = sub.add_parser("align", help="permute/rotate model B onto model A (or several models onto their universe); "
                       "writes equivalent checkpoints")
    a.add_argument("models", nargs="+", metavar="MODEL",
                   help="the model to transform (with --universe: two or more models)")
    a.add_argument("--to", dest="model_a", help="the model to align onto (not with --universe)")
    a.add_argument("-o", "--output", required=True,
                   help="output model directory (with --universe: a directory of NN-name copies; must not exist)")
    _add_align_flags(a)
    a.add_argument("--device", default="auto", type=_device)
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
    b.add_argument("--max-tokens", type=_positive_int, default=65536)
    b.add_argument("--device", default="auto", type=_device)
    b.set_defaults(func=_barrier)

    g = sub.add_parser("diagnose", help="how much the task vectors of a merge config interfere, before merging")
    g.add_argument("config", help="the merge config (needs a base_model)")
    g.add_argument("--json", help="write the full report as JSON here")
    g.add_argument("--plot", help="write PNG heatmaps into this directory")
    g.add_argument("--top-k", type=_positive_int, default=None, help="k for top-k energy and subspace overlap")
    g.add_argument("--device", default="auto", type=_device)
    g.set_defaults(func=_diagnose)

    x = sub.add_parser("extract-lora", help="a PEFT LoRA adapter from a fine-tune minus its base (truncated SVD)")
    x.add_argument("finetune", help="the fine-tuned model directory")
    x.add_argument("--base", required=True, help="the base model directory it was tuned from")
    x.add_argument("-o", "--output", required=True, help="output adapter directory (must not exist)")
    x.add_argument("--rank", type=_positive_int, default=32, help="LoRA rank per module (default 32)")
    x.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this share of the largest (default 0: keep --rank)")
    x.add_argument("--embed-lora", action="store_true",
                   help="factor embeddings and the output head too (default: kept whole as modules_to_save)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    x.set_defaults(func=_extract_lora)

    c = sub.add_parser("compare", help="layer-by-layer representation maps of two models (any families)")
    c.add_argument("model_a")
    c.add_argument("model_b")
    c.add_argument("--probes", help="probe text (default: the corpus shipped with the package)")
    c.add_argument("--json", help="write the report (all matrices) as JSON here")
    c.add_argument("--plot", help="write PNG heatmaps into this directory")
    c.add_argument("--max-anchors", type=_positive_int, default=1024,
                   help="words of the probe text used (default 1024)")
    c.add_argument("-k", type=_positive_int, default=10, help="neighbours for the mutual k-NN overlap (default 10)")
    c.add_argument("--top-k", type=_positive_int, default=8,
                   help="active dimensions per anchor in the intersection map")
    c.add_argument("--device", default="auto", type=_device)
    c.set_defaults(func=_compare)

    r = sub.add_parser("drift", help="three-space report of a changed model (or adapter) against its base")
    r.add_argument("model_b", help="the base model")
    r.add_argument("changed", help="the changed model, or a PEFT adapter directory for the base")
    r.add_argument("--data", required=True, help="control text (the KL of next-token distributions is taken on it)")
    r.add_argument("--task", help="task file: 'prompt<TAB>answer' or 'name[input]answer' lines (exact match)")
    r.add_argument("--json", help="write the report as JSON here")
    r.add_argument("--plot", help="write one PNG of the three spaces here")
    r.add_argument("--device", default="auto", type=_device)
    r.set_defaults(func=_drift)

    t = sub.add_parser("transfer", help="move a PEFT LoRA adapter from model A to model B (any supported family)")
    t.add_argument("adapter", help="the PEFT LoRA adapter directory made for model A")
    t.add_argument("--from", required=True, dest="model_a", help="model A, the adapter's base")
    t.add_argument("--to", required=True, dest="model_b", help="model B, the new base")
    t.add_argument("-o", "--output", required=True, help="output adapter directory (must not exist)")
    t.add_argument("--probes", help="probe text (default: the corpus shipped with the package)")
    t.add_argument("--probe-lines", action="store_true",
                   help="read each line of the probe text alone, between its line breaks (a text of one example per "
                   "line, as the adapter was trained and is asked; default: pieces of up to the context)")
    t.add_argument("--rank", type=_positive_int, default=16, help="rank of the moved updates (default 16)")
    t.add_argument("--map", default="orthogonal", choices=("orthogonal", "ridge"),
                   help="maps between the spaces: orthogonal Procrustes (default) or ridge regression")
    t.add_argument("--anchors", default="tokens", choices=("tokens", "words"),
                   help="anchor on every character offset where both tokenizers end a token (default), or on "
                   "whole words (their tokens averaged)")
    t.add_argument("--pairing", default="updates", choices=("updates", "states"),
                   help="pair blocks by the CKA of what they write into the residual stream (default), or by the "
                   "layer correspondence of their hidden states")
    t.add_argument("--gain", default="projection", choices=("projection", "function", "none"),
                   help="scale each moved update so that its effect on B's anchors, along A's update's effect carried "
                   "into B, equals that effect (default); function: then the whole adapter likewise, by how it moves "
                   "the last hidden states; none: leave the updates as the maps carry them")
    t.add_argument("--update", default="fit", choices=("fit", "maps"),
                   help="fit each module's update on B's own inputs to do what A's update does, carried into B's "
                   "output space, then once more with both adapters on (default); maps: carry A's update through "
                   "the maps of its input and output spaces")
    t.add_argument("--refine", type=_steps, default=0, metavar="STEPS",
                   help="then train the moved adapter STEPS steps on the probe text so that it moves B's next "
                   "characters as A's adapter moves A's (default 0: no training)")
    t.add_argument("--max-anchors", type=_positive_int, default=16000,
                   help="anchors of the probe text used, evenly thinned (default 16000)")
    t.add_argument("--memory-gb", type=_positive_float, default=8.0,
                   help="bound on the pooled activations held at once (default 8): beyond it the blocks are read "
                   "in groups, one more pass of each model per group")
    t.add_argument("--device", default="auto", type=_device)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_transfer)

    e = sub.add_parser("evolve", help="search a merge method's parameters, or a path of layers through a pool of "
                       "models (data-flow), by CMA-ES (Ray workers); writes best.yaml")
    e.add_argument("search", help="search file (models, merge_method and search, or dataflow; objective, optimizer)")
    e.add_argument("-o", "--output", required=True, help="search directory: state, report, plot, best.yaml")
    e.add_argument("--workers", type=_positive_int, default=1, help="Ray actors scoring candidates (default 1)")
    e.add_argument("--ray-address", default=None,
                   help="join a running Ray cluster: auto or HOST:PORT (default: an embedded local Ray)")
    e.add_argument("--resume", action="store_true", help="continue the search in the output directory")
    e.set_defaults(func=_evolve)

    d = sub.add_parser("demo", help="train small Shakespeare models, merge them, print a table (offline)")
    d.add_argument("--workdir", default=None, help="where models are kept (default: a temporary directory)")
    d.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    d.add_argument("--device", default="auto", type=_device)
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
    from modelcypher.errors import UserError, os_error

    _import_heavy()
    try:
        return args.func(args)
    except UserError as e:
        print(f"modelcypher: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the user's environment: permissions, a full or read-only filesystem, ...
        print(f"modelcypher: error: {_one_line(str(os_error(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("modelcypher: interrupted; nothing was written", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
