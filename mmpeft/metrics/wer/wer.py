"""Word error rate (jiwer), for transcription tasks. Shipped with mmpeft; `evaluate.load(<this folder>)`."""

import datasets
import evaluate
import jiwer


class WordErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Word error rate of predictions against references (lower is better).",
            citation="",
            inputs_description="predictions: list of str, references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        # jiwer rejects empty references; an empty reference with any prediction counts as all errors.
        pairs = [(r, p) for p, r in zip(predictions, references) if r.strip()]
        if not pairs:
            return {"wer": 0.0}
        return {"wer": jiwer.wer([r for r, _ in pairs], [p if p.strip() else "<empty>" for _, p in pairs])}
