"""FreeAnchor's loss in plain numpy float64: the test oracle of `freeanchor.free_anchor_loss`.

FreeAnchor (Zhang, Wan, Liu, Ji, Ye, NeurIPS 2019), §3, Eqs. 3-7, with the semantics of the
authors' released code (P{a_j in A+} a per-class max, their clamps and normaliser) and one choice
the paper leaves open (anchors of equal IoU compete for a bag's last places towards the lower
anchor index). This file is written straight from the equations, one image and one object at a
time, so that it is obviously right rather than fast; it never imports torch (or `freeanchor.py`), so that
comparing the two implementations means something. Only the anchors of one object are vectorised.

Letters: B images, A anchors, K classes, G objects of an image, n bag size.

    from reference.freeanchor_np import free_anchor_loss
    free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)  # {"positive", "negative"}

Tested by `python -m pytest tests/test_reference.py`.
"""

import math
from dataclasses import dataclass

import numpy as np

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (wx, wy, ww, wh): stds 0.1/0.1/0.2/0.2, the authors' setting
BOX_CLIP = math.log(1000.0 / 16)  # decode clamps dw, dh here before exp(), as torchvision and Detectron


@dataclass
class Config:
    """The paper's defaults (§4.3) and the authors' smooth-L1 beta; any object with these works."""
    bag_size: int = 50  # n
    iou_threshold: float = 0.6  # t
    alpha: float = 0.5  # weight of the positive term; the negative one gets 1 - alpha
    gamma: float = 2.0  # focal gamma
    loc_weight: float = 0.75  # beta of Eq. 1
    smooth_l1_beta: float = 0.11


# ----------------------------------------------------------------------------- boxes

def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes: [N, 4], [M, 4] -> [N, M]; 0 where the union is empty."""
    boxes1 = np.asarray(boxes1, np.float64).reshape(-1, 4)
    boxes2 = np.asarray(boxes2, np.float64).reshape(-1, 4)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])  # [N]
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])  # [M]
    inter_w = np.minimum(boxes1[:, None, 2], boxes2[None, :, 2]) - np.maximum(boxes1[:, None, 0], boxes2[None, :, 0])
    inter_h = np.minimum(boxes1[:, None, 3], boxes2[None, :, 3]) - np.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    inter = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)  # [N, M]
    union = area1[:, None] + area2[None, :] - inter  # [N, M]
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def _centre_size(boxes):
    """xyxy [..., 4] -> centre x, centre y, width, height (width = x2 - x1, no legacy +1)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(anchors, boxes, weights=BOX_WEIGHTS):
    """Deltas that move `anchors` onto `boxes` (broadcastable [..., 4]) -> [..., 4] = (dx, dy, dw, dh)."""
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(np.asarray(anchors, np.float64))
    gx, gy, gw, gh = _centre_size(np.asarray(boxes, np.float64))
    return np.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                     ww * np.log(gw / aw), wh * np.log(gh / ah)], axis=-1)


def decode(anchors, deltas, weights=BOX_WEIGHTS):
    """Boxes that `deltas` predict on `anchors` (broadcastable [..., 4]) -> xyxy [..., 4]; inverse of encode."""
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = _centre_size(np.asarray(anchors, np.float64))
    deltas = np.asarray(deltas, np.float64)
    cx = deltas[..., 0] / wx * aw + ax
    cy = deltas[..., 1] / wy * ah + ay
    w = np.exp(np.minimum(deltas[..., 2] / ww, BOX_CLIP)) * aw  # clamp keeps exp() finite
    h = np.exp(np.minimum(deltas[..., 3] / wh, BOX_CLIP)) * ah
    return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


# ----------------------------------------------------------------------------- the pieces of Eqs. 3-7

