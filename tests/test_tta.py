"""Test-time augmentation (`hf_dino.tta`): Eq. 3 of the DINO paper by hand, views mapped back to the image."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import REPO, save_tiny_model_dir, tiny_model, tiny_processor

from hf_dino.tta import Augmentation, DinoTTA, ensemble_nms, ensemble_one_to_one, hflip_boxes

COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"


def _pred(boxes, labels, scores):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


# ---- Eq. 3 on a hand-computed example ---------------------------------------------------------------------------
#
# main view:  A [10, 10, 50, 50] label 1 score 0.6;  B [100, 100, 140, 140] label 2 score 0.5
# view 1 (w=1): a1 [14, 10, 54, 50] label 1 score 0.2   IoU(A, a1) = 1440 / 1760 = 0.82  -> partner of A
#               b1 [100, 100, 140, 140] label 3 score 0.9  same box as B, other label
# view 2 (w=2): a2 [10, 10, 50, 90] label 1 score 0.5   IoU(A, a2) = 1600 / 3200 = 0.5 exactly: NOT above 0.5
#               b2 [102, 100, 142, 140] label 2 score 0.25  IoU(B, b2) = 1520 / 1680 = 0.90 -> partner of B
VIEWS = [
    _pred([[10, 10, 50, 50], [100, 100, 140, 140]], [1, 2], [0.6, 0.5]),
    _pred([[14, 10, 54, 50], [100, 100, 140, 140]], [1, 3], [0.2, 0.9]),
    _pred([[10, 10, 50, 90], [102, 100, 142, 140]], [1, 2], [0.5, 0.25]),
]
WEIGHTS = [1.0, 1.0, 2.0]


def _by_label(result):
    return {int(label): (float(score), box.tolist()) for score, label, box in
            zip(result["scores"], result["labels"], result["boxes"])}


def test_eq3_weighted_average_by_hand():
    result = ensemble_one_to_one(VIEWS, weights=WEIGHTS, iou_threshold=0.5)
    got = _by_label(result)
    # A: (0.6 * A + 1 * 0.2 * a1) / (0.6 + 0.2) = [11, 10, 51, 50]; score (0.6 + 0.2 + 0) / (1 + 1 + 2) = 0.2
    assert got[1][1] == pytest.approx([11, 10, 51, 50], abs=1e-5)
    assert got[1][0] == pytest.approx(0.2, abs=1e-7)
    # B: b1 has another label; (0.5 * B + 2 * 0.25 * b2) / (0.5 + 0.5) = [101, 100, 141, 140]; (0.5 + 0.5) / 4
    assert got[2][1] == pytest.approx([101, 100, 141, 140], abs=1e-5)
    assert got[2][0] == pytest.approx(0.25, abs=1e-7)
    assert result["labels"].tolist() == [2, 1]  # sorted by the ensembled score


def test_eq3_as_printed_and_score_modes_by_hand():
    # Eq. 3 exactly as printed: divided by the number of matched views
    got = _by_label(ensemble_one_to_one(VIEWS, weights=WEIGHTS, box_normalization="count"))
    assert got[1][1] == pytest.approx([4.4, 4.0, 20.4, 20.0], abs=1e-5)  # (0.6 * A + 0.2 * a1) / 2
    assert got[2][1] == pytest.approx([50.5, 50.0, 70.5, 70.0], abs=1e-5)  # (0.5 * B + 2 * 0.25 * b2) / 2
    got = _by_label(ensemble_one_to_one(VIEWS, weights=WEIGHTS, score_mode="mean_matched"))
    assert got[1][0] == pytest.approx((0.6 + 0.2) / 2) and got[2][0] == pytest.approx((0.5 + 2 * 0.25) / 3)
    got = _by_label(ensemble_one_to_one(VIEWS, weights=WEIGHTS, score_mode="main"))
    assert got[1][0] == pytest.approx(0.6) and got[2][0] == pytest.approx(0.5)


def test_eq3_threshold_and_label_agreement_by_hand():
    # a lower threshold admits a2 (IoU 0.5): A = (0.6 A + 0.2 a1 + 2 * 0.5 a2) / 1.8
    got = _by_label(ensemble_one_to_one(VIEWS, weights=WEIGHTS, iou_threshold=0.45))
    assert got[1][1] == pytest.approx([(6 + 2.8 + 10) / 1.8, 10, (30 + 10.8 + 50) / 1.8, (30 + 10 + 90) / 1.8], abs=1e-5)
    assert got[1][0] == pytest.approx((0.6 + 0.2 + 1.0) / 4)
    # without label agreement B takes b1 (IoU 1) from view 1: (0.5 B + 0.9 b1 + 0.5 b2) / 1.9, label stays 2
    got = _by_label(ensemble_one_to_one(VIEWS, weights=WEIGHTS, match_labels=False))
    assert got[2][1] == pytest.approx([191 / 1.9, 100, 267 / 1.9, 140], abs=1e-4)
    assert got[2][0] == pytest.approx((0.5 + 0.9 + 0.5) / 4)
    # nothing matches above 0.95: every main box stays as it is, scores 0.6 / 4 and 0.5 / 4
    got = _by_label(ensemble_one_to_one(VIEWS, weights=WEIGHTS, iou_threshold=0.95))
    assert got[1] == pytest.approx((0.15, [10, 10, 50, 50])) and got[2] == pytest.approx((0.125, [100, 100, 140, 140]))


def test_ensembles_with_empty_predictions():
    empty = _pred([], [], [])
    main = VIEWS[0]
    # empty main view: nothing to ensemble, whatever the other views hold
    for views in ([empty, VIEWS[1]], [empty], [empty, empty]):
        result = ensemble_one_to_one(views)
        assert all(v.shape[0] == 0 for v in result.values()) and result["boxes"].shape == (0, 4)
    # empty other views: the main boxes unchanged, scores as if unmatched
    result = ensemble_one_to_one([main, empty, empty])
    assert torch.equal(result["boxes"], main["boxes"]) and torch.equal(result["labels"], main["labels"])
    assert result["scores"].tolist() == pytest.approx([0.6 / 3, 0.5 / 3])
    # NMS: gathers what there is
    assert ensemble_nms([empty, empty])["boxes"].shape == (0, 4)
    assert torch.equal(ensemble_nms([empty, main])["boxes"], main["boxes"])


def test_nms_ensemble_removes_duplicates_per_label():
    result = ensemble_nms(VIEWS, iou_threshold=0.5)
    # label 1: A (0.6) suppresses a1 (IoU 0.82) but not a2 (0.5, not above); label 2: B suppresses b2; b1 alone
    kept = sorted(zip(result["labels"].tolist(), result["scores"].tolist()))
    assert [label for label, _ in kept] == [1, 1, 2, 3]
    assert [score for _, score in kept] == pytest.approx([0.5, 0.6, 0.5, 0.9])
    assert result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
    assert ensemble_nms(VIEWS, top_k=2)["scores"].tolist() == pytest.approx([0.9, 0.6])


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="weight"):
        ensemble_one_to_one(VIEWS, weights=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="weight"):
        ensemble_one_to_one(VIEWS, weights=[1.0])
    with pytest.raises(ValueError, match="score_mode"):
        ensemble_one_to_one(VIEWS, score_mode="max")
    with pytest.raises(ValueError, match="boxes"):
        ensemble_one_to_one([{"scores": torch.ones(2), "labels": torch.ones(2), "boxes": torch.ones(3, 4)}])
    with pytest.raises(ValueError, match="not both"):
        DinoTTA(None, None, scales=[1.0], augmentations=[Augmentation()])
    with pytest.raises(ValueError, match="positive"):
        DinoTTA(None, None, scales=[1.0, -0.5])
    with pytest.raises(ValueError, match="weights"):
        DinoTTA(None, None, scales=[1.0], flip=True, weights=[1.0])
    with pytest.raises(ValueError, match="score_mode"):
        DinoTTA(None, None, score_mode="max")
    with pytest.raises(ValueError, match="iou_threshold"):
        DinoTTA(None, None, iou_threshold=1.5)
    with pytest.raises(ValueError, match="nms_iou_threshold must be in"):  # -1 kept one detection per image before
        DinoTTA(None, None, ensemble="nms", nms_iou_threshold=-1.0)
    assert "nms_iou_threshold=0.6" in repr(DinoTTA(None, None, ensemble="nms", nms_iou_threshold=0.6))


def test_hflip_boxes_is_an_involution():
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0], [0.0, 0.0, 10.0, 4.0]])
    assert hflip_boxes(boxes, 10.0).tolist() == [[5.0, 2.0, 9.0, 9.0], [0.0, 0.0, 10.0, 4.0]]
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 10.0), 10.0), boxes)


# ---- views of a real (tiny, random) DINO mapped back ------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, disable_custom_kernels=True)


@pytest.fixture(scope="module")
def images():
    """Two images of different sizes and aspect ratios (a batch that needs padding)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 140), (160, 100))]


