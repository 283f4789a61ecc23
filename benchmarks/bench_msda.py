"""Multi-scale deformable attention: compiled kernel vs the pure-PyTorch (grid_sample) path.

DINO-R50-4scale encoder shapes for an 800x1216 image: levels 100x152, 50x76, 25x38, 13x19 (20197 tokens),
8 heads x 32 channels, 4 levels x 4 points, batch 1; queries = all encoder tokens, and queries = 900
(decoder). Forward (no grad) and forward+backward (gradients of value, sampling locations, attention
weights). Both paths get the same inputs; their timings are interleaved (kernel, reference, kernel, ...) so
that background load affects both alike; medians are reported.

    python benchmarks/bench_msda.py [--threads 2] [--repeats 7] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import hf_dino.kernels as kernels
from hf_dino.deformable_attention import (
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_pytorch,
)

LEVELS = [(100, 152), (50, 76), (25, 38), (13, 19)]
HEADS, HEAD_DIM, POINTS = 8, 32, 4
TARGETS = {"forward": 5.0, "forward+backward": 4.0}


def make_inputs(queries: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    tokens = int(sizes.sum())
    value = torch.randn(1, tokens, HEADS, HEAD_DIM, generator=generator)
    # reference points anywhere in the image plus offsets of a few pixels; some land outside [0, 1]
    reference = torch.rand(1, queries, 1, 1, 1, 2, generator=generator)
    offsets = torch.randn(1, queries, HEADS, len(LEVELS), POINTS, 2, generator=generator) * 0.02
    locations = reference + offsets
    weights = torch.randn(1, queries, HEADS, len(LEVELS) * POINTS, generator=generator).softmax(-1)
    weights = weights.view(1, queries, HEADS, len(LEVELS), POINTS)
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for t in (value, shapes, starts, locations, weights)]


def kernel_path(value, shapes, starts, locations, weights):
    return multi_scale_deformable_attention(value, shapes, starts, locations, weights, use_custom_kernel=True)


def reference_path(value, shapes, starts, locations, weights):
    return multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)


def run_once(fn, inputs, backward: bool, grad_output, synchronize) -> float:
    if backward:
        leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
        start = time.perf_counter()
        out = fn(*leaves)
        out.backward(grad_output)
    else:
        start = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
    synchronize()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per path and case (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    probe = make_inputs(8, device, dtype)
    if not kernels.kernel_usable(probe[0], probe[3], probe[4]):
        print(f"kernel unavailable on {device.type}/{args.dtype}: {kernels.build_error(device.type) or 'disabled'}")
        return 1
    extension = kernels.load_extension(device.type)
    simd = f", simd={extension.simd()}" if hasattr(extension, "simd") else ""
    tokens = sum(h * w for h, w in LEVELS)
    print(f"torch {torch.__version__}, device={device.type}, dtype={args.dtype}, threads={torch.get_num_threads()}"
          f"{simd}, levels={LEVELS}, heads={HEADS}x{HEAD_DIM}, points={len(LEVELS)}x{POINTS}, batch=1, "
          f"repeats={args.repeats}")

    rows = []
    failed = False
    for queries in (tokens, 900):
        inputs = make_inputs(queries, device, dtype)
        grad_output = torch.randn(1, queries, HEADS * HEAD_DIM, device=device, dtype=dtype)
        for mode in ("forward", "forward+backward"):
            backward = mode != "forward"
            times = {"kernel": [], "pytorch": []}
            for _ in range(2):  # warm-up (first-touch allocations, lazy init)
                run_once(kernel_path, inputs, backward, grad_output, synchronize)
                run_once(reference_path, inputs, backward, grad_output, synchronize)
            for _ in range(args.repeats):
                times["kernel"].append(run_once(kernel_path, inputs, backward, grad_output, synchronize))
                times["pytorch"].append(run_once(reference_path, inputs, backward, grad_output, synchronize))
            kernel_ms = statistics.median(times["kernel"]) * 1e3
            pytorch_ms = statistics.median(times["pytorch"]) * 1e3
            ratio = pytorch_ms / kernel_ms
            target = TARGETS[mode]
            ok = ratio >= target
            failed |= not ok and device.type == "cpu"
            rows.append((queries, mode, kernel_ms, pytorch_ms, ratio, target, ok))
            print(f"queries={queries:6d} {mode:17s} kernel {kernel_ms:9.2f} ms   pytorch {pytorch_ms:9.2f} ms   "
                  f"speed-up {ratio:6.2f}x (target {target:.0f}x: {'ok' if ok else 'MISSED'})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
