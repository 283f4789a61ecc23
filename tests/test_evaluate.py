"""COCO evaluation: `hf_dino.evaluation` and `examples/evaluate.py` against pycocotools run independently."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from conftest import COCO_MINI, REPO, save_tiny_model_dir  # noqa: E402
from hf_dino.evaluation import (  # noqa: E402
    METRIC_NAMES,
    CocoEvaluator,
    build_label_to_category_id,
    format_metrics_table,
)

VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"
needs_coco_mini = pytest.mark.skipif(
    not VAL_JSON.is_file(), reason=f"COCO-MINI not found at {COCO_MINI} (the shared data folder is absent)"
)


def _quiet_coco(path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _independent_stats(coco_gt: COCO, results: list[dict], img_ids: list[int]) -> np.ndarray:
    """pycocotools alone, the way its own README runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.params.imgIds = sorted(img_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def _jittered_gt_predictions(coco_gt: COCO, seed: int = 0, label_of=lambda cat: cat) -> list[dict]:
    """Detections derived from the ground truth: jittered boxes, random scores, some wrong labels, some misses and
    some extra boxes, so that every metric is non-trivial."""
    rng = np.random.default_rng(seed)
    cat_ids = coco_gt.getCatIds()
    predictions = []
    for image_id in coco_gt.getImgIds():
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id)) if rng.random() > 0.15]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
        boxes += rng.normal(0.0, 0.08, boxes.shape) * np.concatenate([size, size], axis=1)
        labels = [a["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids)) for a in anns]
        n_extra = int(rng.integers(0, 4))
        img = coco_gt.loadImgs(image_id)[0]
        extra_xy = rng.random((n_extra, 2)) * [img["width"] * 0.7, img["height"] * 0.7]
        extra = np.concatenate([extra_xy, extra_xy + rng.random((n_extra, 2)) * 100 + 5], axis=1)
        boxes = np.concatenate([boxes, extra])
        labels = labels + [int(rng.choice(cat_ids)) for _ in range(n_extra)]
        predictions.append(
            {
                "image_id": image_id,
                "scores": torch.tensor(rng.random(len(labels)), dtype=torch.float32),
                "labels": torch.tensor([label_of(c) for c in labels], dtype=torch.int64),
                "boxes": torch.tensor(boxes, dtype=torch.float32),
            }
        )
    return predictions


def _as_coco_results(predictions: list[dict], category_of=lambda label: label) -> list[dict]:
    out = []
    for p in predictions:
        for s, l, b in zip(p["scores"].tolist(), p["labels"].tolist(), p["boxes"].tolist()):
            out.append(
                {"image_id": p["image_id"], "category_id": category_of(l), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            )
    return out


# ---- the evaluator ----------------------------------------------------------------------------------------------


@needs_coco_mini
def test_evaluator_matches_pycocotools_on_jittered_ground_truth():
    coco_gt = _quiet_coco(VAL_JSON)
    predictions = _jittered_gt_predictions(coco_gt)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(predictions[:40])
    evaluator.update(predictions[40:])
    metrics = evaluator.summarize(include_recall=True)

    stats = _independent_stats(coco_gt, _as_coco_results(predictions), coco_gt.getImgIds())
    expected = dict(zip(METRIC_NAMES + ("AR1", "AR10", "AR100", "ARs", "ARm", "ARl"), stats.tolist()))
    assert metrics.keys() == expected.keys()
    for name in expected:
        assert metrics[name] == pytest.approx(expected[name], abs=1e-12), name
    assert 0.2 < metrics["AP"] < 0.95 and metrics["APs"] > 0  # non-trivial numbers
    # the evaluator's own results JSON is what pycocotools scores
    assert len(evaluator.results()) == sum(len(p["scores"]) for p in predictions)


@needs_coco_mini
def test_evaluator_label_mapping_subset_and_table():
    coco_gt = _quiet_coco(VAL_JSON)
    cat_ids = sorted(coco_gt.getCatIds())
    cat_to_label = {c: i for i, c in enumerate(cat_ids)}  # a fine-tuned model with contiguous labels 0..79
    predictions = _jittered_gt_predictions(coco_gt, seed=1, label_of=cat_to_label.__getitem__)
    subset = predictions[:25]
    id2label = {i: coco_gt.loadCats(c)[0]["name"] for c, i in cat_to_label.items()}
    mapping = build_label_to_category_id(id2label, coco_gt)
    assert mapping == {i: c for c, i in cat_to_label.items()}

    evaluator = CocoEvaluator(coco_gt, label_to_category_id=mapping)
    evaluator.update(subset)
    metrics = evaluator.summarize()
    assert list(metrics) == list(METRIC_NAMES)
    stats = _independent_stats(coco_gt, _as_coco_results(subset, mapping.__getitem__), [p["image_id"] for p in subset])
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(stats[:6].tolist(), abs=1e-12)

    table = format_metrics_table(metrics)
    header, rule, row = table.splitlines()
    assert header.split("|")[1:-1] == [f" {n.rjust(max(len(n), 4))} " for n in METRIC_NAMES]
    assert [float(c) for c in row.split("|")[1:-1]] == pytest.approx([round(100 * metrics[n], 1) for n in METRIC_NAMES])


def _coco_from_dict(categories: dict[int, str]):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [],
                    "categories": [{"id": c, "name": n} for c, n in categories.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_label_mapping_is_explicit_when_a_label_id_names_another_category():
    """A COCO-id model (label 2 = "bicycle") on a file whose category 2 is "helmet": only "person" matches by name.
    The mapping used to be None ("labels are category ids") because every *matching* label sat at its id, so the
    bicycle detections were scored as helmets. Now it is {1: 1}; None stays for a file whose shared ids agree."""
    coco_ids_model = {0: "N/A", 1: "person", 2: "bicycle", 3: "car", 12: "N/A"}
    assert build_label_to_category_id(coco_ids_model, _coco_from_dict({1: "person", 2: "helmet", 3: "vest"})) == {1: 1}
    assert build_label_to_category_id(coco_ids_model, _coco_from_dict({1: "person", 3: "Car"})) is None
    # an "N/A" label at an id the file uses for a real category: that label must not be scored as it
    assert build_label_to_category_id(coco_ids_model, _coco_from_dict({1: "person", 12: "stop sign"})) == {1: 1}


def test_evaluator_refuses_an_image_id_not_in_the_ground_truth():
    """A dataset index (0) passed instead of the COCO id: pycocotools raised an unnamed assertion with detections and
    returned -1 for every metric without; now a ValueError names the id, with or without detections."""
    evaluator = CocoEvaluator(_coco_from_dict({1: "person"}))
    for n in (1, 0):
        with pytest.raises(ValueError, match="image_id 0 is not an image of the ground truth"):
            evaluator.update([{"image_id": 0, "scores": [0.9] * n, "labels": [1] * n, "boxes": [[0, 0, 5, 5]] * n}])
    evaluator.update([{"image_id": 1, "scores": [0.9], "labels": [1], "boxes": [[0, 0, 5, 5]]}])


def test_format_metrics_table_percent_and_missing():
    table = format_metrics_table({"AP": 0.49, "AP50": 0.668, "AP75": 0.535, "APs": -1.0, "APm": 0.52, "APl": 0.633})
    cells = [c.strip() for c in table.splitlines()[-1].split("|")[1:-1]]
    assert cells == ["49.0", "66.8", "53.5", "-", "52.0", "63.3"]
    cells = [c.strip() for c in format_metrics_table({"AP": 58.5}, percent=True).splitlines()[-1].split("|")[1:-1]]
    assert cells == ["58.5", "-", "-", "-", "-", "-"]


@needs_coco_mini
def test_evaluator_drops_unknown_categories_and_handles_empty():
    coco_gt = _quiet_coco(VAL_JSON)
    image_id = coco_gt.getImgIds()[0]
    evaluator = CocoEvaluator(coco_gt)
    assert evaluator.summarize() == {n: 0.0 for n in METRIC_NAMES}
    # label 0 and 12 are DINO's "N/A" classes: not COCO categories
    evaluator.update([{"image_id": image_id, "scores": [0.9, 0.8], "labels": [0, 12], "boxes": [[0, 0, 10, 10]] * 2}])
    assert evaluator.results() == []
    metrics = evaluator.summarize()  # an image with no detections still counts: AP 0, not an error
    assert metrics["AP"] == 0.0


# ---- multi-process gathering --------------------------------------------------------------------------------------


@needs_coco_mini
def test_synchronize_with_torch_distributed(monkeypatch):
    """Without an accelerator, a process group is used (simulated: rank 0 of 2, the other rank's objects injected);
    the real multi-process path runs in `test_evaluate_script_under_accelerate_launch`."""
    import torch.distributed as dist

    coco_gt = _quiet_coco(VAL_JSON)
    predictions = _jittered_gt_predictions(coco_gt, seed=2)
    mine, theirs = predictions[0::2], predictions[1::2] + [predictions[0]]  # sampler padding repeats an image
    other = CocoEvaluator(coco_gt)
    other.update(theirs)
    other_items = list(other._results.items())

    def all_gather_object(output, obj):
        output[0], output[1] = obj, other_items

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    evaluator = CocoEvaluator(coco_gt)
    evaluator.update(mine)
    evaluator.synchronize()
    monkeypatch.undo()

    reference = CocoEvaluator(coco_gt)
    reference.update(predictions)
    assert sorted(evaluator.image_ids) == sorted(coco_gt.getImgIds())
    assert len(evaluator.results()) == len(reference.results())
    assert evaluator.summarize() == pytest.approx(reference.summarize(), abs=1e-12)


def test_synchronize_with_accelerator_uses_gather_object(monkeypatch):
    import accelerate.utils

    class FakeAccelerator:
        num_processes = 2

    other_rank = [(7, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]), (3, [])]

    def fake_gather(local):
        return local + other_rank

    monkeypatch.setattr(accelerate.utils, "gather_object", fake_gather)

    class FakeCOCO:
        imgs = {3: {}, 7: {}}

        def getCatIds(self):
            return [1]

    evaluator = CocoEvaluator(FakeCOCO())
    evaluator.update([{"image_id": 3, "scores": [0.9], "labels": [1], "boxes": [[0, 0, 2, 2]]}])
    evaluator.synchronize(FakeAccelerator())
    assert evaluator.image_ids == [3, 7]
    assert [r["image_id"] for r in evaluator.results()] == [3, 7]  # image 3 kept once, from the first process
    assert evaluator.results()[0]["bbox"] == [0.0, 0.0, 2.0, 2.0]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_dino"))


# ---- examples/evaluate.py ---------------------------------------------------------------------------------------

EVALUATE_PY = REPO / "examples" / "evaluate.py"


def _load_evaluate_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_dino_examples_evaluate", EVALUATE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _GroundTruthModel(torch.nn.Module):
    """Stands in for a detector: for the images it is fed (in evaluate.py's order: sorted ids, one process), it
    returns DINO-style outputs (91 class logits indexed by COCO id, normalized cxcywh boxes) built from jittered
    ground truth, so that the whole script (batching, post-processing, label mapping, scoring) sees realistic,
    non-trivial detections."""

    def __init__(self, coco_gt: COCO, image_ids: list[int], seed: int = 0):
        super().__init__()
        from hf_dino import DinoConfig

        self.config = DinoConfig(backbone="resnet18", d_model=64, encoder_layers=1, decoder_layers=1, num_queries=8)
        self.coco_gt = coco_gt
        self.queue = list(image_ids)
        self.rng = np.random.default_rng(seed)
        self.num_queries = 4 + max(len(coco_gt.getAnnIds(imgIds=i)) for i in image_ids)

    def forward(self, pixel_values, pixel_mask=None, **kwargs):
        batch = pixel_values.shape[0]
        logits = torch.full((batch, self.num_queries, 91), -20.0)
        boxes = torch.full((batch, self.num_queries, 4), 0.5)
        boxes[..., 2:] = 0.1
        for b in range(batch):
            image_id = self.queue.pop(0)
            img = self.coco_gt.loadImgs(image_id)[0]
            size = np.array([img["width"], img["height"]] * 2, dtype=np.float64)
            for q, ann in enumerate(self.coco_gt.loadAnns(self.coco_gt.getAnnIds(imgIds=image_id))):
                x, y, w, h = ann["bbox"]
                xyxy = np.array([x, y, x + w, y + h]) + self.rng.normal(0, 0.08, 4) * np.array([max(w, 1), max(h, 1)] * 2)
                x0, y0, x1, y1 = xyxy / size
                boxes[b, q] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0), abs(y1 - y0)])
                logits[b, q, ann["category_id"]] = float(self.rng.normal(0.0, 2.0))
            for q in range(q + 1, self.num_queries):  # a few false positives
                logits[b, q, int(self.rng.integers(1, 91))] = float(self.rng.normal(-3.0, 1.0))
                boxes[b, q] = torch.tensor(self.rng.uniform(0.2, 0.8, 4) * [1, 1, 0.4, 0.4], dtype=torch.float32)
        return {"logits": logits, "pred_boxes": boxes}


