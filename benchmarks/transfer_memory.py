"""Peak memory of `transfer` against depth: every block read at once, and in groups under --memory-gb.

Two randomly initialized models of different families and widths (A: Llama, width 256, MLP 1024; B: Qwen2,
width 320, MLP 1280; 4 heads, 2 key-value heads; a character tokenizer), at depths 4, 8 and 16, and a
random rank-8 LoRA on every projection of A. Each transfer (``--update fit``, the default) runs in a fresh
process; its peak RSS is the process's own high-water mark (VmHWM), next to the same process's RSS right
after its imports (the floor). With every block at once, the pooled activations grow with depth; in
groups (one group per block here), they should not. Both ways must write the same adapter: the largest
difference of their LoRA factors is reported. Results: benchmarks/results/transfer_memory.{json,md}.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/transfer_memory.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
CACHE = HERE / ".cache" / "transfer_memory"
RESULTS = HERE / "results"
DEPTHS = (4, 8, 16)
SHAPES = {"a": dict(family="llama", hidden=256, inter=1024), "b": dict(family="qwen2", hidden=320, inter=1280)}
PROBE_CHARS = 4000  # one anchor per character: 4000 anchors, more than the widest space (1280)
GROUPED_GB = 0.2  # below one block pair's activations here: one group per block of B
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from modelcypher.transfer.move import transfer_adapter

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

floor = rss("VmRSS:")
adapter, a, b, out, text, gb = sys.argv[1:7]
t1 = time.perf_counter()
rep = transfer_adapter(adapter, a, b, out, text=open(text).read(), rank=8, memory_gb=float(gb), device="cpu",
                       overwrite=True)
print(json.dumps({"peak": rss("VmHWM:"), "floor": floor, "seconds": time.perf_counter() - t1,
                  "groups": len(rep["block_groups"]), "pooled_gb": max(g["pooled_gb"] for g in rep["block_groups"])}))
"""


def model(path: Path, depth: int, family: str, hidden: int, inter: int, seed: int) -> Path:
    import torch
    import transformers as tf

    from modelcypher.zoo import chartok, shakespeare

    if (path / "config.json").is_file():
        return path
    tok = chartok.build_char_tokenizer(shakespeare.vocab())
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
    cfg = cls[0](vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=depth,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                 tie_word_embeddings=False)
    torch.manual_seed(seed)
    cls[1](cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lora(base: Path, out: Path) -> Path:
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    if (out / "adapter_config.json").is_file():
        return out
    m = get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, lora_alpha=16,
                                                                                 target_modules=TARGETS))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    m.save_pretrained(out)
    return out


def factors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def main() -> None:
    from modelcypher.zoo import shakespeare

    CACHE.mkdir(parents=True, exist_ok=True)
    text = CACHE / "probes.txt"
    text.write_text(shakespeare.text("comedy")[50_000:50_000 + PROBE_CHARS])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    rows = []
    for depth in DEPTHS:
        a = model(CACHE / f"a{depth}", depth, seed=0, **SHAPES["a"])
        b = model(CACHE / f"b{depth}", depth, seed=1, **SHAPES["b"])
        adapter = lora(a, CACHE / f"lora-a{depth}")
        row = {"depth": depth}
        for how, gb in (("at once", 8.0), ("in groups", GROUPED_GB)):
            out = CACHE / f"moved{depth}-{how.replace(' ', '-')}"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, str(adapter), str(a), str(b), str(out), str(text),
                                str(gb)], capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(r.stderr)
            row[how] = json.loads(r.stdout.strip().splitlines()[-1]) | {"wall": time.perf_counter() - t0}
            print(depth, how, row[how], flush=True)
        one, two = (factors(CACHE / f"moved{depth}-{h}") for h in ("at-once", "in-groups"))
        row["max_factor_difference"] = max(float((one[k] - two[k]).abs().max() / one[k].abs().max()) for k in one)
        rows.append(row)
    result = {"depths": DEPTHS, "shapes": SHAPES, "anchors": PROBE_CHARS, "grouped_gb": GROUPED_GB, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "transfer_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "transfer_memory.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    mb = 2**20
    lines = ["# Peak memory of `transfer` against depth", "",
             f"A: Llama (width 256, MLP 1024), B: Qwen2 (width 320, MLP 1280), random init, a random rank-8 LoRA on "
             f"every projection of A, {result['anchors']} anchors, `--update fit`. Peak RSS (VmHWM) of a fresh "
             "process per transfer; 'over floor': the peak less its RSS after the imports. 'In groups': "
             f"`--memory-gb {result['grouped_gb']}`, one group per block of B here.", "",
             "| depth | at once: peak MB | over floor | pooled MB | s | in groups: peak MB | over floor | "
             "largest group MB | groups | s | groups / at once (over floor) | factors differ by |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        x, y = r["at once"], r["in groups"]
        over_x, over_y = (x["peak"] - x["floor"]) / mb, (y["peak"] - y["floor"]) / mb
        lines.append(f"| {r['depth']} | {x['peak'] / mb:.0f} | {over_x:.0f} | {x['pooled_gb'] * 1024:.0f} | "
                     f"{x['seconds']:.1f} | {y['peak'] / mb:.0f} | {over_y:.0f} | {y['pooled_gb'] * 1024:.0f} | "
                     f"{y['groups']} | {y['seconds']:.1f} | {over_y / over_x:.2f} | "
                     f"{r['max_factor_difference']:.1e} |")
    lines += ["", "'pooled MB': the activations read at once (all blocks of both models, or the largest group), "
              "as the report's `block_groups` gives them; relative factor difference: the largest over tensors "
              "of max |difference| / max |factor|.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
