"""Which files belong to a model folder, and copying the ones that travel with a model.

One rule for every file read from or copied out of a model folder (config, index, shards, tokenizer and
generation files): its name stays inside the folder, and a symbolic link is followed only when its
target does too. A Hugging Face cache snapshot (``models--org--name/snapshots/<rev>/``) keeps its files
as links to ``../../blobs/<hash>``: there the repository's ``blobs/`` folder counts as inside, so
snapshots load as transformers loads them, while a link to anything else (a private key, another
model) is refused rather than read or published in an output.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from modelcypher.errors import UserError, os_error


def allowed_roots(root: Path) -> tuple[Path, ...]:
    """The folders a model folder's files may resolve into: itself, and for a cache snapshot the
    repository's ``blobs/``."""
    r = Path(root).resolve()
    if r.parent.name == "snapshots" and (r.parent.parent / "blobs").is_dir():
        return r, (r.parent.parent / "blobs").resolve()
    return (r,)


def member(root: Path, rel: str, what: str) -> Path:
    """The file ``rel`` of model folder ``root``, resolved; a UserError naming ``what`` (the file that
    named it) when the name or a link escapes the folder, or when it is not a file."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{what}: {rel!r} is not a file name")
    lexical = Path(os.path.normpath(Path(root).absolute() / rel))
    if Path(rel).is_absolute() or not lexical.is_relative_to(Path(os.path.normpath(Path(root).absolute()))):
        raise UserError(f"{what}: path {rel!r} points outside the model directory {root}")
    p = lexical.resolve()
    if not any(p.is_relative_to(r) for r in allowed_roots(root)):
        raise UserError(f"{what}: {rel!r} links to {p}, outside the model directory {root}")
    if not p.is_file():
        raise UserError(f"{what}: names {rel!r}, which does not exist in {root}")
    return p


def fingerprint(model_dir: Path) -> list:
    """What a model folder's weights and configs are, cheaply, for cache keys: each file's name, size and
    modification time (a file rewritten, even with the same bytes, counts as changed)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def present(root: Path, name: str) -> bool:
    """Whether model folder ``root`` has an entry ``name`` (a file, or a link, even a broken one)."""
    p = Path(root) / name
    return p.is_file() or p.is_symlink()


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...] | list[str]) -> list[str]:
    """Copy the files ``names`` that model folder ``src`` has (tokenizer, generation defaults) into
    ``dst`` as plain files, under :func:`member`'s rule; returns the names copied."""
    copied = []
    for n in names:
        if not present(src, n):
            continue
        p = member(src, n, f"{Path(src) / n}")
        try:
            shutil.copyfile(p, Path(dst) / n)
        except OSError as e:
            raise os_error(e) from None
        copied.append(n)
    return copied
