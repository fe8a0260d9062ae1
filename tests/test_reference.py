"""Tests of the numpy oracle `reference/freeanchor_np.py`: a hand-worked loss, box helpers, edge cases.

The expected numbers below are derived by hand in the comments, from the paper's equations
(FreeAnchor §3, Eqs. 3-7), never by calling the oracle's own pieces.
Run with `python -m pytest tests/test_reference.py`.
"""

import math
import warnings

import numpy as np
import pytest

from reference.freeanchor_np import (Config, anchor_positive_prob, box_iou, decode, encode,
                                     free_anchor_loss, match_prob, sigmoid)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def fl(q, gamma=2.0):
    """FL(q) = q^gamma * (-log(1 - q)) with q clamped to [1e-12, 1 - 1e-12]."""
    q = min(max(q, 1e-12), 1 - 1e-12)
    return q ** gamma * -math.log(1 - q)


def mean_max(xs):
    """Eq. 6 by hand: sum_j x_j / (1 - x_j) over sum_j 1 / (1 - x_j)."""
    return sum(x / (1 - x) for x in xs) / sum(1 / (1 - x) for x in xs)


# ----------------------------------------------------------------------------- a hand-worked case
#
# One image, K = 2 classes, A = 4 anchors, one object b = [0, 0, 10, 10] of class 0.
#
#   anchor              IoU(b, anchor)
#   a0 [0, 0, 10, 10]   1
#   a1 [0, 0, 10, 20]   100 / 200 = 0.5
#   a2 [20, 20, 30, 30] 0
#   a3 [5, 0, 15, 10]   50 / 150 = 1/3
#
# encode(anchor, b), weights (10, 10, 5, 5):
#   a0: (0, 0, 0, 0)
#   a1: aw = 10, ah = 20, centre (5, 10); b's centre (5, 5), size 10 x 10
#       -> (10 * 0 / 10, 10 * (5 - 10) / 20, 5 ln(10/10), 5 ln(10/20)) = (0, -2.5, 0, -5 ln 2)
#   a2: centre (25, 25) -> (10 * (5 - 25) / 10, same, 0, 0) = (-20, -20, 0, 0)
#   a3: centre (10, 5)  -> (10 * (5 - 10) / 10, 0, 0, 0) = (-5, 0, 0, 0)
#
# Predictions (box_deltas) and the residual delta - encode(anchor, b):
#   a0: (0.05, 0, 0, 0)        residual (0.05, 0, 0, 0)  SmoothL1: 0.5 * 0.05^2 / 0.11 = 1/88
#   a1: (0, -2.3, 0, -5 ln 2)  residual (0, 0.2, 0, 0)   SmoothL1: 0.2 - 0.055 = 0.145
#   a2: (0, 0, 0, 0)           residual (20, 20, 0, 0)   SmoothL1: 2 * (20 - 0.055) = 39.89
#   a3: (0, 0, 0, 0)           residual (5, 0, 0, 0)     SmoothL1: 5 - 0.055 = 4.945
#   so P_loc = exp(-0.75 * SmoothL1) (beta of Eq. 1).
#
# Logits and cls_prob = sigmoid (class 0, class 1):
#   a0: (ln 4, -ln 3) -> (0.8, 0.25)      a1: (0, 0)        -> (0.5, 0.5)
#   a2: (-ln 3, ln 3) -> (0.25, 0.75)     a3: (0, -ln 4)    -> (0.5, 0.2)
#
# Decoded predictions and their IoU with b (§3.2):
#   a0: centre (5 + 0.05 / 10 * 10, 5) = (5.05, 5), 10 x 10 -> [0.05, 0, 10.05, 10]:
#       inter 9.95 * 10 = 99.5, union 200 - 99.5 = 100.5 -> IoU 199/201
#   a1: centre (5, 10 - 2.3 / 10 * 20) = (5, 5.4), 10 x 20 * 2^-1 = 10 x 10 -> [0, 0.4, 10, 10.4]:
#       inter 10 * 9.6 = 96, union 104 -> IoU 12/13
#   a2: the anchor itself -> 0;  a3: the anchor itself -> 1/3
# t1 = 0.6, t2 = max IoU = 199/201, so P{a_j -> b} = clip((IoU - 0.6) / (199/201 - 0.6), 0, 1):
#   a0: 1;  a1: (12/13 - 3/5) / (199/201 - 3/5) = (21/65) / (392/1005) = 603/728;  a2, a3: 0
# P{a_j in A+}: class 0 column (1, 603/728, 0, 0), class 1 column all 0 (no object of class 1).
# q = cls_prob * (1 - P{a_j in A+}):
#   class 0: (0 -> clamped to 1e-12, 0.5 * 125/728 = 125/1456, 0.25, 0.5)
#   class 1: (0.25, 0.5, 0.75, 0.2)
# Normalisation (Eq. 7): ||B|| = 1; positive * 0.5 / 1; negative * 0.5 / (n * 1).

