"""DINO criterion (`hf_dino.loss_dino`): parity with the original `SetCriterion` / `HungarianMatcher` on the
fixtures in ../shared/parity, independent float64 recomputations, denoising terms, bad data."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision

from hf_dino.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou, generalized_box_iou
from hf_dino.configuration_dino import DinoConfig
from hf_dino.denoising import build_contrastive_denoising_queries
from hf_dino.loss_dino import DinoHungarianMatcher, DinoLoss

from conftest import PARITY
FIXTURES = ["r50_4scale", "swinl_4scale"]
LOSS_ATOL = 1e-5  # README: original vs original noise <= 1e-6


def load_fixture(name):
    folder = PARITY / name
    if not folder.exists():
        pytest.skip(f"parity fixture {folder} not found (../shared/parity exists only in the project's workspace)")
    from safetensors.torch import load_file

    inputs = load_file(str(folder / "inputs.safetensors"))
    expected = load_file(str(folder / "expected.safetensors"))
    meta = json.loads((folder / "expected.json").read_text())
    batch_size = inputs["pixel_values"].shape[0]
    labels = [
        {"class_labels": inputs[f"targets.{b}.labels"], "boxes": inputs[f"targets.{b}.boxes"]} for b in range(batch_size)
    ]
    num_aux = len({k.split(".")[1] for k in expected if k.startswith("aux_outputs.")})
    outputs = {
        "logits": expected["pred_logits"],
        "pred_boxes": expected["pred_boxes"],
        "auxiliary_outputs": [
            {"logits": expected[f"aux_outputs.{i}.pred_logits"], "pred_boxes": expected[f"aux_outputs.{i}.pred_boxes"]}
            for i in range(num_aux)
        ],
        "encoder_logits": expected["interm_outputs.pred_logits"],
        "encoder_pred_boxes": expected["interm_outputs.pred_boxes"],
        "denoising_logits": None,
        "denoising_pred_boxes": None,
        "denoising_meta": None,
    }
    return labels, outputs, expected, meta


# ---- parity with the original ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FIXTURES)
def fixture_result(request):
    labels, outputs, expected, meta = load_fixture(request.param)
    criterion = DinoLoss(DinoConfig(), original_log_terms=True)  # the fixture logs the original's 79 terms
    matches = []  # every assignment the criterion computes, in call order
    matcher_forward = criterion.matcher.forward

    def recording_forward(logits, pred_boxes, labels):
        indices = matcher_forward(logits, pred_boxes, labels)
        matches.append((logits, indices))
        return indices

    criterion.matcher.forward = recording_forward
    with torch.no_grad():
        total, losses = criterion(outputs, labels)
    criterion.matcher.forward = matcher_forward
    return request.param, criterion, labels, outputs, expected, meta, total, losses, matches


def test_loss_terms_match_original(fixture_result):
    name, criterion, _, _, _, meta, _, losses, _ = fixture_result
    reference = meta["losses"]
    assert len(reference) == 79
    assert set(losses) == set(reference), f"missing {set(reference) - set(losses)}, extra {set(losses) - set(reference)}"
    diffs = {k: abs(float(losses[k]) - v) for k, v in reference.items()}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= LOSS_ATOL, f"{name}: {worst} differs by {diffs[worst]:.3g}"
    for k, v in losses.items():
        if "_dn" in k:
            assert float(v) == 0.0  # the original's constant placeholders in eval


def test_weight_dict_and_total_match_original(fixture_result):
    _, criterion, _, _, _, meta, total, _, _ = fixture_result
    assert criterion.weight_dict == meta["weight_dict"]
    # the fixture sums in float64, the criterion in float32 (31.88 vs ~4e-6 observed)
    assert float(total) == pytest.approx(meta["weighted_loss_total"], rel=1e-6, abs=LOSS_ATOL)


def test_matching_matches_original(fixture_result):
    """The assignments used by the criterion equal the original's `match.*` exactly, for every output set."""
    _, _, _, outputs, expected, _, _, _, matches = fixture_result
    sets = {"final": outputs["logits"], "interm": outputs["encoder_logits"]}
    sets.update({f"aux_{i}": a["logits"] for i, a in enumerate(outputs["auxiliary_outputs"])})
    assert len(matches) == len(sets) == 7
    for name, logits in sets.items():
        (indices,) = [ind for lg, ind in matches if lg is logits]
        for b, (query_idx, target_idx) in enumerate(indices):
            assert torch.equal(query_idx, expected[f"match.{name}.{b}.query_idx"]), (name, b)
            assert torch.equal(target_idx, expected[f"match.{name}.{b}.target_idx"]), (name, b)


