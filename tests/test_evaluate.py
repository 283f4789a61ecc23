"""COCO evaluation: `hf_dino.evaluation` and `examples/evaluate.py` against pycocotools run independently."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from hf_dino.evaluation import (  # noqa: E402
    METRIC_NAMES,
    CocoEvaluator,
    build_label_to_category_id,
    format_metrics_table,
)

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, out_dir: str, shards: list) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        coco_gt = _quiet_coco(VAL_JSON)
        evaluator = CocoEvaluator(coco_gt)
        evaluator.update(shards[rank])
        evaluator.synchronize()
        metrics = evaluator.summarize()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"metrics": metrics, "image_ids": evaluator.image_ids}, f)
    finally:
        dist.destroy_process_group()


@needs_coco_mini
def test_synchronize_gathers_across_processes(tmp_path):
    coco_gt = _quiet_coco(VAL_JSON)
    predictions = _jittered_gt_predictions(coco_gt, seed=2)
    plain = [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in p.items()} for p in predictions]
    # the second shard repeats an image of the first, as a distributed sampler pads its last batch
    shards = [plain[0::2], plain[1::2] + [plain[0]]]
    torch.multiprocessing.spawn(_dist_worker, args=(2, _free_port(), str(tmp_path), shards), nprocs=2, join=True)

    reference = CocoEvaluator(coco_gt)
    reference.update(predictions)
    expected = reference.summarize()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(got["image_ids"]) == sorted(coco_gt.getImgIds())
        assert got["metrics"] == pytest.approx(expected, abs=1e-12)


def test_synchronize_with_accelerator_uses_gather_object(monkeypatch):
    import accelerate.utils

    class FakeAccelerator:
        num_processes = 2

    other_rank = [(7, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]), (3, [])]

    def fake_gather(local):
        return local + other_rank

    monkeypatch.setattr(accelerate.utils, "gather_object", fake_gather)

    class FakeCOCO:
        def getCatIds(self):
            return [1]

    evaluator = CocoEvaluator(FakeCOCO())
    evaluator.update([{"image_id": 3, "scores": [0.9], "labels": [1], "boxes": [[0, 0, 2, 2]]}])
    evaluator.synchronize(FakeAccelerator())
    assert evaluator.image_ids == [3, 7]
    assert [r["image_id"] for r in evaluator.results()] == [3, 7]  # image 3 kept once, from the first process
    assert evaluator.results()[0]["bbox"] == [0.0, 0.0, 2.0, 2.0]
