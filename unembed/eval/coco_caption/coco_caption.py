"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) as a Hugging Face `evaluate` metric.

evaluate.load copies this file alone into its modules cache, so it imports unembed absolutely.
Load it offline with `evaluate.load(unembed.eval.metrics.COCO_METRIC_PATH)` (the folder; evaluate
looks for <folder>/<folder name>.py) or with unembed.eval.metrics.load_coco_caption_metric().
"""
import datasets
import evaluate

from unembed.eval.metrics import coco_caption_metrics

_CITATION = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}
"""

_DESCRIPTION = """\
The COCO caption evaluation (pycocoevalcap): PTB tokenization, then corpus BLEU-1..4, METEOR,
ROUGE-L, CIDEr and, when its CoreNLP jars are installed, SPICE. Values are fractions (not x100).
Needs Java on PATH.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated captions, one per image.
    references: list of lists of reference captions, aligned with predictions.
    spice: whether to try SPICE (default True); it is reported unavailable when it cannot run.
Returns:
    dict with "BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE" (None if unavailable),
    "per_image" ({"CIDEr": {index: value}}), "unavailable" ({metric: reason}) and "skipped".
Examples:
    >>> metric = evaluate.load(unembed.eval.metrics.COCO_METRIC_PATH)
    >>> metric.compute(predictions=["a dog runs"], references=[["a dog is running", "a running dog"]])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CocoCaption(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
            reference_urls=["https://github.com/tylin/coco-caption"],
        )

    def _compute(self, predictions, references, spice=True):
        # images are identified by their position in the lists
        return coco_caption_metrics(dict(enumerate(predictions)), dict(enumerate(references)), spice=spice)
