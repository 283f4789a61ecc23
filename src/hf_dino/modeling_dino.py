"""PyTorch DINO: DETR with Improved deNoising anchOr boxes (Zhang et al., arXiv 2203.03605).

The flow of one batch (each step is one named module or function below):

    pixel_values, pixel_mask
      -> DinoBackbone (timm ResNet with frozen batch norm, or DinoSwinTransformer)   multi-scale feature maps
      -> DinoModel.input_projections + DinoSinePositionEmbedding + level_embed        flattened tokens
      -> DinoEncoder (deformable self-attention)                                      memory
      -> DinoModel.select_queries ("mixed query selection": top-K encoder proposals become the anchor boxes,
         content queries stay learnable)
      -> DinoDecoder (self-attention, deformable cross-attention, FFN; iterative anchor refinement with
         "look forward twice")                                                        per-layer boxes
      -> DinoForObjectDetection.class_embed (one head shared by all layers)          per-layer logits
    training adds: build_contrastive_denoising_queries (denoising.py) -> extra decoder queries + attention mask,
                   DinoLoss (loss_dino.py) -> focal / L1 / GIoU losses (final, auxiliary, encoder, denoising).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .backbone_dino import DinoBackbone, DinoSwinWindowAttention, captures_graph, has_hooks
from .configuration_dino import DinoConfig
from .deformable_attention import compiled_kernels, multi_scale_deformable_attention
from .denoising import DenoisingMeta, build_contrastive_denoising_queries, inverse_sigmoid
from .box_ops import check_detection_labels
from .loss_dino import DinoLoss
from .onednn import (
    autocast_allows,
    autocast_operands,
    onednn_products_are_faster,
    onednn_runs_bfloat16_products,
    onednn_runs_every_feed_forward_product,
)


# ------------------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class DinoModelOutput(ModelOutput):
    r"""
    Outputs of [`DinoModel`]. `B` = batch, `Q` = `config.num_queries`, `L` = `config.decoder_layers`,
    `S` = encoder tokens (sum of h*w over levels), `D` = `config.d_model`, `N` = denoising queries.

    last_hidden_state (`[B, Q, D]`): last decoder layer output (after the decoder's final LayerNorm).
    intermediate_hidden_states (`[B, L, Q, D]`): every decoder layer's output (after the final LayerNorm).
    intermediate_pred_boxes (`[B, L, Q, 4]`): every decoder layer's box prediction, normalized (cx, cy, w, h).
    intermediate_reference_points (`[B, L + 1, Q, 4]`): the anchor boxes: index 0 the initial ones (refined
        encoder proposals), index l + 1 the anchors after decoder layer l (sigmoid space).
    encoder_last_hidden_state (`[B, S, D]`): encoder memory. In training on the CPU its rows of padding tokens, which
        nothing reads, are not the original's (`DinoEncoderLayer.feed_forward` skips them); in eval mode they are.
    encoder_logits (`[B, Q, C]`): class logits of the selected encoder proposals (the "interm" outputs).
    encoder_pred_boxes (`[B, Q, 4]`): boxes of the selected encoder proposals, normalized (cx, cy, w, h).
    encoder_topk_indices (`[B, Q]`): the encoder tokens chosen by query selection, best first.
    denoising_hidden_states (`[B, L, N, D]`), denoising_pred_boxes (`[B, L, N, 4]`): the contrastive denoising
        queries' outputs (training with labels only).
    denoising_meta (`DenoisingMeta`): group layout of the denoising queries (see `denoising.py`).
    encoder_hidden_states, decoder_hidden_states (`tuple`): per-layer states, when `output_hidden_states=True`
        (`[B, S, D]` encoder tokens; `[B, Q, D]` decoder queries, the denoising queries left out as above).
    """

    last_hidden_state: torch.FloatTensor | None = None
    intermediate_hidden_states: torch.FloatTensor | None = None
    intermediate_pred_boxes: torch.FloatTensor | None = None
    intermediate_reference_points: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_logits: torch.FloatTensor | None = None
    encoder_pred_boxes: torch.FloatTensor | None = None
    encoder_topk_indices: torch.LongTensor | None = None
    denoising_hidden_states: torch.FloatTensor | None = None
    denoising_pred_boxes: torch.FloatTensor | None = None
    denoising_meta: DenoisingMeta | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DinoObjectDetectionOutput(ModelOutput):
    r"""
    Outputs of [`DinoForObjectDetection`] (shapes as in [`DinoModelOutput`], `C` = `config.num_labels`).

    loss (`[]`): weighted total loss, when `labels` are given.
    loss_dict (`dict[str, Tensor]`): every raw loss term (original DINO names: `loss_ce`, `loss_bbox`,
        `loss_giou`, suffixes `_0.._{L-2}` for decoder layers, `_interm` for the encoder, `_dn` for denoising).
    logits (`[B, Q, C]`): class logits of the last decoder layer (sigmoid gives per-class probabilities).
    pred_boxes (`[B, Q, 4]`): boxes of the last decoder layer, normalized (cx, cy, w, h) relative to the
        unpadded image.
    auxiliary_outputs (`list[dict]`): `{"logits", "pred_boxes"}` of decoder layers 0..L-2.
    intermediate_logits (`[B, L, Q, C]`), intermediate_pred_boxes (`[B, L, Q, 4]`): every decoder layer.
    denoising_logits (`[B, L, N, C]`): class logits of the denoising queries (training with labels only).
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    auxiliary_outputs: list[dict] | None = None
    intermediate_logits: torch.FloatTensor | None = None
    intermediate_pred_boxes: torch.FloatTensor | None = None
    intermediate_reference_points: torch.FloatTensor | None = None
    encoder_logits: torch.FloatTensor | None = None
    encoder_pred_boxes: torch.FloatTensor | None = None
    encoder_topk_indices: torch.LongTensor | None = None
    denoising_logits: torch.FloatTensor | None = None
    denoising_pred_boxes: torch.FloatTensor | None = None
    denoising_meta: DenoisingMeta | None = None
    last_hidden_state: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None


# ------------------------------------------------------------------------------------------------------------------
# Small shared pieces
# ------------------------------------------------------------------------------------------------------------------
def _reject_output_attentions(output_attentions: bool | None) -> None:
    if output_attentions:
        raise ValueError(
            "output_attentions=True is not supported: DINO's deformable attention samples a few points per query "
            "and never forms an attention matrix. Use output_hidden_states=True for per-layer states."
        )


def check_pixel_mask(pixel_mask: torch.Tensor) -> None:
    """Raise a `ValueError` naming the images whose real pixels do not form a non-empty top-left rectangle.

    `pixel_mask` `[B, H, W]`: 1 = real pixel, 0 = padding at the bottom / right (what the processor writes). The
    valid ratios and the encoder's proposals measure each image from its first column and row, as the original does,
    so an all-zero or inverted mask, or padding at the top / left (letterboxing), would give meaningless detections
    without an error. One host synchronisation.
    """
    valid = pixel_mask.bool()
    first_column, first_row = valid[:, :, 0], valid[:, 0, :]  # [B, H], [B, W]
    ones_then_zeros = ((first_column[:, 1:] <= first_column[:, :-1]).all(1)
                       & (first_row[:, 1:] <= first_row[:, :-1]).all(1))
    rectangle = (valid == (first_column[:, :, None] & first_row[:, None, :])).flatten(1).all(1)
    fine = valid[:, 0, 0] & ones_then_zeros & rectangle
    if not bool(fine.all()):
        images = (~fine).nonzero().flatten().tolist()
        raise ValueError(
            f"pixel_mask of image(s) {images[:5]}{' ...' if len(images) > 5 else ''}: the real pixels (1) must form a "
            "non-empty rectangle at the top left, the padding (0) lying at the bottom and right, as DinoImageProcessor "
            "pads (an all-zero, inverted or letterboxing mask gives meaningless detections)."
        )


def sine_embedding(positions: torch.Tensor, num_features: int, temperature: float) -> torch.Tensor:
    """The transformer sine embedding of scalar positions `[...]` -> `[..., num_features]`: feature `2i` is
    `sin(p / temperature^(2i / num_features))`, feature `2i + 1` the cosine at the same frequency (DETR's layout).
    Shared by the feature-map position embedding and the anchor-box embedding."""
    dim_t = torch.arange(num_features, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_features)
    pos = positions[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


def box_sine_embedding(boxes: torch.Tensor, num_features: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """Sine embedding of boxes `[..., 4]` (cx, cy, w, h in [0, 1]) -> `[..., 4 * num_features]`, ordered (y, x, w, h).

    This is how DINO turns an anchor box into the positional part of a decoder query.
    """
    scale = 2 * math.pi
    x, y, w, h = boxes.unbind(-1)
    return torch.cat([sine_embedding(c * scale, num_features, temperature) for c in (y, x, w, h)], dim=-1)


def feed_forward_activation(name: str) -> nn.Module:
    """The feed-forward activation. ReLU works in place, on the `[tokens, ffn_dim]` output of `linear1`, which the
    feed-forward blocks compute on 2-D token matrices: the output is then a tensor of its own, not a view, so that
    autograd needs no copy of it."""
    return nn.ReLU(inplace=True) if name == "relu" else ACT2FN[name]


class DinoMLPPredictionHead(nn.Module):
    """A small MLP (ReLU between layers): the box heads and the reference-point head. Layers are `layers.{i}`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DinoSinePositionEmbedding(nn.Module):
    """Normalized 2-D sine position embedding of a feature map (DETR's, with DINO's temperature 20).

    `[B, H, W]` padding mask (True = padding) -> `[B, 2 * num_features, H, W]`, y features first.
    """

    def __init__(self, num_features: int, temperature: float):
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature

    def forward(self, padding_mask: torch.Tensor) -> torch.Tensor:
        not_mask = ~padding_mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        scale, eps = 2 * math.pi, 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
        pos_x = sine_embedding(x_embed, self.num_features, self.temperature)
        pos_y = sine_embedding(y_embed, self.num_features, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------------------------
# Token-wise products on the CPU
# ------------------------------------------------------------------------------------------------------------------
# fewest rows of a product that runs on oneDNN: its first call for each new shape (a JIT-compiled primitive) costs
# 1-3 ms more, as much as a small product itself. The decoder's 900 queries are above it: on the AMD EPYC Zen 5,
# `[900, 256] x [256, 2048]` 2.2 vs 4.9 ms, `[900, 256] x [256, 256]` 0.54 vs 1.04 ms (oneDNN vs MKL)
ONEDNN_MIN_ROWS = 512


def onednn_linear_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `onednn_linear` computes `F.linear(x, weight, ...)` here: CPU tensors of one dtype, float32 where oneDNN
    is the faster library (`onednn_products_are_faster`) or bfloat16 where aten runs it on oneDNN anyway
    (`onednn_runs_bfloat16_products`); `x` with at least `ONEDNN_MIN_ROWS` rows, in eager mode (graph capture and
    export see `F.linear`), outside CPU autocast or on its bfloat16 operands (`autocast_allows`: under
    `torch.autocast("cpu", torch.bfloat16)` the callers cast them with `autocast_operands`) and with oneDNN enabled
    (`torch.backends.mkldnn.flags(enabled=False)` turns it off for aten's operators and ours alike)."""
    # graph capture first: a size comparison on a symbolic size would specialise it (and break a dynamic export)
    if (captures_graph() or x.device.type != "cpu" or weight.dtype != x.dtype or not autocast_allows(x, weight)
            or not torch.backends.mkldnn.enabled or x.numel() < ONEDNN_MIN_ROWS * x.shape[-1]):
        return False
    if x.dtype == torch.float32:
        return onednn_products_are_faster()
    return x.dtype == torch.bfloat16 and onednn_runs_bfloat16_products()


# rows from which `onednn_linear` first packs the weight into oneDNN's blocked layout (one reorder, ~0.1 ms): given
# the plain `[N, K]` weight, oneDNN's product re-lays-out parts of it for every block of rows, which for long products
# costs more than packing it once. On the AMD EPYC Zen 5 `[20097, 256] x [256, 256]` 3.95 -> 3.11 ms in bfloat16
# (packing included), 7.3 -> 7.2 ms in float32; below ~4000 rows packing costs as much as it saves. Same values.
ONEDNN_PACK_MIN_ROWS = 4096


def onednn_packed_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` `[N, K]` packed into oneDNN's blocked layout for products of about `rows` rows: an opaque oneDNN tensor
    (`is_mkldnn`) that `onednn_linear` takes in place of the weight, for the same values. A caller that runs several
    products with one weight (the encoder's feed-forward chunks) packs it once."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"):
    """`F.linear(x, weight, bias)`, followed by ReLU with `activation="relu"`, as oneDNN's product: `[..., K]` x
    `weight` `[N, K]` (+ `bias` `[N]`) -> `[..., N]`, a new tensor. `weight` may come packed (`onednn_packed_weight`);
    a plain one is packed first for products of at least `ONEDNN_PACK_MIN_ROWS` rows. Not differentiable: see
    `onednn_linear_applies`."""
    rows = x.numel() // x.shape[-1]
    if rows >= ONEDNN_PACK_MIN_ROWS and not weight.is_mkldnn:
        weight = onednn_packed_weight(weight, rows)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], "")


class DinoLinear(nn.Linear):
    """`nn.Linear` (the same parameters, state dict and initialisation) whose CPU inference runs the product on oneDNN
    where `onednn_linear_applies` (float32 where that library is the faster one, bfloat16 where aten uses it anyway):
    the token-wise products of the deformable attention, of the encoder's and decoder's feed-forward blocks and of the
    query selection's heads; under CPU autocast to bfloat16 on the operands cast as autocast casts `F.linear`'s
    (`autocast_operands`), for the same bfloat16 result. With autograd on any input (training; running the forward and
    the input's gradient on oneDNN there gained nothing measurable), float16, other devices, graph capture and export
    it is `nn.Linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        differentiable = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or (
            self.bias is not None and self.bias.requires_grad))
        if not differentiable:
            operands = autocast_operands(x, self.weight, self.bias)
            if onednn_linear_applies(operands[0], operands[1]):
                return onednn_linear(*operands)
        return F.linear(x, self.weight, self.bias)


# ------------------------------------------------------------------------------------------------------------------
# Deformable attention, encoder, decoder
# ------------------------------------------------------------------------------------------------------------------
class DinoMultiscaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR): every query samples `n_points` locations per head and
    level around its reference, and mixes them with softmax weights over levels x points."""

    def __init__(self, config: DinoConfig, num_heads: int, n_points: int):
        super().__init__()
        self.d_model = config.d_model
        self.n_levels = config.num_feature_levels
        self.n_heads = num_heads
        self.n_points = n_points
        self.disable_custom_kernels = config.disable_custom_kernels
        self.sampling_offsets = DinoLinear(self.d_model, num_heads * self.n_levels * n_points * 2)
        self.attention_weights = DinoLinear(self.d_model, num_heads * self.n_levels * n_points)
        self.value_proj = DinoLinear(self.d_model, self.d_model)
        self.output_proj = DinoLinear(self.d_model, self.d_model)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask: torch.Tensor,
        spatial_shapes: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            query: `[B, Q, D]` (position already added).
            reference_points: `[B, Q, L, 2]` points (x, y) or `[B, Q, L, 4]` boxes (cx, cy, w, h), normalized to
                each level's padded map.
            value: `[B, S, D]` flattened multi-scale memory; value_padding_mask: `[B, S]` (True = padding).
            spatial_shapes: `[L, 2]` (h, w); spatial_shapes_list: the same sizes as Python ints (symbolic sizes under
                `torch.export`), so that no size is read back from a tensor; level_start_index: `[L]`.
        Returns: `[B, Q, D]`.
        """
        b, q, _ = query.shape
        # the projection as a 2-d product, so that its output is a tensor of its own (not a view) and the padding
        # can be zeroed in place (the product's backward does not read its output): no 40 MB copy per layer
        tokens = value.shape[1]
        value = self.value_proj(value.reshape(b * tokens, -1))
        # on the CPU an image without padding (batch 1) skips the pass (a GPU would wait for the answer)
        if captures_graph() or value.device.type != "cpu" or value_padding_mask.any():
            value.masked_fill_(value_padding_mask.reshape(-1, 1), 0.0)
        value = value.view(b, tokens, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, q, self.n_heads, self.n_levels, self.n_points, 2)
        logits = self.attention_weights(query).view(b, q, self.n_heads, self.n_levels, self.n_points)
        kernels = compiled_kernels()
        if (reference_points.shape[-1] == 2 and not torch.is_grad_enabled() and not captures_graph()
                and not self.disable_custom_kernels and kernels is not None
                and kernels.ms_deform_attn_from_offsets_usable(value, offsets, logits)):
            # at inference on the CPU the kernel computes the locations of `sampling_locations` and the softmax
            # below itself, a block of (query, head)s at a time in cache, without the [B, Q, H, L, P, 2] locations
            # and [B, Q, H, L, P] float32 weights (30 MB per encoder layer of an 800x1201 image, written and read
            # back): whole forward, float32 1.97 -> 1.88 s and bfloat16 0.94 -> 0.91 s for the locations, the
            # softmax ~2 ms per encoder layer more
            output = kernels.ms_deform_attn_from_offsets(value, spatial_shapes, level_start_index, reference_points,
                                                         offsets, logits)
        else:
            # a 16-bit model's weights in float32, which both attention paths sum in (a bfloat16 softmax over 16
            # values is 3x slower on the CPU than a float32 one, and rounds the weights)
            weights = logits.view(b, q, self.n_heads, self.n_levels * self.n_points)
            weights = weights.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
            weights = weights.view(b, q, self.n_heads, self.n_levels, self.n_points)
            locations = self.sampling_locations(reference_points, offsets, spatial_shapes)
            output = multi_scale_deformable_attention(
                value, spatial_shapes, level_start_index, locations, weights, spatial_shapes_list=spatial_shapes_list,
                use_custom_kernel=not self.disable_custom_kernels,
            )
        return self.output_proj(output)

    def sampling_locations(self, reference_points: torch.Tensor, offsets: torch.Tensor,
                           spatial_shapes: torch.Tensor) -> torch.Tensor:
        """Where every head samples: `[B, Q, H, L, P, 2]` (x, y), normalized, in the reference points' dtype (float32
        in a 16-bit model). reference_points `[B, Q, L, 2]` points: plus `offsets` `[B, Q, H, L, P, 2]` in pixels of
        each level, / (w_l, h_l); `[B, Q, L, 4]` boxes: the box centre plus offsets / P * half the box size."""
        b, q = offsets.shape[:2]
        levels_points = self.n_levels * self.n_points * 2
        offsets = offsets.view(b, q, self.n_heads, levels_points)
        if reference_points.shape[-1] == 4:
            # centre + offset / P * size * 0.5 with the centres and sizes as rows of levels x points x 2 broadcast
            # over the heads (as below): the same operations on the same values as the 6-d broadcast, which took
            # 1.3 ms per decoder layer on the CPU against 0.4 ms
            center, size = (
                part[:, :, :, None].expand(-1, -1, -1, self.n_points, -1).reshape(b, q, 1, levels_points)
                for part in reference_points.split(2, -1)
            )
            steps = offsets / self.n_points  # in the offsets' dtype (a 16-bit model rounds it there), then widened
            locations = steps.to(torch.promote_types(steps.dtype, center.dtype)) * size * 0.5 + center
            return locations.view(b, q, self.n_heads, self.n_levels, self.n_points, 2)
        # reference + offset / (w_l, h_l), written so that both broadcasts run over one outer dimension
        # (the plain 6-d broadcast is several times slower on CPU); same arithmetic, same rounding
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(reference_points.dtype)
        normalizer = normalizer[:, None, :].expand(-1, self.n_points, -1).reshape(levels_points)
        reference = reference_points[:, :, :, None, :].expand(-1, -1, -1, self.n_points, -1).reshape(b, q, 1, levels_points)
        if offsets.dtype == reference.dtype:
            locations = torch.addcdiv(reference, offsets, normalizer)
        else:
            # a 16-bit model's offsets widened to the (float32) reference, then divided and shifted in place: the
            # same arithmetic as addcdiv on the widened offsets (aten's addcdiv over mixed dtypes converts element
            # by element, 9 ms per encoder layer on the CPU), without writing a second fresh 20 MB tensor
            locations = offsets.to(reference.dtype).div_(normalizer).add_(reference)
        return locations.view(b, q, self.n_heads, self.n_levels, self.n_points, 2)


def residual_layer_norm(norm: nn.LayerNorm, residual: torch.Tensor, update: torch.Tensor, dropout: nn.Dropout,
                        use_custom_kernel: bool = True) -> torch.Tensor:
    """`norm(residual + dropout(update))`: a post-norm layer's residual connection and LayerNorm, `[..., D]` ->
    `[..., D]`.

    At inference (no autograd, dropout not acting, eager, no hooks on `norm` or `dropout`, a plain `nn.LayerNorm`
    over the last dimension with weight and bias) on a CPU with AVX-512, float32 or bfloat16 (or a float32 residual
    plus a bfloat16 update, under CPU autocast), it is the CPU extension's `residual_layer_norm`: the sum rounded as
    the add rounds it, then normalised in float32 with the sums in another order than aten's (within a few float32
    ulps), in one pass over the rows instead of an add and a LayerNorm over `[B, S, D]` in memory; aten's bfloat16
    LayerNorm is also slower than its float32 one there. The encoder's twelve of an 800x1201 image, Zen 5: 58-62 ->
    28-30 ms a forward in float32, 29-33 -> 19-21 ms in bfloat16 (the decoder's eighteen 4.5-5.3 -> 3.4-3.8 and
    3.2-4.4 -> 2.5-3.2 ms). `use_custom_kernel=False` (`DinoConfig.disable_custom_kernels`) keeps aten's."""
    kernels = compiled_kernels()
    if (use_custom_kernel and not torch.is_grad_enabled() and not captures_graph() and kernels is not None
            and type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
            and not (dropout.training and dropout.p > 0) and not has_hooks((norm, dropout))
            and kernels.residual_layer_norm_usable(residual, update, norm.weight, norm.bias)):
        return kernels.residual_layer_norm(residual, update, norm.weight, norm.bias, norm.eps)
    return norm(residual + dropout(update))


# tokens per chunk of the encoder's feed-forward block (`DinoEncoderLayer.feed_forward`): the `[chunk, ffn_dim]`
# intermediate is 8 MB in float32
ENCODER_FFN_CHUNK_TOKENS = 1024


class DinoReluFeedForwardInChunks(torch.autograd.Function):
    """`linear2(relu(linear1(x)))` on a token matrix `[tokens, D]` -> `[tokens, D]`, computed `chunk_size` tokens at a
    time, keeping only `x` and the weights for the backward pass.

    The backward pass recomputes each chunk's `relu(linear1(x))` (one matrix product) and takes the five products of
    the block's backward from it. `torch.utils.checkpoint` around the plain block would recompute the whole chunk,
    `linear2` included: one product more per chunk, for nothing. Weight and bias gradients are summed over the chunks
    in order, straight into one buffer each. The `[chunk_size, F]` intermediates live in buffers allocated once per
    call and reused by every chunk (a fresh 8 MB tensor per chunk and product costs page faults). Differentiable once
    (no double backward).

    Where `onednn_linear_applies` to the call's tokens (float32 on AMD and AVX2-only CPUs, bfloat16 on AVX-512 ones:
    the bias and ReLU fused into the product instead of aten's `addmm` + `relu_`), the forward products, the
    recomputation and the backward's `grad @ W2` and `grad^T @ hidden` run on oneDNN (on the AMD EPYC Zen 3:
    `[1024, 256] x [256, 2048]` 11-15 vs 13-16 ms, `[256, 1024] x [1024, 2048]` 11-12 vs 19 ms; the block's forward +
    backward over 40394 tokens 3.05 -> 2.95 s and 2.93 -> 2.86 s in two A/B runs), and `grad_hidden^T @ x` and
    `grad_hidden @ W1` too where `onednn_runs_every_feed_forward_product` (AVX-512), on aten's BLAS otherwise.
    oneDNN's products return new tensors instead of filling the buffers; glibc hands the same memory back chunk after
    chunk (the block's page faults are the same either way).

    With `rows` (`[K]` int64 indices) only those tokens go through the block: each chunk of rows is gathered into a
    buffer and its result written back to its rows; the other rows of the output (and of the tokens' gradient) are
    zeros and add nothing to the weights' gradients. Gathering chunk by chunk costs a copy of the rows in cache, where
    gathering all rows first and scattering the result back would cost four passes over `[tokens, D]` in memory.
    """

    @staticmethod
    def forward(
        ctx,
        tokens: torch.Tensor,
        weight1: torch.Tensor,
        bias1: torch.Tensor,
        weight2: torch.Tensor,
        bias2: torch.Tensor,
        chunk_size: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens `[N, D]`; `linear1`'s weight `[F, D]` and bias `[F]`; `linear2`'s weight `[D, F]` and bias `[D]`;
        rows `[K]` or None (all) -> `[N, D]`."""
        count = tokens.shape[0] if rows is None else rows.shape[0]
        size = min(chunk_size, count)
        output = tokens.new_empty(tokens.shape[0], weight2.shape[0]) if rows is None else tokens.new_zeros(
            tokens.shape[0], weight2.shape[0])
        onednn = onednn_linear_applies(tokens, weight1)  # its products return new tensors: no buffers for them
        if onednn:  # packed once for all the chunks (the weights saved for the backward stay the parameters)
            packed1, packed2 = onednn_packed_weight(weight1, size), onednn_packed_weight(weight2, size)
        hidden_buffer = None if onednn else tokens.new_empty(size, weight1.shape[0])
        row_buffer = None if rows is None else tokens.new_empty(size, tokens.shape[1])
        result_buffer = None if rows is None or onednn else tokens.new_empty(size, weight2.shape[0])
        for start in range(0, count, chunk_size):
            chunk = DinoReluFeedForwardInChunks.chunk_rows(tokens, rows, start, chunk_size, row_buffer)
            hidden = DinoReluFeedForwardInChunks.hidden(chunk, packed1 if onednn else weight1, bias1, hidden_buffer)
            if onednn:
                result = onednn_linear(hidden, packed2, bias2)
                if rows is None:
                    output[start : start + chunk_size] = result
            elif rows is None:
                torch.addmm(bias2, hidden, weight2.t(), out=output[start : start + chunk_size])
            else:
                result = torch.addmm(bias2, hidden, weight2.t(), out=result_buffer[: chunk.shape[0]])
            if rows is not None:
                output.index_copy_(0, rows[start : start + chunk_size], result)
        ctx.save_for_backward(tokens, weight1, bias1, weight2, rows)
        ctx.chunk_size = chunk_size
        ctx.onednn = onednn
        return output

    @staticmethod
    def chunk_rows(source: torch.Tensor, rows: torch.Tensor | None, start: int, chunk_size: int,
                   buffer: torch.Tensor | None) -> torch.Tensor:
        """Chunk `start // chunk_size` of `source`'s rows: a slice, or with `rows` those rows gathered into `buffer`."""
        if rows is None:
            return source[start : start + chunk_size]
        index = rows[start : start + chunk_size]
        return torch.index_select(source, 0, index, out=buffer[: index.shape[0]])

    @staticmethod
    def hidden(chunk: torch.Tensor, weight1: torch.Tensor, bias1: torch.Tensor,
               buffer: torch.Tensor | None) -> torch.Tensor:
        """`relu(chunk @ weight1.T + bias1)` `[rows, F]`, in the first rows of `buffer` (`[chunk_size, F]`) or, without
        one (`onednn_linear_applies` to all the call's tokens), a new tensor from oneDNN's product, which applies the
        bias and the ReLU (`weight1` plain or packed by `onednn_packed_weight`). With a buffer, in float32/float64:
        the product, then the bias and the ReLU in one pass (`addmm` would first copy the broadcast bias into it, and
        `relu_` make a second pass; same values); aten's fused add + ReLU has no 16-bit kernel."""
        if buffer is None:
            return onednn_linear(chunk, weight1, bias1, "relu")
        out = buffer[: chunk.shape[0]]
        if out.dtype in (torch.float32, torch.float64):
            return torch.ops.aten._add_relu_(torch.mm(chunk, weight1.t(), out=out), bias1)
        return torch.addmm(bias1, chunk, weight1.t(), out=out).relu_()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        tokens, weight1, bias1, weight2, rows = ctx.saved_tensors
        needs_tokens, needs_weight1, needs_bias1, needs_weight2, needs_bias2 = ctx.needs_input_grad[:5]
        grad_output = grad_output.contiguous()
        count = tokens.shape[0] if rows is None else rows.shape[0]
        size = min(ctx.chunk_size, count)
        if needs_tokens:
            grad_tokens = torch.empty_like(tokens) if rows is None else torch.zeros_like(tokens)
        else:
            grad_tokens = None
        grad_weight1 = torch.zeros_like(weight1) if needs_weight1 else None
        grad_bias1 = torch.zeros_like(bias1) if needs_bias1 else None
        grad_weight2 = torch.zeros_like(weight2) if needs_weight2 else None
        if needs_bias2:
            grad_bias2 = grad_output.sum(0) if rows is None else torch.zeros_like(grad_output[0])
        else:
            grad_bias2 = None
        onednn = ctx.onednn  # the forward's choice of library; oneDNN's products return new tensors: no buffers
        onednn_all = onednn and onednn_runs_every_feed_forward_product()  # `grad_hidden @ W1`, `grad_hidden^T @ x`
        hidden_buffer = None if onednn else tokens.new_empty(size, weight1.shape[0])
        grad_hidden_buffer = None if onednn else tokens.new_empty(size, weight1.shape[0])
        row_buffer = None if rows is None else tokens.new_empty(size, tokens.shape[1])
        grad_row_buffer = None if rows is None else tokens.new_empty(size, grad_output.shape[1])
        result_buffer = None if rows is None or not needs_tokens or onednn_all else tokens.new_empty(
            size, tokens.shape[1])
        weight2_t = weight2.t().contiguous() if onednn else None  # `[F, D]`: oneDNN's `grad @ weight2` operand
        weight1_t = weight1.t().contiguous() if onednn_all and needs_tokens else None  # `[D, F]`: of `grad_hidden @ W1`
        for start in range(0, count, ctx.chunk_size):
            chunk = DinoReluFeedForwardInChunks.chunk_rows(tokens, rows, start, ctx.chunk_size, row_buffer)
            grad_chunk = DinoReluFeedForwardInChunks.chunk_rows(
                grad_output, rows, start, ctx.chunk_size, grad_row_buffer)
            hidden = DinoReluFeedForwardInChunks.hidden(chunk, weight1, bias1, hidden_buffer)
            if needs_weight2:
                if onednn:
                    grad_weight2 += onednn_linear(grad_chunk.t(), hidden.t(), None)
                else:
                    grad_weight2.addmm_(grad_chunk.t(), hidden)
            if needs_bias2 and rows is not None:
                grad_bias2 += grad_chunk.sum(0)
            if onednn:
                grad_hidden = onednn_linear(grad_chunk, weight2_t, None)
            else:
                grad_hidden = torch.mm(grad_chunk, weight2, out=grad_hidden_buffer[: chunk.shape[0]])
            # ReLU's gradient, in place
            torch.ops.aten.threshold_backward.grad_input(grad_hidden, hidden, 0.0, grad_input=grad_hidden)
            if needs_bias1:
                grad_bias1 += grad_hidden.sum(0)
            if needs_weight1:
                if onednn_all:
                    grad_weight1 += onednn_linear(grad_hidden.t(), chunk.t(), None)
                else:
                    grad_weight1.addmm_(grad_hidden.t(), chunk)
            if needs_tokens:
                if onednn_all:
                    result = onednn_linear(grad_hidden, weight1_t, None)
                elif rows is None:
                    result = torch.mm(grad_hidden, weight1, out=grad_tokens[start : start + ctx.chunk_size])
                else:
                    result = torch.mm(grad_hidden, weight1, out=result_buffer[: chunk.shape[0]])
                if rows is not None:
                    grad_tokens.index_copy_(0, rows[start : start + ctx.chunk_size], result)
                elif onednn_all:
                    grad_tokens[start : start + ctx.chunk_size] = result
        grads = (grad_tokens, grad_weight1, grad_bias1, grad_weight2, grad_bias2)
        return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))  # chunk_size (and rows, when given)


