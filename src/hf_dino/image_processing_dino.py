# Copyright 2026 The hf_dino authors. Licensed under the Apache License, Version 2.0.
"""Image processors and post-processing for DINO (DETR with Improved deNoising anchOr boxes).

Two processors share one behaviour:

* :class:`DinoImageProcessor` (torchvision backend, the default of ``AutoImageProcessor``): tensors all the way,
  batched resize with ``torchvision``'s antialiased bilinear kernel, can run on a GPU (``device=...``). Its resized
  8-bit values differ from the original PIL resize by at most one level on a small fraction of the pixels
  (<= 0.0175 after normalisation).
* :class:`DinoImageProcessorPil` (PIL backend): resizes the 8-bit RGB image with PIL's bilinear filter exactly like
  the original DINO evaluation transform (``torchvision.transforms.functional.resize`` on a PIL image), so its output
  equals the original's up to float rounding.

Both use the original size rule (``datasets/transforms.py::get_size_with_aspect_ratio``): the long side is
truncated, not rounded, e.g. a 640x304 (WxH) image becomes 1332x633.

This module deliberately imports nothing from the modeling code.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    AnnotationFormat,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from .box_ops import box_cxcywh_to_xyxy, box_xywh_to_xyxy, box_xyxy_to_cxcywh


__all__ = [
    "DinoImageProcessor",
    "DinoImageProcessorPil",
    "get_dino_resize_output_size",
    "load_image_file",
    "post_process_object_detection",
]

_EXIF_ORIENTATION = 0x0112


class DinoImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_convert_annotations (`bool`, *optional*, defaults to `True`):
        Whether to convert the boxes of the annotations to normalized `(center_x, center_y, width, height)` relative to
        the resized, unpadded image (the convention of the original DINO and of `DinoForObjectDetection`). When
        `False`, boxes stay absolute `(x0, y0, x1, y1)` pixels of the resized image.
    format (`str`, *optional*, defaults to `"coco_detection"`):
        Annotation format; only COCO detection (`{"image_id", "annotations": [{"bbox", "category_id", ...}]}`) is
        supported (accepted for compatibility with the DETR-family processors).
    apply_exif_orientation (`bool`, *optional*, defaults to `True`):
        Whether to rotate/flip PIL images according to their EXIF orientation tag before processing. Set it to
        `False` for datasets whose annotations refer to the stored (un-rotated) pixels, as the original DINO code does
        (annotations next to an image that is turned upright raise a warning saying so).
    """

    do_convert_annotations: bool
    format: str | AnnotationFormat
    apply_exif_orientation: bool


# ----------------------------------------------------------------------------------------------------------------------
# Size rule
# ----------------------------------------------------------------------------------------------------------------------


