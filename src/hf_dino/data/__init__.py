"""Data for training and evaluating DINO: COCO-format folders, ``datasets`` adapter, augmentation, collate, and a
deterministic synthetic data set."""

from .collate import DetectionCollator
from .dataset import CocoDetectionDataset, DetectionDataset, LabelMap, build_label_map, clean_annotations, load_coco
from .hf_datasets import HFDetectionDataset, hf_categories
from .synthetic import SYNTHETIC_CLASSES, generate_synthetic_coco, synthetic_paths
from .transforms import RandomResize, RandomSizeCrop, make_eval_transforms, make_train_transforms, scaled_recipe

__all__ = [
    "CocoDetectionDataset",
    "DetectionCollator",
    "DetectionDataset",
    "HFDetectionDataset",
    "LabelMap",
    "RandomResize",
    "RandomSizeCrop",
    "SYNTHETIC_CLASSES",
    "build_label_map",
    "clean_annotations",
    "generate_synthetic_coco",
    "hf_categories",
    "load_coco",
    "make_eval_transforms",
    "make_train_transforms",
    "scaled_recipe",
    "synthetic_paths",
]