class DinoEncoderLayer(GradientCheckpointingLayer):
    """Deformable self-attention over all levels' tokens, then a feed-forward block (post-norm)."""

    def __init__(self, config: DinoConfig):
        super().__init__()
        self.self_attn = DinoMultiscaleDeformableAttention(config, config.encoder_attention_heads, config.encoder_n_points)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.linear1 = DinoLinear(config.d_model, config.encoder_ffn_dim)
        self.linear2 = DinoLinear(config.encoder_ffn_dim, config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.activation = feed_forward_activation(config.activation_function)
        self.dropout = nn.Dropout(config.dropout)
        self.disable_custom_kernels = config.disable_custom_kernels

    def forward(self, hidden_states, position_embeddings, reference_points, padding_mask, spatial_shapes,
                spatial_shapes_list, level_start_index):
        """hidden_states, position_embeddings: `[B, S, D]`; reference_points `[B, S, L, 2]`; padding_mask `[B, S]`."""
        attended = self.self_attn(
            hidden_states + position_embeddings, reference_points, hidden_states, padding_mask, spatial_shapes,
            spatial_shapes_list, level_start_index,
        )
        kernel = not self.disable_custom_kernels
        hidden_states = residual_layer_norm(self.norm1, hidden_states, attended, self.dropout, kernel)
        return residual_layer_norm(self.norm2, hidden_states, self.feed_forward(hidden_states, padding_mask),
                                   self.dropout, kernel)

    def feed_forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`linear2(dropout(activation(linear1(x))))`, `[B, S, D]` -> `[B, S, D]`, each token on its own;
        padding_mask `[B, S]` (True = padding) or None.

        In training, on the CPU, in eager mode, only the tokens that are not padding go through the block; the
        padding tokens' rows of the result are zeros. Nothing reads a padding token's encoder state: the next layer's
        value projection and the query selection zero it, and the decoder's cross-attention masks it. So the loss,
        every gradient and every output but those rows are the same, and a batch of differently sized images (a
        portrait next to a landscape photo pads a third of the canvas) skips that share of the encoder's largest
        products. Only the padding rows of `encoder_last_hidden_state` and of the encoder's hidden states differ from
        the original's; in eval mode they are computed as the original does (the parity fixtures check them).

        The tokens go through in chunks of `ENCODER_FFN_CHUNK_TOKENS`. The whole
        `[B * S, ffn_dim]` intermediate (330 MB per layer for two 800x1213 images) would be freshly mapped and written
        to memory at every layer, and in training kept for the backward pass (2 GB over six layers); a chunk's (8 MB)
        is reused by the allocator and stays in cache. Under autograd the intermediate is not kept: the backward pass
        recomputes it chunk by chunk (one more `linear1` per chunk). DINO's block (ReLU, no dropout in action, no
        autocast, or CPU autocast to bfloat16 at inference on operands cast as autocast casts them) runs as
        `DinoReluFeedForwardInChunks`; any other as `torch.utils.checkpoint` of the plain block per
        chunk. The outputs are the same (rows are independent), the gradients the same sums in chunk order. Graph
        capture (tracing, `torch.compile`, export), GPUs (no page faults to avoid; fewer, larger kernels are
        faster; `gradient_checkpointing_enable()` saves memory there) and hooks on the block's modules (they see the
        whole tensor, once) run the plain block. Replaced modules (an adapter's wrapped `linear1`, a quantized
        linear) are called, chunk by chunk: only plain `nn.Linear`s and `nn.ReLU` run as the fused function."""
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        modules = (self.linear1, self.activation, self.dropout, self.linear2)
        if (captures_graph() or tokens.device.type != "cpu" or tokens.shape[0] <= ENCODER_FFN_CHUNK_TOKENS
                or has_hooks(modules)):
            return self.feed_forward_block(tokens).view_as(hidden_states)
        rows = None if padding_mask is None or not self.training else (~padding_mask).reshape(-1).nonzero().squeeze(1)
        if rows is not None and rows.numel() == tokens.shape[0]:
            rows = None
        return self.feed_forward_in_chunks(tokens, rows).view_as(hidden_states)

    def feed_forward_in_chunks(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The feed-forward block on a token matrix, `[tokens, D]` -> `[tokens, D]`, `ENCODER_FFN_CHUNK_TOKENS` at a
        time, on the tokens `rows` (`[K]` int64; the other rows of the result are zeros) or on all (see
        `feed_forward`)."""
        modules = (self.linear1, self.activation, self.dropout, self.linear2)
        plain = [type(module) for module in modules] == [DinoLinear, nn.ReLU, nn.Dropout, DinoLinear]
        dropout_acts = self.training and self.dropout.p > 0
        # under CPU autocast only at inference, on the bfloat16 operands autocast would hand `F.linear`
        if plain and not dropout_acts and not (torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()):
            operands = autocast_operands(tokens, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                         self.linear2.bias)
            if autocast_allows(*operands):
                return DinoReluFeedForwardInChunks.apply(*operands, ENCODER_FFN_CHUNK_TOKENS, rows)
        chunks = (tokens if rows is None else tokens.index_select(0, rows)).split(ENCODER_FFN_CHUNK_TOKENS)
        if torch.is_grad_enabled():
            output = torch.cat([checkpoint(self.feed_forward_block, chunk, use_reentrant=False) for chunk in chunks])
        else:
            output = torch.cat([self.feed_forward_block(chunk) for chunk in chunks])
        return output if rows is None else tokens.new_zeros(tokens.shape).index_copy_(0, rows, output)

    def feed_forward_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The plain feed-forward block on a token matrix, `[tokens, D]` -> `[tokens, D]`."""
        return self.linear2(self.dropout(self.activation(self.linear1(hidden_states))))


class DinoEncoder(nn.Module):
    def __init__(self, config: DinoConfig):
        super().__init__()
        self.layers = nn.ModuleList(DinoEncoderLayer(config) for _ in range(config.encoder_layers))

    @staticmethod
    def reference_points(spatial_shapes_list: list[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Token centres of every level, normalized by the level's valid size, then scaled to every level:
        `[B, S, L, 2]` (x, y)."""
        points = []
        for level, (h, w) in enumerate(spatial_shapes_list):
            # arange + 0.5 (exactly the values of linspace(0.5, h - 0.5, h); linspace would freeze h under torch.export)
            ref_y, ref_x = torch.meshgrid(
                torch.arange(h, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                torch.arange(w, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, hidden_states, position_embeddings, padding_mask, spatial_shapes, spatial_shapes_list,
                level_start_index, valid_ratios, output_hidden_states: bool = False):
        reference_points = self.reference_points(spatial_shapes_list, valid_ratios)
        all_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, position_embeddings, reference_points, padding_mask, spatial_shapes, spatial_shapes_list,
                level_start_index,
            )
            if output_hidden_states:
                all_states += (hidden_states,)
        return hidden_states, all_states


class DinoDecoderLayer(GradientCheckpointingLayer):
    """Self-attention among queries, deformable cross-attention into the memory, feed-forward (post-norm).

    Names follow the original checkpoint: `norm2` after self-attention, `norm1` after cross-attention.
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = nn.MultiheadAttention(d, config.decoder_attention_heads, dropout=config.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = DinoMultiscaleDeformableAttention(config, config.decoder_attention_heads, config.decoder_n_points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = DinoLinear(d, config.decoder_ffn_dim)
        self.linear2 = DinoLinear(config.decoder_ffn_dim, d)
        self.norm3 = nn.LayerNorm(d)
        self.activation = feed_forward_activation(config.activation_function)
        self.dropout = nn.Dropout(config.dropout)
        self.disable_custom_kernels = config.disable_custom_kernels

    def forward(self, hidden_states, query_position, reference_points, self_attn_mask, memory, memory_padding_mask,
                spatial_shapes, spatial_shapes_list, level_start_index):
        """hidden_states, query_position: `[B, Q, D]`; reference_points `[B, Q, L, 4]`; self_attn_mask `[Q, Q]`
        (True = blocked) or None; memory `[B, S, D]`; memory_padding_mask `[B, S]`."""
        kernel = not self.disable_custom_kernels
        attended = self.self_attention(hidden_states + query_position, hidden_states, self_attn_mask)
        hidden_states = residual_layer_norm(self.norm2, hidden_states, attended, self.dropout, kernel)
        attended = self.cross_attn(
            hidden_states + query_position, reference_points, memory, memory_padding_mask, spatial_shapes,
            spatial_shapes_list, level_start_index,
        )
        hidden_states = residual_layer_norm(self.norm1, hidden_states, attended, self.dropout, kernel)
        tokens = hidden_states.flatten(0, 1)  # a 2-D token matrix (see `feed_forward_activation`)
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tokens)))).view_as(hidden_states)
        return residual_layer_norm(self.norm3, hidden_states, ffn, self.dropout, kernel)

    def self_attention(self, query_key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None) -> torch.Tensor:
        """`self_attn` (`nn.MultiheadAttention`) with queries = keys = `query_key` `[B, Q, D]` and values `value`
        `[B, Q, D]`; attn_mask `[Q, Q]` (True = blocked) or None. Returns `[B, Q, D]`.

        A bfloat16 model, or CPU autocast to bfloat16, at inference on a CPU with AVX-512 BF16 (no mask: the
        denoising queries' mask exists in training only; no hooks on `self_attn`; eager; custom kernels not disabled)
        takes the module's projections itself and the softmax attention from the CPU extension
        (`bfloat16_attention`: the arithmetic of aten's bfloat16 flash attention, which the module runs there, in
        ~half its time for 900 queries in heads of 32, 7 -> 2-4 ms per layer on Zen 5). Otherwise the module runs."""
        attention = self.self_attn
        kernels = compiled_kernels()
        operand = autocast_operands(query_key)[0]  # bfloat16 under CPU autocast to bfloat16
        if (attn_mask is None and not self.training and not torch.is_grad_enabled() and not captures_graph()
                and not self.disable_custom_kernels and attention.head_dim == 32
                and not has_hooks((attention, attention.out_proj)) and autocast_allows(operand)
                and kernels is not None and kernels.bfloat16_attention_usable(operand)):
            d, weight, bias = attention.embed_dim, attention.in_proj_weight, attention.in_proj_bias
            # queries and keys from one product (rows [0, 2d) of the packed projection), values from the last d rows
            query, key = F.linear(query_key, weight[: 2 * d], bias[: 2 * d]).split(d, -1)
            value = F.linear(value, weight[2 * d :], bias[2 * d :])
            return attention.out_proj(kernels.bfloat16_attention(query, key, value, attention.num_heads))
        return attention(query_key, query_key, value, attn_mask=attn_mask, need_weights=False)[0]


class DinoDecoder(nn.Module):
    """Decoder with iterative anchor-box refinement and "look forward twice".

    Layer l refines its anchor `a_l` to `b_l = sigmoid(bbox_embed(h_l) + inverse_sigmoid(a_l))`. The next layer
    starts from `a_{l+1} = b_l.detach()`, but layer l+1's *prediction* is made on top of the undetached `b_l`, so
    its box loss also trains layer l (the paper's "look forward twice", Sec. 3.5). Layer l's own prediction uses
    the layer output after the final LayerNorm: `sigmoid(bbox_embed(norm(h_l)) + inverse_sigmoid(a_l))`.
    """

    def __init__(self, config: DinoConfig):
        super().__init__()
        d = config.d_model
        self.layers = nn.ModuleList(DinoDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layer_norm = nn.LayerNorm(d)
        self.reference_point_head = DinoMLPPredictionHead(2 * d, d, d, 2)
        self.sine_features = d // 2  # per box coordinate: 4 * d / 2 = 2 * d inputs of reference_point_head
        # one box head shared by all layers, as in the original
        self.bbox_embed = DinoMLPPredictionHead(d, d, 4, 3)

    def forward(self, hidden_states, reference_points_logit, self_attn_mask, memory, memory_padding_mask,
                spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios, output_hidden_states: bool = False):
        """
        Args:
            hidden_states: `[B, Q, D]` content queries; reference_points_logit: `[B, Q, 4]` anchors before sigmoid.
        Returns:
            states `[B, L, Q, D]` (after the final LayerNorm), pred_boxes `[B, L, Q, 4]`,
            references `[B, L + 1, Q, 4]` (anchors entering each layer, then the last refined ones),
            all hidden states (tuple) if asked.
        """
        anchors = reference_points_logit.sigmoid()
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        states, boxes, references = [], [], [anchors]
        all_states = (hidden_states,) if output_hidden_states else None
        prediction_anchor = anchors  # undetached refined anchor of the previous layer (look forward twice)
        for layer in self.layers:
            anchors_per_level = anchors[:, :, None] * scale
            sine = box_sine_embedding(anchors_per_level[:, :, 0], self.sine_features).to(hidden_states.dtype)
            query_position = self.reference_point_head(sine)
            hidden_states = layer(
                hidden_states, query_position, anchors_per_level, self_attn_mask, memory, memory_padding_mask,
                spatial_shapes, spatial_shapes_list, level_start_index,
            )
            if output_hidden_states:
                all_states += (hidden_states,)
            normed = self.layer_norm(hidden_states)
            states.append(normed)
            boxes.append((self.bbox_embed(normed) + inverse_sigmoid(prediction_anchor)).sigmoid())
            refined = (self.bbox_embed(hidden_states) + inverse_sigmoid(anchors)).sigmoid()
            references.append(refined)
            prediction_anchor = refined
            anchors = refined.detach()
        return torch.stack(states, 1), torch.stack(boxes, 1), torch.stack(references, 1), all_states


# ------------------------------------------------------------------------------------------------------------------
# Pretrained base, model, detection head
# ------------------------------------------------------------------------------------------------------------------
class DinoPreTrainedModel(PreTrainedModel):
    config_class = DinoConfig
    config: DinoConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = [r"DinoEncoderLayer", r"DinoDecoderLayer", r"DinoSwinBlock"]
    # The query-selection heads stay float32 when `from_pretrained` loads the model in 16 bits (as transformers' MoE
    # models keep their routers): the top-K choice among encoder tokens whose scores differ in the third digit is
    # what 16-bit rounding of these weights would change (see `DinoModel.select_queries`). Matches enc_output,
    # enc_output_norm, enc_out_class_embed and enc_out_bbox_embed.
    _keep_in_fp32_modules_strict = [r"enc_out"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then two repairs of what transformers' loading leaves:

        - the ResNet stem and layer1 frozen again (`DinoBackbone.freeze_stem`), as in a model built from its config:
          loading makes every floating-point parameter trainable, and fine-tuning would train them, which DINO never
          does;
        - in a 16-bit model, the query-selection heads in float32 (`_keep_in_fp32_modules_strict`) also where they
          were re-initialised for a new label set (`num_labels=..., ignore_mismatched_sizes=True` created
          `enc_out_class_embed` in 16 bits next to a float32 `enc_output`: the forward pass failed).
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info
        for module in model.modules():
            if isinstance(module, DinoBackbone):
                module.freeze_stem()
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            for name, module in model.named_modules():
                if any(pattern in name for pattern in cls._keep_in_fp32_modules_strict):
                    module.float()
        return loaded

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers treats models defined outside the library as "custom code" and then skips every module that
        # owns no parameter itself (the attention modules, the detection head) so that remote code writing tensors
        # in place cannot overwrite loaded weights. `_init_weights` below only uses `transformers.initialization`,
        # which already leaves loaded tensors alone, so every module is visited.
        super()._initialize_weights(module, is_custom_code=False)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        prior_bias = -math.log((1 - 0.01) / 0.01)  # focal-loss prior p = 0.01
        if isinstance(module, DinoMultiscaleDeformableAttention):
            init.constant_(module.sampling_offsets.weight, 0.0)
            thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)
            grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
            grid = grid.repeat(1, module.n_levels, module.n_points, 1)
            grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
            init.copy_(module.sampling_offsets.bias, grid.flatten())
            init.constant_(module.attention_weights.weight, 0.0)
            init.constant_(module.attention_weights.bias, 0.0)
            for proj in (module.value_proj, module.output_proj):
                init.xavier_uniform_(proj.weight)
                init.constant_(proj.bias, 0.0)
        elif isinstance(module, DinoSwinWindowAttention):
            init.trunc_normal_(module.relative_position_bias_table, std=0.02)
            init.copy_(module.relative_position_index, module.position_index(module.window_size))
        elif isinstance(module, (DinoEncoderLayer, DinoDecoderLayer)):
            for sub in (module.linear1, module.linear2):
                init.xavier_uniform_(sub.weight)
                init.constant_(sub.bias, 0.0)
        elif isinstance(module, DinoModel):
            init.normal_(module.level_embed)
            init.normal_(module.content_query_embed.weight)
            init.normal_(module.denoising_class_embed.weight)
            for projection in module.input_projections:
                init.xavier_uniform_(projection[0].weight)
                init.constant_(projection[0].bias, 0.0)
            init.constant_(module.enc_out_class_embed.bias, prior_bias)
            init.constant_(module.enc_out_bbox_embed.layers[-1].weight, 0.0)
            init.constant_(module.enc_out_bbox_embed.layers[-1].bias, 0.0)
            init.constant_(module.decoder.bbox_embed.layers[-1].weight, 0.0)
            init.constant_(module.decoder.bbox_embed.layers[-1].bias, 0.0)
        elif isinstance(module, DinoForObjectDetection):
            init.constant_(module.class_embed.bias, prior_bias)


class DinoModel(DinoPreTrainedModel):
    """DINO without the decoder class head: backbone, encoder, query selection, decoder (with the shared box
    head it needs for anchor refinement)."""

    def __init__(self, config: DinoConfig):
        config.check_consistency()
        super().__init__(config)
        d = config.d_model
        self.backbone = DinoBackbone(config)
        self.position_embedding = DinoSinePositionEmbedding(d // 2, config.position_embedding_temperature)
        projections = [
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in config.backbone_channels
        ]
        in_channels = config.backbone_channels[-1]
        for _ in range(config.num_feature_levels - len(config.backbone_channels)):
            projections.append(nn.Sequential(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
            in_channels = d
        self.input_projections = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, d))
        self.encoder = DinoEncoder(config)
        # query selection ("two-stage"): every encoder token proposes a box; the top-K become the anchors
        self.enc_output = DinoLinear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_class_embed = DinoLinear(d, config.num_labels)
        self.enc_out_bbox_embed = DinoMLPPredictionHead(d, d, 4, 3)
        # learnable content queries (mixed query selection keeps them static)
        self.content_query_embed = nn.Embedding(config.num_queries, d)
        # label embedding of the contrastive denoising queries (one extra row, as the original's label book)
        self.denoising_class_embed = nn.Embedding(config.num_labels + 1, d)
        self.decoder = DinoDecoder(config)
        self.post_init()

    def freeze_backbone(self) -> None:
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)

    # ---- pieces of the forward pass --------------------------------------------------------------------------
    def multi_scale_features(self, pixel_values: torch.Tensor, padding_mask: torch.Tensor):
        """Backbone maps -> projected levels `[B, D, H_l, W_l]`, their padding masks and position embeddings."""
        features = self.backbone(pixel_values, padding_mask)
        sources, masks = [], []
        for level, (feature, mask) in enumerate(features):
            sources.append(self.input_projections[level](feature))
            masks.append(mask)
        for level in range(len(features), self.config.num_feature_levels):
            source = self.input_projections[level](features[-1][0] if level == len(features) else sources[-1])
            sources.append(source)
            masks.append(F.interpolate(padding_mask[None].float(), size=source.shape[-2:])[0].bool())
        positions = [self.position_embedding(mask).to(source.dtype) for source, mask in zip(sources, masks)]
        return sources, masks, positions

    @staticmethod
    def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """Fraction of a level's padded map that is image, `[B, 2]` as (w, h) (first column/row counted)."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    @staticmethod
    def encoder_proposals(padding_mask: torch.Tensor, spatial_shapes_list, dtype: torch.dtype):
        """One proposal box per encoder token: centre = the token, size 0.05 * 2^level (normalized by the level's
        valid size). Returns the proposals in logit space `[B, S, 4]` (+inf where invalid) and `invalid` `[B, S, 1]`:
        padded tokens and boxes not strictly inside (0.01, 0.99), whose memory the query selection zeroes."""
        b = padding_mask.shape[0]
        dtype = torch.promote_types(dtype, torch.float32)  # box geometry: float32 in a 16-bit model
        proposals, start = [], 0
        for level, (h, w) in enumerate(spatial_shapes_list):
            mask = padding_mask[:, start: start + h * w].view(b, h, w)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(h, dtype=dtype, device=padding_mask.device),
                torch.arange(w, dtype=dtype, device=padding_mask.device),
                indexing="ij",
            )
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(b, 1, 1, 2).to(dtype)
            grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale
            size = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, size), -1).view(b, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask.unsqueeze(-1) | ~valid
        return proposals.masked_fill(invalid, float("inf")), invalid

    def select_queries(self, memory: torch.Tensor, padding_mask: torch.Tensor, spatial_shapes_list):
        """Mixed query selection (paper Sec. 3.3): the top-K encoder tokens by best class score give the initial
        anchor boxes; the content queries are the learnable `content_query_embed`, not the selected features.

        Returns anchors in logit space `[B, K, 4]` (detached), the selected tokens' logits `[B, K, C]` and boxes
        `[B, K, 4]` (for the encoder loss) and the selected indices `[B, K]`.
        """
        num_tokens = memory.shape[1]
        if num_tokens < self.config.num_queries:
            raise ValueError(
                f"The image gives {num_tokens} encoder tokens, fewer than num_queries={self.config.num_queries}; "
                "use larger images (the processor resizes to 800 px) or a config with fewer queries."
            )
        proposals, invalid = self.encoder_proposals(padding_mask, spatial_shapes_list, memory.dtype)
        # The heads run in their own weights' dtype, outside autocast: float32 unless the whole model was cast (a
        # 16-bit model from `from_pretrained` keeps them float32, `_keep_in_fp32_modules_strict`). The ranking is a
        # discrete choice among scores that differ in the third digit, which bfloat16 weights or products reorder.
        heads_memory = memory.to(self.enc_output.weight.dtype)
        full_precision = (
            torch.autocast(memory.device.type, enabled=False)
            if torch.is_autocast_enabled(memory.device.type) else contextlib.nullcontext()
        )
        with full_precision:
            # The ranking needs every token's class score; the encoder loss, hence the gradient, only the K selected
            # tokens. So the heads run over all S tokens without autograd, then again, differentiably, on the K
            # selected rows (the same values): the backward pass handles K rows instead of S, and nothing of size S
            # is kept for it. The box head only ever runs on the selected rows.
            with torch.no_grad():
                scores = self.enc_out_class_embed(self.encoder_output(heads_memory.masked_fill(invalid, 0.0)))
                scores = scores.max(-1)[0]
            topk_indices = self.rank_encoder_tokens(scores, self.config.num_queries)
            selected = topk_indices.unsqueeze(-1)
            selected_memory = torch.gather(heads_memory, 1, selected.expand(-1, -1, memory.shape[-1]))
            selected_memory = self.encoder_output(selected_memory.masked_fill(torch.gather(invalid, 1, selected), 0.0))
            selected_logits = self.enc_out_class_embed(selected_memory).to(memory.dtype)
            selected_proposals = torch.gather(proposals, 1, selected.expand(-1, -1, 4))
            selected_boxes_logit = self.enc_out_bbox_embed(selected_memory) + selected_proposals
        return selected_boxes_logit.detach(), selected_logits, selected_boxes_logit.sigmoid(), topk_indices

    def encoder_output(self, memory: torch.Tensor) -> torch.Tensor:
        """The projection of encoder tokens that the query-selection heads read, `[B, N, D]` -> `[B, N, D]`."""
        return self.enc_output_norm(self.enc_output(memory))

    def rank_encoder_tokens(self, scores: torch.Tensor, k: int) -> torch.LongTensor:
        """The query-selection ranking: indices `[B, k]` of the `k` best encoder tokens by `scores` `[B, S]`,
        best first (descending order is the query order). [`forced_query_selection`] replaces this method on one
        instance to replay a recorded selection."""
        return torch.topk(scores, k, dim=1)[1]

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> DinoModelOutput | tuple:
        r"""
        Args:
            pixel_values (`[B, 3, H, W]`): normalized images, zero-padded bottom/right to a common size.
            pixel_mask (`[B, H, W]`, *optional*): 1 for real pixels, 0 for padding (all ones if omitted).
            labels (`list[dict]`, *optional*): per image `class_labels` `[n]` and `boxes` `[n, 4]` (normalized
                cx, cy, w, h); in training mode they feed the contrastive denoising queries. Validated here, once
                per forward pass (`hf_dino.box_ops.check_detection_labels`).
            output_hidden_states (`bool`, *optional*): also return every encoder and decoder layer's states.
            output_attentions: not supported (only `None`/`False`): deformable attention samples a few points per
                query instead of forming an attention matrix, so there are no attention maps to return.

        Unknown keyword arguments raise a `TypeError` (a typo such as `pixel_maks=` must not silently drop an input).
        """
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor [batch, {self.config.num_channels}, height, width], got "
                f"{type(pixel_values).__name__}: prepare images with DinoImageProcessor(..., return_tensors='pt')."
            )
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, height, width], got {tuple(pixel_values.shape)}."
            )
        if pixel_values.numel() == 0:
            raise ValueError(
                f"pixel_values is empty (shape {tuple(pixel_values.shape)}): DINO needs at least one image of at least "
                "one pixel. Skip the forward pass for an empty batch."
            )
        _reject_output_attentions(output_attentions)
        if labels is not None:
            check_detection_labels(labels, self.config.num_labels)
            if len(labels) != pixel_values.shape[0]:
                raise ValueError(f"Got {len(labels)} label dicts for a batch of {pixel_values.shape[0]} images.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states)
        b, _, h, w = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((b, h, w), dtype=torch.long, device=pixel_values.device)
        elif pixel_mask.shape != (b, h, w):
            raise ValueError(f"pixel_mask must be [batch, height, width] = {(b, h, w)}, got {tuple(pixel_mask.shape)}.")
        elif not captures_graph():  # a data-dependent check: not in an exported graph
            check_pixel_mask(pixel_mask)
        padding_mask = ~pixel_mask.bool()
        pixel_values = pixel_values.to(self.dtype)  # a bfloat16 / float16 model takes the processor's float32 output

        # 1. multi-scale features, flattened to tokens
        sources, masks, positions = self.multi_scale_features(pixel_values, padding_mask)
        spatial_shapes_list = [tuple(s.shape[-2:]) for s in sources]
        # built from scalar tensors: `torch.as_tensor(spatial_shapes_list)` would freeze symbolic sizes into constants
        # under torch.export, and one exported graph must serve every image size (hf_dino.export)
        spatial_shapes = torch.stack([
            torch.stack([torch.scalar_tensor(size, dtype=torch.long, device=pixel_values.device) for size in shape])
            for shape in spatial_shapes_list
        ])
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.valid_ratios(m) for m in masks], 1)
        tokens = torch.cat([s.flatten(2).transpose(1, 2) for s in sources], 1)
        token_padding_mask = torch.cat([m.flatten(1) for m in masks], 1)
        # in the tokens' dtype: under autocast the float32 level embedding would make them float32, and every encoder
        # layer would add them to its bfloat16 states in float32 (a mixed-dtype add) and cast the sum back to bfloat16
        # for each of its two query products (bfloat16 autocast on the CPU, 800x1201: ~30 ms a forward)
        token_positions = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1) for level, p in enumerate(positions)], 1
        ).to(tokens.dtype)

        # 2. deformable encoder
        memory, encoder_states = self.encoder(
            tokens, token_positions, token_padding_mask, spatial_shapes, spatial_shapes_list, level_start_index,
            valid_ratios, output_hidden_states,
        )

        # 3. mixed query selection
        anchors_logit, encoder_logits, encoder_boxes, topk_indices = self.select_queries(
            memory, token_padding_mask, spatial_shapes_list
        )
        content = self.content_query_embed.weight.unsqueeze(0).expand(b, -1, -1)

        # 4. contrastive denoising queries (training only), placed before the matching queries
        denoising = None
        if self.training and labels is not None and self.config.num_denoising > 0:
            denoising = build_contrastive_denoising_queries(
                labels, self.config.num_denoising, self.config.label_noise_ratio, self.config.box_noise_scale,
                self.config.num_labels, self.config.num_queries, self.denoising_class_embed,
            )
        attn_mask, num_dn = None, 0
        if denoising is not None:
            num_dn = denoising.content.shape[1]
            content = torch.cat([denoising.content, content], 1)
            anchors_logit = torch.cat([denoising.reference_boxes, anchors_logit], 1)
            attn_mask = denoising.attention_mask.to(pixel_values.device)
        elif self.training:
            # keeps the (unused) label embedding in the graph so distributed training sees a gradient for it
            content = content + self.denoising_class_embed.weight[0, 0] * 0.0

        # 5. decoder with anchor refinement
        states, boxes, references, decoder_states = self.decoder(
            content, anchors_logit, attn_mask, memory, token_padding_mask, spatial_shapes, spatial_shapes_list,
            level_start_index,
            valid_ratios, output_hidden_states,
        )
        output = DinoModelOutput(
            last_hidden_state=states[:, -1, num_dn:],
            intermediate_hidden_states=states[:, :, num_dn:],
            intermediate_pred_boxes=boxes[:, :, num_dn:],
            intermediate_reference_points=references[:, :, num_dn:],
            encoder_last_hidden_state=memory,
            encoder_logits=encoder_logits,
            encoder_pred_boxes=encoder_boxes,
            encoder_topk_indices=topk_indices,
            denoising_hidden_states=states[:, :, :num_dn] if denoising is not None else None,
            denoising_pred_boxes=boxes[:, :, :num_dn] if denoising is not None else None,
            denoising_meta=denoising.meta if denoising is not None else None,
            encoder_hidden_states=encoder_states,
            # the matching queries only, as every other decoder output (the denoising ones lead in training)
            decoder_hidden_states=None if decoder_states is None else tuple(s[:, num_dn:] for s in decoder_states),
        )
        return output if return_dict else output.to_tuple()


