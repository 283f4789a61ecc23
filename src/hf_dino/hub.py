"""Share a DINO model on the Hugging Face Hub as a `trust_remote_code` repository.

What a pushed repo holds (one commit, exactly these files):

* ``config.json`` with ``auto_map`` {AutoConfig: configuration_dino.DinoConfig,
  AutoModelForObjectDetection: modeling_dino.DinoForObjectDetection};
* ``model.safetensors`` (``save_pretrained``; larger models may be sharded with an index file);
* ``preprocessor_config.json`` with ``auto_map`` {AutoImageProcessor: image_processing_dino.DinoImageProcessor};
* the ``.py`` files of those classes and everything they import relatively (configuration, modeling, backbones,
  deformable attention, denoising, loss, box ops, image processing, and this module with the model card, which
  ``DinoForObjectDetection.push_to_hub`` imports), so that
  ``AutoModelForObjectDetection.from_pretrained(repo, trust_remote_code=True)`` and
  ``pipeline("object-detection", model=repo, trust_remote_code=True)`` work where `hf_dino` is not installed;
* ``README.md``: the model card (`model_card.py`).

The upload goes through the public client API: ``HfApi.create_repo(exist_ok=True)`` then ``HfApi.create_commit``
with one ``CommitOperationAdd`` per file of the staged folder (see :func:`push_to_hub`).

Entry points: ``model.push_to_hub(repo_id, image_processor=..., metrics=...)`` of a `DinoForObjectDetection`
(:func:`push_finetuned_model`), :func:`save_for_hub` for the same content in a local folder, the
converter ``conversion/convert_original_checkpoint.py --push-to-hub REPO`` (:func:`push_converted_checkpoint`) and
``examples/train.py --push-to-hub REPO``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from .model_card import finetuned_model_card, released_model_card
from .released_checkpoints import ARCHITECTURES, ORIGINAL_REPO, find_checkpoint

MODEL_AUTO_CLASS = "AutoModelForObjectDetection"
CONFIG_AUTO_CLASS = "AutoConfig"
PROCESSOR_AUTO_CLASS = "AutoImageProcessor"


@contextlib.contextmanager
def _registered_for_auto_classes(model, processor) -> Iterator[None]:
    """``register_for_auto_class`` on the classes of ``model``, its config and ``processor`` for the duration of a
    ``save_pretrained`` (class attributes, restored afterwards, as is the config's ``auto_map``)."""
    targets = [(type(model), MODEL_AUTO_CLASS), (type(model.config), CONFIG_AUTO_CLASS)]
    if processor is not None:
        targets.append((type(processor), PROCESSOR_AUTO_CLASS))
    saved = [(cls, cls.__dict__.get("_auto_class", _MISSING)) for cls, _ in targets]
    saved_auto_map = getattr(model.config, "auto_map", None)
    try:
        for cls, auto_class in targets:
            cls.register_for_auto_class(auto_class)
        yield
    finally:
        for cls, value in saved:
            if value is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(cls, "_auto_class")
            else:
                cls._auto_class = value
        model.config.auto_map = saved_auto_map


_MISSING = object()


def save_for_hub(model, processor, folder: str | os.PathLike, model_card: str | None = None) -> list[str]:
    """Write the repo content into ``folder`` (see the module docstring); returns the relative paths, sorted.

    ``model`` is a `DinoForObjectDetection` (any `PreTrainedModel` whose modeling file is importable as a module);
    ``processor`` its image processor (or ``None``); ``model_card`` the README text (or ``None``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _registered_for_auto_classes(model, processor):
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
    if model_card is not None:
        (folder / "README.md").write_text(model_card, encoding="utf-8")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def push_to_hub(
    model,
    processor,
    repo_id: str,
    model_card: str | None,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api=None,
):
    """Stage the repo content in a temporary folder and upload it as ONE commit; returns the ``CommitInfo``.

    ``api``: a ``huggingface_hub.HfApi`` (default: a new one with ``token``). The repository is created if needed
    (``create_repo(exist_ok=True)``); files already in the repo that are not part of this push are left alone.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="hf_dino_push_") as staging:
        files = save_for_hub(model, processor, staging, model_card)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(Path(staging) / f)) for f in files]
        return api.create_commit(
            repo_id=repo_id,
            repo_type="model",
            operations=operations,
            commit_message=commit_message or f"Upload {type(model).__name__} (hf_dino)",
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def push_converted_checkpoint(
    model,
    processor,
    repo_id: str,
    checkpoint_file: str | os.PathLike | None = None,
    model_name: str | None = None,
    measured_metrics: Mapping[str, float] | None = None,
    **push_kwargs,
):
    """Push a converted original checkpoint with its generated card.

    The card comes from the `released_checkpoints.py` entry of ``checkpoint_file`` (looked up by base name). A file that is
    not in the table gets a card built from ``model_name`` without a reported AP.
    """
    entry = find_checkpoint(checkpoint_file) if checkpoint_file is not None else None
    name = Path(str(checkpoint_file)).name if checkpoint_file is not None else "an original-format checkpoint"
    if entry is not None:
        card = released_model_card(entry, repo_id=repo_id, measured_metrics=measured_metrics)
    else:
        if model_name not in ARCHITECTURES:
            raise ValueError(f"{checkpoint_file} is not a released DINO checkpoint; pass model_name for the card, one "
                             f"of {', '.join(sorted(ARCHITECTURES))} (got {model_name!r}).")
        arch = ARCHITECTURES[model_name]
        card = finetuned_model_card(
            repo_id,
            id2label=model.config.id2label,
            metrics=measured_metrics,
            architecture=f"DINO {arch['num_feature_levels']}-scale, {arch['backbone']}",
            summary=(
                f"A DINO object detector converted from `{name}`, a checkpoint in the format of the original "
                f"implementation ({ORIGINAL_REPO}) that is not one of the released checkpoints."
            ),
        )
    push_kwargs.setdefault("commit_message", f"Upload converted {name} (hf_dino)")
    return push_to_hub(model, processor, repo_id, card, **push_kwargs)


def push_finetuned_model(
    model,
    processor,
    repo_id: str,
    metrics: Mapping[str, float] | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    evaluated_on: str = "validation",
    training_args: Mapping[str, object] | None = None,
    **push_kwargs,
):
    """Push a fine-tuned model (your own loop, or `examples/train.py`): weights, config, ``processor``, the remote
    code and a card that carries ``metrics`` (fractions from `CocoEvaluator.summarize()`) and the model's
    ``config.id2label``. `DinoForObjectDetection.push_to_hub` calls this."""
    config = model.config
    architecture = f"DINO {config.num_feature_levels}-scale, {config.backbone} backbone"
    card = finetuned_model_card(
        repo_id,
        id2label=config.id2label,
        metrics=metrics,
        base_model=base_model,
        dataset_name=dataset_name,
        evaluated_on=evaluated_on,
        training_args=training_args,
        architecture=architecture,
    )
    push_kwargs.setdefault("commit_message", "Upload fine-tuned DINO (hf_dino examples/train.py)")
    return push_to_hub(model, processor, repo_id, card, **push_kwargs)


__all__ = ["push_converted_checkpoint", "push_finetuned_model", "push_to_hub", "save_for_hub"]
