"""Tests of freeanchor.py: the dense FreeAnchor loss against the numpy oracle
(reference/freeanchor_np.py), its gradients (finite differences of the oracle, gradcheck), its
numerics, the semantics that are easy to get wrong (ties in the bag, P{a_j in A+} as a per-class
max, the normalisation), its shape as GPU code (no data-dependent op, an op count that does not
grow with the batch, one graph under torch.compile), and the RetinaNet baseline.

    python -m pytest tests/test_freeanchor.py
"""

import math

import numpy as np
import pytest
import torch

import freeanchor
from data import pad_targets
from freeanchor import FreeAnchorConfig, RetinaNetLossConfig, free_anchor_loss, retinanet_loss
from model import box_iou, decode, encode
from reference import freeanchor_np as oracle

TERMS = ("positive", "negative")


# ----------------------------------------------------------------------------- batches

def random_boxes(gen, n, size, min_wh=4.0, max_wh=60.0):
    """n xyxy boxes inside a size x size image, float64."""
    wh = min_wh + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (max_wh - min_wh)
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * (size - wh)
    return torch.cat([xy, xy + wh], dim=1)


def make_batch(seed, counts, A=300, K=4, size=128, hit=0.5, logit_scale=2.0, same_box=False):
    """A batch with `counts[b]` objects in image b. Random (jittered) anchors avoid IoU ties; a
    share `hit` of the anchors predicts its best object (plus noise) so that P{a_j in A+} > 0."""
    gen = torch.Generator().manual_seed(seed)
    anchors = random_boxes(gen, A, size, 6.0, 70.0)  # [A, 4]
    gt_boxes, gt_labels = [], []
    for G in counts:
        boxes = random_boxes(gen, G, size, 8.0, 80.0)
        if same_box and G > 1:  # objects of different classes on the very same box
            boxes[1::2] = boxes[0::2][: len(boxes[1::2])]
        gt_boxes.append(boxes)
        gt_labels.append(torch.randint(0, K, (G,), generator=gen))
    B = len(counts)
    cls_logits = torch.randn(B, A, K, generator=gen, dtype=torch.float64) * logit_scale
    box_deltas = torch.randn(B, A, 4, generator=gen, dtype=torch.float64) * 0.3
    for b in range(B):
        if counts[b]:
            best = box_iou(gt_boxes[b], anchors).argmax(0)  # [A]
            hits = torch.rand(A, generator=gen) < hit
            box_deltas[b, hits] = encode(anchors[hits], gt_boxes[b][best[hits]]) + \
                torch.randn(int(hits.sum()), 4, generator=gen, dtype=torch.float64) * 0.2
    return cls_logits, box_deltas, anchors, gt_boxes, gt_labels


def num_matched(box_deltas, anchors, gt_boxes, gt_labels, K, cfg=FreeAnchorConfig()):
    """U, the number of anchor-class pairs with P{a_j in A+} > 0 (to make sure a case tests it)."""
    boxes, labels, valid = freeanchor.pad_objects(gt_boxes, gt_labels, box_deltas.dtype, "cpu")
    n = min(cfg.bag_size, len(anchors))
    _, p_plus = freeanchor.match(anchors, decode(anchors, box_deltas), boxes, labels, valid, n,
                                 cfg.iou_threshold, K)
    return int((p_plus > 0).sum())


def oracle_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=None, num_objects=None):
    return oracle.free_anchor_loss(cls_logits.detach().numpy(), box_deltas.detach().numpy(),
                                   anchors.numpy(), [b.numpy() for b in gt_boxes],
                                   [l.numpy() for l in gt_labels], cfg=cfg, num_objects=num_objects)


def assert_matches_oracle(batch, cfg=FreeAnchorConfig(), num_objects=None, rel=1e-9):
    ours = free_anchor_loss(*batch, cfg=cfg, num_objects=num_objects)
    ref = oracle_loss(*batch, cfg=cfg, num_objects=num_objects)
    for term in TERMS:
        got, want = float(ours[term]), ref[term]
        assert abs(got - want) <= rel * max(abs(want), 1e-300), f"{term}: {got!r} vs oracle {want!r}"
    return ours, ref


# ----------------------------------------------------------------------------- values vs the oracle

