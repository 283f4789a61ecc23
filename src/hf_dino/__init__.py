"""hf_dino: DINO (DETR with Improved deNoising anchOr boxes) as a Hugging Face transformers model.

Importing the package registers `DinoConfig`, `DinoModel`, `DinoForObjectDetection` and `DinoImageProcessor` with
the transformers Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForObjectDetection`, `AutoImageProcessor`),
so `pipeline("object-detection", model=...)` and `from_pretrained` work on saved DINO folders.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

from .configuration_dino import DinoConfig
from .image_processing_dino import DinoImageProcessor, DinoImageProcessorPil
from .modeling_dino import DinoForObjectDetection, DinoModel, DinoPreTrainedModel
from .pipeline_dino import register_pipeline


def _register() -> None:
    """Register with the Auto classes; `exist_ok` makes a second import (or a reload) harmless."""
    AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
    AutoModel.register(DinoConfig, DinoModel, exist_ok=True)
    AutoModelForObjectDetection.register(DinoConfig, DinoForObjectDetection, exist_ok=True)
    AutoImageProcessor.register(
        DinoConfig,
        image_processor_classes={"torchvision": DinoImageProcessor, "pil": DinoImageProcessorPil},
        exist_ok=True,
    )
    # lets pipeline("object-detection") recognise the architecture without a warning
    MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(DinoConfig.model_type, DinoForObjectDetection.__name__)
    # pipeline("object-detection", batch_size=N) pads DINO batches of mixed image sizes (hf_dino.pipeline_dino)
    register_pipeline()


_register()

__version__ = "0.1.0"
__all__ = [
    "DinoConfig", "DinoModel", "DinoForObjectDetection", "DinoPreTrainedModel", "DinoImageProcessor", "DinoImageProcessorPil",
]
