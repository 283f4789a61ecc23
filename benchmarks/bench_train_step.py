"""One optimizer step of DINO-R50-4scale against transformers' DeformableDetr proxy: median step time, peak RSS.

A step is: forward (ours: with contrastive denoising queries), loss, backward, AdamW step, on 2 real COCO-MINI train
images (the first two of ../shared/data/coco-mini/train2017 with annotations) preprocessed by ``DinoImageProcessor``
at the paper's training size (shorter side 800, longer side at most 1333), batch 2. The peer is
``DeformableDetrForObjectDetection`` sized like DINO (two-stage, box refinement, 900 queries, FFN 2048) with its own
loss on the same batch. Randomly initialised weights (nothing is downloaded).

Every measurement runs in a fresh child process (so that its peak RSS is its own), the children interleaved
(ours, peer, ours, peer, ...) so that background load affects both alike; each child does one warm-up step and
``--steps`` timed steps. Medians over all timed steps, the ratios ours / peer, and where our step's time goes
(forward + loss, backward, optimizer) are printed. ``--gradient-checkpointing`` adds a third candidate: ours with
``model.gradient_checkpointing_enable()``.

    python benchmarks/bench_train_step.py [--threads 2] [--repeats 2] [--steps 2] [--gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
CANDIDATES = ("hf_dino", "transformers DeformableDetr")


def coco_batch(num_images: int = 2):
    """Pixel values, mask and DINO-style labels of the first `num_images` annotated COCO-MINI train images."""
    from PIL import Image

    from hf_dino import DinoImageProcessor

    data = json.loads((COCO_MINI / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    images = [img for img in sorted(data["images"], key=lambda i: i["id"]) if img["id"] in by_image][:num_images]
    pil = [Image.open(COCO_MINI / "train2017" / img["file_name"]).convert("RGB") for img in images]
    targets = [{"image_id": img["id"], "annotations": by_image[img["id"]]} for img in images]
    return DinoImageProcessor()(images=pil, annotations=targets, return_tensors="pt")


def build(name: str, gradient_checkpointing: bool):
    import torch

    torch.manual_seed(0)
    if name == "hf_dino":
        from hf_dino import DinoConfig, DinoForObjectDetection

        model = DinoForObjectDetection(DinoConfig())
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
    else:
        from bench_inference import deformable_detr  # 91 labels: the COCO category ids of the batch

        model = deformable_detr()
    return model.train()


def worker(name: str, steps: int, threads: int, gradient_checkpointing: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    inputs = coco_batch()
    model = build(name, gradient_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    labels = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in inputs["labels"]]
    record = {"step": [], "forward": [], "backward": [], "optimizer": []}
    for step in range(steps + 1):  # the first step warms up (allocator, oneDNN primitives, kernel load)
        start = time.perf_counter()
        loss = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], labels=labels).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if step > 0:
            record["step"].append(end - start)
            record["forward"].append(forward - start)
            record["backward"].append(backward - forward)
            record["optimizer"].append(end - backward)
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    record["image_size"] = list(inputs["pixel_values"].shape)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="child processes per candidate (interleaved)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child, after one warm-up step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="also measure ours with checkpointing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads, args.checkpointing_worker)))
        return 0
    if not (COCO_MINI / "annotations" / "instances_train2017.json").exists():
        print(f"COCO-MINI not found at {COCO_MINI}")
        return 1

    runs = [(name, False) for name in CANDIDATES] + ([("hf_dino", True)] if args.gradient_checkpointing else [])
    labels = {("hf_dino", False): "hf_dino", ("transformers DeformableDetr", False): "transformers DeformableDetr",
              ("hf_dino", True): "hf_dino + gradient checkpointing"}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    results: dict[str, dict[str, list]] = {labels[r]: {} for r in runs}
    print(f"threads={args.threads}, batch 2 COCO-MINI train images, {args.repeats} processes x {args.steps} steps "
          f"per candidate, interleaved; load average {os.getloadavg()[0]:.1f} at start")
    for _ in range(args.repeats):
        for name, checkpointing in runs:
            command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                       "--threads", str(args.threads)] + (["--checkpointing-worker"] if checkpointing else [])
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. out of memory: say so, keep the other candidates' figures
                print(f"{labels[(name, checkpointing)]}: child failed ({proc.returncode}): "
                      f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ''}", flush=True)
                continue
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{labels[(name, checkpointing)]}: steps {record['step']}, peak RSS {record['peak_rss_gb']:.2f} GB",
                  flush=True)
            target = results[labels[(name, checkpointing)]]
            for key, value in record.items():
                if key == "image_size":
                    target["image_size"] = value
                else:
                    target.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    print(f"image batch {results['hf_dino'].get('image_size')}; load average {os.getloadavg()[0]:.1f} at the end")
    peer = results["transformers DeformableDetr"]
    peer_step = statistics.median(peer["step"]) if peer else float("nan")
    peer_rss = max(peer["peak_rss_gb"]) if peer else float("nan")
    for label, record in results.items():
        if not record:
            continue
        step, rss = statistics.median(record["step"]), max(record["peak_rss_gb"])
        parts = ", ".join(f"{k} {statistics.median(record[k]):.1f} s" for k in ("forward", "backward", "optimizer"))
        print(f"{label:34s} step median {step:6.1f} s ({step / peer_step:4.2f}x peer)  peak RSS {rss:5.2f} GB "
              f"({rss / peer_rss:4.2f}x peer)  [{parts}; steps {', '.join(f'{s:.1f}' for s in record['step'])}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
