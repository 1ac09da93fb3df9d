import pytest

from modelcypher.zoo import shakespeare
from modelcypher.zoo.build_shakespeare import PLAYS


def test_corpus_loads_with_expected_size():
    plays = shakespeare.plays()
    assert len(plays) == 37
    assert len({p.id for p in plays}) == 37
    total = len(shakespeare.text())
    assert 4_500_000 < total < 5_200_000
    assert all(len(p.text) > 50_000 for p in plays)
    assert {p.id: (p.title, p.genre) for p in plays} == PLAYS


def test_genres_non_empty_disjoint_and_cover_corpus():
    ids = {g: {p.id for p in shakespeare.plays(g)} for g in shakespeare.GENRES}
    assert all(ids[g] for g in shakespeare.GENRES)
    assert len(ids["comedy"] | ids["history"] | ids["tragedy"]) == 37
    assert not ids["comedy"] & ids["tragedy"]
    assert not ids["comedy"] & ids["history"]
    assert not ids["history"] & ids["tragedy"]
    assert "hamlet" in ids["tragedy"] and "tempest" in ids["comedy"] and "henry_v" in ids["history"]
    for g in shakespeare.GENRES:
        assert len(shakespeare.text(g)) > 1_000_000
    assert sum(len(shakespeare.text(g)) for g in shakespeare.GENRES) + 2 == len(shakespeare.text())
    with pytest.raises(ValueError):
        shakespeare.text("romance")


def test_text_is_clean_with_small_ascii_vocab():
    full = shakespeare.text()
    vocab = shakespeare.vocab()
    assert 70 <= len(vocab) <= 100
    assert vocab.isascii() and "\n" in vocab and " " in vocab
    assert "\r" not in full and "\t" not in full
    assert " \n" not in full and "\n\n\n" not in full
    assert "Ham.\nTo be, or not to be,--that is the question" in full


def test_split_is_contiguous_and_covers_text():
    t = shakespeare.text("comedy")
    parts = shakespeare.split(t)
    assert len(parts) == 3
    assert "".join(parts) == t
    n = len(t)
    assert abs(len(parts[0]) - 0.9 * n) <= 1 and abs(len(parts[1]) - 0.05 * n) <= 1
    assert shakespeare.split("abcdefghij", (1, 1)) == ("abcde", "fghij")
    assert "".join(shakespeare.split("abc", (0.5, 0.25, 0.25))) == "abc"
    with pytest.raises(ValueError):
        shakespeare.split("abc", (0, 0))


def test_split_by_play_draws_from_every_play():
    train, val, test = shakespeare.split_by_play("tragedy")
    total = sum(len(p.text) for p in shakespeare.plays("tragedy"))
    n_plays = len(shakespeare.plays("tragedy"))
    assert len(train) + len(val) + len(test) == total + 3 * (n_plays - 1)
    assert 0.04 < len(val) / total < 0.06
    # every play's held-out piece is the tail of that play
    assert shakespeare.plays("tragedy")[-1].text.endswith(test.split("\n")[-2] + "\n")
