"""DINO's training augmentation (the paper's / original ``datasets/coco.py`` recipe) with ``torchvision.transforms.v2``.

Training::

    RandomHorizontalFlip(0.5)
    RandomChoice(
        RandomResize(scales, max_size),                              # shorter side in 480..800 step 32, longer <= 1333
        Compose(RandomResize(crop_resize_scales),                    # 400 / 500 / 600
                RandomSizeCrop(*crop_size),                          # random crop, each side in [384, 600]
                RandomResize(scales, max_size)),
    )
    ClampBoundingBoxes()
    RemoveEmptyBoxes()                                               # drop boxes cropped away (no width or height)

Evaluation: ``RandomResize([800], 1333)`` (deterministic; the same size rule as ``DinoImageProcessor``).

Boxes travel as ``tv_tensors.BoundingBoxes`` (absolute XYXY); labels under the ``"labels"`` key of the target
dict so that ``RemoveEmptyBoxes`` drops them together. Images are uint8 ``tv_tensors.Image`` ``[3, H, W]``;
normalisation and padding happen in the collate function.

All random draws go through ``torch``'s global generator; the data sets seed it per sample (see
``DetectionDataset``), so augmentation is reproducible and independent of worker processes and resumption.

``scale`` multiplies every size of the recipe (as the original's ``data_aug_scale_overlap``, but rounded where the
original truncates, and at least 8 pixels: sizes can differ from the original's by one pixel), e.g. ``scale=0.2``
for 128-pixel synthetic images.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "DEFAULT_SCALES",
    "RandomResize",
    "RandomSizeCrop",
    "RemoveEmptyBoxes",
    "make_train_transforms",
    "make_eval_transforms",
    "scaled_recipe",
]

DEFAULT_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))  # 480, 512, ..., 800
DEFAULT_MAX_SIZE = 1333
DEFAULT_CROP_RESIZE_SCALES: tuple[int, ...] = (400, 500, 600)
DEFAULT_CROP_SIZE: tuple[int, int] = (384, 600)
DEFAULT_EVAL_SIZE = 800


class RandomResize(v2.Transform):
    """Resize so that the shorter side is a size drawn uniformly from ``sizes`` and the longer side at most
    ``max_size``, with the original DINO size rule (:func:`hf_dino.image_processing_dino.get_dino_resize_output_size`:
    the shorter side is exactly the drawn size unless the longer side caps it; the longer side is truncated), the
    same rule as ``DinoImageProcessor``. Bilinear, antialiased; boxes are scaled with the image.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        if not self.sizes:
            raise ValueError("RandomResize needs at least one size")
        self.max_size = int(max_size) if max_size else None

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        from ..image_processing_dino import get_dino_resize_output_size

        height, width = v2.query_size(flat_inputs)
        size = self.sizes[_randint(0, len(self.sizes) - 1)] if len(self.sizes) > 1 else self.sizes[0]
        return dict(size=list(get_dino_resize_output_size(height, width, size, self.max_size)))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)

    _get_params = make_params
    _transform = transform


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose width and height are drawn uniformly in ``[min_size, min(image side, max_size)]``
    (the original ``RandomSizeCrop``); the region's position is uniform. Boxes are cropped with the image (use
    ``RemoveEmptyBoxes`` afterwards to drop the ones that fall outside).
    """

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if min_size < 1 or max_size < min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = _randint(min(self.min_size, width), min(width, self.max_size))
        crop_h = _randint(min(self.min_size, height), min(height, self.max_size))
        top = _randint(0, height - crop_h)
        left = _randint(0, width - crop_w)
        return dict(top=top, left=left, height=crop_h, width=crop_w)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)

    # torchvision < 0.21 names
    _get_params = make_params
    _transform = transform


def _randint(low: int, high: int) -> int:
    """Uniform integer in ``[low, high]`` (inclusive) from torch's global generator."""
    return int(torch.randint(low, high + 1, ()).item())


class RemoveEmptyBoxes:
    """Drop the boxes without width or height (``x1 <= x0`` or ``y1 <= y0``, e.g. cropped away) and the matching
    rows of every other per-box tensor of the target (``"labels"``), as the original's crop does. Boxes thinner than
    a pixel stay, as in the original; torchvision's ``SanitizeBoundingBoxes`` cannot keep them (``min_size >= 1``).
    Takes and returns ``(image, target)``."""

    def __call__(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if bool(keep.all()):
            return image, target
        count = boxes.shape[0]
        target = {
            key: value[keep] if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == count
            else value
            for key, value in target.items()
        }
        target["boxes"] = tv_tensors.wrap(target["boxes"], like=boxes)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def scaled_recipe(scale: float = 1.0, eval_size: int | None = None) -> dict[str, Any]:
    """The recipe's sizes multiplied by ``scale`` (at least 8 pixels each)."""

    def s(value: float) -> int:
        return max(8, int(round(value * scale)))

    return dict(
        scales=tuple(sorted({s(v) for v in DEFAULT_SCALES})),
        max_size=s(DEFAULT_MAX_SIZE),
        crop_resize_scales=tuple(sorted({s(v) for v in DEFAULT_CROP_RESIZE_SCALES})),
        crop_size=(s(DEFAULT_CROP_SIZE[0]), s(DEFAULT_CROP_SIZE[1])),
        eval_size=s(DEFAULT_EVAL_SIZE) if eval_size is None else int(eval_size),
    )


def make_train_transforms(
    scales: Sequence[int] = DEFAULT_SCALES,
    max_size: int = DEFAULT_MAX_SIZE,
    crop_resize_scales: Sequence[int] = DEFAULT_CROP_RESIZE_SCALES,
    crop_size: tuple[int, int] | None = DEFAULT_CROP_SIZE,
    hflip_prob: float = 0.5,
    **_: Any,
) -> v2.Compose:
    """The training augmentation of the paper (see the module docstring). Takes ``(image, target)`` with
    ``target = {"boxes": BoundingBoxes, "labels": Tensor, ...}``. ``crop_size=None`` leaves out the
    resize-crop-resize branch (flip + random resize only)."""
    scales = [int(v) for v in scales]
    if crop_size is None:  # flip + random resize only
        return v2.Compose([v2.RandomHorizontalFlip(p=hflip_prob), RandomResize(scales, max_size=max_size),
                           v2.ClampBoundingBoxes(), RemoveEmptyBoxes()])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=hflip_prob),
            v2.RandomChoice(
                [
                    RandomResize(scales, max_size=max_size),
                    v2.Compose(
                        [
                            RandomResize(crop_resize_scales),
                            RandomSizeCrop(*crop_size),
                            RandomResize(scales, max_size=max_size),
                        ]
                    ),
                ]
            ),
            v2.ClampBoundingBoxes(),
            RemoveEmptyBoxes(),
        ]
    )


def make_eval_transforms(eval_size: int = DEFAULT_EVAL_SIZE, max_size: int = DEFAULT_MAX_SIZE, **_: Any) -> v2.Compose:
    """Evaluation resize: shorter side ``eval_size``, longer side at most ``max_size`` (the processor's rule)."""
    return v2.Compose(
        [
            RandomResize([eval_size], max_size=max_size),
            v2.ClampBoundingBoxes(),
        ]
    )
