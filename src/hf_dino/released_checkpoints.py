"""Every checkpoint released with the original DINO (IDEA-Research/DINO): architecture, reported COCO AP, Hub repo.

Sources (checked, not guessed):

* Box AP, backbone, scales and schedule: the three "Model Zoo" tables (12 / 24 / 36 epoch settings) of the original
  README (`git show HEAD:README.md` of IDEA-Research/DINO); "Where in paper" is the README's column (Table 1 /
  Table 2 of arXiv:2203.03605; empty for the Swin-L rows, which the README added on 2022/8/6).
* File names: the README states the convention "checkpoint{x}_{y}scale.pth" and names `checkpoint0011_4scale.pth`
  (12 epochs, "final AP about 49.0"); its demo notebook loads `checkpoint0023_4scale.pth`. The other names are those
  of the files in the authors' Google Drive model-zoo folder as downstream projects list them. `{x}` is the
  0-based index of the saved epoch, which is not always "epochs - 1": the 24- and 36-epoch 5-scale R50 files are
  `checkpoint0022_5scale.pth` and `checkpoint0031_5scale.pth`, the 36-epoch Swin-L files `checkpoint0029_4scale_swin.pth`
  and `checkpoint0027_5scale_swin.pth`.
* Hub repo names are this project's: ``{HUB_NAMESPACE}/dino-{r50|swinl}-{4|5}scale-{12|24|36}ep``.

Run ``python -m hf_dino.released_checkpoints`` to print the table (markdown).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

HUB_NAMESPACE = "hf-dino"
ORIGINAL_REPO = "https://github.com/IDEA-Research/DINO"
MODEL_ZOO_URL = "https://drive.google.com/drive/folders/1qD5m1NmK0kjE5hh-G17XUX751WsEG-h_?usp=sharing"
PAPER_URL = "https://arxiv.org/abs/2203.03605"

# `--model-name` of conversion/convert_original_checkpoint.py -> human-readable architecture
ARCHITECTURES: dict[str, dict] = {
    "dino-r50-4scale": dict(backbone="ResNet-50", backbone_pretraining="ImageNet-1k", num_feature_levels=4),
    "dino-r50-5scale": dict(backbone="ResNet-50", backbone_pretraining="ImageNet-1k", num_feature_levels=5),
    "dino-swinl-4scale": dict(
        backbone="Swin-L (patch 4, window 12, 384)", backbone_pretraining="ImageNet-22k", num_feature_levels=4
    ),
    "dino-swinl-5scale": dict(
        backbone="Swin-L (patch 4, window 12, 384)", backbone_pretraining="ImageNet-22k", num_feature_levels=5
    ),
}


@dataclasses.dataclass(frozen=True)
class ReleasedCheckpoint:
    """One released original checkpoint."""

    file_name: str  # as released, e.g. "checkpoint0011_4scale.pth"
    model_name: str  # `--model-name` of the converter, a key of ARCHITECTURES
    epochs: int  # training schedule (12, 24 or 36 epochs on COCO train2017)
    box_ap: float  # COCO val2017 box AP reported by the authors (README model zoo), percent
    paper_table: str | None  # where the README says the number appears in the paper

    @property
    def backbone(self) -> str:
        return ARCHITECTURES[self.model_name]["backbone"]

    @property
    def backbone_short(self) -> str:
        return "R50" if self.model_name.startswith("dino-r50") else "Swin-L"

    @property
    def backbone_pretraining(self) -> str:
        return ARCHITECTURES[self.model_name]["backbone_pretraining"]

    @property
    def num_feature_levels(self) -> int:
        return ARCHITECTURES[self.model_name]["num_feature_levels"]

    @property
    def display_name(self) -> str:
        """The README's name column, e.g. "DINO-4scale"."""
        return f"DINO-{self.num_feature_levels}scale"

    @property
    def hub_repo(self) -> str:
        return hub_repo_id(self.model_name, self.epochs)


def hub_repo_id(model_name: str, epochs: int, namespace: str = HUB_NAMESPACE) -> str:
    return f"{namespace}/{model_name}-{epochs}ep"


RELEASED_CHECKPOINTS: tuple[ReleasedCheckpoint, ...] = (
    # ResNet-50, 4 scales
    ReleasedCheckpoint("checkpoint0011_4scale.pth", "dino-r50-4scale", 12, 49.0, "Table 1"),
    ReleasedCheckpoint("checkpoint0023_4scale.pth", "dino-r50-4scale", 24, 50.4, "Table 2"),
    ReleasedCheckpoint("checkpoint0033_4scale.pth", "dino-r50-4scale", 36, 50.9, "Table 2"),
    # ResNet-50, 5 scales
    ReleasedCheckpoint("checkpoint0011_5scale.pth", "dino-r50-5scale", 12, 49.4, "Table 1"),
    ReleasedCheckpoint("checkpoint0022_5scale.pth", "dino-r50-5scale", 24, 51.3, "Table 2"),
    ReleasedCheckpoint("checkpoint0031_5scale.pth", "dino-r50-5scale", 36, 51.2, "Table 2"),
    # Swin-L, 4 scales
    ReleasedCheckpoint("checkpoint0011_4scale_swin.pth", "dino-swinl-4scale", 12, 56.8, None),
    ReleasedCheckpoint("checkpoint0029_4scale_swin.pth", "dino-swinl-4scale", 36, 58.0, None),
    # Swin-L, 5 scales
    ReleasedCheckpoint("checkpoint0011_5scale_swin.pth", "dino-swinl-5scale", 12, 57.3, None),
    ReleasedCheckpoint("checkpoint0027_5scale_swin.pth", "dino-swinl-5scale", 36, 58.5, None),
)

BY_FILE_NAME: dict[str, ReleasedCheckpoint] = {c.file_name: c for c in RELEASED_CHECKPOINTS}


def find_checkpoint(path_or_name: str | Path) -> ReleasedCheckpoint | None:
    """The table entry of a released file (looked up by its base name), or ``None`` for any other file."""
    return BY_FILE_NAME.get(Path(path_or_name).name)


def checkpoints_for(model_name: str) -> list[ReleasedCheckpoint]:
    """The released checkpoints of one architecture, shortest schedule first."""
    return sorted((c for c in RELEASED_CHECKPOINTS if c.model_name == model_name), key=lambda c: c.epochs)


def markdown_table(entries=RELEASED_CHECKPOINTS, highlight: str | None = None) -> str:
    """A markdown table of ``entries``; the row whose file name is ``highlight`` is bold."""
    lines = [
        "| Checkpoint (original file) | Model | Backbone | Scales | Epochs | COCO val2017 box AP | Hub repo |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for c in entries:
        cells = [
            f"`{c.file_name}`",
            c.display_name,
            c.backbone_short,
            str(c.num_feature_levels),
            str(c.epochs),
            f"{c.box_ap:.1f}",
            f"[{c.hub_repo}](https://huggingface.co/{c.hub_repo})",
        ]
        if c.file_name == highlight:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
