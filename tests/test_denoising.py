"""Contrastive denoising queries (`hf_dino.denoising`) against DINO's `prepare_for_cdn` semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_dino.denoising import (
    DenoisingQueries,
    build_contrastive_denoising_queries,
    build_denoising_attention_mask,
    denoising_group_count,
    inverse_sigmoid,
)

NUM_CLASSES = 91
NUM_QUERIES = 30


def make_labels(counts, seed=0, centre_range=(0.2, 0.8), size_range=(0.01, 0.31)):
    g = torch.Generator().manual_seed(seed)
    labels = []
    for n in counts:
        lo, hi = centre_range
        cxcy = torch.rand(n, 2, generator=g) * (hi - lo) + lo
        lo, hi = size_range
        wh = torch.rand(n, 2, generator=g) * (hi - lo) + lo
        labels.append({"class_labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": torch.cat([cxcy, wh], 1)})
    return labels


def identity_embedding(num_classes=NUM_CLASSES) -> nn.Embedding:
    """Row i = one-hot(i), so that the content of a query reveals its (noised) label by argmax."""
    emb = nn.Embedding(num_classes + 1, num_classes + 1)
    with torch.no_grad():
        emb.weight.copy_(torch.eye(num_classes + 1))
    return emb


def build(labels, num_denoising=100, label_noise_ratio=0.5, box_noise_scale=1.0, embed=None, seed=0):
    torch.manual_seed(seed)
    embed = embed if embed is not None else nn.Embedding(NUM_CLASSES + 1, 16)
    return build_contrastive_denoising_queries(
        labels, num_denoising, label_noise_ratio, box_noise_scale, NUM_CLASSES, NUM_QUERIES, embed
    )


# ---- counts and layout --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "counts, num_denoising, num_groups",
    [
        ([3, 5], 100, 20),  # 200 // (2 * 5)
        ([20, 2], 100, 5),  # 200 // 40 (the fixture's first image has 20 objects)
        ([0, 4], 100, 25),  # zero ground truths in one image
        ([7], 100, 14),  # 200 // 14
        ([60, 1], 100, 1),  # 200 // 120
        ([120], 100, 1),  # 200 // 240 = 0 -> 1
        ([1], 10, 20),  # budget < 100 after doubling: the original keeps 2 * num_denoising groups
        ([4, 4], 49, 98),
        ([4, 4], 50, 12),  # 100 // 8
    ],
)
def test_group_count_and_shapes(counts, num_denoising, num_groups):
    labels = make_labels(counts)
    q = build(labels, num_denoising=num_denoising)
    assert isinstance(q, DenoisingQueries)
    max_gt = max(counts)
    assert denoising_group_count(num_denoising, max_gt) == num_groups
    assert q.meta.num_groups == num_groups
    assert q.meta.group_size == 2 * max_gt
    num_dn = num_groups * 2 * max_gt
    assert q.meta.num_denoising_queries == num_dn
    assert q.content.shape == (len(counts), num_dn, 16)
    assert q.reference_boxes.shape == (len(counts), num_dn, 4)
    assert q.attention_mask.shape == (num_dn + NUM_QUERIES, num_dn + NUM_QUERIES)
    assert q.attention_mask.dtype == torch.bool
    for b, n in enumerate(counts):
        pos_q, pos_t = q.meta.positive_indices[b]
        neg_q, neg_t = q.meta.negative_indices[b]
        assert len(pos_q) == len(pos_t) == len(neg_q) == num_groups * n
        expected_q = torch.tensor([g * 2 * max_gt + t for g in range(num_groups) for t in range(n)], dtype=torch.long)
        assert torch.equal(pos_q, expected_q)
        assert torch.equal(pos_t, torch.arange(n).repeat(num_groups))
        assert torch.equal(neg_q, expected_q + max_gt)
        assert torch.equal(neg_t, pos_t)


def test_nothing_to_denoise_returns_none():
    assert build(make_labels([0, 0])) is None  # no image has a ground truth
    assert build(make_labels([])) is None  # empty batch
    assert build(make_labels([3, 2]), num_denoising=0) is None  # denoising disabled


def test_slot_layout_and_padding():
    """Labels land in their image's slots (copy c, target t -> c * max_gt + t); other slots are zero."""
    counts = [2, 5, 0]
    labels = make_labels(counts)
    q = build(labels, label_noise_ratio=0.0, box_noise_scale=0.0, embed=identity_embedding())
    max_gt, num_groups = 5, q.meta.num_groups
    occupied = torch.zeros(len(counts), q.meta.num_denoising_queries, dtype=torch.bool)
    for b, n in enumerate(counts):
        for copy in range(2 * num_groups):
            for t in range(n):
                slot = copy * max_gt + t
                occupied[b, slot] = True
                assert int(q.content[b, slot].argmax()) == int(labels[b]["class_labels"][t])
                # no box noise: the reference is the logit of the ground truth itself
                torch.testing.assert_close(q.reference_boxes[b, slot], inverse_sigmoid(labels[b]["boxes"][t]))
    assert (q.content[~occupied] == 0).all()
    assert (q.reference_boxes[~occupied] == 0).all()


