"""ONNX export of DINO, and a small onnxruntime runner.

    from hf_dino.export import export_onnx, DinoOnnxDetector
    export_onnx(model, "dino.onnx")                       # one file, dynamic batch / height / width
    detector = DinoOnnxDetector("dino.onnx", processor)   # processor -> onnxruntime -> post-processing
    detections = detector([image], threshold=0.3)

The graph has inputs ``pixel_values [B, 3, H, W]`` (float32) and ``pixel_mask [B, H, W]`` (int64, 1 = pixel) and
outputs ``logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (normalized cx, cy, w, h) and ``encoder_topk_indices
[B, Q]`` (the encoder tokens chosen by query selection, best first). Batch, height and width are symbolic, so one
file serves every size the processor produces. Only standard ONNX operators are used (default domain): a stock
``onnxruntime.InferenceSession`` runs it without any custom-op library.

Deformable attention in the graph: ONNX ``GridSample`` (opset >= 16, bilinear, zeros padding,
``align_corners=0``), one per level and attention module. Why GridSample rather than a gather-based bilinear
sampler:

* it is *the* definition of the sampling in this package (``multi_scale_deformable_attention_pytorch``, the
  reference the compiled kernel is tested against, and the original DINO's ``ms_deform_attn_core_pytorch``), so
  the graph computes the same exact bilinear interpolation as the model and the original, not an approximation
  (RT-DETRv2's ``discrete_sampling`` rounds to the nearest pixel and loses ~0.5 AP);
* a gather-based sampler has to materialise the four corner values of every sample before weighting them:
  ``B * heads * queries * levels * points * 4 * head_dim`` floats, ~1.3 GB per encoder layer for one 800x1201
  image (~20k queries), where ``GridSample`` reads the corners in place. In onnxruntime (the runtime this export
  is verified with) that is many times the memory traffic for the same result;
* the TensorRT problems with GridSample (wrong detections reported for TensorRT engines built from it) are a
  TensorRT matter; this export is verified against onnxruntime only. TensorRT users should check their engine's
  outputs against :class:`DinoOnnxDetector` before trusting it.

How the model becomes exportable (both numerically identical to the eager model): level sizes travel as Python
ints / symbolic sizes next to the ``spatial_shapes`` tensor (no size is read back from a tensor), and during the
export every deformable attention module takes the pure-PyTorch (``grid_sample``) path instead of the compiled custom
op, which no ONNX runtime knows (:func:`pure_pytorch_attention`). The Swin backbone writes its padded sizes as
ceil-divisions, its reshapes with explicit sizes and its shifted-window mask from comparisons with the (symbolic)
map size, so window padding, masks and patch merging follow the input size in the graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .deformable_attention import multi_scale_deformable_attention_pytorch
from .modeling_dino import DinoForObjectDetection, DinoMultiscaleDeformableAttention, check_pixel_mask

__all__ = [
    "MIN_EXPORTER_OPSET",
    "MIN_OPSET",
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "DinoExportError",
    "DinoOnnxDetector",
    "export_onnx",
    "require_onnx",
    "require_onnxruntime",
]

MIN_OPSET = 16  # ONNX GridSample (4-D) exists from opset 16
MIN_EXPORTER_OPSET = 18  # the oldest opset the torch.onnx (dynamo) exporter writes (16 and 17 fail to convert)
DEFAULT_OPSET = 18  # the torch.onnx (dynamo) exporter's own opset
INPUT_NAMES = ("pixel_values", "pixel_mask")
OUTPUT_NAMES = ("logits", "pred_boxes", "encoder_topk_indices")
_STANDARD_DOMAINS = {"", "ai.onnx"}
_PROTOBUF_LIMIT = 2**31 - 1


class DinoExportError(RuntimeError):
    """The model cannot be written as a standard-operator ONNX graph."""


def _missing(package: str, purpose: str) -> ImportError:
    return ImportError(
        f"{purpose} needs the `{package}` package, which is not installed. Install the ONNX extra: "
        "pip install 'hf_dino[onnx]' (onnx, onnxruntime, onnxscript)."
    )


def require_onnx() -> None:
    """Raise a clear ImportError (naming the `onnx` extra) when the exporter's dependencies are missing."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise _missing(package, "Exporting DINO to ONNX")


