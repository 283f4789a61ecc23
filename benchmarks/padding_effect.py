#!/usr/bin/env python
"""How much an image's DINO detections change with the padding it gets in a batch.

    python benchmarks/padding_effect.py --model MODEL_DIR [--images a.jpg b.jpg ...] [--top 100]

Each image is run alone (its own size, no padding) and then padded to the shared canvas of a batch with every
other image (what `pipeline(..., batch_size=N)` and the processor on a list do). Printed per image: the canvas,
the largest change of a top-`--top` score, the fraction of the alone-run's top detections found again in the
padded run (same label, box IoU >= 0.9), and the mean IoU of the matched boxes. Without `--model`, DINO-4scale
R50 with the parity fixture's synthetic weights (../shared/parity) is converted first: its numbers describe the
mechanism, not a trained model's accuracy.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image
from torchvision.ops import box_iou

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_IMAGES = [SHARED / "data" / "coco-mini" / "val2017" / name for name in ("000000000139.jpg", "000000000802.jpg")]


def converted_parity_model(folder: Path) -> Path:
    manifest = SHARED / "parity" / "r50_4scale" / "manifest.json"
    checkpoint = folder / "r50.pth"
    subprocess.run([sys.executable, str(SHARED / "parity" / "make_original_checkpoint.py"), str(manifest),
                    str(checkpoint)], check=True, capture_output=True)
    out = folder / "model"
    subprocess.run([sys.executable, str(REPO / "conversion" / "convert_original_checkpoint.py"), "--checkpoint",
                    str(checkpoint), "--model-name", "dino-r50-4scale", "--output-dir", str(out)], check=True,
                   capture_output=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--images", nargs="+", default=[str(p) for p in DEFAULT_IMAGES])
    parser.add_argument("--top", type=int, default=100)
    args = parser.parse_args()

    from hf_dino import DinoForObjectDetection, DinoImageProcessor

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else converted_parity_model(Path(tmp))
        model = DinoForObjectDetection.from_pretrained(model_dir).eval()
        processor = DinoImageProcessor.from_pretrained(model_dir)
    images = [Image.open(path).convert("RGB") for path in args.images]
    sizes = [(image.height, image.width) for image in images]

    batch = processor(images, return_tensors="pt")
    padded = processor.post_process_object_detection(model(**batch), 0.0, sizes, top_k=args.top)
    canvas = tuple(batch["pixel_values"].shape[-2:])
    for path, image, size, in_batch in zip(args.images, images, sizes, padded):
        alone_inputs = processor(image, return_tensors="pt")
        (alone,) = processor.post_process_object_detection(model(**alone_inputs), 0.0, [size], top_k=args.top)
        iou = box_iou(alone["boxes"], in_batch["boxes"])
        iou[alone["labels"][:, None] != in_batch["labels"][None, :]] = 0
        best = iou.max(dim=1).values
        kept = best >= 0.9
        score_change = (alone["scores"] - in_batch["scores"]).abs().max().item()
        print(f"{Path(path).name}: alone {tuple(alone_inputs['pixel_values'].shape[-2:])}, in batch {canvas}; "
              f"top-{args.top}: max |score change| {score_change:.4f}, found again {kept.float().mean().item():.0%} "
              f"(same label, IoU >= 0.9), mean IoU of the matches {best[kept].mean().item():.3f}")


if __name__ == "__main__":
    main()