HAND_ANCHORS = np.array([[0, 0, 10, 10], [0, 0, 10, 20], [20, 20, 30, 30], [5, 0, 15, 10]], float)
HAND_DELTAS = np.array([[0.05, 0, 0, 0], [0, -2.3, 0, -5 * LN2], [0, 0, 0, 0], [0, 0, 0, 0]])
HAND_LOGITS = np.array([[LN4, -LN3], [0, 0], [-LN3, LN3], [0, -LN4]])
HAND_BOX = np.array([[0, 0, 10, 10]], float)
HAND_LABEL = np.array([0])

P_LOC = [math.exp(-0.75 / 88), math.exp(-0.75 * 0.145), math.exp(-0.75 * 39.89), math.exp(-0.75 * 4.945)]
P_CLS = [0.8, 0.5, 0.25, 0.5]  # class 0, the object's class
Q = [1e-12, 125 / 1456, 0.25, 0.5, 0.25, 0.5, 0.75, 0.2]  # class 0 then class 1
HAND_FL_SUM = sum(fl(q) for q in Q)


def hand_loss(cfg=None, num_objects=None):
    return free_anchor_loss(HAND_LOGITS[None], HAND_DELTAS[None], HAND_ANCHORS, [HAND_BOX], [HAND_LABEL],
                            cfg=cfg, num_objects=num_objects)


def test_hand_worked_case_bag_of_two():
    # n = 2: the bag holds a0 and a1 (IoU 1 and 0.5; a3's 1/3 is left out).
    out = hand_loss(Config(bag_size=2))
    bag_prob = mean_max([P_CLS[0] * P_LOC[0], P_CLS[1] * P_LOC[1]])
    assert out["positive"] == pytest.approx(0.5 * -math.log(bag_prob), rel=1e-12)
    assert out["negative"] == pytest.approx(0.5 * HAND_FL_SUM / 2, rel=1e-12)
    # The same numbers written out, as a guard on the hand algebra above.
    # x = (0.8 e^(-3/352), 0.5 e^(-0.10875)) = (0.793211, 0.448477); w = 1/(1 - x) = (4.83584, 1.81318);
    # bag_prob = (3.83584 + 0.81318) / 6.64902; FL sum = 0.779791 + 2 (0.173287 + 0.017980)
    # + 0.008926 + 0.000662 (q = 125/1456) + ~0 (q = 1e-12) = 1.171912.
    assert bag_prob == pytest.approx(0.699203, abs=1e-6)
    assert out["positive"] == pytest.approx(0.5 * 0.357814, abs=1e-6)
    assert out["negative"] == pytest.approx(1.171912 / 4, abs=1e-6)
    # Relabelled: the object of class 1 with the logit columns swapped is the same problem.
    swapped = free_anchor_loss(HAND_LOGITS[None, :, ::-1], HAND_DELTAS[None], HAND_ANCHORS, [HAND_BOX],
                               [np.array([1])], cfg=Config(bag_size=2))
    assert swapped["positive"] == pytest.approx(out["positive"], rel=1e-12)
    assert swapped["negative"] == pytest.approx(out["negative"], rel=1e-12)


def test_hand_worked_case_bag_larger_than_anchor_count():
    # bag_size 50 > A = 4: the bag is every anchor (min(50, 4)), and the negative is still
    # normalised by 50 * ||B||, the authors' normaliser with the configured bag size. The positive
    # term is exactly that of bag_size = 4, the negative 4/50 of it.
    out = hand_loss(Config(bag_size=50))
    bag_prob = mean_max([c * l for c, l in zip(P_CLS, P_LOC)])
    assert out["positive"] == pytest.approx(0.5 * -math.log(bag_prob), rel=1e-12)
    assert out["negative"] == pytest.approx(0.5 * HAND_FL_SUM / 50, rel=1e-12)
    four = hand_loss(Config(bag_size=4))
    assert out["positive"] == four["positive"]
    assert out["negative"] == pytest.approx(four["negative"] * 4 / 50, rel=1e-12)
    assert hand_loss() == out  # cfg=None means the paper's defaults, bag_size 50


