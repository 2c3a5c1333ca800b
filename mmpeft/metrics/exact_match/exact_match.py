"""Exact-match accuracy of generated answers, after light normalisation (case, surrounding space and
punctuation). Shipped with mmpeft and loaded with `evaluate.load(<this folder>)`, which works offline."""

import string

import datasets
import evaluate


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation + " ").split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference after normalisation.",
            citation="",
            inputs_description="predictions: list of str, references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        matches = [normalize(p) == normalize(r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / max(len(matches), 1)}