def get_dino_resize_output_size(
    height: int, width: int, shortest_edge: int, longest_edge: int | None = None
) -> tuple[int, int]:
    """Output `(height, width)` of the original DINO resize (`RandomResize([shortest_edge], max_size=longest_edge)`).

    The short side becomes `shortest_edge`, unless the long side would then exceed `longest_edge`, in which case the
    short side becomes `int(round(longest_edge * short / long))`; the long side is `int(size * long / short)`
    (truncated). An image whose short side already has the target size is kept as is.

    As in the original, the long side can exceed `longest_edge` by a pixel or so through the rounding. Two guards only
    apply where the original would produce an empty image (aspect ratios beyond ~2666:1): the short side becomes 1
    pixel and the long side at most `longest_edge`.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"Cannot resize an empty image of size {height}x{width} (HxW).")
    w, h = width, height
    size = shortest_edge
    if longest_edge is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > longest_edge:
            size = int(round(longest_edge * min_original_size / max_original_size))
    degenerate = size < 1
    size = max(size, 1)

    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    if degenerate and longest_edge is not None:
        # only where the original would have produced an empty image
        oh, ow = min(oh, max(longest_edge, 1)), min(ow, max(longest_edge, 1))
    return (oh, ow)


def _output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    if size.shortest_edge:
        return get_dino_resize_output_size(height, width, size.shortest_edge, size.longest_edge)
    if size.height and size.width:
        return (size.height, size.width)
    raise ValueError(
        f"DINO image processors need `size` with 'shortest_edge' (and optionally 'longest_edge'), or 'height' and "
        f"'width'. Got {dict(size)}."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Image loading and conversion to 3-channel RGB
# ----------------------------------------------------------------------------------------------------------------------


def load_image_file(source: str | os.PathLike, timeout: float | None = None) -> PIL.Image.Image:
    """Open an image from a local path or an http(s) URL and decode it completely.

    The image keeps its mode and EXIF data (the processors convert it). Any failure (missing, empty, truncated or
    corrupt file, unknown format) raises a `ValueError` naming the source.
    """
    source = os.fspath(source)
    try:
        if source.startswith(("http://", "https://")):
            import httpx

            response = httpx.get(source, timeout=timeout, follow_redirects=True)
            response.raise_for_status()
            image = PIL.Image.open(io.BytesIO(response.content))
        else:
            if not os.path.isfile(source):
                raise FileNotFoundError("no such file")
            if os.path.getsize(source) == 0:
                raise ValueError("the file is empty (0 bytes)")
            image = PIL.Image.open(source)
        image.load()  # decode now so that truncated / corrupt data is reported here, with the file name
    except Exception as error:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"Cannot read image {source!r}: {error}") from error
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"Cannot read image {source!r}: empty image ({image.width}x{image.height})")
    return image


def _exif_orientation(image: PIL.Image.Image) -> int | None:
    """The EXIF orientation tag (1-8; 1 = upright), None when absent or unreadable (a broken EXIF block is ignored)."""
    try:
        return image.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # noqa: BLE001
        return None


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    if _exif_orientation(image) in (None, 1):
        return image
    try:
        return PIL.ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        return image


def _high_bit_depth_to_uint8(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    array = array.astype(np.float64)
    if sixteen_bit or array.max(initial=0) > 255:
        array = array / 257.0  # 0..65535 -> 0..255
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def pil_to_rgb(image: PIL.Image.Image, apply_exif_orientation: bool = True) -> PIL.Image.Image:
    """Any PIL image -> 8-bit RGB PIL image (EXIF orientation applied if asked).

    8-bit modes use PIL's own conversion (as the original `Image.open(...).convert("RGB")`: alpha is dropped, CMYK and
    palettes are converted). 16/32-bit integer modes are scaled to 8 bit (PIL would clip them at 255) and float ('F')
    images are taken as 0..1 when their maximum is <= 1, else as 0..255.
    """
    if apply_exif_orientation:
        image = _apply_exif_orientation(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        gray = _high_bit_depth_to_uint8(np.asarray(image), sixteen_bit=mode.startswith("I;16"))
        return PIL.Image.fromarray(gray).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if np.nanmax(array, initial=0) <= 1.0:
            array = array * 255.0
        gray = np.clip(np.round(np.nan_to_num(array)), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning about byte transparency in palettes
    try:
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"Cannot convert a PIL image of mode {mode!r} to RGB: {error}") from error


def _tensor_to_chw_rgb(image: torch.Tensor, input_data_format: ChannelDimension | str | None) -> torch.Tensor:
    """A [H, W], [C, H, W] or [H, W, C] array (C in 1..4) -> [3, H, W]; uint8 stays uint8, other ints are scaled."""
    if image.ndim == 2:
        image = image.unsqueeze(0)
        input_data_format = ChannelDimension.FIRST
    if image.ndim != 3:
        raise ValueError(f"Expected an image with 2 or 3 dimensions, got shape {tuple(image.shape)}.")
    if input_data_format is None:
        if image.shape[0] in (1, 2, 3, 4):
            input_data_format = ChannelDimension.FIRST
        elif image.shape[-1] in (1, 2, 3, 4):
            input_data_format = ChannelDimension.LAST
        else:
            raise ValueError(f"Cannot infer the channel dimension of an image of shape {tuple(image.shape)}.")
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        image = image.permute(2, 0, 1)
    channels = image.shape[0]
    if channels == 1:
        image = image.expand(3, -1, -1)
    elif channels == 2:  # gray + alpha
        image = image[:1].expand(3, -1, -1)
    elif channels == 4:  # RGBA: alpha dropped, as PIL's convert("RGB")
        image = image[:3]
    elif channels != 3:
        raise ValueError(f"Expected 1, 2, 3 or 4 channels, got an image of shape {tuple(image.shape)}.")
    if image.shape[-2] == 0 or image.shape[-1] == 0:
        raise ValueError(f"Cannot process an empty image of shape {tuple(image.shape)}.")

    if image.dtype == torch.uint8:
        pass
    elif image.dtype == torch.bool:
        image = image.to(torch.uint8) * 255
    elif not image.is_floating_point():
        wide = image.to(torch.int64)  # (uint16 & co. have no max kernel)
        if wide.numel() and int(wide.max()) > 255:  # 16-bit data: 0..65535 -> 0..255
            image = (wide.to(torch.float64) / 257.0).round().clamp(0, 255).to(torch.uint8)
        else:
            image = wide.clamp(0, 255).to(torch.uint8)
    elif image.dtype != torch.float32:
        image = image.to(torch.float32)
    return image.contiguous()


def to_chw_rgb_tensor(
    image: Any,
    input_data_format: ChannelDimension | str | None = None,
    apply_exif_orientation: bool = True,
) -> torch.Tensor:
    """PIL / numpy / torch image of any mode -> [3, H, W] tensor (uint8, or float32 for float inputs)."""
    if isinstance(image, PIL.Image.Image):
        rgb = pil_to_rgb(image, apply_exif_orientation=apply_exif_orientation)
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, torch.Tensor):
        return _tensor_to_chw_rgb(image, input_data_format)
    raise TypeError(f"Unsupported image type {type(image).__name__}; expected a PIL image, numpy array or tensor.")


# ----------------------------------------------------------------------------------------------------------------------
# Annotations (original `ConvertCocoPolysToMask` + resize + `Normalize` box conversion)
# ----------------------------------------------------------------------------------------------------------------------


def _is_integral(value: Any) -> bool:
    """An integer class id: a Python / numpy integer, a one-element integer tensor, or an integral float (1.0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and (not value.is_floating_point() or float(value).is_integer())
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def prepare_coco_detection_target(target: dict, height: int, width: int) -> dict[str, torch.Tensor]:
    """COCO-detection annotation of an image of `height` x `width` -> target with absolute xyxy `boxes`.

    As the original: crowd annotations are dropped, `[x, y, w, h]` becomes `[x0, y0, x1, y1]` clipped to the image,
    and boxes with non-positive width or height are dropped from every field at once.
    """
    if not isinstance(target, dict) or "annotations" not in target:
        raise ValueError(
            "Annotations must be COCO-detection dicts {'image_id': int, 'annotations': [{'bbox': [x, y, w, h], "
            f"'category_id': int, ...}}, ...]}}; got {type(target).__name__} with keys "
            f"{sorted(target) if isinstance(target, dict) else None}."
        )
    for k, obj in enumerate(target["annotations"]):
        bbox, category = (obj.get("bbox"), obj.get("category_id")) if isinstance(obj, dict) else (None, None)
        is_box = isinstance(bbox, (list, tuple, np.ndarray, torch.Tensor)) and len(bbox) == 4
        if not is_box or not _is_integral(category):
            raise ValueError(
                f"Annotation {k} of image {target.get('image_id', '?')} must be a dict with 'bbox' [x, y, w, h] (4 "
                f"numbers) and an integer 'category_id'; got {obj!r}."
            )
    annotations = [obj for obj in target["annotations"] if obj.get("iscrowd", 0) == 0]

    boxes = box_xywh_to_xyxy(torch.as_tensor([obj["bbox"] for obj in annotations], dtype=torch.float32).reshape(-1, 4))
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    classes = torch.as_tensor([obj["category_id"] for obj in annotations], dtype=torch.int64).reshape(-1)
    area = torch.as_tensor(
        [obj["area"] if "area" in obj else float(obj["bbox"][2]) * float(obj["bbox"][3]) for obj in annotations],
        dtype=torch.float32,
    ).reshape(-1)
    iscrowd = torch.as_tensor([obj.get("iscrowd", 0) for obj in annotations], dtype=torch.int64).reshape(-1)

    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    image_id = target.get("image_id", target.get("id", -1))
    return {
        "image_id": torch.as_tensor([image_id], dtype=torch.int64),
        "class_labels": classes[keep],
        "boxes": boxes[keep],
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": torch.as_tensor([int(height), int(width)], dtype=torch.int64),
        "size": torch.as_tensor([int(height), int(width)], dtype=torch.int64),
    }


def resize_target(target: dict, orig_size: Sequence[int], new_size: Sequence[int]) -> dict:
    """Scale absolute xyxy boxes and areas from `orig_size` (h, w) to `new_size` (h, w), as the original resize."""
    ratio_width = float(new_size[1]) / float(orig_size[1])
    ratio_height = float(new_size[0]) / float(orig_size[0])
    target = dict(target)
    target["boxes"] = target["boxes"] * torch.as_tensor([ratio_width, ratio_height, ratio_width, ratio_height])
    target["area"] = target["area"] * (ratio_width * ratio_height)
    target["size"] = torch.as_tensor([int(new_size[0]), int(new_size[1])], dtype=torch.int64)
    return target


def normalize_target_boxes(target: dict, size: Sequence[int]) -> dict:
    """Absolute xyxy -> `(cx, cy, w, h)` divided by the (unpadded) image width/height, as the original `Normalize`."""
    h, w = int(size[0]), int(size[1])
    target = dict(target)
    target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([w, h, w, h], dtype=torch.float32)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# Post-processing (original `PostProcess`)
# ----------------------------------------------------------------------------------------------------------------------


def _get_output(outputs: Any, *names: str) -> torch.Tensor:
    for name in names:
        value = getattr(outputs, name, None)
        if value is None and isinstance(outputs, dict):
            value = outputs.get(name)
        if value is not None:
            return value
    raise ValueError(f"Model outputs have none of {names}.")


def check_threshold(threshold: float | None) -> None:
    """A detection score threshold must be in [0, 1] (`None` keeps all); NaN, which kept everything, is refused."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a score in [0, 1] (0 or None keeps all top_k), got {threshold}.")


def post_process_object_detection(
    outputs: Any,
    threshold: float | None = 0.5,
    target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    top_k: int = 300,
) -> list[dict[str, torch.Tensor]]:
    """DINO's post-processing (`PostProcess(num_select=top_k)` of the original code).

    Sigmoid scores of every (query, class) pair, top-`top_k` over all of them (descending), boxes converted from
    normalized `(cx, cy, w, h)` to `(x0, y0, x1, y1)` and multiplied by `[w, h, w, h]` of `target_sizes`
    (`(height, width)` per image; the ORIGINAL image sizes to get boxes on the input images). Without `target_sizes`
    boxes stay normalized. Then detections with `score > threshold` are kept; `threshold=0` or `None` keeps all
    `top_k` (the original has no threshold). `labels` are class indices (raw COCO category ids for COCO models).

    `outputs` is a model output or a dict with `logits` `[B, Q, C]` and `pred_boxes` `[B, Q, 4]`, as torch tensors or
    numpy arrays (the outputs of an exported ONNX graph). Returns one `{"scores": [n], "labels": [n] int64,
    "boxes": [n, 4]}` dict of torch tensors per image.
    """
    # numpy arrays (e.g. onnxruntime outputs of an exported graph, hf_dino.export) are accepted as well
    logits = torch.as_tensor(_get_output(outputs, "logits", "pred_logits"))
    pred_boxes = torch.as_tensor(_get_output(outputs, "pred_boxes"))
    if logits.ndim != 3 or pred_boxes.ndim != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            f"Expected logits [B, Q, C] and pred_boxes [B, Q, 4], got {tuple(logits.shape)} / "
            f"{tuple(pred_boxes.shape)}."
        )
    batch_size, _, num_classes = logits.shape
    logits = logits.float()
    pred_boxes = pred_boxes.float()

    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 gives no detections), got {top_k}.")
    check_threshold(threshold)
    if target_sizes is not None:
        if len(target_sizes) != batch_size:
            raise ValueError(
                f"Pass as many target sizes as images: got {len(target_sizes)} target sizes for a batch of "
                f"{batch_size}."
            )
        if not isinstance(target_sizes, torch.Tensor):
            if not all(isinstance(s, (Sequence, np.ndarray, torch.Tensor)) and len(s) == 2 for s in target_sizes):
                raise ValueError(
                    "target_sizes must hold one (height, width) pair per image, e.g. [(480, 640)] for one image; "
                    f"got {target_sizes!r}."
                )
            target_sizes = torch.as_tensor([[int(s[0]), int(s[1])] for s in target_sizes], dtype=torch.int64)
        elif target_sizes.numel() != batch_size * 2:
            raise ValueError(f"target_sizes must be [batch, 2] = [{batch_size}, 2], got {tuple(target_sizes.shape)}.")
        target_sizes = target_sizes.reshape(batch_size, 2).to(pred_boxes.device)

    prob = logits.sigmoid()
    k = min(int(top_k), prob.shape[1] * num_classes)
    scores, topk_indexes = torch.topk(prob.view(batch_size, -1), k, dim=1)
    topk_boxes = torch.div(topk_indexes, num_classes, rounding_mode="floor")
    labels = topk_indexes % num_classes

    boxes = torch.gather(box_cxcywh_to_xyxy(pred_boxes), 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
    if target_sizes is not None:
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]

    results = []
    for s, l, b in zip(scores, labels, boxes):
        if threshold is not None and threshold > 0:
            keep = s > threshold
            s, l, b = s[keep], l[keep], b[keep]
        results.append({"scores": s, "labels": l, "boxes": b})
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Processors
# ----------------------------------------------------------------------------------------------------------------------


class _DinoProcessorMixin:
    """What both backends share: defaults, loading, annotation handling, post-processing."""

    valid_kwargs = DinoImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_pad = True
    do_convert_annotations = True
    format = AnnotationFormat.COCO_DETECTION
    apply_exif_orientation = True
    size = {"shortest_edge": 800, "longest_edge": 1333}
    default_to_square = False
    model_input_names = ["pixel_values", "pixel_mask"]

    def fetch_images(self, image_url_or_urls):
        """Paths and URLs -> PIL images (mode and EXIF kept, converted later); errors name the file."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(x) for x in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike)):
            return load_image_file(image_url_or_urls)
        return image_url_or_urls

    def _prepare_images_structure(self, images, expected_ndims: int = 3):
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("No images to process: pass one image or a non-empty list of images.")
        images = self.fetch_images(images)
        # single images, including 2-D (grayscale) arrays, which transformers' helper would reject
        if isinstance(images, PIL.Image.Image) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 2):
            return [images]
        if isinstance(images, (list, tuple)) and all(
            isinstance(x, PIL.Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim in (2, 3))
            for x in images
        ):
            return list(images)
        return make_flat_list_of_images(images, expected_ndims=expected_ndims)

    def preprocess(
        self,
        images,
        annotations: dict | list[dict] | None = None,
        **kwargs: Unpack[DinoImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Preprocess an image or a batch of images (and, optionally, their COCO-detection annotations).

        images: PIL images, numpy arrays or tensors (HWC or CHW, any of 1-4 channels, any dtype), paths or URLs.
        annotations: one `{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int, "area": float,
            "iscrowd": 0/1}, ...]}` dict per image. Returned as `labels`: one dict per image with `class_labels`,
            `boxes` (normalized `(cx, cy, w, h)` of the resized, unpadded image), `image_id`, `area` (scaled with the
            resize), `iscrowd`, `orig_size` and `size` (`[h, w]`).

        Returns a `BatchFeature` with `pixel_values` [B, 3, H, W] (padded at the bottom/right to the largest H and W of
        the batch), `pixel_mask` [B, H, W] (1 = real pixel, 0 = padding) and, with annotations, `labels`.

        A PIL image with an EXIF orientation is turned upright (`apply_exif_orientation`, default True), and its
        annotations are then read as boxes of the upright image; a warning says so whenever that happens, since
        COCO files (and the original DINO, which ignores EXIF) give boxes of the stored pixels, for which
        `apply_exif_orientation=False` is right.
        """
        if annotations is not None:
            images = self._prepare_images_structure(images)
            exif = kwargs.get("apply_exif_orientation")
            if self.apply_exif_orientation if exif is None else exif:
                self._warn_if_annotations_meet_exif_rotation(images)
        return super().preprocess(images, annotations, **kwargs)

    @staticmethod
    def _warn_if_annotations_meet_exif_rotation(images: list) -> None:
        rotated = [i for i, image in enumerate(images)
                   if isinstance(image, PIL.Image.Image) and _exif_orientation(image) not in (None, 1)]
        if rotated:
            warnings.warn(
                f"Image(s) {rotated[:5]}{' ...' if len(rotated) > 5 else ''} of this batch carry an EXIF orientation "
                "and are turned upright (apply_exif_orientation=True): their annotation boxes are read as boxes of the "
                "upright image. If they refer to the stored pixels (COCO files, the original DINO), pass "
                "apply_exif_orientation=False.",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _warn_if_rescaled_twice(images: Sequence[torch.Tensor | np.ndarray], do_rescale: bool) -> None:
        """As transformers' processors: float images whose values all lie in [0, 1] were most likely rescaled
        already; `do_rescale` divides them by 255 again (a near-black input, detections silently lost)."""
        if not do_rescale:
            return
        for image in images:
            if isinstance(image, torch.Tensor):
                floating = image.is_floating_point()
            else:
                floating = np.issubdtype(image.dtype, np.floating)
            if floating and float(image.max()) <= 1.0:
                warnings.warn(
                    "A float image with values in [0, 1] is rescaled by 1/255 (do_rescale=True), which makes it "
                    "near-black. If your images are already scaled to [0, 1], pass do_rescale=False (or give the "
                    "processor 0..255 values, uint8 or PIL images).",
                    UserWarning,
                    stacklevel=2,
                )
                return

    @staticmethod
    def _check_unpadded_sizes(resized_hw: list[tuple[int, int]], return_tensors) -> None:
        """`do_pad=False` keeps a list of images of different sizes, which no tensor of `return_tensors` can hold
        (transformers' own message then suggests a `padding=True` argument that image processors do not take)."""
        sizes = sorted(set(resized_hw))
        if return_tensors is not None and len(sizes) > 1:
            raise ValueError(
                f"do_pad=False keeps the images at their own sizes ({', '.join(f'{h}x{w}' for h, w in sizes[:3])}"
                f"{', ...' if len(sizes) > 3 else ''}), which cannot be stacked into one tensor "
                f"(return_tensors={str(return_tensors)!r}): pass do_pad=True (the model takes the pixel_mask) or "
                "return_tensors=None (a list of arrays, one per image)."
            )

    def _targets_for(self, annotations, images_hw, format=None):
        if annotations is None:
            return None
        if format is not None and AnnotationFormat(format) != AnnotationFormat.COCO_DETECTION:
            raise ValueError(f"DINO image processors only support COCO-detection annotations, got format={format!r}.")
        if isinstance(annotations, dict):
            annotations = [annotations]
        annotations = list(annotations)
        if len(annotations) != len(images_hw):
            raise ValueError(
                f"The number of images ({len(images_hw)}) and annotations ({len(annotations)}) do not match."
            )
        return [prepare_coco_detection_target(t, h, w) for t, (h, w) in zip(annotations, images_hw)]

    @staticmethod
    def _finish_targets(targets, resized_hw, do_resize, do_convert_annotations, return_tensors):
        if targets is None:
            return None
        finished = []
        for target, (h, w) in zip(targets, resized_hw):
            orig = target["orig_size"].tolist()
            if do_resize and (h, w) != tuple(orig):
                target = resize_target(target, orig, (h, w))
            if do_convert_annotations:
                target = normalize_target_boxes(target, (h, w))
            if return_tensors in (None, "pt", TensorType.PYTORCH):
                finished.append(BatchFeature(target))
            else:
                finished.append(BatchFeature(target, tensor_type=return_tensors))
        return finished

    def post_process_object_detection(
        self,
        outputs,
        threshold: float | None = 0.5,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        top_k: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """Original DINO `PostProcess` (top-`top_k` over queries x classes of the sigmoid scores; `num_select=300`).

        Args:
            outputs: model outputs (or a dict) with `logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalized cx, cy,
                w, h), torch tensors or numpy arrays (onnxruntime outputs of an exported graph).
            threshold: keep detections with `score > threshold`; `0` (or `None`) keeps all `top_k`, exactly as the
                original `PostProcess`.
            target_sizes: `(height, width)` of each image ([B, 2] tensor or list of pairs) to get absolute pixel
                boxes; usually the ORIGINAL image sizes. `None` keeps normalized coordinates.
            top_k: number of (query, class) candidates kept per image before thresholding.

        Returns:
            One dict per image with `scores`, `labels` (class ids) and `boxes` (`x0, y0, x1, y1`).
        """
        return post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k)


class DinoImageProcessor(_DinoProcessorMixin, TorchvisionBackend):
    r"""
    DINO image processor (torchvision backend).

    Resize (shortest edge 800, longest 1333, the original truncating size rule; antialiased bilinear on the 8-bit
    image), rescale (1/255), normalize (ImageNet mean/std), pad every image at the bottom/right to the largest height
    and width of the batch, and return a `pixel_mask` (1 = real pixel). Inputs of any mode (RGBA, LA, L, P, I;16,
    CMYK, ...) are converted to RGB and the EXIF orientation is applied. COCO-detection annotations become the
    `labels` expected by `DinoForObjectDetection`.

    Its values are within one 8-bit level (<= 0.0175 after normalisation) of the original evaluation transform; use
    [`DinoImageProcessorPil`] (`AutoImageProcessor.from_pretrained(..., backend="pil")`) to reproduce the original's
    PIL resize exactly.
    """

    def __init__(self, **kwargs: Unpack[DinoImageProcessorKwargs]) -> None:
        kwargs.setdefault("do_pad", kwargs.pop("pad_and_return_pixel_mask", self.do_pad))
        super().__init__(**kwargs)

    def process_image(
        self,
        image,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: torch.device | str | None = None,
        apply_exif_orientation: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if apply_exif_orientation is None:
            apply_exif_orientation = self.apply_exif_orientation
        image = to_chw_rgb_tensor(image, input_data_format, apply_exif_orientation)
        if device is not None:
            image = image.to(device)
        return image

    def resize(self, image: torch.Tensor, size: SizeDict, resample=None, antialias: bool = True, **kwargs):
        """Resize a [..., C, H, W] tensor with the original DINO size rule (antialiased bilinear by default)."""
        new_size = _output_size(image.shape[-2], image.shape[-1], size)
        if tuple(new_size) == tuple(image.shape[-2:]):
            return image
        if tuple(new_size) == (1, 1) and antialias and image.dtype == torch.uint8:
            # torch's antialiased uint8 kernel fails an internal assert for a 1x1 output (a tiny `size`, or a TTA scale
            # near 0): resize in float32 and round as the uint8 kernel does
            resized = super().resize(image.float(), SizeDict(height=1, width=1), resample=resample, antialias=True)
            return resized.round_().clamp_(0, 255).to(torch.uint8)
        return super().resize(
            image, SizeDict(height=new_size[0], width=new_size[1]), resample=resample, antialias=antialias
        )

    def _preprocess(
        self,
        images: list[torch.Tensor],
        annotations,
        do_resize: bool,
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool,
        pad_size: SizeDict | None,
        do_convert_annotations: bool | None = None,
        return_tensors: str | TensorType | None = None,
        disable_grouping: bool | None = None,
        **kwargs,
    ) -> BatchFeature:
        if do_convert_annotations is None:
            do_convert_annotations = self.do_convert_annotations
        self._warn_if_rescaled_twice(images, do_rescale)
        targets = self._targets_for(annotations, [tuple(img.shape[-2:]) for img in images], kwargs.get("format"))

        grouped_images, grouped_index = group_images_by_shape(images, disable_grouping=disable_grouping)
        processed = {}
        for shape, stacked in grouped_images.items():
            if do_resize:
                stacked = self.resize(stacked, size=size, resample=resample)
            processed[shape] = self.rescale_and_normalize(
                stacked, do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
        images = reorder_images(processed, grouped_index)
        resized_hw = [tuple(img.shape[-2:]) for img in images]

        data = {}
        if do_pad:
            if pad_size is not None:
                padded_hw = (pad_size.height, pad_size.width)
            else:
                padded_hw = (max(h for h, _ in resized_hw), max(w for _, w in resized_hw))
            padded, masks = [], []
            for img, (h, w) in zip(images, resized_hw):
                if h > padded_hw[0] or w > padded_hw[1]:
                    raise ValueError(f"pad_size {padded_hw} is smaller than a resized image ({h}, {w}).")
                padded.append(tvF.pad(img, [0, 0, padded_hw[1] - w, padded_hw[0] - h], fill=0))
                mask = torch.zeros(padded_hw, dtype=torch.int64, device=img.device)
                mask[:h, :w] = 1
                masks.append(mask)
            data["pixel_values"] = torch.stack(padded)
            data["pixel_mask"] = torch.stack(masks)
        else:
            self._check_unpadded_sizes(resized_hw, return_tensors)
            same = len(set(resized_hw)) == 1
            data["pixel_values"] = torch.stack(images) if same else images

        encoded = BatchFeature(data, tensor_type=return_tensors)
        labels = self._finish_targets(targets, resized_hw, do_resize, do_convert_annotations, return_tensors)
        if labels is not None:
            encoded["labels"] = labels
        return encoded


class DinoImageProcessorPil(_DinoProcessorMixin, PilBackend):
    r"""
    DINO image processor (PIL backend) reproducing the original evaluation transform exactly.

    Same behaviour and arguments as [`DinoImageProcessor`], but 8-bit images are resized with PIL's bilinear filter
    (`PIL.Image.resize`, what `torchvision.transforms.functional.resize` does on the PIL images of the original data
    pipeline), then divided by 255 and normalized in float32 like `ToTensor` + `Normalize`. The output equals the
    original's up to float rounding (~1e-7).
    """

    def __init__(self, **kwargs: Unpack[DinoImageProcessorKwargs]) -> None:
        kwargs.setdefault("do_pad", kwargs.pop("pad_and_return_pixel_mask", self.do_pad))
        super().__init__(**kwargs)

    def process_image(
        self,
        image,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        apply_exif_orientation: bool | None = None,
        **kwargs,
    ) -> np.ndarray:
        if apply_exif_orientation is None:
            apply_exif_orientation = self.apply_exif_orientation
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu()
        return to_chw_rgb_tensor(image, input_data_format, apply_exif_orientation).numpy()

    def resize(self, image: np.ndarray, size: SizeDict, resample=None, **kwargs) -> np.ndarray:
        """Resize a [C, H, W] array with PIL (bilinear by default) and the original DINO size rule."""
        new_h, new_w = _output_size(image.shape[-2], image.shape[-1], size)
        if (new_h, new_w) == tuple(image.shape[-2:]):
            return image
        resample = PILImageResampling.BILINEAR if resample is None else resample
        if not isinstance(resample, (PILImageResampling, int)):
            from transformers.image_utils import torch_pil_interpolation_mapping

            resample = torch_pil_interpolation_mapping[resample]
        if image.dtype == np.uint8 and image.shape[0] == 3:
            pil = PIL.Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
            return np.asarray(pil.resize((new_w, new_h), resample)).transpose(2, 0, 1).copy()
        channels = [
            np.asarray(PIL.Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize((new_w, new_h), resample))
            for c in image
        ]
        return np.stack(channels).astype(np.float32)

    def _preprocess(
        self,
        images: list[np.ndarray],
        annotations,
        do_resize: bool,
        size: SizeDict,
        resample,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_pad: bool,
        pad_size: SizeDict | None,
        do_convert_annotations: bool | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        if do_convert_annotations is None:
            do_convert_annotations = self.do_convert_annotations
        self._warn_if_rescaled_twice(images, do_rescale)
        targets = self._targets_for(annotations, [tuple(img.shape[-2:]) for img in images], kwargs.get("format"))
        mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1) if do_normalize else None
        std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1) if do_normalize else None

        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image, size=size, resample=resample)
            image = image.astype(np.float32)
            if do_rescale:
                if rescale_factor == 1 / 255:
                    image = image / np.float32(255)  # exactly `ToTensor`'s division
                else:
                    image = image * np.float32(rescale_factor)
            if do_normalize:
                image = (image - mean) / std
            processed.append(image)
        resized_hw = [tuple(img.shape[-2:]) for img in processed]

        data = {}
        if do_pad:
            if pad_size is not None:
                padded_hw = (pad_size.height, pad_size.width)
            else:
                padded_hw = (max(h for h, _ in resized_hw), max(w for _, w in resized_hw))
            pixel_values = np.zeros((len(processed), 3, *padded_hw), dtype=np.float32)
            pixel_mask = np.zeros((len(processed), *padded_hw), dtype=np.int64)
            for i, (img, (h, w)) in enumerate(zip(processed, resized_hw)):
                if h > padded_hw[0] or w > padded_hw[1]:
                    raise ValueError(f"pad_size {padded_hw} is smaller than a resized image ({h}, {w}).")
                pixel_values[i, :, :h, :w] = img
                pixel_mask[i, :h, :w] = 1
            data["pixel_values"] = pixel_values
            data["pixel_mask"] = pixel_mask
        else:
            self._check_unpadded_sizes(resized_hw, return_tensors)
            data["pixel_values"] = np.stack(processed) if len(set(resized_hw)) == 1 else processed

        encoded = BatchFeature(data, tensor_type=return_tensors)
        labels = self._finish_targets(targets, resized_hw, do_resize, do_convert_annotations, return_tensors)
        if labels is not None:
            encoded["labels"] = labels
        return encoded
