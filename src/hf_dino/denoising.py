"""Contrastive denoising (CDN) queries of DINO (Zhang et al., 2022, arXiv 2203.03605, Sec. 3.3).

During training DINO feeds the decoder, in front of its `num_queries` matching queries, noised copies of the
ground-truth objects ("denoising queries"). They are grouped into `num_groups` CDN groups; each group holds one
positive and one negative copy of every ground-truth object of the image:

* positives: box corners moved by less than `box_noise_scale * (w/2, h/2)` (the "inner square" of the paper,
  lambda_1), to be reconstructed to their ground truth;
* negatives: box corners moved by between 1x and 2x `box_noise_scale * (w/2, h/2)` (between the inner and the
  outer square, lambda_2 = 2 lambda_1), to be predicted as "no object";
* each query's label is replaced by a random class with probability `label_noise_ratio / 2`.

Noised corners are clamped to [0, 1]. With `box_noise_scale > 0.5` the two corners of a negative can cross on an
axis; its width or height is then negative and `inverse_sigmoid` maps it to logit(1e-3), as in the original.

Query layout (per image, images padded to the batch maximum `max_gt` of ground truths)::

    [ group 0: pos_0 .. pos_{max_gt-1}, neg_0 .. neg_{max_gt-1} | group 1: ... | ... | matching queries ]
      <----------- group_size = 2 * max_gt ----------->

Slots beyond an image's own ground truths are padding (zero content, reference box logit 0 = box
(0.5, 0.5, 0.5, 0.5)). The self-attention mask keeps the matching queries from seeing any denoising query
and every denoising group from seeing the other groups; denoising queries do see the matching queries.

This reproduces `prepare_for_cdn` of the original implementation (IDEA-Research/DINO,
`models/dino/dn_components.py`) number for number, including its random-number draws (same calls, shapes and
order on torch's global generator) and its group-count rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


__all__ = ["DenoisingMeta", "DenoisingQueries", "build_contrastive_denoising_queries", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Logit of `x` as the original computes it: clamp to [0, 1], then `log(max(x, eps) / max(1 - x, eps))`.

    `eps = 1e-3` (not 1e-5): coordinates within 1e-3 of 0 or 1 map to about +-6.9.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


@dataclass
class DenoisingMeta:
    """What the criterion needs to supervise the denoising queries.

    Attributes:
        num_groups (`int`): number of CDN groups (the original `num_dn_group`).
        group_size (`int`): queries per group, `2 * max_gt` (positives then negatives; the original `single_pad`
            of the criterion).
        num_denoising_queries (`int`): `num_groups * group_size` (the original `pad_size`), the number of
            denoising queries placed before the matching queries.
        positive_indices (`list[tuple[LongTensor, LongTensor]]`): per image, `(query_idx, target_idx)` of the
            positive queries (group-major: group 0's targets 0..n-1, then group 1's, ...), each `[num_groups * n_b]`.
            Queries index the denoising part `[0, num_denoising_queries)`.
        negative_indices (`list[tuple[LongTensor, LongTensor]]`): same for the negative queries (query index +
            `max_gt`); not used by the loss (negatives are background), kept for analysis.
    """

    num_groups: int
    group_size: int
    num_denoising_queries: int
    positive_indices: list[tuple[torch.Tensor, torch.Tensor]]
    negative_indices: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DenoisingQueries:
    """Decoder inputs of the contrastive denoising queries.

    Attributes:
        content (`FloatTensor` [B, Ndn, d_model]): label embeddings of the (noised) labels; zero on padding slots.
            The original `input_query_label`.
        reference_boxes (`FloatTensor` [B, Ndn, 4]): noised boxes (cx, cy, w, h) in logit space
            (`inverse_sigmoid`, eps 1e-3); zero on padding slots. The original `input_query_bbox`.
        attention_mask (`BoolTensor` [Ndn + num_queries, Ndn + num_queries]): decoder self-attention mask,
            True = attention blocked (the `attn_mask` convention of `nn.MultiheadAttention`). Rows are queries,
            columns keys, denoising queries first.
        meta (`DenoisingMeta`): group layout and positive indices for `DinoLoss` (`outputs["denoising_meta"]`).
    """

    content: torch.Tensor
    reference_boxes: torch.Tensor
    attention_mask: torch.Tensor
    meta: DenoisingMeta


def denoising_group_count(num_denoising: int, max_gt: int) -> int:
    """Number of CDN groups, the original's rule.

    With `n = 2 * num_denoising` (positive and negative): if `n >= 100` the groups share a budget of about
    `n` queries, `n // (2 * max_gt)` groups (at least 1); otherwise (`num_denoising < 50`) the original uses `n`
    groups as they are, whatever `max_gt` is.
    """
    n = 2 * num_denoising
    if n >= 100:
        n = n // (2 * max_gt)
    return max(n, 1)


def build_denoising_attention_mask(num_groups: int, group_size: int, num_queries: int, device=None) -> torch.Tensor:
    """Self-attention mask of the decoder with `num_groups` CDN groups in front of `num_queries` matching queries.

    Returns:
        `BoolTensor` [Ndn + num_queries, Ndn + num_queries] with `Ndn = num_groups * group_size`, True = blocked:
        matching queries (rows >= Ndn) cannot see any denoising query (columns < Ndn); a denoising query cannot see
        the denoising queries of another group; everything else (including denoising -> matching) is visible.
    """
    num_dn = num_groups * group_size
    size = num_dn + num_queries
    group = torch.arange(size, device=device) // group_size
    is_dn = torch.arange(size, device=device) < num_dn
    # key is a denoising query, and the query is either a matching query or a denoising query of another group
    blocked = is_dn[None, :] & (~is_dn[:, None] | (group[:, None] != group[None, :]))
    return blocked


def build_contrastive_denoising_queries(
    labels: list[dict],
    num_denoising: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
) -> DenoisingQueries | None:
    """Build DINO's contrastive denoising queries for a training batch (the original `prepare_for_cdn`).

    Args:
        labels (`list[dict]`): per image, `"class_labels"` LongTensor [n_b] (class ids in [0, num_classes)) and
            `"boxes"` FloatTensor [n_b, 4], normalized (cx, cy, w, h); validated by the caller
            (`hf_dino.box_ops.check_detection_labels`, run once per forward pass by `DinoModel`).
        num_denoising (`int`): the denoising budget (`dn_number`); see `denoising_group_count`.
        label_noise_ratio (`float`): each query's label is replaced by a uniformly random class in
            [0, num_classes) with probability `label_noise_ratio * 0.5` (the new class may equal the old one).
        box_noise_scale (`float`): corner noise relative to half the box size; 0 disables box noise.
        num_classes (`int`): number of classes of the classifier (91 for COCO).
        num_queries (`int`): number of matching queries that follow the denoising queries.
        class_embed (`nn.Embedding`): label embedding table, `num_classes + 1` rows (the original `label_enc`).

    Returns:
        `DenoisingQueries` or `None`. `None` when there is nothing to denoise: `num_denoising == 0`, or no image of
        the batch has a ground truth (the original then builds zero denoising queries and its criterion falls back
        to the constant-zero denoising terms, which `DinoLoss` also emits when `denoising_meta` is None).

    Randomness: torch's global generator, drawn as the original does (`rand` [N] for the label flips, `randint`
    [n_flipped], then `randint` [N, 4] for the signs and `rand` [N, 4] for the magnitudes, N = 2 * num_groups *
    total ground truths), so a seeded CPU run equals the original's on the same device.
    """
    if num_denoising <= 0:
        return None
    device = class_embed.weight.device
    gt_labels = [t["class_labels"].to(device=device, dtype=torch.long) for t in labels]
    gt_boxes = [t["boxes"].to(device=device, dtype=torch.float32) for t in labels]
    num_gt = [int(x.shape[0]) for x in gt_labels]
    batch_size = len(labels)
    max_gt = max(num_gt, default=0)
    if max_gt == 0:
        return None

    num_groups = denoising_group_count(num_denoising, max_gt)
    num_copies = 2 * num_groups  # a positive and a negative copy per group
    group_size = 2 * max_gt
    num_dn = num_groups * group_size
    total_gt = sum(num_gt)

    # All ground truths of the batch, concatenated, then repeated: copy 2g = positives of group g, 2g+1 = negatives.
    labels_cat = torch.cat(gt_labels)
    boxes_cat = torch.cat(gt_boxes)
    image_idx = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(num_gt)])
    noised_labels = labels_cat.repeat(num_copies)  # [N]
    gt_boxes_rep = boxes_cat.repeat(num_copies, 1)  # [N, 4]
    image_idx = image_idx.repeat(num_copies)

    if label_noise_ratio > 0:
        flip_prob = torch.rand_like(noised_labels.float())
        flipped = torch.nonzero(flip_prob < (label_noise_ratio * 0.5)).view(-1)
        new_label = torch.randint_like(flipped, 0, num_classes)
        noised_labels = noised_labels.scatter(0, flipped, new_label)

    noised_boxes = gt_boxes_rep
    if box_noise_scale > 0:
        corners = torch.cat([gt_boxes_rep[:, :2] - gt_boxes_rep[:, 2:] / 2, gt_boxes_rep[:, :2] + gt_boxes_rep[:, 2:] / 2], dim=1)
        half_size = (gt_boxes_rep[:, 2:] / 2).repeat(1, 2)  # [N, 4]: (w/2, h/2, w/2, h/2)
        rand_sign = torch.randint_like(gt_boxes_rep, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
        rand_part = torch.rand_like(gt_boxes_rep)
        is_negative = (torch.arange(num_copies, device=device) % 2 == 1).repeat_interleave(total_gt)
        rand_part[is_negative] += 1.0  # negatives: |noise| in [1, 2) x half size; positives: [0, 1)
        rand_part *= rand_sign
        corners = corners + (rand_part * half_size) * box_noise_scale
        corners = corners.clamp(min=0.0, max=1.0)
        noised_boxes = torch.cat([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], dim=1)

    label_embedding = class_embed(noised_labels)  # [N, d_model]
    box_logits = inverse_sigmoid(noised_boxes)  # [N, 4]

    # Slot of each noised query in its image's padded layout: copy c, target t -> c * max_gt + t.
    target_idx = torch.cat([torch.arange(n, device=device) for n in num_gt])
    slot = (target_idx[None, :] + max_gt * torch.arange(num_copies, device=device)[:, None]).reshape(-1)
    content = label_embedding.new_zeros(batch_size, num_dn, label_embedding.shape[-1])
    reference_boxes = box_logits.new_zeros(batch_size, num_dn, 4)
    content[image_idx, slot] = label_embedding
    reference_boxes[image_idx, slot] = box_logits

    attention_mask = build_denoising_attention_mask(num_groups, group_size, num_queries, device=device)

    positive_indices, negative_indices = [], []
    group_offset = torch.arange(num_groups, device=device)[:, None] * group_size
    for n in num_gt:
        t = torch.arange(n, device=device)[None, :].expand(num_groups, n)
        query_idx = (group_offset + t).reshape(-1)
        tgt_idx = t.reshape(-1)
        positive_indices.append((query_idx, tgt_idx))
        negative_indices.append((query_idx + max_gt, tgt_idx))

    meta = DenoisingMeta(
        num_groups=num_groups,
        group_size=group_size,
        num_denoising_queries=num_dn,
        positive_indices=positive_indices,
        negative_indices=negative_indices,
    )
    return DenoisingQueries(content=content, reference_boxes=reference_boxes, attention_mask=attention_mask, meta=meta)
