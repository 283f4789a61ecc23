#!/usr/bin/env python
"""Train or fine-tune DINO with `accelerate`.

    python examples/train.py                                  # built-in demo: compact model, synthetic shapes, CPU
    accelerate launch examples/train.py \\
        --train-images coco/train2017 --train-annotations coco/annotations/instances_train2017.json \\
        --val-images coco/val2017 --val-annotations coco/annotations/instances_val2017.json \\
        --config dino-4scale --batch-size 2 --mixed-precision bf16 --epochs 12 --lr-drop 11
    python examples/train.py --dataset-name cppe-5 --model-name-or-path path/to/converted-dino \\
        --train-split train --val-split test                    # fine-tune a 91-class model on 5 classes

With data, a new model's backbone starts from the ImageNet weights the original DINO uses (torchvision's ResNet,
Microsoft's ImageNet-22k Swin-L; `--backbone-weights TAG_OR_FILE` to choose or to pass a downloaded file,
`--scratch-backbone` for random weights). With no data argument the script generates a small synthetic COCO-format
data set (coloured shapes on textured backgrounds, 5 classes; deterministic, nothing downloaded) and trains the
compact preset (`hf_dino.configuration_dino.compact_config`, backbone trained from scratch) on it in about 4 minutes on a 2-core CPU (10 epochs,
240 steps; one torch thread), printing the COCO AP table after each epoch (measured on main of 2026-12-01: AP 1.8 after the
first epoch, 32.3 after the last; AP50 6.1 -> 76.4; any change of rounding moves these, an earlier main gave 21.2) and writing an annotated prediction image (`<output-dir>/prediction.png`).

Several processes: `accelerate launch --multi_gpu --num_processes 2 examples/train.py --cpu ...` runs two CPU
processes (torchrun); `accelerate launch --cpu --num_processes 2` starts a single process unless accelerate is given
an MPI hostfile.

The recipe follows the paper: random horizontal flip + random resize (shorter side 480..800 step 32, longer
<= 1333) or resize-crop-resize (`--image-scale` scales every size), AdamW (lr 1e-4, backbone 1e-5, weight decay
1e-4: the original's parameter groups; `--lr-linear-proj-mult 0.1` trains the sampling offsets at 0.1x lr, Deformable
DETR's recipe), step LR drop (`--lr-drop`, epochs), gradient
clipping 0.1, optional EMA (`--ema`). Mixed precision, gradient accumulation and multi-process training come from
`accelerate`.

Outputs in `--output-dir`: `checkpoints/checkpoint-<step>/` (every `--save-steps` optimizer steps and after each
epoch; `--resume auto` continues from the latest exactly), `best/` and `final/` (`save_pretrained` model +
processor), `metrics.json`, tensorboard logs under `runs/`, `prediction.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_dino import DinoConfig, DinoForObjectDetection, DinoImageProcessor
from hf_dino.data import (
    CocoDetectionDataset,
    DetectionCollator,
    HFDetectionDataset,
    build_label_map,
    generate_synthetic_coco,
    hf_categories,
    load_coco,
    make_eval_transforms,
    make_train_transforms,
    scaled_recipe,
    synthetic_paths,
)
from hf_dino.configuration_dino import compact_config
from hf_dino.evaluation import evaluate_coco, format_metrics_table
from hf_dino.visualization import draw_predictions
from hf_dino.training import (
    CheckpointError,
    GracefulInterrupt,
    ModelEMA,
    ResumableBatchSampler,
    drop_unreadable_images,
    get_param_groups,
    prepare_scratch_backbone,
    load_checkpoint,
    load_latest_checkpoint,
    prepare_output_dir,
    save_checkpoint,
    shard_indices,
    write_json,
)
from hf_dino_cli import ModelLoadError, check_model_argument

logger = logging.getLogger("train")

# the built-in demo: synthetic shapes + compact preset (see `hf_dino.data.synthetic`)
DEMO_DEFAULTS = dict(epochs=10, lr=4e-4, lr_backbone=4e-4, lr_drop=[8], batch_size=4, image_scale=0.2,
                     weight_decay=1e-4, num_workers=0)


def _number(kind: type, accept, what: str):
    """An argparse type: a `kind` number for which `accept(value)` holds (zero or negative limits would otherwise be
    ignored, cut the data at the wrong end or divide by zero later)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not accept(value):  # NaN is not accepted either
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