# ---- independent float64 recomputations --------------------------------------------------------------------------
def random_case(counts=(3, 0, 5), num_queries=12, num_classes=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(counts), num_queries, num_classes, generator=g, dtype=dtype) * 2
    cxcy = torch.rand(len(counts), num_queries, 2, generator=g, dtype=dtype) * 0.6 + 0.2
    wh = torch.rand(len(counts), num_queries, 2, generator=g, dtype=dtype) * 0.3 + 0.05
    boxes = torch.cat([cxcy, wh], -1)
    labels = []
    for n in counts:
        labels.append(
            {
                "class_labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1).to(dtype),
            }
        )
    return logits, boxes, labels


def small_config(num_classes=7, **kwargs):
    return DinoConfig(num_labels=num_classes, decoder_layers=3, **kwargs)


def test_focal_loss_float64_recomputation():
    logits, boxes, labels = random_case()
    criterion = DinoLoss(small_config())
    indices = criterion.matcher(logits, boxes, labels)
    num_boxes = 8.0
    got = criterion.loss_labels(logits, labels, indices, num_boxes, log=False)["loss_ce"]

    x = logits.double()
    target = torch.zeros_like(x)
    for b, (qi, ti) in enumerate(indices):
        for q, t in zip(qi.tolist(), ti.tolist()):
            target[b, q, int(labels[b]["class_labels"][t])] = 1.0
    p = 1 / (1 + torch.exp(-x))
    p_t = torch.where(target == 1, p, 1 - p)
    alpha_t = torch.where(target == 1, 0.25, 0.75)
    want = (-alpha_t * (1 - p_t) ** 2 * torch.log(p_t)).sum() / num_boxes  # sum over queries x classes
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)

    # the original's own reduction: `mean(1).sum() / num_boxes * num_queries`, with its formula written out
    prob = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
    pt = prob * target.float() + (1 - prob) * (1 - target.float())
    at = 0.25 * target.float() + 0.75 * (1 - target.float())
    original = (at * ce * (1 - pt) ** 2).mean(1).sum() / num_boxes * logits.shape[1]
    assert torch.equal(got, original)


def giou_float64(a, b):
    """Scalar GIoU of two xyxy boxes with the original's 1e-6 terms, in Python floats."""
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = area(a) + area(b) - inter
    ew = max(0.0, max(a[2], b[2]) - min(a[0], b[0]))
    eh = max(0.0, max(a[3], b[3]) - min(a[1], b[1]))
    enclose = ew * eh
    return inter / (union + 1e-6) - (enclose - union) / (enclose + 1e-6)


