"""Data pipeline: COCO folders and bad data, `datasets` adapter, transforms.v2 augmentation, collate, synthetic data,
and the library helpers of the training loop (sampler, param groups, EMA, atomic checkpoints)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from hf_dino.data import (
    CocoDetectionDataset,
    DetectionCollator,
    HFDetectionDataset,
    RandomSizeCrop,
    build_label_map,
    generate_synthetic_coco,
    make_eval_transforms,
    make_train_transforms,
    scaled_recipe,
)

from conftest import COCO_MINI


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def write_coco(tmp_path: Path, images, annotations, categories=None, sizes=None) -> tuple[Path, Path]:
    """A COCO folder with solid-colour images; `images` = list of (id, file_name, width, height, write_file)."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    entries = []
    for image_id, name, width, height, write in images:
        if write:
            real_w, real_h = (sizes or {}).get(image_id, (width, height))
            Image.new("RGB", (real_w, real_h), (image_id * 40 % 255, 100, 150)).save(folder / name)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    categories = categories or [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return folder, ann_file


def ann(ann_id, image_id, bbox, category_id=1, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "iscrowd": iscrowd,
            "area": float(bbox[2] * bbox[3]) if bbox and len(bbox) == 4 else 0.0}


# ----------------------------------------------------------------------------------------------------------------------
# COCO folder + bad data
# ----------------------------------------------------------------------------------------------------------------------


def test_coco_dataset_targets_and_label_map(tmp_path):
    folder, ann_file = write_coco(
        tmp_path, [(1, "a.png", 40, 20, True)],
        [ann(1, 1, [10, 5, 20, 10], 3), ann(2, 1, [0, 0, 4, 4], 1), ann(3, 1, [0, 0, 40, 20], 1, iscrowd=1)],
    )
    ds = CocoDetectionDataset(folder, ann_file)
    assert ds.label_map.id2label == {0: "cat", 1: "dog"}
    assert ds.label_map.label_to_category_id == {0: 1, 1: 3}
    image, target = ds[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 20, 40)
    assert target["class_labels"].tolist() == [1, 0]  # crowd annotation is not a target
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.05, 0.1, 0.1, 0.2]]))
    assert target["orig_size"] == (20, 40) and target["size"] == (20, 40) and target["image_id"] == 1

    as_ids = CocoDetectionDataset(folder, ann_file, label_map_mode="category_id")
    assert as_ids.label_map.num_labels == 4 and as_ids.label_map.id2label[2] == "N/A"
    assert as_ids[0][1]["class_labels"].tolist() == [3, 1]
    assert as_ids.label_map.label_to_category_id is None


def test_category_id_label_map_in_a_model_label_space():
    """`label_space`: a model's id2label naming every category at its id is kept whole (labels = category ids);
    one that names a category otherwise is refused."""
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    space = {0: "N/A", 1: "person", 2: "bicycle", 3: "Car", 4: "motorcycle"}
    kept = build_label_map(cats, "category_id", label_space=space)
    assert kept.id2label == {0: "N/A", 1: "person", 2: "bicycle", 3: "Car", 4: "motorcycle"}
    assert kept.category_to_label == {1: 1, 3: 3} and kept.label_to_category_id is None
    assert build_label_map(cats, "category_id").num_labels == 4
    with pytest.raises(ValueError, match="must name every category at its id"):
        build_label_map(cats, "category_id", label_space={1: "person", 3: "truck"})
    with pytest.raises(ValueError, match="mode='category_id' only"):
        build_label_map(cats, "contiguous", label_space=space)


