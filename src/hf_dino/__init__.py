"""hf_dino: DINO (DETR with Improved deNoising anchOr boxes) as a Hugging Face transformers model.

Importing the package registers `DinoConfig`, `DinoModel`, `DinoForObjectDetection` and `DinoImageProcessor` with
the transformers Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForObjectDetection`, `AutoImageProcessor`),
so `pipeline("object-detection", model=...)` and `from_pretrained` work on saved DINO folders.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from .configuration_dino import DinoConfig
from .image_processing_dino import DinoImageProcessor
from .modeling_dino import DinoForObjectDetection, DinoModel, DinoPreTrainedModel


def _register() -> None:
    """Register with the Auto classes; `exist_ok` makes a second import (or a reload) harmless."""
    AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
    AutoModel.register(DinoConfig, DinoModel, exist_ok=True)
    AutoModelForObjectDetection.register(DinoConfig, DinoForObjectDetection, exist_ok=True)
    AutoImageProcessor.register(DinoConfig, fast_image_processor_class=DinoImageProcessor, exist_ok=True)


_register()

__version__ = "0.1.0"
__all__ = ["DinoConfig", "DinoModel", "DinoForObjectDetection", "DinoPreTrainedModel", "DinoImageProcessor"]
