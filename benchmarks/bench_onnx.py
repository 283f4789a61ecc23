"""Inference latency of the exported ONNX graph in onnxruntime against our PyTorch model with the compiled
deformable-attention kernel, on one real COCO image (DINO-R50-4scale, batch 1, CPU).

The model has randomly initialised weights (latency does not depend on them; nothing is downloaded). It is exported
once with ``hf_dino.export.export_onnx`` (or ``--onnx FILE`` reuses an export of ``DinoConfig()`` made with
``--save``). The image is the first of ../shared/data/coco-mini/val2017 (or ``--image``), preprocessed by
``DinoImageProcessor`` (800x1201 for the default image). The two backends run interleaved (A, B, A, B, ...) with the
same number of threads so that background load affects both alike; medians are reported, with the ratio
``onnxruntime / PyTorch kernel`` (below 1 = onnxruntime faster). ``--profile`` adds onnxruntime's per-operator
time split (where the time goes, e.g. GridSample = the deformable-attention sampler).

    python benchmarks/bench_onnx.py [--threads 2] [--repeats 5] [--image FILE] [--model DIR]
        [--onnx FILE | --save FILE] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hf_dino import DinoConfig, DinoForObjectDetection, DinoImageProcessor
from hf_dino.export import DinoOnnxDetector, export_onnx, require_onnxruntime

COCO_MINI_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "val2017"


def profile_split(path: Path, threads: int, pixel_values, pixel_mask) -> None:
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
    session.run(None, feed)
    session.run(None, feed)
    trace = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"].get("op_name", "?")] += event["dur"] / 2  # two runs
    total = sum(per_op.values())
    print(f"onnxruntime per-operator time (one run, {total / 1e3:.0f} ms of kernels):")
    for op, micros in per_op.most_common(12):
        print(f"  {op:24s} {micros / 1e3:8.1f} ms  {100 * micros / total:5.1f} %")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image", default=None, help="image file (default: first COCO-MINI val image)")
    parser.add_argument("--model", default=None, help="saved model folder (default: DinoConfig(), random weights)")
    parser.add_argument("--onnx", default=None, help="reuse this export of the same model instead of exporting")
    parser.add_argument("--save", default=None, help="keep the export here (for --onnx next time)")
    parser.add_argument("--profile", action="store_true", help="print onnxruntime's per-operator time split")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    if args.image is not None and not Path(args.image).is_file():
        parser.error(f"--image: no file {args.image!r}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model = DinoForObjectDetection.from_pretrained(args.model).eval()
    else:
        model = DinoForObjectDetection(DinoConfig()).eval()
    if args.onnx:
        path = Path(args.onnx)
    else:
        path = Path(args.save) if args.save else Path(tempfile.mkdtemp()) / "dino.onnx"
        start = time.perf_counter()
        export_onnx(model, path)
        print(f"export_onnx: {time.perf_counter() - start:.0f} s -> {path}")
    detector = DinoOnnxDetector(path, num_threads=args.threads)

    from PIL import Image

    image_path = Path(args.image) if args.image else sorted(COCO_MINI_VAL.glob("*.jpg"))[0]
    inputs = DinoImageProcessor()(images=Image.open(image_path).convert("RGB"), return_tensors="pt")
    pixel_values, pixel_mask = inputs["pixel_values"], inputs["pixel_mask"]
    height, width = pixel_values.shape[-2:]

    def run_torch():
        with torch.no_grad():
            return model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def run_ort():
        return detector.forward(pixel_values, pixel_mask)

    backends = {"PyTorch (kernel)": run_torch, "onnxruntime": run_ort}
    print(f"torch {torch.__version__}, onnxruntime {require_onnxruntime().__version__}, threads={args.threads}, "
          f"image {image_path.name} -> {height}x{width}, batch 1, repeats={args.repeats}")
    times: dict[str, list[float]] = {name: [] for name in backends}
    for run in backends.values():  # warm-up (kernel build / session initialisation)
        run()
    for _ in range(args.repeats):
        for name, run in backends.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:18s} median {medians[name] * 1e3:8.1f} ms   (runs {', '.join(f'{v:.2f}' for v in values)} s)")
    print(f"ratio onnxruntime / PyTorch kernel = {medians['onnxruntime'] / medians['PyTorch (kernel)']:.2f}x")
    if args.profile:
        profile_split(path, args.threads, pixel_values, pixel_mask)
    return 0


if __name__ == "__main__":
    sys.exit(main())