@needs_coco_mini
def test_evaluate_script_matches_independent_pycocotools(tmp_path, monkeypatch, capsys):
    import transformers
    from hf_dino import DinoImageProcessor

    coco_gt = _quiet_coco(VAL_JSON)
    image_ids = sorted(coco_gt.getImgIds())
    model_dir = tmp_path / "model"
    DinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 160}).save_pretrained(model_dir)
    fake = _GroundTruthModel(coco_gt, image_ids)
    monkeypatch.setattr(
        transformers.AutoModelForObjectDetection, "from_pretrained", classmethod(lambda cls, *a, **k: fake)
    )
    evaluate = _load_evaluate_script()
    out, metrics_out = tmp_path / "results.json", tmp_path / "metrics.json"
    metrics = evaluate.main(
        ["--model", str(model_dir), "--images", str(COCO_MINI / "val2017"), "--annotations", str(VAL_JSON),
         "--batch-size", "4", "--top-k", "100", "--output", str(out), "--metrics-output", str(metrics_out)]
    )
    assert fake.queue == []  # every image went through the model exactly once

    # pycocotools alone on the detections the script wrote
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == set(image_ids)
    assert all(len(r["bbox"]) == 4 and r["category_id"] in coco_gt.getCatIds() for r in results)
    stats = _independent_stats(coco_gt, results, image_ids)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(stats[:6].tolist(), abs=1e-12)
    assert json.loads(metrics_out.read_text()) == pytest.approx(metrics)
    assert 0.2 < metrics["AP"] < 0.95 and metrics["APl"] > 0.2

    printed = capsys.readouterr().out
    table = format_metrics_table(metrics)
    assert table in printed
    assert f"{100 * metrics['AP']:.1f}" in table.splitlines()[-1]


