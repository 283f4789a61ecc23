"""Helpers for tests against the original-DINO parity fixtures in ../shared/parity (see its README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
PARITY = SHARED / "parity"
COCO_MINI = SHARED / "data" / "coco-mini"

FIXTURE_MODEL_NAMES = {"r50_4scale": "dino-r50-4scale", "swinl_4scale": "dino-swinl-4scale"}


def require_parity(fixture: str | None = None) -> Path:
    """The fixture folder, or skip the test with a clear message when ../shared is absent (a user's clone)."""
    path = PARITY if fixture is None else PARITY / fixture
    if not path.exists():
        pytest.skip(f"parity fixtures not found at {path} (../shared is only present in the project's workspace)")
    return path


def write_original_checkpoint(fixture: str, out_dir: Path) -> Path:
    """Write the fixture's synthetic ORIGINAL-format checkpoint with the fixture's own script."""
    folder = require_parity(fixture)
    out = out_dir / f"{fixture}.pth"
    subprocess.run(
        [sys.executable, str(PARITY / "make_original_checkpoint.py"), str(folder / "manifest.json"), str(out)],
        check=True, capture_output=True,
    )
    return out


def convert_with_cli(checkpoint: Path, model_name: str, output_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "conversion" / "convert_original_checkpoint.py"),
         "--checkpoint", str(checkpoint), "--model-name", model_name, "--output-dir", str(output_dir)],
        capture_output=True, text=True,
    )


class ForcedSelection:
    """While active, `torch.topk(scores[B, S], K, dim=1)` returns the fixture's recorded selection (README protocol:
    near-tied encoder scores may swap order under float noise, which changes whole queries)."""

    def __init__(self, indices: torch.Tensor):
        self.indices = indices
        self.calls = 0

    def __enter__(self):
        self.original = torch.topk

        def topk(x, k, dim=-1, largest=True, sorted=True):
            if x.dim() == 2 and k == self.indices.shape[1] and dim in (1, -1) and x.shape[0] == self.indices.shape[0]:
                self.calls += 1
                return torch.return_types.topk((x.gather(1, self.indices), self.indices))
            return self.original(x, k, dim=dim, largest=largest, sorted=sorted)

        torch.topk = topk
        return self

    def __exit__(self, *exc):
        torch.topk = self.original
