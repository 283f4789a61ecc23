"""hf_dino: DINO (DETR with Improved deNoising anchOr boxes) as a Hugging Face transformers model."""

from .configuration_dino import DinoConfig

__all__ = ["DinoConfig"]