def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow for large |x|."""
    x = np.asarray(x, np.float64)
    e = np.exp(-np.abs(x))  # in (0, 1], never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def smooth_l1(d, beta):
    """Elementwise SmoothL1_beta(d) = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta."""
    d = np.abs(d)
    return np.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def bag_of(gt_box, anchors, n):
    """Bag A_i (§3.3): indices [n] of the n anchors with the largest IoU(b_i, anchor), no threshold.

    Ties are broken towards the lower anchor index (stable sort).
    """
    iou = box_iou(gt_box[None], anchors)[0]  # [A]
    return np.argsort(-iou, kind="stable")[:n]


def mean_max(x):
    """Mean-max (Eq. 6) of the bag's x_j = P_cls_ij * P_loc_ij: sum_j w_j x_j / sum_j w_j, w_j = 1 / (1 - x_j).

    1 - x_j is floored at 1e-12 so that w stays finite; the result is clamped to <= 1.
    """
    w = 1.0 / np.maximum(1.0 - x, 1e-12)  # [n]
    return min(float(np.sum(w * x) / np.sum(w)), 1.0)


def match_prob(iou, t):
    """P{a_j -> b_i} (§3.2): saturated linear of the IoU of each anchor's prediction with b_i.

    iou [A] -> [A]: 0 below t1 = t, 1 at t2 = max_j iou_j (at least t + 1e-12), linear in between.
    """
    t1 = t
    t2 = max(float(np.max(iou)), t1 + 1e-12) if iou.size else t1 + 1e-12
    return np.clip((iou - t1) / (t2 - t1), 0.0, 1.0)


def anchor_positive_prob(p_match, labels, num_classes):
    """P{a_j in A+} per class: [A, K], the max of P{a_j -> b_i} over the objects of class c.

    p_match [G, A] (rows are objects), labels [G]. 0 where the image has no object of class c.
    """
    p_plus = np.zeros((p_match.shape[1], num_classes))  # [A, K]
    for i in range(p_match.shape[0]):  # every object takes the max with the others of its class
        c = int(labels[i])
        p_plus[:, c] = np.maximum(p_plus[:, c], p_match[i])
    return p_plus


def focal_negative(p, p_plus, gamma):
    """Sum over anchors and classes of FL(q) = q^gamma * (-log(1 - q)), q = p * (1 - P{a_j in A+}) (Eq. 7)."""
    q = np.clip(p * (1.0 - p_plus), 1e-12, 1.0 - 1e-12)  # [A, K]
    return float(np.sum(q ** gamma * -np.log1p(-q)))


# ----------------------------------------------------------------------------- the loss

def free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=None, num_objects=None):
    """FreeAnchor's detection loss (Eq. 7), weighted and normalised: {"positive": float, "negative": float}.

    cls_logits [B, A, K] pre-sigmoid; box_deltas [B, A, 4] encoded with weights (10, 10, 5, 5);
    anchors [A, 4] xyxy, shared by the batch; gt_boxes: B arrays [G_b, 4] xyxy; gt_labels: B int
    arrays [G_b] in [0, K). num_objects: ||B|| of Eq. 7; None counts the objects of this batch.
    """
    cfg = Config() if cfg is None else cfg
    cls_logits = np.asarray(cls_logits, np.float64)
    box_deltas = np.asarray(box_deltas, np.float64)
    anchors = np.asarray(anchors, np.float64)
    B, A, K = cls_logits.shape
    assert box_deltas.shape == (B, A, 4) and anchors.shape == (A, 4)
    assert len(gt_boxes) == B and len(gt_labels) == B

    n = min(int(cfg.bag_size), A)  # a bag never holds more anchors than there are (small images)
    positive_sum = 0.0  # sum over objects of -log(bag_prob_i)
    negative_sum = 0.0  # sum over images, anchors, classes of FL(q)
    total_objects = 0

    for b in range(B):
        boxes = np.asarray(gt_boxes[b], np.float64).reshape(-1, 4)  # [G, 4]
        labels = np.asarray(gt_labels[b]).reshape(-1).astype(np.int64)  # [G]
        assert labels.shape[0] == boxes.shape[0]
        G = boxes.shape[0]
        total_objects += G
        p = sigmoid(cls_logits[b])  # [A, K], cls_prob of Eq. 3
        predicted = decode(anchors, box_deltas[b])  # [A, 4], each anchor's predicted box

        p_match = np.zeros((G, A))  # P{a_j -> b_i}
        for i in range(G):
            # Positive, Eqs. 3 and 6: the likelihood that some anchor of the bag detects b_i.
            bag = bag_of(boxes[i], anchors, n)  # [n]
            p_cls = p[bag, labels[i]]  # [n], P_ij^cls
            target = encode(anchors[bag], boxes[i][None])  # [n, 4], the deltas that hit b_i exactly
            p_loc = np.exp(-cfg.loc_weight * np.sum(  # [n], P_ij^loc = exp(-beta L_ij^loc)
                smooth_l1(box_deltas[b, bag] - target, cfg.smooth_l1_beta), axis=1))
            bag_prob = mean_max(p_cls * p_loc)  # Eq. 6
            log_prob = math.log(bag_prob) if bag_prob > 0 else -math.inf
            positive_sum += -max(log_prob, -100.0)  # BCE against 1, log clamped at -100 as torch's

            # §3.2: how well each anchor's *prediction* matches b_i (no gradient in the torch loss).
            iou_loc = box_iou(boxes[i][None], predicted)[0]  # [A]
            p_match[i] = match_prob(iou_loc, cfg.iou_threshold)  # [A]

        # Negative, Eqs. 4 and 7: every anchor and class, discounted by its chance of being a positive.
        p_plus = anchor_positive_prob(p_match, labels, K)  # [A, K]
        negative_sum += focal_negative(p, p_plus, cfg.gamma)

    norm = total_objects if num_objects is None else float(num_objects)  # ||B||
    positive = cfg.alpha * positive_sum / max(1.0, norm)  # 0.0 for a batch without objects
    # n of the configuration, as the authors' normaliser, even where the bags hold fewer (A < n)
    negative = (1.0 - cfg.alpha) * negative_sum / max(1.0, cfg.bag_size * norm)
    return {"positive": float(positive), "negative": float(negative)}
