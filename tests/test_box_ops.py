"""`hf_dino.box_ops`: box conversions against hand-written float64 formulas, and the validation of training labels
(the one check the model runs per forward pass)."""

from __future__ import annotations

import pytest
import torch

from hf_dino.box_ops import (
    box_cxcywh_to_xyxy,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    check_detection_labels,
)


def test_conversions_match_the_formulas_and_invert():
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.cat([torch.rand(7, 2, generator=g), torch.rand(7, 2, generator=g) * 0.5], 1).double()
    cx, cy, w, h = cxcywh.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
    xywh = torch.stack([cx - w / 2, cy - h / 2, w, h], -1)
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy, rtol=0, atol=1e-12)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh, rtol=0, atol=1e-12)
    torch.testing.assert_close(box_xyxy_to_xywh(xyxy), xywh, rtol=0, atol=1e-12)
    torch.testing.assert_close(box_xywh_to_xyxy(xywh), xyxy, rtol=0, atol=1e-12)
    # any leading shape, e.g. [B, Q, 4] predictions
    assert box_cxcywh_to_xyxy(cxcywh.view(1, 7, 4)).shape == (1, 7, 4)


def _labels():
    g = torch.Generator().manual_seed(1)
    return [
        {"class_labels": torch.tensor([0, 3, 6]), "boxes": torch.cat([torch.rand(3, 2, generator=g) * 0.6 + 0.2,
                                                                      torch.rand(3, 2, generator=g) * 0.3], 1)},
        {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]


def test_valid_labels_pass():
    check_detection_labels(_labels(), 7)
    # the range's edges: a zero-size box in a corner, the whole image, a box overhanging by 5 % of the image side
    edges = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.5, 1.0, 1.0], [0.05, 0.5, 0.2, 0.3]])
    check_detection_labels([{"class_labels": torch.tensor([1, 2, 3]), "boxes": edges}], 7)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t[0]["boxes"].__setitem__((1, 3), -0.2), r"labels\[0\]\['boxes'\] has a negative width or height"),
        (lambda t: t[0]["boxes"].__setitem__((0, 0), float("nan")), "NaN or inf"),
        (lambda t: t[0].__setitem__("class_labels", torch.tensor([0, 1, 7])), r"must be in \[0, 7\)"),
        (lambda t: t[0].__setitem__("class_labels", torch.tensor([0.0, 1.0, 2.0])), "must be integer class ids"),
        # torch indexes with these as masks: the matcher failed with a shape mismatch deep inside
        (lambda t: t[0].__setitem__("class_labels", torch.tensor([0, 3, 6], dtype=torch.uint8)), "as masks"),
        (lambda t: t[0].__setitem__("class_labels", torch.tensor([False, True, True])), "as masks"),
        (lambda t: t[0].__setitem__("boxes", torch.zeros(2, 4)), r"expected class_labels \[n\] and boxes \[n, 4\]"),
        (lambda t: t[0].pop("class_labels"), "needs 'class_labels' and 'boxes'"),
    ],
)
def test_bad_labels_raise_clear_errors(change, message):
    labels = _labels()
    change(labels)
    with pytest.raises(ValueError, match=message):
        check_detection_labels(labels, 7)


@pytest.mark.parametrize(
    "boxes",
    [
        [[120.0, 80.0, 40.0, 30.0]],  # (cx, cy, w, h) in pixels
        [[0.5, 0.5, 1.2, 0.3]],  # wider than the image
        [[-0.1, 0.5, 0.2, 0.3]],  # centre left of the image
    ],
)
def test_boxes_outside_the_unit_range_are_rejected(boxes):
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor(boxes)}]
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*normalized by the image size as \(cx, cy, w, h\)"):
        check_detection_labels(labels, 7)


def test_normalized_corner_boxes_are_rejected():
    """Normalized (x0, y0, x1, y1) corners lie in [0, 1], so the value check let them through and the model trained
    on them as (cx, cy, w, h) boxes: [0.1, 0.2, 0.6, 0.9] is read as a box from x = -0.2 to 0.4. A corner more than
    5 % of the image outside it is now an error naming the format; the same boxes as (cx, cy, w, h) pass."""
    from hf_dino.box_ops import box_xyxy_to_cxcywh

    corners = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.55, 0.05, 0.95, 0.45]])
    labels = [{"class_labels": torch.tensor([1, 2]), "boxes": corners}]
    with pytest.raises(ValueError, match=r"reaching outside the image .* from -0.25 to 1.025.*not \(x0, y0, x1, y1\)"):
        check_detection_labels(labels, 7)
    check_detection_labels([{"class_labels": torch.tensor([1, 2]), "boxes": box_xyxy_to_cxcywh(corners)}], 7)
