"""`hf_dino.training`: the resumable sampler, the original's optimizer parameter groups, EMA and atomic checkpoints
(the end-to-end runs of `examples/train.py` are in test_train.py)."""

from __future__ import annotations

import pytest
import torch

from hf_dino.configuration_dino import compact_config
from hf_dino.training import (
    CheckpointError,
    ModelEMA,
    ResumableBatchSampler,
    atomic_torch_save,
    find_latest_checkpoint,
    get_param_groups,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    shard_indices,
)


def test_resumable_sampler_continues_and_shards():
    full = ResumableBatchSampler(10, batch_size=2, seed=5)
    full.set_epoch(3)
    batches = list(full)
    assert len(batches) == 5 and sorted(i for b in batches for i, _ in b) == list(range(10))
    resumed = ResumableBatchSampler(10, batch_size=2, seed=5)
    resumed.set_epoch(3, start_batch=2)
    assert list(resumed) == batches[2:] and len(resumed) == 3
    full.set_epoch(4)
    assert list(full) != batches  # a new permutation each epoch
    ranks = [ResumableBatchSampler(10, batch_size=2, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for r in ranks:
        r.set_epoch(3)
    seen = [i for r in ranks for b in r for i, _ in b]
    assert len(seen) == 8 and len(set(seen)) == 8  # 2 batches per rank, disjoint
    assert ResumableBatchSampler(10, batch_size=2, multiple_of=3).num_batches == 3
    assert ResumableBatchSampler(3, batch_size=4).num_batches == 1  # a data set smaller than a batch wraps around
    assert len(next(iter(ResumableBatchSampler(3, batch_size=4)))) == 4
    assert shard_indices(5, 2, 1) == [1, 3]


def test_param_groups_match_the_original_recipe():
    from hf_dino import DinoForObjectDetection

    model = DinoForObjectDetection(compact_config(id2label={0: "a"}))
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # the original's `get_param_dict` (option "default"): the backbone at lr_backbone, everything else at lr
    groups = {g["name"]: g for g in get_param_groups(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4)}
    assert groups.keys() == {"default", "backbone"}
    assert sorted(names[id(p)] for p in groups["backbone"]["params"]) == sorted(n for n in trainable if "backbone" in n)
    assert sorted(names[id(p)] for p in groups["default"]["params"]) == sorted(n for n in trainable if "backbone" not in n)
    assert groups["backbone"]["lr"] == 1e-5 and groups["default"]["lr"] == 1e-4
    # Deformable DETR's recipe (the original's "ddetr_in_mmdet"): the sampling offsets at lr * multiplier
    groups = {g["name"]: g for g in get_param_groups(model, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4,
                                                     linear_proj_lr_multiplier=0.1)}
    assert groups["backbone"]["lr"] == 1e-5 and groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert groups["default"]["lr"] == 1e-4 and all(g["weight_decay"] == 1e-4 for g in groups.values())
    assert all("backbone." in names[id(p)] for p in groups["backbone"]["params"])
    proj = [names[id(p)] for p in groups["linear_proj"]["params"]]
    assert proj and all("sampling_offsets" in n or "reference_points" in n for n in proj)
    assert sum(len(g["params"]) for g in groups.values()) == sum(1 for p in model.parameters() if p.requires_grad)
    frozen = {g["name"] for g in get_param_groups(model, lr_backbone=0)}
    assert "backbone" not in frozen


def test_ema_update():
    model = torch.nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        before = model.weight.clone()
        model.weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, before + 1.0)
    restored = ModelEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.module.weight, ema.module.weight)
    assert restored.num_updates == 1 and restored.decay == 0.5


def test_atomic_checkpoints(tmp_path):
    torch.manual_seed(0)
    # the keys load_checkpoint requires of a training state of examples/train.py
    required = {"model": {}, "optimizer": {}, "scheduler": {}, "start_batch": 0, "global_step": 3}
    save_checkpoint(tmp_path, 3, {**required, "epoch": 1, "value": torch.arange(3)})
    expected_next = torch.rand(2)  # the RNG stream right after the checkpoint
    save_checkpoint(tmp_path, 7, {"epoch": 2})
    (tmp_path / ".tmp-checkpoint-9").mkdir()  # a crash while writing: ignored
    (tmp_path / "checkpoint-8").mkdir()  # incomplete: ignored
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-7"]
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-7"
    torch.manual_seed(99)
    state = load_checkpoint(tmp_path / "checkpoint-3")
    assert state["epoch"] == 1 and torch.equal(state["value"], torch.arange(3))
    assert torch.equal(torch.rand(2), expected_next)
    save_checkpoint(tmp_path, 10, {"epoch": 3}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-7", "checkpoint-10"]
    assert not list(tmp_path.glob(".*.tmp-*"))
    atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt") == {"a": 1}
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-8")
