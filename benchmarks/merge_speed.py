"""Merge speed and memory on ~200M-parameter Llama-shaped checkpoints (base + 3 fine-tunes, bf16).

For each method: wall time and peak RSS of a fresh `modelcypher merge` process, next to the I/O floor
measured in the same run: a fresh process that reads every byte of the models that method's merge reads
(slerp two, linear the three fine-tunes, the others all four) and writes one model with safetensors,
fsynced as the merge's output is. Both sides are timed alike, from outside, as whole processes:
interpreter start, imports (torch for both, plus ModelCypher's own for a merge) and work; each process
also reports its own import time, so the figures can be read with or without it. Peak RSS is the
process's own high-water mark (VmHWM): ru_maxrss would carry over the benchmark's own size across fork
and exec. The floor is timed once to warm the page cache, then again before each of a method's runs;
a method's fastest floor is its reference (disk speed drifts, and the fastest floor is the hardest bar).
Where mergekit is installed in a separate environment (MERGEKIT_PYTHON=/path/to/python), it is timed on
the same configs; e.g. ``python -m venv --system-site-packages /tmp/mk && /tmp/mk/bin/pip install
mergekit`` (which reuses the installed torch). Results: benchmarks/results/merge_speed.{json,md}.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/merge_speed.py [--small | --large]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CACHE = HERE / ".cache" / "merge_speed"
METHODS = {
    "linear": {"parameters": {"weight": 1.0}},
    "slerp": {"parameters": {"t": 0.5}},
    "task_arithmetic": {"parameters": {"weight": 0.5}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.5}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.5}},
}
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=8)
# 3.4 times the parameters (697M): how the ratios move with size, when per-process costs weigh less
LARGE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=8)
SMALL = dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4)


def build_models(shape: dict, root: Path) -> list[Path]:
    """Llama-shaped checkpoints written tensor by tensor (no full model in memory)."""
    import torch

    from modelcypher.checkpoint.writer import ShardedWriter

    h, f, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    names = [("model.embed_tokens.weight", (v, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                  (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                  (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                  (p + "mlp.down_proj.weight", (h, f))]
    names += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
              "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
              "hidden_act": "silu", **shape}
    paths = []
    for k, tag in enumerate(["base", "ft1", "ft2", "ft3"]):
        out = root / tag
        paths.append(out)
        if (out / "done").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        w = ShardedWriter(out, [(n, s, torch.bfloat16) for n, s in names], 200 * 10**6)
        g = torch.Generator().manual_seed(0)
        gk = torch.Generator().manual_seed(k)
        shapes = dict(names)
        for n in w.order:
            s = shapes[n]
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
            if k:
                t = t + torch.randn(s, generator=gk) * 0.002
            w.write(n, t.to(torch.bfloat16))
        w.finish()
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "done").write_text("")
    return paths


def config_for(method: str, paths: list[Path]) -> dict:
    base, fts = paths[0], paths[1:]
    if method == "slerp":
        fts = fts[:1]
    models = [{"model": str(p), **({"parameters": {k: v for k, v in METHODS[method]["parameters"].items()
                                                    if k != "t"}} if method != "slerp" else {})} for p in fts]
    cfg = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "bfloat16"}
    if method == "slerp":
        cfg["parameters"] = {"t": 0.5}
        cfg["models"] = [{"model": str(base)}] + cfg["models"]
    if method == "linear":
        cfg.pop("base_model")
    return cfg


# Each process prints: seconds spent importing, its peak RSS (bytes).
PEAK = 'int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024'

# The floor reads every byte of each input model once (models after the first into one reused buffer,
# the fastest read there is) and writes the first model with safetensors, which reads its bytes out
# of the memory-mapped file as it serializes them. Reading through safe_open alone would not do:
# get_tensor maps the file and touches nothing.
FLOOR = r"""
import time
t0 = time.perf_counter()
import os, sys
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
t_import = time.perf_counter() - t0
models = sys.argv[1].split(",")
buf = bytearray(64 << 20)
for m in models[1:]:
    for f in sorted(Path(m).glob("*.safetensors")):
        with open(f, "rb") as h:
            while h.readinto(buf):
                pass
