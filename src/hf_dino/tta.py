# Copyright 2026 The hf_dino authors. Licensed under the Apache License, Version 2.0.
"""Test-time augmentation (TTA) for DINO with the paper's one-to-one ensembling (Appendix A, Eq. 3).

    from hf_dino.tta import DinoTTA

    tta = DinoTTA(model, processor)                     # views: the image as is (main) and mirrored
    tta = DinoTTA(model, processor, scales=(1.0, 0.8))  # 4 views: two scales, as is and mirrored
    images = [load_image(path) for path in paths]       # transformers.image_utils: EXIF orientation applied
    detections = tta(images, threshold=0.3, target_sizes=[image.size[::-1] for image in images])
    # the structure post_process_object_detection returns: [{"scores", "labels", "boxes"}, ...]

The paper (Appendix A) runs augmentations Aug_0 ... Aug_{n-1} with predictions O^i = {(b^i_j, l^i_j, s^i_j)} and
weights w^i, Aug_0 being the main, most reliable one. For every prediction of O^0 it takes from each other O^i the
prediction with the highest IoU, if that IoU is above a threshold, and ensembles the boxes as (Eq. 3)

    b = 1 / (sum_i I^i) * sum_i I^i * w^i * s^i_idx(i) * b^i_idx(i),      I^i = 1 if O^i had such a match, I^0 = 1.

Unlike gathering every view's predictions and suppressing duplicates by NMS, nothing is removed; the paper's
argument is that a set-prediction detector rarely predicts duplicates, so NMS-style ensembling removes true positives.

What the paper leaves open, and what this module does (each is a parameter):

* ``box_normalization`` -- Eq. 3 as printed divides by the number of matched views, sum_i I^i, while the text calls it
  a "weighted average". As printed, the box is scaled by the mean of w^i * s^i: a box that every view predicts
  identically with score 0.5 comes out at half its coordinates, and a single identity augmentation does not give
  the plain prediction back. The default, ``"weighted"``, divides by sum_i I^i w^i s^i (the weighted average the
  text describes; it returns the plain prediction for a single view). ``"count"`` is Eq. 3 exactly as printed.
* ``match_labels`` (default ``True``) -- whether the partner must have the same label. DINO's post-processing
  keeps the top-k (query, class) pairs, so one box appears once per likely class; without label agreement the
  partner of a weak "dog" reading of an object is usually the strong "cat" reading of the same box in another view,
  which would be averaged into the wrong class.
* ``score_mode`` -- the paper gives no ensembled score. ``"mean_all"`` (default): the weighted mean of the views'
  scores with 0 for views without a match, sum_i I^i w^i s^i / sum_i w^i; detections that the other views do not
  confirm are ranked lower, which is what TTA is for. With the default (flip) views it measured best on the sum
  of our two models (README); with 0.8x views added, ``"main"`` measured better, since the weaker views then
  demote good detections.
  ``"mean_matched"``: the weighted mean over the matched views only. ``"main"``: the score of Aug_0.
* Mapping back: each view is post-processed with the ORIGINAL image size as target size. The model predicts boxes
  normalized to the resized, unpadded image, which shows the same content as the original, so a rescaled view
  needs nothing else (more exact than dividing pixel boxes by the scale factor: the resize truncates sizes to whole
  pixels, so the actual factor differs per axis). A mirrored view's boxes are mirrored back, x -> W - x (W the
  image width, or 1 for normalized boxes).
* Views: ``Augmentation(scale, hflip)`` resizes to ``scale`` x the processor's size (shortest and longest edge)
  and, if ``hflip``, mirrors the image left-right before resizing; the main view (scale 1.0, not mirrored) is plain
  inference. Default: scales (1.0,) with flip, i.e. the image and its mirror image (2 forward passes). The paper
  also uses several scales, but on both models we measured (README, "Test-time augmentation") adding 0.8x views
  lowered AP while the flip alone raised it, at half the cost; pass e.g. ``scales=(1.0, 0.8)`` for multi-scale
  views (with the paper's training recipe, scales 0.6..1.0 stay inside the trained range of shorter sides
  480..800 for an 800 evaluation size; larger scales are never seen in training).
* ``weights`` default to 1 for every view (the paper gives no values; the main view already decides which
  detections exist). ``iou_threshold`` defaults to 0.5, the IoU at which COCO counts two boxes as the same object
  (AP50); a match needs IoU strictly above it ("higher than" in the paper).
* Ties and exclusivity: a view's predictions are sorted by score, and the first of equal-IoU candidates (the higher
  score) is taken; as in the paper, two main predictions may pick the same partner (no exclusive assignment).

``ensemble="nms"`` is the conventional alternative the paper argues against (gather every view's predictions,
``torchvision.ops.batched_nms`` per label, keep the top-k), for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torchvision.ops import batched_nms, box_iou

from .image_processing_dino import check_threshold, to_chw_rgb_tensor

__all__ = ["Augmentation", "DinoTTA", "ensemble_nms", "ensemble_one_to_one", "hflip_boxes"]

Prediction = Mapping[str, torch.Tensor]  # {"scores": [m], "labels": [m], "boxes": [m, 4] (x0, y0, x1, y1)}

DEFAULT_SCALES: tuple[float, ...] = (1.0,)


class Augmentation(NamedTuple):
    """One test-time view: resize to `scale` x the processor's size; mirror left-right first if `hflip`."""

    scale: float = 1.0
    hflip: bool = False


