"""Detection data sets for training and evaluating DINO: COCO-format folders and the shared sample logic.

Every data set yields ``(image, target)`` where ``image`` is a uint8 tensor ``[3, H, W]`` (after augmentation) and
``target`` holds

* ``class_labels`` int64 ``[n]`` (model label ids, see :class:`LabelMap`),
* ``boxes`` float32 ``[n, 4]`` normalized ``(cx, cy, w, h)`` of the augmented image,
* ``image_id`` (the COCO image id), ``orig_size`` ``(h, w)`` of the stored image, ``size`` ``(h, w)`` after
  augmentation.

Index it with an int, or with ``(index, seed)`` to seed the augmentation of that one sample (what
:class:`hf_dino.training.ResumableBatchSampler` does, so that augmentation is reproducible, independent of the number of
workers, and identical after ``--resume``).

Bad data is reported when the data set is built, not deep inside the loss:

===========================  ==========================================================================================
problem                      behaviour
===========================  ==========================================================================================
missing / unreadable image   ``missing_images="error"`` (default): ``FileNotFoundError`` naming the files;
                             ``"skip"``: the images are left out (a warning says how many).
unknown category id          ``unknown_categories="error"`` (default): ``ValueError`` naming the ids and annotations;
                             ``"ignore"``: those annotations are dropped (a warning says how many).
zero-area / degenerate box   dropped (fix-up, counted in the warning): ``w <= 0`` or ``h <= 0``, NaN/inf, not 4 numbers.
box partly outside image     clipped to the image (fix-up, counted); entirely outside: dropped.
image without annotations    kept as a negative sample (empty target) by default; ``empty_images="skip"`` drops it.
``iscrowd=1`` annotation     not a training target (as in DETR/DINO); it stays in the ground truth for evaluation.
image size != annotation     ``ValueError`` naming the file when the sample is loaded (boxes would be wrong).
===========================  ==========================================================================================

:meth:`DetectionDataset.report` returns the counts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from ..box_ops import box_xyxy_to_cxcywh
from ..image_processing_dino import pil_to_rgb

logger = logging.getLogger(__name__)

__all__ = [
    "LabelMap",
    "build_label_map",
    "clean_annotations",
    "DetectionDataset",
    "CocoDetectionDataset",
]


# ----------------------------------------------------------------------------------------------------------------------
# Label maps
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LabelMap:
    """How data-set category ids become model label ids.

    ``mode="contiguous"``: the N categories, sorted by id, become labels ``0..N-1`` (fine-tuning on N classes).
    ``mode="category_id"``: label = category id (DINO's COCO convention: 91 labels, unused ids named "N/A"), so a
    converted COCO checkpoint is used as is. The labels are ``0..max id`` (the ids no category uses named "N/A"),
    or ``label_space`` when given: a model's ``id2label`` that already names every category at its id (a COCO model
    fine-tuned on some of its classes keeps its 91 labels, hence its trained classifier rows).
    """

    category_ids: list[int]
    category_names: list[str]
    mode: str = "contiguous"
    label_space: Mapping[int, str] | None = None
    category_to_label: dict[int, int] = field(init=False)
    id2label: dict[int, str] = field(init=False)

    def __post_init__(self):
        if self.mode == "contiguous":
            self.category_to_label = {c: i for i, c in enumerate(self.category_ids)}
            self.id2label = {i: n for i, n in enumerate(self.category_names)}
        elif self.mode == "category_id":
            self.category_to_label = {c: c for c in self.category_ids}
            if self.label_space is not None:
                if not self.matches(self.label_space):
                    raise ValueError("label_space must name every category at its id (see LabelMap.matches).")
                self.id2label = {int(k): str(v) for k, v in sorted(self.label_space.items(), key=lambda kv: int(kv[0]))}
            else:
                num = max(self.category_ids) + 1 if self.category_ids else 1
                names = dict(zip(self.category_ids, self.category_names))
                self.id2label = {i: names.get(i, "N/A") for i in range(num)}
        else:
            raise ValueError(f"label map mode must be 'contiguous' or 'category_id', got {self.mode!r}")
        if self.label_space is not None and self.mode != "category_id":
            raise ValueError("label_space is for mode='category_id' only.")

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, name in self.id2label.items():
            out.setdefault(name, i)
        return out

    @property
    def label_to_category_id(self) -> dict[int, int] | None:
        """For :class:`hf_dino.evaluation.CocoEvaluator`: ``None`` when labels are category ids."""
        if self.mode == "category_id":
            return None
        return {label: cat for cat, label in self.category_to_label.items()}

    def matches(self, id2label: Mapping[int, str]) -> bool:
        """Whether a model's ``id2label`` already has every category at this map's label id, with the same name."""
        given = {int(k): str(v).strip().lower() for k, v in id2label.items()}
        for cat, name in zip(self.category_ids, self.category_names):
            if given.get(self.category_to_label[cat]) != str(name).strip().lower():
                return False
        return True


def build_label_map(
    categories: Iterable[Mapping[str, Any]], mode: str = "contiguous", label_space: Mapping[int, str] | None = None
) -> LabelMap:
    """A :class:`LabelMap` from COCO ``categories`` entries (``{"id", "name"}``); ``label_space``: see `LabelMap`."""
    cats = sorted({int(c["id"]): str(c.get("name", c["id"])) for c in categories}.items())
    if not cats:
        raise ValueError("The data set defines no category.")
    if mode == "category_id" and cats[0][0] < 0:
        raise ValueError("mode='category_id' needs non-negative category ids.")
    return LabelMap([c for c, _ in cats], [n for _, n in cats], mode=mode, label_space=label_space)


# ----------------------------------------------------------------------------------------------------------------------
# Annotation cleaning
# ----------------------------------------------------------------------------------------------------------------------


def clean_annotations(
    annotations: Sequence[Mapping[str, Any]],
    width: int | None,
    height: int | None,
    category_to_label: Mapping[int, int],
    unknown_categories: str = "error",
    issues: Counter | None = None,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """COCO annotations (``bbox`` xywh pixels, ``category_id``, optional ``iscrowd``) -> ``(boxes xyxy [n, 4],
    labels [n])`` ready for augmentation. Crowd, degenerate and (with ``unknown_categories="ignore"``) unknown-category
    annotations are dropped, boxes are clipped to ``width x height`` when known. ``issues`` counts what was fixed.
    """
    issues = Counter() if issues is None else issues
    boxes, labels = [], []
    for ann in annotations:
        if ann.get("iscrowd", 0):
            issues["crowd"] += 1
            continue
        category = ann.get("category_id")
        try:
            category = int(category)
        except (TypeError, ValueError):
            category = None
        if category not in category_to_label:
            if unknown_categories == "ignore":
                issues["unknown_category"] += 1
                continue
            raise ValueError(
                f"Annotation {ann.get('id', '?')}{where} has category id {ann.get('category_id')!r}, which is not a "
                f"category of the data set (known ids: {sorted(category_to_label)[:20]}...). Fix the annotation file "
                "or pass unknown_categories='ignore' (--ignore-unknown-categories) to drop such annotations."
            )
        bbox = ann.get("bbox")
        try:
            x, y, w, h = (float(v) for v in bbox)
        except (TypeError, ValueError):
            issues["invalid_box"] += 1
            continue
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            issues["invalid_box"] += 1
            continue
        if w <= 0 or h <= 0:
            issues["zero_area_box"] += 1
            continue
        x0, y0, x1, y1 = x, y, x + w, y + h
        if width is not None and height is not None:
            cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
            cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
            if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
                issues["box_outside_image"] += 1
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                issues["box_clipped"] += 1
            x0, y0, x1, y1 = cx0, cy0, cx1, cy1
        boxes.append([x0, y0, x1, y1])
        labels.append(category_to_label[category])
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64).reshape(-1),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Base data set
# ----------------------------------------------------------------------------------------------------------------------


class DetectionDataset(torch.utils.data.Dataset):
    """Shared logic: seeded augmentation of one sample and conversion of the target to the model's format.

    Subclasses implement ``__len__``, ``load_image(index) -> PIL.Image`` and ``raw_target(index) -> (image_id,
    width | None, height | None, annotations)``.
    """

    label_map: LabelMap
    transforms: Callable | None
    unknown_categories: str = "error"

    def load_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def raw_target(self, index: int) -> tuple[int, int | None, int | None, list[dict]]:  # pragma: no cover
        raise NotImplementedError

    def image_id(self, index: int) -> int:
        return self.raw_target(index)[0]

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            index, seed = int(key[0]), key[1]
        else:
            index, seed = int(key), None
        image = self.load_image(index)
        image_id, ann_w, ann_h, annotations = self.raw_target(index)
        width, height = image.size
        if ann_w is not None and ann_h is not None and (int(ann_w), int(ann_h)) != (width, height):
            raise ValueError(
                f"Image {image_id} ({self.describe(index)}) is {width}x{height} pixels but its annotation says "
                f"{ann_w}x{ann_h}; its boxes would be misplaced. Fix the 'width'/'height' of the annotation file."
            )
        boxes, labels = clean_annotations(
            annotations, width, height, self.label_map.category_to_label, self.unknown_categories,
            where=f" of image {image_id}",
        )
        pixels = tv_tensors.Image(F.pil_to_tensor(image))
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
        }
        if self.transforms is not None:
            if seed is None:
                pixels, target = self.transforms(pixels, target)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seed))
                    pixels, target = self.transforms(pixels, target)
        new_h, new_w = pixels.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor).float()
        # normalized (cx, cy, w, h); the boxes are inside the image after clamping, and those without width or
        # height were removed
        boxes = boxes.clamp(min=0)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(max=new_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(max=new_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels = boxes[keep], target["labels"][keep]
        cxcywh = (box_xyxy_to_cxcywh(boxes) / torch.tensor([new_w, new_h, new_w, new_h], dtype=boxes.dtype)).reshape(-1, 4)
        return pixels.as_subclass(torch.Tensor), {
            "image_id": int(image_id),
            "class_labels": labels.to(torch.int64),
            "boxes": cxcywh.float(),
            "orig_size": (height, width),
            "size": (int(new_h), int(new_w)),
        }

    def describe(self, index: int) -> str:
        return f"index {index}"

    # filled by subclasses
    issues: Counter

    def report(self) -> dict[str, int]:
        """Counts of the problems found and fixed when the data set was built (see the module docstring)."""
        return dict(self.issues)

    def _warn_issues(self, name: str) -> None:
        fixed = {k: v for k, v in self.issues.items() if k not in ("crowd", "image_without_annotations", "missing_image") and v}
        if fixed:
            details = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(fixed.items()))
            message = (
                f"{name}: fixed up bad annotations ({details}). Boxes partly outside an image are clipped; zero-area, "
                "invalid, outside-the-image and unknown-category boxes are dropped."
            )
            warnings.warn(message, stacklevel=3)
        if self.issues.get("image_without_annotations"):
            logger.info("%s: %d images without (usable) annotations", name, self.issues["image_without_annotations"])


# ----------------------------------------------------------------------------------------------------------------------
# COCO-format folder
# ----------------------------------------------------------------------------------------------------------------------


def load_coco(annotation_file: str | os.PathLike):
    """``pycocotools.coco.COCO`` for ``annotation_file``, without its prints; a clear error for a bad file."""
    from pycocotools.coco import COCO

    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(annotation_file))
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"Cannot read COCO annotation file {annotation_file}: {error}") from error
    for key in ("images", "categories"):
        if key not in coco.dataset:
            raise ValueError(f"{annotation_file} is not a COCO detection file: it has no {key!r} list.")
    coco.dataset.setdefault("annotations", [])
    return coco


class CocoDetectionDataset(DetectionDataset):
    """A COCO-format folder: ``images_dir`` holding the ``file_name`` of every image of ``annotation_file``.

    Args:
        images_dir: folder of the images.
        annotation_file: COCO instances JSON (``images``, ``annotations`` with ``bbox`` xywh, ``categories``).
        transforms: a ``transforms.v2`` callable on ``(image, {"boxes", "labels"})`` (see
            :mod:`hf_dino.data.transforms`), or ``None``.
        label_map: a :class:`LabelMap`; by default built from the file's categories (``label_map_mode``).
        missing_images, unknown_categories, empty_images: bad-data policies (module docstring).
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Callable | None = None,
        label_map: LabelMap | None = None,
        label_map_mode: str = "contiguous",
        missing_images: str = "error",
        unknown_categories: str = "error",
        empty_images: str = "keep",
    ):
        _check_choice("missing_images", missing_images, ("error", "skip"))
        _check_choice("unknown_categories", unknown_categories, ("error", "ignore"))
        _check_choice("empty_images", empty_images, ("keep", "skip"))
        self.images_dir = str(images_dir)
        self.annotation_file = str(annotation_file)
        if not os.path.isdir(self.images_dir):
            raise FileNotFoundError(f"Image folder not found: {self.images_dir}")
        self.coco = load_coco(annotation_file)
        self.transforms = transforms
        self.unknown_categories = unknown_categories
        self.label_map = label_map or build_label_map(self.coco.dataset["categories"], label_map_mode)
        self.issues = Counter()

        image_ids = sorted(self.coco.imgs)
        missing = [i for i in image_ids if not os.path.isfile(os.path.join(self.images_dir, self.coco.imgs[i]["file_name"]))]
        if missing:
            names = ", ".join(self.coco.imgs[i]["file_name"] for i in missing[:5])
            if missing_images == "error":
                raise FileNotFoundError(
                    f"{len(missing)} of the {len(image_ids)} images listed in {self.annotation_file} are not in "
                    f"{self.images_dir} (e.g. {names}). Check --train-images/--val-images, or pass "
                    "missing_images='skip' (--skip-missing-images) to leave them out."
                )
            warnings.warn(f"Leaving out {len(missing)} images missing from {self.images_dir} (e.g. {names}).", stacklevel=2)
            self.issues["missing_image"] += len(missing)
            missing_set = set(missing)
            image_ids = [i for i in image_ids if i not in missing_set]

        # validate every annotation now (clear errors early, counts of the fix-ups)
        kept = []
        for image_id in image_ids:
            info = self.coco.imgs[image_id]
            anns = self.coco.imgToAnns.get(image_id, [])
            boxes, _ = clean_annotations(
                anns, info.get("width"), info.get("height"), self.label_map.category_to_label, unknown_categories,
                issues=self.issues, where=f" of image {image_id} ({info['file_name']})",
            )
            if len(boxes) == 0:
                self.issues["image_without_annotations"] += 1
                if empty_images == "skip":
                    continue
            kept.append(image_id)
        if not kept:
            raise ValueError(f"No usable image in {self.annotation_file} / {self.images_dir}.")
        self.ids = kept
        self._warn_issues(os.path.basename(self.annotation_file))

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, index: int) -> str:
        return os.path.join(self.images_dir, self.coco.imgs[self.ids[index]]["file_name"])

    def load_image(self, index: int) -> Image.Image:
        path = self.describe(index)
        try:
            with Image.open(path) as image:
                image.load()
                # 16/32-bit and float images scaled to 8 bit as the processor does (PIL's convert clips them at 255);
                # no EXIF rotation: the boxes refer to the stored pixels, as in the original
                return pil_to_rgb(image, apply_exif_orientation=False)
        except (OSError, ValueError) as error:
            raise OSError(f"Cannot read image {path} (image id {self.ids[index]}): {error}") from error

    def coco_ground_truth(self):
        """The ``pycocotools.coco.COCO`` of the annotation file (ground truth for evaluation)."""
        return self.coco

    def raw_target(self, index: int):
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        return image_id, info.get("width"), info.get("height"), self.coco.imgToAnns.get(image_id, [])


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