class DinoForObjectDetection(DinoPreTrainedModel):
    """DINO with its class head: one Linear shared by all decoder layers (the box head lives in the decoder)."""

    def __init__(self, config: DinoConfig):
        super().__init__(config)
        self.model = DinoModel(config)
        self.class_embed = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def push_to_hub(
        self,
        repo_id: str,
        *,
        image_processor=None,
        metrics: dict[str, float] | None = None,
        base_model: str | None = None,
        dataset_name: str | None = None,
        training_args: dict | None = None,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ):
        """Upload a complete, self-contained repo in one commit (`hf_dino.hub.push_finetuned_model`): safetensors
        weights, config, the image processor (`image_processor`, default `DinoImageProcessor()`), a model card with
        `metrics` (COCO fractions, e.g. from `CocoEvaluator.summarize()`) and the label map, and the remote code, so
        that `pipeline("object-detection", model=repo_id, trust_remote_code=True)` works where hf_dino is not
        installed. `examples/train.py --push-to-hub` produces the same repo. `hf_dino.hub.save_for_hub` writes
        that content into a local folder instead."""
        from .hub import push_finetuned_model

        if image_processor is None:
            from .image_processing_dino import DinoImageProcessor

            image_processor = DinoImageProcessor()
        return push_finetuned_model(
            self, image_processor, repo_id, metrics=metrics, base_model=base_model, dataset_name=dataset_name,
            training_args=training_args, commit_message=commit_message, private=private, token=token,
            revision=revision, create_pr=create_pr,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> DinoObjectDetectionOutput | tuple:
        r"""
        Args:
            pixel_values (`[B, 3, H, W]`), pixel_mask (`[B, H, W]`, 1 = pixel): see [`DinoModel.forward`].
            labels (`list[dict]`, *optional*): per image `class_labels` (int64 `[n]`) and `boxes` (`[n, 4]`,
                normalized cx, cy, w, h, every value in [0, 1]). When given, `loss` and `loss_dict` are returned
                (denoising queries are added in training mode).
            output_hidden_states, output_attentions: see [`DinoModel.forward`] (attention maps are not supported).

        Unknown keyword arguments raise a `TypeError`.

        Example:

        ```python
        >>> from hf_dino import DinoConfig, DinoForObjectDetection, DinoImageProcessor
        >>> model = DinoForObjectDetection(DinoConfig()).eval()
        >>> processor = DinoImageProcessor()
        >>> inputs = processor(images=image, return_tensors="pt")
        >>> outputs = model(**inputs)
        >>> detections = processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=[image.size[::-1]])
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        _reject_output_attentions(output_attentions)
        # labels are validated once, by DinoModel.forward; the denoising queries and the loss take them as they are
        outputs = self.model(pixel_values, pixel_mask, labels, output_hidden_states=output_hidden_states, return_dict=True)
        intermediate_logits = self.class_embed(outputs.intermediate_hidden_states)
        logits, pred_boxes = intermediate_logits[:, -1], outputs.intermediate_pred_boxes[:, -1]
        auxiliary_outputs = [
            {"logits": intermediate_logits[:, i], "pred_boxes": outputs.intermediate_pred_boxes[:, i]}
            for i in range(intermediate_logits.shape[1] - 1)
        ]
        denoising_logits = None
        if outputs.denoising_hidden_states is not None:
            denoising_logits = self.class_embed(outputs.denoising_hidden_states)

        loss = loss_dict = None
        if labels is not None:
            criterion = DinoLoss(self.config)
            loss, loss_dict = criterion(
                {
                    "logits": logits,
                    "pred_boxes": pred_boxes,
                    "auxiliary_outputs": auxiliary_outputs if self.config.auxiliary_loss else None,
                    "encoder_logits": outputs.encoder_logits,
                    "encoder_pred_boxes": outputs.encoder_pred_boxes,
                    "denoising_logits": denoising_logits,
                    "denoising_pred_boxes": outputs.denoising_pred_boxes,
                    "denoising_meta": outputs.denoising_meta,
                },
                labels,
            )
        output = DinoObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            auxiliary_outputs=auxiliary_outputs,
            intermediate_logits=intermediate_logits,
            intermediate_pred_boxes=outputs.intermediate_pred_boxes,
            intermediate_reference_points=outputs.intermediate_reference_points,
            encoder_logits=outputs.encoder_logits,
            encoder_pred_boxes=outputs.encoder_pred_boxes,
            encoder_topk_indices=outputs.encoder_topk_indices,
            denoising_logits=denoising_logits,
            denoising_pred_boxes=outputs.denoising_pred_boxes,
            denoising_meta=outputs.denoising_meta,
            last_hidden_state=outputs.last_hidden_state,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            decoder_hidden_states=outputs.decoder_hidden_states,
        )
        return output if return_dict else output.to_tuple()


@dataclass
class ForcedSelectionRecord:
    """What [`forced_query_selection`] saw: `calls` (rankings replaced) and `own` (`[B, K]`, the selection the model
    would have made itself in the last call)."""

    calls: int = 0
    own: torch.LongTensor | None = None


@contextlib.contextmanager
def forced_query_selection(model: nn.Module, indices: torch.Tensor) -> Iterator[ForcedSelectionRecord]:
    """Replay a recorded query selection on ONE model instance: while active, `DinoModel.rank_encoder_tokens` of
    `model` (a [`DinoModel`] or a model holding one as `.model`) returns `indices` `[B, K]` instead of the top-K of
    its own encoder scores. Nothing else (other instances, `torch.topk`, other threads) is affected.

    Why: encoder scores that tie to ~1e-6 can come out in another order under other float arithmetic (threads, CPU
    kernels, exported graphs), and one swap changes whole queries. Comparisons with a reference run (the parity
    tests, `conversion/verify.py`, exports) force the reference's selection so that the rest of the network is
    compared on equal inputs; the record reports how the model's own selection differs.

    ```python
    >>> with forced_query_selection(model, expected_indices) as record:
    ...     outputs = model(pixel_values, pixel_mask)
    >>> record.calls, (record.own != expected_indices).sum()
    ```
    """
    inner = model if isinstance(model, DinoModel) else getattr(model, "model", None)
    if not isinstance(inner, DinoModel):
        raise TypeError(f"forced_query_selection needs a DinoModel or DinoForObjectDetection, got {type(model).__name__}.")
    record = ForcedSelectionRecord()
    own_ranking = inner.rank_encoder_tokens

    def replay(scores: torch.Tensor, k: int) -> torch.LongTensor:
        if tuple(indices.shape) != (scores.shape[0], k):
            raise ValueError(f"forced selection has shape {tuple(indices.shape)}, the model selects {(scores.shape[0], k)}.")
        record.calls += 1
        record.own = own_ranking(scores, k)
        return indices.to(device=scores.device, dtype=torch.long)

    inner.rank_encoder_tokens = replay  # an instance attribute shadows the method for this instance only
    try:
        yield record
    finally:
        del inner.rank_encoder_tokens


__all__ = ["DinoPreTrainedModel", "DinoModel", "DinoForObjectDetection", "DinoModelOutput", "DinoObjectDetectionOutput",
           "ForcedSelectionRecord", "forced_query_selection"]
