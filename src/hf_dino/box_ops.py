"""Boxes: format conversions, DINO's generalized IoU, and the validation of training labels.

A leaf module (it imports torch and torchvision only): the loss, the denoising queries, the image processor, the data
sets and the evaluation all take their box arithmetic from here.

Formats (torchvision's names): `cxcywh` (centre, width, height; what the model predicts and what `labels` hold,
normalized to [0, 1] by the unpadded image size), `xyxy` (corners; post-processed detections, in pixels), `xywh`
(top-left corner, width, height; COCO annotations and COCO results, in pixels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_convert

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_xywh_to_xyxy",
    "box_xyxy_to_xywh",
    "generalized_box_iou",
    "elementwise_generalized_box_iou",
    "check_detection_labels",
]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`[..., 4]` (cx, cy, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`[..., 4]` (x0, y0, x1, y1) -> (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def box_xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`[..., 4]` COCO (x, y, w, h) -> (x0, y0, x1, y1)."""
    return box_convert(boxes, "xywh", "xyxy")


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """`[..., 4]` (x0, y0, x1, y1) -> COCO (x, y, w, h)."""
    return box_convert(boxes, "xyxy", "xywh")


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes `[N, 4]` x `[M, 4]` -> `[N, M]`, exactly as the original `util/box_ops.py`.

    Not `torchvision.ops.generalized_box_iou`: the original adds 1e-6 to the union (IoU denominator) and to the
    enclosing area, torchvision does not; the eps changes losses in the 7th digit and keeps zero-area boxes finite
    (two identical zero-area boxes give GIoU 0 here, NaN in torchvision). The arithmetic order follows the
    original so that matching costs, and hence near-tied assignments, are bit-identical.
    """
    area1 = _box_area(boxes1)
    area2 = _box_area(boxes2)
    inter_wh = (torch.min(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, None, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1[:, None] + area2 - inter
    iou = inter / (union + 1e-6)
    enclose_wh = (torch.max(boxes1[:, None, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, None, :2], boxes2[:, :2])).clamp(min=0)
    enclose = enclose_wh[..., 0] * enclose_wh[..., 1]
    return iou - (enclose - union) / (enclose + 1e-6)


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """GIoU of corresponding xyxy boxes `[N, 4]`, `[N, 4]` -> `[N]`; the diagonal of `generalized_box_iou`, same
    arithmetic (the original takes `torch.diag` of the full N x N matrix)."""
    area1 = _box_area(boxes1)
    area2 = _box_area(boxes2)
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / (union + 1e-6)
    enclose_wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    enclose = enclose_wh[:, 0] * enclose_wh[:, 1]
    return iou - (enclose - union) / (enclose + 1e-6)


# tolerance of the [0, 1] range check: float rounding of boxes normalized from pixel coordinates
_RANGE_TOLERANCE = 1e-4
# how far (a fraction of the image side) a box's corners `cx -/+ w / 2`, `cy -/+ h / 2` may lie outside the image:
# corners normalized as (x0, y0, x1, y1) and read as (cx, cy, w, h) reach far outside it (e.g. x0 = 0.1 - 0.6 / 2)
_CORNER_TOLERANCE = 0.05
_FORMAT_HINT = (
    "labels hold boxes normalized by the image size as (cx, cy, w, h) in [0, 1] (the image processor's and the data "
    "sets' output), not pixels and not (x0, y0, x1, y1) corners"
)


def check_detection_labels(labels: Sequence[Mapping], num_classes: int) -> None:
    """Raise a `ValueError` naming the image and the problem if `labels` cannot be used for training.

    Each entry (a dict, or any mapping such as the `BatchFeature`s `DinoImageProcessor` returns) needs
    `"class_labels"` (integer `[n]`) with ids in `[0, num_classes)` and `"boxes"` `[n, 4]`, finite, normalized (cx,
    cy, w, h): every value in [0, 1] (boxes in pixels are rejected) and the corners `cx -/+ w / 2`, `cy -/+ h / 2`
    within the image up to 5 % of its side (normalized (x0, y0, x1, y1) corners are rejected: read as (cx, cy, w,
    h), nearly every image has a box reaching far outside). Images without annotations (n = 0) are fine,
    and so are zero-area boxes (GIoU stays finite thanks to the 1e-6 terms; the original dataset code drops them, a
    re-implementation's data pipeline may not).

    The model validates its `labels` once per forward pass (in [`DinoModel.forward`]); the denoising queries and the
    loss take them as validated. The value checks cost one device-to-host synchronisation for the whole batch.
    """
    if not isinstance(labels, (list, tuple)):
        raise ValueError(f"labels must be a list with one dict per image, got {type(labels).__name__}.")
    for b, target in enumerate(labels):
        if not isinstance(target, Mapping) or "class_labels" not in target or "boxes" not in target:
            keys = sorted(target) if isinstance(target, Mapping) else type(target).__name__
            raise ValueError(f"labels[{b}] needs 'class_labels' and 'boxes', got {keys}.")
        cls, boxes = target["class_labels"], target["boxes"]
        if not isinstance(cls, torch.Tensor) or not isinstance(boxes, torch.Tensor):
            raise ValueError(f"labels[{b}]: 'class_labels' and 'boxes' must be tensors.")
        if cls.dim() != 1 or boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != cls.shape[0]:
            raise ValueError(
                f"labels[{b}]: expected class_labels [n] and boxes [n, 4], got {tuple(cls.shape)} and {tuple(boxes.shape)}."
            )
        if cls.is_floating_point() or cls.is_complex() or cls.dtype in (torch.bool, torch.uint8):
            raise ValueError(
                f"labels[{b}]['class_labels'] must be integer class ids (torch.int64), got {cls.dtype}"
                + (" (torch indexes with bool and uint8 tensors as masks)." if not cls.is_floating_point() else ".")
            )
    non_empty = [t for t in labels if t["class_labels"].numel() > 0]
    if not non_empty:
        return
    # one reduction over the whole batch, one host sync; the per-image loop below runs only to word the error
    flags = torch.stack([_label_problems(t, num_classes).to(non_empty[0]["boxes"].device) for t in non_empty]).any(0)
    if not bool(flags.any()):
        return
    for b, target in enumerate(labels):
        if target["class_labels"].numel() == 0:
            continue
        cls, boxes = target["class_labels"], target["boxes"]
        bad_class, not_finite, negative_size, out_of_range, outside_image = _label_problems(target, num_classes).tolist()
        if bad_class:
            raise ValueError(
                f"labels[{b}]['class_labels'] must be in [0, {num_classes}), got min {int(cls.min())}, max {int(cls.max())}."
            )
        if not_finite:
            raise ValueError(f"labels[{b}]['boxes'] contains NaN or inf.")
        if negative_size:
            raise ValueError(
                f"labels[{b}]['boxes'] has a negative width or height; {_FORMAT_HINT} (drop degenerate annotations in "
                "the data pipeline)."
            )
        if out_of_range:
            raise ValueError(
                f"labels[{b}]['boxes'] has values outside [0, 1] (min {float(boxes.min()):g}, max {float(boxes.max()):g}); "
                f"{_FORMAT_HINT}."
            )
        if outside_image:
            corners = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=-1)
            raise ValueError(
                f"labels[{b}]['boxes'] has boxes reaching outside the image (corners cx -/+ w/2, cy -/+ h/2 from "
                f"{float(corners.min()):g} to {float(corners.max()):g}); {_FORMAT_HINT} (clip boxes to the image)."
            )


def _label_problems(target: dict, num_classes: int) -> torch.Tensor:
    """`[5]` bool: bad class id, non-finite box, negative size, box value outside [0, 1], box corner outside the image
    (one image, on its device)."""
    cls, boxes = target["class_labels"], target["boxes"]
    finite = torch.isfinite(boxes).all()
    return torch.stack([
        (cls < 0).any() | (cls >= num_classes).any(),
        ~finite,
        (boxes[:, 2:] < 0).any(),
        ((boxes < -_RANGE_TOLERANCE) | (boxes > 1 + _RANGE_TOLERANCE)).any(),
        ((boxes[:, :2] - boxes[:, 2:] / 2 < -_CORNER_TOLERANCE) | (boxes[:, :2] + boxes[:, 2:] / 2 > 1 + _CORNER_TOLERANCE)).any(),
    ])
