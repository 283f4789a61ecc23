"""End-to-end inference latency: hf_dino DINO-R50-4scale with the compiled deformable attention kernel, the same
model on the pure-PyTorch path, and transformers' DeformableDetrForObjectDetection (two-stage, box refinement,
900 queries, same transformer sizes) for reference.

Randomly initialised weights (latency does not depend on them; nothing is downloaded), batch 1, ``torch.no_grad``.
The input is a real COCO image (the first of ../shared/data/coco-mini/val2017, or ``--image``) preprocessed by
``DinoImageProcessor`` (shorter side 800); without one, a random 800x1216 tensor. The models run interleaved (A, B,
C, A, B, C, ...) so background load affects them alike; medians are reported, and with ``--bf16`` also the median
of each repeat's bfloat16 / float32 ratio (steadier than the ratio of medians on a noisy machine).

    python benchmarks/bench_inference.py [--threads 2] [--repeats 3] [--image FILE] [--device cpu] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hf_dino import DinoConfig
from hf_dino.kernels import ENV_DISABLE, build_error, kernel_usable, load_extension
from hf_dino.modeling_dino import DinoForObjectDetection

COCO_MINI_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini" / "val2017"


class _PytorchPath:
    """Runs a model with HF_DINO_DISABLE_CUSTOM_KERNELS=1 (the pure-PyTorch deformable attention)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, **inputs):
        previous = os.environ.get(ENV_DISABLE)
        os.environ[ENV_DISABLE] = "1"
        try:
            return self.model(**inputs)
        finally:
            if previous is None:
                os.environ.pop(ENV_DISABLE)
            else:
                os.environ[ENV_DISABLE] = previous


class _Autocast:
    """Runs a float32 model under ``torch.autocast(device, torch.bfloat16)``."""

    def __init__(self, model, device_type: str):
        self.model, self.device_type = model, device_type

    def __call__(self, **inputs):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(**inputs)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def deformable_detr():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(
        num_queries=900, two_stage=True, with_box_refine=True, two_stage_num_proposals=900,
        encoder_ffn_dim=2048, decoder_ffn_dim=2048, dropout=0.0, num_labels=91,  # COCO's class ids, as DINO
    )
    return DeformableDetrForObjectDetection(config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", default=None, help="image file (default: first COCO-MINI val image)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-deformable-detr", action="store_true")
    parser.add_argument("--skip-pytorch-path", action="store_true", help="leave out the pure-PyTorch attention run")
    parser.add_argument("--compile", action="store_true",
                        help="also run torch.compile(model) (inductor; its compile time is printed, not timed)")
    parser.add_argument("--bf16", action="store_true",
                        help="also run bfloat16: the model converted (from_pretrained(..., dtype=torch.bfloat16) "
                             "does the same) and the float32 model under torch.autocast")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    if args.image is not None and not Path(args.image).is_file():
        parser.error(f"--image: no file {args.image!r}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    image_path = Path(args.image) if args.image else next(iter(sorted(COCO_MINI_VAL.glob("*.jpg"))), None)
    if image_path is not None and image_path.exists():
        from PIL import Image

        from hf_dino import DinoImageProcessor

        inputs = DinoImageProcessor()(images=Image.open(image_path), return_tensors="pt")
        pixel_values, pixel_mask = inputs["pixel_values"].to(device), inputs["pixel_mask"].to(device)
        source = image_path.name
    else:
        pixel_values = torch.randn(1, 3, 800, 1216, device=device)
        pixel_mask = torch.ones(1, 800, 1216, dtype=torch.long, device=device)
        source = "random tensor (no COCO-MINI image found)"
    height, width = pixel_values.shape[-2:]

    probe = torch.zeros(1, 1, 1, 1, device=device)
    if not kernel_usable(probe, probe.new_zeros(1, 1, 1, 1, 1, 2), probe.new_zeros(1, 1, 1, 1, 1)):
        print(f"kernel unavailable on {device.type}: {build_error(device.type) or 'disabled'}")
        return 1
    load_extension(device.type)

    dino = DinoForObjectDetection(DinoConfig()).to(device).eval()
    candidates = {"hf_dino (kernel)": dino}
    if not args.skip_pytorch_path:
        candidates["hf_dino (pytorch path)"] = _PytorchPath(dino)
    if args.bf16:
        candidates["hf_dino bf16 (model.to)"] = DinoForObjectDetection(DinoConfig()).to(device, torch.bfloat16).eval()
        candidates["hf_dino bf16 (autocast)"] = _Autocast(dino, device.type)
    if args.compile:
        candidates["hf_dino torch.compile"] = torch.compile(dino)
    if not args.skip_deformable_detr:
        candidates["transformers DeformableDetr"] = deformable_detr().to(device).eval()

    print(f"torch {torch.__version__}, device={device.type}, threads={torch.get_num_threads()}, "
          f"image {source} -> {height}x{width}, batch 1, repeats={args.repeats}, load average {load_average()}")
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for name, model in candidates.items():  # warm-up (and compilation)
            start = time.perf_counter()
            model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            print(f"{name}: first call {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(args.repeats):
            for name, model in candidates.items():
                synchronize()
                start = time.perf_counter()
                model(pixel_values=pixel_values, pixel_mask=pixel_mask)
                synchronize()
                times[name].append(time.perf_counter() - start)
    print(f"load average after the runs: {load_average()}")
    base = statistics.median(times["hf_dino (kernel)"])
    peer = statistics.median(times["transformers DeformableDetr"]) if "transformers DeformableDetr" in times else None
    for name, values in times.items():
        median = statistics.median(values)
        versus_peer = f"this / DeformableDetr = {median / peer:4.2f}x; " if peer else ""
        print(f"{name:28s} median {median * 1e3:9.1f} ms   ({versus_peer}this / hf_dino fp32 kernel = "
              f"{median / base:4.2f}x; runs {', '.join(f'{v:.2f}' for v in values)} s)")
    if args.bf16:
        for name in ("hf_dino bf16 (model.to)", "hf_dino bf16 (autocast)"):
            pairs = [b / a for a, b in zip(times["hf_dino (kernel)"], times[name])]
            print(f"{name}: median of the per-repeat ratios to fp32 {statistics.median(pairs):4.2f}x "
                  f"({', '.join(f'{r:.2f}' for r in pairs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
