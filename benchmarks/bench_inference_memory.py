"""Inference memory and low-precision latency: peak RSS and median latency of one 800x1333 image, float32 and
bfloat16, hf_dino DINO-R50-4scale against transformers' DeformableDetr sized like DINO (as in bench_inference.py).

Each candidate runs in a fresh child process (its peak RSS is its own; the RSS right after building the model is
printed too, so the activations' share is visible), the children interleaved (A, B, C, D, A, B, ...) so that
background load affects them alike; each child does one warm-up forward and ``--steps`` timed ones under
``torch.inference_mode``. bfloat16 means ``model.to(torch.bfloat16)`` (weights and activations 16-bit; DINO keeps
its box geometry in float32); ``--autocast`` adds float32 models under ``torch.autocast("cpu", torch.bfloat16)``;
``--reuse-freed-memory`` adds float32 runs with glibc keeping freed memory for reuse (``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` at 16 GiB, the README's recipe; by default every freed block above 32 MB goes back to the
system and the next forward faults its pages in again). Random weights, a random 800x1333 input (latency and memory
do not depend on the values).

    python benchmarks/bench_inference_memory.py [--threads 2] [--repeats 2] [--steps 2] [--autocast]
                                                [--reuse-freed-memory]
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


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def worker(model_name: str, mode: str, steps: int, threads: int) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if model_name == "hf_dino":
        from hf_dino import DinoConfig, DinoForObjectDetection

        model = DinoForObjectDetection(DinoConfig())
    else:
        from bench_inference import (
            deformable_detr,  # this script's folder is on the path (run as a script)
        )

        model = deformable_detr()
    model.eval()
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    model.to(dtype)
    pixel_values = torch.randn(1, 3, 800, 1333, dtype=dtype)
    pixel_mask = torch.ones(1, 800, 1333, dtype=torch.long)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()
    built = _rss_gb()
    times = []
    with torch.inference_mode(), context:
        for step in range(steps + 1):
            start = time.perf_counter()
            model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            if step > 0:
                times.append(time.perf_counter() - start)
    return {"times": times, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "model_rss_gb": built}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="child processes per candidate (interleaved)")
    parser.add_argument("--steps", type=int, default=2,
                        help="timed forwards per child, after one warm-up (0: peak memory only)")
    parser.add_argument("--autocast", action="store_true", help="also float32 models under bfloat16 autocast")
    parser.add_argument("--reuse-freed-memory", action="store_true",
                        help="also float32 with glibc keeping freed memory for reuse")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--threads, --repeats and --steps must be >= 1")
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.threads)))
        return 0

    from bench_train_step import REUSE_FREED_MEMORY  # this script's folder is on the path (run as a script)

    # (mode label, worker mode, glibc keeping freed memory)
    modes = [("float32", "float32", False), ("bfloat16", "bfloat16", False)]
    modes += [("autocast", "autocast", False)] if args.autocast else []
    modes += [("float32 + reuse freed memory", "float32", True)] if args.reuse_freed_memory else []
    runs = [(model, mode) for mode in modes for model in ("hf_dino", "transformers DeformableDetr")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if any(key in env for key in REUSE_FREED_MEMORY):
        print("note: MALLOC_* settings of this shell apply to every run: " +
              " ".join(f"{key}={env[key]}" for key in REUSE_FREED_MEMORY if key in env))
    results: dict[tuple[str, tuple], dict[str, list]] = {run: {} for run in runs}
    print(f"threads={args.threads}, 1x3x800x1333, {args.repeats} processes x {args.steps} forwards per candidate, "
          f"interleaved; load average {os.getloadavg()[0]:.1f} at start")
    for _ in range(args.repeats):
        for model, mode in runs:
            label, worker_mode, reuse = mode
            command = [sys.executable, __file__, "--worker", model, worker_mode, "--steps", str(args.steps),
                       "--threads", str(args.threads)]
            proc = subprocess.run(command, env={**env, **REUSE_FREED_MEMORY} if reuse else env, capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                print(f"{model} {label}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            record = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{model} {label}: {record}", flush=True)
            for key, value in record.items():
                results[(model, mode)].setdefault(key, []).extend(value if isinstance(value, list) else [value])
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    def median(values: list) -> float:  # --steps 0 measures memory only
        return statistics.median(values) if values else float("nan")

    ours_fp32 = median(results[("hf_dino", modes[0])].get("times", []))
    for (model, mode), record in results.items():
        if not record:
            continue
        latency, peak = median(record.get("times", [])), max(record["peak_rss_gb"])
        peer = results[("transformers DeformableDetr", mode)]
        peer_text = ""
        if model == "hf_dino" and peer:
            peer_text = (f"  vs peer: {latency / median(peer.get('times', [])):4.2f}x time, "
                         f"{peak / max(peer['peak_rss_gb']):4.2f}x peak RSS")
        print(f"{model:28s} {mode[0]:9s} median {latency:6.2f} s ({latency / ours_fp32:4.2f}x our float32)  "
              f"peak RSS {peak:5.2f} GB (model built: {max(record['model_rss_gb']):4.2f} GB){peer_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