def _sixteen_bit_image(width=24, height=16):
    """A 16-bit grey image (PIL mode I;16): background 32768, an object at 8000 in the middle."""
    import numpy as np

    array = np.full((height, width), 32768, dtype=np.uint16)
    array[4:12, 6:18] = 8000
    return Image.fromarray(array), array


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG used to go through PIL's convert("RGB"), which clips every value at 255: the whole image came out
    white and the object vanished from the training data (while inference scaled it). Now 0..65535 maps to 0..255,
    compared with a numpy recomputation, in the COCO folder and the `datasets` adapter alike."""
    import numpy as np

    image, array = _sixteen_bit_image()
    expected = torch.from_numpy(np.round(array / 257.0).astype(np.uint8)).expand(3, -1, -1)
    folder, ann_file = write_coco(tmp_path, [(1, "a.png", 24, 16, False)], [ann(1, 1, [6, 4, 12, 8])])
    image.save(folder / "a.png")
    assert Image.open(folder / "a.png").mode.startswith("I")
    pixels, _ = CocoDetectionDataset(folder, ann_file)[0]
    assert torch.equal(pixels, expected)

    rows = [{"image_id": 1, "image": {"path": str(folder / "a.png"), "bytes": None}, "width": 24, "height": 16,
             "objects": {"bbox": [[6, 4, 12, 8]], "category": [0]}}]
    pixels, _ = HFDetectionDataset(_hf_dataset(rows))[0]
    assert torch.equal(pixels, expected)


def test_missing_images_error_or_skip(tmp_path):
    folder, ann_file = write_coco(
        tmp_path, [(1, "a.png", 16, 16, True), (2, "gone.png", 16, 16, False)],
        [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])],
    )
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 images.*gone\.png.*--skip-missing-images"):
        CocoDetectionDataset(folder, ann_file)
    with pytest.warns(UserWarning, match="missing"):
        ds = CocoDetectionDataset(folder, ann_file, missing_images="skip")
    assert len(ds) == 1 and ds.report()["missing_image"] == 1


def test_unknown_category_error_or_ignore(tmp_path):
    folder, ann_file = write_coco(tmp_path, [(1, "a.png", 16, 16, True)], [ann(1, 1, [1, 1, 5, 5], 1), ann(7, 1, [2, 2, 5, 5], 99)])
    with pytest.raises(ValueError, match=r"Annotation 7 .*category id 99.*--ignore-unknown-categories"):
        CocoDetectionDataset(folder, ann_file)
    with pytest.warns(UserWarning, match="unknown category"):
        ds = CocoDetectionDataset(folder, ann_file, unknown_categories="ignore")
    assert ds[0][1]["class_labels"].tolist() == [0]
    assert ds.report()["unknown_category"] == 1


def test_degenerate_and_outside_boxes_are_fixed_up(tmp_path):
    annotations = [
        ann(1, 1, [2, 2, 0, 5]),  # zero width
        ann(2, 1, [2, 2, 5, -1]),  # negative height
        ann(3, 1, [30, 30, 5, 5]),  # entirely outside a 20x20 image
        ann(4, 1, [15, -5, 10, 10]),  # partly outside: clipped to [15, 0, 20, 5]
        ann(5, 1, [float("nan"), 1, 2, 2]),  # NaN
        ann(6, 1, [1, 2, 3]),  # not 4 numbers
        ann(7, 1, [4, 4, 8, 8]),  # fine
    ]
    folder, ann_file = write_coco(tmp_path, [(1, "a.png", 20, 20, True)], annotations)
    with pytest.warns(UserWarning, match="fixed up bad annotations"):
        ds = CocoDetectionDataset(folder, ann_file)
    report = ds.report()
    assert report["zero_area_box"] == 2 and report["box_outside_image"] == 1 and report["box_clipped"] == 1
    assert report["invalid_box"] == 2
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.875, 0.125, 0.25, 0.25], [0.4, 0.4, 0.4, 0.4]]))
    assert (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()


def test_images_without_annotations_kept_or_skipped(tmp_path):
    folder, ann_file = write_coco(tmp_path, [(1, "a.png", 16, 16, True), (2, "b.png", 16, 16, True)], [ann(1, 1, [1, 1, 5, 5])])
    ds = CocoDetectionDataset(folder, ann_file)
    assert len(ds) == 2 and ds.report()["image_without_annotations"] == 1
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["class_labels"].shape == (0,)
    batch = DetectionCollator()([ds[0], ds[1]])
    assert batch["labels"][1]["boxes"].shape == (0, 4)
    assert len(CocoDetectionDataset(folder, ann_file, empty_images="skip")) == 1


def test_image_size_mismatch_is_a_clear_error(tmp_path):
    folder, ann_file = write_coco(tmp_path, [(1, "a.png", 16, 16, True)], [ann(1, 1, [1, 1, 5, 5])], sizes={1: (20, 16)})
    ds = CocoDetectionDataset(folder, ann_file)
    with pytest.raises(ValueError, match="is 20x16 pixels but its annotation says 16x16"):
        ds[0]


def test_bad_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetectionDataset(tmp_path, tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="Cannot read COCO annotation file"):
        CocoDetectionDataset(tmp_path, tmp_path / "bad.json")


# ----------------------------------------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------------------------------------


def _boxes_sample(h=300, w=400):
    image = tv_tensors.Image(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 20.0, 110.0, 220.0], [300.0, 0.0, 400.0, 50.0]]),
                                     format="XYXY", canvas_size=(h, w))
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1])}


def test_train_transforms_keep_sub_pixel_boxes_and_drop_empty_ones():
    """As the original's crop: a box thinner than a pixel stays (torchvision's SanitizeBoundingBoxes(min_size=1) would
    drop it), a box without width (e.g. cropped away) goes, and the labels stay aligned with the boxes."""
    image = tv_tensors.Image(torch.zeros(3, 100, 200, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 10.0, 10.6, 90.0], [20.0, 20.0, 20.0, 60.0], [50.0, 30.0, 150.0, 30.4],
                      [60.0, 10.0, 120.0, 70.0]]), format="XYXY", canvas_size=(100, 200))
    labels = torch.tensor([1, 2, 3, 4])
    transform = make_train_transforms(scales=[100], max_size=1000, crop_size=None, hflip_prob=0.0)  # same size
    out_image, target = transform(image, {"boxes": boxes, "labels": labels})
    assert out_image.shape == image.shape and isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["labels"].tolist() == [1, 3, 4]
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), boxes[[0, 2, 3]].as_subclass(torch.Tensor))


def test_train_transforms_follow_the_recipe():
    torch.manual_seed(0)
    transform = make_train_transforms()  # the original sizes: exact shorter side (400x300 images never hit 1333)
    shorter_sides, cropped = set(), False
    for _ in range(40):
        image, target = transform(*_boxes_sample())
        h, w = image.shape[-2:]
        assert max(h, w) <= 1333
        shorter_sides.add(min(h, w))
        boxes = target["boxes"]
        assert len(boxes) == len(target["labels"])
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all() and (boxes >= 0).all()
        cropped |= len(boxes) < 2
    assert len(shorter_sides) > 3
    assert shorter_sides <= set(range(480, 801, 32))
    assert cropped  # the resize-crop-resize branch dropped a box at least once


def test_horizontal_flip_and_recipe_scaling():
    from torchvision.transforms import v2

    image, target = _boxes_sample()
    _, flipped = v2.RandomHorizontalFlip(p=1.0)(image, target)
    torch.testing.assert_close(flipped["boxes"].as_subclass(torch.Tensor)[0], torch.tensor([290.0, 20.0, 390.0, 220.0]))
    recipe = scaled_recipe(0.2)
    assert recipe["scales"][0] == 96 and recipe["scales"][-1] == 160 and recipe["max_size"] == 267
    assert recipe["eval_size"] == 160
    image, _ = make_eval_transforms(**scaled_recipe(0.2))(*_boxes_sample())
    assert tuple(image.shape[-2:]) == (160, 213)
    image, _ = make_eval_transforms(eval_size=100, max_size=150)(*_boxes_sample(100, 400))
    assert tuple(image.shape[-2:]) == (38, 152)  # the original rule truncates; the long side may pass max_size


def test_random_size_crop_bounds():
    torch.manual_seed(1)
    crop = RandomSizeCrop(50, 120)
    for _ in range(20):
        image, _ = crop(*_boxes_sample(100, 300))
        h, w = image.shape[-2:]
        assert 50 <= h <= 100 and 50 <= w <= 120


def test_seeded_samples_are_reproducible(tmp_path):
    paths = generate_synthetic_coco(tmp_path / "syn", num_train=4, num_val=1)
    ds = CocoDetectionDataset(paths["train_images"], paths["train_annotations"], make_train_transforms(**scaled_recipe(0.2)))
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    state = torch.get_rng_state()
    different = [ds[(1, s)][0].shape for s in range(8)]
    assert torch.equal(state, torch.get_rng_state())  # seeded samples leave the global RNG alone
    assert len(set(different)) > 1


# ----------------------------------------------------------------------------------------------------------------------
# collate
# ----------------------------------------------------------------------------------------------------------------------


def test_collate_normalises_and_pads(tmp_path):
    folder, ann_file = write_coco(tmp_path, [(1, "a.png", 30, 20, True), (2, "b.png", 16, 24, True)],
                                  [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [2, 2, 4, 4], 3)])
    ds = CocoDetectionDataset(folder, ann_file)
    batch = DetectionCollator()([ds[0], ds[1]])
    assert tuple(batch["pixel_values"].shape) == (2, 3, 24, 30)
    assert batch["pixel_mask"][0, :20, :30].all() and not batch["pixel_mask"][0, 20:].any()
    assert batch["pixel_mask"][1, :24, :16].all() and not batch["pixel_mask"][1, :, 16:].any()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (ds[0][0][:, 0, 0].float() / 255 - mean) / std
    torch.testing.assert_close(batch["pixel_values"][0, :, 0, 0], expected, atol=1e-5, rtol=1e-5)
    assert batch["image_ids"].tolist() == [1, 2] and batch["orig_sizes"].tolist() == [[20, 30], [24, 16]]
    assert batch["labels"][1]["class_labels"].tolist() == [1]
    assert set(batch["labels"][0]) == {"class_labels", "boxes"}


# ----------------------------------------------------------------------------------------------------------------------
# datasets adapter
# ----------------------------------------------------------------------------------------------------------------------


def _hf_dataset(rows):
    import datasets

    features = datasets.Features({
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": {
            "bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
            "category": datasets.Sequence(datasets.ClassLabel(names=["apple", "pear", "plum"])),
        },
    })
    return datasets.Dataset.from_list(rows, features=features)


def test_hf_datasets_adapter():
    rows = [
        {"image_id": 10, "image": Image.new("RGB", (32, 16)), "width": 32, "height": 16,
         "objects": {"bbox": [[0, 0, 16, 8], [8, 4, 0, 4]], "category": [2, 0]}},
        {"image_id": 11, "image": Image.new("RGB", (20, 20)), "width": 20, "height": 20,
         "objects": {"bbox": [], "category": []}},
    ]
    with pytest.warns(UserWarning, match="zero area box"):
        ds = HFDetectionDataset(_hf_dataset(rows))
    assert len(ds) == 2 and ds.label_map.id2label == {0: "apple", 1: "pear", 2: "plum"}
    image, target = ds[0]
    assert tuple(image.shape) == (3, 16, 32) and target["image_id"] == 10
    assert target["class_labels"].tolist() == [2]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    assert ds[1][1]["boxes"].shape == (0, 4)
    coco = ds.coco_ground_truth()
    assert sorted(coco.imgs) == [10, 11] and len(coco.anns) == 1 and coco.anns[1]["category_id"] == 2

    xyxy = HFDetectionDataset(_hf_dataset(rows[:1]), bbox_format="xyxy", empty_images="skip")
    torch.testing.assert_close(xyxy[0][1]["boxes"][0], torch.tensor([0.25, 0.25, 0.5, 0.5]))
    assert len(HFDetectionDataset(_hf_dataset(rows), empty_images="skip")) == 1


def test_hf_datasets_repeated_image_ids_become_unique():
    """Image ids must be unique for the COCO evaluation: a repeated id gets a new one, above every given id (the
    row-index fallback collided with another row's id: [1, 1, 2] stayed [1, 1, 2]), with a warning; the ground
    truth then has one image per row and each box on its own image."""
    rows = [
        {"image_id": image_id, "image": Image.new("RGB", (20, 20)), "width": 20, "height": 20,
         "objects": {"bbox": [[0, 0, 4 + k, 4]], "category": [k]}}
        for k, image_id in enumerate([1, 1, 2])
    ]
    with pytest.warns(UserWarning, match="1 rows .*row 1.* repeated or non-integer image id"):
        ds = HFDetectionDataset(_hf_dataset(rows))
    ids = [ds[i][1]["image_id"] for i in range(3)]
    assert ids[0] == 1 and ids[2] == 2 and ids[1] not in (1, 2)
    coco = ds.coco_ground_truth()
    assert sorted(coco.imgs) == sorted(ids)
    assert {ann["image_id"]: ann["category_id"] for ann in coco.anns.values()} == {ids[0]: 0, ids[1]: 1, ids[2]: 2}


def test_hf_datasets_unknown_category():
    import datasets

    ds = datasets.Dataset.from_list(
        [{"image": Image.new("RGB", (8, 8)), "objects": {"bbox": [[0, 0, 2, 2]], "category": [5]}}],
        features=datasets.Features({"image": datasets.Image(),
                                    "objects": {"bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                                                "category": datasets.Sequence(datasets.Value("int64"))}}),
    )
    label_map = build_label_map([{"id": 0, "name": "a"}])
    with pytest.raises(ValueError, match="category id 5"):
        HFDetectionDataset(ds, label_map=label_map)
    with pytest.warns(UserWarning):
        kept = HFDetectionDataset(ds, label_map=label_map, unknown_categories="ignore")
    assert kept[0][1]["boxes"].shape == (0, 4)


# ----------------------------------------------------------------------------------------------------------------------
# synthetic data + preset
# ----------------------------------------------------------------------------------------------------------------------


def test_synthetic_data_is_deterministic(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", num_train=5, num_val=2, seed=3)
    b = generate_synthetic_coco(tmp_path / "b", num_train=5, num_val=2, seed=3)
    for key in ("train_annotations", "val_annotations"):
        assert Path(a[key]).read_bytes() == Path(b[key]).read_bytes()
    for name in os.listdir(a["train_images"]):
        assert (Path(a["train_images"]) / name).read_bytes() == (Path(b["train_images"]) / name).read_bytes()
    data = json.loads(Path(a["train_annotations"]).read_text())
    assert len(data["images"]) == 5 and len(data["categories"]) == 5 and data["annotations"]
    for entry in data["annotations"]:
        x, y, w, h = entry["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
    mtime = os.path.getmtime(a["train_annotations"])
    generate_synthetic_coco(tmp_path / "a", num_train=5, num_val=2, seed=3)  # reused, not rewritten
    assert os.path.getmtime(a["train_annotations"]) == mtime
    c = generate_synthetic_coco(tmp_path / "c", num_train=5, num_val=2, seed=4)
    assert Path(c["train_annotations"]).read_bytes() != Path(a["train_annotations"]).read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# COCO-MINI
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"COCO-MINI not found at {COCO_MINI} (../shared/data/coco-mini)")
def test_coco_mini_with_coco_label_ids():
    from hf_dino import DinoConfig

    ds = CocoDetectionDataset(COCO_MINI / "train2017", COCO_MINI / "annotations" / "instances_train2017.json",
                              make_train_transforms(), label_map_mode="category_id")
    assert len(ds) == 80 and ds.label_map.num_labels == 91
    assert ds.label_map.matches(DinoConfig().id2label)  # a converted 91-class checkpoint is used as is
    image, target = ds[(0, 0)]
    assert min(image.shape[-2:]) in range(384, 801) and max(image.shape[-2:]) <= 1333
    assert (target["boxes"] > 0).all() and (target["boxes"] <= 1).all()
