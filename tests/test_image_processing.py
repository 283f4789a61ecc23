"""DinoImageProcessor / DinoImageProcessorPil and post-processing against the original DINO fixtures.

References (independent of this code): `../shared/parity/preprocess/` (the original evaluation transform at the
real size), `../shared/parity/{r50_4scale,swinl_4scale}/inputs.safetensors` (the original transform at a reduced
size, batched and padded, with the converted targets) and `expected.safetensors` (the original `PostProcess`).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COCO_MINI, PARITY
from hf_dino.image_processing_dino import (
    DinoImageProcessor,
    DinoImageProcessorPil,
    get_dino_resize_output_size,
    post_process_object_detection,
)

needs_parity = pytest.mark.skipif(
    not (PARITY / "preprocess" / "preprocess.json").is_file(),
    reason="parity fixtures not found at ../shared/parity (relative to the repo root)",
)
needs_coco = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_val2017.json").is_file(),
    reason="COCO-MINI not found at ../shared/data/coco-mini (relative to the repo root)",
)

PROCESSORS = [DinoImageProcessorPil, DinoImageProcessor]
EXACT_ATOL = 1e-4  # PIL path: reproduces the original's PIL resize (observed: 0)
FAST_ATOL = 0.02  # torchvision path: at most one 8-bit level (1/255/0.224 = 0.0175)


@pytest.fixture(scope="module")
def coco_val():
    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip("COCO-MINI not found at ../shared/data/coco-mini (relative to the repo root)")
    data = json.loads((COCO_MINI / "annotations" / "instances_val2017.json").read_text())
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    return by_image


def _load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# Size rule
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((304, 640), (633, 1332)),  # truncation of the long side (transformers' DETR processors give 1333)
        ((426, 640), (800, 1201)),
        ((640, 424), (1207, 800)),
        ((358, 640), (746, 1333)),
        ((800, 1000), (800, 1000)),  # short side already 800: kept
        ((1, 1), (800, 800)),
        ((600, 600), (800, 800)),
    ],
)
def test_size_rule_matches_original(hw, expected):
    assert get_dino_resize_output_size(*hw, 800, 1333) == expected


def test_size_rule_reduced_fixture_sizes():
    # the sizes recorded in the fixtures' READMEs for RandomResize([320], max_size=512)
    assert get_dino_resize_output_size(426, 640, 320, 512) == (320, 480)
    assert get_dino_resize_output_size(640, 424, 320, 512) == (483, 320)
    assert get_dino_resize_output_size(375, 500, 320, 512) == (320, 426)
    assert get_dino_resize_output_size(640, 383, 320, 512) == (511, 306)


def test_size_rule_extreme_aspect_never_empty():
    # where the original would compute a 0-pixel side, the short side is 1 and the long side capped
    assert get_dino_resize_output_size(2, 20000, 800, 1333) == (1, 1333)
    assert get_dino_resize_output_size(20000, 1, 800, 1333) == (1333, 1)
    assert get_dino_resize_output_size(10, 4000, 800, 1333) == (3, 1200)
    with pytest.raises(ValueError):
        get_dino_resize_output_size(0, 10, 800, 1333)


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing vs the original evaluation transform at the real size
# ----------------------------------------------------------------------------------------------------------------------


def _check_against_preprocess_fixture(cls, atol, coco_val):
    meta = json.loads((PARITY / "preprocess" / "preprocess.json").read_text())["images"]
    ref = _load_safetensors(PARITY / "preprocess" / "preprocess.safetensors")
    processor = cls()
    worst = 0.0
    for name, info in meta.items():
        key = name[: -len(".jpg")]
        image = Image.open(COCO_MINI / info["split"] / name)
        target = {"image_id": info["image_id"], "annotations": coco_val.get(info["image_id"], [])}
        out = processor(image, annotations=target, return_tensors="pt")
        pixel_values = out["pixel_values"][0]
        assert list(pixel_values.shape) == info["tensor_shape"], name
        assert out["pixel_mask"].shape == (1, *info["resized_size_hw"]) and bool(out["pixel_mask"].all())

        yx = ref[f"{key}.sample_yx"]
        comparisons = {
            "downsampled16": torch.nn.functional.avg_pool2d(pixel_values[None], 16, 16)[0],
            "sample_values": pixel_values[:, yx[:, 0], yx[:, 1]].T,
            "row0": pixel_values[:, 0],
            "col0": pixel_values[:, :, 0],
            "channel_mean": pixel_values.double().mean((1, 2)),
            "channel_std": pixel_values.double().std((1, 2)),
        }
        for what, value in comparisons.items():
            diff = (value.to(ref[f"{key}.{what}"].dtype) - ref[f"{key}.{what}"]).abs().max().item()
            worst = max(worst, diff)
            assert diff <= atol, f"{cls.__name__} {name} {what}: max abs diff {diff}"
        assert pixel_values.min().item() == pytest.approx(info["min"], abs=atol)
        assert pixel_values.max().item() == pytest.approx(info["max"], abs=atol)

        labels = out["labels"][0]
        assert len(labels["class_labels"]) == info["num_targets"]
        assert torch.equal(labels["class_labels"], ref[f"{key}.target_labels"])
        torch.testing.assert_close(labels["boxes"], ref[f"{key}.target_boxes"], atol=1e-6, rtol=0)
        torch.testing.assert_close(labels["area"], ref[f"{key}.target_area"], atol=1e-2, rtol=1e-6)
        assert labels["size"].tolist() == info["resized_size_hw"]
        assert labels["orig_size"].tolist() == info["orig_size_hw"]
        assert labels["image_id"].tolist() == [info["image_id"]]
    return worst


@needs_parity
@needs_coco
def test_pil_processor_reproduces_original_transform(coco_val):
    worst = _check_against_preprocess_fixture(DinoImageProcessorPil, EXACT_ATOL, coco_val)
    assert worst <= EXACT_ATOL


@needs_parity
@needs_coco
def test_torchvision_processor_within_one_8bit_level(coco_val):
    worst = _check_against_preprocess_fixture(DinoImageProcessor, FAST_ATOL, coco_val)
    assert worst <= FAST_ATOL


@needs_parity
@needs_coco
def test_resized_8bit_image_exact_on_pil_path_and_one_level_on_fast_path():
    meta = json.loads((PARITY / "preprocess" / "preprocess.json").read_text())["images"]
    pil_proc, fast_proc = DinoImageProcessorPil(), DinoImageProcessor()
    for name, info in meta.items():
        rgb = np.asarray(Image.open(COCO_MINI / info["split"] / name).convert("RGB"))
        chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
        exact = pil_proc.resize(chw, size=pil_proc.size)
        digest = hashlib.sha256(np.ascontiguousarray(exact.transpose(1, 2, 0)).tobytes()).hexdigest()
        assert digest == info["resized_uint8_rgb_sha256"], name
        fast = fast_proc.resize(torch.from_numpy(chw), size=fast_proc.size).numpy()
        assert fast.shape == exact.shape
        assert np.abs(fast.astype(int) - exact.astype(int)).max() <= 1


# ----------------------------------------------------------------------------------------------------------------------
# Batched, padded inputs and targets vs the model fixtures (reduced size 320 / 512)
# ----------------------------------------------------------------------------------------------------------------------


@needs_parity
@needs_coco
@pytest.mark.parametrize("fixture", ["r50_4scale", "swinl_4scale"])
@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_batch_matches_fixture_inputs(fixture, cls, coco_val):
    inputs = _load_safetensors(PARITY / fixture / "inputs.safetensors")
    image_ids = [int(inputs[f"targets.{b}.image_id"]) for b in range(2)]
    images = [Image.open(COCO_MINI / "val2017" / f"{i:012d}.jpg") for i in image_ids]
    annotations = [{"image_id": i, "annotations": coco_val[i]} for i in image_ids]

    processor = cls(size={"shortest_edge": 320, "longest_edge": 512})
    out = processor(images, annotations=annotations, return_tensors="pt")

    assert out["pixel_values"].shape == inputs["pixel_values"].shape
    atol = EXACT_ATOL if cls is DinoImageProcessorPil else FAST_ATOL
    diff = (out["pixel_values"] - inputs["pixel_values"]).abs().max().item()
    assert diff <= atol
    # padding is exactly zero and the mask is the HF convention (1 = pixel): the fixture's is True on padding
    assert out["pixel_mask"].dtype == torch.int64
    assert torch.equal(out["pixel_mask"].bool(), ~inputs["pixel_mask"])
    padding = ~out["pixel_mask"].bool()[:, None].expand_as(out["pixel_values"])
    assert torch.all(out["pixel_values"].masked_select(padding) == 0)

    for b in range(2):
        labels = out["labels"][b]
        for ours, theirs in [
            ("class_labels", "labels"),
            ("iscrowd", "iscrowd"),
            ("orig_size", "orig_size"),
            ("size", "size"),
            ("image_id", "image_id"),
        ]:
            assert torch.equal(labels[ours], inputs[f"targets.{b}.{theirs}"]), (b, ours)
        assert labels["class_labels"].dtype == torch.int64
        torch.testing.assert_close(labels["boxes"], inputs[f"targets.{b}.boxes"], atol=1e-6, rtol=0)
        torch.testing.assert_close(labels["area"], inputs[f"targets.{b}.area"], atol=1e-2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Post-processing vs the original PostProcess
# ----------------------------------------------------------------------------------------------------------------------


def _canonical(scores, labels, boxes):
    """Order detections by (score desc, label, box) so that exact score ties compare as sets."""
    rows = sorted(
        zip(scores.tolist(), labels.tolist(), [tuple(b) for b in boxes.tolist()]),
        key=lambda r: (-r[0], r[1], r[2]),
    )
    return (
        torch.tensor([r[0] for r in rows]),
        torch.tensor([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows]),
    )


@needs_parity
@pytest.mark.parametrize("fixture", ["r50_4scale", "swinl_4scale"])
def test_post_process_reproduces_original(fixture):
    expected = _load_safetensors(PARITY / fixture / "expected.safetensors")
    outputs = SimpleNamespace(logits=expected["pred_logits"], pred_boxes=expected["pred_boxes"])
    target_sizes = expected["postprocess.target_sizes"]
    results = DinoImageProcessor().post_process_object_detection(outputs, 0.0, target_sizes, 300)
    assert len(results) == 2
    for b, result in enumerate(results):
        assert result["scores"].shape == (300,) and result["labels"].dtype == torch.int64
        ours = _canonical(result["scores"], result["labels"], result["boxes"])
        ref = _canonical(
            expected[f"postprocess.{b}.scores"], expected[f"postprocess.{b}.labels"], expected[f"postprocess.{b}.boxes"]
        )
        torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=0)
        assert torch.equal(ours[1], ref[1])
        torch.testing.assert_close(ours[2], ref[2], atol=1e-3, rtol=0)  # pixels
        # scores come sorted descending, like torch.topk in the original
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])


@needs_parity
def test_post_process_threshold_target_size_forms_and_top_k():
    expected = _load_safetensors(PARITY / "r50_4scale" / "expected.safetensors")
    outputs = {"pred_logits": expected["pred_logits"], "pred_boxes": expected["pred_boxes"]}  # plain dict works too
    sizes = expected["postprocess.target_sizes"]
    all_300 = post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    as_list = post_process_object_detection(outputs, 0.0, [tuple(s) for s in sizes.tolist()])
    for a, b in zip(all_300, as_list):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])

    # threshold keeps exactly the top-300 entries with a score above it, in order
    threshold = float(expected["postprocess.0.scores"][40])
    kept = post_process_object_detection(outputs, threshold, sizes)
    for b, result in enumerate(kept):
        ref_scores = expected[f"postprocess.{b}.scores"]
        assert torch.equal(result["scores"], ref_scores[ref_scores > threshold])
        assert len(result["scores"]) == len(result["labels"]) == len(result["boxes"])

    # no target sizes: normalized xyxy; smaller top_k = prefix of the top-300 scores
    normalized = post_process_object_detection(outputs, 0.0, None, top_k=10)
    for b, result in enumerate(normalized):
        assert result["scores"].shape == (10,)
        torch.testing.assert_close(result["scores"], expected[f"postprocess.{b}.scores"][:10], atol=1e-6, rtol=0)
        h, w = sizes[b].tolist()
        scaled = result["boxes"] * torch.tensor([w, h, w, h])
        ref = expected[f"postprocess.{b}.boxes"][:10]
        # compare as sets (ties in score could reorder)
        assert torch.cdist(scaled, ref).min(dim=1).values.max() < 1e-3

    with pytest.raises(ValueError):
        post_process_object_detection(outputs, 0.5, sizes[:1])
    # a threshold that is not a score: NaN kept all top-300, 2 silently none
    for bad in (float("nan"), -0.5, 2.0):
        with pytest.raises(ValueError, match="threshold must be a score in"):
            post_process_object_detection(outputs, bad, sizes)
    assert [len(r["scores"]) for r in post_process_object_detection(outputs, 1.0, sizes)] == [0, 0]


def test_post_process_small_synthetic_and_huge_top_k():
    logits = torch.tensor([[[-10.0, 2.0], [0.0, -10.0]]])  # 2 queries x 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])
    (result,) = post_process_object_detection(SimpleNamespace(logits=logits, pred_boxes=boxes), 0.3, [(100, 200)], 1000)
    assert result["labels"].tolist() == [1, 0]
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([2.0, 0.0])))
    torch.testing.assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]))


# ----------------------------------------------------------------------------------------------------------------------
# Input types and modes
# ----------------------------------------------------------------------------------------------------------------------


def _normalized(rgb_uint8: np.ndarray) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (torch.from_numpy(np.array(rgb_uint8)).permute(2, 0, 1).float() / 255 - mean) / std


SMALL = {"shortest_edge": 32, "longest_edge": 64}


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_pil_modes_become_rgb(cls):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    processor = cls(do_resize=False)

    def run(image):
        out = processor(image, return_tensors="pt")["pixel_values"][0]
        assert out.shape == (3, 20, 30)
        return out

    reference = _normalized(rgb)
    torch.testing.assert_close(run(Image.fromarray(rgb)), reference)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)], axis=-1)
    torch.testing.assert_close(run(Image.fromarray(rgba)), reference)  # alpha dropped, like convert("RGB")
    gray_rgb = np.repeat(gray[..., None], 3, axis=-1)
    torch.testing.assert_close(run(Image.fromarray(gray)), _normalized(gray_rgb))
    torch.testing.assert_close(run(Image.fromarray(gray).convert("LA")), _normalized(gray_rgb))
    palette = Image.fromarray(rgb).convert("P")
    torch.testing.assert_close(run(palette), _normalized(np.asarray(palette.convert("RGB"))))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    torch.testing.assert_close(run(cmyk), _normalized(np.asarray(cmyk.convert("RGB"))))
    run(Image.fromarray(gray).convert("1"))

    # 16-bit: scaled to 8 bit (PIL's own convert("RGB") would clip everything above 255 to white)
    gray16 = gray.astype(np.uint16) * 257
    torch.testing.assert_close(run(Image.fromarray(gray16)), _normalized(gray_rgb))
    torch.testing.assert_close(run(Image.fromarray(gray16.astype(np.int32))), _normalized(gray_rgb))
    torch.testing.assert_close(run(Image.fromarray(gray.astype(np.int32))), _normalized(gray_rgb))
    torch.testing.assert_close(
        run(Image.fromarray(gray.astype(np.float32) / 255)), _normalized(gray_rgb), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_numpy_and_torch_inputs(cls):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    reference = _normalized(rgb)
    processor = cls(do_resize=False)
    for image in [
        rgb,  # HWC numpy
        np.ascontiguousarray(rgb.transpose(2, 0, 1)),  # CHW numpy
        torch.from_numpy(rgb).permute(2, 0, 1),  # CHW tensor
        np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=-1),  # RGBA numpy
        rgb.astype(np.uint16) * 257,  # 16-bit numpy
    ]:
        out = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    gray = rgb[..., 0]
    out = processor(gray, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(out, _normalized(np.repeat(gray[..., None], 3, -1)), atol=1e-6, rtol=0)
    # float inputs follow the transformers convention (0..255 unless do_rescale=False), with its warning when all
    # values lie in [0, 1] (rescaled twice: a near-black input)
    with pytest.warns(UserWarning, match="pass do_rescale=False"):
        processor(rgb.astype(np.float32) / 255, return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = processor(rgb.astype(np.float32) / 255, do_rescale=False, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        out = processor(torch.from_numpy(rgb.astype(np.float32)), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        processor(np.zeros((20, 30, 7), np.uint8))


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_exif_orientation_is_applied(cls, tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=100)
    processor = cls(do_resize=False, do_normalize=False)
    upright = processor(str(path), return_tensors="pt")["pixel_values"][0]
    assert upright.shape == (3, 40, 20)
    assert upright[:, :20].mean() > 0.9 and upright[:, 20:].mean() < 0.1  # the white half is now on top
    raw = processor(Image.open(path), apply_exif_orientation=False, return_tensors="pt")["pixel_values"][0]
    assert raw.shape == (3, 20, 40)


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_annotations_of_an_exif_rotated_image_warn(cls, tmp_path):
    """Annotations next to an image the processor turns upright are read in the upright frame; boxes of the stored
    pixels (COCO files) were silently clipped away or misplaced. Now a warning names the image and the option; none
    with apply_exif_orientation=False, without annotations, or for an image without EXIF rotation."""
    import warnings

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (40, 100)).save(path, exif=exif.tobytes())
    target = {"image_id": 1, "annotations": [{"bbox": [24, 12.5, 12, 25], "category_id": 1}]}
    processor = cls(do_resize=False)
    with pytest.warns(UserWarning, match=r"Image\(s\) \[1\] .*EXIF orientation.*apply_exif_orientation=False"):
        processor([Image.new("RGB", (40, 100)), str(path)], annotations=[target, target], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = processor(str(path), annotations=target, apply_exif_orientation=False, return_tensors="pt")
        torch.testing.assert_close(out["labels"][0]["boxes"], torch.tensor([[0.75, 0.25, 0.3, 0.25]]))
        processor(str(path), return_tensors="pt")
        cls(do_resize=False, apply_exif_orientation=False)(str(path), annotations=target, return_tensors="pt")


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_batch_of_different_sizes_is_padded(cls):
    images = [Image.new("RGB", (30, 20), (255, 0, 0)), Image.new("RGB", (20, 50), (0, 255, 0))]
    out = cls(size=SMALL)(images, return_tensors="pt")
    # 20x30 -> 32x48; 50x20: short = round(64 * 20 / 50) = 26, long = int(26 * 50 / 20) = 65 (the original also
    # exceeds the maximum through the rounding)
    sizes = [get_dino_resize_output_size(20, 30, 32, 64), get_dino_resize_output_size(50, 20, 32, 64)]
    assert sizes == [(32, 48), (65, 26)]
    assert out["pixel_values"].shape == (2, 3, 65, 48)
    assert out["pixel_mask"].shape == (2, 65, 48)
    for b, (h, w) in enumerate(sizes):
        assert out["pixel_mask"][b].sum() == h * w and out["pixel_mask"][b, :h, :w].all()
        assert torch.all(out["pixel_values"][b, :, h:, :] == 0) and torch.all(out["pixel_values"][b, :, :, w:] == 0)
    unpadded = cls(size=SMALL, do_pad=False)(images)
    assert "pixel_mask" not in unpadded and [tuple(x.shape[-2:]) for x in unpadded["pixel_values"]] == sizes
    # unpadded images of different sizes fit no tensor: our own message (transformers' suggested a `padding=True`
    # argument that image processors do not take); images of one size still stack
    for tensors in ("pt", "np"):
        with pytest.raises(ValueError, match=r"do_pad=False keeps the images at their own sizes \(32x48, 65x26\).*do_pad=True"):
            cls(size=SMALL, do_pad=False)(images, return_tensors=tensors)
    assert cls(size=SMALL, do_pad=False)(images[:1], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 48)


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_fixed_pad_size(cls):
    out = cls(size=SMALL, pad_size={"height": 70, "width": 80})(Image.new("RGB", (30, 20)), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 70, 80) and out["pixel_mask"][0].sum() == 32 * 48
    with pytest.raises(ValueError):
        cls(size=SMALL, pad_size={"height": 16, "width": 16})(Image.new("RGB", (30, 20)))


def test_fast_processor_accepts_device_and_stays_on_it():
    out = DinoImageProcessor(size=SMALL)(Image.new("RGB", (30, 20)), device="cpu", return_tensors="pt")
    assert out["pixel_values"].device.type == "cpu"


# ----------------------------------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_bad_inputs_raise_clear_errors(cls):
    """Mistakes in what is passed name the problem (they raised IndexError / KeyError / TypeError / RuntimeError from
    deep inside before)."""
    processor = cls(size={"shortest_edge": 64, "longest_edge": 96})
    image = Image.new("RGB", (80, 60))
    with pytest.raises(ValueError, match="No images to process"):
        processor([], return_tensors="pt")
    for bad in [{"category_id": 1}, {"bbox": [1, 1, 5, 5], "category_id": "1"}, {"bbox": [1, 1, 5], "category_id": 1}]:
        with pytest.raises(ValueError, match=r"Annotation 0 of image 7 must be a dict with 'bbox' \[x, y, w, h\]"):
            processor(image, annotations={"image_id": 7, "annotations": [bad]}, return_tensors="pt")
    # integral floats and numpy integers are class ids too
    labels = processor(image, annotations={"image_id": 7, "annotations": [
        {"bbox": [1, 1, 5, 5], "category_id": 3.0}, {"bbox": [2, 2, 5, 5], "category_id": np.int64(4)}]},
        return_tensors="pt")["labels"][0]
    assert labels["class_labels"].tolist() == [3, 4]

    outputs = {"logits": torch.randn(2, 10, 3), "pred_boxes": torch.rand(2, 10, 4)}
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        processor.post_process_object_detection(outputs, top_k=-1)
    assert all(len(r["scores"]) == 0 for r in processor.post_process_object_detection(outputs, top_k=0))
    with pytest.raises(ValueError, match=r"one \(height, width\) pair per image"):
        processor.post_process_object_detection(outputs, target_sizes=(480, 640))
    with pytest.raises(ValueError, match=r"target_sizes must be \[batch, 2\]"):
        processor.post_process_object_detection(outputs, target_sizes=torch.tensor([[480, 640, 1], [480, 640, 1]]))


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_annotations_clipped_and_degenerate_dropped_consistently(cls):
    image = Image.new("RGB", (100, 50))  # W=100, H=50
    anns = {
        "image_id": 7,
        "annotations": [
            {"bbox": [10, 10, 20, 10], "category_id": 1, "area": 200.0, "iscrowd": 0},  # kept
            {"bbox": [90, 40, 50, 50], "category_id": 2, "area": 2500.0, "iscrowd": 0},  # clipped to [90,40,100,50]
            {"bbox": [10, 10, 0, 5], "category_id": 3, "area": 0.0, "iscrowd": 0},  # zero width: dropped
            {"bbox": [120, 10, 10, 10], "category_id": 4, "area": 100.0, "iscrowd": 0},  # outside: dropped
            {"bbox": [0, 0, 50, 50], "category_id": 5, "area": 2500.0, "iscrowd": 1},  # crowd: dropped
            {"bbox": [0, 0, 10, 10], "category_id": 6},  # no area / iscrowd: area from the box
        ],
    }
    out = cls(do_resize=False)(image, annotations=anns, return_tensors="pt")
    labels = out["labels"][0]
    assert labels["class_labels"].tolist() == [1, 2, 6]
    assert labels["iscrowd"].tolist() == [0, 0, 0]
    torch.testing.assert_close(labels["area"], torch.tensor([200.0, 2500.0, 100.0]))
    expected_xyxy = torch.tensor([[10.0, 10, 30, 20], [90, 40, 100, 50], [0, 0, 10, 10]])
    corners_sum, sizes = expected_xyxy[:, :2] + expected_xyxy[:, 2:], expected_xyxy[:, 2:] - expected_xyxy[:, :2]
    cxcywh = torch.cat([corners_sum / 2, sizes], 1)
    torch.testing.assert_close(labels["boxes"], cxcywh / torch.tensor([100.0, 50, 100, 50]))
    assert labels["image_id"].tolist() == [7] and labels["size"].tolist() == [50, 100]

    resized = cls(size={"shortest_edge": 100, "longest_edge": 400})(image, annotations=anns, return_tensors="pt")
    r = resized["labels"][0]
    assert r["size"].tolist() == [100, 200] and r["orig_size"].tolist() == [50, 100]
    torch.testing.assert_close(r["boxes"], labels["boxes"])  # normalized boxes do not change with the resize
    torch.testing.assert_close(r["area"], labels["area"] * 4)

    absolute = cls(do_resize=False, do_convert_annotations=False)(image, annotations=anns, return_tensors="pt")
    torch.testing.assert_close(absolute["labels"][0]["boxes"], expected_xyxy)


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_empty_and_mismatched_annotations(cls):
    image = Image.new("RGB", (40, 30))
    out = cls(size=SMALL)(image, annotations={"image_id": 1, "annotations": []}, return_tensors="pt")
    labels = out["labels"][0]
    assert labels["boxes"].shape == (0, 4) and labels["class_labels"].shape == (0,) and labels["area"].shape == (0,)
    with pytest.raises(ValueError, match="do not match"):
        cls(size=SMALL)([image, image], annotations=[{"image_id": 1, "annotations": []}])
    with pytest.raises(ValueError, match="COCO-detection"):
        cls(size=SMALL)(image, annotations={"boxes": []})
    # DETR-style keyword call with an explicit format
    out = cls(size=SMALL)(images=image, annotations={"image_id": 1, "annotations": []}, format="coco_detection")
    assert out["labels"][0]["size"].tolist() == [32, 42]
    with pytest.raises(ValueError, match="COCO-detection"):
        cls(size=SMALL)(image, annotations={"image_id": 1, "annotations": []}, format="coco_panoptic")


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_unreadable_files_raise_error_naming_the_file(cls, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    missing = tmp_path / "missing.jpg"
    processor = cls()
    for path in [empty, garbage, truncated, missing]:
        with pytest.raises(ValueError, match=path.name):
            processor(str(path))


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_tiny_huge_aspect_and_16bit_files(cls, tmp_path):
    processor = cls()
    one = processor(Image.new("RGB", (1, 1), (255, 255, 255)), return_tensors="pt")
    assert one["pixel_values"].shape == (1, 3, 800, 800)
    white = _normalized(np.full((1, 1, 3), 255, np.uint8))[:, 0, 0]
    torch.testing.assert_close(one["pixel_values"][0, :, 400, 400], white)

    wide = processor(Image.new("RGB", (4000, 10)), return_tensors="pt")
    assert wide["pixel_values"].shape == (1, 3, 3, 1200)
    very_wide = processor(Image.new("L", (20000, 2)), return_tensors="pt")
    assert very_wide["pixel_values"].shape == (1, 3, 1, 1333)

    path = tmp_path / "gray16.png"
    gray16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(gray16).save(path)
    out = cls(do_resize=False, do_normalize=False)(str(path), return_tensors="pt")["pixel_values"][0]
    assert out.shape == (3, 30, 40)
    expected = torch.from_numpy(np.round(gray16 / 257.0) / 255.0).float()
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_resize_to_a_single_pixel():
    """A 1x1 output (a tiny `size`, a TTA scale near 0) failed an internal assert of torch's uint8 antialiased kernel
    on the torchvision processor. Reference: PIL's antialiased bilinear resize on the PIL processor, which for a
    1x1 output is a tent-weighted mean of the image, close to its plain mean."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for size in ({"height": 1, "width": 1}, {"shortest_edge": 1, "longest_edge": 2}):
        fast = DinoImageProcessor(do_normalize=False)(image, size=size, return_tensors="pt")["pixel_values"]
        pil = DinoImageProcessorPil(do_normalize=False)(image, size=size, return_tensors="pt")["pixel_values"]
        assert fast.shape == pil.shape == (1, 3, 1, 1)
        torch.testing.assert_close(fast, pil, atol=1 / 255 + 1e-6, rtol=0)
        mean = torch.from_numpy(np.asarray(image, dtype=np.float64).mean((0, 1)) / 255).float()
        torch.testing.assert_close(fast[0, :, 0, 0], mean, atol=0.05, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Serialization / AutoImageProcessor
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", PROCESSORS, ids=lambda c: c.__name__)
def test_save_and_load_round_trip(cls, tmp_path):
    processor = cls(size={"shortest_edge": 320, "longest_edge": 512}, apply_exif_orientation=False)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "DinoImageProcessor"
    assert config["size"] == {"shortest_edge": 320, "longest_edge": 512}
    assert config["apply_exif_orientation"] is False
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.size.shortest_edge == 320 and loaded.size.longest_edge == 512
    assert loaded.apply_exif_orientation is False
    assert loaded.model_input_names == ["pixel_values", "pixel_mask"]


def _registered_dino_backends() -> dict:
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    for mapping in IMAGE_PROCESSOR_MAPPING._extra_content.values():
        if DinoImageProcessor in mapping.values():
            return dict(mapping)
    return {}


def test_auto_image_processor_after_import(tmp_path):
    import hf_dino
    from transformers import AutoImageProcessor

    assert _registered_dino_backends().get("torchvision") is DinoImageProcessor, "import hf_dino must register it"
    DinoImageProcessor().save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is DinoImageProcessor
    assert hf_dino.DinoImageProcessor is DinoImageProcessor


def test_auto_image_processor_pil_backend(tmp_path):
    import hf_dino  # noqa: F401
    from transformers import AutoImageProcessor

    # hf_dino/__init__.py registers both backends: image_processor_classes={'torchvision': ..., 'pil': ...}
    assert _registered_dino_backends().get("pil") is DinoImageProcessorPil
    DinoImageProcessor(size={"shortest_edge": 320, "longest_edge": 512}).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(loaded) is DinoImageProcessorPil and loaded.size.shortest_edge == 320