def test_giou_float64_recomputation():
    g = torch.Generator().manual_seed(1)
    b1 = box_cxcywh_to_xyxy(torch.cat([torch.rand(6, 2, generator=g), torch.rand(6, 2, generator=g) * 0.5], 1))
    b2 = box_cxcywh_to_xyxy(torch.cat([torch.rand(5, 2, generator=g), torch.rand(5, 2, generator=g) * 0.5], 1))
    b2[0] = b1[0]  # identical boxes
    b2[1] = torch.tensor([0.3, 0.3, 0.3, 0.3])  # zero area
    got = generalized_box_iou(b1, b2)
    want = torch.tensor([[giou_float64(x.tolist(), y.tolist()) for y in b2.double()] for x in b1.double()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # torchvision's version has no 1e-6 terms: close, but not the original's numbers
    torch.testing.assert_close(got, torchvision.ops.generalized_box_iou(b1, b2), rtol=0, atol=1e-4)
    # the element-wise version equals the diagonal bit for bit
    assert torch.equal(elementwise_generalized_box_iou(b1[:5], b2), torch.diagonal(generalized_box_iou(b1[:5], b2)))
    # two identical zero-area boxes: finite (torchvision gives NaN)
    z = torch.tensor([[0.3, 0.3, 0.3, 0.3]])
    assert torch.isfinite(generalized_box_iou(z, z)).all()


def test_matcher_float64_cost_and_optimality():
    """The assignment minimises the float64 cost 2 focal + 5 L1 - 2 GIoU (checked against all permutations)."""
    import itertools

    logits, boxes, labels = random_case(counts=(3,), num_queries=5)
    matcher = DinoHungarianMatcher()
    (qi, ti), = matcher(logits, boxes, labels)
    p = logits[0].double().sigmoid()
    tgt = labels[0]
    cost = torch.zeros(5, 3, dtype=torch.float64)
    for q in range(5):
        for t in range(3):
            c = int(tgt["class_labels"][t])
            focal = 0.25 * (1 - p[q, c]) ** 2 * -math.log(p[q, c] + 1e-8) - 0.75 * p[q, c] ** 2 * -math.log(1 - p[q, c] + 1e-8)
            l1 = (boxes[0, q].double() - tgt["boxes"][t].double()).abs().sum()
            giou = giou_float64(box_cxcywh_to_xyxy(boxes[0, q].double()).tolist(), box_cxcywh_to_xyxy(tgt["boxes"][t].double()).tolist())
            cost[q, t] = 2 * focal + 5 * l1 - 2 * giou
    best = min(itertools.permutations(range(5), 3), key=lambda qs: sum(cost[q, t] for t, q in enumerate(qs)))
    got = dict(zip(ti.tolist(), qi.tolist()))
    assert [got[t] for t in range(3)] == list(best)
    assert qi.tolist() == sorted(qi.tolist())


def test_box_losses_float64_recomputation():
    logits, boxes, labels = random_case()
    criterion = DinoLoss(small_config())
    indices = criterion.matcher(logits, boxes, labels)
    got = criterion.loss_boxes(boxes, labels, indices, 8.0)
    l1 = xy = giou = 0.0
    for b, (qi, ti) in enumerate(indices):
        for q, t in zip(qi.tolist(), ti.tolist()):
            s, g = boxes[b, q].double(), labels[b]["boxes"][t].double()
            d = (s - g).abs()
            l1 += float(d.sum())
            xy += float(d[:2].sum())
            giou += 1 - giou_float64(box_cxcywh_to_xyxy(s).tolist(), box_cxcywh_to_xyxy(g).tolist())
    assert float(got["loss_bbox"]) == pytest.approx(l1 / 8, rel=1e-6)
    assert float(got["loss_xy"]) == pytest.approx(xy / 8, rel=1e-6)
    assert float(got["loss_hw"]) == pytest.approx((l1 - xy) / 8, rel=1e-6)
    assert float(got["loss_giou"]) == pytest.approx(giou / 8, rel=1e-6)


# ---- structure, weights, gradients -------------------------------------------------------------------------------
def model_outputs(logits, boxes, num_layers=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    aux = [{"logits": logits + torch.randn(logits.shape, generator=g), "pred_boxes": boxes.roll(i + 1, dims=1)} for i in range(num_layers - 1)]
    return {
        "logits": logits,
        "pred_boxes": boxes,
        "auxiliary_outputs": aux,
        "encoder_logits": logits.flip(1),
        "encoder_pred_boxes": boxes.flip(1),
    }


def test_weight_dict_variants():
    full = DinoLoss(small_config()).weight_dict
    assert full["loss_bbox_dn_1"] == 5.0 and full["loss_giou_interm"] == 2.0 and "loss_ce_2" not in full
    assert len(full) == 3 * 2 * 3 + 3
    no_dn = DinoLoss(small_config(num_denoising=0)).weight_dict
    assert not any("_dn" in k for k in no_dn) and len(no_dn) == 3 * 3 + 3
    no_aux = DinoLoss(small_config(auxiliary_loss=False)).weight_dict
    assert set(no_aux) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_dn", "loss_bbox_dn", "loss_giou_dn",
                           "loss_ce_interm", "loss_bbox_interm", "loss_giou_interm"}
    enc = DinoLoss(small_config(encoder_loss_coefficient=0.5)).weight_dict
    assert enc["loss_bbox_interm"] == 2.5


def test_total_is_weighted_sum_and_differentiable():
    logits, boxes, labels = random_case()
    logits.requires_grad_(True)
    boxes.requires_grad_(True)
    criterion = DinoLoss(small_config())
    total, losses = criterion(model_outputs(logits, boxes), labels)
    want = sum(float(losses[k].detach()) * w for k, w in criterion.weight_dict.items() if k in losses)
    assert float(total.detach()) == pytest.approx(want, rel=1e-6)
    # eval-like call: final (ce, bbox, giou, xy, hw, class_error) + 2 aux x 5 + interm 5; no placeholders
    assert len(losses) == 6 + 2 * 5 + 5 and not any("_dn" in k or "cardinality" in k for k in losses)
    # the original's uninformative log terms are opt-in and never weighted: same total
    logged_total, logged = DinoLoss(small_config(), original_log_terms=True)(model_outputs(logits, boxes), labels)
    assert len(logged) == 7 + 2 * 12 + 6 + 6 and float(logged_total.detach()) == float(total.detach())
    assert all(float(v) == 0 for k, v in logged.items() if "_dn" in k)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.isfinite(boxes.grad).all() and boxes.grad.abs().sum() > 0


def test_num_boxes_normalisation():
    """Terms divide by the batch's target count (at least 1): duplicating the batch leaves them unchanged."""
    logits, boxes, labels = random_case()
    criterion = DinoLoss(small_config())
    outputs = model_outputs(logits, boxes)
    _, single = criterion(outputs, labels)
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items() if k != "auxiliary_outputs"}
    doubled["auxiliary_outputs"] = [{k: torch.cat([v, v]) for k, v in a.items()} for a in outputs["auxiliary_outputs"]]
    _, double = criterion(doubled, labels + labels)
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_giou_1", "loss_bbox_interm"):
        assert float(double[k]) == pytest.approx(float(single[k]), rel=1e-5)


# ---- denoising terms ---------------------------------------------------------------------------------------------
def test_denoising_terms():
    counts = (3, 0, 5)
    logits, boxes, labels = random_case(counts=counts)
    config = small_config()
    torch.manual_seed(0)
    queries = build_contrastive_denoising_queries(labels, 100, 0.5, 1.0, 7, 12, torch.nn.Embedding(8, 4))
    meta = queries.meta
    num_layers, num_dn = 3, meta.num_denoising_queries
    g = torch.Generator().manual_seed(3)
    dn_logits = torch.randn(len(counts), num_layers, num_dn, 7, generator=g, requires_grad=True)
    dn_boxes = (torch.rand(len(counts), num_layers, num_dn, 4, generator=g) * 0.3 + 0.2).requires_grad_(True)
    outputs = model_outputs(logits, boxes) | {"denoising_logits": dn_logits, "denoising_pred_boxes": dn_boxes, "denoising_meta": meta}
    criterion = DinoLoss(config)
    total, losses = criterion(outputs, labels)
    for suffix, layer in (("_dn", 2), ("_dn_0", 0), ("_dn_1", 1)):
        assert {f"{k}{suffix}" for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_xy", "loss_hw")} <= set(losses)
        # independent recomputation: positive query (group g, target t) at g * group_size + t supervised with
        # target t; negatives and padding are background; normalised by num_boxes * num_groups
        norm = sum(counts) * meta.num_groups
        l1 = 0.0
        target = torch.zeros(len(counts), num_dn, 7, dtype=torch.float64)
        for b, n in enumerate(counts):
            for grp in range(meta.num_groups):
                for t in range(n):
                    q = grp * meta.group_size + t
                    l1 += float((dn_boxes[b, layer, q].detach().double() - labels[b]["boxes"][t].double()).abs().sum())
                    target[b, q, int(labels[b]["class_labels"][t])] = 1
        x = dn_logits[:, layer].detach().double()
        p = x.sigmoid()
        p_t = torch.where(target == 1, p, 1 - p)
        focal = (-torch.where(target == 1, 0.25, 0.75) * (1 - p_t) ** 2 * torch.log(p_t)).sum() / norm
        assert float(losses[f"loss_bbox{suffix}"].detach()) == pytest.approx(l1 / norm, rel=1e-5)
        assert float(losses[f"loss_ce{suffix}"].detach()) == pytest.approx(float(focal), rel=1e-5)
    assert "class_error_dn" not in losses
    total.backward()
    assert dn_logits.grad.abs().sum() > 0 and torch.isfinite(dn_boxes.grad).all()
    # negatives and padding get only the classification gradient
    neg_q = meta.negative_indices[0][0]
    assert (dn_boxes.grad[0, :, neg_q] == 0).all()


# ---- robustness --------------------------------------------------------------------------------------------------
def test_images_without_targets():
    logits, boxes, _ = random_case(counts=(0, 0))
    labels = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)} for _ in range(2)]
    matcher = DinoHungarianMatcher()
    for qi, ti in matcher(logits, boxes, labels):
        assert qi.numel() == 0 and ti.numel() == 0 and qi.dtype == torch.int64
    logits.requires_grad_(True)
    total, losses = DinoLoss(small_config())(model_outputs(logits, boxes), labels)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert float(losses["loss_bbox"]) == 0 and float(losses["loss_giou"]) == 0
    assert float(losses["class_error"]) == 100.0  # the original's value with no matched query
    total.backward()
    assert torch.isfinite(logits.grad).all()


