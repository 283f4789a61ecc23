"""One optimizer step of DINO-R50-4scale against transformers' DeformableDetr proxy: median step time, peak RSS.

A step is: forward (ours: with contrastive denoising queries), loss, backward, AdamW step, on 2 real COCO-MINI train
images (the first two of ../shared/data/coco-mini/train2017 with annotations) preprocessed by ``DinoImageProcessor``
at the paper's training size (shorter side 800, longer side at most 1333), batch 2. Both are landscape photos, so
their canvas has 1 % padding; ``--batch mixed`` takes the first landscape and the first portrait image instead (a
third of the canvas is padding, as in a training batch of differently shaped photos). The peer is
``DeformableDetrForObjectDetection`` sized like DINO (two-stage, box refinement, 900 queries, FFN 2048) with its own
loss on the same batch. Randomly initialised weights (nothing is downloaded).

Every measurement runs in a fresh child process (so that its peak RSS is its own), the children interleaved
(ours, peer, ours, peer, ...) so that background load affects both alike; each child does one warm-up step and
``--steps`` timed steps. Medians over all timed steps, the ratios ours / peer, and where our step's time goes
(forward + loss, backward, optimizer) are printed. ``--gradient-checkpointing`` adds a third candidate: ours with
``model.gradient_checkpointing_enable()``.

Each step's minor page faults and kernel (system) CPU time are printed too. With glibc's default allocator every
tensor over its mmap threshold (at most 32 MB) is a fresh mapping, returned to the system when freed, so its pages
fault in again, zero-filled by the kernel, at the next step. ``--reuse-freed-memory`` adds both candidates run with
glibc keeping freed memory for reuse instead (``REUSE_FREED_MEMORY``: ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` at 16 GiB), interleaved with the default runs: the README's CPU-training recipe.

    python benchmarks/bench_train_step.py [--threads 2] [--repeats 2] [--steps 2] [--gradient-checkpointing]
                                          [--reuse-freed-memory] [--batch {first,mixed}]
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
# glibc: serve every allocation below 16 GiB from the heap, and never give the heap's free top back to the system
REUSE_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(16 * 2**30), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}


def coco_batch(batch: str = "first"):
    """Pixel values, mask and DINO-style labels of two annotated COCO-MINI train images: the first two (`first`), or
    the first landscape and the first portrait one (`mixed`)."""
    from PIL import Image

    from hf_dino import DinoImageProcessor

    data = json.loads((COCO_MINI / "annotations" / "instances_train2017.json").read_text())
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    images = [img for img in sorted(data["images"], key=lambda i: i["id"]) if img["id"] in by_image]
    if batch == "mixed":
        images = [next(img for img in images if img["width"] > img["height"]),
                  next(img for img in images if img["width"] < img["height"])]
    images = images[:2]
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


def worker(name: str, steps: int, threads: int, gradient_checkpointing: bool, batch: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    inputs = coco_batch(batch)
    model = build(name, gradient_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    labels = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in inputs["labels"]]
    record = {"step": [], "forward": [], "backward": [], "optimizer": [], "minor_faults": [], "system": []}
    for step in range(steps + 1):  # the first step warms up (allocator, oneDNN primitives, kernel load)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        loss = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], labels=labels).loss
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        usage_end = resource.getrusage(resource.RUSAGE_SELF)
        if step > 0:
            record["minor_faults"].append(usage_end.ru_minflt - usage.ru_minflt)
            record["system"].append(usage_end.ru_stime - usage.ru_stime)  # CPU seconds, all threads
            record["step"].append(end - start)
            record["forward"].append(forward - start)
            record["backward"].append(backward - forward)
            record["optimizer"].append(end - backward)
    record["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    record["image_size"] = list(inputs["pixel_values"].shape)
    record["padding"] = 1 - inputs["pixel_mask"].float().mean().item()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="child processes per candidate (interleaved)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per child, after one warm-up step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="also measure ours with checkpointing")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="also measure both candidates with glibc keeping freed memory for reuse")
    parser.add_argument("--batch", choices=("first", "mixed"), default="first",
                        help="the first two images, or a landscape and a portrait one (a third of the canvas padded)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--threads, --repeats and --steps must be >= 1")
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.threads, args.checkpointing_worker, args.batch)))
        return 0
    if not (COCO_MINI / "annotations" / "instances_train2017.json").exists():
        print(f"COCO-MINI not found at {COCO_MINI}")
        return 1

    # (candidate, gradient checkpointing, glibc keeping freed memory)
    runs = [(name, False, False) for name in CANDIDATES]
    runs += [("hf_dino", True, False)] if args.gradient_checkpointing else []
    runs += [(name, False, True) for name in CANDIDATES] if args.reuse_freed_memory else []
    labels = {run: run[0] + (" + gradient checkpointing" if run[1] else "") + (" + reuse freed memory" if run[2] else "")
              for run in runs}
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if any(key in env for key in REUSE_FREED_MEMORY):
        print("note: MALLOC_* settings of this shell apply to every run: " +
              " ".join(f"{key}={env[key]}" for key in REUSE_FREED_MEMORY if key in env))
    results: dict[str, dict[str, list]] = {labels[r]: {} for r in runs}
    print(f"threads={args.threads}, batch 2 COCO-MINI train images ({args.batch}), {args.repeats} processes x {args.steps} steps "
          f"per candidate, interleaved; load average {os.getloadavg()[0]:.1f} at start")
    for _ in range(args.repeats):
        for run in runs:
            name, checkpointing, reuse = run
            command = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps),
                       "--threads", str(args.threads), "--batch", args.batch] + (["--checkpointing-worker"] if checkpointing else [])
            proc = subprocess.run(command, env={**env, **REUSE_FREED_MEMORY} if reuse else env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. out of memory: say so, keep the other candidates' figures
                print(f"{labels[run]}: child failed ({proc.returncode}): "
                      f"{proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else ''}", flush=True)
                continue
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{labels[run]}: steps {record['step']}, peak RSS {record['peak_rss_gb']:.2f} GB",
                  flush=True)
            target = results[labels[run]]
            for key, value in record.items():
                if key in ("image_size", "padding"):
                    target[key] = value
                else:
                    target.setdefault(key, []).extend(value if isinstance(value, list) else [value])
    print(f"image batch {results['hf_dino'].get('image_size')}, "
          f"{100 * results['hf_dino'].get('padding', float('nan')):.0f} % padding; load average {os.getloadavg()[0]:.1f} at the end")
    medians = {run: (statistics.median(results[labels[run]]["step"]), max(results[labels[run]]["peak_rss_gb"]))
               for run in runs if results[labels[run]]}
    nan = (float("nan"), float("nan"))
    for run, (step, rss) in medians.items():
        record = results[labels[run]]
        # against the peer under the same allocator settings; with reused memory also against the default allocator
        peer_step, peer_rss = medians.get(("transformers DeformableDetr", False, run[2]), nan)
        default_step, default_rss = medians.get((run[0], run[1], False), nan)
        parts = ", ".join(f"{k} {statistics.median(record[k]):.1f} s" for k in ("forward", "backward", "optimizer"))
        parts += (f", {statistics.median(record['minor_faults']) / 1e6:.2f} M page faults, kernel CPU "
                  f"{statistics.median(record['system']):.1f} s")
        versus_default = f" ({step / default_step:4.2f}x / {rss / default_rss:4.2f}x default allocator)" if run[2] else ""
        print(f"{labels[run]:48s} step median {step:6.1f} s ({step / peer_step:4.2f}x peer)  peak RSS {rss:5.2f} GB "
              f"({rss / peer_rss:4.2f}x peer){versus_default}  [{parts}; steps "
              f"{', '.join(f'{s:.1f}' for s in record['step'])}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
