"""A small synthetic COCO-format detection data set, generated deterministically (the demo data of `examples/train.py`).

The default run of ``examples/train.py`` (no data arguments) trains on this data: coloured shapes on textured
backgrounds, one class per shape kind. Nothing is downloaded; the same ``seed`` writes byte-identical files.

Layout written by :func:`generate_synthetic_coco` (the standard COCO layout)::

    root/
      train/000000000001.png ...
      val/000000100001.png ...
      annotations/instances_train.json
      annotations/instances_val.json
      synthetic.json            # the generation parameters, to reuse a folder that already matches

Each class has its own shape and a hue band (with jitter), so a compact model trained from scratch on a CPU learns
it within minutes. Objects may overlap a little; boxes are the tight pixel extent of each drawn shape in COCO
``[x, y, w, h]`` format; ``area`` is the box area.
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SYNTHETIC_CLASSES", "generate_synthetic_coco", "synthetic_paths"]

# class name -> (shape kind, hue centre in degrees)
SYNTHETIC_CLASSES: dict[str, tuple[str, float]] = {
    "circle": ("circle", 0.0),  # red
    "square": ("square", 120.0),  # green
    "triangle": ("triangle", 220.0),  # blue
    "diamond": ("diamond", 55.0),  # yellow
    "cross": ("cross", 290.0),  # magenta
}

_FORMAT_VERSION = 1


def synthetic_paths(root: str | os.PathLike) -> dict[str, str]:
    """Paths of the train/val images and annotation files under ``root``."""
    root = Path(root)
    return {
        "train_images": str(root / "train"),
        "train_annotations": str(root / "annotations" / "instances_train.json"),
        "val_images": str(root / "val"),
        "val_annotations": str(root / "annotations" / "instances_val.json"),
    }


def _hsv_to_rgb(hue_degrees: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(val * 255)) for val in colorsys.hsv_to_rgb((hue_degrees % 360.0) / 360.0, s, v))


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A muted textured background: a colour gradient, stripes or checks, and noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 170, size=3).astype(np.float32)
    direction = rng.uniform(-1, 1, size=(2, 3)).astype(np.float32)
    img = base + (xx[..., None] / width - 0.5) * direction[0] * 60 + (yy[..., None] / height - 0.5) * direction[1] * 60
    kind = int(rng.integers(0, 3))
    period = float(rng.uniform(6, 20))
    angle = float(rng.uniform(0, math.pi))
    if kind == 0:  # stripes
        pattern = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    elif kind == 1:  # checks
        pattern = np.sign(np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period))
    else:  # blobs
        pattern = np.sin(xx / period) * np.cos(yy / (period * 0.7))
    img = img + pattern[..., None] * rng.uniform(8, 25)
    img = img + rng.normal(0, 6, size=img.shape)
    # keep the background desaturated so that shapes stand out by hue
    grey = img.mean(axis=2, keepdims=True)
    img = grey + (img - grey) * 0.35
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _shape_polygon(kind: str, cx: float, cy: float, size: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    r = size / 2
    if kind == "square":
        a = r * float(rng.uniform(0.75, 1.0))
        b = r * float(rng.uniform(0.75, 1.0))
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx - a, cy + b)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.9), (cx - r, cy + r * 0.9)]
    if kind == "diamond":
        a = r * float(rng.uniform(0.7, 1.0))
        return [(cx, cy - r), (cx + a, cy), (cx, cy + r), (cx - a, cy)]
    if kind == "cross":
        t = r * 0.35
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx + t, cy + t),
            (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]
    raise ValueError(kind)


def _draw_image(rng: np.random.Generator, height: int, width: int, max_objects: int, min_size: int, max_size: int):
    image = _background(rng, height, width)
    names = list(SYNTHETIC_CLASSES)
    num_objects = int(rng.integers(1, max_objects + 1))
    objects = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(num_objects):
        for _attempt in range(20):
            size = float(rng.uniform(min_size, max_size))
            cx = float(rng.uniform(size / 2, width - size / 2))
            cy = float(rng.uniform(size / 2, height - size / 2))
            box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
            # at most a small overlap with earlier objects
            if all(_iou(box, other) < 0.1 for other in placed):
                break
        else:
            continue
        placed.append(box)
        class_index = int(rng.integers(0, len(names)))
        kind, hue = SYNTHETIC_CLASSES[names[class_index]]
        colour = _hsv_to_rgb(hue + float(rng.uniform(-15, 15)), float(rng.uniform(0.7, 1.0)), float(rng.uniform(0.75, 1.0)))
        # draw on a mask to get the exact pixel extent
        mask = Image.new("L", (width, height), 0)
        mdraw = ImageDraw.Draw(mask)
        if kind == "circle":
            mdraw.ellipse(box, fill=255)
        else:
            mdraw.polygon(_shape_polygon(kind, cx, cy, size, rng), fill=255)
        shade = Image.new("RGB", (width, height), colour)
        image.paste(shade, (0, 0), mask)
        ys, xs = np.nonzero(np.asarray(mask) > 0)
        if len(xs) == 0:
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append((class_index + 1, [x0, y0, x1 - x0, y1 - y0]))
    image = image.filter(ImageFilter.GaussianBlur(radius=0.5))
    return image, objects


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _write_split(root: Path, split: str, num_images: int, rng: np.random.Generator, first_id: int, params: dict) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_id
    for index in range(num_images):
        image_id = first_id + index
        height, width = params["image_size"]
        image, objects = _draw_image(rng, height, width, params["max_objects"], params["min_object_size"], params["max_object_size"])
        file_name = f"{image_id:012d}.png"
        image.save(root / split / file_name, format="PNG", optimize=False)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category_id, bbox in objects:
            annotations.append(
                {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in bbox],
                 "area": float(bbox[2] * bbox[3]), "iscrowd": 0}
            )
            ann_id += 1
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTHETIC_CLASSES)]
    dataset = {"info": {"description": "hf_dino synthetic shapes", "version": str(_FORMAT_VERSION)},
               "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(dataset, f)


def generate_synthetic_coco(
    root: str | os.PathLike,
    num_train: int = 96,
    num_val: int = 24,
    image_size: tuple[int, int] = (128, 128),
    max_objects: int = 3,
    min_object_size: int = 24,
    max_object_size: int = 56,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the synthetic data set under ``root`` (COCO layout) and return its paths (see :func:`synthetic_paths`).

    Deterministic: the same arguments always produce the same files. When ``root`` already holds a data set
    generated with the same arguments it is reused (pass ``overwrite=True`` to regenerate). The folder is written
    to a temporary sibling and renamed into place, so an interrupted generation never leaves a half data set.
    """
    root = Path(root)
    params = {
        "version": _FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
        "image_size": [int(image_size[0]), int(image_size[1])], "max_objects": int(max_objects),
        "min_object_size": int(min_object_size), "max_object_size": int(max_object_size), "seed": int(seed),
        "classes": list(SYNTHETIC_CLASSES),
    }
    meta = root / "synthetic.json"
    if meta.exists() and not overwrite:
        try:
            if json.loads(meta.read_text()) == params:
                return synthetic_paths(root)
        except (OSError, json.JSONDecodeError):
            pass
    if min_object_size < 4 or max_object_size < min_object_size or max_object_size > min(image_size):
        raise ValueError("need 4 <= min_object_size <= max_object_size <= min(image_size)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        rng_train, rng_val = (np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(2))
        _write_split(tmp, "train", num_train, rng_train, 1, params)
        _write_split(tmp, "val", num_val, rng_val, 100001, params)
        (tmp / "synthetic.json").write_text(json.dumps(params))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return synthetic_paths(root)