@needs_coco_mini
def test_evaluate_script_under_accelerate_launch(tmp_path, tiny_model_dir):
    """A real (tiny, random) DINO, 2 processes: the detections of both are gathered and scored once."""
    pytest.importorskip("accelerate")
    coco_gt = _quiet_coco(VAL_JSON)
    n_images = 4
    image_ids = sorted(coco_gt.getImgIds())[:n_images]
    out, metrics_out = tmp_path / "results.json", tmp_path / "metrics.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           str(EVALUATE_PY), "--model", str(tiny_model_dir), "--images", str(COCO_MINI / "val2017"),
           "--annotations", str(VAL_JSON), "--batch-size", "2", "--max-images", str(n_images),
           "--output", str(out), "--metrics-output", str(metrics_out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} == set(image_ids)  # both processes' images, once each
    per_image = {i: sum(r["image_id"] == i for r in results) for i in image_ids}
    assert all(0 < n <= 300 for n in per_image.values())
    metrics = json.loads(metrics_out.read_text())
    stats = _independent_stats(coco_gt, results, image_ids)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(stats[:6].tolist(), abs=1e-12)
    assert proc.stdout.count("AP50 | AP75") == 1  # the table, printed by the main process only


@pytest.mark.parametrize("content", ['{"images": [', "[1, 2, 3]", '{"annotations": []}'],
                         ids=["malformed-json", "not-a-dict", "no-images"])