def _plain(model, processor, images, threshold=0.0, top_k=300):
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    sizes = [(image.height, image.width) for image in images]
    return processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes, top_k=top_k)


def _assert_same(results, expected):
    assert len(results) == len(expected)
    for got, ref in zip(results, expected):
        assert got.keys() == ref.keys()
        for key in ref:
            assert torch.equal(got[key], ref[key]), key


def test_identity_augmentation_is_plain_post_processing(model, images):
    processor = tiny_processor()
    sizes = [(image.height, image.width) for image in images]
    # a threshold between the scores of the first image: some detections are kept, some are not
    middle = float(_plain(model, processor, images)[0]["scores"][10])
    for threshold, top_k in ((0.0, 300), (middle, 50)):
        expected = _plain(model, processor, images, threshold, top_k)
        for weights in (None, [0.3]):
            tta = DinoTTA(model, processor, augmentations=[Augmentation(1.0, False)], weights=weights)
            _assert_same(tta(images, threshold=threshold, target_sizes=sizes, top_k=top_k), expected)
    assert 0 < len(expected[0]["scores"]) < 50
    # normalized boxes without target sizes, as post_process_object_detection
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    tta = DinoTTA(model, processor, augmentations=[Augmentation()])
    _assert_same(tta(images, threshold=0.0), processor.post_process_object_detection(outputs, threshold=0.0))


