"""COCO box evaluation shared by `examples/evaluate.py` and the training script.

Typical use::

    from pycocotools.coco import COCO
    from hf_dino.evaluation import CocoEvaluator, format_metrics_table

    coco_gt = COCO("instances_val2017.json")
    evaluator = CocoEvaluator(coco_gt)                      # labels are COCO category ids (DINO's 91 classes)
    for batch in loader:
        results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        evaluator.update([{"image_id": i, **r} for i, r in zip(batch_image_ids, results)])
    evaluator.synchronize(accelerator)                      # no-op in a single process
    metrics = evaluator.summarize()                         # {"AP": 0.49, "AP50": ..., ...} fractions in [0, 1]
    print(format_metrics_table(metrics))                    # percent, one decimal, like the paper
    evaluator.write_results("results.json")                 # standard COCO detection results

Conventions:

* Predictions are per image: ``image_id`` (the COCO image id), ``scores`` ``[N]``, ``labels`` ``[N]`` (model
  label ids) and ``boxes`` ``[N, 4]`` absolute ``(x_min, y_min, x_max, y_max)`` pixels of the ORIGINAL image, as
  returned by ``DinoImageProcessor.post_process_object_detection``. Tensors (any device), numpy arrays or lists.
* ``label_to_category_id`` maps model label ids to COCO category ids. ``None`` means the labels already ARE
  category ids (the released DINO checkpoints: 91 classes indexed by COCO id). Detections whose category is not a
  category of ``coco_gt`` (e.g. DINO's unused "N/A" ids) are dropped; they could never match a ground truth box.
* Only images that received an ``update`` are evaluated (``COCOeval.params.imgIds``), so a subset run is scored on
  that subset, as the original DINO evaluation does. An image updated with zero detections still counts.
* ``summarize()`` returns FRACTIONS in ``[0, 1]`` (pycocotools' own scale); ``-1.0`` where pycocotools has no
  ground truth for that area range. ``format_metrics_table`` prints percent.
* Under data-parallel evaluation every process updates with its own shard, then ``synchronize`` gathers the
  detections of all processes (``accelerate``'s ``gather_object`` or ``torch.distributed.all_gather_object``)
  so every process holds the full set; images seen by several processes (padding of the last batch by a
  distributed sampler) are kept once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .box_ops import box_xyxy_to_xywh

METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RECALL_NAMES: tuple[str, ...] = ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

__all__ = [
    "CocoEvaluator",
    "METRIC_NAMES",
    "RECALL_NAMES",
    "format_metrics_table",
    "build_label_to_category_id",
    "evaluate_coco",
]


def _to_numpy(value: Any, dtype=None) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy() if value.is_floating_point() else value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(dtype) if dtype is not None else array


def build_label_to_category_id(id2label: Mapping[int, str], coco_gt) -> dict[int, int] | None:
    """Map a model's label ids to the category ids of ``coco_gt`` through the label names.

    Returns ``None`` (labels are category ids, no mapping needed) when every label id that is also a category id of
    ``coco_gt`` names that very category, which is the case of the released DINO checkpoints (91 classes indexed by
    COCO id; their "N/A" ids are no category ids and are dropped by the evaluator). Otherwise returns
    ``{label_id: category_id}`` for the labels whose name matches a category (case-insensitive); unmatched labels
    are not evaluated (with ``None`` a label at a category's id would be scored as that category whatever its name:
    a COCO model's "bicycle" (id 2) counted as the file's "helmet" (id 2)).
    Raises ``ValueError`` when no label name matches any category.
    """
    name_to_cat = {str(c["name"]).strip().lower(): int(c["id"]) for c in coco_gt.loadCats(coco_gt.getCatIds())}
    mapping: dict[int, int] = {}
    for label_id, name in id2label.items():
        cat = name_to_cat.get(str(name).strip().lower())
        if cat is not None:
            mapping[int(label_id)] = cat
    if not mapping:
        raise ValueError(
            "None of the model's label names matches a category of the annotation file; pass an explicit "
            "label_to_category_id mapping."
        )
    category_ids = {int(c) for c in coco_gt.getCatIds()}
    if all(mapping.get(int(label_id)) == int(label_id) for label_id in id2label if int(label_id) in category_ids):
        return None
    return mapping


class CocoEvaluator:
    """Accumulates detections and scores them with pycocotools' ``COCOeval`` (box AP).

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` holding the ground truth.
        label_to_category_id: model label id -> COCO category id; ``None`` when labels are category ids.
        verbose: let pycocotools print its own summary while evaluating (it is captured otherwise).
    """

    def __init__(self, coco_gt, label_to_category_id: Mapping[int, int] | None = None, verbose: bool = False):
        self.coco_gt = coco_gt
        self.label_to_category_id = (
            None if label_to_category_id is None else {int(k): int(v) for k, v in label_to_category_id.items()}
        )
        self.verbose = verbose
        self._valid_category_ids = set(int(c) for c in coco_gt.getCatIds())
        # image_id -> list of COCO result dicts; insertion order is kept
        self._results: dict[int, list[dict]] = {}
        self.coco_eval = None  # the last COCOeval, after summarize()

    # ---- accumulation -------------------------------------------------------------------------------------
    def update(self, predictions: Iterable[Mapping[str, Any]]) -> None:
        """Add the detections of some images (see the module docstring for the format).

        An image id given again replaces its earlier detections.
        """
        for prediction in predictions:
            image_id = int(_to_numpy(prediction["image_id"]).reshape(-1)[0])
            if image_id not in self.coco_gt.imgs:  # pycocotools: an unnamed assertion, or -1 metrics without one
                raise ValueError(
                    f"image_id {image_id} is not an image of the ground truth ({len(self.coco_gt.imgs)} images, e.g. "
                    f"{sorted(self.coco_gt.imgs)[:3]}); pass the COCO image ids (the processor's labels['image_id']), "
                    "not positions in the data set."
                )
            scores = _to_numpy(prediction["scores"], np.float64).reshape(-1)
            labels = _to_numpy(prediction["labels"], np.int64).reshape(-1)
            boxes = box_xyxy_to_xywh(torch.from_numpy(_to_numpy(prediction["boxes"], np.float64).reshape(-1, 4))).numpy()
            if not (len(scores) == len(labels) == len(boxes)):
                raise ValueError(
                    f"image {image_id}: scores ({len(scores)}), labels ({len(labels)}) and boxes ({len(boxes)}) "
                    "must have the same length"
                )
            entries = []
            for score, label, box in zip(scores.tolist(), labels.tolist(), boxes.tolist()):
                if self.label_to_category_id is None:
                    category_id = int(label)
                else:
                    category_id = self.label_to_category_id.get(int(label))
                if category_id is None or category_id not in self._valid_category_ids:
                    continue
                entries.append(
                    {"image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in box], "score": float(score)}
                )
            self._results[image_id] = entries

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images that received an update, in order."""
        return list(self._results)

    def results(self) -> list[dict]:
        """All detections as a COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``)."""
        return [entry for entries in self._results.values() for entry in entries]

    def write_results(self, path: str | os.PathLike) -> None:
        """Write :meth:`results` as the standard COCO detection-results JSON file."""
        with open(path, "w") as f:
            json.dump(self.results(), f)

    # ---- multi-process ------------------------------------------------------------------------------------
    def synchronize(self, accelerator=None) -> None:
        """Gather the detections of every process so that every process holds all of them.

        Uses ``accelerate.utils.gather_object`` when an ``accelerate.Accelerator`` with several processes is
        given, ``torch.distributed.all_gather_object`` when a process group is initialised, and does nothing in
        a single process. Must be called by every process.
        """
        local = list(self._results.items())
        gathered: list | None = None
        if accelerator is not None:
            if getattr(accelerator, "num_processes", 1) > 1:
                from accelerate.utils import gather_object

                # gather_object concatenates the lists of all processes (in rank order)
                gathered = gather_object(local)
        else:
            try:
                import torch.distributed as dist
            except ImportError:  # pragma: no cover
                dist = None
            if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                per_rank: list = [None] * dist.get_world_size()
                dist.all_gather_object(per_rank, local)
                gathered = [item for rank_items in per_rank for item in rank_items]
        if gathered is None:
            return
        merged: dict[int, list[dict]] = {}
        for image_id, entries in gathered:
            merged.setdefault(int(image_id), entries)  # duplicates (sampler padding) kept once
        self._results = merged

    # ---- scoring ------------------------------------------------------------------------------------------
    def evaluate(self):
        """Run ``COCOeval`` (iouType "bbox") on the accumulated detections; returns the ``COCOeval``."""
        from pycocotools.cocoeval import COCOeval

        results = self.results()
        sink = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            coco_dt = self.coco_gt.loadRes(results) if results else _empty_results(self.coco_gt)
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(self._results)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        self.coco_eval = coco_eval
        return coco_eval

    def summarize(self, include_recall: bool = False) -> dict[str, float]:
        """Evaluate and return ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` as fractions in ``[0, 1]``.

        ``include_recall=True`` adds ``AR1, AR10, AR100, ARs, ARm, ARl``. With no image updated, every value is 0.
        """
        names = METRIC_NAMES + (RECALL_NAMES if include_recall else ())
        if not self._results:
            return {name: 0.0 for name in names}
        stats = self.evaluate().stats
        return {name: float(stats[i]) for i, name in enumerate(names)}


def _empty_results(coco_gt):
    """A COCO results object with no detection (``COCO.loadRes`` cannot take an empty list)."""
    from pycocotools.coco import COCO

    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]), "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def format_metrics_table(metrics: Mapping[str, float], percent: bool = False, title: str | None = None) -> str:
    """The paper-style table (markdown): ``| AP | AP50 | AP75 | APs | APm | APl |`` and one row of values.

    ``metrics`` holds fractions in ``[0, 1]`` (what :meth:`CocoEvaluator.summarize` returns) and is printed in
    percent with one decimal; pass ``percent=True`` if the values are already percent. Negative values
    (pycocotools' "no ground truth in this range") and missing keys print as ``-``. Recall keys present in
    ``metrics`` are appended as extra columns.
    """
    names = list(METRIC_NAMES) + [name for name in RECALL_NAMES if name in metrics]
    cells = []
    for name in names:
        value = metrics.get(name)
        if value is None or float(value) < 0:
            cells.append("-")
        else:
            cells.append(f"{float(value) * (1.0 if percent else 100.0):.1f}")
    widths = [max(len(n), len(c)) for n, c in zip(names, cells)]
    header = "| " + " | ".join(n.rjust(w) for n, w in zip(names, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    row = "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    lines = ([title] if title else []) + [header, rule, row]
    return "\n".join(lines)


@torch.no_grad()
def evaluate_coco(
    model: torch.nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    coco_gt,
    label_to_category_id: Mapping[int, int] | None,
    image_processor,
    accelerator=None,
    device: torch.device | str | None = None,
    top_k: int = 300,
    progress: bool = False,
) -> dict[str, float]:
    """Box AP of ``model`` on ``dataloader`` (batches of :class:`hf_dino.data.DetectionCollator`) with pycocotools.

    Each process evaluates its own shard; detections are gathered across processes before scoring, so every
    process returns the metrics of the whole set. Returns fractions ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}``.
    """
    was_training = model.training
    model.eval()
    if device is None:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
    evaluator = CocoEvaluator(coco_gt, label_to_category_id)
    iterator = dataloader
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(dataloader, desc="eval", leave=False, dynamic_ncols=True)
    for batch in iterator:
        autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
        with autocast:
            outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
        results = image_processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=batch["orig_sizes"].to(device), top_k=top_k
        )
        evaluator.update(
            [{"image_id": int(i), **{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in r.items()}}
             for i, r in zip(batch["image_ids"].tolist(), results)]
        )
    evaluator.synchronize(accelerator)
    metrics = evaluator.summarize()
    model.train(was_training)
    return metrics