def require_onnxruntime():
    """`onnxruntime`, or a clear ImportError naming the `onnx` extra."""
    try:
        import onnxruntime
    except ImportError as error:
        raise _missing("onnxruntime", "Running an exported DINO graph") from error
    return onnxruntime


class DinoOnnxGraph(nn.Module):
    """What is exported: `DinoForObjectDetection` reduced to the three graph outputs (see the module docstring)."""

    def __init__(self, model: DinoForObjectDetection):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, return_dict=True)
        return outputs.logits, outputs.pred_boxes, outputs.encoder_topk_indices


def _check_exportable(model: nn.Module, opset: int) -> None:
    if not isinstance(model, DinoForObjectDetection):
        raise TypeError(f"export_onnx expects a DinoForObjectDetection, got {type(model).__name__}.")
    if opset < MIN_OPSET:
        raise ValueError(
            f"opset {opset} is too old: DINO's deformable attention is exported as ONNX GridSample, which needs "
            f"opset >= {MIN_OPSET} (onnxruntime >= 1.11). Use --opset {DEFAULT_OPSET}."
        )
    if opset < MIN_EXPORTER_OPSET:
        raise ValueError(
            f"opset {opset} has GridSample, but the torch.onnx (dynamo) exporter used here writes opset "
            f">= {MIN_EXPORTER_OPSET} only: asked for {opset}, it exports at {MIN_EXPORTER_OPSET} and its conversion "
            f"down fails on the Reduce* operators (their `axes` became an input in opset 18), leaving an opset-18 "
            f"file. Use --opset {MIN_EXPORTER_OPSET} or newer (onnxruntime >= 1.14 runs it)."
        )
    for name, module in model.named_modules():
        if isinstance(module, DinoMultiscaleDeformableAttention) and (
            type(module).forward is not DinoMultiscaleDeformableAttention.forward
        ):
            raise DinoExportError(
                f"{name} ({type(module).__name__}) overrides the deformable-attention forward; only the built-in "
                "formulation (bilinear grid_sample, exported as ONNX GridSample) can be expressed in standard ONNX."
            )
    from . import deformable_attention

    if deformable_attention.multi_scale_deformable_attention_pytorch is not multi_scale_deformable_attention_pytorch:
        raise DinoExportError("multi_scale_deformable_attention_pytorch was replaced; cannot export the sampler.")


def _check_standard_ops(onnx_model) -> None:
    custom = sorted({f"{node.domain}::{node.op_type}" for node in onnx_model.graph.node if node.domain not in _STANDARD_DOMAINS})
    if custom:
        raise DinoExportError(
            f"the exported graph contains non-standard operators {custom}; a stock onnxruntime could not run it "
            "(a custom op in the model that has no ONNX equivalent, e.g. a replaced deformable attention)."
        )


@contextlib.contextmanager
def pure_pytorch_attention(model: torch.nn.Module) -> Iterator[None]:
    """While active, every deformable attention module of `model` runs the pure-PyTorch path (`grid_sample`, ONNX
    `GridSample`) rather than the compiled custom op; the modules' own setting is restored afterwards."""
    modules = [m for m in model.modules() if isinstance(m, DinoMultiscaleDeformableAttention)]
    saved = [m.disable_custom_kernels for m in modules]
    for module in modules:
        module.disable_custom_kernels = True
    try:
        yield
    finally:
        for module, value in zip(modules, saved):
            module.disable_custom_kernels = value