def test_flipped_view_is_mirrored_inference_mirrored_back(model, images):
    processor = tiny_processor()
    mirrored = [ImageOps.mirror(image) for image in images]
    expected = _plain(model, processor, mirrored)
    for image, result in zip(images, expected):
        result["boxes"] = hflip_boxes(result["boxes"], image.width)
    sizes = [(image.height, image.width) for image in images]
    tta = DinoTTA(model, processor, augmentations=[Augmentation(1.0, hflip=True)])
    results = tta(images, threshold=0.0, target_sizes=sizes)
    _assert_same(results, expected)
    plain = _plain(model, processor, images)
    assert not torch.allclose(results[0]["boxes"], plain[0]["boxes"])  # the view is not the plain one
    # boxes stay inside the image after mirroring back (up to the model's box extent)
    x0, _, x1, _ = results[0]["boxes"].unbind(-1)
    assert bool((x1 >= x0).all())


def test_rescaled_view_is_inference_at_that_size(model, images):
    processor = tiny_processor()
    scaled = tiny_processor()
    scaled.size = type(processor.size)(shortest_edge=72, longest_edge=120)  # 0.75 x (96, 160)
    expected = _plain(model, scaled, images)
    tta = DinoTTA(model, processor, augmentations=[Augmentation(0.75, hflip=False)])
    _assert_same(tta(images, threshold=0.0, target_sizes=[(i.height, i.width) for i in images]), expected)
    assert not torch.equal(expected[0]["boxes"], _plain(model, processor, images)[0]["boxes"])


