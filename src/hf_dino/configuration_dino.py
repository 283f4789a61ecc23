"""DINO (DETR with Improved deNoising anchOr boxes) model configuration."""


import os

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# COCO 2017 category names indexed by the original category id (1..90); DINO predicts 91 classes and the ids
# with no category ("N/A", including 0) are never targets.
COCO_ID2LABEL: dict[int, str] = {
    i: "N/A" for i in range(91)
} | {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

# Swin Transformer backbones as the original DINO builds them (embed dim, depths, heads, window size).
SWIN_ARCHITECTURES: dict[str, dict] = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_base_patch4_window12_384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "swin_large_patch4_window12_384": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}
# ResNets come from timm; channels of stages 0..3 (C2..C5).
RESNET_CHANNELS: dict[str, tuple[int, ...]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
# The ImageNet weights the original DINO starts from, as timm tags (default of `DinoConfig.backbone_weights`):
# torchvision's ImageNet-1k V1 ResNets (`torchvision.models.resnet50(pretrained=True)`, resnet50-0676ba61.pth; timm's
# untagged default `resnet50.a1_in1k` is another recipe) and Microsoft's Swin releases (Swin-T: ImageNet-1k
# `swin_tiny_patch4_window7_224.pth`; Swin-B/L: ImageNet-22k, not fine-tuned on 1k,
# `swin_{base,large}_patch4_window12_384_22k.pth`).
PRETRAINED_BACKBONE_WEIGHTS: dict[str, str] = {
    "resnet18": "resnet18.tv_in1k",
    "resnet34": "resnet34.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "resnet101": "resnet101.tv_in1k",
    "swin_tiny_patch4_window7_224": "swin_tiny_patch4_window7_224.ms_in1k",
    "swin_base_patch4_window12_384": "swin_base_patch4_window12_384.ms_in22k",
    "swin_large_patch4_window12_384": "swin_large_patch4_window12_384.ms_in22k",
}


@strict(accept_kwargs=True)
class DinoConfig(PreTrainedConfig):
    r"""
    Configuration of a DINO detector ([`DinoModel`], [`DinoForObjectDetection`]). Defaults reproduce the
    original `config/DINO/DINO_4scale.py` (ResNet-50, 4 feature levels; the paper's Table 8).

    Args:
        backbone (`str`, defaults to `"resnet50"`):
            `"resnet18"`, `"resnet34"`, `"resnet50"`, `"resnet101"` (timm, frozen batch norm) or a Swin name from
            `SWIN_ARCHITECTURES` (e.g. `"swin_large_patch4_window12_384"`, DINO's Swin-L).
        use_pretrained_backbone (`bool`, defaults to `False`):
            Load ImageNet weights into the backbone when the model is built (not while `from_pretrained` builds
            it: the checkpoint holds the weights then). Which weights: `backbone_weights`.
        backbone_weights (`str`, *optional*):
            The ImageNet weights for `use_pretrained_backbone` (setting it turns `use_pretrained_backbone` on):
            a timm tag of the backbone, fetched from the Hugging Face Hub (defaults to the weights the original
            DINO uses, `PRETRAINED_BACKBONE_WEIGHTS`: `"resnet50.tv_in1k"`,
            `"swin_large_patch4_window12_384.ms_in22k"`, ...), or a local file: a timm/Hub `.safetensors`
            file, torchvision's `.pth` or Microsoft's Swin `.pth` (`{"model": state_dict}`).
        backbone_out_indices (`list[int]`, *optional*):
            Backbone stages (0..3, strides 4..32) fed to the transformer. Defaults to the last
            `min(num_feature_levels, 4)` stages minus one extra level: `[1, 2, 3]` for 4 levels, `[0, 1, 2, 3]`
            for 5 levels.
        backbone_drop_path_rate (`float`, defaults to 0.2):
            Stochastic depth of a Swin backbone (training only).
        num_feature_levels (`int`, defaults to 4):
            Feature levels of the deformable transformer; levels beyond the backbone's come from stride-2
            3x3 convolutions on the last backbone map.
        d_model (`int`, defaults to 256): hidden size of the transformer.
        encoder_layers, decoder_layers (`int`, defaults to 6): number of layers.
        encoder_attention_heads, decoder_attention_heads (`int`, defaults to 8): attention heads.
        encoder_ffn_dim, decoder_ffn_dim (`int`, defaults to 2048): feed-forward hidden size.
        encoder_n_points, decoder_n_points (`int`, defaults to 4): sampling points per head and level.
        activation_function (`str`, defaults to `"relu"`): feed-forward activation.
        dropout (`float`, defaults to 0.0): dropout in the transformer layers.
        num_queries (`int`, defaults to 900): detection queries (top-K encoder proposals).
        position_embedding_temperature (`float`, defaults to 20): temperature of the backbone sine embedding.
        num_denoising (`int`, defaults to 100): contrastive-denoising query budget (`dn_number`): from 50 on, about
            `2 * num_denoising` queries in `num_denoising // max_objects` groups (at least one); below 50 the
            original's rule makes `2 * num_denoising` groups whatever the number of objects; 0 disables.
        label_noise_ratio (`float`, defaults to 0.5): a denoising query's label is redrawn uniformly from all
            classes with probability `label_noise_ratio / 2` (the original's rule; the new class may be the old).
        box_noise_scale (`float`, defaults to 1.0): box noise of the denoising queries. The released checkpoints
            were trained with 1.0 (the original training scripts pass `dn_box_noise_scale=1.0`); the paper's
            Table 8 and the config file say 0.4.
        focal_alpha, focal_gamma (`float`, defaults to 0.25, 2.0): sigmoid focal loss.
        class_cost, bbox_cost, giou_cost (`float`, defaults to 2, 5, 2): Hungarian matching costs.
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient (`float`, defaults to 1, 5, 2).
        encoder_loss_coefficient (`float`, defaults to 1.0): weight of the encoder (query-selection) losses.
        auxiliary_loss (`bool`, defaults to `True`): losses after every decoder layer.
        init_std (`float`, defaults to 0.02): std of the linear-layer initialisation.
        disable_custom_kernels (`bool`, defaults to `False`): always use the pure-PyTorch deformable attention (and
            `nn.MultiheadAttention` for the decoder's self-attention in bfloat16, aten's add and `nn.LayerNorm` for
            the layers' residual connections).

    Example:

    ```python
    >>> from hf_dino import DinoConfig, DinoForObjectDetection
    >>> config = DinoConfig()  # DINO-4scale, ResNet-50
    >>> model = DinoForObjectDetection(config)
    ```
    """

    model_type = "dino_detr"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}

    backbone: str = "resnet50"
    use_pretrained_backbone: bool = False
    backbone_weights: str | os.PathLike | None = None
    backbone_out_indices: list[int] | tuple[int, ...] | None = None
    backbone_drop_path_rate: float | int = 0.2
    num_channels: int = 3
    num_feature_levels: int = 4
    d_model: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_ffn_dim: int = 2048
    encoder_n_points: int = 4
    decoder_n_points: int = 4
    activation_function: str = "relu"
    dropout: float | int = 0.0
    num_queries: int = 900
    position_embedding_temperature: float | int = 20.0
    num_denoising: int = 100
    label_noise_ratio: float | int = 0.5
    box_noise_scale: float | int = 1.0
    focal_alpha: float | int = 0.25
    focal_gamma: float | int = 2.0
    class_cost: float | int = 2.0
    bbox_cost: float | int = 5.0
    giou_cost: float | int = 2.0
    class_loss_coefficient: float | int = 1.0
    bbox_loss_coefficient: float | int = 5.0
    giou_loss_coefficient: float | int = 2.0
    encoder_loss_coefficient: float | int = 1.0
    auxiliary_loss: bool = True
    init_std: float | int = 0.02
    disable_custom_kernels: bool = False
    is_encoder_decoder: bool = True

    def __post_init__(self, **kwargs):
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(COCO_ID2LABEL)
            self.label2id = {}
            for i, name in self.id2label.items():
                self.label2id.setdefault(name, i)
        if self.backbone_weights is not None:
            self.backbone_weights = os.fspath(self.backbone_weights)  # a Path must still serialise
            self.use_pretrained_backbone = True
        if self.backbone_out_indices is None:
            # the last stages, one level fewer than num_feature_levels (the extra one is a stride-2 convolution
            # of the last stage), at least the last stage
            self.backbone_out_indices = list(range(max(0, 4 - max(1, self.num_feature_levels - 1)), 4))
        else:
            self.backbone_out_indices = list(self.backbone_out_indices)
        super().__post_init__(**kwargs)
        self.check_consistency()

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def is_swin_backbone(self) -> bool:
        return self.backbone in SWIN_ARCHITECTURES

    @property
    def pretrained_backbone_weights(self) -> str:
        """`backbone_weights`, else the ImageNet weights the original DINO uses for this backbone (a timm tag)."""
        return self.backbone_weights or PRETRAINED_BACKBONE_WEIGHTS[self.backbone]

    @property
    def backbone_channels(self) -> list[int]:
        """Channels of the backbone maps fed to the transformer, one per entry of `backbone_out_indices`."""
        if self.is_swin_backbone:
            embed_dim = SWIN_ARCHITECTURES[self.backbone]["embed_dim"]
            return [embed_dim * 2**i for i in self.backbone_out_indices]
        return [RESNET_CHANNELS[self.backbone][i] for i in self.backbone_out_indices]

    def check_consistency(self) -> None:
        """Raise a `ValueError` naming the problem if the hyper-parameters cannot build a model.

        Called at config construction and again at model construction (attributes may change in between).
        """
        if self.backbone not in RESNET_CHANNELS and self.backbone not in SWIN_ARCHITECTURES:
            raise ValueError(
                f"Unknown backbone {self.backbone!r}; supported: {sorted(RESNET_CHANNELS) + sorted(SWIN_ARCHITECTURES)}."
            )
        indices = self.backbone_out_indices
        if not indices or any(i not in (0, 1, 2, 3) for i in indices) or sorted(set(indices)) != list(indices):
            raise ValueError(f"backbone_out_indices must be increasing stage indices in 0..3, got {indices}.")
        if self.num_feature_levels < len(indices):
            raise ValueError(
                f"num_feature_levels={self.num_feature_levels} is smaller than the {len(indices)} backbone stages "
                f"{indices} it must hold."
            )
        for name in ("encoder", "decoder"):
            heads = getattr(self, f"{name}_attention_heads")
            if heads <= 0 or self.d_model % heads != 0:
                raise ValueError(f"d_model={self.d_model} must be divisible by {name}_attention_heads={heads}.")
        if self.d_model % 2 != 0 or self.d_model % 32 != 0:
            raise ValueError(f"d_model={self.d_model} must be a multiple of 32 (GroupNorm(32) input projections).")
        for name in ("encoder_layers", "num_queries", "encoder_n_points", "decoder_n_points", "num_feature_levels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.decoder_layers < 1:
            raise ValueError(f"decoder_layers must be >= 1, got {self.decoder_layers}.")
        if self.num_denoising < 0:
            raise ValueError(f"num_denoising must be >= 0, got {self.num_denoising}.")
        if not 0.0 <= self.label_noise_ratio <= 1.0:
            raise ValueError(f"label_noise_ratio must be in [0, 1], got {self.label_noise_ratio}.")
        if self.activation_function not in ("relu", "gelu", "silu"):
            raise ValueError(f"activation_function must be relu, gelu or silu, got {self.activation_function!r}.")
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError("The config needs at least one label (id2label / num_labels).")
        keys = sorted(int(k) for k in self.id2label)
        if keys != list(range(self.num_labels)):
            raise ValueError(
                f"id2label must name the labels 0..{self.num_labels - 1} (the class indices the model predicts), got "
                f"keys {keys[:8]}{' ...' if len(keys) > 8 else ''}: fill the unused ids with 'N/A' (as COCO_ID2LABEL "
                "does for COCO's category ids) or number the labels 0..N-1."
            )
        for name in ("num_channels", "encoder_ffn_dim", "decoder_ffn_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("dropout", "backbone_drop_path_rate", "focal_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        for name in ("init_std", "position_embedding_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        for name in ("box_noise_scale", "focal_gamma", "class_cost", "bbox_cost", "giou_cost", "class_loss_coefficient",
                     "bbox_loss_coefficient", "giou_loss_coefficient", "encoder_loss_coefficient"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


def compact_config(**overrides) -> DinoConfig:
    """The compact DINO preset for CPU training (the default run of ``examples/train.py``, tests, benchmarks).

    ResNet-18 backbone (from scratch: no download), 3 feature levels, ``d_model=128``, 2 encoder + 3 decoder layers,
    50 queries, the original's denoising budget (``num_denoising=100``: about 200 denoising queries, in
    ``100 // max_objects`` groups; a value below 50 would be ``2 * num_denoising`` groups whatever the number of
    objects, see :func:`hf_dino.denoising.denoising_group_count`). Any :class:`~hf_dino.DinoConfig` field can be overridden, e.g.
    ``compact_config(id2label={0: "cat", 1: "dog"})``.
    """
    kwargs = dict(
        backbone="resnet18",
        use_pretrained_backbone=False,
        num_feature_levels=3,
        backbone_out_indices=[1, 2, 3],
        d_model=128,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        encoder_n_points=4,
        decoder_n_points=4,
        num_queries=50,
        backbone_drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    return DinoConfig(**kwargs)


__all__ = ["DinoConfig", "COCO_ID2LABEL", "SWIN_ARCHITECTURES", "RESNET_CHANNELS", "PRETRAINED_BACKBONE_WEIGHTS",
           "compact_config"]