def test_evaluate_script_malformed_annotation_file_is_one_clear_line(tmp_path, content):
    evaluate = _load_evaluate_script()
    annotations = tmp_path / "instances.json"
    annotations.write_text(content)
    (tmp_path / "unused").mkdir()  # a model folder must exist (checked with the arguments), it is not read
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path / "unused"), "--images", str(tmp_path), "--annotations",
                       str(annotations)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and str(annotations) in message and "\n" not in message


def test_evaluate_script_rejects_top_k_zero(tmp_path, capsys):
    evaluate = _load_evaluate_script()
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--images", str(tmp_path), "--annotations", "a.json", "--top-k", "0"])
    assert "--top-k must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-images", "0"], "--max-images must be >= 1"),  # evaluated nothing and printed AP 0.0 before
        (["--tta-scales", "0.8"], "--tta-scales need --tta"),  # silently ignored before
        (["--tta", "--tta-scales", "1.0", "-1"], "--tta-scales must be positive"),
        # a missing folder was reported as "Repo id must be in the form ..."
        (["--model", "./no/such/run"], "--model: the model folder './no/such/run' does not exist"),
        (["--threshold", "nan"], "--threshold must be a score in [0, 1]"),
    ],
)
def test_evaluate_script_rejects_options_it_would_get_wrong(tmp_path, capsys, options, message):
    evaluate = _load_evaluate_script()
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "m", "--images", str(tmp_path), "--annotations", "a.json", *options])
    assert message in capsys.readouterr().err


