"""`--write-expected` / `--verify` of `convert_original_checkpoint.py`: compare a converted model's outputs with a
stored expected-output file.

Expected-output file, format ``hf_dino-verify-v1`` (one safetensors file):

| key | shape, dtype | what |
|---|---|---|
| ``pixel_values`` | [B, 3, H, W] float32 | the input batch (already normalized and padded) |
| ``pixel_mask`` | [B, H, W] int64 | 1 = real pixel, 0 = padding (the Hugging Face convention) |
| ``logits`` | [B, Q, C] float32 | expected last-layer class logits |
| ``pred_boxes`` | [B, Q, 4] float32 | expected last-layer boxes, normalized (cx, cy, w, h) |
| ``encoder_topk_indices`` | [B, Q] int64, optional | the query selection of the reference run |
| ``encoder_logits`` | [B, Q, C] float32, optional | class logits of the selected encoder proposals |

safetensors metadata: ``format = "hf_dino-verify-v1"``, and informative ``model_name``, ``checkpoint``,
``torch_version``, ``created_by``.

When ``encoder_topk_indices`` is present, the query selection is forced to it during the verification forward pass
(``hf_dino.modeling_dino.forced_query_selection``, which replaces the ranking of that one model instance): encoder proposals whose scores tie to ~1e-6 may come in another order under
other float arithmetic (threads, CPU kernels), and one swap changes whole queries (see the parity fixtures' README).
The actual selection is still reported (positions that differ). Outputs must then agree within ``atol``.

The parity fixtures of the original implementation are accepted as they are: ``--verify DIR`` (or DIR's
``expected.safetensors``) with ``inputs.safetensors`` beside it; their ``pixel_mask`` (True = padding) is inverted,
``pred_logits`` / ``interm_outputs.pred_logits`` / ``internals.enc_topk_indices`` are read as ``logits`` /
``encoder_logits`` / ``encoder_topk_indices``.

``write_expected`` records the outputs of a model (typically right after a conversion that was checked otherwise) on
a deterministic input: a synthetic batch of two images of different sizes (seeded noise, padding in the second) or
the given image files run through the image processor.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_dino.modeling_dino import forced_query_selection

FORMAT = "hf_dino-verify-v1"
DEFAULT_ATOL = 1e-4


@dataclasses.dataclass
class VerifyReport:
    ok: bool
    max_abs_diff: dict[str, float]
    atol: float
    forced_selection: bool
    selection_positions_differing: int | None

    def __str__(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        selection = (
            f"; query selection forced to the stored one ({self.selection_positions_differing} positions of the "
            f"model's own selection differ)"
            if self.forced_selection
            else ""
        )
        return f"{'OK' if self.ok else 'MISMATCH'}: max |diff| {diffs} (atol {self.atol:g}){selection}"


def _synthetic_inputs(seed: int = 0, height: int = 320, width: int = 480) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, height, width, generator=generator)
    pixel_mask = torch.ones(2, height, width, dtype=torch.int64)
    pixel_mask[1, (height * 3) // 4 :, :] = 0  # the second image is smaller: padded at the bottom and right
    pixel_mask[1, :, (width * 2) // 3 :] = 0
    pixel_values[1] *= pixel_mask[1]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask}


def _image_inputs(images: Sequence[str | Path], processor) -> dict[str, torch.Tensor]:
    from PIL import Image

    loaded = [Image.open(path).convert("RGB") for path in images]
    batch = processor(images=loaded, return_tensors="pt")
    return {"pixel_values": batch["pixel_values"].float(), "pixel_mask": batch["pixel_mask"].long()}


def write_expected(
    model,
    path: str | Path,
    images: Sequence[str | Path] | None = None,
    processor=None,
    metadata: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on the synthetic batch (or on ``images`` through ``processor``) and store the expected file."""
    inputs = _image_inputs(images, processor) if images else _synthetic_inputs()
    model.eval()
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    tensors = {
        "pixel_values": inputs["pixel_values"].contiguous(),
        "pixel_mask": inputs["pixel_mask"].contiguous(),
        "logits": outputs.logits.float().contiguous(),
        "pred_boxes": outputs.pred_boxes.float().contiguous(),
    }
    if getattr(outputs, "encoder_topk_indices", None) is not None:
        tensors["encoder_topk_indices"] = outputs.encoder_topk_indices.long().contiguous()
    if getattr(outputs, "encoder_logits", None) is not None:
        tensors["encoder_logits"] = outputs.encoder_logits.float().contiguous()
    meta = {"format": FORMAT, "torch_version": torch.__version__, "created_by": "hf_dino conversion/verify.py"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return tensors


def load_expected(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an ``hf_dino-verify-v1`` file or a parity fixture (folder, or its ``expected.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "expected.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no expected-output file at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    if meta.get("format") == FORMAT or {"pixel_values", "logits", "pred_boxes"} <= keys:
        data = load_file(str(path))
        missing = {"pixel_values", "pixel_mask", "logits", "pred_boxes"} - set(data)
        if missing:
            raise ValueError(f"{path}: not a complete {FORMAT} file, missing {sorted(missing)}")
        return data
    inputs_path = path.parent / "inputs.safetensors"
    if "pred_logits" in keys and inputs_path.is_file():  # a parity fixture of the original implementation
        expected, inputs = load_file(str(path)), load_file(str(inputs_path))
        data = {
            "pixel_values": inputs["pixel_values"],
            "pixel_mask": (~inputs["pixel_mask"].bool()).long(),  # fixture: True = padding
            "logits": expected["pred_logits"],
            "pred_boxes": expected["pred_boxes"],
        }
        if "internals.enc_topk_indices" in expected:
            data["encoder_topk_indices"] = expected["internals.enc_topk_indices"].long()
        if "interm_outputs.pred_logits" in expected:
            data["encoder_logits"] = expected["interm_outputs.pred_logits"]
        return data
    raise ValueError(f"{path}: neither an {FORMAT} file nor a parity fixture (expected.safetensors + inputs.safetensors)")


def verify(model, expected: str | Path | dict, atol: float = DEFAULT_ATOL) -> VerifyReport:
    """Run ``model`` on the stored inputs and compare with the stored outputs (max absolute difference)."""
    data = load_expected(expected) if not isinstance(expected, dict) else expected
    model.eval()
    forced = "encoder_topk_indices" in data
    with torch.no_grad():
        with forced_query_selection(model, data["encoder_topk_indices"]) if forced else contextlib.nullcontext() as record:
            outputs = model(pixel_values=data["pixel_values"].float(), pixel_mask=data["pixel_mask"].long())
    if forced and record.calls != 1:
        raise RuntimeError(f"query selection was replaced {record.calls} times (expected 1)")
    diffs = {}
    pairs = [("logits", outputs.logits), ("pred_boxes", outputs.pred_boxes)]
    if "encoder_logits" in data and getattr(outputs, "encoder_logits", None) is not None:
        pairs.append(("encoder_logits", outputs.encoder_logits))
    for key, actual in pairs:
        reference = data[key]
        if tuple(actual.shape) != tuple(reference.shape):
            raise ValueError(f"{key}: model output {tuple(actual.shape)} vs expected {tuple(reference.shape)}")
        diffs[key] = float((actual.float() - reference.float()).abs().max())
    differing = None
    if forced and record.own is not None:
        differing = int((record.own != data["encoder_topk_indices"].to(record.own.device)).sum())
    ok = all(d <= atol for d in diffs.values())
    return VerifyReport(ok=ok, max_abs_diff=diffs, atol=atol, forced_selection=forced, selection_positions_differing=differing)


__all__ = ["FORMAT", "DEFAULT_ATOL", "VerifyReport", "load_expected", "verify", "write_expected"]
