"""laser.quality: distinct n-gram shares, the loop flag, the longest repeated span, summaries."""

import pytest

import laser
from laser.quality import LOOP_BELOW, quality, text_quality


def test_a_text_that_cycles_loops_and_a_varied_one_does_not():
    cycle = " ".join(["the movie is a 1996 film"] * 6)  # 36 words, period 6
    q = text_quality(cycle)
    assert q.words == 36 and q.loop and q.longest_repeat == 30  # w - p
    assert q.distinct[1] == pytest.approx(6 / 36) and q.distinct[4] == pytest.approx(6 / 33)
    varied = text_quality("a quiet drama about a family that moves to the coast after a loss")
    assert not varied.loop and varied.distinct[4] == 1.0 and varied.distinct[1] == pytest.approx(12 / 14)
    assert varied.longest_repeat == 1  # "a" occurs three times, no two words repeat together


def test_short_and_empty_texts_hold_no_ngrams():
    for text in ("", "one", "one two three"):
        q = text_quality(text)
        assert q.distinct[4] == 1.0 and not q.loop
    assert text_quality("").longest_repeat == 0 and text_quality("x x").longest_repeat == 1


def test_an_outputs_summary_is_the_mean_of_its_texts():
    texts = ["a b c d a b c d a b c d", "w x y z v u t s r q", "k l m n"]
    q = laser.quality(texts)
    per = [text_quality(t) for t in texts]
    assert q.n == 3 and q.loop_share == pytest.approx(1 / 3)
    assert q.distinct[4] == pytest.approx(sum(p.distinct[4] for p in per) / 3)
    assert q.mean_words == pytest.approx((12 + 10 + 4) / 3)
    assert set(q.summary()) == {"texts", "loop_share", "distinct_1", "distinct_2", "distinct_3", "distinct_4",
                                "mean_words", "mean_longest_repeat"}
    assert "33.3% loops" in q.line()
    assert quality([]).n == 0 and per[0].distinct[4] < LOOP_BELOW