def test_evaluate_script_refuses_outputs_it_cannot_write_before_evaluating(tmp_path, capsys):
    """An --output or --metrics-output that is a folder, or under a file, failed with a traceback after the whole
    evaluation (its detections lost); missing folders are created."""
    evaluate = _load_evaluate_script()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    base = ["--model", "m", "--images", str(tmp_path), "--annotations", "a.json"]
    for option in ("--output", "--metrics-output"):
        for value, message in ((tmp_path, "is a folder"), (blocker / "x.json", "a parent of it is a file")):
            with pytest.raises(SystemExit):
                evaluate.parse_args([*base, option, str(value)])
            err = capsys.readouterr().err
            assert f"{option} {str(value)!r}" in err and message in err, err
    args = evaluate.parse_args([*base, "--output", str(tmp_path / "new" / "r.json")])
    assert args.output == str(tmp_path / "new" / "r.json")


def test_evaluate_script_names_an_unreadable_image_before_evaluating(tmp_path):
    """A truncated image listed in the annotations: one line naming it, before any model is loaded (a PIL traceback
    from the data loader before)."""
    images = sorted((COCO_MINI / "val2017").glob("*.jpg"))[:2]
    if len(images) < 2:
        pytest.skip(f"COCO-MINI not found at {COCO_MINI}")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / images[0].name).write_bytes(images[0].read_bytes())
    (folder / images[1].name).write_bytes(images[1].read_bytes()[:5000])  # truncated
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i + 1, "file_name": p.name, "width": 640, "height": 480} for i, p in enumerate(images)],
        "annotations": [], "categories": [{"id": 1, "name": "thing"}],
    }))
    (tmp_path / "unused").mkdir()  # never loaded: the images are checked first
    evaluate = _load_evaluate_script()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path / "unused"), "--images", str(folder), "--annotations", str(annotations)])
    message = str(exit_info.value.code)
    assert message.startswith("error: 1 images of") and str(folder / images[1].name) in message, message
    assert "truncated" in message and "\n" not in message


def test_evaluate_script_model_folder_without_processor_is_one_clear_line(tmp_path):
    """A folder written by `model.save_pretrained` alone: one line that says what to save (an OSError traceback
    before)."""
    from conftest import tiny_model

    if not (COCO_MINI / "annotations" / "instances_val2017.json").is_file():
        pytest.skip(f"COCO-MINI not found at {COCO_MINI}")
    tiny_model().save_pretrained(tmp_path / "model")
    evaluate = _load_evaluate_script()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", str(tmp_path / "model"), "--images", str(COCO_MINI / "val2017"), "--annotations",
                       str(COCO_MINI / "annotations" / "instances_val2017.json"), "--max-images", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("error: cannot load the image processor") and "processor.save_pretrained" in message
