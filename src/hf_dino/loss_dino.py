"""DINO's Hungarian matcher and training criterion (Zhang et al., 2022, arXiv 2203.03605).

Reproduces `HungarianMatcher` (`models/dino/matcher.py`) and `SetCriterion` (`models/dino/dino.py`) of the
original implementation (IDEA-Research/DINO) term for term:

* matching cost `class_cost * focal_cost + bbox_cost * L1 + giou_cost * (-GIoU)` per image, solved with
  `scipy.optimize.linear_sum_assignment`;
* `loss_ce`: sigmoid focal loss summed over queries x classes and divided by the number of target boxes;
  `loss_bbox`: L1 of matched (cx, cy, w, h); `loss_giou`: 1 - GIoU of matched boxes; `loss_xy`, `loss_hw`
  (parts of the L1), `class_error`: logging only;
* these terms for the last decoder layer (no suffix), every other decoder layer (`_{i}`), the encoder proposals
  (`_interm`) and, in training with contrastive denoising, the positive denoising queries (`_dn`, `_dn_{i}`),
  which are matched to their ground truth by construction instead of by the Hungarian algorithm.

The original also logs terms that carry no information here; they are opt-in (`DinoLoss(config,
original_log_terms=True)`), off by default, and never weighted, so the total is the same either way:
`cardinality_error` (a softmax-DETR count of queries whose arg-max is not the last class: for a sigmoid classifier
without a "no object" class it counts almost every query) and, without denoising queries (evaluation, or a batch
without objects), the constant-zero `*_dn` placeholders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou, generalized_box_iou
from .denoising import DenoisingMeta

__all__ = ["DinoHungarianMatcher", "DinoLoss"]

# Replacement for NaN / +inf / -inf entries of a matching cost matrix: scipy's linear_sum_assignment rejects
# non-finite costs ("matrix contains invalid numeric entries"). A NaN cost (e.g. from a diverged prediction) is
# treated as "worst possible" so that such a query is matched only if nothing else is left.
_LARGE_COST = 1e8


# ---------------------------------------------------------------------------------------------------------------
# Matcher
# ---------------------------------------------------------------------------------------------------------------
class DinoHungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to ground truths, per image, minimising

    `C = bbox_cost * L1(boxes) + class_cost * focal_cost + giou_cost * (-GIoU)`

    with the focal class cost `alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))` of the
    target class. Costs are computed batched in float32 in the original's operation order, so that the assignment
    is identical even between nearly tied candidates.

    Args:
        class_cost, bbox_cost, giou_cost (`float`): weights of the three costs (DINO: 2, 5, 2).
        focal_alpha, focal_gamma (`float`): focal cost parameters (0.25, 2).
    """

    def __init__(
        self,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("At least one of class_cost, bbox_cost, giou_cost must be non-zero.")
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, config) -> "DinoHungarianMatcher":
        """Build from a `DinoConfig` (`class_cost`, `bbox_cost`, `giou_cost`, `focal_alpha`, `focal_gamma`)."""
        return cls(config.class_cost, config.bbox_cost, config.giou_cost, config.focal_alpha, config.focal_gamma)

    @torch.no_grad()
    def forward(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, labels: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            logits (`FloatTensor` [B, Q, C]): classification logits.
            pred_boxes (`FloatTensor` [B, Q, 4]): normalized (cx, cy, w, h).
            labels (`list[dict]`): per image `"class_labels"` [n_b] and `"boxes"` [n_b, 4] (cx, cy, w, h).

        Returns:
            `list` of B tuples `(query_idx, target_idx)`, LongTensors [min(Q, n_b)] on the CPU, `query_idx`
            increasing (scipy's order). Images without targets give two empty tensors.
        """
        batch_size, num_queries = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in labels]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [(empty, empty) for _ in sizes]

        # costs in float32 (a no-op for float32 outputs; keeps half-precision outputs from rounding near-ties)
        prob = logits.flatten(0, 1).float().sigmoid()  # [B*Q, C]
        out_boxes = pred_boxes.flatten(0, 1).float()  # [B*Q, 4]
        tgt_ids = torch.cat([t["class_labels"] for t in labels]).to(device=logits.device, dtype=torch.long)
        tgt_boxes = torch.cat([t["boxes"] for t in labels]).to(out_boxes)

        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))

        cost = self.bbox_cost * cost_bbox + self.class_cost * cost_class + self.giou_cost * cost_giou
        cost = cost.view(batch_size, num_queries, -1).cpu()
        cost = torch.nan_to_num(cost, nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)

        indices = []
        for b, c in enumerate(cost.split(sizes, -1)):
            query_idx, target_idx = linear_sum_assignment(c[b].numpy())
            indices.append(
                (torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(target_idx, dtype=torch.int64))
            )
        return indices


# ---------------------------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------------------------
_DN_PLACEHOLDER_TERMS = ("loss_bbox_dn", "loss_giou_dn", "loss_ce_dn", "loss_xy_dn", "loss_hw_dn", "cardinality_error_dn")


class DinoLoss(nn.Module):
    """DINO's training criterion (the original `SetCriterion` with `losses = ['labels', 'boxes', 'cardinality']`).

    Args:
        config (`DinoConfig`): uses `num_labels`, `focal_alpha`, `focal_gamma`, `class_cost`, `bbox_cost`,
            `giou_cost`, `class_loss_coefficient`, `bbox_loss_coefficient`, `giou_loss_coefficient`,
            `encoder_loss_coefficient`, `auxiliary_loss`, `decoder_layers`, `num_denoising`.
        original_log_terms (`bool`, defaults to `False`): also report the original's uninformative logging terms,
            `cardinality_error*` and the constant-zero `*_dn` placeholders (see the module docstring), e.g. to
            compare a log with the original's term for term. They are not weighted: the total does not change.

    Attributes:
        weight_dict (`dict[str, float]`): coefficient of every weighted term, the original's names and values:
            `loss_ce/bbox/giou` (1, 5, 2), the same with `_dn` when `num_denoising > 0`, both again with suffix
            `_{i}` for decoder layers i = 0..decoder_layers-2 when `auxiliary_loss`, and
            `loss_{ce,bbox,giou}_interm` (coefficients times `encoder_loss_coefficient`).
    """

    def __init__(self, config, original_log_terms: bool = False):
        super().__init__()
        self.original_log_terms = original_log_terms
        self.num_classes = config.num_labels
        self.focal_alpha = config.focal_alpha
        self.focal_gamma = config.focal_gamma
        self.auxiliary_loss = config.auxiliary_loss
        self.matcher = DinoHungarianMatcher.from_config(config)

        base = {
            "loss_ce": config.class_loss_coefficient,
            "loss_bbox": config.bbox_loss_coefficient,
            "loss_giou": config.giou_loss_coefficient,
        }
        per_layer = dict(base)
        if config.num_denoising > 0:
            per_layer.update({f"{k}_dn": v for k, v in base.items()})
        weight_dict = dict(per_layer)
        if config.auxiliary_loss:
            for i in range(config.decoder_layers - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in per_layer.items()})
        weight_dict.update({f"{k}_interm": v * config.encoder_loss_coefficient for k, v in base.items()})
        self.weight_dict: dict[str, float] = weight_dict

    # ---- individual terms --------------------------------------------------------------------------------------
    def loss_labels(self, logits, labels, indices, num_boxes, log: bool) -> dict[str, torch.Tensor]:
        """Sigmoid focal loss over all queries x classes (unmatched queries: all-zero targets), divided by
        `num_boxes`: the original's `sigmoid_focal_loss(...).mean(1).sum() / num_boxes * num_queries`, i.e.
        torchvision's element-wise focal loss summed, in the original's reduction order. `class_error` (logging):
        100 - top-1 accuracy of the matched queries (100 when there are none)."""
        batch_idx, query_idx = _permutation_index(indices, logits.device)
        target_classes_matched = torch.cat([t["class_labels"][j] for t, (_, j) in zip(labels, indices)]).to(logits.device)
        target_onehot = torch.zeros_like(logits)
        target_onehot[batch_idx, query_idx, target_classes_matched] = 1.0
        focal = sigmoid_focal_loss(logits, target_onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none")
        losses = {"loss_ce": focal.mean(1).sum() / num_boxes * logits.shape[1]}
        if log:
            with torch.no_grad():
                if target_classes_matched.numel() == 0:
                    accuracy = torch.zeros((), device=logits.device)
                else:
                    top1 = logits[batch_idx, query_idx].argmax(-1)
                    accuracy = (top1 == target_classes_matched).float().sum() * (100.0 / target_classes_matched.numel())
                losses["class_error"] = 100 - accuracy
        return losses

    def loss_boxes(self, pred_boxes, labels, indices, num_boxes) -> dict[str, torch.Tensor]:
        """L1 and 1 - GIoU of the matched boxes, each summed and divided by `num_boxes`; `loss_xy`, `loss_hw`
        (logging): the centre and size parts of the L1."""
        batch_idx, query_idx = _permutation_index(indices, pred_boxes.device)
        src = pred_boxes[batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(labels, indices)], dim=0).to(src)
        l1 = F.l1_loss(src, tgt, reduction="none")
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        losses = {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}
        with torch.no_grad():
            losses["loss_xy"] = l1[..., :2].sum() / num_boxes
            losses["loss_hw"] = l1[..., 2:].sum() / num_boxes
        return losses

    @torch.no_grad()
    def loss_cardinality(self, logits, labels) -> dict[str, torch.Tensor]:
        """Logging only: mean over images of |#queries whose arg-max class is not the last class - #targets|
        (a softmax-DETR leftover kept for identical logs)."""
        num_targets = torch.as_tensor([len(t["class_labels"]) for t in labels], device=logits.device, dtype=torch.float)
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        return {"cardinality_error": F.l1_loss(num_pred, num_targets)}

    def _terms(self, logits, pred_boxes, labels, indices, num_boxes, log: bool) -> dict[str, torch.Tensor]:
        losses = self.loss_labels(logits, labels, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(pred_boxes, labels, indices, num_boxes))
        if self.original_log_terms:
            losses.update(self.loss_cardinality(logits, labels))
        return losses

    def _matched_terms(self, logits, pred_boxes, labels, num_boxes, log: bool, suffix: str) -> dict[str, torch.Tensor]:
        indices = self.matcher(logits, pred_boxes, labels)
        indices = [(i.to(logits.device), j.to(logits.device)) for i, j in indices]
        return {k + suffix: v for k, v in self._terms(logits, pred_boxes, labels, indices, num_boxes, log).items()}

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, outputs: dict, labels: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            outputs (`dict`):
                - `"logits"` [B, Q, C], `"pred_boxes"` [B, Q, 4]: last decoder layer (boxes normalized cx, cy, w, h);
                - `"auxiliary_outputs"`: list over decoder layers 0..L-2 of `{"logits", "pred_boxes"}`, or None;
                - `"encoder_logits"` [B, Q, C], `"encoder_pred_boxes"` [B, Q, 4]: the encoder's selected proposals
                  (the original `interm_outputs`), or None;
                - `"denoising_logits"` [B, L, Ndn, C], `"denoising_pred_boxes"` [B, L, Ndn, 4]: every decoder layer's
                  predictions for the denoising queries (last layer last), or None;
                - `"denoising_meta"`: the `DenoisingMeta` of the denoising queries, or None.
                Missing keys count as None.
            labels (`list[dict]`): per image `"class_labels"` LongTensor [n_b] in [0, num_labels) and `"boxes"`
                [n_b, 4] normalized (cx, cy, w, h), as validated by `hf_dino.box_ops.check_detection_labels` (the model
                validates them once per forward pass; call it yourself when you use the loss on its own labels).

        Returns:
            `(loss, loss_dict)`: `loss` = sum over `weight_dict` of coefficient x term (the terms present), and
            `loss_dict` with every raw (unweighted) term, the original's names. With `original_log_terms`, also
            `cardinality_error*` and, without denoising outputs, the original's constant-zero placeholders `*_dn`
            (and `*_dn_{i}` for each auxiliary layer).

        `num_boxes` = number of targets in the batch, averaged over processes when `torch.distributed` is
        initialised, at least 1; the denoising terms divide by `num_boxes * num_groups`.
        """
        logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
        if len(labels) != logits.shape[0]:
            raise ValueError(f"Got {len(labels)} label dicts for a batch of {logits.shape[0]} images.")
        device = logits.device
        labels = [{"class_labels": t["class_labels"].to(device=device, dtype=torch.long), "boxes": t["boxes"].to(device)}
                  for t in labels]
        num_boxes = _average_num_boxes(labels, device)

        dn_meta: DenoisingMeta | None = outputs.get("denoising_meta")
        dn_logits, dn_boxes = outputs.get("denoising_logits"), outputs.get("denoising_pred_boxes")
        use_dn = dn_meta is not None
        if use_dn != (dn_logits is not None) or use_dn != (dn_boxes is not None):
            raise ValueError(
                "denoising_meta, denoising_logits and denoising_pred_boxes must be given together (training with "
                "denoising queries) or all be None."
            )
        if use_dn:
            if dn_logits.shape[2] != dn_meta.num_denoising_queries or dn_boxes.shape[:3] != dn_logits.shape[:3]:
                raise ValueError(
                    f"denoising_logits {tuple(dn_logits.shape)} / denoising_pred_boxes {tuple(dn_boxes.shape)} do not "
                    f"match [B, num_layers, {dn_meta.num_denoising_queries}, ...] of denoising_meta."
                )
            dn_indices = [(i.to(device), j.to(device)) for i, j in dn_meta.positive_indices]
            dn_num_boxes = num_boxes * dn_meta.num_groups

        def dn_terms(layer: int, suffix: str) -> dict[str, torch.Tensor]:
            if not use_dn:
                if not self.original_log_terms:
                    return {}
                zero = torch.zeros((), device=device)
                return {k + suffix: zero for k in _DN_PLACEHOLDER_TERMS}
            terms = self._terms(dn_logits[:, layer], dn_boxes[:, layer], labels, dn_indices, dn_num_boxes, log=False)
            return {f"{k}_dn{suffix}": v for k, v in terms.items()}

        losses: dict[str, torch.Tensor] = {}
        losses.update(dn_terms(-1, ""))
        losses.update(self._matched_terms(logits, pred_boxes, labels, num_boxes, log=True, suffix=""))

        aux = outputs.get("auxiliary_outputs")
        if self.auxiliary_loss and aux is not None:
            if use_dn and dn_logits.shape[1] != len(aux) + 1:
                raise ValueError(
                    f"denoising outputs have {dn_logits.shape[1]} decoder layers, expected {len(aux) + 1} "
                    "(auxiliary layers + the last one)."
                )
            for i, layer_out in enumerate(aux):
                losses.update(
                    self._matched_terms(layer_out["logits"], layer_out["pred_boxes"], labels, num_boxes, log=False, suffix=f"_{i}")
                )
                losses.update(dn_terms(i, f"_{i}"))

        enc_logits, enc_boxes = outputs.get("encoder_logits"), outputs.get("encoder_pred_boxes")
        if enc_logits is not None and enc_boxes is not None:
            losses.update(self._matched_terms(enc_logits, enc_boxes, labels, num_boxes, log=False, suffix="_interm"))

        total = sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)
        return total, losses


def _permutation_index(indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(device)
    query_idx = torch.cat([q for q, _ in indices]).to(device)
    return batch_idx, query_idx


def _average_num_boxes(labels: list[dict], device) -> float:
    num_boxes = torch.as_tensor([float(sum(len(t["class_labels"]) for t in labels))], dtype=torch.float, device=device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(num_boxes)
        world_size = torch.distributed.get_world_size()
    return torch.clamp(num_boxes / world_size, min=1).item()
