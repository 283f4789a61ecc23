"""`pipeline("object-detection")` and `hf-dino predict` end to end on COCO-MINI images with a tiny random DINO.

Random weights: the detections are meaningless; what is checked is the plumbing (loading a saved folder through the
Auto classes, pre/post-processing, label names, output formats, error handling).
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COCO_MINI, REPO, subprocess_env, tiny_model

VAL = COCO_MINI / "val2017"
IMAGE_A = VAL / "000000000139.jpg"  # 640x426
IMAGE_B = VAL / "000000000802.jpg"  # 424x640

pytestmark = pytest.mark.skipif(
    not IMAGE_A.is_file() or not IMAGE_B.is_file(),
    reason="COCO-MINI not found at ../shared/data/coco-mini (relative to the repo root)",
)

SMALL_SIZE = {"shortest_edge": 128, "longest_edge": 192}  # keeps the forward passes fast on CPU


def _import_model():
    from hf_dino import DinoConfig, DinoForObjectDetection, DinoImageProcessor  # an import error fails the tests

    return DinoConfig, DinoForObjectDetection, DinoImageProcessor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    _, _, DinoImageProcessor = _import_model()
    # plumbing under test: no C++ extension build in these tests
    model = tiny_model(seed=0, num_feature_levels=2, backbone_out_indices=[2, 3], decoder_layers=2,
                       disable_custom_kernels=True)
    folder = tmp_path_factory.mktemp("tiny_dino")
    model.save_pretrained(folder)
    DinoImageProcessor(size=SMALL_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def detector(model_dir):
    from transformers import pipeline

    return pipeline("object-detection", model=str(model_dir))


@pytest.fixture(scope="module")
def reference(model_dir):
    """Processor + model + post-processing by hand (what the pipeline must reproduce)."""
    from hf_dino import DinoForObjectDetection, DinoImageProcessor

    processor = DinoImageProcessor.from_pretrained(model_dir)
    model = DinoForObjectDetection.from_pretrained(model_dir).eval()

    def run(image: Image.Image, threshold: float = 0.0):
        with torch.no_grad():
            outputs = model(**processor(image, return_tensors="pt"))
        (result,) = processor.post_process_object_detection(outputs, threshold, [(image.height, image.width)])
        return result, model.config.id2label

    return run


@pytest.fixture(scope="module")
def detections_a(detector):
    return detector(str(IMAGE_A), threshold=0.0)


def _check_detections(detections, id2label, image_size, expected_count=None):
    width, height = image_size
    if expected_count is not None:
        assert len(detections) == expected_count
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    for det in detections:
        assert set(det) == {"score", "label", "box"}
        assert 0.0 <= det["score"] <= 1.0
        assert det["label"] in set(id2label.values())
        box = det["box"]
        assert set(box) == {"xmin", "ymin", "xmax", "ymax"} and all(isinstance(v, int) for v in box.values())
        assert box["xmin"] <= box["xmax"] and box["ymin"] <= box["ymax"]
        # normalized boxes in (0, 1) map to (about) the image; DINO boxes can overhang slightly
        assert -width <= box["xmin"] and box["xmax"] <= 2 * width
        assert -height <= box["ymin"] and box["ymax"] <= 2 * height


# ----------------------------------------------------------------------------------------------------------------------
# pipeline
# ----------------------------------------------------------------------------------------------------------------------


def test_pipeline_loads_dino_processor_and_matches_manual_computation(detector, reference, detections_a):
    from hf_dino import DinoImageProcessor

    assert type(detector.image_processor) is DinoImageProcessor
    assert detector.image_processor.size.shortest_edge == SMALL_SIZE["shortest_edge"]

    detections = detections_a
    image = Image.open(IMAGE_A)
    reference, id2label = reference(image)
    _check_detections(detections, id2label, image.size, expected_count=300)  # top_k = 300 of 20 queries x 91 classes
    torch.testing.assert_close(torch.tensor([d["score"] for d in detections]), reference["scores"], atol=1e-5, rtol=0)
    assert [d["label"] for d in detections] == [id2label[i] for i in reference["labels"].tolist()]
    boxes = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in detections])
    assert (boxes - reference["boxes"].int()).abs().max() <= 1
    assert len({tuple(b) for b in boxes.tolist()}) > 5  # real, distinct boxes

    # PIL input gives the same detections as the path
    assert detector(Image.open(IMAGE_A), threshold=0.0) == detections
    # threshold filters
    kept = detector(str(IMAGE_A), threshold=float(reference["scores"][10]))
    assert kept == detections[: len(kept)] and 0 < len(kept) <= 10


def test_pipeline_list_of_images_of_different_sizes(detector, reference, tmp_path):
    gray_path = tmp_path / "gray.png"
    Image.open(IMAGE_B).convert("L").resize((200, 150)).save(gray_path)
    inputs = [str(IMAGE_B), str(gray_path)]
    results = detector(inputs, threshold=0.0)
    assert isinstance(results, list) and len(results) == 2
    for source, detections in zip(inputs, results):
        image = Image.open(source)
        expected, id2label = reference(image)
        _check_detections(detections, id2label, image.size, expected_count=300)
        boxes = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in detections])
        assert (boxes - expected["boxes"].int()).abs().max() <= 1  # boxes in each image's own size


def test_pipeline_scales_sixteen_bit_images(detector, reference, tmp_path):
    """A 16-bit PNG reaches the model as the processor makes it (scaled to 8 bit), by path, as a PIL image and as
    base64: transformers' `load_image` would convert it with PIL's `convert("RGB")`, which clips it nearly white."""
    import base64

    import numpy as np

    rgb = np.array(Image.open(IMAGE_A).convert("L").resize((160, 120)), dtype=np.uint16) * 257
    path = tmp_path / "sixteen.png"
    Image.fromarray(rgb).save(path)
    assert Image.open(path).mode.startswith("I")
    expected, _ = reference(Image.open(path))  # the processor scales 16-bit images
    clipped, _ = reference(Image.open(path).convert("RGB"))
    assert not torch.allclose(expected["scores"], clipped["scores"])
    encoded = base64.b64encode(path.read_bytes()).decode()
    for source in (str(path), Image.open(path), encoded):
        detections = detector(source, threshold=0.0)
        scores = torch.tensor([d["score"] for d in detections])
        torch.testing.assert_close(scores, expected["scores"], atol=1e-5, rtol=0)


def test_pipeline_url_input(detector, detections_a):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(VAL))
    handler.log_message = lambda *args, **kwargs: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{IMAGE_A.name}"
        try:
            from_url = detector(url, threshold=0.0)
        except Exception as error:  # noqa: BLE001 - e.g. a proxy that refuses localhost
            pytest.skip(f"cannot fetch from a local HTTP server here: {error}")
    finally:
        server.shutdown()
        server.server_close()
    assert from_url == detections_a


def test_pipeline_bad_files_name_the_file(detector, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image" * 20)
    missing = tmp_path / "missing.jpg"
    for path in (empty, corrupt, missing):
        with pytest.raises(Exception, match=path.name):
            detector(str(path))


def test_pipeline_tiny_and_extreme_images(detector):
    one = detector(Image.new("RGB", (1, 1), (90, 120, 200)), threshold=0.0)
    _check_detections(one, detector.model.config.id2label, (1, 1), expected_count=300)
    wide = detector(Image.new("RGB", (3000, 8), (20, 200, 20)), threshold=0.0)
    _check_detections(wide, detector.model.config.id2label, (3000, 8), expected_count=300)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_console_script_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'hf-dino = "hf_dino_cli:main"' in pyproject


def test_cli_help_imports_neither_torch_nor_hf_dino():
    """`hf-dino ... --help` and argument errors answer from argparse alone (importing hf_dino takes seconds)."""
    code = (
        "import sys, hf_dino_cli\n"
        "for argv in (['--help'], ['predict', '--help'], ['export', '--help'], ['predict', 'a.jpg']):\n"
        "    try:\n"
        "        hf_dino_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('IMPORTED', sorted({'torch', 'transformers', 'hf_dino', 'numpy'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "IMPORTED []" in result.stdout, result.stdout[-500:]
    assert "--onnx" in result.stdout and "--opset" in result.stdout and "--tta-scales" in result.stdout
    assert "give --model (PyTorch) or --onnx" in result.stderr  # `predict` without a model: checked before imports


def test_cli_has_predict_subcommand():
    from hf_dino_cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["predict", "a.jpg", "dir", "--model", "m", "--threshold", "0.4", "--batch-size", "2"])
    assert args.command == "predict" and args.inputs == ["a.jpg", "dir"] and args.threshold == 0.4
    assert args.batch_size == 2 and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    from hf_dino_cli import main

    assert main(["predict", "a.jpg"]) == 2  # --model (or --onnx) is required


def test_pipeline_batches_images_of_different_sizes(detector, model_dir):
    """batch_size=2 on a landscape and a portrait image: the batch is padded to a shared size exactly as the
    processor pads a list of images, and a last, partial batch holds one image at its own size. A generator of
    images (no length) is batched the same way."""
    from hf_dino import DinoForObjectDetection, DinoImageProcessor

    batched = detector([str(IMAGE_A), str(IMAGE_B), str(IMAGE_A)], threshold=0.0, batch_size=2)
    assert len(batched) == 3
    streamed = list(detector((str(path) for path in (IMAGE_A, IMAGE_B, IMAGE_A)), threshold=0.0, batch_size=2))
    assert streamed == batched

    processor = DinoImageProcessor.from_pretrained(model_dir)
    model = DinoForObjectDetection.from_pretrained(model_dir).eval()
    images = [Image.open(IMAGE_A).convert("RGB"), Image.open(IMAGE_B).convert("RGB")]

    def detect(batch):
        with torch.no_grad():
            outputs = model(**processor(batch, return_tensors="pt"))
        sizes = [(image.height, image.width) for image in batch]
        return processor.post_process_object_detection(outputs, 0.0, sizes)

    expected = detect(images) + detect(images[:1])  # [A, B] padded together, then A alone
    for got, want in zip(batched, expected):
        assert len(got) == len(want["scores"])
        torch.testing.assert_close(torch.tensor([d["score"] for d in got]), want["scores"], rtol=0, atol=1e-6)
        labels = [model.config.id2label[int(label)] for label in want["labels"]]
        assert [d["label"] for d in got] == labels
        boxes = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in got])
        assert (boxes - want["boxes"].int()).abs().max() <= 1


@pytest.fixture()
def input_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for source in (IMAGE_A, IMAGE_B):
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"this is no PNG" * 30)
    truncated = io.BytesIO()
    Image.open(IMAGE_A).save(truncated, "JPEG")
    (folder / "truncated.jpg").write_bytes(truncated.getvalue()[:5000])
    Image.new("RGB", (1, 1), (250, 10, 10)).save(folder / "one_pixel.png")
    Image.new("RGB", (2000, 6), (10, 10, 250)).save(folder / "very_wide.png")
    Image.open(IMAGE_B).convert("L").save(folder / "gray.png")
    ramp = (np.arange(120 * 80, dtype=np.uint32).reshape(80, 120) * 6).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.png")
    (folder / "notes.txt").write_text("not an image: ignored when scanning the folder")
    return folder


def test_cli_predict_end_to_end(model_dir, input_folder, tmp_path, capsys):
    from hf_dino_cli import main

    out = tmp_path / "out"
    missing = tmp_path / "does_not_exist.jpg"
    rc = main(
        [
            "predict", str(input_folder), str(missing), "--model", str(model_dir), "--threshold", "0.0",
            "--top-k", "50", "--device", "cpu", "--batch-size", "3", "--out", str(out), "--max-draw", "20",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1  # some inputs failed, the others' results are kept

    # every bad input is reported, naming the file
    for name in ("empty.jpg", "corrupt.png", "truncated.jpg", missing.name):
        assert name in captured.err
    summary = json.loads((out / "images.json").read_text())
    failed = {Path(e["input"]).name for e in summary["errors"]}
    assert failed == {"empty.jpg", "corrupt.png", "truncated.jpg", missing.name}

    good = {"000000000139.jpg", "000000000802.jpg", "one_pixel.png", "very_wide.png", "gray.png", "sixteen_bit.png"}
    records = {Path(r["file_name"]).name: r for r in summary["images"]}
    assert set(records) == good
    assert records["000000000139.jpg"]["id"] == 139 and records["000000000802.jpg"]["id"] == 802
    assert (records["000000000139.jpg"]["width"], records["000000000139.jpg"]["height"]) == (640, 426)
    assert len({r["id"] for r in records.values()}) == len(records)

    # COCO results: 50 per image (top-k, threshold 0), [x, y, w, h] boxes, category ids of the model
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 50 * len(good)
    for p in predictions:
        assert set(p) == {"image_id", "category_id", "bbox", "score"}
        assert 0 <= p["category_id"] < 91 and len(p["bbox"]) == 4 and p["bbox"][2] >= 0 and p["bbox"][3] >= 0
    by_image = {}
    for p in predictions:
        by_image.setdefault(p["image_id"], []).append(p)
    assert set(by_image) == {r["id"] for r in records.values()}

    # the results load into pycocotools against the COCO-MINI ground truth
    pycocotools = pytest.importorskip("pycocotools.coco")
    gt = pycocotools.COCO(str(COCO_MINI / "annotations" / "instances_val2017.json"))
    coco_dt = gt.loadRes([p for p in predictions if p["image_id"] in (139, 802)])
    assert len(coco_dt.getAnnIds()) == 100

    # annotated images: one per readable input, original size, visibly drawn on
    for name, record in records.items():
        annotated = out / record["annotated"]
        assert annotated.is_file()
        drawn = np.asarray(Image.open(annotated).convert("RGB"), dtype=np.int16)
        assert drawn.shape[:2] == (record["height"], record["width"])
    original = np.asarray(Image.open(IMAGE_A).convert("RGB"), dtype=np.int16)
    drawn = np.asarray(Image.open(out / records["000000000139.jpg"]["annotated"]).convert("RGB"), dtype=np.int16)
    changed = (np.abs(drawn - original).max(axis=-1) > 60).mean()
    assert 0.002 < changed < 0.5  # boxes and tags drawn, image still visible

    # progress bar for many images
    assert "hf-dino predict" in captured.err and "img" in captured.err


def test_cli_all_good_inputs_exit_zero_and_threshold(model_dir, tmp_path):
    from hf_dino_cli import main

    out = tmp_path / "out"
    rc = main(["predict", str(IMAGE_B), "--model", str(model_dir), "--threshold", "0.99", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    assert json.loads((out / "predictions.json").read_text()) == []  # nothing above 0.99 with random weights
    assert (out / "000000000802.jpg").is_file()


def test_cli_unloadable_model_is_a_clear_error(tmp_path, capsys):
    from hf_dino_cli import main

    rc = main(["predict", str(IMAGE_A), "--model", str(tmp_path / "no_model_here"), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "cannot load model" in capsys.readouterr().err


def test_cli_model_folder_that_does_not_exist(tmp_path, capsys):
    from hf_dino_cli import main

    for missing in (tmp_path / "no_model_here", "./runs/final", "~/models/dino"):
        rc = main(["predict", str(IMAGE_A), "--model", str(missing), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 1 and f"cannot load model {str(missing)!r}: the model folder {str(missing)!r} does not exist" in err
        assert "Repo id must" not in err


def test_cli_predict_refuses_unsafe_or_ignored_options(model_dir, tmp_path, capsys):
    """Refused before anything is loaded or written: an --out folder holding the input images (the annotated
    images would overwrite them: the inputs were replaced), an --out that is a file, TTA options without --tta
    (ignored before), a non-positive TTA scale (a traceback before), a negative --max-draw, 16-bit or GPU options
    with --onnx (ignored before) and a --threshold that is not a score."""
    import hashlib

    from hf_dino_cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / IMAGE_A.name
    photo.write_bytes(IMAGE_A.read_bytes())
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--out", str(folder)], "holds input images"),
        (["--out", str(a_file)], "is a file, not a folder"),
        (["--out", str(tmp_path / "o1"), "--tta-scales", "1.0", "0.8"], "--tta-scales need --tta"),
        (["--out", str(tmp_path / "o2"), "--tta", "--tta-scales", "1.0", "0"], "--tta-scales must be positive"),
        (["--out", str(tmp_path / "o3"), "--max-draw", "-1"], "--max-draw must be >= 0"),  # drew all but one before
        (["--out", str(tmp_path / "o4"), "--onnx", "m.onnx", "--dtype", "float16"], "--dtype and --device do not"),
        # NaN kept every candidate ("600 detection(s) above nan"), 2 silently none
        (["--out", str(tmp_path / "o5"), "--threshold", "nan"], "--threshold must be a score in [0, 1]"),
        (["--out", str(tmp_path / "o6"), "--threshold", "2"], "--threshold must be a score in [0, 1]"),
    ]
    for options, message in cases:
        rc = main(["predict", str(folder), "--model", str(model_dir), "--no-progress", *options])
        assert rc == 2 and message in capsys.readouterr().err, options
    assert sorted(p.name for p in folder.iterdir()) == [IMAGE_A.name]
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == digest
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))
    # without drawing, only the two JSON files are written: allowed next to the inputs
    assert main(["predict", str(folder), "--model", str(model_dir), "--no-progress", "--no-draw", "--out",
                 str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([IMAGE_A.name, "images.json", "predictions.json"])
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == digest


def test_cli_export_refuses_a_non_positive_static_size(model_dir, tmp_path, capsys):
    from hf_dino_cli import main

    rc = main(["export", "--model", str(model_dir), "--output", str(tmp_path / "m.onnx"), "--static-size", "-5", "10"])
    assert rc == 2 and "--static-size must be two positive numbers" in capsys.readouterr().err  # a traceback before
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_refuses_an_output_that_cannot_be_written_before_exporting(model_dir, tmp_path, capsys):
    """An --output that is a folder (or under a file) ran the whole export, then failed with a traceback."""
    import time

    from hf_dino_cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for output, message in ((tmp_path, "is a folder"), (blocker / "m.onnx", "a parent of it is a file")):
        start = time.perf_counter()
        rc = main(["export", "--model", str(model_dir), "--output", str(output)])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
        assert time.perf_counter() - start < 5  # nothing loaded or exported
    pytest.importorskip("onnx", reason="the `onnx` extra is not installed")
    from hf_dino import DinoForObjectDetection
    from hf_dino.export import export_onnx

    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(DinoForObjectDetection.from_pretrained(model_dir), tmp_path)


def test_cli_refuses_models_that_are_not_dino(tmp_path, capsys):
    from transformers import DetrConfig

    from hf_dino_cli import main

    folder = tmp_path / "detr"
    DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False).save_pretrained(folder)
    rc = main(["predict", str(IMAGE_A), "--model", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "it is a 'detr' model" in err and "hf-dino predict runs DINO models only" in err
    assert "pipeline('object-detection'" in err


def test_cli_rejects_top_k_zero(model_dir, tmp_path, capsys):
    from hf_dino_cli import main

    rc = main(["predict", str(IMAGE_A), "--model", str(model_dir), "--top-k", "0", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--top-k must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_forward_on_an_empty_batch_is_a_clear_error(model_dir):
    from hf_dino import DinoForObjectDetection

    model = DinoForObjectDetection.from_pretrained(model_dir).eval()
    with pytest.raises(ValueError, match=r"pixel_values is empty \(shape \(0, 3, 64, 64\)\): DINO needs at least one"):
        model(pixel_values=torch.zeros(0, 3, 64, 64))


def test_draw_detections_on_sixteen_bit_images_and_with_non_finite_boxes():
    """A 16-bit image is drawn on as the processor sees it (scaled, not clipped to white); a box with a NaN
    coordinate (e.g. a float16 overflow) is left out with a warning, and the other boxes are drawn."""
    from hf_dino.visualization import color_for_label, draw_detections

    array = np.full((100, 200), 32768, dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I")
    detections = {
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([1, 2]),
        "boxes": torch.tensor([[10.0, 20.0, 120.0, 90.0], [float("nan"), 5.0, 50.0, 60.0]]),
    }
    with pytest.warns(RuntimeWarning, match="Not drawing 1 detection"):
        drawn = draw_detections(image, detections, {1: "person", 2: "bicycle"})
    pixels = np.asarray(drawn)
    assert drawn.mode == "RGB" and tuple(pixels[99, 199]) == (128, 128, 128)  # 32768 / 257, rounded
    assert tuple(pixels[50, 10]) == color_for_label("person")
    assert not (pixels == color_for_label("bicycle")).all(-1).any()
    # drawn on as given: an EXIF orientation tag does not rotate the canvas (the boxes are in the image's frame,
    # e.g. train.py's prediction image, predicted without EXIF rotation)
    tagged = Image.new("RGB", (200, 100), (90, 90, 90))
    exif = tagged.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    buffer = io.BytesIO()
    tagged.save(buffer, "JPEG", exif=exif.tobytes())
    stored = Image.open(buffer)
    assert stored.getexif().get(0x0112) == 6
    assert draw_detections(stored, {k: v[:1] for k, v in detections.items()}).size == (200, 100)


def test_draw_detections_colours_and_clipping():
    from hf_dino.visualization import color_for_label, draw_detections

    image = Image.new("RGB", (200, 100), (128, 128, 128))
    detections = {
        "scores": torch.tensor([0.9, 0.5]),
        "labels": torch.tensor([1, 18]),
        "boxes": torch.tensor([[10.0, 20.0, 120.0, 90.0], [-50.0, -50.0, 500.0, 500.0]]),  # second overhangs
    }
    drawn = draw_detections(image, detections, {1: "person", 18: "dog"})
    assert drawn.size == image.size and image.getpixel((0, 0)) == (128, 128, 128)  # input untouched
    pixels = np.asarray(drawn)
    assert tuple(pixels[50, 10]) == color_for_label("person")  # left edge of the first box
    assert tuple(pixels[99, 100]) == color_for_label("dog")  # clipped box drawn along the image border
    assert color_for_label("person") != color_for_label("dog")
    pipeline_style = [{"score": 0.9, "label": "person", "box": {"xmin": 10, "ymin": 20, "xmax": 120, "ymax": 90}}]
    assert tuple(np.asarray(draw_detections(image, pipeline_style))[50, 10]) == color_for_label("person")
