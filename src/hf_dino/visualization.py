# Copyright 2026 The hf_dino authors. Licensed under the Apache License, Version 2.0.
"""Drawing detections on images with PIL (boxes, label names, scores)."""

from __future__ import annotations

import colorsys
import math
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

__all__ = ["color_for_label", "draw_detections", "draw_predictions", "normalize_detections"]


def color_for_label(label: Any) -> tuple[int, int, int]:
    """A saturated, mid-bright colour for a class, stable across runs (golden-ratio hue steps)."""
    key = label if isinstance(label, int) else sum((i + 1) * ord(c) for i, c in enumerate(str(label)))
    hue = (key * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


@lru_cache(maxsize=16)
def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    for name in ("DejaVuSans.ttf", "Arial.ttf", "LiberationSans-Regular.ttf"):
        try:
            return PIL.ImageFont.truetype(name, size)
        except OSError:
            continue
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return PIL.ImageFont.load_default()


def _box_to_xyxy(box: Any) -> tuple[float, float, float, float]:
    if isinstance(box, Mapping):
        return float(box["xmin"]), float(box["ymin"]), float(box["xmax"]), float(box["ymax"])
    if hasattr(box, "tolist"):
        box = box.tolist()
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0, y0, x1, y1


def normalize_detections(detections: Any, id2label: Mapping[int, str] | None = None) -> list[dict]:
    """Accept the pipeline's list of `{"score", "label", "box"}` dicts or a post-processing dict of tensors
    (`{"scores", "labels", "boxes"}`) and return a list of `{"score": float, "label": str, "box": (x0, y0, x1, y1)}`.
    """
    if isinstance(detections, Mapping) and "scores" in detections:
        labels, scores, boxes = (detections[k] for k in ("labels", "scores", "boxes"))
        labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
        scores = scores.tolist() if hasattr(scores, "tolist") else list(scores)
        detections = [{"score": s, "label": l, "box": b} for s, l, b in zip(scores, labels, boxes)]
    result = []
    for det in detections:
        label = det["label"]
        if id2label is not None and not isinstance(label, str):
            label = id2label.get(int(label), str(label))
        result.append({"score": float(det["score"]), "label": str(label), "box": _box_to_xyxy(det["box"])})
    return result


def draw_detections(
    image: PIL.Image.Image,
    detections: Any,
    id2label: Mapping[int, str] | None = None,
    line_width: int | None = None,
    font_size: int | None = None,
    max_detections: int | None = None,
) -> PIL.Image.Image:
    """Return a copy of `image` (RGB) with every detection drawn: a coloured box, and a filled tag holding
    `"<label> <score>"` in black or white, whichever reads better on the class colour.

    `detections`: the pipeline's list of `{"score", "label", "box": {"xmin", ...}}` dicts, or one post-processing
    result `{"scores", "labels", "boxes"}` (label ids are named with `id2label`). Boxes are absolute pixels
    `(x0, y0, x1, y1)`; they are clipped to the image for drawing, and boxes with a non-finite coordinate are left
    out with a warning. Low scores are drawn first so that the best detections stay on top; `max_detections` keeps
    only the highest-scoring ones.

    The image is made RGB as the processor makes it (:func:`hf_dino.image_processing_dino.pil_to_rgb`: 16-bit and
    float images scaled, not clipped), and drawn on as given, without EXIF rotation: the boxes must be in the frame
    of `image` (an image from transformers' `load_image` is upright, as the processor and the pipeline see it).
    """
    from .image_processing_dino import pil_to_rgb

    canvas = pil_to_rgb(image, apply_exif_orientation=False)
    canvas = canvas.copy() if canvas is image else canvas
    width, height = canvas.size
    items = normalize_detections(detections, id2label)
    finite = [det for det in items if all(math.isfinite(v) for v in det["box"])]
    if len(finite) < len(items):
        warnings.warn(f"Not drawing {len(items) - len(finite)} detection(s) whose box has a non-finite coordinate.",
                      RuntimeWarning, stacklevel=2)
    items = sorted(finite, key=lambda d: d["score"], reverse=True)
    if max_detections is not None:
        items = items[:max_detections]
    if not items:
        return canvas

    scale = max(width, height)
    line_width = line_width or max(1, round(scale / 400))
    font = _font(font_size or max(10, round(scale / 60)))
    draw = PIL.ImageDraw.Draw(canvas)
    for det in reversed(items):  # best last, i.e. on top
        x0, y0, x1, y1 = det["box"]
        x0, x1 = sorted((min(max(x0, 0.0), width - 1.0), min(max(x1, 0.0), width - 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), height - 1.0), min(max(y1, 0.0), height - 1.0)))
        color = color_for_label(det["label"])
        draw.rectangle([x0, y0, x1, y1], outline=color, width=line_width)

        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = right - left, bottom - top
        pad = max(1, line_width)
        tag_w, tag_h = text_w + 2 * pad, text_h + 2 * pad
        tag_x = min(max(x0, 0), max(width - tag_w, 0))
        tag_y = y0 - tag_h if y0 - tag_h >= 0 else min(y0, max(height - tag_h, 0))  # above the box, else inside
        draw.rectangle([tag_x, tag_y, tag_x + tag_w, tag_y + tag_h], fill=color)
        draw.text((tag_x + pad - left, tag_y + pad - top), text, fill=_text_color(color), font=font)
    return canvas


def draw_predictions(image, detections: Mapping[str, Any], id2label: Mapping[int, str] | None = None,
                     threshold: float = 0.2, min_side: int = 384, nms_iou: float | None = 0.5):
    """A copy of the PIL ``image`` with the detections (``scores``, ``labels``, ``boxes`` absolute xyxy) scoring at
    least ``threshold`` drawn as labelled boxes (:func:`hf_dino.visualization.draw_detections`).

    For a readable picture only (DINO itself uses no NMS): overlapping boxes of the same class above ``nms_iou`` are
    drawn once (the best), and images smaller than ``min_side`` are enlarged by an integer factor first."""
    import torch
    from torchvision.ops import batched_nms

    scores = torch.as_tensor(detections["scores"]).float().cpu()
    labels = torch.as_tensor(detections["labels"]).cpu()
    boxes = torch.as_tensor(detections["boxes"]).float().cpu().reshape(-1, 4)
    keep = scores >= threshold
    scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
    if nms_iou is not None and len(scores):
        keep = batched_nms(boxes, scores, labels, nms_iou)
        scores, labels, boxes = scores[keep], labels[keep], boxes[keep]
    kept = {"scores": scores, "labels": labels, "boxes": boxes}
    factor = max(1, math.ceil(min_side / max(1, max(image.size))))
    if factor > 1:
        from PIL import Image

        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.BILINEAR)
        kept["boxes"] = kept["boxes"] * factor
    return draw_detections(image, kept, id2label)
