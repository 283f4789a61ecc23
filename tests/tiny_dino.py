"""A tiny random DINO saved as a folder, shared by the Hub / evaluation / remote-code tests (plumbing only)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import hf_dino  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(REPO / "src"))

TINY_CONFIG = dict(
    backbone="resnet18",
    encoder_layers=1,
    decoder_layers=1,
    d_model=64,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    encoder_n_points=2,
    decoder_n_points=2,
    num_queries=20,
    num_denoising=0,
)
SMALL_SIZE = {"shortest_edge": 96, "longest_edge": 160}  # keeps CPU forward passes fast


def tiny_model(seed: int = 0, **overrides):
    import torch

    from hf_dino import DinoConfig, DinoForObjectDetection

    torch.manual_seed(seed)
    return DinoForObjectDetection(DinoConfig(**{**TINY_CONFIG, **overrides})).eval()


def tiny_processor():
    from hf_dino import DinoImageProcessor

    return DinoImageProcessor(size=dict(SMALL_SIZE))


def save_tiny_model_dir(path: str | Path, seed: int = 0) -> Path:
    """A plain `save_pretrained` folder (weights, config, processor config), no remote code."""
    path = Path(path)
    tiny_model(seed).save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path
