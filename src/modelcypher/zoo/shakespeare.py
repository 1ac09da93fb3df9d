"""The bundled Shakespeare corpus: 37 plays, ~4.8M characters, three genres.

The data ship inside the package as ``zoo/data/shakespeare.json.xz`` (built by
:mod:`modelcypher.zoo.build_shakespeare`, which also holds the genre table).
Everything here is loaded lazily on first use and cached.

>>> from modelcypher.zoo import shakespeare
>>> train, val, test = shakespeare.split(shakespeare.text("comedy"))
>>> train, val, test = shakespeare.split_by_play("tragedy")  # every play contributes to each part
"""

from __future__ import annotations

import functools
import json
import lzma
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

GENRES = ("comedy", "history", "tragedy")
DATA_FILE = "shakespeare.json.xz"


@dataclass(frozen=True)
class Play:
    id: str
    title: str
    genre: str
    text: str


@functools.lru_cache(maxsize=1)
def plays_all() -> tuple[Play, ...]:
    """All plays, in the corpus' fixed order (comedies, histories, tragedies)."""
    raw = resources.files("modelcypher.zoo").joinpath("data", DATA_FILE).read_bytes()
    records = json.loads(lzma.decompress(raw).decode("ascii"))
    return tuple(Play(id=r["id"], title=r["title"], genre=r["genre"], text=r["text"]) for r in records)


def _check_genre(genre: str | None) -> None:
    if genre is not None and genre not in GENRES:
        raise ValueError(f"unknown genre {genre!r}; expected one of {GENRES} or None")


def plays(genre: str | None = None) -> list[Play]:
    """The plays of one genre (``"comedy"``, ``"history"``, ``"tragedy"``), or all for ``None``."""
    _check_genre(genre)
    return [p for p in plays_all() if genre is None or p.genre == genre]


@functools.lru_cache(maxsize=8)
def text(genre: str | None = None) -> str:
    """The plays of ``genre`` (all for ``None``) joined in corpus order, a blank line between plays."""
    return "\n".join(p.text for p in plays(genre))


@functools.lru_cache(maxsize=1)
def vocab() -> str:
    """The sorted distinct characters of the whole corpus (80 characters)."""
    return "".join(sorted(set(text())))


def split(text: str, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> tuple[str, ...]:
    """Cut ``text`` into contiguous consecutive pieces of the given relative sizes.

    The pieces concatenate back to ``text`` exactly.  ``fractions`` are
    normalized by their sum; cut points are rounded to the nearest character.
    """
    if len(fractions) == 0 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions!r}")
    total = float(sum(fractions))
    n = len(text)
    cuts = [0]
    acc = 0.0
    for f in fractions[:-1]:
        acc += f
        cuts.append(min(n, max(cuts[-1], round(n * acc / total))))
    cuts.append(n)
    return tuple(text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True))


def split_by_play(genre: str | None = None, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> tuple[str, ...]:
    """Split every play of ``genre`` contiguously, then join the matching pieces across plays.

    Unlike ``split(text(genre))``, whose held-out tail is whichever plays come
    last, this gives held-out text from every play of the genre.  Pieces of
    different plays are joined with a newline, as in :func:`text`.
    """
    parts = [split(p.text, fractions) for p in plays(genre)]
    return tuple("\n".join(piece) for piece in zip(*parts, strict=True))
