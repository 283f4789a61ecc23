"""examples/train.py never loses or mixes a run: a second run in an output folder holding one is refused,
`--resume auto` skips a corrupt newest checkpoint, Ctrl-C saves a checkpoint the run resumes from exactly, the
training state is plain data read with `weights_only=True`, and unreadable images stop the run before training."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_dino.training import (
    CheckpointError,
    capture_rng_state,
    drop_unreadable_images,
    find_unreadable_images,
    load_checkpoint,
    restore_rng_state,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"

# the demo on 8 synthetic images: 2 epochs of 4 steps
COMMON = ["--epochs", "2", "--batch-size", "2", "--num-workers", "0", "--logging-steps", "1", "--report-to", "none",
          "--ema", "--log-batches"]


def _env() -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _cmd(*args) -> list[str]:
    return [sys.executable, str(TRAIN), *map(str, args)]


def _run(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"weights of {b} differ from the uninterrupted run {a}"


def _steps(folder: Path) -> dict[int, list[int]]:
    by_step = {}
    for line in (folder / "batch_log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_step[entry["step"]] = entry["image_ids"]
    return by_step


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    from hf_dino.data import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_coco(root, num_train=8, num_val=5)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_dir):
    """One uninterrupted run, checkpoints after steps 3, 4, 6, 8."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = _run("--output-dir", out, "--synthetic-dir", synthetic_dir, "--save-steps", "3", "--save-total-limit", "5",
                "--no-progress", *COMMON)
    return out, proc


def test_second_run_in_the_same_output_dir_is_refused(reference, tmp_path, synthetic_dir):
    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    refused = _run("--output-dir", out, "--synthetic-dir", synthetic_dir, *COMMON, check=False)
    assert refused.returncode != 0
    assert "already holds a training run (checkpoints, final, best, metrics.json" in refused.stderr
    assert "--resume" in refused.stderr and "--overwrite-output-dir" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    _assert_same_weights(ref / "final", out / "final")

    # explicit overwrite: the old run's outputs are gone, the new run's checkpoints are its own
    _run("--output-dir", out, "--synthetic-dir", synthetic_dir, "--overwrite-output-dir", "--max-steps", "1",
         "--no-eval", "--no-progress", *COMMON)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
    assert sorted(_steps(out)) == [1]
    assert not (out / "best").exists()