def test_inverse_sigmoid_eps():
    x = torch.tensor([0.0, 1e-4, 0.5, 1.0, 1.5, -1.0])
    expected = torch.tensor([math.log(1e-3), math.log(1e-3 / (1 - 1e-4)), 0.0, -math.log(1e-3), -math.log(1e-3), math.log(1e-3)])
    torch.testing.assert_close(inverse_sigmoid(x), expected)


# ---- noise -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("box_noise_scale", [1.0, 0.4])
def test_box_noise_bands(box_noise_scale):
    """Positive corners move by < 1 x (scale * half size), negatives by [1, 2) x, per coordinate."""
    # boxes near the centre and small enough that no noised corner is clamped to [0, 1] or hits the 1e-3 logit eps
    counts = [6, 9, 4]
    labels = make_labels(counts, seed=3, centre_range=(0.4, 0.6), size_range=(0.05, 0.2))
    q = build(labels, num_denoising=100, label_noise_ratio=0.0, box_noise_scale=box_noise_scale, seed=5)
    noised = q.reference_boxes.sigmoid()
    pos_ratio, neg_ratio = [], []
    for b, n in enumerate(counts):
        gt = labels[b]["boxes"]
        gt_corners = torch.cat([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2], 1)
        half = (gt[:, 2:] / 2).repeat(1, 2) * box_noise_scale
        for kind, out in (("positive", pos_ratio), ("negative", neg_ratio)):
            qi, ti = getattr(q.meta, f"{kind}_indices")[b]
            box = noised[b, qi]
            corners = torch.cat([box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2], 1)
            # With scale 1 a negative's two corners of one axis can cross (each moves by up to 2 half sizes): its
            # width/height becomes negative and inverse_sigmoid clamps it to logit(1e-3), as in the original, so
            # that axis's corners cannot be recovered from (cx, cy, w, h); measure the other coordinates.
            valid = (box[:, 2:] > 2e-3).repeat(1, 2)
            if kind == "positive":
                assert valid.all()
            out.append(((corners - gt_corners[ti]) / half[ti])[valid])
    pos_ratio, neg_ratio = torch.cat(pos_ratio), torch.cat(neg_ratio)
    tol = 1e-3  # float32 sigmoid(logit) round trip, relative to half sizes >= 0.01
    assert pos_ratio.abs().max() < 1 + tol
    assert neg_ratio.abs().min() > 1 - tol and neg_ratio.abs().max() < 2 + tol
    # both signs, and the bands are filled (uniform magnitudes)
    for r in (pos_ratio, neg_ratio):
        assert (r > 0).float().mean().item() == pytest.approx(0.5, abs=0.1)
    assert pos_ratio.abs().max() > 0.9 and pos_ratio.abs().min() < 0.1
    assert neg_ratio.abs().max() > 1.9 and neg_ratio.abs().min() < 1.1


