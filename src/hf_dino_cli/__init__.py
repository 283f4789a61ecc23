# Copyright 2026 The hf_dino authors. Licensed under the Apache License, Version 2.0.
"""`hf-dino` command line.

This package is the command-line surface of `hf_dino`, kept outside it on purpose: importing `hf_dino` registers
DINO with the transformers Auto classes, which imports torch and transformers (seconds), while `hf-dino --help` and
argument errors need only `argparse`. Every command imports `hf_dino` when it runs.

    hf-dino predict IMAGE_OR_DIR... --model MODEL [--threshold T] [--device D] [--batch-size N] [--out DIR] [--tta]
    hf-dino predict IMAGE_OR_DIR... --onnx model.onnx [--model MODEL] ...     (onnxruntime, hf_dino.export)
    hf-dino export --model MODEL --output model.onnx [--opset N] [--static-batch] [--static-size]

Each subcommand is one `add_<name>_parser(subparsers)` function that registers its arguments and sets
`func=<run function>`; add new ones to `SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "main", "build_parser", "SUBCOMMANDS", "add_predict_parser", "run_predict", "add_export_parser", "run_export",
    "collect_images", "add_tta_arguments", "tta_argument_error", "check_model_argument", "ModelLoadError",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}


def _error(message: str) -> None:
    print(f"hf-dino: error: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------------------


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="detect objects in images and write annotated images and COCO-format results",
        description=(
            "Run a DINO detector on images (files or directories of images) and write, in --out: one annotated "
            "image per input (boxes, label names, scores) and predictions.json (COCO results: image_id, "
            "category_id, bbox [x, y, w, h], score), plus images.json (image ids, file names, sizes, errors). "
            "Unreadable files are reported and skipped; the exit status is 1 if any input failed."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories of images")
    parser.add_argument("--model", help="saved model folder or Hub id (config + weights + processor); required "
                        "without --onnx, with --onnx only its processor and label names are used")
    parser.add_argument("--onnx", metavar="FILE", help="run this exported graph (hf-dino export) with onnxruntime "
                        "instead of the PyTorch model; processor and label names come from the file unless --model")
    parser.add_argument("--threshold", type=float, default=0.3, help="keep detections scoring above this (default 0.3)")
    parser.add_argument("--top-k", type=int, default=300, help="candidates per image before thresholding (default 300)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights and activations dtype (default float32; box geometry and the query-selection "
                        "heads stay float32)")
    parser.add_argument("--out", default="hf_dino_predictions", help="output folder (default ./hf_dino_predictions)")
    parser.add_argument("--recursive", action="store_true", help="search directories recursively")
    parser.add_argument("--no-draw", action="store_true", help="do not write annotated images")
    parser.add_argument("--max-draw", type=int, default=100, help="draw at most this many detections per image")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    add_tta_arguments(parser)
    parser.set_defaults(func=run_predict)
    return parser


def collect_images(inputs: Iterable[str], recursive: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and directories into a list of image files; return (files, [(input, error), ...])."""
    files: list[Path] = []
    errors: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            found = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                errors.append((item, "directory contains no image files"))
            candidates = found
        elif path.exists():
            candidates = [path]
        else:
            errors.append((item, "no such file or directory"))
            candidates = []
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                files.append(candidate)
    return files, errors


def _image_id(path: Path, index: int, used: set[int]) -> int:
    """COCO-style numeric file names (000000000139.jpg) keep their id; other files get 1, 2, ... (unused ids)."""
    stem = path.stem
    if re.fullmatch(r"\d{1,18}", stem) and int(stem) not in used:
        return int(stem)
    candidate = index + 1
    while candidate in used:
        candidate += 1
    return candidate


def _output_name(path: Path, used: set[str]) -> str:
    name = f"{path.stem}.jpg"
    counter = 1
    while name in used:
        name = f"{path.stem}_{counter}.jpg"
        counter += 1
    used.add(name)
    return name


def _resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


# a Hub repository id: "name" or "namespace/name" (letters, digits, "-", "_", "."; not starting with "." or "-")
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")


class ModelLoadError(ValueError):
    """``--model`` names no usable DINO model; the message says why."""


