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
import json
import logging
import math
import os
import random
import re
import shutil
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
    "find_latest_checkpoint",
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
    linear_proj_lr_multiplier: float = 0.1,
    backbone_names: Sequence[str] = BACKBONE_NAMES,
    linear_proj_names: Sequence[str] = LINEAR_PROJ_NAMES,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the original DINO (``get_param_dict``, option ``default``):

    * everything else at ``lr``;
    * backbone parameters (name contains ``"backbone."``) at ``lr_backbone`` (``<= 0`` freezes them);
    * sampling-offset and reference-point projections at ``lr * linear_proj_lr_multiplier``.

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
        elif _matches(name, linear_proj_names):
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
    """Exponential moving average of a model's parameters and buffers (the original ``ModelEma``).

    ``decay`` is warmed up as ``min(decay, (1 + n) / (10 + n))`` over the ``n`` updates so far, so short runs are
    not dominated by the initial weights. ``module`` is a frozen copy in eval mode; evaluate or save it directly.
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
    """Python, numpy, torch CPU (and CUDA when available) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def load_checkpoint(path: str | os.PathLike, rank: int = 0, restore_rng: bool = True) -> dict[str, Any]:
    """Read a checkpoint folder written by :func:`save_checkpoint`; restores this process's RNG state (the one it
    saved; a process with no saved state keeps its own) and returns the training state."""
    path = Path(path)
    if not (path / TRAINING_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINING_STATE}).")
    state = torch.load(path / TRAINING_STATE, map_location="cpu", weights_only=False)
    rng_file = path / f"rng_state_{rank}.pt"
    if restore_rng and rng_file.is_file():
        restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state


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