def test_noised_boxes_clamped_to_image():
    labels = make_labels([8], seed=1, centre_range=(0.0, 1.0), size_range=(0.5, 1.0))
    q = build(labels, box_noise_scale=1.0)
    cxcywh = q.reference_boxes[0, : 16 * q.meta.num_groups].sigmoid()
    corners = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1)
    # inverse_sigmoid clamps at 1e-3, so a corner clamped to 0 comes back as >= about -1e-3
    assert corners.min() > -2e-3 and corners.max() < 1 + 2e-3
    assert torch.isfinite(q.reference_boxes).all()


@pytest.mark.parametrize("ratio", [0.5, 0.2, 1.0])
def test_label_flip_rate(ratio):
    """Each label is redrawn uniformly from [0, C) with probability ratio / 2 (so it changes with
    probability ratio / 2 * (C - 1) / C)."""
    counts = [250, 250, 250, 250]
    labels = make_labels(counts, seed=2)
    q = build(labels, num_denoising=10, label_noise_ratio=ratio, box_noise_scale=0.0, embed=identity_embedding(), seed=11)
    changed, total = 0, 0
    for b in range(len(counts)):
        qi, ti = q.meta.positive_indices[b]
        ni, nt = q.meta.negative_indices[b]
        got = q.content[b, torch.cat([qi, ni])].argmax(-1)
        want = labels[b]["class_labels"][torch.cat([ti, nt])]
        changed += int((got != want).sum())
        total += got.numel()
    assert total == 2 * 20 * 1000
    expected = ratio * 0.5 * (NUM_CLASSES - 1) / NUM_CLASSES
    sigma = math.sqrt(expected * (1 - expected) / total)
    assert abs(changed / total - expected) < 5 * sigma


def test_no_label_noise_keeps_labels():
    labels = make_labels([5, 3], seed=4)
    q = build(labels, label_noise_ratio=0.0, embed=identity_embedding())
    for b in range(2):
        qi, ti = q.meta.positive_indices[b]
        assert torch.equal(q.content[b, qi].argmax(-1), labels[b]["class_labels"][ti])


def reference_cdn(labels, num_denoising, label_noise_ratio, box_noise_scale, embed):
    """Per-query transcription of the CDN recipe with the original's random draws, in the original's order:
    rand [N] (flip test) -> randint [n_flipped] (new labels) -> randint [N, 4] (signs) -> rand [N, 4] (magnitudes),
    N running over (copy, image, target) with copy = 2 * group + {0: positive, 1: negative}."""
    counts = [len(t["class_labels"]) for t in labels]
    max_gt = max(counts)
    num_groups = denoising_group_count(num_denoising, max_gt)
    entries = [(c, b, t) for c in range(2 * num_groups) for b, n in enumerate(counts) for t in range(n)]
    n_all = len(entries)
    flip = torch.rand(n_all) < label_noise_ratio * 0.5
    new_labels = torch.randint(0, NUM_CLASSES, (int(flip.sum()),)).tolist()
    sign = torch.randint(0, 2, (n_all, 4)).float() * 2 - 1
    mag = torch.rand(n_all, 4)
    num_dn = num_groups * 2 * max_gt
    content = torch.zeros(len(counts), num_dn, embed.weight.shape[1])
    ref = torch.zeros(len(counts), num_dn, 4)
    for k, (c, b, t) in enumerate(entries):
        label = int(labels[b]["class_labels"][t])
        if flip[k]:
            label = new_labels.pop(0)
        cx, cy, w, h = labels[b]["boxes"][t].tolist()
        corners = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        half = torch.tensor([w / 2, h / 2, w / 2, h / 2])
        noise = (mag[k] + (c % 2)) * sign[k]
        corners = (corners + noise * half * box_noise_scale).clamp(0, 1)
        box = torch.stack([(corners[0] + corners[2]) / 2, (corners[1] + corners[3]) / 2, corners[2] - corners[0], corners[3] - corners[1]])
        content[b, c * max_gt + t] = embed.weight[label]
        ref[b, c * max_gt + t] = inverse_sigmoid(box)
    return content, ref


