"""Library side of ``examples/train.py``: optimizer parameter groups, EMA, a resumable/shardable batch sampler, RNG
capture, atomic checkpoints and resume state. (Evaluation: :func:`hf_dino.evaluation.evaluate_coco`; the annotated
prediction image: :func:`hf_dino.visualization.draw_predictions`; the compact preset:
:func:`hf_dino.configuration_dino.compact_config`.)

The training loop itself stays in ``examples/train.py`` (argument parsing + the ``accelerate`` loop).

Determinism and exact resumption:

* :class:`ResumableBatchSampler` orders each epoch with its own seeded permutation, shards batches across
  processes, and hands each sample a seed derived from ``(seed, epoch, position)``; the data sets seed the
  augmentation of that sample with it. Starting an epoch at batch ``k`` (``set_epoch(epoch, start_batch=k)``)
  therefore yields exactly the batches ``k, k+1, ...`` that an uninterrupted run would have seen.
* :func:`save_checkpoint` writes model, optimizer, scheduler, grad scaler, EMA, every process's RNG state and the
  data position (epoch, batches consumed) into ``checkpoint-<step>/``, written under a temporary name and renamed
  into place, so a crash never leaves a partial checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "get_param_groups",
    "prepare_scratch_backbone",
    "ModelEMA",
    "ResumableBatchSampler",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest_checkpoint",
    "CheckpointError",
    "find_latest_checkpoint",
    "prepare_output_dir",
    "GracefulInterrupt",
    "check_image_file",
    "find_unreadable_images",
    "drop_unreadable_images",
    "atomic_torch_save",
    "shard_indices",
    "write_json",
]

# parameters trained at `lr * linear_proj_lr_multiplier`: the deformable attention sampling-offset projections and
# the reference-point projections (the original `lr_linear_proj_names`)
LINEAR_PROJ_NAMES: tuple[str, ...] = ("sampling_offsets", "reference_points")
BACKBONE_NAMES: tuple[str, ...] = ("backbone.",)


def prepare_scratch_backbone(model: nn.Module) -> int:
    """Make every parameter of a randomly initialised backbone trainable (the compact demo preset).

    DINO trains neither the ResNet stem nor layer1, which is right for ImageNet weights but leaves a random
    stem untrained from scratch. (The frozen batch norms start as the identity; see `DinoBackbone`.) Returns the
    number of parameters unfrozen. Do not use it on pretrained weights.
    """
    backbone = getattr(getattr(model, "model", model), "backbone", None)
    if backbone is None:
        raise ValueError("model has no backbone at .model.backbone")
    frozen = [p for p in backbone.parameters() if not p.requires_grad]
    for param in frozen:
        param.requires_grad_(True)
    return len(frozen)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------------


def _matches(name: str, keywords: Iterable[str]) -> bool:
    return any(k in name for k in keywords)


def get_param_groups(
    model: nn.Module,
    lr: float = 1e-4,
    lr_backbone: float = 1e-5,
    weight_decay: float = 1e-4,
    linear_proj_lr_multiplier: float = 1.0,
    backbone_names: Sequence[str] = BACKBONE_NAMES,
    linear_proj_names: Sequence[str] = LINEAR_PROJ_NAMES,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the original DINO (``get_param_dict``, option ``default``, the one of its
    configs and released runs):

    * everything else at ``lr``;
    * backbone parameters (name contains ``"backbone."``) at ``lr_backbone`` (``<= 0`` freezes them).

    A ``linear_proj_lr_multiplier`` other than 1 adds a third group, the sampling-offset and reference-point
    projections at ``lr * linear_proj_lr_multiplier``: the original's ``ddetr_in_mmdet`` option (with its configs'
    ``lr_linear_proj_mult = 0.1``), Deformable DETR's recipe.

    All groups use ``weight_decay``. Parameters with ``requires_grad=False`` are left out. Each group carries a
    ``"name"`` key (``"default"``, ``"backbone"``, ``"linear_proj"``); empty groups are dropped.
    """
    groups: dict[str, list[nn.Parameter]] = {"default": [], "backbone": [], "linear_proj": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if _matches(name, backbone_names):
            if lr_backbone <= 0:
                param.requires_grad_(False)
                continue
            groups["backbone"].append(param)
        elif linear_proj_lr_multiplier != 1 and _matches(name, linear_proj_names):
            groups["linear_proj"].append(param)
        else:
            groups["default"].append(param)
    lrs = {"default": lr, "backbone": lr_backbone, "linear_proj": lr * linear_proj_lr_multiplier}
    return [
        {"params": params, "lr": lrs[group], "weight_decay": weight_decay, "name": group}
        for group, params in groups.items()
        if params
    ]


# ----------------------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------------------


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers: the original's ``ModelEma``, plus a warm-up.

    With ``warmup=True`` (the default) the decay is ``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so
    far, so short runs are not dominated by the initial weights (timm's and TensorFlow's rule; at the default
    0.9997 it reaches ``decay`` after about 30000 updates). ``warmup=False`` is the original's constant decay.
    ``module`` is a frozen copy in eval mode; evaluate or save it directly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997, warmup: bool = True):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            ema_value = ema_state[name]
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.detach().to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])