def hflip_boxes(boxes: torch.Tensor, width: float | torch.Tensor) -> torch.Tensor:
    """Mirror `[m, 4]` (x0, y0, x1, y1) boxes left-right in an image `width` wide: (W - x1, y0, W - x0, y1)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([width - x1, y0, width - x0, y1], dim=-1)


def _validate_predictions(predictions: Sequence[Prediction]) -> None:
    if len(predictions) == 0:
        raise ValueError("Need the predictions of at least one augmentation (the main one first).")
    for i, p in enumerate(predictions):
        m = p["scores"].shape[0]
        if p["labels"].shape != (m,) or p["boxes"].shape != (m, 4):
            raise ValueError(
                f"Augmentation {i}: expected scores [m], labels [m] and boxes [m, 4], got "
                f"{tuple(p['scores'].shape)}, {tuple(p['labels'].shape)}, {tuple(p['boxes'].shape)}."
            )


def ensemble_one_to_one(
    predictions: Sequence[Prediction],
    weights: Sequence[float] | None = None,
    iou_threshold: float = 0.5,
    match_labels: bool = True,
    score_mode: Literal["mean_all", "mean_matched", "main"] = "mean_all",
    box_normalization: Literal["weighted", "count"] = "weighted",
) -> dict[str, torch.Tensor]:
    """One-to-one ensembling of one image's predictions from several augmentations (DINO paper, Appendix A, Eq. 3).

    Args:
        predictions: per augmentation, `{"scores": [m_i], "labels": [m_i], "boxes": [m_i, 4]}` with boxes
            `(x0, y0, x1, y1)` in one common frame (the original image); `predictions[0]` is the main augmentation.
        weights: `w^i` per augmentation (positive; default 1 each).
        iou_threshold: a prediction of augmentation i is the partner of a main prediction if it has the highest IoU
            with it among augmentation i's predictions (of the same label if `match_labels`) and that IoU is
            strictly above this threshold.
        match_labels: require the partner to have the main prediction's label.
        score_mode: the ensembled score: `"mean_all"` sum_i I^i w^i s^i / sum_i w^i, `"mean_matched"`
            sum_i I^i w^i s^i / sum_i I^i w^i, `"main"` s^0.
        box_normalization: `"weighted"` b = sum_i I^i w^i s^i b^i / sum_i I^i w^i s^i; `"count"` Eq. 3 as printed,
            b = sum_i I^i w^i s^i b^i / sum_i I^i.

    Returns:
        `{"scores": [m_0], "labels": [m_0], "boxes": [m_0, 4]}`: one detection per main prediction, with its label,
        sorted by the ensembled score (descending, stable). With one augmentation the result is the input itself.
    """
    _validate_predictions(predictions)
    n = len(predictions)
    if weights is None:
        weights = [1.0] * n
    if len(weights) != n or not all(float(w) > 0 and math.isfinite(float(w)) for w in weights):
        raise ValueError(f"Need one positive finite weight per augmentation ({n}), got {list(weights)}.")
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}.")
    if score_mode not in ("mean_all", "mean_matched", "main"):
        raise ValueError(f"score_mode must be 'mean_all', 'mean_matched' or 'main', got {score_mode!r}.")
    if box_normalization not in ("weighted", "count"):
        raise ValueError(f"box_normalization must be 'weighted' or 'count', got {box_normalization!r}.")

    main = predictions[0]
    scores0, labels0, boxes0 = main["scores"], main["labels"], main["boxes"]
    m = scores0.shape[0]
    w = torch.as_tensor([float(x) for x in weights], dtype=scores0.dtype, device=scores0.device)

    # per augmentation and main prediction: I^i, the partner's score s^i_idx(i) and box b^i_idx(i)
    matched = torch.zeros(n, m, dtype=torch.bool, device=scores0.device)
    partner_scores = torch.zeros(n, m, dtype=scores0.dtype, device=scores0.device)
    partner_boxes = torch.zeros(n, m, 4, dtype=boxes0.dtype, device=boxes0.device)
    matched[0], partner_scores[0], partner_boxes[0] = True, scores0, boxes0
    for i in range(1, n):
        other = predictions[i]
        if m == 0 or other["scores"].shape[0] == 0:
            continue
        iou = box_iou(boxes0, other["boxes"].to(boxes0.dtype))  # [m, m_i]
        if match_labels:
            iou = iou.masked_fill(labels0[:, None] != other["labels"][None, :], -1.0)
        best_iou, index = iou.max(dim=1)  # first maximum: the higher-scored candidate on ties
        matched[i] = best_iou > iou_threshold
        partner_scores[i] = torch.where(matched[i], other["scores"][index].to(scores0.dtype), 0.0)
        partner_boxes[i] = other["boxes"][index].to(boxes0.dtype)

    indicator = matched.to(scores0.dtype)
    box_weight = indicator * w[:, None] * partner_scores  # I^i w^i s^i, [n, m]
    if box_normalization == "weighted":
        total = box_weight.sum(0)
        # a main score of exactly 0 (sigmoid underflow) leaves nothing to average: keep the main box
        fallback = torch.zeros_like(box_weight)
        fallback[0] = 1.0
        coefficient = torch.where(total > 0, box_weight / total, fallback)
    else:
        coefficient = box_weight / indicator.sum(0)
    boxes = (coefficient[..., None] * partner_boxes).sum(0)

    if score_mode == "main":
        scores = scores0.clone()
    else:
        view_weight = w[:, None].expand(n, m) if score_mode == "mean_all" else indicator * w[:, None]
        scores = (view_weight / view_weight.sum(0) * partner_scores).sum(0)

    order = torch.sort(scores, descending=True, stable=True).indices
    return {"scores": scores[order], "labels": labels0[order], "boxes": boxes[order]}


def ensemble_nms(
    predictions: Sequence[Prediction], iou_threshold: float = 0.5, top_k: int | None = None
) -> dict[str, torch.Tensor]:
    """Conventional TTA ensembling: gather the predictions of all augmentations, suppress per label with
    `torchvision.ops.batched_nms` (boxes overlapping a higher-scored one of the same label by IoU > `iou_threshold`
    are removed), keep the `top_k` best. Same input and output format as :func:`ensemble_one_to_one`."""
    _validate_predictions(predictions)
    scores = torch.cat([p["scores"] for p in predictions])
    labels = torch.cat([p["labels"] for p in predictions])
    boxes = torch.cat([p["boxes"].to(predictions[0]["boxes"].dtype) for p in predictions])
    keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)  # sorted by score, descending
    if top_k is not None:
        keep = keep[:top_k]
    return {"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]}


class DinoTTA:
    """Test-time augmentation of a DINO detector: run every view, map its boxes back, ensemble.

    Args:
        model: a `DinoForObjectDetection` (or a model with the same outputs), in eval mode.
        processor: its image processor (`DinoImageProcessor` / `DinoImageProcessorPil`); views rescale its `size`.
        scales: resize factors of the processor's size, the first one the main view (default (1.0,)).
        flip: also run every scale mirrored left-right (default True). The views are
            `[(s, False) for s in scales] + [(s, True) for s in scales]`.
        augmentations: an explicit list of `Augmentation(scale, hflip)` instead of `scales` / `flip`, the first
            one the main view (e.g. `[Augmentation(1.0, hflip=True)]`).
        weights: `w^i` per view (default 1 each).
        iou_threshold, match_labels, score_mode, box_normalization: see :func:`ensemble_one_to_one`.
        ensemble: `"one-to-one"` (the paper's, default) or `"nms"` (gather all views, `batched_nms`).
        nms_iou_threshold: IoU threshold of `ensemble="nms"`.

    See the module docstring for what each default is and why.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        scales: Sequence[float] | None = None,
        flip: bool | None = None,
        augmentations: Sequence[Augmentation | tuple[float, bool]] | None = None,
        weights: Sequence[float] | None = None,
        iou_threshold: float = 0.5,
        match_labels: bool = True,
        score_mode: Literal["mean_all", "mean_matched", "main"] = "mean_all",
        box_normalization: Literal["weighted", "count"] = "weighted",
        ensemble: Literal["one-to-one", "nms"] = "one-to-one",
        nms_iou_threshold: float = 0.5,
    ) -> None:
        if augmentations is not None:
            if scales is not None or flip is not None:
                raise ValueError("Pass either `augmentations` or `scales` / `flip`, not both.")
            augmentations = [Augmentation(float(a[0]), bool(a[1])) for a in augmentations]
        else:
            scales = DEFAULT_SCALES if scales is None else tuple(float(s) for s in scales)
            flips = (False, True) if (flip is None or flip) else (False,)
            augmentations = [Augmentation(s, f) for f in flips for s in scales]
        if not augmentations:
            raise ValueError("Need at least one augmentation.")
        bad = [a.scale for a in augmentations if not (a.scale > 0 and math.isfinite(a.scale))]
        if bad:
            raise ValueError(f"Scales must be positive, got {bad}.")
        if weights is not None and len(weights) != len(augmentations):
            raise ValueError(f"Got {len(weights)} weights for {len(augmentations)} augmentations {augmentations}.")
        if ensemble not in ("one-to-one", "nms"):
            raise ValueError(f"ensemble must be 'one-to-one' or 'nms', got {ensemble!r}.")
        if not 0 <= nms_iou_threshold <= 1:
            raise ValueError(f"nms_iou_threshold must be in [0, 1], got {nms_iou_threshold}.")
        # the ensembling options are checked now, not at the first call
        empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
        ensemble_one_to_one([empty] * len(augmentations), weights, iou_threshold, match_labels, score_mode,
                            box_normalization)
        self.model = model
        self.processor = processor
        self.augmentations: list[Augmentation] = list(augmentations)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.iou_threshold = iou_threshold
        self.match_labels = match_labels
        self.score_mode = score_mode
        self.box_normalization = box_normalization
        self.ensemble = ensemble
        self.nms_iou_threshold = nms_iou_threshold

    def __repr__(self) -> str:
        views = ", ".join(f"{a.scale:g}{' flipped' if a.hflip else ''}" for a in self.augmentations)
        return (
            f"DinoTTA(views=[{views}], ensemble={self.ensemble!r}, weights={self.weights}, "
            f"iou_threshold={self.iou_threshold}, match_labels={self.match_labels}, score_mode={self.score_mode!r}, "
            f"box_normalization={self.box_normalization!r}"
            f"{f', nms_iou_threshold={self.nms_iou_threshold}' if self.ensemble == 'nms' else ''})"
        )

    def _view_size(self, scale: float, size: Any = None) -> dict[str, int] | None:
        """The processor `size` of a view at `scale`: `scale` times `size` (a call's `size` argument), or times the
        processor's own size when `size` is None (None: the base size as it is)."""
        if scale == 1.0:
            return size
        size = self.processor.size if size is None else size
        get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
        if get("shortest_edge"):
            view = {"shortest_edge": max(1, round(get("shortest_edge") * scale))}
            if get("longest_edge"):
                view["longest_edge"] = max(1, round(get("longest_edge") * scale))
            return view
        if get("height") and get("width"):
            return {"height": max(1, round(get("height") * scale)), "width": max(1, round(get("width") * scale))}
        raise ValueError(f"Cannot rescale the processor size {size}; expected shortest_edge or height and width.")

    @torch.inference_mode()
    def predict_views(
        self,
        images: Any,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int = 300,
        **processor_kwargs,
    ) -> list[list[dict[str, torch.Tensor]]]:
        """Every view's post-processed predictions (top-`top_k`, no threshold), boxes mapped back to the original
        image (pixels of `target_sizes`, or normalized to [0, 1] without). Returns `[augmentation][image]`.
        `processor_kwargs` go to the processor; a `size` among them is the base size that the views' scales
        multiply."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            return [[] for _ in self.augmentations]
        apply_exif = processor_kwargs.pop(
            "apply_exif_orientation", getattr(self.processor, "apply_exif_orientation", True)
        )
        input_data_format = processor_kwargs.pop("input_data_format", None)
        # one canonical [3, H, W] tensor per image (EXIF orientation applied once here), mirrored for flipped views
        tensors = [to_chw_rgb_tensor(image, input_data_format, apply_exif) for image in images]
        if target_sizes is not None and len(target_sizes) != len(tensors):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(tensors)} images.")
        if target_sizes is None:
            widths = torch.ones(len(tensors))
        else:
            widths = torch.as_tensor([float(s[1]) for s in target_sizes])
        device = next(self.model.parameters()).device
        base_size = processor_kwargs.pop("size", None)

        views = []
        for augmentation in self.augmentations:
            view_images = [t.flip(-1) for t in tensors] if augmentation.hflip else tensors
            kwargs = dict(processor_kwargs)
            size = self._view_size(augmentation.scale, base_size)
            if size is not None:
                kwargs["size"] = size
            inputs = self.processor(images=view_images, return_tensors="pt", input_data_format="channels_first", **kwargs)
            inputs = {k: v.to(device) for k, v in inputs.items() if k in ("pixel_values", "pixel_mask")}
            outputs = self.model(**inputs)
            results = self.processor.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=target_sizes, top_k=top_k
            )
            if augmentation.hflip:
                for result, width in zip(results, widths.tolist()):
                    result["boxes"] = hflip_boxes(result["boxes"], width)
            views.append(results)
        return views

    def __call__(
        self,
        images: Any,
        threshold: float | None = 0.5,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int = 300,
        **processor_kwargs,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect objects in `images` (one image or a list, any sizes) with test-time augmentation.

        Args:
            images: PIL images, numpy arrays or tensors, as the processor takes them.
            threshold: keep detections whose ensembled score is `> threshold` (`0` / `None`: keep all).
            target_sizes: `(height, width)` per image (usually the original sizes, of the image turned upright by
                its EXIF orientation as the processor does) for pixel boxes; `None` keeps normalized boxes, as
                `post_process_object_detection`.
            top_k: (query, class) candidates per view (each view's `post_process_object_detection` top-k); the
                result has at most `top_k` detections per image.
            processor_kwargs: passed to the processor (e.g. `apply_exif_orientation=False`).

        Returns:
            One `{"scores": [k], "labels": [k], "boxes": [k, 4] (x0, y0, x1, y1)}` dict per image, sorted by score,
            like `post_process_object_detection`.
        """
        check_threshold(threshold)  # before the views' forward passes
        views = self.predict_views(images, target_sizes=target_sizes, top_k=top_k, **processor_kwargs)
        results = []
        for per_view in zip(*views):
            if self.ensemble == "nms":
                result = ensemble_nms(per_view, iou_threshold=self.nms_iou_threshold, top_k=top_k)
            else:
                result = ensemble_one_to_one(
                    per_view,
                    weights=self.weights,
                    iou_threshold=self.iou_threshold,
                    match_labels=self.match_labels,
                    score_mode=self.score_mode,
                    box_normalization=self.box_normalization,
                )
            if threshold is not None and threshold > 0:
                keep = result["scores"] > threshold
                result = {k: v[keep] for k, v in result.items()}
            results.append(result)
        return results


# ----------------------------------------------------------------------------------------------------------------------
# Command-line options shared by `hf-dino predict` and `examples/evaluate.py`
# ----------------------------------------------------------------------------------------------------------------------


def tta_from_args(args, model: torch.nn.Module, processor: Any) -> DinoTTA | None:
    """The `DinoTTA` that the command-line options of `hf_dino_cli.add_tta_arguments` ask for (None without `--tta`)."""
    if not args.tta:
        return None
    return DinoTTA(model, processor, scales=args.tta_scales, flip=not args.tta_no_flip, ensemble=args.tta_ensemble)