def test_bag_by_anchor_iou_and_t2_over_every_anchor():
    # b = [0, 0, 10, 10] of class 0, K = 1, n = 1.
    #   a0 = [0, 0, 10, 10] (IoU 1, the bag), predicting b shifted right by s = 10/9:
    #        delta (10 s / 10, 0, 0, 0) = (10/9, 0, 0, 0); IoU (10 - s) / (10 + s) = 0.8.
    #   a1 = [30, 30, 40, 40] (IoU 0, outside the bag), predicting b exactly:
    #        delta encode(a1, b) = (10 (5 - 35) / 10, same, 0, 0) = (-30, -30, 0, 0); IoU 1.
    # The bag is chosen by the anchors' IoU, not the predictions': A_1 = {a0}, and the mean-max of
    # one x is x itself, so positive = 0.5 * -log(0.5 * exp(-0.75 * (10/9 - 0.055))).
    # t2 = max over every anchor = 1 (a1, outside the bag): P = ((0.8 - 0.6) / 0.4, 1) = (0.5, 1);
    # q = (0.5 * 0.5, 0.75 * 0 -> 1e-12); negative = 0.5 * (FL(0.25) + FL(1e-12)) / (1 * 1).
    anchors = np.array([[0, 0, 10, 10], [30, 30, 40, 40]], float)
    deltas = np.array([[[10 / 9, 0, 0, 0], [-30, -30, 0, 0]]])
    logits = np.array([[[0.0], [LN3]]])
    out = free_anchor_loss(logits, deltas, anchors, [HAND_BOX], [HAND_LABEL], Config(bag_size=1))
    assert out["positive"] == pytest.approx(0.5 * -math.log(0.5 * math.exp(-0.75 * (10 / 9 - 0.055))), rel=1e-12)
    assert out["negative"] == pytest.approx(0.5 * (fl(0.25) + fl(1e-12)), rel=1e-12)


def test_num_objects_sets_the_normaliser():
    # ||B|| = num_objects when given: positive / max(1, ||B||), negative / max(1, n ||B||).
    bag_prob = mean_max([P_CLS[0] * P_LOC[0], P_CLS[1] * P_LOC[1]])
    out = hand_loss(Config(bag_size=2), num_objects=4)
    assert out["positive"] == pytest.approx(0.5 * -math.log(bag_prob) / 4, rel=1e-12)
    assert out["negative"] == pytest.approx(0.5 * HAND_FL_SUM / 8, rel=1e-12)
    out = hand_loss(Config(bag_size=2), num_objects=0.25)  # max(1, .) floors both normalisers at 1
    assert out["positive"] == pytest.approx(0.5 * -math.log(bag_prob), rel=1e-12)
    assert out["negative"] == pytest.approx(0.5 * HAND_FL_SUM, rel=1e-12)


def test_image_without_objects_adds_only_negatives():
    # Image 1 has no object: P{a_j in A+} = 0, so q = cls_prob everywhere; ||B|| stays 1.
    logits1 = np.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.0], [2.0, -0.5]])
    deltas1 = np.full((4, 4), 0.3)
    out = free_anchor_loss(np.stack([HAND_LOGITS, logits1]), np.stack([HAND_DELTAS, deltas1]), HAND_ANCHORS,
                           [HAND_BOX, np.zeros((0, 4))], [HAND_LABEL, np.zeros(0, int)], cfg=Config(bag_size=2))
    image1_fl = sum(fl(1 / (1 + math.exp(-z))) for z in logits1.ravel())
    assert out["positive"] == pytest.approx(hand_loss(Config(bag_size=2))["positive"], rel=1e-12)
    assert out["negative"] == pytest.approx(0.5 * (HAND_FL_SUM + image1_fl) / 2, rel=1e-12)