def test_rescaled_view_scales_the_size_of_the_call(model, images):
    """A `size` passed with the call is the base size of every view: the 0.5x view runs at half of it (as
    inference with half that size), not at half the processor's own size."""
    processor = tiny_processor()  # its own size: shortest 96, longest 160
    half = tiny_processor()
    half.size = type(processor.size)(shortest_edge=32, longest_edge=60)  # 0.5 x the call's (64, 120)
    expected = _plain(model, half, images)
    tta = DinoTTA(model, processor, augmentations=[Augmentation(0.5, hflip=False)])
    results = tta(images, threshold=0.0, target_sizes=[(i.height, i.width) for i in images],
                  size={"shortest_edge": 64, "longest_edge": 120})
    _assert_same(results, expected)


def test_default_views_on_a_batch_of_different_sizes(model, images):
    processor = tiny_processor()
    assert DinoTTA(model, processor).augmentations == [(1.0, False), (1.0, True)]
    tta = DinoTTA(model, processor, scales=(1.0, 0.8))
    assert tta.augmentations == [(1.0, False), (0.8, False), (1.0, True), (0.8, True)]
    sizes = [(image.height, image.width) for image in images]
    views = tta.predict_views(images, target_sizes=sizes, top_k=40)
    assert [len(v) for v in views] == [2, 2, 2, 2]
    for ensemble in ("one-to-one", "nms"):
        tta.ensemble = ensemble
        results = tta(images, threshold=0.0, target_sizes=sizes, top_k=40)
        for result, (h, w) in zip(results, sizes):
            n = len(result["scores"])
            assert 0 < n <= 40 and result["boxes"].shape == (n, 4) and result["labels"].dtype == torch.int64
            assert result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
            assert float(result["boxes"][:, 0::2].min()) > -0.5 * w and float(result["boxes"][:, 0::2].max()) < 1.5 * w
    # the one-to-one result keeps the main view's detections (one per main prediction, same labels)
    tta.ensemble = "one-to-one"
    (result, _) = tta(images, threshold=0.0, target_sizes=sizes, top_k=40)
    assert sorted(result["labels"].tolist()) == sorted(views[0][0]["labels"].tolist())
    # no candidate at all (top_k=0): empty results in both modes
    for ensemble in ("one-to-one", "nms"):
        tta.ensemble = ensemble
        for result in tta(images, threshold=0.0, target_sizes=sizes, top_k=0):
            assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,)


# ---- command line -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_dino_tta"))


def test_cli_predict_tta(model_dir, images, tmp_path):
    from hf_dino_cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i + 1}.png")
    outputs = {}
    for name, extra in (("plain", []), ("identity", ["--tta", "--tta-scales", "1", "--tta-no-flip"]),
                        ("tta", ["--tta", "--tta-scales", "1", "0.8"])):
        out = tmp_path / name
        assert main(["predict", str(folder), "--model", str(model_dir), "--threshold", "0", "--top-k", "30",
                     "--batch-size", "2", "--no-draw", "--no-progress", "--out", str(out), *extra]) == 0
        outputs[name] = json.loads((out / "predictions.json").read_text())
    assert outputs["identity"] == outputs["plain"]  # one identity view is plain inference
    assert outputs["tta"] != outputs["plain"]
    assert {r["image_id"] for r in outputs["tta"]} == {1, 2}
    assert json.loads((tmp_path / "tta" / "images.json").read_text())["tta"].startswith("DinoTTA(")


@pytest.mark.skipif(not VAL_JSON.is_file(), reason="COCO-MINI not found at ../shared/data/coco-mini")
def test_evaluate_script_tta(model_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("hf_dino_examples_evaluate_tta", REPO / "examples" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    common = ["--model", str(model_dir), "--images", str(COCO_MINI / "val2017"), "--annotations", str(VAL_JSON),
              "--max-images", "2", "--top-k", "50", "--labels-are-category-ids"]
    results = {}
    for name, extra in (("plain", []), ("identity", ["--tta", "--tta-scales", "1", "--tta-no-flip"]),
                        ("nms", ["--tta", "--tta-ensemble", "nms"])):
        evaluate.main([*common, "--output", str(tmp_path / f"{name}.json"), *extra])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["identity"] == results["plain"] and len(results["plain"]) > 0
    assert results["nms"] != results["plain"]