def test_resume_auto_falls_back_from_a_corrupt_checkpoint(reference, tmp_path, synthetic_dir):
    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "checkpoint-8" / "training_state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a half-written copy
    proc = _run("--output-dir", out, "--synthetic-dir", synthetic_dir, "--resume", "auto", "--no-progress", *COMMON)
    assert f"Skipping checkpoint checkpoint-8: {newest} cannot be read, it is truncated or corrupt" in proc.stderr
    assert "Falling back to the previous checkpoint (checkpoint-6)" in proc.stderr
    assert "resumed from" in proc.stdout and "epoch 1, batch 2, step 6" in proc.stdout
    _assert_same_weights(ref / "final", out / "final")

    # an explicit --resume of a corrupt folder names the file, without a traceback
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # the resumed run rewrote checkpoint-8
    proc = _run("--output-dir", out, "--synthetic-dir", synthetic_dir, "--resume", newest.parent, *COMMON, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"cannot resume: {newest} cannot be read, it is truncated or corrupt" in proc.stderr


def test_resume_with_other_settings_is_refused(reference, tmp_path, synthetic_dir):
    """A checkpoint's position and schedule rest on the batch size, the data set and the learning rates: resuming
    with another --batch-size failed mid-epoch with a sampler traceback or silently skipped images, and another --lr /
    --lr-drop was silently replaced by the restored optimizer and scheduler state. Now the run stops before training
    and names every difference; the same settings resume as before (the other tests of this file)."""
    ref, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", out / "checkpoints")
    proc = _run("--output-dir", out, "--synthetic-dir", synthetic_dir, "--resume", out / "checkpoints" / "checkpoint-6",
                "--no-progress", *COMMON, "--batch-size", "4", "--lr", "1e-3", "--max-train-samples", "6", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "cannot resume from" in proc.stderr and "checkpoint-6" in proc.stderr
    for difference in ("--batch-size: 2 in the checkpoint, 4 now", "--lr: 0.0004 in the checkpoint, 0.001 now",
                       "--max-train-samples: None in the checkpoint, 6 now", "train images: 8 in the checkpoint, 6 now"):
        assert difference in proc.stderr
    assert "resumed from" not in proc.stdout and sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (ref / "checkpoints").iterdir())


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly(reference, tmp_path, synthetic_dir):
    """Default --save-steps 0: SIGINT after a few steps of the first epoch still leaves a checkpoint at that step.
    (The interrupted part runs with the progress bar, whose loss display used to warn about requires_grad.)"""
    ref, _ = reference
    out = tmp_path / "run"
    args = ["--output-dir", out, "--synthetic-dir", synthetic_dir, *COMMON]
    proc = subprocess.Popen(_cmd(*args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "Converting a tensor with requires_grad=True to a scalar" not in stderr
    assert "SIGINT received: saving a checkpoint after the current step" in stderr
    checkpoints = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(checkpoints) == 1
    step = int(checkpoints[0].split("-")[1])
    assert 2 <= step < 8
    assert f"stopped by SIGINT after step {step}: saved {out / 'checkpoints' / checkpoints[0]}" in stdout
    assert "continue the run with --resume" in stdout
    assert not (out / "final").exists()

    _run(*args, "--resume", "--no-progress")
    assert _steps(out) == _steps(ref)  # no batch lost or repeated
    _assert_same_weights(ref / "final", out / "final")


def test_training_state_is_plain_data_read_with_weights_only(reference, tmp_path):
    ref, _ = reference
    checkpoint = ref / "checkpoints" / "checkpoint-8"
    for file in checkpoint.glob("*.pt"):
        torch.load(file, map_location="cpu", weights_only=True)  # raises on anything but plain data

    # a shared checkpoint folder with a pickled object is refused, not unpickled
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint, evil)
    state = torch.load(evil / "training_state.pt", weights_only=True)
    state["history"] = [Payload()]
    torch.save(state, evil / "training_state.pt")
    with pytest.raises(CheckpointError, match="holds objects other than tensors and plain Python values"):
        load_checkpoint(evil, restore_rng=False)


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's legacy state
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def _coco_folder(root: Path, names: list[str]) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    for i, name in enumerate(names, start=1):
        Image.new("RGB", (64, 48), (10 * i, 90, 160)).save(images / name)
        coco["images"].append({"id": i, "file_name": name, "width": 64, "height": 48})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "bbox": [8, 8, 20, 16], "area": 320,
                                    "iscrowd": 0})
    annotations = root / "instances.json"
    annotations.write_text(json.dumps(coco))
    return images, annotations


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def test_truncated_images_are_found_before_training(tmp_path):
    from hf_dino.data import CocoDetectionDataset

    images, annotations = _coco_folder(tmp_path, ["a.jpg", "b.png", "c.jpg", "d.png", "e.bmp"])
    for name in ("b.png", "c.jpg", "e.bmp"):
        _truncate(images / name)
    dataset = CocoDetectionDataset(images, annotations)
    with pytest.raises(ValueError) as error:
        drop_unreadable_images(dataset, "training", skip=False)
    message = str(error.value)
    assert message.startswith("3 of the 5 training images cannot be read")
    assert f"{images / 'b.png'}: truncated PNG" in message and f"{images / 'c.jpg'}: truncated JPEG" in message
    assert str(images / "e.bmp") in message and "--skip-bad-images" in message
    with pytest.warns(RuntimeWarning, match="Leaving out 3 unreadable training images"):
        kept = drop_unreadable_images(dataset, "training", skip=True)
    assert len(kept) == 2 and [kept.image_id(i) for i in range(2)] == [1, 4]
    image, target = kept[(1, 123)]  # (index, seed) as the sampler yields it
    assert target["image_id"] == 4 and image.shape[-2:] == (48, 64)

    # the training script stops before building the model, naming the files
    proc = _run("--train-images", images, "--train-annotations", annotations, "--output-dir", tmp_path / "run",
                "--config", "compact", "--no-progress", "--report-to", "none", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "train.py: data error: 3 of the 5 training images cannot be read" in proc.stderr


def test_images_with_data_after_their_end_marker_are_readable(tmp_path):
    """Data after a JPEG's / PNG's end marker (camera padding, a phone's motion-photo video) does not make an image
    unreadable: PIL decodes it, so the check decodes such a file instead of calling it truncated."""
    from hf_dino.data import CocoDetectionDataset
    from hf_dino.training import _check_image_bytes

    images, annotations = _coco_folder(tmp_path, ["a.jpg", "b.png"])
    for name in ("a.jpg", "b.png"):
        path = images / name
        path.write_bytes(path.read_bytes() + b"\0" * 64)
        with Image.open(path) as image:
            image.load()  # PIL reads it
        assert _check_image_bytes(path.read_bytes()) is None
    dataset = CocoDetectionDataset(images, annotations)
    assert find_unreadable_images(dataset) == []
    assert len(drop_unreadable_images(dataset, "training", skip=False)) == 2


def test_truncated_images_of_a_datasets_dataset_are_found_from_their_bytes(tmp_path):
    import datasets

    from hf_dino.data import HFDetectionDataset

    good, broken = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good, "JPEG")
    Image.new("RGB", (40, 30), (30, 200, 30)).save(broken, "PNG")
    features = datasets.Features({
        "image": datasets.Image(),
        "objects": {"bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                    "category": datasets.Sequence(datasets.ClassLabel(names=["thing"]))},
    })
    rows = [{"image": {"bytes": data, "path": None}, "objects": {"bbox": [[2, 3, 10, 12]], "category": [0]}}
            for data in (good.getvalue(), broken.getvalue()[: len(broken.getvalue()) * 2 // 3], good.getvalue())]
    dataset = HFDetectionDataset(datasets.Dataset.from_list(rows, features=features))
    with pytest.raises(ValueError, match=r"1 of the 3 training images cannot be read \(row 1: truncated PNG"):
        drop_unreadable_images(dataset, "training", skip=False)