@pytest.mark.parametrize("seed", range(20))
def test_random_batches_match_oracle(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    B = 1 + seed % 3
    counts = torch.randint(0, 12, (B,), generator=gen).tolist()
    batch = make_batch(seed, counts, K=2 + seed % 5)
    assert_matches_oracle(batch)


CASES = {
    "image_without_objects": dict(counts=[3, 0, 5]),
    "batch_without_objects": dict(counts=[0, 0]),
    "one_object": dict(counts=[1]),
    "hundred_objects": dict(counts=[110, 4], A=600, size=256),
    "different_classes_sharing_anchors": dict(counts=[6], same_box=True),
    "all_predictions_on_objects": dict(counts=[5], hit=1.0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_cases_match_oracle(name):
    assert_matches_oracle(make_batch(7, **CASES[name]))


def test_large_logits_match_oracle():
    """Logits up to +-40, some beyond the clamp (|x| > 27.6). Here the oracle itself is the less
    accurate one: it evaluates -log(1 - sigmoid(x)) literally, and 1 - p loses ~1e-6 (relative) to
    cancellation in float64 at x ~ 25, where our softplus(x) is exact. Hence 1e-6, not 1e-9."""
    batch = make_batch(7, [4, 2], logit_scale=12.0)
    assert (batch[0].abs() > math.log((1 - freeanchor.EPS) / freeanchor.EPS)).sum() > 20
    assert_matches_oracle(batch, rel=1e-6)


def test_overlapping_objects_of_one_class_match_oracle():
    cls_logits, box_deltas, anchors, _, _ = make_batch(3, [0], A=300, hit=0.0)
    base = torch.tensor([30.0, 30.0, 90.0, 80.0], dtype=torch.float64)
    boxes = torch.stack([base, base + torch.tensor([4.0, 3, 4, 3]), base + torch.tensor([-5.0, 2, 1, 6])])
    labels = torch.tensor([1, 1, 1])
    box_deltas = box_deltas.clone()
    box_deltas[0, ::2] = encode(anchors[::2], boxes[torch.arange(150) % 3])  # predictions on all three
    batch = (cls_logits, box_deltas, anchors, [boxes], [labels])
    assert num_matched(box_deltas, anchors, [boxes], [labels], 4) > 0
    assert_matches_oracle(batch)


def test_boxes_touching_the_border_match_oracle():
    size = 128
    cls_logits, box_deltas, anchors, _, _ = make_batch(5, [0, 0], size=size)
    boxes = torch.tensor([[0.0, 0.0, 40.0, 25.0], [90.0, 100.0, 128.0, 128.0],
                          [0.0, 60.0, 128.0, 90.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 3])
    box_deltas = box_deltas.clone()
    best = box_iou(boxes, anchors).argmax(0)
    box_deltas[0] = encode(anchors, boxes[best])
    batch = (cls_logits, box_deltas, anchors, [boxes, boxes[:1]], [labels, labels[:1]])
    assert_matches_oracle(batch)


def test_fewer_anchors_than_bag_size_match_oracle():
    batch = make_batch(11, [3, 1], A=20)
    assert len(batch[2]) < FreeAnchorConfig().bag_size
    ours, _ = assert_matches_oracle(batch)
    assert all(torch.isfinite(v) for v in ours.values())


def test_non_default_config_matches_oracle():
    cfg = FreeAnchorConfig(bag_size=7, iou_threshold=0.4, alpha=0.3, gamma=1.5, loc_weight=1.1,
                           smooth_l1_beta=0.2)
    assert_matches_oracle(make_batch(13, [4, 6]), cfg=cfg)


def test_num_objects_overrides_the_normaliser():
    batch = make_batch(17, [3, 2])
    assert_matches_oracle(batch, num_objects=2.5)
    assert_matches_oracle(batch, num_objects=0.5)  # floored at 1
    default = free_anchor_loss(*batch)
    explicit = free_anchor_loss(*batch, num_objects=torch.tensor(5.0, dtype=torch.float64))
    for term in TERMS:
        torch.testing.assert_close(default[term], explicit[term])


def test_cases_exercise_p_plus():
    """The oracle comparisons above are only meaningful if P{a_j in A+} is often non-zero."""
    batch = make_batch(0, [5, 3])
    assert num_matched(batch[1], batch[2], batch[3], batch[4], 4) >= 20


def test_iou_blocks_give_the_same_loss(monkeypatch):
    """Crowded images are processed in blocks of objects past MAX_IOU_ELEMENTS; the block size
    must not matter (for either loss)."""
    batch = make_batch(19, [40, 25], A=400)
    whole = free_anchor_loss(*batch)
    whole_retina = retinanet_loss(*batch)
    monkeypatch.setattr(freeanchor, "MAX_IOU_ELEMENTS", 2 * 400 * 7)  # 7 objects per block at most
    sizes = lambda G: [len(range(G)[block]) for block in freeanchor.object_blocks(2, G, 400)]  # noqa: E731
    assert sizes(40) == [5] * 8 and sizes(37) == [5] * 7 + [2] and sizes(7) == [7]  # a power of two of even blocks
    blocks = free_anchor_loss(*batch)
    for term in TERMS:
        torch.testing.assert_close(whole[term], blocks[term])
    for term, value in retinanet_loss(*batch).items():
        torch.testing.assert_close(whole_retina[term], value)


# ----------------------------------------------------------------------------- gradients

def finite_difference(f, x, h=1e-6):
    """Central differences of the scalar numpy function f at the float64 array x."""
    grad = np.zeros_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + h
        up = f(x)
        flat[k] = old - h
        down = f(x)
        flat[k] = old
        g[k] = (up - down) / (2 * h)
    return grad


def test_gradients_match_finite_differences_of_the_oracle():
    """cls_logits: the whole loss (P{a_j in A+} does not depend on the logits). box_deltas: the
    positive term (the negative one reaches box_deltas only through P{a_j in A+}, which carries
    no gradient by design). This also proves the Mean-max weights keep their gradient."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(23, [2, 1], A=30, K=3, size=64)
    assert num_matched(box_deltas, anchors, gt_boxes, gt_labels, 3) > 0
    x = cls_logits.clone().requires_grad_()
    d = box_deltas.clone().requires_grad_()
    out = free_anchor_loss(x, d, anchors, gt_boxes, gt_labels)
    gx, = torch.autograd.grad(out["positive"] + out["negative"], x, retain_graph=True)
    gd, = torch.autograd.grad(out["positive"], d)

    boxes_np, labels_np = [b.numpy() for b in gt_boxes], [l.numpy() for l in gt_labels]
    total = lambda xn: sum(oracle.free_anchor_loss(xn, box_deltas.numpy(), anchors.numpy(), boxes_np, labels_np).values())
    positive = lambda dn: oracle.free_anchor_loss(cls_logits.numpy(), dn, anchors.numpy(), boxes_np, labels_np)["positive"]
    np.testing.assert_allclose(gx.numpy(), finite_difference(total, cls_logits.numpy().copy()), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(gd.numpy(), finite_difference(positive, box_deltas.numpy().copy()), rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_gradcheck_through_logits_and_deltas():
    """Predictions away from the objects: P{a_j in A+} is 0 around this point, so the whole loss
    is differentiable in both inputs and gradcheck sees everything."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(29, [2, 0, 1], A=40, K=3, size=64, hit=0.0)
    box_deltas = box_deltas - 6.0  # tiny predicted boxes: no IoU above t
    assert num_matched(box_deltas, anchors, gt_boxes, gt_labels, 3) == 0
    x = cls_logits.clone().requires_grad_()
    d = box_deltas.clone().requires_grad_()
    total = lambda x, d: sum(free_anchor_loss(x, d, anchors, gt_boxes, gt_labels).values())
    assert torch.autograd.gradcheck(total, (x, d))


@pytest.mark.slow
def test_gradcheck_with_matched_pairs():
    """With P{a_j in A+} > 0: logits through the whole loss, deltas through the positive term."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(31, [3, 1], A=40, K=3, size=64, hit=0.8)
    assert num_matched(box_deltas, anchors, gt_boxes, gt_labels, 3) > 0
    x = cls_logits.clone().requires_grad_()
    d = box_deltas.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sum(free_anchor_loss(x, box_deltas, anchors, gt_boxes, gt_labels).values()), (x,))
    assert torch.autograd.gradcheck(lambda d: free_anchor_loss(cls_logits, d, anchors, gt_boxes, gt_labels)["positive"], (d,))


def test_no_gradient_through_p_plus():
    """The negative term depends on box_deltas (through P{a_j in A+}) but sends them no gradient."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(37, [4], hit=1.0)
    d = box_deltas.clone().requires_grad_()
    negative = free_anchor_loss(cls_logits.requires_grad_(), d, anchors, gt_boxes, gt_labels)["negative"]
    assert torch.autograd.grad(negative, d, allow_unused=True)[0] is None
    moved = free_anchor_loss(cls_logits, box_deltas + 0.3, anchors, gt_boxes, gt_labels)["negative"]
    assert abs(moved.item() - negative.item()) > 1e-6  # yet its value does depend on them


def test_positive_term_is_the_authors_bce_also_for_hopeless_objects():
    """-log Mean-max is computed as the authors do, a BCE against 1, whose backward divides by
    max(p (1 - p), 1e-12): exact while Mean-max p >= 1e-12, damped by p / 1e-12 below. One anchor
    that is the object's own box (P_loc = 1): Mean-max = sigmoid(logit), d(-alpha log p)/dlogit =
    -alpha (1 - p)."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    for logit in (-20.0, -30.0):
        x = torch.full((1, 1, 1), logit, dtype=torch.float64, requires_grad=True)
        out = free_anchor_loss(x, torch.zeros(1, 1, 4, dtype=torch.float64), anchors, [anchors], [torch.tensor([0])])
        grad, = torch.autograd.grad(out["positive"], x)
        p = torch.sigmoid(torch.tensor(logit, dtype=torch.float64))
        assert out["positive"].item() == pytest.approx(-0.5 * math.log(p))
        exact = -0.5 * (1 - p)
        expected = exact if p * (1 - p) >= 1e-12 else exact * p * (1 - p) / 1e-12
        assert grad.item() == pytest.approx(expected.item(), rel=1e-6)
    assert grad.item() == pytest.approx(-0.0468, abs=1e-4)  # logit -30: damped, not -0.5


def test_mean_max_weights_carry_gradient():
    """Detaching the Mean-max weights (a tempting shortcut that lowers AP) changes the gradient,
    and ours is the one of the undetached formula."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(41, [1], A=60, K=2, logit_scale=1.0)
    x = cls_logits.clone().requires_grad_()
    ours, = torch.autograd.grad(free_anchor_loss(x, box_deltas, anchors, gt_boxes, gt_labels)["positive"], x)

    def positive(x, detach):
        bag = freeanchor.bag_indices(box_iou(gt_boxes[0], anchors)[None], 50)[0, 0]
        p_cls = torch.sigmoid(x[0, bag, gt_labels[0][0]])
        target = encode(anchors[bag], gt_boxes[0][0])
        loss_loc = torch.nn.functional.smooth_l1_loss(box_deltas[0, bag], target, beta=0.11, reduction="none").sum(-1)
        p = p_cls * torch.exp(-0.75 * loss_loc)
        w = 1 / (1 - p).clamp(min=1e-12)
        w = w.detach() if detach else w
        return -0.5 * torch.log((w * p).sum() / w.sum())

    undetached, = torch.autograd.grad(positive(x, False), x)
    detached, = torch.autograd.grad(positive(x, True), x)
    torch.testing.assert_close(ours, undetached)
    assert (ours - detached).abs().max() > 1e-3 * ours.abs().max()


# ----------------------------------------------------------------------------- numerics

def test_float32_close_to_float64():
    batch = make_batch(53, [6, 3, 0], A=400)
    ref = free_anchor_loss(*batch)
    f32 = [t.float() if torch.is_tensor(t) else [b.float() if b.is_floating_point() else b for b in t] for t in batch]
    out = free_anchor_loss(*f32)
    for term in TERMS:
        assert out[term].dtype == torch.float32
        assert abs(float(out[term]) - float(ref[term])) <= 1e-4 * abs(float(ref[term]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_stay_finite(dtype):
    """Logits in [-30, 30], predictions exactly on the objects (P_loc = 1, so P_cls * P_loc can
    reach 1 and the Mean-max weights their clamp), tiny and huge boxes: values and gradients finite."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(59, [5, 2], A=200, hit=1.0)
    gt_boxes[1] = torch.tensor([[10.0, 10.0, 11.0, 11.0], [0.0, 0.0, 128.0, 128.0]], dtype=torch.float64)
    for b in range(2):
        box_deltas[b] = encode(anchors, gt_boxes[b][box_iou(gt_boxes[b], anchors).argmax(0)])
    for fill in (30.0, -30.0, None):
        x = (torch.full_like(cls_logits, fill) if fill is not None else
             torch.linspace(-30, 30, cls_logits.numel(), dtype=torch.float64).reshape(cls_logits.shape))
        x = x.to(dtype).requires_grad_()
        d = box_deltas.to(dtype).requires_grad_()
        out = free_anchor_loss(x, d, anchors.to(dtype), [b.to(dtype) for b in gt_boxes], gt_labels)
        (out["positive"] + out["negative"]).backward()
        assert all(torch.isfinite(v) for v in out.values()), (fill, out)
        assert torch.isfinite(x.grad).all() and torch.isfinite(d.grad).all(), fill


def test_nan_outputs_of_a_diverged_network_give_a_nan_loss_not_an_error():
    """A network that diverged outputs NaN: the loss is NaN, for train.py's check to name the
    iteration, and never an error (the BCE of -log Mean-max raises on a NaN input, on a GPU by a
    device-side assert that ends the process)."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(61, [3, 1], A=200)
    for nan_logits, nan_deltas in ((True, False), (False, True), (True, True)):
        x, d = cls_logits.float().clone(), box_deltas.float().clone()
        if nan_logits:
            x[0, :50] = float("nan")
        if nan_deltas:
            d[:] = float("nan")
        x.requires_grad_(), d.requires_grad_()
        out = free_anchor_loss(x, d, anchors.float(), [b.float() for b in gt_boxes], gt_labels)
        (out["positive"] + out["negative"]).backward()
        assert out["positive"].isnan() or out["negative"].isnan(), (nan_logits, nan_deltas, out)


def test_best_prediction_exactly_at_the_threshold_in_float32():
    """An object's best prediction has IoU exactly t (0.6 = 60 / 100 in float32 too): then
    t2 = max(0.6, t + 1e-12) = t in float32, and the saturated linear must give 0, not 0 / 0."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 6.0], [20.0, 20.0, 30.0, 30.0]], dtype=torch.float64)
    boxes, labels = [torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)], [torch.tensor([1])]
    deltas = torch.zeros(1, 2, 4, dtype=torch.float64)  # predictions = anchors: IoU 0.6 and 0
    logits = torch.tensor([[[0.5, -1.0], [1.0, 2.0]]], dtype=torch.float64)
    assert box_iou(boxes[0].float(), anchors.float())[0, 0] == torch.tensor(0.6, dtype=torch.float32)
    want = assert_matches_oracle((logits, deltas, anchors, boxes, labels))[0]
    out = free_anchor_loss(logits.float(), deltas.float(), anchors.float(), [boxes[0].float()], labels)
    for term in TERMS:
        assert abs(float(out[term]) - float(want[term])) <= 1e-6 * float(want[term]), term


def test_float32_loss_under_autocast():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(61, [3, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = free_anchor_loss(cls_logits.bfloat16(), box_deltas.bfloat16(), anchors.float(),
                               [b.float() for b in gt_boxes], gt_labels)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_batch_without_objects_gives_zero_positive_and_zero_gradient():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(67, [0, 0])
    x = cls_logits.clone().requires_grad_()
    d = box_deltas.clone().requires_grad_()
    out = free_anchor_loss(x, d, anchors, gt_boxes, gt_labels)
    assert out["positive"].item() == 0.0 and out["negative"].item() > 0
    (out["positive"] + out["negative"]).backward()
    assert d.grad is not None and torch.equal(d.grad, torch.zeros_like(d))
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- semantics

def test_p_plus_is_a_per_class_max():
    """Two objects of class 1 claim the same predictions with different P{a_j -> b_i}:
    P{a_j in A+} is the larger one whatever the objects' order (never the last written), and the
    other classes of those anchors stay 0."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 11.0], [40.0, 40.0, 60.0, 60.0]],
                           dtype=torch.float64)
    deltas = torch.zeros(1, 3, 4, dtype=torch.float64)  # predictions = anchors
    X = torch.tensor([0.0, 0.0, 10.0, 9.0], dtype=torch.float64)
    Y = torch.tensor([0.0, 0.0, 10.0, 10.5], dtype=torch.float64)
    iou = box_iou(torch.stack([X, Y]), anchors)  # X: 0.9, 0.818 / Y: 0.952, 0.955
    t = 0.6
    p_match = ((iou - t) / (iou.amax(1, keepdim=True) - t)).clamp(0, 1)  # [2, 3]
    assert p_match[0, 1] < 0.8 and p_match[1, 1] == 1.0  # anchor 1: X says 0.73, Y says 1
    assert p_match[0, 0] == 1.0 and 0.98 < p_match[1, 0] < 1.0  # anchor 0: X says 1, Y says 0.99
    K = 3
    for order in ([0, 1], [1, 0]):
        boxes = torch.stack([X, Y])[order]
        padded = freeanchor.pad_objects([boxes], [torch.tensor([1, 1])], torch.float64, "cpu")
        _, p_plus = freeanchor.match(anchors, decode(anchors, deltas), *padded, 2, t, K)
        p_plus = p_plus[0]  # [A, K]
        torch.testing.assert_close(p_plus[:, 1], p_match.amax(0), rtol=0, atol=0)
        assert p_plus[:, [0, 2]].abs().sum() == 0
    batch = (torch.randn(1, 3, K, dtype=torch.float64), deltas, anchors, [torch.stack([X, Y])], [torch.tensor([1, 1])])
    assert_matches_oracle(batch, cfg=FreeAnchorConfig(bag_size=2))


def test_p_plus_with_padding_among_the_objects_and_more_objects_than_classes():
    """P{a_j in A+} per class, computed here object by object, for padded objects given by the
    caller with padding among the objects (label -1 anywhere), classes absent, an image without
    objects, and more objects than classes."""
    g = torch.Generator().manual_seed(5)
    anchors = torch.rand(40, 2, generator=g, dtype=torch.float64) * 60
    anchors = torch.cat([anchors, anchors + 10 + torch.rand(40, 2, generator=g, dtype=torch.float64) * 20], 1)  # [A, 4]
    K, A, t = 4, 40, 0.3
    boxes = anchors[torch.randint(0, A, (3, 7), generator=g)] + torch.rand(3, 7, 4, generator=g, dtype=torch.float64)  # [B, G, 4]
    labels = torch.tensor([[2, -1, 2, 0, -1, 2, 0],  # padding among the objects; classes 1 and 3 absent
                           [-1, -1, -1, -1, -1, -1, -1],  # no objects
                           [3, 1, 0, 2, 1, 3, 0]])  # G = 7 > K = 4
    deltas = torch.randn(3, A, 4, generator=g, dtype=torch.float64) * 0.1
    pred = decode(anchors, deltas)  # [B, A, 4]
    _, p_plus = freeanchor.match(anchors, pred, *freeanchor.pad_objects(boxes, labels, torch.float64, "cpu"), 5, t, K)
    expected = torch.zeros(3, A, K, dtype=torch.float64)
    for b in range(3):
        iou = box_iou(boxes[b], pred[b])  # [G, A]
        t2 = iou.amax(1, keepdim=True).clamp(min=t + freeanchor.EPS)
        p_match = torch.where(iou > t, (iou - t) / (t2 - t), 0.0).clamp(max=1)  # [G, A]
        for i, c in enumerate(labels[b].tolist()):
            if c >= 0:
                expected[b, :, c] = torch.maximum(expected[b, :, c], p_match[i])
    assert (expected[0, :, 2] > 0).any() and (expected[2] > 0).any()  # the case tests something
    torch.testing.assert_close(p_plus, expected, rtol=0, atol=0)


def test_p_plus_max_not_last_write_end_to_end():
    """Same objects, all orders: a last-write implementation would depend on the order."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(71, [6], hit=1.0, K=2)
    gt_labels = [torch.tensor([0, 0, 0, 0, 1, 1])]
    values = []
    for seed in range(4):
        perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        values.append(float(free_anchor_loss(cls_logits, box_deltas, anchors, [gt_boxes[0][perm]],
                                             [gt_labels[0][perm]])["negative"]))
    assert max(values) - min(values) < 1e-12 * abs(values[0])
    assert_matches_oracle((cls_logits, box_deltas, anchors, gt_boxes, gt_labels))


def test_normalised_by_the_objects_of_the_whole_batch():
    """Eq. 7 divides by ||B||, the objects of the batch, not per image: a two-image batch is the
    object-weighted mean of the two images alone."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(73, [2, 6])
    whole = free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    parts = [free_anchor_loss(cls_logits[b:b + 1], box_deltas[b:b + 1], anchors, gt_boxes[b:b + 1], gt_labels[b:b + 1])
             for b in range(2)]
    for term in TERMS:
        expected = (2 * parts[0][term] + 6 * parts[1][term]) / 8
        torch.testing.assert_close(whole[term], expected)


def test_bad_shapes_are_refused():
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(79, [2])
    with pytest.raises(AssertionError, match="box_deltas"):
        free_anchor_loss(cls_logits, box_deltas[:, :-1], anchors, gt_boxes, gt_labels)
    with pytest.raises(AssertionError, match="one gt_boxes"):
        free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes * 2, gt_labels)


# ----------------------------------------------------------------------------- RetinaNet baseline

def test_retinanet_loss_hand_worked_case():
    """One image, five anchors, two objects of classes 0 and 1, K = 2:
      anchor 0 = object A exactly (IoU 1)           -> positive, class 0
      anchor 1 overlaps A by 0.45                   -> ignored
      anchor 2 overlaps A by 0.2                    -> negative
      anchor 3 overlaps B by 0.3, B's best anchor   -> positive (low-quality match), class 1
      anchor 4 far from both                        -> negative
    """
    A_box = [0.0, 0.0, 20.0, 20.0]
    B_box = [100.0, 100.0, 110.0, 130.0]  # 10 x 30
    anchors = torch.tensor([
        A_box,
        [0.0, 0.0, 20.0, 9.0],  # inside A: IoU = 180 / 400 = 0.45
        [0.0, 0.0, 20.0, 4.0],  # IoU = 80 / 400 = 0.2
        [100.0, 100.0, 110.0, 109.0],  # IoU = 90 / 300 = 0.3
        [200.0, 200.0, 220.0, 220.0],
    ], dtype=torch.float64)
    boxes = torch.tensor([A_box, B_box], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(box_iou(boxes, anchors)[0, :3], torch.tensor([1.0, 0.45, 0.2], dtype=torch.float64))
    torch.testing.assert_close(box_iou(boxes, anchors)[1, 3], torch.tensor(0.3, dtype=torch.float64))

    gen = torch.Generator().manual_seed(83)
    x = torch.randn(1, 5, 2, generator=gen, dtype=torch.float64)
    d = torch.randn(1, 5, 4, generator=gen, dtype=torch.float64)
    out = retinanet_loss(x, d, anchors, [boxes], [labels])

    cfg = RetinaNetLossConfig()
    p = torch.sigmoid(x[0])
    target = torch.zeros(5, 2, dtype=torch.float64)
    target[0, 0] = 1
    target[3, 1] = 1

    def focal(p, t):
        p_t = p if t else 1 - p
        a_t = cfg.alpha if t else 1 - cfg.alpha
        return -a_t * (1 - p_t) ** cfg.gamma * math.log(p_t)

    counted = [0, 2, 3, 4]  # anchor 1 is ignored
    expected_cls = sum(focal(float(p[j, c]), int(target[j, c])) for j in counted for c in range(2)) / 2
    sl1 = lambda e: torch.where(e.abs() < cfg.smooth_l1_beta, 0.5 * e ** 2 / cfg.smooth_l1_beta, e.abs() - 0.5 * cfg.smooth_l1_beta)
    expected_reg = (sl1(d[0, 0] - encode(anchors[0], boxes[0])).sum() + sl1(d[0, 3] - encode(anchors[3], boxes[1])).sum()) / (4 * 2)
    assert abs(float(out["classification"]) - expected_cls) < 1e-12
    assert abs(float(out["regression"]) - float(expected_reg)) < 1e-12


def test_retinanet_loss_batched_and_empty_images():
    """Per-image computations stitched together equal the batched call, images without objects
    are pure negatives, and an empty batch gives zero regression with a (zero) gradient."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(89, [3, 0, 5], A=300)
    x = cls_logits.clone().requires_grad_()
    d = box_deltas.clone().requires_grad_()
    out = retinanet_loss(x, d, anchors, gt_boxes, gt_labels)
    assert all(torch.isfinite(v) for v in out.values())
    (out["classification"] + out["regression"]).backward()
    assert x.grad[1].abs().sum() > 0 and d.grad[1].abs().sum() == 0  # image 1: negatives only
    empty = retinanet_loss(x, d, anchors, [gt_boxes[1]] * 3, [gt_labels[1]] * 3)
    assert empty["regression"].item() == 0.0 and empty["classification"].item() > 0


# ----------------------------------------------------------------------------- the shape of the code

def test_ties_in_the_bag_go_to_the_lower_anchor_index():
    """float32 (exact integer key + topk) and float64 (stable sort) pick the same bags, those of a
    stable argsort, on IoUs full of exact ties."""
    gen = torch.Generator().manual_seed(101)
    iou = torch.randint(0, 5, (2, 3, 400), generator=gen).double() / 8  # 5 distinct values, many ties
    want = torch.from_numpy(np.argsort(-iou.numpy(), axis=-1, kind="stable")[..., :50])
    assert torch.equal(freeanchor.bag_indices(iou, 50), want)
    assert torch.equal(freeanchor.bag_indices(iou.float(), 50), want)
    # most IoUs 0, half of them -0.0 (== 0.0): the bags reach into them
    negative_zero = torch.where(torch.rand(iou.shape, generator=gen) < 0.95, 0.0, iou)
    negative_zero = torch.where((negative_zero == 0) & (torch.rand(iou.shape, generator=gen) < 0.5), -0.0, negative_zero)
    want = torch.from_numpy(np.argsort(-(negative_zero + 0.0).numpy(), axis=-1, kind="stable")[..., :50])
    assert torch.equal(freeanchor.bag_indices(negative_zero.float(), 50), want)


def test_a_box_edge_at_negative_zero_is_one_at_zero():
    """A box edge at -0.0 (round(-0.3) gives one) meets an anchor's at 0.0 in an IoU of -0.0, whose
    float32 bits rank below every other IoU unless the bag's key clears the sign: the same loss
    as with the edge at 0.0, in float32 as in float64, also where most anchors tie at IoU 0."""
    x0 = torch.cat([torch.zeros(100), torch.full((100,), 2.0)])
    anchors = torch.stack([x0, torch.zeros(200), x0 + 8, torch.full((200,), 8.0)], 1)  # [200, 4]
    gen = torch.Generator().manual_seed(0)
    cls_logits = torch.randn(1, 200, 2, generator=gen, dtype=torch.float64)
    box_deltas = torch.randn(1, 200, 4, generator=gen, dtype=torch.float64) * 0.1
    for dtype in (torch.float64, torch.float32):
        at_zero, at_negative_zero = (
            free_anchor_loss(cls_logits.to(dtype), box_deltas.to(dtype), anchors.to(dtype),
                             torch.tensor([[[-10.0, 0.0, x2, 8.0]]], dtype=dtype), torch.tensor([[0]]))
            for x2 in (0.0, -0.0))
        for k in at_zero:
            torch.testing.assert_close(at_negative_zero[k], at_zero[k])


@pytest.mark.parametrize("A", [30, 64, 130, 3201, 20000])
@pytest.mark.parametrize("values", ["continuous", "ties", "mostly zero", "clustered", "spread"])
def test_two_stage_bag_equals_one_sort(A, values):
    """bag_indices ranks chunks of BAG_CHUNK anchors first, then the anchors of the best chunks:
    the same n anchors as one stable sort of the whole row, whatever the row's length (a multiple
    of the chunk or not, fewer chunks than n, fewer anchors than n) and wherever the best lie."""
    gen = torch.Generator().manual_seed(A)
    iou = torch.rand(2, 3, A, generator=gen)  # [B, g, A]
    if values == "ties":
        iou = (iou * 4).floor() / 4
    elif values == "mostly zero":
        iou = torch.where(torch.rand(2, 3, A, generator=gen) < 0.99, 0.0, iou)
    elif values == "clustered":  # every anchor of one chunk beats all others
        iou = iou * 0.5
        iou[..., A // 3:A // 3 + freeanchor.BAG_CHUNK] += 0.5
    elif values == "spread":  # one good anchor in each chunk, the rest low and tied
        iou = torch.full((2, 3, A), 0.1)
        iou[..., ::freeanchor.BAG_CHUNK] = torch.rand(2, 3, len(range(0, A, freeanchor.BAG_CHUNK)), generator=gen)
    n = min(50, A)
    want = torch.from_numpy(np.argsort(-iou.numpy(), axis=-1, kind="stable")[..., :n])
    assert torch.equal(freeanchor.bag_indices(iou, n), want)


def test_the_same_gradient_on_every_run_for_a_crowded_image():
    """One image of 200 objects whose bags share anchors, on 2 threads: the same gradients, bit for bit,
    on every run (the predictions read by gathers, whose backward adds in a fixed order; advanced
    indexing's added in parallel there, a different rounding on each run)."""
    from model import grid_anchors
    gen = torch.Generator().manual_seed(0)
    size, G, K = 64, 200, 80
    anchors = grid_anchors([(-(-size // s),) * 2 for s in (8, 16, 32, 64, 128)], (size, size), "cpu")  # [774, 4]
    cls_logits = torch.randn(1, anchors.shape[0], K, generator=gen) - 4
    box_deltas = 0.1 * torch.randn(1, anchors.shape[0], 4, generator=gen)
    xy, wh = 0.8 * size * torch.rand(G, 2, generator=gen), 0.3 * size * torch.rand(G, 2, generator=gen) + 4
    gt_boxes, gt_labels = [torch.cat([xy, (xy + wh).clamp(max=size)], 1)], [torch.randint(0, K, (G,), generator=gen)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for _ in range(6):
            logits, deltas = cls_logits.clone().requires_grad_(), box_deltas.clone().requires_grad_()
            sum(free_anchor_loss(logits, deltas, anchors, gt_boxes, gt_labels).values()).backward()
            runs.append((logits.grad, deltas.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in runs[0])


def test_padded_objects_equal_lists():
    """The padded form train.py's loader yields ([B, G, 4] boxes, [B, G] labels, -1 = padding)
    gives the loss of the lists it pads."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(103, [4, 0, 7])
    boxes = torch.zeros(3, 8, 4, dtype=torch.float64)
    labels = torch.full((3, 8), -1)
    for b, (bx, lb) in enumerate(zip(gt_boxes, gt_labels)):
        boxes[b, :len(bx)], labels[b, :len(lb)] = bx, lb
    lists = free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    padded = free_anchor_loss(cls_logits, box_deltas, anchors, boxes, labels)
    for term in TERMS:
        torch.testing.assert_close(padded[term], lists[term])
    empty = free_anchor_loss(cls_logits, box_deltas, anchors, boxes[:, :0], labels[:, :0])
    assert empty["positive"].item() == 0.0
    for term, value in retinanet_loss(cls_logits, box_deltas, anchors, boxes, labels).items():
        torch.testing.assert_close(value, retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)[term])


class OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op that runs, with the set of dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        self.ops.append((str(func.overloadpacket), tuple(sorted({str(t.dtype) for t in flat if torch.is_tensor(t)}))))
        return func(*args, **(kwargs or {}))


DATA_DEPENDENT = {"aten.nonzero", "aten.unique", "aten._unique2", "aten.unique_dim", "aten.masked_select",
                  "aten._local_scalar_dense", "aten.item", "aten.repeat_interleave", "aten.unique_consecutive",
                  "aten.masked_scatter", "aten.masked_scatter_"}


def recorded_ops(counts, loss=free_anchor_loss, A=300, K=5, padded=False):
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = [
        t.float() if torch.is_tensor(t) else [b.float() if b.is_floating_point() else b for b in t]
        for t in make_batch(107, counts, A=A, K=K)]
    if padded:  # [B, G, 4], [B, G], G = the largest count (0 for a batch without objects)
        gt_boxes, gt_labels = pad_targets(gt_boxes, gt_labels, 1) if max(counts) else (
            torch.zeros(len(counts), 0, 4), torch.zeros(len(counts), 0, dtype=torch.long))
    x, d = cls_logits.requires_grad_(), box_deltas.requires_grad_()
    with OpRecorder() as rec:
        sum(loss(x, d, anchors, gt_boxes, gt_labels).values()).backward()
    return rec.ops


@pytest.mark.parametrize("padded", [False, True], ids=["lists", "padded"])
@pytest.mark.parametrize("loss", [free_anchor_loss, retinanet_loss], ids=["freeanchor", "retinanet"])
def test_no_data_dependent_op_and_as_many_ops_for_any_batch(loss, padded):
    """Forward + backward run the same ops for 2 images of 3 objects as for 6 images of 40 and for
    a batch without objects (padded: G = 0), with the objects given as lists or padded: no
    Python loop over images or objects, no op whose output size depends on the data (no host
    sync on a GPU). Boolean-mask indexing would show up as an index op with a bool index."""
    small = recorded_ops([3, 1], loss, padded=padded)
    for counts in ([0, 0], [40, 2, 17, 5, 0, 9]):
        assert sorted(recorded_ops(counts, loss, padded=padded)) == sorted(small), counts
    names = {name for name, _ in small}
    assert not names & DATA_DEPENDENT, names & DATA_DEPENDENT
    assert not [op for op in small if op[0].startswith("aten.index") and "torch.bool" in op[1]]


class SumRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """The shapes of the tensors each aten.sum reduces, and over which dims (None: all of them)."""

    def __init__(self):
        super().__init__()
        self.sums = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.sum:
            dims = args[1] if len(args) > 1 else (kwargs or {}).get("dim")
            self.sums.append((tuple(args[0].shape), None if dims is None else tuple(dims)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", [free_anchor_loss, retinanet_loss], ids=["freeanchor", "retinanet"])
def test_sums_over_every_logit_run_over_the_classes_first(loss):
    """The terms over all of [B, A, K] sum each anchor's K classes first, then the [B, A] rest.
    Compiled for a symbolic anchor count (train.py --compile --no-fixed-shapes), one sum over the whole of
    [B, A, K] becomes a flat reduction whose every read divides by the symbolic sizes, which on a
    GPU reads the logits and P{a_j in A+} out of order (benchmarks/cuda_kernels.py prints the
    kernels); by rows, the reads keep plain strides."""
    B, A, K = 2, 300, 5
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = [
        t.float() if torch.is_tensor(t) else [b.float() if b.is_floating_point() else b for b in t]
        for t in make_batch(107, [3, 1], A=A, K=K)]
    with SumRecorder() as rec:
        loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    over_logits = [dims for shape, dims in rec.sums if shape == (B, A, K)]
    assert over_logits and all(dims in ((-1,), (2,)) for dims in over_logits), rec.sums


def test_host_data_enters_only_as_the_object_counts():
    """torch.tensor(x, device="cuda") and torch.as_tensor(x, device="cuda") are blocking copies that
    wait for the GPU's queue: a host sync that no op name shows. Host data enters the losses once,
    as the lists' lengths (copied non-blocking); the padding box and a number passed as num_objects
    are made on the device. On the CPU, host data made into a tensor shows as aten.lift_fresh."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(113, [3, 0, 2])
    boxes = torch.zeros(3, 3, 4, dtype=torch.float64)
    labels = torch.full((3, 3), -1)
    for b, (bx, lb) in enumerate(zip(gt_boxes, gt_labels)):
        boxes[b, :len(bx)], labels[b, :len(lb)] = bx, lb
    for targets, host_tensors in (((gt_boxes, gt_labels), 1), ((boxes, labels), 0)):
        for call in (lambda: free_anchor_loss(cls_logits, box_deltas, anchors, *targets),
                     lambda: free_anchor_loss(cls_logits, box_deltas, anchors, *targets, num_objects=2.5),
                     lambda: retinanet_loss(cls_logits, box_deltas, anchors, *targets)):
            with OpRecorder() as rec:
                call()
            assert [name for name, _ in rec.ops].count("aten.lift_fresh") == host_tensors


@pytest.mark.slow
def test_compiles_as_one_graph_without_recompiling_per_object_count():
    """torch.compile(free_anchor_loss): no graph break, one recompilation at most (to dynamic
    shapes) over batches whose object counts vary, the values of eager. aot_eager traces forward
    and backward like the real backend, without spending a minute in the C++ compiler."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    batches = []
    for counts in ([5, 3], [9, 4], [16, 11], [24, 2]):
        cls_logits, box_deltas, anchors, gt_boxes, gt_labels = [
            t.float() if torch.is_tensor(t) else [b.float() if b.is_floating_point() else b for b in t]
            for t in make_batch(109, counts, A=300, K=5)]
        batches.append((cls_logits, box_deltas, anchors, gt_boxes, gt_labels))
    explained = torch._dynamo.explain(free_anchor_loss)(*batches[0])
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(free_anchor_loss, backend=counter)
    for batch in batches:
        x, d = batch[0].clone().requires_grad_(), batch[1].clone().requires_grad_()
        out = compiled(x, d, *batch[2:])
        sum(out.values()).backward()
        want = free_anchor_loss(*batch)
        for term in TERMS:
            torch.testing.assert_close(out[term], want[term])
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 4 object counts"
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_loss_in_blocks_compiles_once_per_number_of_blocks(monkeypatch):
    """Crowded batches, computed in blocks of objects: under torch.compile with G and A dynamic
    (as train.py marks them), object counts that need the same number of blocks (4 here) and are
    multiples of it (train.py pads G to a multiple of 8) share one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    monkeypatch.setattr(freeanchor, "MAX_IOU_ELEMENTS", 2 * 300 * 8)  # G = 17 ... 32: 4 blocks
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(free_anchor_loss, backend=counter)
    for G in (20, 24, 28, 32):
        cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(G, [G - 3, G], A=300, K=5)
        cls_logits, box_deltas = cls_logits.float().requires_grad_(), box_deltas.float().requires_grad_()
        anchors = anchors.float()
        boxes, labels = pad_targets([b.float() for b in gt_boxes], gt_labels, 1)  # [2, G, 4], [2, G]
        for t in (boxes, labels, cls_logits, box_deltas):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        torch._dynamo.maybe_mark_dynamic(anchors, 0)
        out = compiled(cls_logits, box_deltas, anchors, boxes, labels)
        sum(out.values()).backward()
        want = free_anchor_loss(cls_logits, box_deltas, anchors, boxes, labels)
        for term in TERMS:
            torch.testing.assert_close(out[term], want[term])
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 4 object counts in 4 blocks"
    torch._dynamo.reset()


def test_fewer_anchors_than_bag_size_normalise_by_the_configured_n():
    """With A < n the bag holds all A anchors, and the negative term is still divided by n ||B||
    (the authors' normaliser is the configured n). One anchor, one object its prediction misses
    (P{a_j in A+} = 0), logit 0: q = 1/2, negative = (1 - alpha) FL(1/2) / (50 * 1)."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    out = free_anchor_loss(torch.zeros(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, 4, dtype=torch.float64),
                           anchors, [torch.tensor([[50.0, 50.0, 60.0, 60.0]], dtype=torch.float64)], [torch.tensor([0])])
    focal = 0.5 ** 2 * -math.log(0.5)
    assert float(out["negative"]) == pytest.approx(0.5 * focal / 50, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_small_focal_exponents_give_finite_gradients(gamma):
    """An anchor whose prediction is its object's best match has P{a_j in A+} = 1, so q = 0 before
    the clamp; with gamma < 1, q^gamma has an infinite slope there. Values and gradients stay finite
    and match the oracle."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_batch(61, [3, 2], A=120, hit=1.0)
    for b in range(2):  # every anchor predicts its best object exactly
        box_deltas[b] = encode(anchors, gt_boxes[b][box_iou(gt_boxes[b], anchors).argmax(0)])
    cfg = FreeAnchorConfig(gamma=gamma)
    assert_matches_oracle((cls_logits, box_deltas, anchors, gt_boxes, gt_labels), cfg=cfg)
    for dtype in (torch.float32, torch.float64):
        x, d = cls_logits.to(dtype).requires_grad_(), box_deltas.to(dtype).requires_grad_()
        out = free_anchor_loss(x, d, anchors.to(dtype), [g.to(dtype) for g in gt_boxes], gt_labels, cfg)
        (out["positive"] + out["negative"]).backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(d.grad).all(), dtype


def test_compile_loss_turns_off_the_tiling_analysis_that_failed_on_cuda(monkeypatch):
    """freeanchor.compile_loss, through which train.py --compile and the benchmarks compile the losses:
    torch.compile with the caller's arguments and inductor's memory-coalescing analysis of tilings
    off. With dynamic shapes on CUDA that analysis failed an assertion on free_anchor_loss (torch
    2.11, an H200), a failure no CPU run reaches; this checks that the option is passed."""
    import torch._inductor.config
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.update(kwargs) or fn)
    assert freeanchor.compile_loss(free_anchor_loss, dynamic=True) is free_anchor_loss
    assert seen["dynamic"] is True
    off = ({"triton.coalesce_tiling_analysis": False}  # absent in older torch: no option
           if hasattr(torch._inductor.config.triton, "coalesce_tiling_analysis") else {})
    assert seen["options"] == (off or None)
    # a mode becomes its options (torch.compile takes mode or options, not both); the caller's are kept
    freeanchor.compile_loss(free_anchor_loss, mode="max-autotune", options={"max_autotune": False})
    assert "mode" not in seen and seen["options"] == {**torch._inductor.list_mode_options("max-autotune"),
                                                      "max_autotune": False, **off}
