"""Batching: normalise and pad the augmented images with :class:`~hf_dino.DinoImageProcessor` (``do_resize=False``),
and keep the targets in the format of ``DinoForObjectDetection(labels=...)``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["DetectionCollator"]


class DetectionCollator:
    """``collate_fn`` for the detection data sets of :mod:`hf_dino.data`.

    Returns a dict with

    * ``pixel_values`` float ``[B, 3, H, W]`` (rescaled, normalised, zero-padded at the bottom/right to the largest
      image of the batch) and ``pixel_mask`` int64 ``[B, H, W]`` (1 = real pixel), from the image processor;
    * ``labels``: one ``{"class_labels", "boxes"}`` dict per image (normalized ``cx, cy, w, h``) for the loss;
    * ``image_ids`` ``[B]``, ``orig_sizes`` ``[B, 2]`` (``h, w`` of the stored image, for post-processing) and
      ``sizes`` ``[B, 2]`` (after augmentation).

    Args:
        image_processor: a ``DinoImageProcessor`` (its ``image_mean``/``image_std`` are used); a default one when
            ``None``.
    """

    def __init__(self, image_processor=None):
        if image_processor is None:
            from ..image_processing_dino import DinoImageProcessor

            image_processor = DinoImageProcessor()
        self.image_processor = image_processor

    def __call__(self, batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
        images = [image for image, _ in batch]
        targets = [target for _, target in batch]
        encoded = self.image_processor(images=images, do_resize=False, do_pad=True, return_tensors="pt")
        labels = []
        for target in targets:
            boxes = target["boxes"].reshape(-1, 4).float()
            class_labels = target["class_labels"].reshape(-1).long()
            if len(boxes) != len(class_labels):
                raise ValueError(f"image {target['image_id']}: {len(boxes)} boxes but {len(class_labels)} labels")
            if len(boxes) and (not torch.isfinite(boxes).all() or (boxes[:, 2:] <= 0).any()):
                raise ValueError(f"image {target['image_id']}: degenerate boxes reached the collate function: {boxes}")
            labels.append({"class_labels": class_labels, "boxes": boxes})
        return {
            "pixel_values": encoded["pixel_values"],
            "pixel_mask": encoded["pixel_mask"],
            "labels": labels,
            "image_ids": torch.tensor([int(t["image_id"]) for t in targets], dtype=torch.int64),
            "orig_sizes": torch.tensor([list(t["orig_size"]) for t in targets], dtype=torch.int64),
            "sizes": torch.tensor([list(t["size"]) for t in targets], dtype=torch.int64),
        }
