"""Output guards shared by every verb that writes.

A model folder (``merge -o``, ``align -o``) is written by :func:`atomic_dir`; a single file
(``barrier --json/--plot``, ``diagnose --json``, each of ``diagnose --plot``'s heatmaps) by
:func:`atomic_file`. Both refuse, before any work, an output that would destroy an input: the output is an
input, lies inside one, or contains one (``--overwrite`` would delete it). Both write under a temporary
name beside the target and rename at the end, so an output appears whole or not at all.

Temporary names carry :data:`TMP_TAG` and the writer's process id. A run stopped by an error, Ctrl-C or
SIGTERM removes its own; a run killed outright (SIGKILL, power loss) cannot, and the next run writing
into the same folder removes every temporary entry whose process is gone. A model folder is also
guarded by a lock file (``.<name>.modelcypher-lock``, held with ``flock`` for the whole run, so a killed
run holds nothing): of two runs to one output exactly one proceeds, and the final rename never replaces
an output that appeared meanwhile unless ``--overwrite`` was given.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import math
import os
import re
import shutil
import signal
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from modelcypher.errors import UserError, os_error

TMP_TAG = ".modelcypher-tmp-"
LOCK_TAG = ".modelcypher-lock"
_STALE = re.compile(r"^\..*" + re.escape(TMP_TAG) + r"(\d+)-[0-9a-f]+$")
# Files a Hugging Face model folder holds: single-file outputs are never written inside one.
_MODEL_MARKERS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json", "adapter_config.json")

PathLike = str | os.PathLike


def _abs(p: PathLike) -> Path:
    return Path(os.path.abspath(p))


def _check_ancestors(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a folder (a file there makes mkdir fail)."""
    for a in _abs(out).parents:
        if a.exists():
            if not a.is_dir():
                raise UserError(f"{out}: {a} is a file, not a folder")
            return


def _check_inputs(out: Path, inputs: Iterable[PathLike]) -> None:
    r = _abs(out).resolve()
    cwd = Path.cwd().resolve()
    if r == cwd or cwd.is_relative_to(r):
        raise UserError(f"{out}: the output may not be the current folder or one containing it")
    for p in inputs:
        if p is None:
            continue
        q = _abs(p).resolve()
        kind = "input model" if q.is_dir() else "input"
        if r == q:
            raise UserError(f"{out}: the output is the {kind} {p}")
        if r.is_relative_to(q):
            raise UserError(f"{out}: the output may not be inside the {kind} {p}")
        if q.is_relative_to(r):
            raise UserError(f"{out}: the output contains the {kind} {p}; choose another output")


def check_output_dir(out: PathLike, inputs: Iterable[PathLike] = (), *, overwrite: bool = False) -> Path:
    """Refuse an output folder that is, contains or lies inside an input, that is (or contains) the
    current folder, whose parent is a file, or that exists (unless ``overwrite``; then it must be a
    folder). Call it before any work; :func:`atomic_dir` calls it again."""
    out = Path(out)
    _check_inputs(out, inputs)
    _check_ancestors(out)
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; give the folder itself")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out}: already exists; choose another output or pass --overwrite")
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder")
    return out


def check_output_file(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Refuse a single-file output that is a folder, whose folder is missing or a file, that is or lies
    inside an input, or that lies inside a Hugging Face model folder (a model's files are its own)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder; give a file name")
    parent = _abs(p).parent
    if not parent.exists():
        _check_ancestors(p)
        raise UserError(f"{p}: its folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{p}: {parent} is a file, not a folder")
    _check_inputs(p, inputs)
    check_not_in_model(p)
    return p


def check_output_folder(path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """A folder that receives single files (``diagnose --plot``): not a file, not an input, not inside an
    input or a model folder, and creatable (no file among its ancestors)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: exists and is not a folder")
    _check_ancestors(p)
    _check_inputs(p, inputs)
    check_not_in_model(p / "x")
    return p


def check_not_in_model(path: PathLike) -> None:
    r = _abs(path).resolve()
    for a in r.parents:
        if (a / "config.json").is_file() and any((a / m).exists() for m in _MODEL_MARKERS):
            raise UserError(f"{path}: inside the model folder {a}; write outputs elsewhere")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(folder: PathLike) -> list[Path]:
    """Remove the temporary entries in ``folder`` left by runs that were killed (their process is gone)."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for e in entries:
        m = _STALE.match(e.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e, ignore_errors=True)
        else:
            e.unlink(missing_ok=True)
        removed.append(e)
    return removed


def tmp_name(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Hold ``.<name>.modelcypher-lock`` beside ``target`` for the duration; a second run fails at once."""
    path = target.parent / f".{target.name}{LOCK_TAG}"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"{target}: another run is writing this output (lock {path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file as we opened it: take the new one
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), atomically where the system
    offers renameat2; elsewhere check then rename (the output lock keeps other runs out of that gap)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _install(tmp: Path, target: Path, overwrite: bool) -> None:
    if not overwrite:
        try:
            rename_noreplace(tmp, target)
        except FileExistsError:
            raise UserError(f"{target}: appeared while this run was writing; left as it is (pass --overwrite "
                            "to replace it)") from None
        return
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_dir():
            raise UserError(f"{target}: exists and is not a folder")
        trash = tmp_name(target)
        os.rename(target, trash)
        os.rename(tmp, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)


@contextmanager
def atomic_dir(target: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; rename it to ``target`` on success.

    The output is checked (:func:`check_output_dir`) and locked (:func:`output_lock`) first; stale
    temporary folders of killed runs beside it are removed; SIGTERM is handled like Ctrl-C so the
    temporary folder goes on any ending short of SIGKILL.
    """
    target = Path(target)
    inputs = list(inputs)
    check_output_dir(target, inputs, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, target.parent) from None
    clean_stale(target.parent)
    old = signal.getsignal(signal.SIGTERM)
    swapped = _swap_sigterm()
    try:
        with output_lock(target):
            tmp = tmp_name(target)
            try:
                tmp.mkdir()
                yield tmp
                if overwrite:  # an input moved into the output meanwhile must not go with it
                    _check_inputs(target, inputs)
                _install(tmp, target, overwrite)
            except OSError as e:
                raise os_error(e, target) from None
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if swapped:
            signal.signal(signal.SIGTERM, old)


def _swap_sigterm() -> bool:
    def _raise(signum, frame):
        raise KeyboardInterrupt("terminated")

    try:
        signal.signal(signal.SIGTERM, _raise)
        return True
    except ValueError:  # not the main thread: leave signals alone
        return False


@contextmanager
def atomic_file(path: PathLike, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (checked by :func:`check_output_file`); on success it is
    renamed to exactly ``path``, replacing a file there, never a folder."""
    p = check_output_file(path, inputs)
    clean_stale(_abs(p).parent)
    tmp = tmp_name(_abs(p))
    try:
        yield tmp
        os.replace(tmp, p)
    except OSError as e:
        raise os_error(e, p) from None
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float (NaN, Inf) replaced by None: strict JSON, which ``NaN`` is not."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def json_text(obj: Any) -> str:
    """Strict JSON text of ``obj`` (indented, NaN and Inf as null), ending in a newline."""
    return json.dumps(finite_json(obj), indent=2, allow_nan=False) + "\n"


def write_file(path: PathLike, data: str | bytes, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``data`` to exactly ``path``, atomically, under :func:`check_output_file`."""
    with atomic_file(path, inputs) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: PathLike, obj: Any, inputs: Iterable[PathLike] = ()) -> Path:
    return write_file(path, json_text(obj), inputs)
