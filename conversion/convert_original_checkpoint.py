#!/usr/bin/env python
"""Convert an original IDEA-Research/DINO checkpoint (`checkpoint0011_4scale.pth`, ...) to hf_dino.

    python conversion/convert_original_checkpoint.py --checkpoint FILE.pth --model-name dino-r50-4scale --output-dir DIR

The checkpoint is read with `torch.load(..., map_location="cpu", weights_only=True)["model"]`, allowing the
`argparse.Namespace` of arguments that the original `main.py` saves next to the weights (optimizer, scheduler and
epoch are ignored; `--weights ema_model` converts the EMA copy instead). Every original key
goes through the explicit rename table `RENAME_RULES` below; a key that no rule maps, or a model weight that no
key fills, stops the conversion with the full list. The original stores the shared decoder heads under several
aliases (`class_embed.{0-5}`, `transformer.decoder.class_embed.{0-5}`, and the same for `bbox_embed`); all
aliases must hold the same values, which is checked. Swin's `relative_position_index` buffers are recomputed by
the model and checked equal to the checkpoint's. The result is a `save_pretrained` folder (safetensors weights,
config, and the image processor's `preprocessor_config.json`).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from pathlib import Path

import torch

import verify as verify_outputs  # conversion/verify.py, beside this script
from hf_dino import DinoConfig, DinoForObjectDetection, DinoImageProcessor
from hf_dino.training import check_image_file
from hf_dino_cli import output_file_problem

# name -> DinoConfig arguments (everything else: DINO_4scale defaults)
MODEL_CONFIGS: dict[str, dict] = {
    "dino-r50-4scale": dict(backbone="resnet50", num_feature_levels=4),
    "dino-r50-5scale": dict(backbone="resnet50", num_feature_levels=5),
    "dino-swinl-4scale": dict(backbone="swin_large_patch4_window12_384", num_feature_levels=4),
    "dino-swinl-5scale": dict(backbone="swin_large_patch4_window12_384", num_feature_levels=5),
}

# (original key pattern, hf_dino key template); first match wins. `None` = dropped on purpose (see below).
RENAME_RULES: list[tuple[str, str | None]] = [
    # transformer: encoder
    (r"transformer\.level_embed", r"model.level_embed"),
    (r"transformer\.encoder\.layers\.(\d+)\.(self_attn\.(?:sampling_offsets|attention_weights|value_proj|output_proj)\.(?:weight|bias))",
     r"model.encoder.layers.\1.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.((?:norm1|norm2|linear1|linear2)\.(?:weight|bias))", r"model.encoder.layers.\1.\2"),
    # transformer: decoder layers (nn.MultiheadAttention self-attention keeps its q/k/v stacking)
    (r"transformer\.decoder\.layers\.(\d+)\.(cross_attn\.(?:sampling_offsets|attention_weights|value_proj|output_proj)\.(?:weight|bias))",
     r"model.decoder.layers.\1.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.(self_attn\.(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias))",
     r"model.decoder.layers.\1.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.((?:norm1|norm2|norm3|linear1|linear2)\.(?:weight|bias))", r"model.decoder.layers.\1.\2"),
    (r"transformer\.decoder\.norm\.(weight|bias)", r"model.decoder.layer_norm.\1"),
    (r"transformer\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)", r"model.decoder.reference_point_head.layers.\1.\2"),
    # shared decoder heads: every per-layer alias maps to the one head
    (r"(?:transformer\.decoder\.)?bbox_embed\.\d+\.layers\.(\d+)\.(weight|bias)", r"model.decoder.bbox_embed.layers.\1.\2"),
    (r"(?:transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)", r"class_embed.\1"),
    # query selection and queries
    (r"transformer\.tgt_embed\.weight", r"model.content_query_embed.weight"),
    (r"transformer\.enc_output\.(weight|bias)", r"model.enc_output.\1"),
    (r"transformer\.enc_output_norm\.(weight|bias)", r"model.enc_output_norm.\1"),
    (r"transformer\.enc_out_bbox_embed\.layers\.(\d+)\.(weight|bias)", r"model.enc_out_bbox_embed.layers.\1.\2"),
    (r"transformer\.enc_out_class_embed\.(weight|bias)", r"model.enc_out_class_embed.\1"),
    (r"label_enc\.weight", r"model.denoising_class_embed.weight"),
    # input projections (1x1 conv + GroupNorm per backbone level, 3x3 stride-2 conv + GroupNorm per extra level)
    (r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"model.input_projections.\1.\2.\3"),
    # backbones: ResNet under `backbone.0.body.`, Swin directly under `backbone.0.`
    (r"backbone\.0\.body\.(.+)", r"model.backbone.body.\1"),
    (r"backbone\.0\.(.+\.relative_position_index)", None),  # recomputed by the model; checked equal
    (r"backbone\.0\.((?:patch_embed|layers|norm\d).+)", r"model.backbone.body.\1"),
]


class ConversionError(RuntimeError):
    pass


def rename_key(key: str) -> str | None:
    """The hf_dino name of an original key, `None` for keys dropped on purpose; raises KeyError if unmapped."""
    for pattern, template in RENAME_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return None if template is None else match.expand(template)
    raise KeyError(key)


def convert_state_dict(original: dict[str, torch.Tensor], model: DinoForObjectDetection) -> dict[str, torch.Tensor]:
    """Map an original state dict onto `model`'s names; raise `ConversionError` listing every problem."""
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unmapped, conflicts = [], []
    for key, tensor in original.items():
        try:
            new_key = rename_key(key)
        except KeyError:
            unmapped.append(key)
            continue
        if new_key is None:
            continue
        if new_key in converted:
            if not torch.equal(converted[new_key], tensor):
                conflicts.append(f"{key} != {sources[new_key]} (both map to {new_key})")
            continue
        converted[new_key] = tensor
        sources[new_key] = key

    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shape_errors = [
        f"{k}: checkpoint {tuple(converted[k].shape)} ({sources[k]}) vs model {tuple(expected[k].shape)}"
        for k in sorted(set(converted) & set(expected))
        if converted[k].shape != expected[k].shape
    ]
    index_errors = []
    buffers = dict(model.named_buffers())
    for key, tensor in original.items():
        if key.endswith("relative_position_index"):
            own = buffers.get(key.replace("backbone.0.", "model.backbone.body.", 1))
            if own is None:  # a Swin checkpoint for a ResNet model: reported with its unmapped keys
                continue
            if not torch.equal(own.to(tensor.dtype), tensor):
                index_errors.append(key)
    problems = []
    for title, items in [
        ("original keys no rename rule maps", unmapped),
        ("aliases of a shared head with different values", conflicts),
        ("model weights the checkpoint does not provide", missing),
        ("renamed keys the model does not have", unexpected),
        ("shape mismatches", shape_errors),
        ("relative_position_index buffers that differ from the recomputed ones", index_errors),
    ]:
        if items:
            problems.append(f"{len(items)} {title}:\n  " + _listing(items))
    if problems:
        raise ConversionError("Cannot convert the checkpoint:\n" + "\n".join(problems))
    return {k: converted[k] for k in expected}


