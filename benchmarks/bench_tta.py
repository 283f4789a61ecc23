#!/usr/bin/env python
"""Test-time augmentation: COCO AP and time of plain inference, TTA with the paper's one-to-one ensembling and TTA
with conventional ensembling (gather every view's detections, `torchvision.ops.batched_nms`), on one model.

    python benchmarks/bench_tta.py --model outputs/train/final \\
        --images outputs/train/synthetic-data/val --annotations outputs/train/synthetic-data/annotations/instances_val.json
    python benchmarks/bench_tta.py --model DIR --images DIR --annotations JSON --scales 1.0 0.8 --json out.json

The reference is plain inference measured in the same run (the time ratio is TTA / plain). The views are run once
per repeat; every ensembling variant (including ablations of `hf_dino.tta`'s choices: score mode, Eq. 3 as
printed, no label agreement, flip-only and scales-only subsets of the views) is scored with pycocotools on the
same views. Times are medians over `--repeats` passes over all images (batch 1, `--num-threads` torch threads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from hf_dino.evaluation import CocoEvaluator, build_label_to_category_id
from hf_dino.tta import DinoTTA, ensemble_nms, ensemble_one_to_one

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.8], help="views: these scales, plain and mirrored")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--top-k", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()
    if args.num_threads < 1 or args.repeats < 1:
        p.error("--num-threads and --repeats must be >= 1")
    torch.set_num_threads(args.num_threads)

    from pycocotools.coco import COCO
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(args.annotations)
    image_ids = sorted(coco_gt.getImgIds())[: args.max_images]
    images = []
    for image_id in image_ids:
        with Image.open(Path(args.images) / coco_gt.loadImgs(image_id)[0]["file_name"]) as image:
            images.append(image.convert("RGB"))
    sizes = [(image.height, image.width) for image in images]
    model = AutoModelForObjectDetection.from_pretrained(args.model).eval()
    processor = AutoImageProcessor.from_pretrained(args.model)
    label_map = build_label_to_category_id(model.config.id2label, coco_gt)
    augmentations = DinoTTA(model, processor, scales=args.scales, flip=not args.no_flip).augmentations
    print(f"{args.model}: {len(images)} images, views {augmentations}, {args.repeats} repeats", flush=True)

    def plain_pass():
        results = []
        for image, size in zip(images, sizes):
            with torch.inference_mode():
                outputs = model(**processor(images=[image], return_tensors="pt", apply_exif_orientation=False))
            results += processor.post_process_object_detection(outputs, 0.0, [size], args.top_k)
        return results

    single_views = [DinoTTA(model, processor, augmentations=[a]) for a in augmentations]

    def views_pass(seconds: list[float]):
        views = [[] for _ in images]  # [image][augmentation]
        for a, single in enumerate(single_views):
            start = time.perf_counter()
            for i, (image, size) in enumerate(zip(images, sizes)):
                views[i].append(single.predict_views([image], [size], args.top_k, apply_exif_orientation=False)[0][0])
            seconds[a] += time.perf_counter() - start
        return views

    plain_times, view_times = [], []  # per pass; view_times[r][a]: seconds of view a in pass r
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain = plain_pass()
        plain_times.append(time.perf_counter() - start)
        view_times.append([0.0] * len(augmentations))
        views = views_pass(view_times[-1])
    for result, per_aug in zip(plain, views):  # the main view is plain inference, exactly
        assert all(torch.equal(result[k], per_aug[0][k]) for k in result), "main view differs from plain inference"

    flip_subset = [i for i, a in enumerate(augmentations) if a.scale == augmentations[0].scale]
    scale_subset = [i for i, a in enumerate(augmentations) if not a.hflip]
    every = list(range(len(augmentations)))
    variants = {  # name: (views used, ensembling of one image's views)
        "NMS 0.5 on the main view alone (no TTA)": ([0], lambda v: ensemble_nms(v, 0.5, args.top_k)),
        "all views, one-to-one, score mean_all": (every, lambda v: ensemble_one_to_one(v, score_mode="mean_all")),
        "all views, one-to-one, score main": (every, lambda v: ensemble_one_to_one(v, score_mode="main")),
        "all views, one-to-one, score mean_matched": (every, lambda v: ensemble_one_to_one(v, score_mode="mean_matched")),
        "all views, one-to-one, Eq. 3 as printed": (every, lambda v: ensemble_one_to_one(v, box_normalization="count")),
        "all views, one-to-one, no label agreement": (every, lambda v: ensemble_one_to_one(v, match_labels=False)),
        "all views, NMS 0.5": (every, lambda v: ensemble_nms(v, 0.5, args.top_k)),
        "all views, NMS 0.7": (every, lambda v: ensemble_nms(v, 0.7, args.top_k)),
        "flip only, one-to-one, score mean_all": (flip_subset, lambda v: ensemble_one_to_one(v, score_mode="mean_all")),
        "flip only, one-to-one, score main": (flip_subset, lambda v: ensemble_one_to_one(v, score_mode="main")),
        "flip only, one-to-one, score mean_matched": (flip_subset, lambda v: ensemble_one_to_one(v, score_mode="mean_matched")),
        "flip only, NMS 0.5": (flip_subset, lambda v: ensemble_nms(v, 0.5, args.top_k)),
        "scales only, one-to-one, score mean_all": (scale_subset, lambda v: ensemble_one_to_one(v, score_mode="mean_all")),
        "scales only, one-to-one, score main": (scale_subset, lambda v: ensemble_one_to_one(v, score_mode="main")),
    }

    def score(results) -> dict[str, float]:
        evaluator = CocoEvaluator(coco_gt, label_map)
        evaluator.update({"image_id": i, **r} for i, r in zip(image_ids, results))
        return evaluator.summarize()

    plain_time = statistics.median(plain_times) / len(images)
    rows = [("plain", score(plain), plain_time)]
    for name, (used, ensemble) in variants.items():
        if len(used) < 2 and used != [0]:
            continue  # e.g. flip-only without flips
        start = time.perf_counter()
        results = [ensemble([per_aug[i] for i in used]) for per_aug in views]
        ensemble_time = (time.perf_counter() - start) / len(images)
        view_time = statistics.median(sum(t[i] for i in used) for t in view_times) / len(images)
        rows.append((name, score(results), view_time + ensemble_time))

    print(f"\n| {'method':42s} |   AP | AP50 | AP75 | s / image | x plain |")
    print(f"|{'-' * 44}|-----:|-----:|-----:|----------:|--------:|")
    for name, metrics, seconds in rows:
        print(f"| {name:42s} | {100 * metrics['AP']:4.1f} | {100 * metrics['AP50']:4.1f} | "
              f"{100 * metrics['AP75']:4.1f} | {seconds:9.3f} | {seconds / plain_time:7.2f} |")
    print(f"(plain: {', '.join(f'{t:.2f}' for t in plain_times)} s per pass over {len(images)} images; views: "
          + "; ".join(", ".join(f"{x:.2f}" for x in t) for t in view_times) + " s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "num_images": len(images), "views": [list(a) for a in augmentations],
            "plain_pass_seconds": plain_times, "views_pass_seconds": view_times,
            "rows": [{"method": n, **m, "seconds_per_image": s, "time_ratio": s / plain_time} for n, m, s in rows],
        }, indent=2))


if __name__ == "__main__":
    main()