def check_model_argument(model_name: str) -> None:
    """A path that does not exist (and cannot be a Hub id) is reported as such, not as a malformed Hub id."""
    if os.path.exists(model_name):
        return
    if not _HUB_ID.fullmatch(model_name) or model_name.endswith((".json", ".safetensors", ".bin", ".pth")):
        raise ModelLoadError(f"the model folder {model_name!r} does not exist")


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at `path`, or None (its missing folders can be created): checked with the
    arguments, before the work whose result it is meant to hold."""
    path = Path(path)
    if path.is_dir():
        return "is a folder; give the file to write"
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        return "cannot be written: a parent of it is a file, not a folder"
    return None


def _load_model_and_processor(model_name: str, device, dtype: str = "float32"):
    import transformers

    import hf_dino  # noqa: F401 - registers DINO with the Auto classes

    from hf_dino.configuration_dino import DinoConfig
    from hf_dino.image_processing_dino import DinoImageProcessor

    check_model_argument(model_name)
    try:
        config = transformers.AutoConfig.from_pretrained(model_name)
    except Exception as error:  # noqa: BLE001 - the folder / Hub id is not a model
        hint = "" if os.path.exists(model_name) else f" (no local folder {model_name!r} exists either)"
        raise ModelLoadError(f"{error}{hint}") from error
    if config.model_type != DinoConfig.model_type:
        raise ModelLoadError(
            f"it is a {config.model_type!r} model ({', '.join(config.architectures or [type(config).__name__])}); "
            "hf-dino predict runs DINO models only (their post-processing takes --top-k). Use transformers' "
            "pipeline('object-detection', model=...) for other detectors"
        )
    import torch

    model = transformers.AutoModelForObjectDetection.from_pretrained(model_name, dtype=getattr(torch, dtype))
    model.to(device).eval()
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_name)
    except (OSError, ValueError) as error:
        print(
            f"hf-dino: warning: no usable preprocessor_config.json in {model_name!r} ({type(error).__name__}); "
            "using DinoImageProcessor() defaults",
            file=sys.stderr,
        )
        processor = DinoImageProcessor()
    return model, processor


def _load_onnx_runner(onnx_path: str, model_name: str | None):
    """(DinoOnnxDetector, processor, id2label) for `predict --onnx`; --model, when given, supplies the processor and
    the label names (else those stored in the file by `hf-dino export`)."""
    from hf_dino.export import DinoOnnxDetector

    processor, id2label = None, None
    if model_name is not None:
        import transformers

        import hf_dino  # noqa: F401 - registers DINO with the Auto classes

        try:
            check_model_argument(model_name)
            processor = transformers.AutoImageProcessor.from_pretrained(model_name)
            config = transformers.AutoConfig.from_pretrained(model_name)
        except Exception as error:  # noqa: BLE001 - reported as a CLI error naming --model, not the graph
            raise ValueError(f"--model {model_name!r} (its processor and label names): {error}") from error
        id2label = {int(k): v for k, v in getattr(config, "id2label", {}).items()}
    try:
        runner = DinoOnnxDetector(onnx_path, processor)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"--onnx {onnx_path!r}: {error}") from error
    return runner, runner.processor, id2label if id2label is not None else runner.id2label


def run_predict(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        _error("--batch-size must be >= 1")
        return 2
    if args.top_k < 1:
        _error("--top-k must be >= 1 (the number of candidate detections per image; use --threshold to keep fewer)")
        return 2
    if not 0 <= args.threshold <= 1:
        _error(f"--threshold must be a score in [0, 1] (0 keeps all --top-k), got {args.threshold}")
        return 2
    if args.model is None and args.onnx is None:
        _error("give --model (PyTorch) or --onnx (exported graph)")
        return 2
    if args.onnx is not None and args.tta:
        _error("--tta runs the PyTorch model; it does not combine with --onnx")
        return 2
    if args.onnx is not None and (args.dtype != "float32" or args.device not in ("auto", "cpu")):
        _error("--onnx runs the graph in float32 on onnxruntime's CPU provider: --dtype and --device do not apply")
        return 2
    if args.max_draw < 0:
        _error("--max-draw must be >= 0 (--no-draw writes no images)")
        return 2
    if (problem := tta_argument_error(args)) is not None:
        _error(problem)
        return 2
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        _error(f"--out {args.out!r} is a file, not a folder")
        return 2
    # argument errors are reported before the (seconds-long) imports
    import torch
    from tqdm.auto import tqdm

    from hf_dino.box_ops import box_xyxy_to_xywh
    from hf_dino.image_processing_dino import load_image_file, pil_to_rgb
    from hf_dino.visualization import draw_detections

    files, failures = collect_images(args.inputs, recursive=args.recursive)
    for item, message in failures:
        _error(f"{item}: {message}")
    if not files:
        _error("no readable input images")
        return 1
    if not args.no_draw and out_dir.resolve() in {file.resolve().parent for file in files}:
        _error(f"--out {args.out!r} holds input images: the annotated images would overwrite or mix with them; "
               "choose another folder (or --no-draw)")
        return 2

    try:
        if args.onnx is not None:
            model, processor, id2label = _load_onnx_runner(args.onnx, args.model)
            device = None
        else:
            device = _resolve_device(args.device)
            model, processor = _load_model_and_processor(args.model, device, args.dtype)
            id2label = {int(k): v for k, v in getattr(model.config, "id2label", {}).items()}
    except Exception as error:  # noqa: BLE001 - reported as a CLI error
        _error(f"cannot load {error}" if args.onnx is not None else f"cannot load model {args.model!r}: {error}")
        return 1
    from hf_dino.tta import tta_from_args

    tta = tta_from_args(args, model, processor)

    out_dir.mkdir(parents=True, exist_ok=True)
    coco_results: list[dict] = []
    image_records: list[dict] = []
    used_ids: set[int] = set()
    used_names: set[str] = set()
    failed: list[tuple[str, str]] = list(failures)

    progress = tqdm(total=len(files), unit="img", desc="hf-dino predict", disable=args.no_progress or len(files) < 2)

    def flush(batch: list[tuple[Path, object]]) -> None:
        if not batch:
            return
        images = [image for _, image in batch]
        try:
            with torch.inference_mode():
                sizes = [(image.height, image.width) for image in images]
                if tta is not None:
                    results = tta(images, threshold=args.threshold, target_sizes=sizes, top_k=args.top_k)
                else:
                    inputs = processor(images, return_tensors="pt")
                    if args.onnx is not None:
                        outputs = model.forward(inputs["pixel_values"], inputs["pixel_mask"])
                    else:
                        inputs = {k: v.to(device) for k, v in inputs.items() if k in ("pixel_values", "pixel_mask")}
                        outputs = model(**inputs)
                    results = processor.post_process_object_detection(outputs, threshold=args.threshold,
                                                                      target_sizes=sizes, top_k=args.top_k)
        except Exception as error:  # noqa: BLE001
            if len(batch) > 1:  # find the culprit: retry one by one
                for item in batch:
                    flush([item])
                return
            path = batch[0][0]
            _error(f"{path}: inference failed: {error}")
            failed.append((str(path), f"inference failed: {error}"))
            progress.update(1)
            return
        for (path, image), result in zip(batch, results):
            image_id = _image_id(path, len(image_records), used_ids)
            used_ids.add(image_id)
            record = {"id": image_id, "file_name": str(path), "width": image.width, "height": image.height,
                      "num_detections": len(result["scores"])}
            rows = zip(result["scores"].tolist(), result["labels"].tolist(), box_xyxy_to_xywh(result["boxes"].double()).tolist())
            for score, label, box in rows:
                coco_results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [round(v, 3) for v in box],
                        "score": round(float(score), 5),
                    }
                )
            if not args.no_draw:
                name = _output_name(path, used_names)
                try:
                    annotated = draw_detections(image, {k: v.cpu() for k, v in result.items()}, id2label,
                                                max_detections=args.max_draw)
                    annotated.save(out_dir / name, quality=92)
                    record["annotated"] = name
                except Exception as error:  # noqa: BLE001 - keep the detections even if drawing fails
                    _error(f"{path}: cannot write the annotated image: {error}")
            image_records.append(record)
            progress.update(1)

    batch: list[tuple[Path, object]] = []
    for path in files:
        try:
            image = pil_to_rgb(load_image_file(path))
        except Exception as error:  # noqa: BLE001 - corrupt / unreadable file
            message = str(error) if str(path) in str(error) else f"{path}: {error}"
            _error(message)
            failed.append((str(path), str(error)))
            progress.update(1)
            continue
        batch.append((path, image))
        if len(batch) >= args.batch_size:
            flush(batch)
            batch = []
    flush(batch)
    progress.close()

    (out_dir / "predictions.json").write_text(json.dumps(coco_results))
    summary = {
        "model": args.onnx or args.model,
        "threshold": args.threshold,
        "tta": repr(tta) if tta is not None else None,
        "images": image_records,
        "errors": [{"input": item, "error": message} for item, message in failed],
    }
    (out_dir / "images.json").write_text(json.dumps(summary, indent=1))
    print(
        f"hf-dino predict: {len(image_records)} image(s), {len(coco_results)} detection(s) above {args.threshold}, "
        f"{len(failed)} failed; results in {out_dir}{os.sep}",
        file=sys.stderr,
    )
    return 1 if failed else 0


def add_tta_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--tta`, `--tta-scales`, `--tta-no-flip`, `--tta-ensemble` (read by `hf_dino.tta.tta_from_args`)."""
    group = parser.add_argument_group("test-time augmentation (hf_dino.tta)")
    group.add_argument("--tta", action="store_true",
                       help="test-time augmentation: the image and its mirror image (more scales with "
                       "--tta-scales), ensembled one-to-one (DINO paper, Appendix A)")
    group.add_argument("--tta-scales", type=float, nargs="+", metavar="S",
                       help="resize factors of the processor's size, the first one the main view "
                       "(default: 1.0, the processor's size only)")
    group.add_argument("--tta-no-flip", action="store_true", help="no mirrored views")
    group.add_argument("--tta-ensemble", default="one-to-one", choices=["one-to-one", "nms"],
                       help="one-to-one (the paper's, default) or nms (gather all views, batched NMS)")


