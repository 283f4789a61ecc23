"""Adapter for Hugging Face ``datasets`` detection data sets in the common layout.

Expected columns (the layout of e.g. ``cppe-5``, ``detection-datasets/coco``)::

    image:    Image()
    objects:  {"bbox": list of 4 floats, "category": ClassLabel or int, optional "area", "iscrowd", "id"}
    optional: "image_id" (or "id"), "width", "height"

``bbox`` is COCO ``[x, y, w, h]`` in pixels by default (``bbox_format="xyxy"`` for ``[x0, y0, x1, y1]``). Category
names come from the ``ClassLabel`` feature when there is one, else the ids become the names. The same bad-data
policies as :class:`~hf_dino.data.dataset.CocoDetectionDataset` apply; :meth:`HFDetectionDataset.to_coco` builds
the pycocotools ground truth used by the evaluation.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import warnings
from collections import Counter
from typing import Callable

from PIL import Image

from ..image_processing_dino import pil_to_rgb
from .dataset import DetectionDataset, LabelMap, _check_choice, build_label_map, clean_annotations

__all__ = ["HFDetectionDataset", "hf_categories"]


def _integer_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _category_feature(dataset, objects_column: str):
    feature = dataset.features.get(objects_column)
    if feature is None:
        raise ValueError(
            f"The dataset has no {objects_column!r} column (columns: {list(dataset.column_names)}); expected the "
            "detection layout image + objects: {bbox, category}."
        )
    # objects may be a dict of sequences, a Sequence(dict) or a List(dict)
    inner = getattr(feature, "feature", feature)
    if isinstance(inner, dict):
        category = inner.get("category")
    else:
        category = None
    if category is None:
        raise ValueError(f"The {objects_column!r} column has no 'category' field (feature: {feature}).")
    return getattr(category, "feature", category)


def hf_categories(dataset, objects_column: str = "objects") -> list[dict]:
    """COCO-style ``categories`` of a ``datasets`` detection data set (ids ``0..N-1`` of its ``ClassLabel``)."""
    category = _category_feature(dataset, objects_column)
    names = getattr(category, "names", None)
    if names:
        return [{"id": i, "name": str(n)} for i, n in enumerate(names)]
    ids = sorted({int(c) for objects in dataset[objects_column] for c in _objects_dict(objects)["category"]})
    return [{"id": i, "name": str(i)} for i in ids]


def _objects_dict(objects) -> dict[str, list]:
    """Objects as a dict of lists whether stored as a dict of lists or a list of dicts."""
    if isinstance(objects, dict):
        return objects
    out: dict[str, list] = {}
    for obj in objects or []:
        for key, value in obj.items():
            out.setdefault(key, []).append(value)
    return out


class HFDetectionDataset(DetectionDataset):
    """A ``datasets.Dataset`` (one split) as a DINO detection data set.

    Args:
        dataset: the split.
        transforms: ``transforms.v2`` callable, see :mod:`hf_dino.data.transforms`.
        label_map: a :class:`LabelMap`; by default from the data's categories (``label_map_mode``).
        bbox_format: ``"xywh"`` (COCO, default) or ``"xyxy"``.
        missing_images, unknown_categories, empty_images: bad-data policies, as for COCO folders.
    """

    def __init__(
        self,
        dataset,
        transforms: Callable | None = None,
        label_map: LabelMap | None = None,
        label_map_mode: str = "contiguous",
        bbox_format: str = "xywh",
        image_column: str = "image",
        objects_column: str = "objects",
        missing_images: str = "error",
        unknown_categories: str = "error",
        empty_images: str = "keep",
    ):
        _check_choice("bbox_format", bbox_format, ("xywh", "xyxy"))
        _check_choice("missing_images", missing_images, ("error", "skip"))
        _check_choice("unknown_categories", unknown_categories, ("error", "ignore"))
        _check_choice("empty_images", empty_images, ("keep", "skip"))
        if image_column not in dataset.column_names:
            raise ValueError(f"The dataset has no {image_column!r} column (columns: {list(dataset.column_names)}).")
        self.dataset = dataset
        self.transforms = transforms
        self.bbox_format = bbox_format
        self.image_column = image_column
        self.objects_column = objects_column
        self.missing_images = missing_images
        self.unknown_categories = unknown_categories
        self.categories = hf_categories(dataset, objects_column)
        self.label_map = label_map or build_label_map(self.categories, label_map_mode)
        self.issues = Counter()

        columns = set(dataset.column_names)
        meta = dataset.select_columns([c for c in (objects_column, "image_id", "id", "width", "height") if c in columns])
        self._targets: list[tuple[int, int | None, int | None, list[dict]]] = []
        rows = list(meta)
        given_ids = [_integer_or_none(row.get("image_id", row.get("id", index))) for index, row in enumerate(rows)]
        # ids must be unique for the evaluation: a repeated or non-integer id gets a fresh one, above every given id
        fresh_ids = itertools.count(max((i for i in given_ids if i is not None), default=-1) + 1)
        seen_ids: set[int] = set()
        replaced = []
        for index, (row, image_id) in enumerate(zip(rows, given_ids)):
            if image_id is None or image_id in seen_ids:
                replaced.append(index)
                image_id = next(fresh_ids)
            seen_ids.add(image_id)
            anns = self._annotations(row[objects_column], image_id)
            width, height = row.get("width"), row.get("height")
            self._targets.append((image_id, width, height, anns))
        keep = []
        for index, (image_id, width, height, anns) in enumerate(self._targets):
            boxes, _ = clean_annotations(
                anns, width, height, self.label_map.category_to_label, unknown_categories, issues=self.issues,
                where=f" of row {index}",
            )
            if len(boxes) == 0:
                self.issues["image_without_annotations"] += 1
                if empty_images == "skip":
                    continue
            keep.append(index)
        if not keep:
            raise ValueError("No usable row in the dataset.")
        self.indices = keep
        self._warn_issues("datasets split")
        if replaced:
            warnings.warn(
                f"datasets split: {len(replaced)} rows (first: row {replaced[0]}) have a repeated or non-integer image "
                "id; they get new ids above the largest given one (ids must be unique for the COCO evaluation).",
                stacklevel=2,
            )

    def _annotations(self, objects, image_id: int) -> list[dict]:
        objects = _objects_dict(objects)
        bboxes = objects.get("bbox", [])
        cats = objects.get("category", [])
        if len(bboxes) != len(cats):
            raise ValueError(f"Row with image id {image_id}: {len(bboxes)} boxes but {len(cats)} categories.")
        anns = []
        for k, (bbox, cat) in enumerate(zip(bboxes, cats)):
            bbox = list(bbox) if bbox is not None else None
            if bbox is not None and self.bbox_format == "xyxy" and len(bbox) == 4:
                bbox = [bbox[0], bbox[1], bbox[2] - bbox[0], bbox[3] - bbox[1]]
            ann = {"id": objects.get("id", [None] * len(cats))[k], "bbox": bbox, "category_id": cat,
                   "iscrowd": int(objects.get("iscrowd", [0] * len(cats))[k] or 0)}
            if ann["id"] is None:
                ann["id"] = f"{image_id}/{k}"
            anns.append(ann)
        return anns

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return f"row {self.indices[index]}"

    def load_image(self, index: int) -> Image.Image:
        row = self.indices[index]
        try:
            image = self.dataset[row][self.image_column]
        except (OSError, FileNotFoundError, ValueError) as error:
            raise OSError(f"Cannot load the image of row {row}: {error}") from error
        if isinstance(image, dict) and "path" in image:  # undecoded Image feature
            image = Image.open(image["path"])
        if not isinstance(image, Image.Image):
            raise TypeError(f"Row {row}: the {self.image_column!r} column holds {type(image).__name__}, not an image.")
        return pil_to_rgb(image, apply_exif_orientation=False)  # as `CocoDetectionDataset.load_image`

    def raw_target(self, index: int):
        return self._targets[self.indices[index]]

    def coco_ground_truth(self):
        """The ground truth for evaluation (built once, see :meth:`to_coco`)."""
        if getattr(self, "_coco", None) is None:
            self._coco = self.to_coco()
        return self._coco

    def to_coco(self):
        """The ground truth as a ``pycocotools.coco.COCO`` (for :class:`hf_dino.evaluation.CocoEvaluator`).

        Images whose size is not stored in ``width``/``height`` columns are decoded once to read it.
        """
        from pycocotools.coco import COCO

        images, annotations = [], []
        ann_id = 1
        for index in range(len(self)):
            image_id, width, height, anns = self.raw_target(index)
            if width is None or height is None:
                width, height = self.load_image(index).size
            images.append({"id": image_id, "width": int(width), "height": int(height), "file_name": self.describe(index)})
            for ann in anns:
                try:
                    cat = int(ann["category_id"])
                    x, y, w, h = (float(v) for v in ann["bbox"])
                except (TypeError, ValueError):
                    continue
                if cat not in self.label_map.category_to_label or w <= 0 or h <= 0:
                    continue
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                                    "area": w * h, "iscrowd": ann.get("iscrowd", 0)})
                ann_id += 1
        coco = COCO()
        coco.dataset = {"images": images, "annotations": annotations, "categories": list(self.categories)}
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

