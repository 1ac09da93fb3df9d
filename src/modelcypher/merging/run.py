"""The streaming runner: one output tensor at a time, read -> merge -> write.

Peak memory is, per tensor in flight (one per worker, :func:`cpu_workers`), its inputs (in float32, or
as stored for a method registered ``raw``) plus its result, whatever the depth of the model; a
multi-pass method also keeps the tensor's raw inputs between its passes, up to ``HOLD_BYTES``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import queue
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from modelcypher.checkpoint.files import copy_side_files
from modelcypher.checkpoint.reader import GENERATION_FILES
from modelcypher.checkpoint.writer import ShardedWriter
from modelcypher.errors import UserError
from modelcypher.merging.plan import Plan, TensorTask
from modelcypher.merging.vocab import gather, pad_means, write_tokenizer

# Row-local and streamed methods run over blocks of rows of about this many float32 elements (2 MiB)
# per input, so the largest tensors (embeddings, heads) do not set the peak memory, and a block's
# temporaries stay in the CPU caches (benchmarks/merge_speed.py measures the block size).
BLOCK_ELEMENTS = 1 << 19


# The raw inputs of one tensor a multi-pass method may keep in memory between its passes (per tensor
# in flight): four models' 32000 x 2048 embeddings in bf16.
HOLD_BYTES = 1 << 29


def _raw_bytes(plan: Plan, task: TensorTask) -> int:
    """Bytes of a task's raw inputs, whole."""
    return sum(math.prod(plan.models[mi].shape(n)) * plan.models[mi].dtype(n).itemsize for mi, n in _inputs(plan, task))


def _inputs(plan: Plan, task: TensorTask) -> list[tuple[int, str]]:
    """The (model, tensor) pairs a task reads: its sources, then its base."""
    return list(task.sources) + ([task.base] if task.base else [])


def _prepared(plan: Plan, task: TensorTask, raw: dict, device: torch.device, check: bool):
    """A block's raw input tensors as ``(xs, base)`` on ``device``, checked for NaN/Inf: in float32, or
    as stored for a method registered ``raw`` (it widens them itself, without a float32 copy)."""
    out = []
    dtype = None if plan.method.raw else torch.float32
    for mi, name in _inputs(plan, task):
        x = raw[mi, name].to(device=device, dtype=dtype)
        # One sum tells when every entry is finite (NaN and Inf propagate); the exact test runs only
        # when the sum is not finite, which a huge but finite tensor can also cause.
        if check and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise UserError(f"tensor {name!r} of model {plan.names[mi]} contains NaN or Inf; "
                            "pass --allow-nonfinite to merge it anyway")
        out.append(x)
    return (out[:-1], out[-1]) if task.base else (out, None)