out = {}
for f in sorted(Path(models[0]).glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        for n in h.keys():
            out[n] = h.get_tensor(n)
Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
dest = Path(sys.argv[2]) / "model.safetensors"
save_file(out, str(dest), metadata={"format": "pt"})
fd = os.open(dest, os.O_RDONLY)  # durable, as the merge's output is
os.fsync(fd)
os.close(fd)
print(t_import, PEAK)
""".replace("PEAK", PEAK)

# The merge as a user runs it, the `modelcypher merge` command; its heavy imports (torch and the
# package, which the command makes first) timed on their own.
OURS = r"""
import time
t0 = time.perf_counter()
import sys
from modelcypher import cli
cli._import_heavy()
t_import = time.perf_counter() - t0
code = cli.main(["merge", sys.argv[1], "-o", sys.argv[2], "--device", "cpu", "--max-shard-size", "2GB",
                 "--overwrite", "--no-progress"])
assert code == 0, code
print(t_import, PEAK)
""".replace("PEAK", PEAK)

MERGEKIT = r"""
import resource, subprocess, sys
r = subprocess.run([sys.argv[3], "-m", "mergekit.scripts.run_yaml", sys.argv[1], sys.argv[2], "--allow-crimes",
                    "--lazy-unpickle", "--out-shard-size", "2B", "--no-copy-tokenizer"], capture_output=True, text=True)
if r.returncode:
    print(r.stderr[-2000:], file=sys.stderr)
    sys.exit(1)
print(float("nan"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def timed(python: str, script: str, *args: str) -> tuple[float, int, float]:
    """(wall seconds of the whole process, its peak RSS in bytes, seconds it spent importing)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.perf_counter()
    r = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    t_import, rss = r.stdout.split()[-2:]
    return secs, int(rss), float(t_import)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a tiny shape, to check the script itself")
    ap.add_argument("--large", action="store_true", help="697M parameters per model (results: merge_speed_large)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import shutil

    import yaml

    size = "small" if args.small else "large" if args.large else "full"
    shape = {"small": SMALL, "large": LARGE, "full": SHAPE}[size]
    root = CACHE / size
    paths = build_models(shape, root)
    from modelcypher.checkpoint import Checkpoint

    n_params = Checkpoint(paths[0]).num_parameters
    mk_python = os.environ.get("MERGEKIT_PYTHON")
    out = root / "out"
    rows = []
    # A method's floor reads the models its merge reads (slerp two, linear the three fine-tunes, the
    # others all four). It is timed again next to every run (disk and cache drift); the fastest is kept.
    floors: dict[str, list] = {}

    def floor_run(inputs: list[Path]):
        key = ",".join(map(str, inputs))
        floors.setdefault(key, []).append(timed(sys.executable, FLOOR, key, str(out)))
        shutil.rmtree(out, ignore_errors=True)
        return key

    floor_run(paths)  # warms the page cache for everything after it
    for method in METHODS:
        cfg = config_for(method, paths)
        cfg_path = root / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        inputs = list(dict.fromkeys([Path(m["model"]) for m in cfg["models"]] + (
            [Path(cfg["base_model"])] if "base_model" in cfg else [])))
        runs = []
        for _ in range(args.repeats):
            key = floor_run(inputs)
            runs.append(timed(sys.executable, OURS, str(cfg_path), str(out)))
            shutil.rmtree(out, ignore_errors=True)
        ours = min(runs)
        row = {"method": method, "inputs": len(inputs), "seconds": ours[0], "peak_rss_bytes": ours[1],
               "import_seconds": ours[2], "floor_key": key}
        if mk_python:
            try:
                mk = timed(sys.executable, MERGEKIT, str(cfg_path), str(out), mk_python)
                row.update(mergekit_seconds=mk[0], mergekit_peak_rss_bytes=mk[1], speedup_vs_mergekit=mk[0] / ours[0])
            except RuntimeError as e:
                row["mergekit_error"] = str(e).strip().splitlines()[-1][:200]
            shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        floor = min(floors[row.pop("floor_key")])
        row.update(floor_seconds=floor[0], floor_import_seconds=floor[2], floor_peak_rss_bytes=floor[1],
                   ratio_to_floor=row["seconds"] / floor[0],
                   ratio_to_floor_without_imports=(row["seconds"] - row["import_seconds"]) / (floor[0] - floor[2]))
    # Peak memory against depth: the same width at 4 and 16 layers (a small vocabulary, so the embedding
    # is not the largest tensor); streaming means the peak should not move.
    depth_rows = []
    for layers in (4, 16):
        dshape = {**shape, "vocab_size": 1000, "num_hidden_layers": layers}
        dpaths = build_models(dshape, root / f"depth{layers}")
        cfg_path = root / f"depth{layers}.yaml"
        cfg_path.write_text(yaml.safe_dump(config_for("ties", dpaths)))
        secs, rss, _ = timed(sys.executable, OURS, str(cfg_path), str(out))
        shutil.rmtree(out, ignore_errors=True)
        depth_rows.append({"layers": layers, "seconds": secs, "peak_rss_bytes": rss})
        print(json.dumps(depth_rows[-1]), flush=True)
    result = {"depth": depth_rows, "shape": shape, "parameters": n_params, "models": len(paths), "dtype": "bfloat16",
              "floor_runs_seconds": {k: [f[0] for f in v] for k, v in floors.items()},
              "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    dest = HERE / "results"
    dest.mkdir(exist_ok=True)
    tag = "" if size == "full" else f"_{size}"
    (dest / f"merge_speed{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Merge speed, {n_params / 1e6:.0f}M-parameter Llama-shaped bf16 checkpoints, base + 3 fine-tunes, "
             f"{result['machine']}, {result['date']}.", "",
             "I/O floor: a fresh process that reads every byte of the models a method's merge reads "
             "(slerp two, linear the three fine-tunes, the others four) and writes one model with "
             "safetensors, fsynced; the fastest of its runs beside that method's.", "",
             "Every time is a whole fresh process (interpreter, imports, work), timed alike from outside; "
             "'x floor' divides it by the floor's. 'imports' is the merge process's own import time "
             "(torch and ModelCypher); 'x floor w/o imports' divides the times less each side's imports.",
             "",
             "| method | inputs | floor (s) | floor imports (s) | seconds | x floor | imports (s) | "
             "x floor w/o imports | peak RSS (GiB) | mergekit seconds | mergekit RSS (GiB) | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mk = (f"{r['mergekit_seconds']:.1f} | {r['mergekit_peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['speedup_vs_mergekit']:.2f}x") if "mergekit_seconds" in r else (
              f"{r.get('mergekit_error', 'not installed')} | - | -")
        lines.append(f"| {r['method']} | {r['inputs']} | {r['floor_seconds']:.2f} | {r['floor_import_seconds']:.2f} | "
                     f"{r['seconds']:.2f} | {r['ratio_to_floor']:.2f} | {r['import_seconds']:.2f} | "
                     f"{r['ratio_to_floor_without_imports']:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} | {mk} |")
    lines += ["", "Peak RSS against depth (ties, same width, vocabulary 1000): "
              + ", ".join(f"{r['layers']} layers {r['peak_rss_bytes'] / 2**30:.2f} GiB" for r in depth_rows)]
    (dest / f"merge_speed{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
