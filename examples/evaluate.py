#!/usr/bin/env python
"""COCO box evaluation of a DINO model (or any transformers object detector with the same post-processing).

    python examples/evaluate.py --model hf-dino/dino-r50-4scale-12ep \
        --images coco/val2017 --annotations coco/annotations/instances_val2017.json \
        [--batch-size 2] [--output coco_results.json] [--tta]

    accelerate launch --num_processes 8 examples/evaluate.py --model ... --images ... --annotations ...

    python examples/evaluate.py --onnx dino.onnx [--model ...] --images ... --annotations ...   (onnxruntime)

Every image of the annotation file is read from ``--images`` (its ``file_name``), preprocessed by the model's image
processor (shortest side 800, longest at most 1333 for DINO; EXIF orientation NOT applied, since COCO boxes refer to
the stored pixels), run in batches and post-processed like the original evaluation (top-300 (query, class) pairs per
image, no threshold, boxes in pixels of the original image). pycocotools scores the detections
(`hf_dino.evaluation.CocoEvaluator`); the paper-style table (AP, AP50, AP75, APs, APm, APl, percent) is printed
and the detections are written as a standard COCO results JSON (``--output``).

Under ``accelerate launch`` every process takes every N-th image, and the detections of all processes are gathered
before scoring; the main process prints and writes. ``--tta`` evaluates with test-time augmentation
(``hf_dino.tta.DinoTTA``: ``--tta-scales`` x plain/mirrored views, ensembled one-to-one as in the DINO paper, or
by NMS with ``--tta-ensemble nms``). Model labels are mapped to the annotation file's category ids
through the label names (``config.id2label``); the released DINO checkpoints need no mapping (labels are COCO ids).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

import hf_dino  # noqa: F401 - registers DINO with the Auto classes (`pip install -e .` in a checkout)
from hf_dino.evaluation import CocoEvaluator, build_label_to_category_id, format_metrics_table
from hf_dino.image_processing_dino import pil_to_rgb
from hf_dino.training import check_image_file
from hf_dino.tta import tta_from_args
from hf_dino_cli import (
    ModelLoadError,
    add_tta_arguments,
    check_model_argument,
    output_file_problem,
    tta_argument_error,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hub repo id or local save_pretrained folder (with --onnx: optional, only "
                        "its processor and label names are used)")
    parser.add_argument("--onnx", default=None, help="evaluate this exported graph (hf-dino export) with onnxruntime "
                        "instead of the PyTorch model")
    parser.add_argument("--images", required=True, help="folder holding the images of the annotation file")
    parser.add_argument("--annotations", required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass and process (default 2)")
    parser.add_argument("--output", default="coco_results.json", help="COCO results JSON to write")
    parser.add_argument("--metrics-output", default=None, help="also write the metrics (fractions) as JSON here")
    parser.add_argument("--top-k", type=int, default=300, help="detections kept per image (default 300)")
    parser.add_argument("--threshold", type=float, default=0.0, help="minimum score kept (default 0: keep top-k)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images (by id)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that read the images")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="load the weights in this dtype (default float32; `accelerate launch --mixed_precision "
                             "bf16` runs a float32 model under autocast instead)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the repo's own modeling code")
    parser.add_argument("--labels-are-category-ids", action="store_true",
                        help="take model label ids as the annotation file's category ids (default: map by label name)")
    add_tta_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.top_k < 1:
        parser.error("--top-k must be >= 1 (detections kept per image; use --threshold to keep fewer)")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be a score in [0, 1] (0 keeps the top-k), got {args.threshold}")
    if args.model is None and args.onnx is None:
        parser.error("give --model or --onnx")
    if args.onnx is not None and args.tta:
        parser.error("--tta runs the PyTorch model; it does not combine with --onnx")
    if (problem := tta_argument_error(args)) is not None:
        parser.error(problem)
    if args.max_images is not None and args.max_images < 1:
        parser.error("--max-images must be >= 1")
    if args.model is not None:
        try:
            check_model_argument(args.model)
        except ModelLoadError as error:
            parser.error(f"--model: {error}")
    for option, value in (("--output", args.output), ("--metrics-output", args.metrics_output)):
        # found before the evaluation, not when its results are written
        if value is not None and (problem := output_file_problem(value)):
            parser.error(f"{option} {value!r} {problem}")
    return args


class CocoImages(torch.utils.data.Dataset):
    """(image_id, RGB PIL image) for the given ids of a COCO annotation file."""

    def __init__(self, coco_gt, image_dir: str | Path, image_ids: list[int]):
        self.coco_gt = coco_gt
        self.image_dir = Path(image_dir)
        self.image_ids = image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        path = self.image_dir / self.coco_gt.loadImgs(image_id)[0]["file_name"]
        try:
            with Image.open(path) as image:
                image.load()
                return image_id, pil_to_rgb(image, apply_exif_orientation=False)  # 16-bit images scaled, not clipped
        except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for damaged files
            raise ValueError(f"{path}: cannot read the image ({error})") from error


def _collate(batch):
    return [image_id for image_id, _ in batch], [image for _, image in batch]


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection

    from hf_dino.data import load_coco

    accelerator = Accelerator()
    try:  # missing, malformed (not JSON) or non-COCO file: one line naming it
        coco_gt = load_coco(args.annotations)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    image_ids = sorted(coco_gt.getImgIds())
    if args.max_images is not None:
        image_ids = image_ids[: args.max_images]
    paths = {i: Path(args.images) / coco_gt.loadImgs(i)[0]["file_name"] for i in image_ids}
    missing = [i for i in image_ids if not paths[i].is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} images of {args.annotations} are not in {args.images} (e.g. id {missing[0]})")
    # truncated or empty files, found before the evaluation (a fraction of a millisecond per image)
    unreadable = [(paths[i], problem) for i in image_ids if (problem := check_image_file(paths[i]))]
    if unreadable:
        path, problem = unreadable[0]
        raise SystemExit(f"error: {len(unreadable)} images of {args.annotations} cannot be read, e.g. {path}: {problem}")

    if args.onnx is not None:
        from hf_dino.export import DinoOnnxDetector

        processor = None
        if args.model is not None:
            processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        runner = DinoOnnxDetector(args.onnx, processor)
        processor = runner.processor
        id2label = runner.id2label if args.model is None else AutoConfig.from_pretrained(args.model).id2label

        def forward(inputs):
            return runner.forward(inputs["pixel_values"], inputs["pixel_mask"])
    else:
        try:
            processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        except OSError as error:  # e.g. a folder written by model.save_pretrained alone
            raise SystemExit(
                f"error: cannot load the image processor of {args.model} ({error}). Evaluation preprocesses as the "
                "model was trained: save the processor there too (processor.save_pretrained(folder))."
            ) from None
        model = AutoModelForObjectDetection.from_pretrained(args.model, trust_remote_code=args.trust_remote_code,
                                                            dtype=getattr(torch, args.dtype))
        model = model.to(accelerator.device).eval()
        id2label = model.config.id2label

        def forward(inputs):
            with torch.inference_mode(), accelerator.autocast():
                return model(**inputs)
    if args.labels_are_category_ids:
        label_to_category_id = None
    else:
        try:
            label_to_category_id = build_label_to_category_id(id2label, coco_gt)
        except ValueError as error:
            raise SystemExit(f"error: {error} (or pass --labels-are-category-ids)")
    evaluator = CocoEvaluator(coco_gt, label_to_category_id)
    tta = tta_from_args(args, model, processor) if args.onnx is None else None

    # every process takes every N-th image: no image twice, nothing to de-duplicate
    shard = image_ids[accelerator.process_index :: accelerator.num_processes]
    loader = torch.utils.data.DataLoader(
        CocoImages(coco_gt, args.images, shard),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=_collate,
    )
    processor_kwargs = {"apply_exif_orientation": False} if "apply_exif_orientation" in processor.to_dict() else {}
    progress = tqdm(
        total=len(image_ids), desc="evaluating", unit="img", disable=not accelerator.is_local_main_process
    )
    for batch_ids, images in loader:
        target_sizes = torch.tensor([[image.height, image.width] for image in images], device=accelerator.device)
        if tta is not None:
            with accelerator.autocast():
                results = tta(images, args.threshold, target_sizes, args.top_k, **processor_kwargs)
        else:
            inputs = processor(images=images, return_tensors="pt", **processor_kwargs).to(accelerator.device)
            outputs = forward(inputs)
            results = processor.post_process_object_detection(
                outputs, threshold=args.threshold, target_sizes=target_sizes, top_k=args.top_k
            )
        evaluator.update({"image_id": i, **r} for i, r in zip(batch_ids, results))
        # the main process's bar stands for all processes
        progress.update(min(len(batch_ids) * accelerator.num_processes, progress.total - progress.n))
    progress.close()

    evaluator.synchronize(accelerator)
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        metrics = evaluator.summarize()
        print(format_metrics_table(metrics, title=f"\n{args.onnx or args.model}: COCO box AP on {len(evaluator.image_ids)} images"))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        evaluator.write_results(args.output)
        print(f"wrote {len(evaluator.results())} detections to {args.output}")
        if args.metrics_output:
            Path(args.metrics_output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics_output).write_text(json.dumps(metrics, indent=2))
    accelerator.wait_for_everyone()
    return metrics


if __name__ == "__main__":
    main()