def export_onnx(
    model: DinoForObjectDetection,
    output_path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    processor=None,
    example_size: tuple[int, int] = (480, 640),
    dynamic_batch: bool = True,
    dynamic_size: bool = True,
    verbose: bool = False,
) -> Path:
    """Export `model` to one ONNX file with inputs `pixel_values [B, 3, H, W]`, `pixel_mask [B, H, W]` (int64) and
    outputs `logits [B, Q, C]`, `pred_boxes [B, Q, 4]`, `encoder_topk_indices [B, Q]`.

    Args:
        model: the detector (put in eval mode; float32 weights are exported as they are).
        output_path: the `.onnx` file to write (weights inside it when under the 2 GB protobuf limit, else next to
            it as `<name>.data`).
        processor: the model's image processor; its configuration is stored in the file's metadata (with the
            model config, for label names), so that :class:`DinoOnnxDetector` needs nothing else.
        opset: ONNX opset, at least 18: GridSample needs 16, and the torch.onnx (dynamo) exporter writes 18 and
            newer only (a clear ValueError for 16 and 17, which it cannot convert the graph down to).
        example_size: `(height, width)` of the example batch used for tracing (any size the processor produces).
        dynamic_batch, dynamic_size: make the batch / the height and width symbolic (the default). With
            `dynamic_size=False` the graph only accepts `example_size`.

    Raises:
        ValueError: opset too old (< 16: no GridSample; 16, 17: not written by the exporter). ImportError: onnx / onnxscript missing (names the `onnx` extra).
        DinoExportError: the model (or a replaced attention) cannot be expressed with standard ONNX operators.
    """
    require_onnx()
    _check_exportable(model, opset)
    import onnx

    model = model.eval()
    output_path = Path(output_path)
    if output_path.is_dir():  # found before the export (minutes for a full model), not when the file is written
        raise ValueError(f"output_path {str(output_path)!r} is a folder; give the .onnx file to write")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = example_size
    device = next(model.parameters()).device
    pixel_values = torch.zeros(2 if dynamic_batch else 1, model.config.num_channels, height, width, device=device)
    pixel_mask = torch.ones(pixel_values.shape[0], height, width, dtype=torch.long, device=device)
    if dynamic_batch:  # a padded second image, so that the mask arithmetic is traced in general form
        pixel_mask[1, height * 3 // 4:, width * 2 // 3:] = 0
    # Height and width are `Dim.DYNAMIC`: torch.export records the guards its symbolic-shape solver cannot prove
    # for every size (e.g. `h <= 7 * ceil(h / 7)` of the Swin window padding, or the contiguity checks of its window
    # reshapes) as checks of the traced program instead of refusing them; they decide strides, not values, and the
    # ONNX graph is generic (tests/test_export.py runs it at other sizes, window multiples and 1-window maps
    # included). A size that the model really specialises on still raises (`DinoExportError`).
    batch = torch.export.Dim("batch", min=1, max=1024) if dynamic_batch else None
    h_dim = torch.export.Dim.DYNAMIC if dynamic_size else None
    w_dim = torch.export.Dim.DYNAMIC if dynamic_size else None
    dynamic_shapes = {
        "pixel_values": {k: v for k, v in {0: batch, 2: h_dim, 3: w_dim}.items() if v is not None},
        "pixel_mask": {k: v for k, v in {0: batch, 1: h_dim, 2: w_dim}.items() if v is not None},
    }
    graph = DinoOnnxGraph(model)
    try:
        with torch.no_grad(), pure_pytorch_attention(model):
            exported = torch.export.export(graph, (pixel_values, pixel_mask), dynamic_shapes=dynamic_shapes, strict=False)
            program = torch.onnx.export(
                exported, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), opset_version=opset,
                # optimize=False: the exporter's graph optimizer (onnxscript) dropped the min/max constants of
                # merged Clip nodes (inverse_sigmoid of the decoder anchors) on the 6-layer model, giving an invalid
                # graph; onnxruntime optimizes the graph itself when it loads it
                dynamo=True, verbose=verbose, optimize=False,
            )
    except torch._dynamo.exc.UserError as error:  # a guard pinned a size: the model is not shape-generic
        raise DinoExportError(f"the model cannot be traced for every image size: {error}") from error
    except Exception as error:
        if "No ONNX function found" in str(error) or "DispatchError" in type(error).__name__:
            raise DinoExportError(f"an operator of the model has no ONNX equivalent: {error}") from error
        raise
    _check_standard_ops(program.model_proto)
    # into the exporter's IR model, which `save` serialises (`model_proto` is a fresh copy at every access)
    program.model.metadata_props["hf_dino.config"] = model.config.to_json_string()
    if processor is not None:
        program.model.metadata_props["hf_dino.preprocessor"] = processor.to_json_string()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    program.save(str(output_path), external_data=size > _PROTOBUF_LIMIT // 2)
    onnx.checker.check_model(str(output_path))
    return output_path


class DinoOnnxDetector:
    """Runs an exported DINO graph with onnxruntime: processor -> session -> `post_process_object_detection`.

    Args:
        path: the `.onnx` file written by :func:`export_onnx` / `hf-dino export`.
        processor: the image processor; by default the one stored in the file by :func:`export_onnx`, else
            `DinoImageProcessor()` defaults.
        providers: onnxruntime execution providers (default: CPU).
        num_threads: intra-op threads of the session (onnxruntime's default when None).
    """

    def __init__(self, path: str | os.PathLike, processor=None, providers: Sequence[str] | None = None,
                 num_threads: int | None = None):
        ort = require_onnxruntime()
        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
        names = [i.name for i in self.session.get_inputs()]
        if names != list(INPUT_NAMES):
            raise ValueError(f"{path} is not a DINO export: inputs {names}, expected {list(INPUT_NAMES)}.")
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.config = None
        if "hf_dino.config" in metadata:
            from .configuration_dino import DinoConfig

            self.config = DinoConfig(**json.loads(metadata["hf_dino.config"]))
        if processor is None:
            from .image_processing_dino import DinoImageProcessor

            stored = metadata.get("hf_dino.preprocessor")
            processor = DinoImageProcessor.from_dict(json.loads(stored)) if stored else DinoImageProcessor()
        self.processor = processor

    @property
    def id2label(self) -> dict[int, str]:
        """Label names stored at export time (empty when the file has none)."""
        return {int(k): v for k, v in self.config.id2label.items()} if self.config is not None else {}

    def forward(self, pixel_values, pixel_mask=None) -> dict[str, np.ndarray]:
        """Raw graph outputs `{"logits", "pred_boxes", "encoder_topk_indices"}` (numpy) for a processed batch."""
        pixel_values = np.ascontiguousarray(_to_numpy(pixel_values), dtype=np.float32)
        if pixel_mask is None:
            pixel_mask = np.ones((pixel_values.shape[0], *pixel_values.shape[2:]), dtype=np.int64)
        pixel_mask = np.ascontiguousarray(_to_numpy(pixel_mask), dtype=np.int64)
        check_pixel_mask(torch.from_numpy(pixel_mask))  # as the PyTorch model (the graph does not check it)
        outputs = self.session.run(list(OUTPUT_NAMES), {"pixel_values": pixel_values, "pixel_mask": pixel_mask})
        return dict(zip(OUTPUT_NAMES, outputs))

    def detect(self, images: Any, threshold: float = 0.3, top_k: int = 300) -> list[dict[str, torch.Tensor]]:
        """One image or a list of images (PIL, numpy / torch arrays, file paths) -> one `{"scores", "labels",
        "boxes"}` dict per image, boxes in pixels of the image as the processor sees it: a photo with an EXIF
        orientation tag turned upright, as `DinoImageProcessor` does (`apply_exif_orientation`)."""
        import PIL.Image

        from .image_processing_dino import load_image_file, to_chw_rgb_tensor

        single = isinstance(images, (str, os.PathLike, PIL.Image.Image)) or (
            isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim <= 3
        )
        images = [images] if single else list(images)
        upright = getattr(self.processor, "apply_exif_orientation", False)
        # each image once as the [3, H, W] tensor the processor would make of it: its size is the boxes' frame
        tensors = [
            to_chw_rgb_tensor(load_image_file(image) if isinstance(image, (str, os.PathLike)) else image, None, upright)
            for image in images
        ]
        inputs = self.processor(tensors, return_tensors="pt")
        outputs = self.forward(inputs["pixel_values"], inputs["pixel_mask"])
        sizes = [tuple(tensor.shape[-2:]) for tensor in tensors]
        return self.processor.post_process_object_detection(outputs, threshold, sizes, top_k)

    def __call__(self, images: Any, threshold: float = 0.3, top_k: int = 300) -> list[dict[str, torch.Tensor]]:
        return self.detect(images, threshold, top_k)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