@pytest.mark.parametrize("counts, num_denoising", [([3, 5], 100), ([0, 2, 1], 100), ([4], 5)])
def test_matches_per_query_reference(counts, num_denoising):
    labels = make_labels(counts, seed=7)
    embed = nn.Embedding(NUM_CLASSES + 1, 8)
    torch.manual_seed(21)
    with torch.no_grad():
        content_ref, ref_ref = reference_cdn(labels, num_denoising, 0.5, 1.0, embed)
    after_ref = torch.rand(1)
    q = build(labels, num_denoising=num_denoising, label_noise_ratio=0.5, box_noise_scale=1.0, embed=embed, seed=21)
    after = torch.rand(1)
    torch.testing.assert_close(q.content.detach(), content_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.reference_boxes, ref_ref, rtol=1e-5, atol=1e-5)  # scalar vs vector arithmetic
    assert torch.equal(after, after_ref), "the global generator must advance exactly as the original's draws do"


def test_seeded_determinism_and_global_rng():
    labels = make_labels([4, 6])
    a, b, c = build(labels, seed=1), build(labels, seed=1), build(labels, seed=2)
    assert torch.equal(a.reference_boxes, b.reference_boxes)
    assert not torch.equal(a.reference_boxes, c.reference_boxes)


def test_content_is_differentiable_wrt_label_embedding():
    embed = nn.Embedding(NUM_CLASSES + 1, 8)
    q = build(make_labels([2, 3]), embed=embed)
    q.content.sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0


# ---- attention mask ----------------------------------------------------------------------------------------------
def independent_mask(num_groups, group_size, num_queries):
    """Cell-by-cell statement of the mask (True = blocked)."""
    num_dn = num_groups * group_size
    size = num_dn + num_queries
    mask = [[False] * size for _ in range(size)]
    for i in range(size):
        for j in range(size):
            if j >= num_dn:
                continue  # every query sees the matching queries
            if i >= num_dn:
                mask[i][j] = True  # matching queries never see denoising queries
            elif i // group_size != j // group_size:
                mask[i][j] = True  # denoising groups do not see each other
    return torch.tensor(mask)


def original_loop_mask(num_groups, group_size, num_queries):
    """The original's construction (row blocks per group, with its special cases for the first and last group)."""
    pad = num_groups * group_size
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool)
    mask[pad:, :pad] = True
    for i in range(num_groups):
        rows = slice(group_size * i, group_size * (i + 1))
        if i == 0:
            mask[rows, group_size * (i + 1) : pad] = True
        if i == num_groups - 1:
            mask[rows, : group_size * i] = True
        else:
            mask[rows, group_size * (i + 1) : pad] = True
            mask[rows, : group_size * i] = True
    return mask


@pytest.mark.parametrize("num_groups, group_size, num_queries", [(1, 2, 3), (2, 4, 5), (5, 6, 7), (20, 10, 30), (3, 240, 4)])
def test_attention_mask_cell_by_cell(num_groups, group_size, num_queries):
    mask = build_denoising_attention_mask(num_groups, group_size, num_queries)
    assert torch.equal(mask, original_loop_mask(num_groups, group_size, num_queries))
    if num_groups * group_size < 200:
        assert torch.equal(mask, independent_mask(num_groups, group_size, num_queries))


def test_attention_mask_of_built_queries():
    q = build(make_labels([3, 5, 0]))
    g, s = q.meta.num_groups, q.meta.group_size
    assert torch.equal(q.attention_mask, independent_mask(g, s, NUM_QUERIES))
    num_dn = g * s
    assert q.attention_mask[num_dn:, :num_dn].all()  # matching -> denoising blocked
    assert not q.attention_mask[:, num_dn:].any()  # everybody sees the matching queries
    # a query of group 1 sees exactly its own group among the denoising queries
    visible = (~q.attention_mask[s + 1, :num_dn]).nonzero().view(-1)
    assert torch.equal(visible, torch.arange(s, 2 * s))


# ---- degenerate data (label validation itself: tests/test_box_ops.py) ------------------------------------------
def test_zero_area_boxes_stay_finite():
    labels = [{"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.2]])}]
    q = build(labels)
    assert torch.isfinite(q.reference_boxes).all() and torch.isfinite(q.content).all()
