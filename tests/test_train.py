"""examples/train.py: a tiny end-to-end run, kill-and-resume exactness, 2-process `accelerate launch` with
evaluation, bad data surfacing as clear messages; the COCO-MINI learning run is marked slow."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "train.py"
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"

# a few steps of the demo on a handful of synthetic images
TINY = ["--batch-size", "2", "--num-workers", "0", "--no-progress", "--logging-steps", "1"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
                "ACCELERATE_DISABLE_RICH": "1", "HF_HUB_OFFLINE": "1"})
    # this checkout's package first, whatever an installed copy points to
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _run(args, env=None, launcher=(sys.executable,), check=True, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*launcher, str(TRAIN), *args], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _run_until_checkpoint(args, checkpoint: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py and SIGKILL it the moment `checkpoint` is complete (checkpoints are renamed into place whole)."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not (checkpoint / "training_state.pt").is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                out, err = proc.communicate()
                raise AssertionError(f"train.py ended ({proc.returncode}) before {checkpoint.name}:\n{out[-3000:]}\n{err[-3000:]}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _load_train_module():
    spec = importlib.util.spec_from_file_location("hf_dino_train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    from hf_dino.data import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_synthetic_coco(root, num_train=8, num_val=5)  # the demo's data, smaller; generated once for the module
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_tiny_demo_run(tmp_path, synthetic_dir):
    out = tmp_path / "run"
    # `accelerate launch --cpu --num_processes 2` runs ONE process (accelerate needs an MPI hostfile for several CPU
    # processes); the 2-process run is test_accelerate_launch_two_processes
    proc = _run(["--output-dir", str(out), "--synthetic-dir", str(synthetic_dir), "--epochs", "1", "--ema", *TINY],
                launcher=(sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"))
    for name in ("final/model.safetensors", "final/config.json", "final/preprocessor_config.json",
                 "best/model.safetensors", "prediction.png", "metrics.json"):
        assert (out / name).is_file(), name
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 1 and {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(history[0])
    # the table printed after the epoch shows the metrics that were recorded
    lines = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    header = lines.index("| AP | AP50 | AP75 | APs | APm | APl |")
    printed = lines[header + 2].strip("| ").split(" | ")
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    assert printed == [f"{history[0][k] * 100:.1f}" if history[0][k] >= 0 else "-" for k in names]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-4"]
    assert list((out / "runs").rglob("events.out.tfevents*"))  # tensorboard tracker
    assert Image.open(out / "prediction.png").size == (384, 384)  # the 128-pixel image, enlarged 3x
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["id2label"]["0"] == "circle" and len(config["id2label"]) == 5
    processor = json.loads((out / "final" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 160, "longest_edge": 267}


def test_kill_and_resume_is_exact(tmp_path, synthetic_dir):
    """8 steps over 2 epochs (4 per epoch), checkpoints every 3 steps: a run killed (SIGKILL) as soon as checkpoint-6
    is complete (so during step 7 or 8) resumes from checkpoint-6 (mid-epoch 2) and ends with the same batches and bit-identical weights as an uninterrupted run."""
    common = ["--synthetic-dir", str(synthetic_dir), "--epochs", "2", "--save-steps", "3", "--save-total-limit", "5",
              "--log-batches", "--ema", "--report-to", "none", *TINY]
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    _run(["--output-dir", str(ref), *common])
    killed = _run_until_checkpoint(["--output-dir", str(crash), *common], crash / "checkpoints" / "checkpoint-6")
    assert killed.returncode != 0 and not (crash / "final").exists()
    assert sorted(p.name for p in (crash / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]
    resumed = _run(["--output-dir", str(crash), "--resume", *common])
    assert "resumed from" in resumed.stdout and "epoch 1, batch 2, step 6" in resumed.stdout

    def steps(folder):
        by_step = {}
        for line in (folder / "batch_log.jsonl").read_text().splitlines():
            entry = json.loads(line)
            by_step[entry["step"]] = entry["image_ids"]  # a step redone after the crash replaces the lost one
        return by_step

    reference = steps(ref)
    assert sorted(reference) == list(range(1, 9))
    assert steps(crash) == reference  # no batch lost or repeated
    a, b = _weights(ref / "final"), _weights(crash / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ref_history = json.loads((ref / "metrics.json").read_text())["history"]
    crash_history = json.loads((crash / "metrics.json").read_text())["history"]
    assert [h["AP"] for h in crash_history] == [h["AP"] for h in ref_history]


def test_evaluation_and_progress_bars_leave_the_training_unchanged(tmp_path, synthetic_dir):
    """The same 2 epochs with evaluation after each epoch and progress bars on, and with neither: bit-identical
    weights (evaluating must not draw from the random numbers the training uses)."""
    common = ["--synthetic-dir", str(synthetic_dir), "--epochs", "2", "--report-to", "none", *TINY]
    quiet, watched = tmp_path / "quiet", tmp_path / "watched"
    _run(["--output-dir", str(quiet), "--no-eval", *common])
    _run(["--output-dir", str(watched), *[a for a in common if a != "--no-progress"]])
    assert len(json.loads((watched / "metrics.json").read_text())["history"]) == 2  # it did evaluate twice
    a, b = _weights(quiet / "final"), _weights(watched / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "evaluation or the progress bars changed the trained weights"


def test_accelerate_launch_two_processes(tmp_path, synthetic_dir):
    out = tmp_path / "ddp"
    proc = _run(
        ["--output-dir", str(out), "--synthetic-dir", str(synthetic_dir), "--epochs", "1", "--eval-batch-size", "1",
         "--report-to", "none", "--cpu", *TINY],
        # two CPU processes through torchrun (`--multi_gpu` is accelerate's name for it; no GPU is needed)
        launcher=(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
    )
    assert "AP50" in proc.stdout and "processes: 2" in proc.stdout
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert history[-1]["step"] == 2  # 8 images, 2 per process and step

    # the evaluation gathered both processes' shards: the same numbers as one process on all 5 images
    from hf_dino import DinoForObjectDetection, DinoImageProcessor
    from hf_dino.data import CocoDetectionDataset, DetectionCollator, make_eval_transforms, scaled_recipe
    from hf_dino.evaluation import evaluate_coco

    model = DinoForObjectDetection.from_pretrained(out / "final")
    processor = DinoImageProcessor.from_pretrained(out / "final")
    val = CocoDetectionDataset(synthetic_dir / "val", synthetic_dir / "annotations" / "instances_val.json",
                               make_eval_transforms(**scaled_recipe(0.2)))
    loader = torch.utils.data.DataLoader(val, batch_size=1, collate_fn=DetectionCollator(processor))
    metrics = evaluate_coco(model, loader, val.coco_ground_truth(), val.label_map.label_to_category_id, processor)
    for key in ("AP", "AP50", "AP75"):
        assert metrics[key] == pytest.approx(history[-1][key], abs=1e-6)


def test_bad_data_gives_clear_messages(tmp_path):
    train = _load_train_module()
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images / "a.png")
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                   {"id": 2, "file_name": "missing.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 4, 10, 10], "category_id": 1, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    argv = ["--train-images", str(images), "--train-annotations", str(ann), "--config", "compact"]
    with pytest.raises(FileNotFoundError, match="--skip-missing-images"):
        train.build_data(train.parse_args(argv), None)
    train_set, _, label_map, _ = train.build_data(train.parse_args(argv + ["--skip-missing-images"]), None)
    assert len(train_set) == 1 and label_map.id2label == {0: "thing"}

    data["annotations"].append({"id": 2, "image_id": 1, "bbox": [1, 1, 2, 2], "category_id": 42, "iscrowd": 0})
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category id 42.*--ignore-unknown-categories"):
        train.build_data(train.parse_args(argv + ["--skip-missing-images"]), None)

    # degenerate / outside boxes and an image without annotations reach the loss as valid (or empty) targets
    Image.new("RGB", (32, 32)).save(images / "missing.png")
    data["annotations"][1:] = [
        {"id": 2, "image_id": 1, "bbox": [5, 5, 0, 3], "category_id": 1, "iscrowd": 0},
        {"id": 3, "image_id": 1, "bbox": [40, 40, 5, 5], "category_id": 1, "iscrowd": 0},
        {"id": 4, "image_id": 1, "bbox": [20, 20, 30, 30], "category_id": 1, "iscrowd": 0},
    ]
    ann.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="fixed up"):
        train_set, _, label_map, _ = train.build_data(train.parse_args(argv + ["--image-scale", "0.05"]), None)
    from hf_dino import DinoForObjectDetection
    from hf_dino.configuration_dino import compact_config
    from hf_dino.data import DetectionCollator

    batch = DetectionCollator()([train_set[(0, 1)], train_set[(1, 2)]])
    assert batch["labels"][1]["boxes"].shape == (0, 4)
    torch.manual_seed(0)
    model = DinoForObjectDetection(compact_config(id2label=label_map.id2label, num_queries=10, num_denoising=4,
                                                  encoder_layers=1, decoder_layers=1))
    outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()


@pytest.mark.slow
@pytest.mark.skipif(not COCO_MINI.is_dir(), reason=f"COCO-MINI not found at {COCO_MINI} (../shared/data/coco-mini)")
def test_coco_mini_learning(tmp_path):
    """The compact model overfits a handful of real COCO images: loss goes down, AP50 on them clearly non-trivial
    (benchmarks/bench_train_coco_mini.py, reduced)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train_coco_mini.py"), "--output-dir", str(tmp_path / "b"),
         "--json", str(tmp_path / "result.json")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["final_loss"] < 0.7 * result["first_loss"]
    assert result["AP50"] > 0.2


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    train = _load_train_module()
    features = datasets.Features({
        "image": datasets.Image(),
        "objects": {"bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                    "category": datasets.Sequence(datasets.ClassLabel(names=["mask", "glove"]))},
    })
    rows = [{"image": Image.new("RGB", (40, 30)), "objects": {"bbox": [[2, 3, 10, 12]], "category": [1]}}] * 3
    split = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "ds")
    args = train.parse_args(["--dataset-name", str(tmp_path / "ds"), "--val-split", "test", "--image-scale", "0.1"])
    train_set, val_set, label_map, _ = train.build_data(args, None)
    assert len(train_set) == 3 and len(val_set) == 3 and label_map.id2label == {0: "mask", 1: "glove"}
    assert train_set[(0, 0)][1]["class_labels"].tolist() == [1]
    assert len(val_set.coco_ground_truth().anns) == 3


