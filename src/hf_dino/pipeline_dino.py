# Copyright 2026 The hf_dino authors. Licensed under the Apache License, Version 2.0.
"""Batched ``pipeline("object-detection")`` for DINO: images of different sizes in one batch.

transformers' pipeline collates a batch by concatenating every item's ``pixel_values``, which fails as soon as two
images of a batch are resized to different shapes (``pipeline(..., batch_size=2)`` on a portrait and a landscape
photo). :class:`DinoObjectDetectionPipeline` collates DINO batches the way :class:`~hf_dino.DinoImageProcessor`
batches images itself: zero-padded at the bottom/right to the batch's largest height and width, with
``pixel_mask`` 0 on the padding. Importing :mod:`hf_dino` makes it the ``"object-detection"`` pipeline; for every
model that is not DINO it behaves exactly like transformers' ``ObjectDetectionPipeline``.

Padding and results: DINO masks the padding out of the backbone features' attention, but its query selection and
the resolution of the feature maps see the padded canvas, so an image's detections depend (slightly) on the
padding it gets, i.e. on the other images of its batch. ``batch_size=1`` (the default) gives every image exactly
its own size; see the README ("Batching and padding") for the measured size of the effect.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sized
from typing import Any

import PIL.Image
import torch
from transformers.image_utils import load_image
from transformers.pipelines.object_detection import ObjectDetectionPipeline
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

from .configuration_dino import DinoConfig
from .image_processing_dino import load_image_file, pil_to_rgb

__all__ = ["DinoObjectDetectionPipeline", "pad_detection_batch"]


def pad_detection_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate preprocessed single-image items (``pixel_values`` ``[1, 3, h, w]``, ``pixel_mask`` ``[1, h, w]``,
    ``target_size`` ``[1, 2]``) into one batch: ``pixel_values`` ``[B, 3, H, W]`` zero-padded bottom/right to the
    largest ``H``, ``W``, ``pixel_mask`` ``[B, H, W]`` (0 on the padding), ``target_size`` ``[B, 2]``."""
    height = max(item["pixel_values"].shape[-2] for item in items)
    width = max(item["pixel_values"].shape[-1] for item in items)
    first = items[0]["pixel_values"]
    pixel_values = first.new_zeros((len(items), first.shape[1], height, width))
    pixel_mask = torch.zeros((len(items), height, width), dtype=torch.long)
    for i, item in enumerate(items):
        h, w = item["pixel_values"].shape[-2:]
        pixel_values[i, :, :h, :w] = item["pixel_values"][0]
        if "pixel_mask" in item:
            pixel_mask[i, :h, :w] = item["pixel_mask"][0]
        else:
            pixel_mask[i, :h, :w] = 1
    batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    batch["target_size"] = torch.cat([item["target_size"] for item in items])
    return batch


class DinoObjectDetectionPipeline(ObjectDetectionPipeline):
    """``ObjectDetectionPipeline`` whose batches (``batch_size > 1``) of a DINO model may mix image sizes."""

    def _is_dino(self) -> bool:
        return getattr(self.model.config, "model_type", None) == DinoConfig.model_type

    def preprocess(self, image, timeout=None):
        """As transformers' (a URL, a path, a base64 string or a PIL image; EXIF orientation applied; `target_size`
        the upright image's), but for DINO the image is made RGB by the processor's `pil_to_rgb`: transformers'
        `load_image` converts with PIL's `convert("RGB")`, which clips 16-bit images at 255 (nearly white)."""
        if not self._is_dino():
            return super().preprocess(image, timeout=timeout)
        if isinstance(image, str) and (image.startswith(("http://", "https://")) or os.path.isfile(image)):
            image = load_image_file(image, timeout=timeout)
        elif isinstance(image, str):  # base64, as transformers' load_image reads it
            try:
                image = PIL.Image.open(io.BytesIO(base64.decodebytes(image.split(",")[-1].encode())))
            except Exception:  # noqa: BLE001 - transformers' own error message
                image = load_image(image, timeout=timeout)
        elif not isinstance(image, PIL.Image.Image):
            image = load_image(image, timeout=timeout)  # transformers' error for other types
        image = pil_to_rgb(image)
        inputs = self.image_processor(images=[image], return_tensors="pt").to(self.dtype)
        inputs["target_size"] = torch.IntTensor([[image.height, image.width]])
        return inputs

    def _forward(self, model_inputs):
        model_outputs = super()._forward(model_inputs)
        if not self._is_dino():
            return model_outputs
        # only batch-first tensors, so that the pipeline can split a batch into images (the per-layer
        # `auxiliary_outputs` list is not batch-first; post-processing reads `logits` and `pred_boxes`)
        return model_outputs.__class__({k: v for k, v in model_outputs.items() if isinstance(v, torch.Tensor)})

    def get_iterator(self, inputs, num_workers: int, batch_size: int, preprocess_params, forward_params,
                     postprocess_params):
        if batch_size == 1 or not self._is_dino():
            return super().get_iterator(inputs, num_workers, batch_size, preprocess_params, forward_params,
                                        postprocess_params)
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:  # a generator or other iterable: one worker at most, as transformers' pipeline has it
            num_workers = min(num_workers, 1)
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
        loader = torch.utils.data.DataLoader(dataset, num_workers=num_workers, batch_size=batch_size,
                                             collate_fn=pad_detection_batch)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)


def register_pipeline() -> None:
    """Make :class:`DinoObjectDetectionPipeline` the ``"object-detection"`` pipeline, unless something other than
    transformers' own ``ObjectDetectionPipeline`` is registered there."""
    from transformers.pipelines import PIPELINE_REGISTRY

    task = PIPELINE_REGISTRY.supported_tasks.get("object-detection")
    if task is None:
        return
    impl = task.get("impl")
    name = impl if isinstance(impl, str) else f"{getattr(impl, '__module__', '')}.{getattr(impl, '__name__', '')}"
    if name.endswith(".ObjectDetectionPipeline"):
        task["impl"] = f"{__name__}.DinoObjectDetectionPipeline"