# What the original `main.py` pickles next to the weights besides tensors and plain containers: its command-line
# arguments. Only these classes are admitted by the `weights_only=True` unpickler; anything else needs
# `--trust-checkpoint` (plain `torch.load`, which can run code from the file).
RELEASE_CHECKPOINT_GLOBALS = [argparse.Namespace]
WEIGHT_ENTRIES = ("model", "ema_model")
_LIST_LIMIT = 20


def _listing(items: list[str]) -> str:
    shown = items[:_LIST_LIMIT]
    more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return "\n  ".join(shown) + more


def load_original_state_dict(
    path: str | Path, weights: str = "model", trust_checkpoint: bool = False
) -> dict[str, torch.Tensor]:
    """The original state dict stored in an original DINO checkpoint file.

    Reads the release layout the original `main.py` writes, `{"model", "optimizer", "lr_scheduler", "epoch", "args"}`
    (`args` an `argparse.Namespace`, allow-listed for the `weights_only=True` unpickler; optimizer and scheduler are
    ignored), and the bare `{"model": state_dict}` layout. `weights="ema_model"` takes the EMA copy that runs with
    `use_ema=True` also save. A `module.` prefix on every key (the weights of a `DistributedDataParallel`-wrapped
    model) is removed. Missing, empty, truncated or non-checkpoint files raise a one-line `ConversionError`
    naming the file; a file that pickles other objects is refused unless `trust_checkpoint=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty.")
    try:
        if trust_checkpoint:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(RELEASE_CHECKPOINT_GLOBALS):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(error))
        if not unsafe:
            raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({str(error).splitlines()[0]}).") from None
        raise ConversionError(
            f"{path}: the file stores objects other than tensors and the original's arguments ({', '.join(unsafe)}), "
            "which loading with weights_only=True refuses; if the file comes from a source you trust, pass "
            "--trust-checkpoint (this unpickles it with weights_only=False, which can run code from the file)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = str(error).split(". ")[0].splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt? ({reason})") from None
    if not isinstance(checkpoint, dict) or not any(key in checkpoint for key in WEIGHT_ENTRIES):
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else [type(checkpoint).__name__]
        raise ConversionError(
            f"{path}: expected an original DINO checkpoint, a dict with a 'model' state dict; found {_preview(found)}."
        )
    if weights not in checkpoint:
        raise ConversionError(f"{path}: has no {weights!r} entry (it has {_preview(sorted(map(str, checkpoint)))}).")
    state_dict = checkpoint[weights]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path}: checkpoint[{weights!r}] is not a state dict of tensors.")
    return strip_distributed_prefix(state_dict)


DISTRIBUTED_PREFIX = "module."


def strip_distributed_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the `module.` prefix that `DistributedDataParallel` puts before every key.

    The original `main.py` saves the unwrapped model, so the released files have no prefix; a fine-tuning script that
    saves `model.state_dict()` of the wrapped model has it on every key. Only a prefix shared by all keys is removed.
    """
    if state_dict and all(key.startswith(DISTRIBUTED_PREFIX) for key in state_dict):
        return {key[len(DISTRIBUTED_PREFIX):]: tensor for key, tensor in state_dict.items()}
    return state_dict