def test_fine_tune_91_class_model_on_new_classes(tmp_path, synthetic_dir):
    """A COCO-style 91-class model fine-tuned on the 5 synthetic classes: class heads and label embedding are
    re-initialised with the new size, everything else is loaded; on COCO data the labels are kept as they are."""
    from hf_dino import DinoForObjectDetection
    from hf_dino.configuration_dino import compact_config

    train = _load_train_module()
    torch.manual_seed(0)
    coco_model = DinoForObjectDetection(compact_config(num_queries=10, num_denoising=4))  # COCO id2label, 91 labels
    assert coco_model.config.num_labels == 91
    coco_model.save_pretrained(tmp_path / "coco91")
    argv = ["--model-name-or-path", str(tmp_path / "coco91"), "--synthetic-dir", str(synthetic_dir)]
    args = train.parse_args(argv)
    config = train.initial_config(args)
    _, _, label_map, _ = train.build_data(args, config.id2label)
    assert label_map.mode == "contiguous" and label_map.num_labels == 5
    model = train.build_model(args, label_map, config)
    assert model.config.num_labels == 5 and model.config.id2label[0] == "circle"
    assert model.class_embed.weight.shape[0] == 5 and model.model.denoising_class_embed.weight.shape[0] == 6
    torch.testing.assert_close(model.class_embed.bias, torch.full((5,), -4.59512), atol=1e-4, rtol=0)
    old, new = coco_model.state_dict(), model.state_dict()
    same = [k for k in new if k in old and new[k].shape == old[k].shape and torch.equal(new[k], old[k])]
    assert len(same) >= len(new) - 6  # only the class heads / label embedding differ

    if COCO_MINI.is_dir():  # on COCO data the 91-class model is used as it is
        coco_args = train.parse_args(["--model-name-or-path", str(tmp_path / "coco91"),
                                      "--train-images", str(COCO_MINI / "train2017"),
                                      "--train-annotations", str(COCO_MINI / "annotations" / "instances_train2017.json")])
        _, _, coco_map, _ = train.build_data(coco_args, config.id2label)
        assert coco_map.mode == "category_id" and coco_map.num_labels == 91
        same_model = train.build_model(coco_args, coco_map, config)
        assert torch.equal(same_model.class_embed.weight, coco_model.class_embed.weight)

    # a COCO-id file with some of COCO's classes ("person" 1, "car" 3): the labels stay category ids and the model
    # keeps its 91 labels and its trained classifier rows (a head of max id + 1 = 4 new rows before)
    from PIL import Image

    (tmp_path / "subset").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "subset" / "a.png")
    (tmp_path / "subset.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 4, 20, 20], "category_id": 3, "iscrowd": 0, "area": 400}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }))
    subset_args = train.parse_args(["--model-name-or-path", str(tmp_path / "coco91"), "--train-images",
                                    str(tmp_path / "subset"), "--train-annotations", str(tmp_path / "subset.json")])
    train_set, _, subset_map, _ = train.build_data(subset_args, config.id2label)
    assert subset_map.mode == "category_id" and subset_map.id2label == coco_model.config.id2label
    assert train_set[0][1]["class_labels"].tolist() == [3]
    subset_model = train.build_model(subset_args, subset_map, config)
    assert torch.equal(subset_model.class_embed.weight, coco_model.class_embed.weight)


def test_push_to_hub_is_wired(monkeypatch):
    """--push-to-hub REPO hands the final model, processor and metrics to hf_dino.hub (no network here)."""
    import hf_dino.hub

    calls = []
    monkeypatch.setattr(hf_dino.hub, "push_finetuned_model", lambda *a, **k: calls.append((a, k)))
    train = _load_train_module()
    args = train.parse_args(["--push-to-hub", "me/dino-shapes", "--hub-private"])
    from hf_dino import DinoForObjectDetection
    from hf_dino.configuration_dino import compact_config

    model = DinoForObjectDetection(compact_config(num_queries=10, num_denoising=0, encoder_layers=1, decoder_layers=1))
    train.push_to_hub(args, model, "PROCESSOR", {"AP": 0.5})
    (positional, kwargs), = calls
    assert positional == (model, "PROCESSOR", "me/dino-shapes")
    assert kwargs["metrics"] == {"AP": 0.5} and kwargs["private"] is True and kwargs["training_args"]["epochs"] == 10


def test_bf16_mixed_precision_run(tmp_path, synthetic_dir):
    """`--mixed-precision bf16` (accelerate's CPU autocast) trains end to end: the saved weights stay float32 and
    finite, differ from the float32 run of the same seed (autocast was on) and stay close to it."""
    common = ["--synthetic-dir", str(synthetic_dir), "--epochs", "1", "--report-to", "none", *TINY]
    _run(["--output-dir", str(tmp_path / "fp32"), *common])
    proc = _run(["--output-dir", str(tmp_path / "bf16"), "--mixed-precision", "bf16", *common])
    fp32, bf16 = _weights(tmp_path / "fp32" / "final"), _weights(tmp_path / "bf16" / "final")
    assert fp32.keys() == bf16.keys()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bf16.values())
    trained = [k for k in fp32 if "backbone.body.layer1" not in k and "backbone.body.conv1" not in k]
    assert any(not torch.equal(fp32[k], bf16[k]) for k in trained), "bf16 autocast had no effect"
    assert max((fp32[k] - bf16[k]).abs().max().item() for k in trained) < 0.05
    history = json.loads((tmp_path / "bf16" / "metrics.json").read_text())["history"]
    assert len(history) == 1 and 0.0 <= history[0]["AP"] <= 1.0, proc.stdout[-2000:]
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "bf16" / "train_log.jsonl").read_text().splitlines()]
    assert losses and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize(
    "options, message",
    [
        # zero or negative limits: ignored (--max-steps 0 trained all epochs, --max-train-samples 0 used every image),
        # cut the data at the wrong end (-1 dropped the last image) or divided by zero at step 1 / after an epoch
        (["--max-steps", "0"], "argument --max-steps: '0' is not a positive integer"),
        (["--max-train-samples", "0"], "argument --max-train-samples: '0' is not a positive integer"),
        (["--max-val-samples", "-1"], "argument --max-val-samples: '-1' is not a positive integer"),
        (["--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
        (["--gradient-accumulation-steps", "0"], "'0' is not a positive integer"),
        (["--logging-steps", "0"], "'0' is not a positive integer"),
        (["--eval-every", "0"], "'0' is not a positive integer"),
        (["--image-scale", "0"], "argument --image-scale: '0' is not a positive number"),
        (["--image-scale", "nan"], "argument --image-scale: 'nan' is not a positive number"),
        (["--eval-size", "-800"], "'-800' is not a positive integer"),
        # validation data without its other half: trained without validation before
        (["--val-images", "val/"], "--val-images and --val-annotations go together"),
        # a misspelt field landed in config.json, the intended one unchanged; bad JSON was a traceback
        (["--config-overrides", '{"num_querys": 300}'], "--config-overrides: not DinoConfig fields: num_querys"),
        (["--config-overrides", "{bad"], "--config-overrides is not valid JSON"),
        (["--model-name-or-path", "./no/such/run"], "the model folder './no/such/run' does not exist"),
        # options that were silently ignored
        (["--model-name-or-path", ".", "--config", "compact"], "--config and --scratch-backbone describe a new model"),
        (["--model-name-or-path", ".", "--scratch-backbone"], "--config and --scratch-backbone describe a new model"),
        (["--dataset-name", "cppe-5", "--train-images", "x/"], "--dataset-name gives the training and validation"),
    ],
)
def test_options_the_run_would_get_wrong_are_refused(options, message, capsys):
    train = _load_train_module()
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(options)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_zero_epochs_and_accepted_limits(tmp_path):
    train = _load_train_module()
    args = train.parse_args(["--epochs", "0", "--max-steps", "3", "--max-train-samples", "5", "--image-scale", "0.1",
                             "--config-overrides", '{"num_queries": 30, "num_labels": 4}', "--output-dir",
                             str(tmp_path / "run")])
    assert (args.epochs, args.max_steps, args.max_train_samples, args.image_scale) == (0, 3, 5, 0.1)