def tta_argument_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the options of `add_tta_arguments` (None when nothing): options without `--tta` (they
    would be ignored) and scales that are not positive, finite numbers."""
    if not args.tta:
        given = [name for name, value in (("--tta-scales", args.tta_scales), ("--tta-no-flip", args.tta_no_flip),
                                          ("--tta-ensemble", args.tta_ensemble != "one-to-one")) if value]
        return f"{', '.join(given)} need --tta" if given else None
    bad = [s for s in args.tta_scales or () if not (s > 0 and math.isfinite(s))]
    return f"--tta-scales must be positive numbers, got {bad}" if bad else None


# ----------------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------------


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a DINO model to ONNX (standard operators, dynamic batch / height / width)",
        description=(
            "Write one ONNX file (inputs pixel_values [B,3,H,W], pixel_mask [B,H,W]; outputs logits, pred_boxes, "
            "encoder_topk_indices) that a stock onnxruntime runs for every image size; the model config and the "
            "processor are stored in its metadata, so `hf-dino predict --onnx FILE` needs nothing else. "
            "Needs the `onnx` extra: pip install 'hf_dino[onnx]'."
        ),
    )
    parser.add_argument("--model", required=True, help="saved model folder or Hub id")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int,
                        help="ONNX opset (default: hf_dino.export.DEFAULT_OPSET, the exporter's own; at least 18: "
                        "GridSample appeared in 16, but the torch.onnx exporter writes 18 and newer)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to 1 (default: dynamic)")
    parser.add_argument("--static-size", nargs=2, type=int, metavar=("HEIGHT", "WIDTH"),
                        help="fix the input size to HEIGHT x WIDTH (default: dynamic height and width)")
    parser.set_defaults(func=run_export)
    return parser


def run_export(args: argparse.Namespace) -> int:
    if args.static_size and min(args.static_size) < 1:
        _error(f"--static-size must be two positive numbers (height, width), got {args.static_size}")
        return 2
    if (problem := output_file_problem(args.output)) is not None:
        _error(f"--output {args.output!r} {problem}")
        return 2
    try:
        from hf_dino.export import DinoExportError, export_onnx, require_onnx

        require_onnx()
    except ImportError as error:
        _error(str(error))
        return 1
    try:
        model, processor = _load_model_and_processor(args.model, _resolve_device("cpu"))
    except Exception as error:  # noqa: BLE001 - reported as a CLI error
        _error(f"cannot load model {args.model!r}: {error}")
        return 1
    kwargs = {"example_size": tuple(args.static_size)} if args.static_size else {}
    if args.opset is not None:
        kwargs["opset"] = args.opset
    try:
        path = export_onnx(model, args.output, processor=processor,
                           dynamic_batch=not args.static_batch, dynamic_size=args.static_size is None, **kwargs)
    except (ValueError, TypeError, DinoExportError) as error:
        _error(str(error))
        return 1
    print(f"hf-dino export: wrote {path}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------------------

SUBCOMMANDS = [add_predict_parser, add_export_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-dino", description="DINO object detection with Hugging Face transformers")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