def _preview(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                if g != "argparse.Namespace"]
    except Exception:  # an old torch, or a file that is not a zip archive
        return []


def looks_like_dino(original: dict[str, torch.Tensor]) -> bool:
    """Whether a state dict has the original DINO's transformer and heads (not some other network's weights)."""
    return any(k.startswith("transformer.") for k in original) and any("class_embed" in k for k in original)


def convert(
    checkpoint: str | Path,
    model_name: str,
    output_dir: str | Path | None = None,
    weights: str = "model",
    trust_checkpoint: bool = False,
) -> DinoForObjectDetection:
    """Build the model for `model_name`, load the converted weights strictly, optionally save it with its processor.

    The checkpoint file is read and checked before any model is built, so a wrong file fails in a second.
    """
    if model_name not in MODEL_CONFIGS:
        raise ConversionError(f"Unknown --model-name {model_name!r}; choose one of {sorted(MODEL_CONFIGS)}.")
    original = load_original_state_dict(checkpoint, weights=weights, trust_checkpoint=trust_checkpoint)
    if not looks_like_dino(original):
        raise ConversionError(
            f"{checkpoint}: not an original DINO checkpoint: none of its {len(original)} keys is a DINO transformer "
            f"or class-head weight (first keys: {_preview(list(original), 5)})."
        )
    config = DinoConfig(**MODEL_CONFIGS[model_name])
    model = DinoForObjectDetection(config).eval()
    state_dict = convert_state_dict(original, model)
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir)
        DinoImageProcessor().save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original checkpoint (.pth with a 'model' state dict)")
    parser.add_argument("--model-name", required=True, choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--output-dir", required=True, help="where to write the save_pretrained folder")
    parser.add_argument("--weights", choices=WEIGHT_ENTRIES, default="model",
                        help="which weights of the checkpoint to convert: 'model' (default; what the released files "
                             "hold) or 'ema_model' (the EMA copy, present only in runs trained with use_ema=True)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that pickles objects other than tensors and argparse.Namespace with "
                             "weights_only=False; only for files from a source you trust (it can run code)")
    # --verify / --write-expected / --push-to-hub: conversion/verify.py, hf_dino/hub.py (format documented there)
    parser.add_argument("--verify", metavar="EXPECTED", default=None,
                        help="compare the converted model's outputs with an expected-output file (hf_dino-verify-v1 "
                             "safetensors from --write-expected, or a parity fixture folder); exit 2 on mismatch")
    parser.add_argument("--verify-atol", type=float, default=None, help="max absolute difference allowed (1e-4)")
    parser.add_argument("--write-expected", metavar="FILE", default=None,
                        help="store the converted model's outputs on a fixed input as an expected-output file")
    parser.add_argument("--expected-images", nargs="+", default=None,
                        help="images for --write-expected (default: a synthetic two-image batch)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload weights, config, processor config, modeling code and model card to REPO")
    parser.add_argument("--measured-metrics", metavar="JSON", default=None,
                        help="metrics from examples/evaluate.py --metrics-output, added to the model card")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = parser.parse_args(argv)
    if args.verify_atol is not None and not args.verify_atol >= 0:
        parser.error(f"--verify-atol must be >= 0, got {args.verify_atol}")
    expected = None
    if args.verify is not None:  # an expected-outputs file or fixture folder, read before anything is converted
        if not Path(args.verify).exists():
            parser.error(f"--verify: no file or folder {args.verify!r}")
        try:
            expected = verify_outputs.load_expected(args.verify)
        except Exception as error:  # noqa: BLE001 - missing file in a folder, not a safetensors file, wrong layout
            parser.error(f"--verify {args.verify!r}: {error}")
    for option, paths in (("--expected-images", args.expected_images or []),
                          ("--measured-metrics", [args.measured_metrics])):
        for path in paths:
            if path is not None and not Path(path).is_file():
                parser.error(f"{option}: no file {path!r}")
    if args.expected_images and not args.write_expected:
        parser.error("--expected-images are the input of --write-expected: give --write-expected FILE too")
    for path in args.expected_images or []:
        if (problem := check_image_file(path)) is not None:
            parser.error(f"--expected-images: cannot read {path!r} ({problem})")
    if args.write_expected is not None and output_file_problem(args.write_expected) is not None:
        parser.error(f"--write-expected {args.write_expected!r} cannot be written as a file (a folder, or under a "
                     "file)")
    metrics = None
    if args.measured_metrics:
        from hf_dino.model_card import check_metrics

        try:
            metrics = json.loads(Path(args.measured_metrics).read_text())
            check_metrics(metrics, "--measured-metrics")
        except ValueError as error:  # json.JSONDecodeError is a ValueError
            parser.error(f"--measured-metrics {args.measured_metrics!r}: {error}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir!r} is a file, not a folder")
    try:
        model = convert(args.checkpoint, args.model_name, args.output_dir, weights=args.weights,
                        trust_checkpoint=args.trust_checkpoint)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Converted {args.checkpoint} ({args.model_name}) -> {args.output_dir}")
    if args.write_expected:
        verify_outputs.write_expected(
            model, args.write_expected, images=args.expected_images,
            processor=DinoImageProcessor.from_pretrained(args.output_dir),
            metadata={"model_name": args.model_name, "checkpoint": Path(args.checkpoint).name},
        )
        print(f"Wrote expected outputs to {args.write_expected}")
    if args.verify:
        atol = verify_outputs.DEFAULT_ATOL if args.verify_atol is None else args.verify_atol
        report = verify_outputs.verify(model, expected, atol=atol)
        print(f"Verify against {args.verify}: {report}")
        if not report.ok:
            print("error: the converted model does not reproduce the expected outputs; nothing pushed", file=sys.stderr)
            return 2
    if args.push_to_hub:
        from hf_dino.hub import push_converted_checkpoint

        info = push_converted_checkpoint(
            model, DinoImageProcessor.from_pretrained(args.output_dir), args.push_to_hub,
            checkpoint_file=args.checkpoint, model_name=args.model_name, measured_metrics=metrics,
            private=args.private or None,
        )
        print(f"Pushed to https://huggingface.co/{args.push_to_hub} ({getattr(info, 'commit_url', info)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
