"""Corpus BLEU (sacrebleu), for captioning tasks. Shipped with mmpeft; `evaluate.load(<this folder>)`."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Corpus BLEU of predictions against one reference each (0-100).",
            citation="",
            inputs_description="predictions: list of str, references: list of str",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}