def test_zero_area_target_boxes():
    logits, boxes, labels = random_case()
    labels[0]["boxes"][0, 2:] = 0.0  # a point
    labels[2]["boxes"][1, 2] = 0.0  # a vertical line
    boxes.requires_grad_(True)
    total, losses = DinoLoss(small_config())(model_outputs(logits, boxes), labels)
    assert all(torch.isfinite(v).all() for v in losses.values())
    total.backward()
    assert torch.isfinite(boxes.grad).all()


def test_non_finite_costs_do_not_crash_the_matcher():
    logits, boxes, labels = random_case()
    logits[0, :4] = float("nan")
    boxes[2, 1] = float("inf")
    boxes[2, 2] = float("nan")
    indices = DinoHungarianMatcher()(logits, boxes, labels)
    for (qi, ti), t in zip(indices, labels):
        assert len(qi) == len(t["boxes"]) and len(set(qi.tolist())) == len(qi)
        assert sorted(ti.tolist()) == list(range(len(t["boxes"])))
    # finite queries are preferred to NaN ones
    assert not set(indices[0][0].tolist()) & {0, 1, 2, 3}
    assert not set(indices[2][0].tolist()) & {1, 2}


def test_batch_size_mismatch_raises():
    logits, boxes, labels = random_case()
    with pytest.raises(ValueError, match="label dicts for a batch of 3"):
        DinoLoss(small_config())(model_outputs(logits, boxes), labels[:2])


def test_inconsistent_denoising_outputs_raise():
    logits, boxes, labels = random_case()
    torch.manual_seed(0)
    meta = build_contrastive_denoising_queries(labels, 100, 0.5, 1.0, 7, 12, torch.nn.Embedding(8, 4)).meta
    criterion = DinoLoss(small_config())
    n = meta.num_denoising_queries
    with pytest.raises(ValueError, match="must be given together"):
        criterion(model_outputs(logits, boxes) | {"denoising_meta": meta}, labels)
    with pytest.raises(ValueError, match="do not match"):
        criterion(model_outputs(logits, boxes) | {"denoising_meta": meta, "denoising_logits": torch.zeros(3, 3, n + 1, 7),
                                                  "denoising_pred_boxes": torch.rand(3, 3, n + 1, 4)}, labels)
    with pytest.raises(ValueError, match="decoder layers"):
        criterion(model_outputs(logits, boxes) | {"denoising_meta": meta, "denoising_logits": torch.zeros(3, 2, n, 7),
                                                  "denoising_pred_boxes": torch.rand(3, 2, n, 4)}, labels)
