"""Pre-build / inspect the deformable attention kernels.

    python -m hf_dino.kernels build [--device cpu] [--device cuda] [--verbose]
    python -m hf_dino.kernels info

``build`` compiles into the cache that later processes load from (``HF_DINO_KERNELS_CACHE`` moves it, e.g.
onto a shared file system or into a Docker layer), printing each stage; a cached build that fails verification
(truncated or modified library) is deleted and rebuilt. Without ``--device`` it builds for the CPU and, when this
torch has CUDA and nvcc is present, for CUDA (set ``TORCH_CUDA_ARCH_LIST`` on machines without a GPU).
Exit status 1 when a requested build fails.

``info`` verifies each cached build against the size and SHA-256 recorded when it was built (without loading
it) and says ``built (..., verified)``, ``not built`` or ``CORRUPT: ...``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import _loader


def _default_devices() -> list[str]:
    devices = ["cpu"]
    if torch.version.cuda is not None:
        try:
            _loader.check_toolchain("cuda")
            devices.append("cuda")
        except _loader.KernelBuildError as error:
            print(f"skipping cuda: {error}")
    return devices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_dino.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the extensions into the cache")
    build.add_argument("--device", action="append", choices=_loader.DEVICE_TYPES, help="device type (repeatable)")
    build.add_argument("--verbose", action="store_true", help="show compiler output")
    sub.add_parser("info", help="show sources, cache and build directories")
    args = parser.parse_args(argv)

    if args.command == "info":
        print(f"sources:   {_loader.source_dir()}")
        print(f"cache:     {_loader.cache_root()}")
        print(f"disabled:  {_loader.kernels_disabled()} ({_loader.ENV_DISABLE})")
        for device in _loader.DEVICE_TYPES:
            try:
                directory = _loader.build_directory(device)
                state, details = _loader.check_build(device, directory)
            except _loader.KernelBuildError as error:
                print(f"{device:5s}:     {error}")
                continue
            if state == "ok":
                print(f"{device:5s}:     {directory} (built, {details})")
            elif state == "missing":
                print(f"{device:5s}:     {directory} (not built)")
            else:
                print(f"{device:5s}:     {directory} (CORRUPT: {details}; `python -m hf_dino.kernels build` rebuilds it)")
        return 0

    status = 0
    for device in args.device or _default_devices():
        try:
            module = _loader.build(device, verbose=args.verbose, log=lambda line: print(line, flush=True))
        except Exception as error:  # report every device, fail at the end
            print(f"{device}: build FAILED: {error}", file=sys.stderr)
            status = 1
            continue
        print(f"{device}: ok ({_loader.build_directory(device)}, module {module.__name__})")
    return status


if __name__ == "__main__":
    sys.exit(main())