def test_batch_without_objects():
    logits = np.array([[[1.0, -2.0], [0.5, 3.0]], [[-1.0, 0.0], [2.0, -0.5]]])  # B = 2, A = 2, K = 2
    anchors = np.array([[0, 0, 10, 10], [5, 5, 20, 20]], float)
    out = free_anchor_loss(logits, np.zeros((2, 2, 4)), anchors, [np.zeros((0, 4))] * 2,
                           [np.zeros(0, int)] * 2)
    assert out["positive"] == 0.0
    # ||B|| = 0: negative = 0.5 * sum FL(cls_prob) / max(1, n * 0).
    assert out["negative"] == pytest.approx(0.5 * sum(fl(1 / (1 + math.exp(-z))) for z in logits.ravel()),
                                            rel=1e-12)


def test_negative_q_is_clamped():
    # Logit 40 gives cls_prob = 1 in float64, so q = 1 and -log(1 - q) = inf without the clamp:
    # q -> 1 - 1e-12 gives FL = q^2 * -log(1 - q) = 27.631043, not 12 ln 10 = 27.631021: in float64
    # 1 - (1 - 1e-12) = 9.99978e-13. Logit -40 adds ~1e-35.
    out = free_anchor_loss(np.array([[[40.0, -40.0]]]), np.zeros((1, 1, 4)), np.array([[0.0, 0, 10, 10]]),
                           [np.zeros((0, 4))], [np.zeros(0, int)])
    assert out["negative"] == pytest.approx(0.5 * 27.631043, rel=1e-7)
    assert out["negative"] == pytest.approx(0.5 * fl(1.0), rel=1e-12)


def test_positive_log_is_clamped_at_minus_100():
    # cls_prob = sigmoid(-300) ~ e^-300 makes log(bag_prob) ~ -300: BCE clamps it at -100.
    logits = np.full((1, 4, 2), -300.0)
    out = free_anchor_loss(logits, HAND_DELTAS[None], HAND_ANCHORS, [HAND_BOX], [HAND_LABEL])
    assert out["positive"] == 0.5 * 100.0


# ----------------------------------------------------------------------------- per-class P{a_j in A+}

def test_positive_prob_is_a_per_class_max():
    # Objects 0 and 2 share class 0: its column is their elementwise max, whatever their order;
    # object 1 alone fills class 1; class 2 has no object and stays 0.
    p_match = np.array([[0.2, 0.9, 0.0], [0.7, 0.1, 0.3], [0.5, 0.4, 0.0]])  # [G = 3, A = 3]
    labels = np.array([0, 1, 0])
    expected = np.array([[0.5, 0.7, 0.0], [0.9, 0.1, 0.0], [0.0, 0.3, 0.0]])  # [A, K = 3]
    np.testing.assert_array_equal(anchor_positive_prob(p_match, labels, 3), expected)
    np.testing.assert_array_equal(anchor_positive_prob(p_match[::-1], labels[::-1], 3), expected)


def test_loss_does_not_depend_on_object_order():
    # Two class-0 objects: anchor 0's prediction matches the first exactly (P = 1) and misses the
    # second (P = 0). A "last write wins" P{a_j in A+} would change the negative with the order.
    anchors = np.array([[0, 0, 10, 10], [40, 40, 50, 50], [0, 0, 12, 12], [38, 38, 50, 50]], float)
    boxes = np.array([[0, 0, 10, 10], [40, 40, 52, 52], [1, 1, 9, 9]], float)
    labels = np.array([0, 0, 1])
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 4, 2))
    deltas = 0.1 * rng.normal(size=(1, 4, 4))
    deltas[0, 0] = 0.0  # anchor 0 predicts object 0 exactly
    cfg = Config(bag_size=2)
    out = free_anchor_loss(logits, deltas, anchors, [boxes], [labels], cfg)
    for order in ([1, 0, 2], [2, 1, 0], [0, 2, 1]):
        other = free_anchor_loss(logits, deltas, anchors, [boxes[order]], [labels[order]], cfg)
        assert other["positive"] == pytest.approx(out["positive"], rel=1e-12)
        assert other["negative"] == pytest.approx(out["negative"], rel=1e-12)


def test_match_prob_saturated_linear():
    # t1 = 0.6, t2 = max IoU = 0.8: 0 below 0.6, 1 at 0.8, linear between.
    np.testing.assert_allclose(match_prob(np.array([0.1, 0.6, 0.7, 0.8]), 0.6), [0, 0, 0.5, 1], atol=1e-12)
    # No prediction above t: t2 is floored at t + 1e-12 and every probability is 0.
    np.testing.assert_array_equal(match_prob(np.array([0.1, 0.5, 0.59]), 0.6), [0, 0, 0])