def row_blocks(task: TensorTask, rowwise: bool) -> list[slice]:
    """The row ranges one tensor is computed in: all rows at once unless the method is row-local
    (or streams). Ranges stop at ``task.shape[0]``, which a truncated vocabulary has already cut."""
    n = task.shape[0] if task.shape else 1
    per_row = 1
    for s in task.shape[1:]:
        per_row *= s
    step = max(1, BLOCK_ELEMENTS // max(per_row, 1)) if rowwise and len(task.shape) >= 2 else n
    return [slice(a, min(n, a + step)) for a in range(0, n, step)] if task.shape else [slice(None)]


def _blocked(plan: Plan) -> bool:
    return plan.method.rowwise or plan.method.stream is not None


def read_block(plan: Plan, task: TensorTask, rows: slice, means: list[torch.Tensor] | None = None) -> dict:
    """The raw input tensors of one block of rows of a task (run ahead, in a reader thread); a vocabulary
    tensor's rows gathered into the output's vocabulary (``means``: its padding rows)."""
    if task.rows is None:
        return {(mi, n): plan.models[mi].get(n, rows) for mi, n in _inputs(plan, task)}
    got = gather(task.rows, _slot_reader(plan, task), rows, means)
    return dict(zip(_inputs(plan, task), got, strict=True))


def _slot_reader(plan: Plan, task: TensorTask):
    slots = task.rows.slots
    return lambda s, rows: plan.models[slots[s][0]].get(slots[s][1], rows)


def compute_blocks(plan: Plan, task: TensorTask, device: torch.device, seed: int, allow_nonfinite: bool,
                   stats=None, report: dict | None = None, reader: ThreadPoolExecutor | None = None):
    """Yield (rows, result) for each block of rows of one output tensor, ready to write; ``reader``
    reads each next block ahead."""
    if task.copy:
        mi, n = task.sources[0] if task.sources else task.base
        yield slice(None), plan.models[mi].get(n)
        return
    kwargs = dict(task.params)
    if plan.method.random:
        # Seeded per tensor name: the result does not depend on the order tensors are visited in.
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1_000_003 + zlib.crc32(task.name.encode())) % 2**63)
        kwargs["rng"] = g
    for stat in plan.method.stats:  # statistics belong to whole tensors: these methods are not row-local
        kwargs[stat] = [stats.get(stat, mi, n, device) if stats else None for mi, n in task.sources]
        base_stat = stats.get(stat, *task.base, device) if stats and task.base else None
        if base_stat is not None:
            kwargs[f"base_{stat}"] = base_stat
    if plan.method.reports and report is not None:
        kwargs["report"] = report
    blocks = row_blocks(task, _blocked(plan))
    means = None
    if task.rows is not None and task.rows.size > task.rows.tokens:  # rows padded on: each input's mean row
        means = pad_means(task.rows, _slot_reader(plan, task), max(b.stop - b.start for b in blocks))
    checked = allow_nonfinite
    # A method that makes several passes keeps the raw blocks of the first in memory for the others,
    # when they fit in HOLD_BYTES, rather than reading the files again.
    held: list[dict] | None = [] if plan.method.stream is not None and _raw_bytes(plan, task) <= HOLD_BYTES else None

    def passes():
        """One pass over the blocks as ``(xs, base)`` (see :func:`_prepared`); inputs are checked in the
        first pass only."""
        nonlocal checked
        check, checked = not checked, True
        if held is not None and len(held) == len(blocks):
            for raw in held:
                yield _prepared(plan, task, raw, device, check)
            return
        if held:
            held.clear()  # an earlier pass stopped part way
        nxt = None
        for i, rows in enumerate(blocks):
            raw = nxt.result() if nxt is not None else read_block(plan, task, rows, means)
            nxt = reader.submit(read_block, plan, task, blocks[i + 1], means) if reader and i + 1 < len(blocks) \
                else None
            if held is not None:
                held.append(raw)
            yield _prepared(plan, task, raw, device, check)
            del raw

    if plan.method.stream is not None:
        n = 1
        for s in task.shape:
            n *= s
        results = plan.method.stream(passes, n, **kwargs)
    else:
        results = (plan.method.fn(xs, base, **kwargs) for xs, base in passes())
    for rows, y in zip(blocks, results, strict=True):
        want = (rows.stop - rows.start,) + task.shape[1:] if len(task.shape) >= 2 else task.shape
        if tuple(y.shape) != want:
            raise RuntimeError(f"{plan.method.name} returned shape {tuple(y.shape)} for rows {rows} of "
                               f"{task.name}, want {task.shape}")
        yield rows, y.to(dtype=task.dtype, device="cpu")


