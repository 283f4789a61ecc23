"""Helpers for tests against the original-DINO parity fixtures in ../shared/parity (see its README)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