# ----------------------------------------------------------------------------- helpers

def test_sigmoid_is_stable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning either
        p = sigmoid(np.array([-1000.0, -LN3, 0.0, LN4, 1000.0]))
    np.testing.assert_allclose(p, [0.0, 0.25, 0.5, 0.8, 1.0], rtol=1e-15, atol=0)


def test_box_iou_known_boxes():
    a = np.array([[0, 0, 2, 2], [0, 0, 10, 10], [0, 0, 0, 0]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]], float)
    expected = np.array([[1 / 7, 4 / 100, 0, 0],  # overlap 1 of union 4 + 4 - 1; 2x2 inside 10x10
                         [4 / 100, 1, 0, 0],  # [1, 1, 3, 3] inside [0, 0, 10, 10]
                         [0, 0, 0, 0]])  # zero-area boxes: 0, never NaN
    np.testing.assert_allclose(box_iou(a, b), expected, rtol=1e-15)


def test_encode_known_and_decode_round_trip():
    np.testing.assert_allclose(encode(HAND_ANCHORS, HAND_BOX),
                               [[0, 0, 0, 0], [0, -2.5, 0, -5 * LN2], [-20, -20, 0, 0], [-5, 0, 0, 0]],
                               atol=1e-12)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 500, size=(2, 100, 2))
    wh = rng.uniform(10, 300, size=(2, 100, 2))  # size ratios below the clamp e^(log(1000/16)) = 62.5
    anchors, boxes = (np.concatenate([xy[k], xy[k] + wh[k]], axis=1) for k in range(2))
    np.testing.assert_allclose(decode(anchors, encode(anchors, boxes)), boxes, rtol=1e-12, atol=1e-9)
    deltas = rng.normal(size=(100, 4))
    np.testing.assert_allclose(encode(anchors, decode(anchors, deltas)), deltas, atol=1e-9)


def test_decode_clamps_width_and_height():
    # dw / 5 = 100 is clamped to log(1000/16): the box grows by 62.5, not e^100.
    box = decode(np.array([0.0, 0, 10, 10]), np.array([0.0, 0, 500, 500]))
    np.testing.assert_allclose(box, [5 - 312.5, 5 - 312.5, 5 + 312.5, 5 + 312.5], rtol=1e-12)


def test_box_helpers_match_torchvision():
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    det_utils = pytest.importorskip("torchvision.models.detection._utils")
    coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 500, size=(2, 200, 2))
    wh = rng.uniform(1, 300, size=(2, 200, 2))
    anchors, boxes = (np.concatenate([xy[k], xy[k] + wh[k]], axis=1) for k in range(2))
    deltas = 2 * rng.normal(size=(200, 4))
    deltas[:5, 2:] = 40.0  # past the clamp
    t = torch.from_numpy
    np.testing.assert_allclose(encode(anchors, boxes), coder.encode_single(t(boxes), t(anchors)).numpy(),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(decode(anchors, deltas), coder.decode_single(t(deltas), t(anchors)).numpy(),
                               rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(box_iou(anchors, boxes), ops.box_iou(t(anchors), t(boxes)).numpy(),
                               rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- scale

def test_runs_a_realistic_batch():
    # A = 5000 anchors, K = 5 classes, G = 100 objects per image: finite, positive values.
    rng = np.random.default_rng(3)
    B, A, K, G = 2, 5000, 5, 100
    xy = rng.uniform(0, 800, size=(A, 2))
    anchors = np.concatenate([xy, xy + rng.uniform(16, 256, size=(A, 2))], axis=1)
    gt_boxes, gt_labels = [], []
    for _ in range(B):
        gxy = rng.uniform(0, 800, size=(G, 2))
        gt_boxes.append(np.concatenate([gxy, gxy + rng.uniform(8, 300, size=(G, 2))], axis=1))
        gt_labels.append(rng.integers(0, K, size=G))
    out = free_anchor_loss(rng.uniform(-30, 30, size=(B, A, K)), rng.normal(size=(B, A, 4)), anchors,
                           gt_boxes, gt_labels)
    assert all(math.isfinite(v) and v > 0 for v in out.values())