def keep_heap_warm() -> None:
    """Have glibc's malloc serve block-sized temporaries from a heap it keeps mapped.

    A merge allocates and frees megabyte temporaries thousands of times a second. With glibc's
    defaults each one may be a fresh mmap, or the heap's top goes back to the kernel and is faulted in
    (and zeroed) again, which costs more than the arithmetic. Blocks up to the largest
    mmap threshold (32 MiB) now come from the heap, which keeps 256 MiB of slack at its top.
    Process-wide and harmless elsewhere; a no-op where the C library has no ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt, or (Windows) no process-wide handle
        return
    m_top_pad, m_mmap_threshold = -2, -3  # from glibc's malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_top_pad, 256 << 20)


# On CPU, up to this many threads compute tensors side by side, the cores shared out among them as
# torch's intra-op threads (one each on 2 cores): the operations here are cheap and memory-bound, and
# a 2 MiB block split across cores costs more core time than it saves.
MAX_CPU_WORKERS = 4
# Finished blocks of one tensor waiting for the writer (it writes tensors in file order); a tensor
# computed ahead of its turn waits once it has this many.
QUEUED_BLOCKS = 64
_DONE = object()


def cpu_workers() -> tuple[int, int]:
    """(tensors computed at once, torch intra-op threads for each) on this machine's usable cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(MAX_CPU_WORKERS, cores))
    return workers, max(1, cores // workers)


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the duration, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration, then as it was. A merge makes objects
    by the hundred thousand (blocks, tuples, futures) and frees them all by reference counting; each
    full collection they triggered walked every object torch and the rest had made at import, about
    a million."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@collector_paused()
def execute(plan: Plan, out_dir: Path, *, device: torch.device, seed: int = 0, allow_nonfinite: bool = False,
            max_shard_size: int = 5 * 10**9, progress: bool = False, stats=None, copy_tokenizer: bool = True,
            write_model_card: bool = True) -> dict[str, dict]:
    """Write the merged model into ``out_dir`` (an empty directory); returns the methods' per-tensor reports.
    The tokenizer's files and a model card (README.md) go with it unless switched off.

    Worker threads read and compute tensors (file reads and torch's operations release the GIL), a
    reader thread reads each tensor's next block ahead, and this thread writes the finished blocks in
    file order.
    """
    keep_heap_warm()
    for ck in plan.models:  # the reader need not check too: compute_blocks checks every block it reads
        ck.allow_nonfinite = True
    writer = ShardedWriter(out_dir, [(t.name, t.shape, t.dtype) for t in plan.tasks], max_shard_size,
                           allow_nonfinite=allow_nonfinite)
    by_name = {t.name: t for t in plan.tasks}
    order = writer.order
    if progress:
        order = tqdm(order, desc=f"merge ({plan.method.name})", unit="tensor", leave=False)
    reports: dict[str, dict] = {name: {} for name in writer.order}
    queues = {name: queue.Queue(maxsize=QUEUED_BLOCKS) for name in writer.order}
    stop = threading.Event()

    def put(q: queue.Queue, item) -> bool:
        """Hand ``item`` to the writer; False once the merge is being abandoned."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work(name: str) -> None:
        q = queues[name]
        try:
            for _, part in compute_blocks(plan, by_name[name], device, seed, allow_nonfinite, stats,
                                          reports[name], reader):
                if not put(q, part):
                    return
            put(q, _DONE)
        except BaseException as e:  # the writer re-raises it, KeyboardInterrupt included
            put(q, e)

    workers, threads = cpu_workers() if device.type == "cpu" else (1, torch.get_num_threads())
    with intra_op_threads(threads), ThreadPoolExecutor(max_workers=1) as reader, \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for name in writer.order:
            pool.submit(work, name)
        try:
            for name in order:
                while (item := queues[name].get()) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    writer.write(name, item)
        except BaseException:
            stop.set()  # workers stop at their next block; the ones not started do nothing
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    writer.finish()
    reports = {k: v for k, v in reports.items() if v}
    if reports:
        models = [plan.names[mi] for mi, _ in plan.tasks[0].sources] if plan.tasks else []
        (out_dir / "merge_report.json").write_text(json.dumps({"models": models, "tensors": reports}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    write_tokenizer(out_dir, plan.vocab, plan.models[plan.tokenizer_from].path, plan.chat_template, copy_tokenizer)
    _copy_files(plan.models[plan.reference].path, out_dir, GENERATION_FILES)
    if write_model_card:
        (out_dir / "README.md").write_text(model_card(plan))
    return reports


def _copy_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    copy_side_files(src, dst, names)


def model_card(plan: Plan) -> str:
    cfg = plan.config.model_dump(exclude_none=True, exclude_defaults=True)
    cfg["merge_method"] = plan.config.merge_method
    front = {"library_name": "transformers", "tags": ["merge", "modelcypher", plan.method.name],
             "base_model": plan.names}
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {plan.config.name or 'Merged model'}", "",
        f"Made with ModelCypher's `{plan.method.name}` merge.", "",
        f"Method: {plan.method.paper}", "",
        "## Models", "",
        *[f"- `{n}`" + (" (base)" if plan.config.base_model == n else "") for n in plan.names], "",
    ]
    if plan.notes:
        lines += ["## Notes", "", *[f"- {n}" for n in plan.notes], ""]
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
