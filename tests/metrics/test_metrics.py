"""The shipped `evaluate` metric modules load offline and compute what they claim."""

import pytest

from mmpeft.metrics import compute_metrics, load_metric


def test_exact_match_normalises_case_space_and_punctuation():
    scores = compute_metrics(
        ["accuracy"], ["Red.", " two  dogs ", "circle", "blue"], ["red", "two dogs", "square", "blue"]
    )
    assert scores == {"accuracy": 0.75}


def test_wer_and_bleu():
    scores = compute_metrics(["wer", "bleu"], ["the cat sat on the mat"], ["the cat sat on a mat"])
    assert scores["wer"] == pytest.approx(1 / 6)
    assert compute_metrics(["bleu"], ["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)
    assert 0 < scores["bleu"] < 100


def test_unknown_metric_is_named():
    with pytest.raises(
        ValueError, match=r"unknown generation metric 'rouge'; choose from \['accuracy', 'bleu', 'wer'\]"
    ):
        load_metric("rouge")