positive_int = _number(int, lambda value: value >= 1, "a positive integer")
non_negative_int = _number(int, lambda value: value >= 0, "an integer >= 0")
positive_float = _number(float, lambda value: value > 0 and value != float("inf"), "a positive number")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (none given: the synthetic demo)")
    d.add_argument("--train-images", help="folder of the training images (COCO format)")
    d.add_argument("--train-annotations", help="COCO instances JSON of the training images")
    d.add_argument("--val-images", help="folder of the validation images")
    d.add_argument("--val-annotations", help="COCO instances JSON of the validation images")
    d.add_argument("--dataset-name", help="a `datasets` detection data set (columns image, objects{bbox, category}): "
                   "a Hub name or a save_to_disk folder")
    d.add_argument("--dataset-config", default=None)
    d.add_argument("--train-split", default="train")
    d.add_argument("--val-split", default="validation")
    d.add_argument("--bbox-format", default="xywh", choices=["xywh", "xyxy"], help="bbox format of --dataset-name")
    d.add_argument("--synthetic-dir", default=None, help="demo data folder: used as is if it holds a generated data set, else generated there "
                   "(default <output-dir>/synthetic-data)")
    d.add_argument("--max-train-samples", type=positive_int, default=None, help="use the first N training images")
    d.add_argument("--max-val-samples", type=positive_int, default=None, help="use the first N validation images")
    d.add_argument("--label-mapping", default="auto", choices=["auto", "contiguous", "category_id"],
                   help="category id -> label: contiguous 0..N-1, or label = category id (COCO-style 91 classes); "
                   "auto: category_id when the initial model's labels already are the data's categories (the "
                   "model then keeps all its labels, and its classifier, also for a subset of them)")
    d.add_argument("--skip-missing-images", action="store_true", help="leave out images whose file is missing")
    d.add_argument("--ignore-unknown-categories", action="store_true", help="drop annotations with unknown category ids")
    d.add_argument("--skip-empty-images", action="store_true", help="drop images without annotations (default: negatives)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (truncated, corrupt); every image is checked before "
                   "training starts, and by default an unreadable one stops the run there")
    d.add_argument("--image-scale", type=positive_float, default=None,
                   help="multiply every augmentation size (480..800/1333, 400..600, 384..600) and the eval size 800")
    d.add_argument("--eval-size", type=positive_int, default=None,
                   help="shorter side at evaluation (default 800 * image-scale)")
    d.add_argument("--augmentation", default="dino", choices=["dino", "flip", "none"],
                   help="dino: the paper's flip + multi-scale resize / resize-crop-resize; flip: flip only, at the "
                   "evaluation size; none: the evaluation transform")
    d.add_argument("--num-workers", type=non_negative_int, default=None, help="data loader workers (default 2; demo 0)")

    m = p.add_argument_group("model")
    m.add_argument("--model-name-or-path", default=None, help="a DINO folder / Hub id to fine-tune")
    m.add_argument("--config", default=None, choices=["compact", "dino-4scale"],
                   help="a new model: compact CPU preset (demo default) or DINO-4scale ResNet-50 (default with data)")
    m.add_argument("--config-overrides", default=None, help='JSON of DinoConfig fields, e.g. \'{"num_queries": 300}\'')
    m.add_argument("--gradient-checkpointing", action="store_true")
    m.add_argument("--scratch-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="train a randomly initialised backbone fully (live residual branches, stem/layer1 trainable); "
                   "default: on for the demo, off with data (a new model then starts from ImageNet weights)")
    m.add_argument("--backbone-weights", default=None, metavar="TAG_OR_FILE",
                   help="ImageNet weights of a new model's backbone: a timm tag of the backbone, fetched from the Hub, "
                   "or a local file (timm/Hub .safetensors, torchvision or Microsoft Swin .pth); default with data: "
                   "the original DINO's (resnet50.tv_in1k, swin_large_patch4_window12_384.ms_in22k, ...)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=non_negative_int, default=None)
    o.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps")
    o.add_argument("--batch-size", type=positive_int, default=None, help="images per process and step")
    o.add_argument("--eval-batch-size", type=positive_int, default=None)
    o.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--lr-backbone", type=float, default=None, help="backbone lr (<= 0 freezes the backbone)")
    o.add_argument("--lr-linear-proj-mult", type=float, default=1.0,
                   help="lr multiplier of the sampling-offset projections (1: the original DINO's recipe; 0.1: "
                        "Deformable DETR's, the original's ddetr_in_mmdet option)")
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--lr-drop", type=int, nargs="*", default=None, help="epochs after which the lr is multiplied by 0.1")
    o.add_argument("--clip-max-norm", type=float, default=0.1)
    o.add_argument("--ema", action="store_true", help="keep an EMA of the weights and evaluate/save it")
    o.add_argument("--ema-decay", type=float, default=0.9997)
    o.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    o.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    o.add_argument("--seed", type=int, default=42)
    o.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS, else torch's; the demo uses 1, which is robust "
                   "on a busy 2-core machine where 2 threads per process can be many times slower)")

    r = p.add_argument_group("outputs")
    r.add_argument("--output-dir", default="outputs/train")
    r.add_argument("--overwrite-output-dir", action="store_true",
                   help="delete the outputs of a previous run in --output-dir and start a new one (without it, or "
                   "--resume, a folder holding a run is refused)")
    r.add_argument("--save-steps", type=non_negative_int, default=0,
                   help="also checkpoint every N optimizer steps (0: per epoch only). Ctrl-C / SIGTERM save a "
                   "checkpoint at the current step whatever this is")
    r.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    r.add_argument("--resume", nargs="?", const="auto", default=None, help="checkpoint folder, or auto (latest in output dir)")
    r.add_argument("--no-eval", action="store_true")
    r.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every N epochs (and after the last)")
    r.add_argument("--logging-steps", type=positive_int, default=10)
    r.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "none"])
    r.add_argument("--log-batches", action="store_true", help="write the image ids of every step to batch_log.jsonl")
    r.add_argument("--prediction-threshold", type=float, default=0.2, help="score threshold of prediction.png")
    r.add_argument("--push-to-hub", metavar="REPO", default=None, help="push the final model, processor, model card and remote code to this repo")
    r.add_argument("--hub-private", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    args.demo = not any([args.train_images, args.train_annotations, args.dataset_name])
    defaults = dict(epochs=12, lr=1e-4, lr_backbone=1e-5, lr_drop=[11], batch_size=2, image_scale=1.0, weight_decay=1e-4,
                    num_workers=2)
    if args.demo:
        defaults = DEMO_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model_name_or_path is not None and (args.config is not None or args.scratch_backbone is not None):
        p.error("--config and --scratch-backbone describe a new model: not with --model-name-or-path (its config and "
                "weights are used)")
    if args.dataset_name is not None and (args.train_images or args.train_annotations or args.val_images
                                          or args.val_annotations):
        p.error("--dataset-name gives the training and validation data: not with --train-* / --val-* folders")
    if args.config is None and args.model_name_or_path is None:
        args.config = "compact" if args.demo else "dino-4scale"
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if not args.demo and args.dataset_name is None and not (args.train_images and args.train_annotations):
        p.error("--train-images and --train-annotations go together")
    if bool(args.val_images) != bool(args.val_annotations):
        p.error("--val-images and --val-annotations go together")
    if args.config_overrides is not None:
        try:
            overrides = json.loads(args.config_overrides)
        except json.JSONDecodeError as error:
            p.error(f"--config-overrides is not valid JSON ({error}): {args.config_overrides!r}")
        if not isinstance(overrides, dict):
            p.error(f"--config-overrides must be a JSON object of DinoConfig fields, got {args.config_overrides!r}")
        unknown = sorted(set(overrides) - set(DinoConfig.__dataclass_fields__) - {"num_labels"})
        if unknown:
            p.error(f"--config-overrides: not DinoConfig fields: {', '.join(unknown)}")
    if args.model_name_or_path is not None:
        try:
            check_model_argument(args.model_name_or_path)
        except ModelLoadError as error:
            p.error(f"--model-name-or-path: {error}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        p.error(f"--output-dir {args.output_dir!r} is a file, not a folder")
    if args.resume and args.overwrite_output_dir:
        p.error("--resume continues the run in --output-dir, --overwrite-output-dir deletes it: choose one")
    if args.backbone_weights and (args.scratch_backbone or args.model_name_or_path):
        p.error("--backbone-weights starts a new model's backbone from ImageNet weights: not with --scratch-backbone "
                "or --model-name-or-path")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# data + model
# ----------------------------------------------------------------------------------------------------------------------


def build_data(args, initial_id2label):
    """Train/val data sets, the label map and the COCO ground truth of the validation set."""
    recipe = scaled_recipe(args.image_scale, args.eval_size)
    eval_tf = make_eval_transforms(**recipe)
    if args.augmentation == "dino":
        train_tf = make_train_transforms(**recipe)
    elif args.augmentation == "flip":  # flip at the evaluation size (e.g. to overfit a handful of images)
        train_tf = make_train_transforms(**{**recipe, "scales": [recipe["eval_size"]], "crop_size": None})
    else:
        train_tf = eval_tf
    policies = dict(
        missing_images="skip" if args.skip_missing_images else "error",
        unknown_categories="ignore" if args.ignore_unknown_categories else "error",
    )
    empty = "skip" if args.skip_empty_images else "keep"

    if args.dataset_name:
        import datasets

        if os.path.isdir(args.dataset_name) and any(
            os.path.isfile(os.path.join(args.dataset_name, f)) for f in ("dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(args.dataset_name)  # a folder written by save_to_disk
        else:
            ds = datasets.load_dataset(args.dataset_name, args.dataset_config)
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({args.train_split: ds})
        if args.train_split not in ds:
            raise ValueError(f"--train-split {args.train_split!r} not in the dataset (splits: {list(ds)})")
        categories = hf_categories(ds[args.train_split])
    else:
        if args.demo:
            if args.synthetic_dir and os.path.isfile(os.path.join(args.synthetic_dir, "synthetic.json")):
                paths = synthetic_paths(args.synthetic_dir)  # an existing synthetic data set is used as it is
            else:
                paths = generate_synthetic_coco(args.synthetic_dir or os.path.join(args.output_dir, "synthetic-data"))
            for key, value in paths.items():
                setattr(args, key, value)
        categories = load_coco(args.train_annotations).dataset["categories"]

    mode = args.label_mapping
    if mode == "auto":
        mode = "contiguous"
        if initial_id2label is not None:
            as_ids = build_label_map(categories, "category_id") if min(int(c["id"]) for c in categories) >= 0 else None
            if as_ids is not None and as_ids.matches(initial_id2label):
                mode = "category_id"
    label_map = build_label_map(categories, mode)
    if mode == "category_id" and initial_id2label is not None and label_map.matches(initial_id2label):
        # the model already has a label for every category at its id (e.g. a COCO model, fine-tuned on some of its
        # classes): keep its label space, so its classifier rows are kept instead of a head of max id + 1 new rows
        label_map = build_label_map(categories, mode, label_space=initial_id2label)

    if args.dataset_name:
        train = HFDetectionDataset(ds[args.train_split], train_tf, label_map, bbox_format=args.bbox_format,
                                   empty_images=empty, **policies)
        val = None
        if args.val_split and args.val_split in ds:
            val = HFDetectionDataset(ds[args.val_split], eval_tf, label_map, bbox_format=args.bbox_format, **policies)
    else:
        train = CocoDetectionDataset(args.train_images, args.train_annotations, train_tf, label_map,
                                     empty_images=empty, **policies)
        val = None
        if args.val_images and args.val_annotations:
            val = CocoDetectionDataset(args.val_images, args.val_annotations, eval_tf, label_map, **policies)
    if args.max_train_samples:
        _truncate(train, args.max_train_samples)
    if val is not None and args.max_val_samples:
        _truncate(val, args.max_val_samples)
    return train, val, label_map, recipe


def _truncate(dataset, n: int) -> None:
    if hasattr(dataset, "ids"):
        dataset.ids = dataset.ids[:n]
    else:
        dataset.indices = dataset.indices[:n]


def initial_config(args):
    if args.model_name_or_path:
        return DinoConfig.from_pretrained(args.model_name_or_path)
    return None


def build_model(args, label_map, config):
    overrides = json.loads(args.config_overrides) if args.config_overrides else {}
    labels = dict(id2label=label_map.id2label, label2id=label_map.label2id)
    if args.model_name_or_path:
        same = label_map.num_labels == config.num_labels and label_map.matches(config.id2label)
        if same and not overrides:
            return DinoForObjectDetection.from_pretrained(args.model_name_or_path)
        # new label set: class heads and label embedding have new shapes and are re-initialised
        model, info = DinoForObjectDetection.from_pretrained(
            args.model_name_or_path, **labels, **overrides, ignore_mismatched_sizes=True, output_loading_info=True
        )
        reinit = sorted(set(info.get("mismatched_keys", [])) | set(info.get("missing_keys", [])), key=str)
        logger.info("re-initialised for the new label set: %s", [k[0] if isinstance(k, tuple) else k for k in reinit])
        return model
    scratch = args.scratch_backbone if args.scratch_backbone is not None else args.demo and not args.backbone_weights
    if not scratch:  # ImageNet weights (default: the original's), loaded when the model is built
        overrides = {"use_pretrained_backbone": True, "backbone_weights": args.backbone_weights, **overrides}
    if args.config == "compact":
        config = compact_config(**labels, **overrides)
    else:
        config = DinoConfig(**labels, **overrides)
    try:
        model = DinoForObjectDetection(config)
    except (OSError, ValueError) as error:  # no Hub, a missing or unfit weights file: the message says what to pass
        if not config.use_pretrained_backbone:
            raise
        raise SystemExit(f"train.py: backbone weights: {error}") from error
    if scratch and not config.use_pretrained_backbone:
        prepare_scratch_backbone(model)
    return model


def build_processor(args, recipe):
    processor = None
    if args.model_name_or_path:
        try:
            processor = DinoImageProcessor.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError):
            processor = None
    if processor is None:
        processor = DinoImageProcessor()
    # the saved processor resizes like the evaluation transform of this run
    processor.size = {"shortest_edge": int(recipe["eval_size"]), "longest_edge": int(recipe["max_size"])}
    return processor


# ----------------------------------------------------------------------------------------------------------------------
# the run: set-up, resume, epochs, finish
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Where the run stands; saved in every checkpoint (the data position is the NEXT batch to train on)."""

    epoch: int = 0
    start_batch: int = 0
    global_step: int = 0
    best_ap: float = -1.0
    history: list = field(default_factory=list)
    metrics: dict | None = None


@dataclass
class TrainingRun:
    """Everything one run holds, built once by `set_up_run`."""

    args: argparse.Namespace
    accelerator: Any
    output_dir: Path
    train_set: Any
    val_set: Any
    label_map: Any
    processor: DinoImageProcessor
    model: torch.nn.Module  # as prepared by accelerate (maybe wrapped)
    unwrapped: DinoForObjectDetection
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: ResumableBatchSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    coco_gt: Any
    ema: ModelEMA | None
    total_steps: int

    def log(self, message: str) -> None:
        self.accelerator.print(message)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are evaluated and exported: the EMA when kept, else the trained model."""
        return self.ema.module if self.ema is not None else self.unwrapped


def make_accelerator(args):
    """Torch threads, the `accelerate` Accelerator (precision, accumulation, trackers, DDP), logging, output dir."""
    threads = args.num_threads
    if threads is None and args.demo and not os.environ.get("OMP_NUM_THREADS"):
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        prepare_output_dir(output_dir, resume=bool(args.resume), overwrite=args.overwrite_output_dir,
                           is_main=accelerator.is_main_process)
    except FileExistsError as error:
        raise SystemExit(f"train.py: {error}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def set_up_run(args, accelerator) -> TrainingRun:
    """Data, model, processor, loaders, optimizer and LR schedule, EMA: everything before the first step."""
    from accelerate.utils import set_seed

    set_seed(args.seed)  # same initial weights in every process
    config = initial_config(args)
    with accelerator.main_process_first():  # the demo data is generated once
        try:
            train_set, val_set, label_map, recipe = build_data(args, config.id2label if config else None)
            # unreadable images stop the run now, not when their batch comes (maybe hours later)
            train_set = drop_unreadable_images(train_set, "training", args.skip_bad_images)
            if val_set is not None:
                val_set = drop_unreadable_images(val_set, "validation", args.skip_bad_images)
        except (FileNotFoundError, ValueError, OSError) as error:  # bad data: the message says what to do
            raise SystemExit(f"train.py: data error: {error}") from error
    model = build_model(args, label_map, config)
    processor = build_processor(args, recipe)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    accelerator.print(
        f"train: {len(train_set)} images, val: {len(val_set) if val_set else 0} images, {label_map.num_labels} labels "
        f"({label_map.mode}), model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"processes: {accelerator.num_processes} ({accelerator.device}, {torch.get_num_threads()} threads)"
    )

    collate = DetectionCollator(processor)
    sampler = ResumableBatchSampler(len(train_set), args.batch_size, accelerator.num_processes, accelerator.process_index,
                                    seed=args.seed, multiple_of=args.gradient_accumulation_steps)
    # own generators: creating a loader iterator must not consume the global RNG, which the training draws from
    # (exact resumption; evaluation and its progress bar, which iterates differently, leave the training unchanged)
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=collate,
                                               num_workers=args.num_workers, generator=torch.Generator())
    val_loader = coco_gt = None
    if val_set is not None and not args.no_eval:
        shard = torch.utils.data.Subset(val_set, shard_indices(len(val_set), accelerator.num_processes, accelerator.process_index))
        val_loader = torch.utils.data.DataLoader(shard, batch_size=args.eval_batch_size, collate_fn=collate,
                                                 num_workers=args.num_workers, generator=torch.Generator())
        coco_gt = val_set.coco_ground_truth()

    steps_per_epoch = sampler.num_batches // args.gradient_accumulation_steps
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    param_groups = get_param_groups(model, args.lr, args.lr_backbone, args.weight_decay, args.lr_linear_proj_mult)
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    # step LR drop, counted in optimizer steps so that a mid-epoch resume continues the schedule exactly
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[e * steps_per_epoch for e in args.lr_drop], gamma=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = ModelEMA(unwrapped, args.ema_decay) if args.ema else None
    set_seed(args.seed + accelerator.process_index)  # different denoising noise per process
    return TrainingRun(args, accelerator, Path(args.output_dir), train_set, val_set, label_map, processor, model,
                       unwrapped, optimizer, scheduler, sampler, train_loader, val_loader, coco_gt, ema, total_steps)


def checkpoint_state(run: TrainingRun, state: TrainState) -> dict:
    """What a checkpoint holds: every state dict, the data position and the run's history."""
    scaler = run.accelerator.scaler
    return {
        "model": run.unwrapped.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None, "epoch": state.epoch,
        "start_batch": state.start_batch, "global_step": state.global_step, "best_ap": state.best_ap,
        "history": state.history,
        "args": json.loads(json.dumps(vars(run.args), default=str)),  # plain values: weights_only=True reads them
        "run": run_layout(run),
    }


# What a checkpoint's position and schedule rest on: the data order (batch size, accumulation, seed, data set,
# processes) and the settings the restored optimizer and scheduler state carry (they override the command line's).
RESUME_SETTINGS = ("batch_size", "gradient_accumulation_steps", "seed", "max_train_samples", "lr", "lr_backbone",
                   "lr_linear_proj_mult", "weight_decay", "lr_drop")


def run_layout(run: TrainingRun) -> dict:
    """The run's shape that `RESUME_SETTINGS` does not name: processes and training images."""
    return {"num_processes": run.accelerator.num_processes, "train_images": len(run.train_set)}


def resume_mismatches(saved: dict, run: TrainingRun) -> list[str]:
    """`--option: saved -> now` for each setting of `RESUME_SETTINGS` / `run_layout` that differs from the
    checkpoint's (settings a checkpoint does not record, from an older version, are not compared)."""
    now = json.loads(json.dumps({k: getattr(run.args, k) for k in RESUME_SETTINGS}, default=str))
    pairs = [(f"--{k.replace('_', '-')}", saved.get("args", {}).get(k, now[k]), now[k]) for k in RESUME_SETTINGS]
    layout = run_layout(run)
    pairs += [(k.replace("_", " "), saved.get("run", {}).get(k, layout[k]), layout[k]) for k in layout]
    return [f"{name}: {old} in the checkpoint, {new} now" for name, old, new in pairs if old != new]


def save(run: TrainingRun, state: TrainState) -> None:
    """`checkpoints/checkpoint-<step>/` (every process takes part; only the main one writes the training state)."""
    save_checkpoint(run.output_dir / "checkpoints", state.global_step,
                    checkpoint_state(run, state) if run.accelerator.is_main_process else {}, run.accelerator,
                    keep_last=run.args.save_total_limit)


def resume(run: TrainingRun) -> TrainState:
    """The state of `--resume` (a checkpoint folder, or `auto`: the latest in the output dir), loaded into the run."""
    args = run.args
    rank = run.accelerator.process_index
    try:
        if args.resume == "auto":  # the newest intact checkpoint (a corrupt newer one is skipped with a warning)
            found = load_latest_checkpoint(run.output_dir / "checkpoints", rank=rank)
        else:
            found = Path(args.resume), load_checkpoint(args.resume, rank=rank)
    except CheckpointError as error:
        raise SystemExit(f"train.py: cannot resume: {error}") from None
    if found is None:
        run.log("--resume auto: no checkpoint yet, starting from scratch")
        return TrainState()
    path, saved = found
    mismatches = resume_mismatches(saved, run)
    if mismatches:  # a different data order or schedule would silently make another run (or fail mid-epoch)
        raise SystemExit(
            f"train.py: cannot resume from {path}: the run's settings differ from the checkpoint's ("
            + "; ".join(mismatches) + "). Resume with the checkpoint's settings; they fix its data order and "
            "learning-rate schedule."
        )
    run.unwrapped.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    if saved.get("scaler") is not None and run.accelerator.scaler is not None:
        run.accelerator.scaler.load_state_dict(saved["scaler"])
    if run.ema is not None and saved.get("ema") is not None:
        run.ema.load_state_dict(saved["ema"])
    state = TrainState(epoch=saved["epoch"], start_batch=saved["start_batch"], global_step=saved["global_step"],
                       best_ap=saved.get("best_ap", -1.0), history=saved.get("history", []))
    run.log(f"resumed from {path}: epoch {state.epoch}, batch {state.start_batch}, step {state.global_step}")
    return state


def export(run: TrainingRun, folder: Path, module) -> None:
    """`save_pretrained` of a model and the processor (main process)."""
    if run.accelerator.is_main_process:
        module.save_pretrained(folder)
        run.processor.save_pretrained(folder)


class StepLogger:
    """Running means of the loss terms, written every `--logging-steps` to the trackers and `train_log.jsonl`;
    the image ids of each step to `batch_log.jsonl` (`--log-batches`); the progress bar."""

    TERMS = ("loss_ce", "loss_bbox", "loss_giou")

    def __init__(self, run: TrainingRun, state: TrainState):
        self.run = run
        self.running: dict[str, float] = {}
        self.steps = 0
        main = run.accelerator.is_main_process
        self.batch_log = open(run.output_dir / "batch_log.jsonl", "a") if run.args.log_batches and main else None
        self.progress = None
        if main and not run.args.no_progress:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=run.total_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def add_batch(self, state: TrainState, batch_index: int, batch: dict, outputs) -> None:
        terms = [("loss", outputs.loss)] + [(k, v) for k, v in (outputs.loss_dict or {}).items() if k in self.TERMS]
        for key, value in terms:
            self.running[key] = self.running.get(key, 0.0) + float(value.detach()) / self.run.args.gradient_accumulation_steps
        if self.batch_log is not None:
            self.batch_log.write(json.dumps({"step": state.global_step + 1, "epoch": state.epoch, "batch": batch_index,
                                             "image_ids": batch["image_ids"].tolist()}) + "\n")
            self.batch_log.flush()

    def add_step(self, state: TrainState, loss: torch.Tensor) -> None:
        run = self.run
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(epoch=state.epoch, loss=f"{float(loss.detach()):.3f}")
        self.steps += 1
        if state.global_step % run.args.logging_steps == 0 or state.global_step == run.total_steps:
            logs = {f"train/{k}": v / self.steps for k, v in self.running.items()}
            logs["train/lr"] = run.scheduler.get_last_lr()[0]
            run.accelerator.log(logs, step=state.global_step)
            if run.accelerator.is_main_process:
                with open(run.output_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")
            self.running, self.steps = {}, 0

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.batch_log is not None:
            self.batch_log.close()


def train_step(run: TrainingRun, state: TrainState, batch: dict) -> Any:
    """Forward, backward, clipping and the optimizer step of one batch (gradient accumulation by `accelerate`)."""
    accelerator, model = run.accelerator, run.model
    labels = [{k: v.to(accelerator.device) for k, v in t.items()} for t in batch["labels"]]
    with accelerator.accumulate(model):
        outputs = model(pixel_values=batch["pixel_values"].to(accelerator.device),
                        pixel_mask=batch["pixel_mask"].to(accelerator.device), labels=labels)
        if not torch.isfinite(outputs.loss):
            raise FloatingPointError(
                f"non-finite loss {outputs.loss.item()} at step {state.global_step}, images {batch['image_ids'].tolist()}: "
                f"{ {k: float(v) for k, v in outputs.loss_dict.items()} }"
            )
        accelerator.backward(outputs.loss)
        if accelerator.sync_gradients and run.args.clip_max_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), run.args.clip_max_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return outputs


def stop_interrupted(run: TrainingRun, state: TrainState, interrupt: GracefulInterrupt, logger_: StepLogger,
                     saved: bool = False) -> None:
    """After Ctrl-C / SIGTERM: save a checkpoint at the current position (unless just saved) and exit."""
    if not saved:
        save(run, state)
    logger_.close()
    run.accelerator.end_training()
    name = signal.Signals(interrupt.received).name if interrupt.received else "a signal on another process"
    run.log(f"stopped by {name} after step {state.global_step}: saved "
            f"{run.output_dir / 'checkpoints' / f'checkpoint-{state.global_step}'}; continue the run with --resume")
    raise SystemExit(interrupt.exit_code)


def train_epoch(run: TrainingRun, state: TrainState, logger_: StepLogger,
                interrupt: GracefulInterrupt) -> tuple[int, bool]:
    """Train from `state.start_batch` to the end of the epoch (or to the last step). Saves `--save-steps`
    checkpoints mid-epoch, and stops with a checkpoint after the step during which a SIGINT/SIGTERM arrived.
    Returns the number of batches of this epoch consumed and whether training is done."""
    run.sampler.set_epoch(state.epoch, state.start_batch)
    batch_index, done = state.start_batch, state.global_step >= run.total_steps
    for batch in run.train_loader:
        batch_index += 1
        outputs = train_step(run, state, batch)
        logger_.add_batch(state, batch_index, batch, outputs)
        if not run.accelerator.sync_gradients:
            continue
        state.global_step += 1
        if not run.accelerator.optimizer_step_was_skipped:
            run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.unwrapped)
        logger_.add_step(state, outputs.loss)
        done = state.global_step >= run.total_steps
        end_of_epoch = batch_index == run.sampler.num_batches
        save_steps = run.args.save_steps
        if save_steps and state.global_step % save_steps == 0 and not end_of_epoch and not done:
            save(run, dataclasses.replace(state, start_batch=batch_index))
        if interrupt.requested(run.accelerator) and not done:  # collective: every process stops at the same step
            stop_interrupted(run, dataclasses.replace(state, start_batch=batch_index), interrupt, logger_)
        if done:
            break
    return batch_index, done


def end_epoch(run: TrainingRun, state: TrainState, batch_index: int, done: bool, start_time: float) -> None:
    """Evaluate (every `--eval-every` epochs and at the end), keep `best/`, checkpoint, write `metrics.json`."""
    args = run.args
    entry = {"epoch": state.epoch, "step": state.global_step, "time_s": round(time.time() - start_time, 1)}
    if run.val_loader is not None and (done or (state.epoch + 1) % args.eval_every == 0 or state.epoch + 1 == args.epochs):
        metrics = evaluate_coco(run.ema.module if run.ema is not None else run.model, run.val_loader, run.coco_gt,
                                run.label_map.label_to_category_id, run.processor, accelerator=run.accelerator,
                                progress=not args.no_progress and run.accelerator.is_main_process)
        state.metrics = metrics
        entry.update(metrics)
        run.log(format_metrics_table(metrics, title=f"epoch {state.epoch} (step {state.global_step})"))
        run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.global_step)
        if metrics["AP"] > state.best_ap:
            state.best_ap = metrics["AP"]
            export(run, run.output_dir / "best", run.eval_model)
    state.history.append(entry)
    if batch_index == run.sampler.num_batches:  # the next position: the next epoch, or later in this one
        state.epoch, state.start_batch = state.epoch + 1, 0
    else:
        state.start_batch = batch_index
    save(run, state)
    if run.accelerator.is_main_process:
        write_json(run.output_dir / "metrics.json", {"history": state.history, "best_AP": state.best_ap})


def finish(run: TrainingRun, state: TrainState) -> None:
    """`final/`, the prediction image, the Hub push; the trackers are closed."""
    export(run, run.output_dir / "final", run.eval_model)
    if run.accelerator.is_main_process and run.val_set is not None:
        write_prediction_image(run.eval_model, run.processor, run.val_set, run.output_dir / "prediction.png",
                               run.label_map, run.args.prediction_threshold, run.accelerator.device)
        run.log(f"wrote {run.output_dir / 'prediction.png'}")
    if run.args.push_to_hub and run.accelerator.is_main_process:
        push_to_hub(run.args, run.eval_model, run.processor, state.metrics)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = make_accelerator(args)
    run = set_up_run(args, accelerator)
    state = resume(run) if args.resume else TrainState()
    if args.report_to != "none":
        accelerator.init_trackers("hf_dino", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                     for k, v in vars(args).items()})
    step_logger = StepLogger(run, state)
    run.model.train()
    start_time = time.time()
    done = state.global_step >= run.total_steps
    interrupt = GracefulInterrupt()  # Ctrl-C / SIGTERM: finish the current step, save a checkpoint, stop
    interrupt.install()
    while state.epoch < args.epochs and not done:
        batch_index, done = train_epoch(run, state, step_logger, interrupt)
        end_epoch(run, state, batch_index, done, start_time)
        if interrupt.requested(accelerator) and not done:
            stop_interrupted(run, state, interrupt, step_logger, saved=True)
    interrupt.uninstall()
    step_logger.close()
    finish(run, state)
    run.log(f"done: {state.global_step} steps in {time.time() - start_time:.0f}s; outputs in {run.output_dir}")
    return {"global_step": state.global_step, "history": state.history, "best_AP": state.best_ap, "metrics": state.metrics}


def push_to_hub(args, model, processor, metrics) -> None:
    """Push the final model with its processor, a model card (metrics, label map, training settings) and the remote
    code (`DinoForObjectDetection.push_to_hub`, i.e. `hf_dino.hub.push_finetuned_model`)."""
    training_args = {k: getattr(args, k) for k in ("epochs", "lr", "lr_backbone", "weight_decay", "batch_size",
                                                     "gradient_accumulation_steps", "lr_drop", "image_scale", "ema")}
    model.push_to_hub(args.push_to_hub, image_processor=processor, metrics=metrics, base_model=args.model_name_or_path,
                      dataset_name=args.dataset_name, training_args=training_args,
                      private=args.hub_private)


@torch.no_grad()
def write_prediction_image(model, processor, dataset, path, label_map, threshold, device) -> None:
    image = dataset.load_image(0)
    inputs = processor(images=image, apply_exif_orientation=False, return_tensors="pt").to(device)
    was_training = model.training
    model.eval()
    outputs = model(**inputs)
    model.train(was_training)
    result = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=[image.size[::-1]])[0]
    draw_predictions(image, result, label_map.id2label, threshold).save(path)


if __name__ == "__main__":
    main()
