"""Adapters on ~200M-parameter Llama-shaped checkpoints: `extract-lora` and a `base+lora` merge, timed
against mergekit's tools in the same run.

The models are merge_speed.py's (its base and first fine-tune, bf16; the fine-tune's update is dense
noise, so a rank-32 adapter keeps a small share of its energy: the work is the same as for a real one).
1. extract: `modelcypher extract-lora FT --base BASE --rank R` against
   `mergekit-extract-lora --model FT --base-model BASE --max-rank R`.
2. merge: a linear merge (weight 1) of `BASE+ADAPTER` (the adapter extracted in 1), written in bf16,
   by `modelcypher merge` and by `mergekit-yaml`; the largest difference between the two outputs is
   reported alongside.
Each tool runs as a fresh process under a small timing parent: wall time of the whole process
(interpreter start and imports included) and its peak RSS (the child's ru_maxrss). Each pair runs
`--repeats` times, alternating; the fastest run of each is kept. Results: benchmarks/results/extract_lora.md.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/extract_lora.py [--small]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from merge_speed import CACHE, SHAPE, SMALL, build_models  # noqa: E402  (the models merge_speed builds)

HERE = Path(__file__).parent
# The timing parent: runs the command, prints its wall seconds and the child's peak RSS in bytes.
TIMER = r"""
import resource, subprocess, sys, time
t0 = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
secs = time.perf_counter() - t0
if r.returncode:
    print(r.stdout[-1500:], r.stderr[-1500:], file=sys.stderr)
    sys.exit(1)
print(secs, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


def timed(cmd: list[str]) -> tuple[float, int]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run([sys.executable, "-c", TIMER, *map(str, cmd)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    secs, rss = r.stdout.split()[-2:]
    return float(secs), int(rss)


def best(runs: list[tuple[float, int]]) -> dict:
    return {"seconds": min(s for s, _ in runs), "peak_rss_bytes": min(m for _, m in runs)}


def max_difference(a: Path, b: Path) -> float:

    from modelcypher.checkpoint import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    return max(float((ca.get(n).float() - cb.get(n).float()).abs().max()) for n in ca.names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="a tiny shape, to check the script itself")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import yaml

    size = "small" if args.small else "full"
    load_before = os.getloadavg()[0]
    root = CACHE / size
    base, ft = build_models(SMALL if args.small else SHAPE, root)[:2]
    from modelcypher.checkpoint import Checkpoint

    n_params = Checkpoint(base).num_parameters
    work = root / "adapters"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    py = sys.executable
    mk_bin = Path(shutil.which("mergekit-extract-lora") or "mergekit-extract-lora")
    ours_extract = [py, "-m", "modelcypher", "extract-lora", ft, "--base", base, "-o", work / "ours_ad",
                    "--rank", args.rank, "--overwrite"]
    mk_extract = [mk_bin, "--model", ft, "--base-model", base, "--out-path", work / "mk_ad",
                  "--max-rank", args.rank]
    rows: dict[str, dict] = {}
    runs: dict[str, list] = {"ours": [], "mk": []}
    for _ in range(args.repeats):
        runs["ours"].append(timed(ours_extract))
        shutil.rmtree(work / "mk_ad", ignore_errors=True)
        runs["mk"].append(timed(mk_extract))
    rows["extract-lora"] = {"ours": best(runs["ours"]), "mergekit": best(runs["mk"])}
    print(json.dumps(rows["extract-lora"]), flush=True)

    ref = f"{base}+{work / 'ours_ad'}"
    cfg = {"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}], "dtype": "bfloat16"}
    cfg_path = work / "base_plus_lora.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    ours_merge = [py, "-m", "modelcypher", "merge", cfg_path, "-o", work / "ours_merged", "--device", "cpu",
                  "--overwrite", "--no-progress"]
    mk_merge = [Path(shutil.which("mergekit-yaml") or "mergekit-yaml"), cfg_path, work / "mk_merged",
                "--lazy-unpickle", "--no-copy-tokenizer", "--lora-merge-cache", work / "mk_cache"]
    runs = {"ours": [], "mk": []}
    for _ in range(args.repeats):
        runs["ours"].append(timed(ours_merge))
        shutil.rmtree(work / "mk_merged", ignore_errors=True)
        shutil.rmtree(work / "mk_cache", ignore_errors=True)
        runs["mk"].append(timed(mk_merge))
    rows["base+lora merge"] = {"ours": best(runs["ours"]), "mergekit": best(runs["mk"]),
                               "max_abs_difference": max_difference(work / "ours_merged", work / "mk_merged")}
    print(json.dumps(rows["base+lora merge"]), flush=True)
    kept = json.loads((work / "ours_ad" / "extract_report.json").read_text())["modules"]
    mean_kept = sum(m["kept"] for m in kept.values()) / len(kept)
    write_results(rows, n_params, args.rank, mean_kept, size, (load_before, os.getloadavg()[0]))


def write_results(rows: dict, n_params: int, rank: int, mean_kept: float, size: str,
                  load: tuple[float, float]) -> None:
    out = HERE / "results" / ("extract_lora.md" if size == "full" else f"extract_lora_{size}.md")
    (out.with_suffix(".json")).write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Adapters: extract-lora and a base+lora merge against mergekit",
        "",
        f"Models: merge_speed.py's base and first fine-tune ({n_params / 1e6:.0f}M parameters, bf16). "
        f"Rank {rank}; the fine-tune's update is dense noise, so the adapter keeps {mean_kept:.3f} of each "
        "update's energy on average (the SVD work is that of any rank-32 extraction).",
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} usable cores shared with other jobs "
        f"at the time (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: compare the "
        "two columns of one run, not runs), "
        f"{time.strftime('%Y-%m-%d')}; torch {__import__('torch').__version__}, mergekit 0.1.5.",
        "Wall time of the whole process (start and imports included) and its peak RSS.",
        "",
        "| task | ModelCypher s | mergekit s | ModelCypher peak RSS | mergekit peak RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for task, r in rows.items():
        o, m = r["ours"], r["mergekit"]
        lines.append(f"| {task} | {o['seconds']:.1f} | {m['seconds']:.1f} | {o['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"| {m['peak_rss_bytes'] / 2**30:.2f} GiB |")
    diff = rows["base+lora merge"]["max_abs_difference"]
    lines += ["", f"Largest difference between the two merged models' tensors: {diff:.3g} (bf16 outputs).", ""]
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
