"""Model cards (the Hub repo's README.md) for converted DINO checkpoints and for fine-tuned models.

* :func:`released_model_card`: a checkpoint of the original release (see `released_checkpoints.py`): what the model is,
  training data and schedule, the reported COCO AP of every released checkpoint (this one in bold), optionally the
  AP measured with this port, intended use and limits, a `pipeline` snippet, citation and license.
* :func:`finetuned_model_card`: a model trained with `examples/train.py`: the measured metrics, the label map, the
  base model, data set and training settings, the same snippet, limits, citation and license.

Metrics dicts are what `hf_dino.evaluation.CocoEvaluator.summarize()` returns: FRACTIONS in [0, 1] under the keys
AP, AP50, AP75, APs, APm, APl (negative = undefined); the cards print them in percent with one decimal. The
reported numbers of the released checkpoints (`ReleasedCheckpoint.box_ap`) are percent already.

Every card starts with YAML metadata (license, library, pipeline tag, data sets, `model-index` results) written by
`huggingface_hub.ModelCardData`, so the Hub shows the numbers in its evaluation widget.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Mapping

from huggingface_hub import EvalResult, ModelCardData

from .released_checkpoints import (
    MODEL_ZOO_URL,
    ORIGINAL_REPO,
    PAPER_URL,
    RELEASED_CHECKPOINTS,
    ReleasedCheckpoint,
    markdown_table,
)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
METRIC_DESCRIPTIONS = {
    "AP": "box AP (IoU 0.50:0.95)",
    "AP50": "box AP at IoU 0.50",
    "AP75": "box AP at IoU 0.75",
    "APs": "box AP, small objects",
    "APm": "box AP, medium objects",
    "APl": "box AP, large objects",
}
DEFAULT_EXAMPLE_IMAGE = "http://images.cocodataset.org/val2017/000000039769.jpg"
LICENSE = "apache-2.0"

CITATION = """\
@misc{zhang2022dino,
      title={DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End Object Detection},
      author={Hao Zhang and Feng Li and Shilong Liu and Lei Zhang and Hang Su and Jun Zhu and Lionel M. Ni and Heung-Yeung Shum},
      year={2022},
      eprint={2203.03605},
      archivePrefix={arXiv},
      primaryClass={cs.CV}
}"""


def usage_snippet(model_id: str, image: str = DEFAULT_EXAMPLE_IMAGE, threshold: float = 0.3) -> str:
    """A self-contained `pipeline` example (a Python code block's content) for ``model_id``.

    ``model_id`` is a Hub repo id or a local folder; ``image`` a URL or a local path.
    """
    return (
        "from transformers import pipeline\n"
        "\n"
        f'detector = pipeline("object-detection", model="{model_id}", trust_remote_code=True)\n'
        f'detections = detector("{image}", threshold={threshold})\n'
        "for detection in detections:\n"
        '    print(detection["label"], round(detection["score"], 3), detection["box"])\n'
    )


def lower_level_snippet(model_id: str, image: str = DEFAULT_EXAMPLE_IMAGE, threshold: float = 0.3) -> str:
    """The same detection without `pipeline`: processor, model, post-processing. The image is opened with
    transformers' `load_image` (a path or URL; EXIF orientation applied, as the processor and the pipeline do), so
    that `image.size` is the size of the image the boxes refer to."""
    return (
        "import torch\n"
        "from transformers import AutoImageProcessor, AutoModelForObjectDetection\n"
        "from transformers.image_utils import load_image\n"
        "\n"
        f'processor = AutoImageProcessor.from_pretrained("{model_id}", trust_remote_code=True)\n'
        f'model = AutoModelForObjectDetection.from_pretrained("{model_id}", trust_remote_code=True).eval()\n'
        f'image = load_image("{image}")\n'
        'inputs = processor(images=image, return_tensors="pt")\n'
        "with torch.no_grad():\n"
        "    outputs = model(**inputs)\n"
        "result = processor.post_process_object_detection(\n"
        f"    outputs, threshold={threshold}, target_sizes=[image.size[::-1]]\n"
        ")[0]\n"
        'for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):\n'
        '    print(model.config.id2label[int(label)], round(float(score), 3), [round(float(v), 1) for v in box])\n'
    )


def check_metrics(metrics: Mapping[str, float] | None, argument: str = "metrics") -> None:
    """Raise a `ValueError` unless ``metrics`` is None, empty, or COCO metrics as `CocoEvaluator.summarize()` gives
    them: a mapping with at least one of ``METRIC_NAMES``, each a fraction in [0, 1] (or pycocotools' -1 for
    "no such objects"). Percentages and other files (a training run's ``metrics.json``) would be published wrong."""
    if not metrics:
        return
    if not isinstance(metrics, Mapping) or not any(name in metrics for name in METRIC_NAMES):
        keys = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
        raise ValueError(f"{argument} must hold COCO metrics ({', '.join(METRIC_NAMES)}) as fractions, got {keys}.")
    for name in METRIC_NAMES:
        if name not in metrics:
            continue
        value = metrics[name]
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not number or not (value == -1 or 0 <= value <= 1):
            hint = " (a percentage? divide by 100)." if number and 1 < value <= 100 else "."
            raise ValueError(f"{argument}[{name!r}] must be a fraction in [0, 1] (or -1: no such objects), got "
                             f"{value!r}{hint}")


def _table_cell(value: object) -> str:
    """`value` as the text of one markdown table cell: `|` escaped, line breaks as spaces."""
    return " ".join(str(value).replace("|", "\\|").split())


def metrics_table(metrics: Mapping[str, float], percent: bool = False) -> str:
    """Markdown table ``| AP | AP50 | AP75 | APs | APm | APl |`` with one row (percent, one decimal)."""
    cells = []
    for name in METRIC_NAMES:
        value = metrics.get(name)
        cells.append("-" if value is None or float(value) < 0 else f"{float(value) * (1 if percent else 100):.1f}")
    return (
        "| " + " | ".join(METRIC_NAMES) + " |\n"
        "|" + "---:|" * len(METRIC_NAMES) + "\n"
        "| " + " | ".join(cells) + " |"
    )


def _front_matter(
    model_name: str,
    datasets: list[str] | None,
    eval_results: list[EvalResult],
    tags: list[str],
    base_model: str | None = None,
) -> str:
    data = ModelCardData(
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=tags,
        datasets=datasets,
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    return "---\n" + data.to_yaml() + "\n---\n"


def _usage_section(model_id: str, example_image: str) -> str:
    return f"""## How to use

The modeling code travels with the weights (`trust_remote_code=True`; pure-PyTorch multi-scale deformable
attention; needs `torch`, `torchvision`, `transformers`, `timm`, `scipy` and `pillow`). With the `hf_dino` package installed,
`import hf_dino` registers the same classes with the Auto classes, and its compiled attention kernel is used when
available.

```python
{usage_snippet(model_id, example_image)}```

Without `pipeline`:

```python
{lower_level_snippet(model_id, example_image)}```

Boxes are absolute `(xmin, ymin, xmax, ymax)` pixels of the input image. Post-processing keeps the 300 best
(query, class) pairs, like the original evaluation; raise `threshold` to keep fewer.
"""


def _citation_and_license(extra_license_note: str = "") -> str:
    return f"""## Citation

```bibtex
{CITATION}
```

## License

Apache-2.0, the license of the original DINO repository ({ORIGINAL_REPO}), under which the original
checkpoints were released.{extra_license_note}
"""


def released_model_card(
    checkpoint: ReleasedCheckpoint,
    repo_id: str | None = None,
    measured_metrics: Mapping[str, float] | None = None,
    measured_on: str = "COCO val2017",
    example_image: str = DEFAULT_EXAMPLE_IMAGE,
) -> str:
    """The card of a converted original checkpoint.

    ``repo_id`` (default: the table's Hub repo) is what the usage snippet loads. ``measured_metrics`` (fractions,
    from `CocoEvaluator.summarize()`) adds the AP measured with this port on ``measured_on``.
    """
    check_metrics(measured_metrics, "measured_metrics")
    repo_id = repo_id or checkpoint.hub_repo
    c = checkpoint
    title = f"DINO {c.num_feature_levels}-scale, {c.backbone_short} backbone, {c.epochs} epochs on COCO"
    eval_results = [
        EvalResult(
            task_type="object-detection",
            dataset_type="coco",
            dataset_name="COCO 2017 val",
            dataset_split="validation",
            metric_type="mAP",
            metric_name="box AP (reported)",
            metric_value=c.box_ap,
            source_name="DINO README (model zoo)",
            source_url=ORIGINAL_REPO,
        )
    ]
    # model-index carries the authors' number only: its results are grouped by data set, one source per group
    measured_section = ""
    if measured_metrics:
        measured_section = (
            f"\nMeasured with this port (`examples/evaluate.py`, {measured_on}):\n\n{metrics_table(measured_metrics)}\n"
        )
    front = _front_matter(
        repo_id.split("/")[-1], ["coco"], eval_results, ["object-detection", "vision", "dino", "detr", "custom_code"]
    )
    paper_ref = f", {c.paper_table} of the paper" if c.paper_table else ""
    lr_schedule = (
        "The learning rate drops by 10x after epoch 11."
        if c.epochs == 12
        else "The learning rate drops by 10x late in the schedule, as in the paper's longer settings."
    )
    return f"""{front}
# {title}

DINO (**D**ETR with **I**mproved de**N**oising anch**O**r boxes, [Zhang et al., 2022]({PAPER_URL}), ICLR 2023) is an
end-to-end transformer object detector: a backbone, a deformable-attention encoder over {c.num_feature_levels}
feature levels, query selection of 900 anchor boxes from the encoder's best proposals, and a 6-layer deformable
decoder that refines them layer by layer ("look forward twice"); contrastive denoising queries speed up training.
No NMS, no anchors to tune.

This repository holds the original authors' checkpoint `{c.file_name}` ({ORIGINAL_REPO}, [model zoo]({MODEL_ZOO_URL}))
converted to Hugging Face `transformers` (`hf_dino` port; safetensors weights, config, image processor). The
conversion only renames weights; the port is tested output for output against the original implementation.

| | |
|---|---|
| Model | {c.display_name} |
| Backbone | {c.backbone}, pre-trained on {c.backbone_pretraining} |
| Feature levels | {c.num_feature_levels} |
| Queries | 900 (300 detections kept after post-processing) |
| Encoder / decoder layers | 6 / 6, hidden size 256, 8 heads |
| Classes | 91 logits indexed by COCO category id (`id2label`); ids without a COCO category are "N/A" |
| Original file | `{c.file_name}` |

## Training data and schedule

Trained by the DINO authors on COCO 2017 `train2017` (118k images, 80 categories) for **{c.epochs} epochs**
("{c.epochs}-epoch setting"{paper_ref}): AdamW, learning rate 1e-4 (backbone 1e-5), weight decay 1e-4, total batch
size 16, gradient clipping 0.1; random horizontal flip, multi-scale resize (shortest side 480-800, longest side at
most 1333) and random crop. 100 contrastive denoising queries per group, box noise scale 1.0.
{lr_schedule}

## Evaluation

Box AP on COCO 2017 `val2017` (5k images), images resized to shortest side 800 / longest side at most 1333.
Reported by the authors for every released checkpoint (this one in bold):

{markdown_table(RELEASED_CHECKPOINTS, highlight=c.file_name)}
{measured_section}
{_usage_section(repo_id, example_image)}
## Intended use and limitations

* Intended for detecting the 80 COCO object categories in natural images, as a research baseline, a starting point
  for fine-tuning (`examples/train.py`) or a component of larger systems.
* It only knows COCO's categories and COCO-like photographs; expect lower accuracy on other domains (aerial,
  medical, documents, drawings) and on objects outside COCO's categories, which it cannot name.
* Small objects are detected markedly less well than large ones (see APs vs. APl).
* COCO's people and scenes are not representative of every population or place; check accuracy on your own data
  before relying on it, and do not use it for surveillance or decisions about individuals.
* Inference is heavy: {c.backbone_short} at 800x1333 with 900 queries; a GPU is recommended.

{_citation_and_license(" COCO annotations are CC BY 4.0; the images keep their Flickr licenses.")}"""


def finetuned_model_card(
    repo_id: str,
    id2label: Mapping[int, str],
    metrics: Mapping[str, float] | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    evaluated_on: str = "validation",
    training_args: Mapping[str, object] | None = None,
    architecture: str | None = None,
    example_image: str = DEFAULT_EXAMPLE_IMAGE,
    summary: str | None = None,
) -> str:
    """The card of a model fine-tuned with `examples/train.py`.

    ``metrics``: fractions from `CocoEvaluator.summarize()` measured on ``evaluated_on`` of ``dataset_name`` (a Hub
    data set id; a local path is left out of the card, which then says "custom"; so is a local ``base_model``).
    ``id2label``: the model's label map (written out in full). ``training_args``: settings listed as they are
    (epochs, learning rate, batch size, ...). ``architecture``: e.g. "DINO 4-scale, ResNet-50". ``summary``
    replaces the opening sentence ("A DINO object detector ... fine-tuned from ... on ...").
    """
    check_metrics(metrics)
    # local files and folders: their paths are not published (the card says "custom" / names no base model)
    if dataset_name and Path(dataset_name).exists():
        dataset_name = None
    if base_model and Path(base_model).exists():
        base_model = None
    eval_results = []
    for name in METRIC_NAMES:
        value = None if metrics is None else metrics.get(name)
        if value is not None and float(value) >= 0:
            eval_results.append(
                EvalResult(
                    task_type="object-detection",
                    dataset_type=dataset_name or "custom",
                    dataset_name=dataset_name or "custom",
                    dataset_split=evaluated_on,
                    metric_type="mAP",
                    metric_name=METRIC_DESCRIPTIONS[name],
                    metric_value=round(float(value) * 100, 1),
                )
            )
    front = _front_matter(
        repo_id.split("/")[-1],
        [dataset_name] if dataset_name else None,
        eval_results,
        ["object-detection", "vision", "dino", "detr", "custom_code", "fine-tuned"],
        base_model=base_model,
    )
    labels = sorted((int(k), str(v)) for k, v in id2label.items())
    label_rows = "\n".join(f"| {i} | {_table_cell(name)} |" for i, name in labels)
    metrics_block = (
        f"Measured with pycocotools (`hf_dino.evaluation`) on the {evaluated_on} split"
        f"{' of ' + dataset_name if dataset_name else ''}:\n\n{metrics_table(metrics)}"
        if metrics
        else "No evaluation was run."
    )
    args_rows = "\n".join(f"| {_table_cell(k)} | {_table_cell(v)} |" for k, v in (training_args or {}).items())
    args_block = f"| setting | value |\n|---|---|\n{args_rows}" if args_rows else "Not recorded."
    named = [name for _, name in labels if name.upper() != "N/A"]
    if summary is None:
        summary = (
            f"A DINO object detector ([Zhang et al., 2022]({PAPER_URL}); `hf_dino` port of {ORIGINAL_REPO}) fine-tuned "
            f"{('from `' + base_model + '` ') if base_model else ''}"
            f"on {('`' + dataset_name + '`') if dataset_name else 'a custom data set'}."
        )
    count = f"{len(named)} {'category' if len(named) == 1 else 'categories'}"
    return f"""{front}
# {repo_id.split("/")[-1]}

{summary} It detects {count}.{(" Architecture: " + architecture + ".") if architecture else ""}

## Evaluation

{metrics_block}

## Labels

| id | label |
|---:|---|
{label_rows}

## Training

{args_block}

{_usage_section(repo_id, example_image)}
## Intended use and limitations

* Detects only the categories listed above, in images like those of its training data; accuracy elsewhere is
  unknown. The metrics above come from one evaluation split and say nothing about other domains.
* Check accuracy on your own data before relying on it; do not use it for surveillance or decisions about
  individuals.

{_citation_and_license(" The license of the fine-tuning data applies to its use as well.")}"""


__all__ = [
    "CITATION",
    "DEFAULT_EXAMPLE_IMAGE",
    "METRIC_NAMES",
    "check_metrics",
    "finetuned_model_card",
    "lower_level_snippet",
    "metrics_table",
    "released_model_card",
    "usage_snippet",
]