# ----------------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------------


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Seeded, sharded batch sampler that can start an epoch at any batch.

    Each epoch uses the permutation of ``torch.Generator().manual_seed(seed + epoch)`` (or the natural order when
    ``shuffle=False``). Global batch ``b`` covers positions ``[b * B * R, (b + 1) * B * R)`` of that order (wrapping
    around when the data set is smaller), ``B`` the per-process batch size and ``R`` the number of processes;
    process ``r`` takes the ``r``-th slice of ``B``. Every epoch has ``num_batches`` batches per process: the
    largest multiple of ``multiple_of`` (the gradient-accumulation steps) that fits, at least ``multiple_of``
    (``drop_last`` semantics, like the original).

    Yields lists of ``(index, sample_seed)``: the data sets of :mod:`hf_dino.data` seed the augmentation of that
    sample with ``sample_seed``.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        multiple_of: int = 1,
    ):
        if num_samples <= 0:
            raise ValueError("The data set is empty.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for {num_replicas} processes")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = shuffle
        global_batch = self.batch_size * self.num_replicas
        batches = max(1, self.num_samples // global_batch)
        multiple_of = max(1, int(multiple_of))
        self.num_batches = max(multiple_of, batches // multiple_of * multiple_of)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.num_batches:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.num_batches}")
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def order(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return list(range(self.num_samples))

    def sample_seed(self, epoch: int, position: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7_919 + position * 104_729 + 12_345) % (2**62)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        global_batch = self.batch_size * self.num_replicas
        for b in range(self.start_batch, self.num_batches):
            first = b * global_batch + self.rank * self.batch_size
            positions = range(first, first + self.batch_size)
            yield [(order[p % self.num_samples], self.sample_seed(self.epoch, p)) for p in positions]

    def __len__(self) -> int:
        return self.num_batches - self.start_batch


def shard_indices(num_samples: int, num_replicas: int, rank: int) -> list[int]:
    """Evaluation shard of one process: ``rank, rank + R, ...`` (no padding, no duplicates)."""
    return list(range(rank, num_samples, num_replicas))


# ----------------------------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA when initialised) RNG states, as tensors and plain Python values only, so
    that ``torch.load(..., weights_only=True)`` reads them back."""
    version, mt_state, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    state = {
        "python": {"version": int(version), "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(numpy_state["bit_generator"]),
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = "training_state.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | os.PathLike,
    global_step: int,
    state: Mapping[str, Any],
    accelerator=None,
    keep_last: int | None = None,
) -> Path:
    """Write ``state`` (model/optimizer/scheduler/scaler/EMA state dicts, data position, ...) and the RNG state of
    every process as ``directory/checkpoint-<global_step>/``, atomically.

    Every process must call it (it synchronises them); ``state`` only matters on the main process. The folder is
    written as ``.tmp-checkpoint-<step>`` and renamed when complete; older checkpoints beyond ``keep_last`` are
    deleted afterwards. Returns the final path.
    """
    directory = Path(directory)
    final = directory / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = directory / f".tmp-{CHECKPOINT_PREFIX}{global_step}"
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(accelerator)
    atomic_torch_save(capture_rng_state(), tmp / f"rng_state_{rank}.pt")
    _barrier(accelerator)
    if is_main:
        atomic_torch_save(dict(state), tmp / TRAINING_STATE)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
        if keep_last is not None and keep_last > 0:
            for old in list_checkpoints(directory)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``directory`` (``checkpoint-<step>`` holding a training state), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and (child / TRAINING_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from (incomplete, truncated, corrupt, or holding objects that
    ``torch.load(..., weights_only=True)`` refuses)."""


# keys every training state written by examples/train.py holds
_REQUIRED_STATE_KEYS = ("model", "optimizer", "scheduler", "epoch", "start_batch", "global_step")


def _read_state_file(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{file} holds objects other than tensors and plain Python values ({reason}). It was written by an older "
            "hf_dino or by other code; it is not loaded, because unpickling arbitrary objects can run code."
        ) from error
    except Exception as error:  # noqa: BLE001 - truncated zip, empty file, I/O error, ...: re-raised naming the file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{file} cannot be read, it is truncated or corrupt ({reason}).") from error


def load_checkpoint(path: str | os.PathLike, rank: int = 0, restore_rng: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder written by :func:`save_checkpoint` with ``torch.load(..., weights_only=True)``;
    restores this process's RNG state (the one it saved; a process with no saved state keeps its own) and returns
    the training state.

    Every file of the folder (the training state and the RNG state of every process) is read before anything is
    restored, so all processes agree on whether the checkpoint is usable. Raises :class:`CheckpointError` naming
    the file when the folder is incomplete or a file is truncated, corrupt or not plain data.
    """
    path = Path(path)
    state_file = path / TRAINING_STATE
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (it does not exist).")
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {TRAINING_STATE}).")
    state = _read_state_file(state_file)
    missing = [key for key in _REQUIRED_STATE_KEYS if not isinstance(state, Mapping) or key not in state]
    if missing:
        raise CheckpointError(f"{state_file} is not a training state of examples/train.py (missing {missing}).")
    rng_states = {file.name: _read_state_file(file) for file in sorted(path.glob("rng_state_*.pt"))}
    own = rng_states.get(f"rng_state_{rank}.pt")
    if restore_rng and own is not None:
        try:
            restore_rng_state(own)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path / f'rng_state_{rank}.pt'} is not an RNG state of this version: {error}") from error
    return state


def load_latest_checkpoint(directory: str | os.PathLike, rank: int = 0) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under ``directory`` that reads back intact, and its training state (RNG restored as
    :func:`load_checkpoint` does); ``None`` when there is no checkpoint at all.

    A newer checkpoint that is truncated or corrupt is skipped with a warning naming the file; when none is
    readable a :class:`CheckpointError` lists them.
    """
    checkpoints = list_checkpoints(directory)
    errors = []
    for path in reversed(checkpoints):
        try:
            state = load_checkpoint(path, rank=rank)
        except CheckpointError as error:
            errors.append(str(error))
            older = len(checkpoints) - len(errors)
            warnings.warn(
                f"Skipping checkpoint {path.name}: {error} "
                + (f"Falling back to the previous checkpoint ({checkpoints[older - 1].name})." if older else ""),
                RuntimeWarning, stacklevel=2,
            )
            continue
        return path, state
    if errors:
        raise CheckpointError(f"No intact checkpoint in {directory}: " + " ".join(errors))
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Run safety: output folder, interruption, unreadable images
# ----------------------------------------------------------------------------------------------------------------------

# what examples/train.py writes into --output-dir (the demo's synthetic-data folder is input, not a run)
RUN_OUTPUTS: tuple[str, ...] = ("checkpoints", "final", "best", "metrics.json", "train_log.jsonl", "batch_log.jsonl",
                                "runs", "prediction.png")


def previous_run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """The outputs of an earlier training run present in ``output_dir`` (names from :data:`RUN_OUTPUTS`)."""
    output_dir = Path(output_dir)
    return [name for name in RUN_OUTPUTS if (output_dir / name).exists()]


def prepare_output_dir(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool, is_main: bool = True) -> None:
    """Never mix two runs in one folder: with outputs of an earlier run in ``output_dir``, continue it
    (``resume``), delete those outputs first (``overwrite``; main process only), or raise ``FileExistsError``."""
    found = previous_run_outputs(output_dir)
    if not found or resume:
        return
    if not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a training run ({', '.join(found)}). Pass --resume to continue it, "
            "--overwrite-output-dir to delete it and start a new run, or choose another --output-dir."
        )
    if is_main:
        logger.warning("--overwrite-output-dir: deleting the previous run's %s in %s", ", ".join(found), output_dir)
        for name in found:
            target = Path(output_dir) / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()


class GracefulInterrupt:
    """Turn SIGINT (Ctrl-C) and SIGTERM (``kill``, batch schedulers, preemption) into a request to stop at the next
    optimizer step, so the training loop can write a clean checkpoint first. A second signal stops at once
    (``KeyboardInterrupt``). Use as a context manager around the loop, or ``install()`` / ``uninstall()``;
    outside the main thread it does nothing.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "GracefulInterrupt":
        self.install()
        return self

    def __exit__(self, *exc) -> bool:
        self.uninstall()
        return False

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: stop now
            self.uninstall()
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("%s received: saving a checkpoint after the current step, then stopping "
                       "(send it again to stop at once, without saving).", signal.Signals(signum).name)

    def requested(self, accelerator=None) -> bool:
        """Whether any process received a signal. With several processes it is a collective: every process must
        call it at the same points of the loop."""
        flag = self.received is not None
        if accelerator is not None and accelerator.num_processes > 1:
            value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
            flag = bool(accelerator.reduce(value, reduction="sum").item() > 0)
        return flag

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.received or signal.SIGINT)


_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


def _check_image_ends(head: bytes, tail: bytes) -> str | None:
    """From a file's first 8 and last 16 bytes: ``None`` for a JPEG / PNG that ends with its end marker, else what
    a decoding error would mean ("truncated JPEG ...", or ``""`` for another format)."""
    if head[:3] == b"\xff\xd8\xff":
        return None if _JPEG_END in tail else "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if tail.endswith(_PNG_END) else "truncated PNG (no IEND chunk)"
    return ""


def _decode_error(image_file, suspicion: str) -> str | None:
    """Why PIL cannot decode the image (a path or a binary file object), after `suspicion` if any, or ``None``."""
    from PIL import Image

    try:
        with Image.open(image_file) as image:
            image.load()
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for unreadable images
        reason = str(error) or type(error).__name__
        return f"{suspicion}: {reason}" if suspicion else reason
    return None


def check_image_file(path: str | os.PathLike) -> str | None:
    """Why the image file at ``path`` cannot be used, or ``None``: a cheap structural check of every image, meant
    to run over a whole training set before training starts.

    A JPEG or PNG file (nearly every detection data set) that ends with its end marker (``FFD9``, ``IEND``) is
    taken as intact after reading a few bytes (measured: 0.2 ms per COCO image with a warm file cache, against
    25 ms to decode it); the check catches truncated files, the common damage of interrupted copies and downloads.
    Any other file is decoded fully, so data after the end marker (camera padding, a phone's motion-photo video)
    is accepted when the image itself decodes, and a truncated file is reported as such, with PIL's reason.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 16))
            tail = f.read()
    except OSError as error:
        return str(error) or type(error).__name__
    suspicion = _check_image_ends(head, tail)
    return None if suspicion is None else _decode_error(path, suspicion)


def _check_image_bytes(data: bytes) -> str | None:
    if not data:
        return "empty image"
    suspicion = _check_image_ends(data[:8], data[-16:])
    return None if suspicion is None else _decode_error(io.BytesIO(data), suspicion)


def find_unreadable_images(dataset, progress: bool = False) -> list[tuple[int, str, str]]:
    """``(index, image, reason)`` of every image of ``dataset`` that cannot be read.

    Image files (:class:`hf_dino.data.CocoDetectionDataset`) are checked with :func:`check_image_file`; the
    encoded images of a ``datasets`` data set (:class:`hf_dino.data.HFDetectionDataset`) the same way, from their
    bytes, without decoding; any other data set by loading every image.
    """
    indices: Iterable[int] = range(len(dataset))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc="checking images", leave=False, dynamic_ncols=True)
    encoded = None
    if hasattr(dataset, "image_column") and hasattr(dataset, "dataset") and hasattr(dataset.dataset, "cast_column"):
        import datasets

        encoded = dataset.dataset.cast_column(dataset.image_column, datasets.Image(decode=False))
    bad = []
    for index in indices:
        where = dataset.describe(index)
        if hasattr(dataset, "images_dir"):
            reason = check_image_file(where)
        elif encoded is not None:
            entry = encoded[dataset.indices[index]][dataset.image_column]
            if entry.get("bytes") is not None:
                reason = _check_image_bytes(entry["bytes"])
            else:
                reason = check_image_file(entry["path"])
        else:
            try:
                dataset.load_image(index).load()
                reason = None
            except (OSError, ValueError, SyntaxError, TypeError) as error:
                reason = str(error) or type(error).__name__
        if reason is not None:
            bad.append((index, where, reason))
    return bad


def drop_unreadable_images(dataset, name: str, skip: bool, progress: bool = False):
    """Check every image of ``dataset`` up front (:func:`find_unreadable_images`). With unreadable images: raise a
    ``ValueError`` listing them, or (``skip``) warn and return a ``torch.utils.data.Subset`` without them."""
    bad = find_unreadable_images(dataset, progress=progress)
    if not bad:
        return dataset
    listing = "; ".join(f"{where}: {reason}" for _, where, reason in bad[:5]) + (" ..." if len(bad) > 5 else "")
    if not skip:
        raise ValueError(
            f"{len(bad)} of the {len(dataset)} {name} images cannot be read ({listing}). Replace them, or pass "
            "--skip-bad-images to train without them."
        )
    warnings.warn(f"Leaving out {len(bad)} unreadable {name} images: {listing}", RuntimeWarning, stacklevel=2)
    bad_set = {index for index, _, _ in bad}
    return DetectionSubset(dataset, [i for i in range(len(dataset)) if i not in bad_set])


class DetectionSubset(torch.utils.data.Dataset):
    """The samples ``indices`` of a :class:`hf_dino.data.DetectionDataset`, indexable like it (an int, or
    ``(index, seed)``); every other attribute (``label_map``, ``coco_ground_truth``, ...) is the full data set's."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            return self.dataset[(self.indices[int(key[0])], key[1])]
        return self.dataset[self.indices[int(key)]]

    def load_image(self, index: int):
        return self.dataset.load_image(self.indices[index])

    def describe(self, index: int) -> str:
        return self.dataset.describe(self.indices[index])

    def image_id(self, index: int) -> int:
        return self.dataset.image_id(self.indices[index])

    def __getattr__(self, name: str):
        if name in ("dataset", "indices"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON written atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
