"""The FreeAnchor loss (Zhang et al., "FreeAnchor: Learning to Match Anchors for Visual Object
Detection", NeurIPS 2019, §3, Eqs. 3-7) and the hand-crafted RetinaNet loss it replaces (Eq. 1).

Instead of assigning each anchor to an object by an IoU threshold, FreeAnchor lets every object
b_i pick its anchors from a bag A_i of candidates (the n anchors that overlap it most) by
maximising a likelihood that rewards both classification and localisation (recall, Eq. 4), while
every anchor that does not clearly predict an object is pushed towards background (precision,
Eq. 6). The Mean-max function (Eq. 5) turns "the best anchor of the bag" into something smooth
enough to train.

Symbols (letters of the shape comments): B images, A anchors, K classes, G objects per image
(padded to the largest count in the batch), n bag size, U anchor-class pairs matched to an object.

    free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels) -> {"positive", "negative"}
    retinanet_loss(same arguments) -> {"classification", "regression"}

Checked against the numpy transcription of the equations in reference/freeanchor_np.py by
`python -m pytest tests/test_freeanchor.py`; timed by `python benchmarks/loss.py`.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model import box_iou, decode, encode

EPS = 1e-12  # the clamps of the authors' code: Mean-max weights, t2 and q of the negative term
ONE_MINUS_Q_MIN = 1.0 - (1.0 - EPS)  # 1 - q once q is clamped to 1 - EPS (9.99978e-13 in float64, not 1e-12)
# clamping q = p to [EPS, 1 - EPS] is clamping its logit to [LOGIT_LOW, LOGIT_HIGH]
LOGIT_LOW = -math.log((1 - EPS) / EPS)
LOGIT_HIGH = math.log((1 - ONE_MINUS_Q_MIN) / ONE_MINUS_Q_MIN)
IOU_CHUNK = 1 << 22  # max elements of one [B, g, A] IoU block: bounds memory for crowded images


@dataclass
class FreeAnchorConfig:
    """The loss's hyper-parameters; `metadata["help"]` becomes train.py's --help for each."""
    bag_size: int = field(default=50, metadata={"help": "n, anchors in each object's bag A_i (paper §4.3: 50)"})
    iou_threshold: float = field(default=0.6, metadata={
        "help": "t, lower knee of the saturated linear P{a_j -> b_i} (paper §4.3: 0.6)"})
    alpha: float = field(default=0.5, metadata={
        "help": "weight of the positive term; the negative one gets 1 - alpha (paper §4.3: 0.5)"})
    gamma: float = field(default=2.0, metadata={"help": "focal exponent of the negative term (paper §4.3: 2.0)"})
    loc_weight: float = field(default=0.75, metadata={
        "help": "beta of Eq. 1, in P_loc = exp(-beta L_loc) (paper §4.3: 0.75)"})
    smooth_l1_beta: float = field(default=0.11, metadata={"help": "SmoothL1 beta of L_loc (authors' code: 0.11)"})


@dataclass
class RetinaNetLossConfig:
    fg_iou: float = 0.5  # IoU >= 0.5: positive (Lin et al. 2017, §4)
    bg_iou: float = 0.4  # IoU < 0.4: negative; in between: ignored (Lin et al. 2017, §4)
    alpha: float = 0.25  # focal loss alpha (Lin et al. 2017, §3.3)
    gamma: float = 2.0  # focal loss gamma (Lin et al. 2017, §3.3)
    smooth_l1_beta: float = 0.11  # authors' code (maskrcnn-benchmark RetinaNet)


def _check_inputs(cls_logits, box_deltas, anchors, gt_boxes, gt_labels):
    B, A, K = cls_logits.shape
    assert box_deltas.shape == (B, A, 4), f"box_deltas {tuple(box_deltas.shape)} != {(B, A, 4)}"
    assert anchors.shape == (A, 4), f"anchors {tuple(anchors.shape)} != {(A, 4)}"
    assert len(gt_boxes) == B and len(gt_labels) == B, "one gt_boxes and one gt_labels tensor per image"
    for boxes, labels in zip(gt_boxes, gt_labels):
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and labels.shape == boxes.shape[:1], \
            f"gt_boxes [G, 4] and gt_labels [G] expected, got {tuple(boxes.shape)} and {tuple(labels.shape)}"
    return B, A, K


def _as_float(t):
    """Half and bfloat16 outputs of an autocast forward are lifted to float32 (design §4)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _pad_objects(gt_boxes, gt_labels, dtype, device):
    """Pad the per-image objects to the batch's largest count so every step is one batched op.

    Returns boxes [B, G, 4], labels [B, G], valid [B, G]. Padding boxes are a harmless unit box
    (finite encode/IoU, so masked-out entries can't leak NaN into gradients) and label 0.
    """
    counts = torch.tensor([len(b) for b in gt_boxes], device=device)  # [B]
    G = int(counts.max()) if len(gt_boxes) else 0
    valid = torch.arange(G, device=device)[None, :] < counts[:, None]  # [B, G]
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=dtype, device=device)
    boxes = unit.repeat(len(gt_boxes), G, 1)  # [B, G, 4]
    labels = torch.zeros(len(gt_boxes), G, dtype=torch.long, device=device)  # [B, G]
    if G > 0:
        boxes[valid] = torch.cat([b.to(device, dtype) for b in gt_boxes])
        labels[valid] = torch.cat([l.to(device, torch.long) for l in gt_labels])
    return boxes, labels, valid


def _top_n(iou, n):
    """Indices [B, g, n] of the n largest IoUs in each row of iou [B, g, A], ties broken towards
    the lower anchor index (as the oracle does). topk alone leaves ties to chance, and they are
    common: every anchor of one shape that lies inside an object has the same IoU with it, and a
    small object's bag is topped up with anchors of IoU 0. A fixed rule makes the loss the same
    on every device and batch layout."""
    B, g, A = iou.shape
    edge = iou.topk(n, dim=2).values[..., -1:]  # [B, g, 1]  the smallest IoU that makes the bag
    row, j = (iou >= edge).view(B * g, A).nonzero(as_tuple=True)  # [C], [C]  candidates, by row then index
    order = torch.sort(iou.view(B * g, A)[row, j], descending=True, stable=True).indices  # [C]  ties keep index order
    order = order[torch.sort(row[order], stable=True).indices]  # [C]  grouped by row again, best first
    row, j = row[order], j[order]  # [C]
    start = torch.searchsorted(row, torch.arange(B * g, device=row.device))  # [B*g]  first candidate of each row
    rank = torch.arange(len(row), device=row.device) - start[row]  # [C]  place within its row
    return j[rank < n].view(B, g, n)  # [B, g, n]


@torch.no_grad()
def _match(anchors, pred_boxes, boxes, labels, valid, n, t, K):
    """Bags and P{a_j in A+}, none of which carries gradient.

    The bag A_i (§3.3) is a set of indices, and P{a_j -> b_i} (Eq. 6) is the saturated linear of
    an IoU with the *detached* prediction: the paper treats both as given, not learned through.

    anchors [A, 4], pred_boxes [B, A, 4] (decoded, detached), boxes [B, G, 4], labels [B, G],
    valid [B, G]. Returns
      bag [B, G, n]: anchor indices of each object's bag (top-n IoU(b_i, a_j), all levels);
      plus_index [U]: flat indices b*A*K + j*K + c of the anchor-class pairs with P{a_j in A+} > 0;
      plus_prob [U]: P{a_j in A+} for class c = max over objects i of class c of P{a_j -> b_i}.
    The [B, G, A] IoU matrices are built in blocks of objects to bound memory (crowded images).
    """
    B, A = pred_boxes.shape[:2]
    G = boxes.shape[1]
    bag = torch.empty(B, G, n, dtype=torch.long, device=boxes.device)  # [B, G, n]
    keys, probs = [], []
    step = max(1, IOU_CHUNK // max(1, B * A))
    for g0 in range(0, G, step):
        box = boxes[:, g0:g0 + step]  # [B, g, 4]
        bag[:, g0:g0 + step] = _top_n(box_iou(box, anchors), n)  # [B, g, n]

        iou_loc = box_iou(box, pred_boxes)  # [B, g, A]  IoU(b_i, decoded prediction of a_j)
        t2 = iou_loc.amax(dim=2, keepdim=True).clamp(min=t + EPS)  # [B, g, 1]
        # saturated linear (Eq. 6), written so that IoU <= t never divides by t2 - t (0 in float32)
        p_match = torch.where(iou_loc > t, (iou_loc - t) / (t2 - t), 0.0).clamp(max=1)  # [B, g, A]
        p_match *= valid[:, g0:g0 + step, None]  # [B, g, A]  padded objects match nothing
        b, i, j = p_match.nonzero(as_tuple=True)  # [E] each
        keys.append((b * A + j) * K + labels[b, i + g0])  # [E]
        probs.append(p_match[b, i, j])  # [E]
    if not keys:
        empty = torch.empty(0, device=boxes.device)
        return bag, empty.long(), empty.to(boxes.dtype)
    # P{a_j in A+} per class: the max over same-class objects, never "last write wins" (Eq. 6)
    plus_index, inverse = torch.unique(torch.cat(keys), return_inverse=True)  # [U], [E]
    plus_prob = torch.zeros(len(plus_index), dtype=boxes.dtype, device=boxes.device)  # [U]
    plus_prob.scatter_reduce_(0, inverse, torch.cat(probs), reduce="amax")  # [U]
    return bag, plus_index, plus_prob


def _focal_terms(q, one_minus_q, gamma):
    """FL(q) = q^gamma * -log(1 - q), dFL/dq, and where q lies inside the authors' clamp
    [EPS, 1 - EPS] (outside it the gradient is zero). 1 - q comes separately so that it can be
    exact where q is close to 1 (float32 would round 1 - q to 0 there)."""
    in_range = (q >= EPS) & (one_minus_q >= ONE_MINUS_Q_MIN)
    q, one_minus_q = q.clamp(EPS, 1 - EPS), one_minus_q.clamp(min=ONE_MINUS_Q_MIN)
    nlog = -torch.log(one_minus_q)
    fl = q.pow(gamma) * nlog
    dfl_dq = torch.where(in_range, gamma * q.pow(gamma - 1) * nlog + q.pow(gamma) / one_minus_q, 0.0)
    return fl, dfl_dq


class _NegativeBagLoss(torch.autograd.Function):
    """Sum over all B*A*K anchor-class pairs of FL(p * (1 - P{a_j in A+})) (Eqs. 6-7, before
    normalisation), plus the bag logits x[bag_index] that the positive term reads.

    Why a custom Function: this term runs over every logit of the batch (201,600 x 80 per COCO
    image) and dominates the cost of the loss. With plain autograd it takes ~10 elementwise passes
    forward, keeps their intermediates, and ~20 more backward; the positive term's gather would
    add a dense zero tensor and a dense sum of gradients. Here one forward computes the value
    *and* the closed-form gradient, and backward scales it and scatters the bag logits'
    gradient into it: about 10 passes in all (benchmarks/loss.py; tests/test_freeanchor.py checks
    it against negative_bag_loss_reference and gradcheck).

    P{a_j in A+} is zero almost everywhere, so the dense pass takes q = p, and the U matched pairs
    (plus_index, plus_prob) are corrected afterwards. In terms of the logit x, with p = sigmoid(x),
    -log(1 - p) = softplus(x) (exact, finite in float32) and
        FL(p) = p^g softplus(x),    dFL/dx = p^g (g (1 - p) softplus(x) + p) = p^g lerp(p, 1, g softplus(x)).
    Clamping q = p to [EPS, 1 - EPS] (authors' code) is clamping x to [LOGIT_LOW, LOGIT_HIGH], with zero
    gradient outside: only done when some logit is out there.
    """

    @staticmethod
    def forward(ctx, cls_logits, plus_index, plus_prob, gamma, bag_index):
        x = cls_logits.detach().contiguous()  # [B, A, K]
        lo, hi = torch.aminmax(x)  # one pass, no allocation: is any q clamped?
        clamped = None
        if lo < LOGIT_LOW or hi > LOGIT_HIGH:
            clamped = (x < LOGIT_LOW) | (x > LOGIT_HIGH)  # [B, A, K]
            x = x.clamp(LOGIT_LOW, LOGIT_HIGH)  # [B, A, K]
        p = torch.sigmoid(x)  # [B, A, K]
        nlog = F.softplus(x)  # [B, A, K]  -log(1 - p)
        p_gamma = p.pow(gamma)  # [B, A, K]
        total = torch.mul(p_gamma, nlog).sum()  # []  sum of FL(p); sum() is pairwise, dot() would lose digits

        # the U pairs with P{a_j in A+} > 0: q = p (1 - P+), and 1 - q = (1 - p) + p P+ exactly
        xs = cls_logits.detach().reshape(-1)[plus_index]  # [U]
        ps = torch.sigmoid(xs)  # [U]
        fl_s, dfl_dq = _focal_terms(ps * (1 - plus_prob), torch.sigmoid(-xs) + ps * plus_prob, gamma)  # [U], [U]
        xsc = xs.clamp(LOGIT_LOW, LOGIT_HIGH)  # [U]
        fl_dense = torch.sigmoid(xsc).pow(gamma) * F.softplus(xsc)  # [U]  what the dense pass counted
        total = total + (fl_s - fl_dense).sum()  # []

        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.lerp(p, torch.ones((), dtype=p.dtype, device=p.device), nlog.mul_(gamma), out=p)  # [B, A, K]
            grad.mul_(p_gamma)  # [B, A, K]  dFL/dx
            if clamped is not None:
                grad.masked_fill_(clamped, 0)  # [B, A, K]
            dq_dx = (1 - plus_prob) * ps * (1 - ps)  # [U]
            grad.view(-1)[plus_index] = dfl_dq * dq_dx  # [B, A, K]  the matched pairs' own gradient
        ctx.save_for_backward(grad, bag_index)
        return total, cls_logits.detach().reshape(-1)[bag_index]

    @staticmethod
    def backward(ctx, grad_total, grad_bag_logits):
        grad, bag_index = ctx.saved_tensors
        grad = grad * grad_total  # [B, A, K]
        if grad_bag_logits is not None:
            grad.view(-1).index_add_(0, bag_index.view(-1), grad_bag_logits.reshape(-1))  # [B, A, K]
        return grad, None, None, None, None


def negative_bag_loss_reference(cls_logits, plus_index, plus_prob, gamma):
    """The negative term written with plain autograd, the slow twin of _NegativeBagLoss (tests
    check the two agree in value and gradient). Builds the dense P{a_j in A+} [B, A, K]."""
    p_plus = torch.zeros(cls_logits.numel(), dtype=cls_logits.dtype, device=cls_logits.device)  # [B*A*K]
    p_plus[plus_index] = plus_prob
    q = torch.sigmoid(cls_logits) * (1 - p_plus.view_as(cls_logits))  # [B, A, K]
    q = q.clamp(EPS, 1 - EPS)  # [B, A, K]
    return (q.pow(gamma) * -torch.log1p(-q)).sum()  # []


def _bag_likelihood(p_cls, box_deltas, anchors, bag, boxes, cfg):
    """P_ij = P_cls_ij * P_loc_ij of every anchor j in the bag of every object i (recall, Eq. 3).

    p_cls [B, G, n] = P_cls_ij; box_deltas [B, A, 4]; anchors [A, 4]; bag [B, G, n]; boxes [B, G, 4].
    P_loc_ij = exp(-beta L_loc_ij), L_loc the SmoothL1 between the predicted deltas and the
    deltas that would move a_j onto b_i. Gradient flows into both factors.
    """
    img = torch.arange(bag.shape[0], device=bag.device)[:, None, None]  # [B, 1, 1]
    target = encode(anchors[bag], boxes[:, :, None, :])  # [B, G, n, 4]  deltas a_j -> b_i
    loss_loc = F.smooth_l1_loss(box_deltas[img, bag], target, beta=cfg.smooth_l1_beta,
                                reduction="none").sum(-1)  # [B, G, n]  L_loc_ij
    p_loc = torch.exp(-cfg.loc_weight * loss_loc)  # [B, G, n]  P_loc_ij
    return p_cls * p_loc  # [B, G, n]  P_ij, the anchor's likelihood for the object


def free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=FreeAnchorConfig(),
                     num_objects=None):
    """FreeAnchor's detection customised likelihood as a loss (Eq. 7).

    cls_logits [B, A, K] pre-sigmoid; box_deltas [B, A, 4] encoded (model.encode); anchors [A, 4]
    xyxy, shared by the batch; gt_boxes: B tensors [G_b, 4] xyxy; gt_labels: B int64 tensors [G_b]
    in [0, K). num_objects: ||B|| of Eq. 7 (None: this batch's object count; train.py passes the
    count averaged over DDP processes). Returns {"positive", "negative"}, weighted and normalised;
    the training loss is their sum. Always computed in float32 (or float64), even under autocast.
    """
    B, A, K = _check_inputs(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    with torch.autocast(cls_logits.device.type, enabled=False):
        cls_logits, box_deltas = _as_float(cls_logits), _as_float(box_deltas)  # [B, A, K], [B, A, 4]
        anchors = anchors.to(box_deltas.dtype)  # [A, 4]
        n = min(cfg.bag_size, A)  # a bag can't hold more anchors than there are (tiny images)
        boxes, labels, valid = _pad_objects(gt_boxes, gt_labels, box_deltas.dtype, box_deltas.device)  # [B, G, 4], [B, G], [B, G]
        if num_objects is None:
            num_objects = valid.sum()
        num_objects = torch.as_tensor(num_objects, dtype=box_deltas.dtype, device=box_deltas.device)  # []  ||B||

        pred_boxes = decode(anchors, box_deltas.detach())  # [B, A, 4]
        bag, plus_index, plus_prob = _match(anchors, pred_boxes, boxes, labels, valid, n, cfg.iou_threshold, K)

        # the bag logits x[b, j, label_i] come out of the fused negative term, so that their
        # gradient lands in the same [B, A, K] tensor (see _NegativeBagLoss)
        img = torch.arange(B, device=bag.device)[:, None, None]  # [B, 1, 1]
        bag_index = (img * A + bag) * K + labels[:, :, None]  # [B, G, n]  flat index into [B, A, K]
        negative, bag_logits = _NegativeBagLoss.apply(cls_logits, plus_index, plus_prob, cfg.gamma, bag_index)  # [], [B, G, n]

        # positive term: recall likelihood of every object's bag (Eqs. 3-5)
        if boxes.shape[1] == 0:
            positive = box_deltas.sum() * 0.0  # []  zero, yet box_deltas get a (zero) gradient for DDP
        else:
            x = _bag_likelihood(torch.sigmoid(bag_logits), box_deltas, anchors, bag, boxes, cfg)  # [B, G, n]
            w = 1 / (1 - x).clamp(min=EPS)  # [B, G, n]  Mean-max weights: they keep their gradient
            bag_prob = (w * x).sum(-1) / w.sum(-1)  # [B, G]  Mean-max(X_i) of Eq. 5
            loss_obj = F.binary_cross_entropy(bag_prob.clamp(max=1), torch.ones_like(bag_prob),
                                              reduction="none")  # [B, G]  -log Mean-max
            positive = cfg.alpha * torch.where(valid, loss_obj, 0.0).sum() / num_objects.clamp(min=1)  # []

        # negative term: precision, every anchor-class pair not clearly matched is background (Eqs. 6-7)
        negative = (1 - cfg.alpha) * negative / (n * num_objects).clamp(min=1)  # []  max(1, n ||B||), as the authors
    return {"positive": positive, "negative": negative}


def retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=RetinaNetLossConfig(),
                   average_count=None):
    """The hand-crafted baseline of Eq. 1: RetinaNet's IoU assignment with focal loss.

    Each anchor takes the object it overlaps most: IoU >= fg_iou is positive, < bg_iou negative,
    in between ignored; every object also keeps the anchors that overlap it best (torchvision's
    low-quality matches: they take their own best object), so small objects are never left
    without a positive. Classification: sigmoid focal loss over all non-ignored anchors and
    classes. Regression: SmoothL1 on the (10, 10, 5, 5) deltas of the positives, averaged over the
    4 coordinates (the authors' RetinaNet baseline divides by 4 x positives: maskrcnn-benchmark's
    BBOX_REG_WEIGHT = 4). Both are normalised by the batch's number of positive anchors, or by
    average_count(that count) when given (train.py: its mean over DDP processes).
    Same inputs as free_anchor_loss; returns {"classification", "regression"}.
    """
    B, A, K = _check_inputs(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    with torch.autocast(cls_logits.device.type, enabled=False):
        cls_logits, box_deltas = _as_float(cls_logits), _as_float(box_deltas)  # [B, A, K], [B, A, 4]
        anchors = anchors.to(box_deltas.dtype)  # [A, 4]
        boxes, labels, valid = _pad_objects(gt_boxes, gt_labels, box_deltas.dtype, box_deltas.device)  # [B, G, 4], [B, G], [B, G]
        G = boxes.shape[1]
        with torch.no_grad():  # the assignment is a fixed rule: no gradient
            best_iou = torch.zeros(B, A, dtype=boxes.dtype, device=boxes.device)  # [B, A]
            best_obj = torch.zeros(B, A, dtype=torch.long, device=boxes.device)  # [B, A]
            low_quality = torch.zeros(B, A, dtype=torch.bool, device=boxes.device)  # [B, A]
            step = max(1, IOU_CHUNK // max(1, B * A))
            for g0 in range(0, G, step):
                iou = box_iou(boxes[:, g0:g0 + step], anchors)  # [B, g, A]
                iou.masked_fill_(~valid[:, g0:g0 + step, None], -1)  # [B, g, A]
                chunk_iou, chunk_obj = iou.max(dim=1)  # [B, A]
                better = chunk_iou > best_iou  # [B, A]  strict: the first object wins ties, like argmax
                best_iou = torch.where(better, chunk_iou, best_iou)  # [B, A]
                best_obj = torch.where(better, chunk_obj + g0, best_obj)  # [B, A]
                obj_best = iou.amax(dim=2, keepdim=True)  # [B, g, 1]
                low_quality |= ((iou == obj_best) & (obj_best > 0)).any(dim=1)  # [B, A]
            positive = (best_iou >= cfg.fg_iou) | low_quality  # [B, A]
            ignored = ~positive & (best_iou >= cfg.bg_iou)  # [B, A]
            cls_target = torch.zeros_like(cls_logits)  # [B, A, K]
            img = torch.arange(B, device=boxes.device)[:, None].expand(B, A)  # [B, A]
            if G > 0:
                cls_target[img[positive], positive.nonzero()[:, 1], labels[img, best_obj][positive]] = 1
            num_pos = positive.sum().float()  # []
            if average_count is not None:
                num_pos = average_count(num_pos)  # []
            num_pos = num_pos.clamp(min=1)  # []

        # sigmoid focal loss (Lin et al. 2017, Eq. 5) on every non-ignored anchor-class pair
        p = torch.sigmoid(cls_logits)  # [B, A, K]
        ce = F.binary_cross_entropy_with_logits(cls_logits, cls_target, reduction="none")  # [B, A, K]
        p_t = p * cls_target + (1 - p) * (1 - cls_target)  # [B, A, K]
        alpha_t = cfg.alpha * cls_target + (1 - cfg.alpha) * (1 - cls_target)  # [B, A, K]
        focal = alpha_t * (1 - p_t).pow(cfg.gamma) * ce  # [B, A, K]
        classification = torch.where(ignored[:, :, None], 0.0, focal).sum() / num_pos  # []

        target = encode(anchors, boxes[img, best_obj]) if G > 0 else box_deltas.detach()  # [B, A, 4]
        loss_loc = F.smooth_l1_loss(box_deltas, target, beta=cfg.smooth_l1_beta, reduction="none")  # [B, A, 4]
        regression = torch.where(positive[:, :, None], loss_loc, 0.0).sum() / (4 * num_pos)  # []
    return {"classification": classification, "regression": regression}


@torch.no_grad()
def bag_weights(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=FreeAnchorConfig()):
    """What the positive term sees, for pictures (the paper's Fig. 4): for each image, the bag of
    every object and the normalised Mean-max weights w_j / sum w of its anchors (Eq. 5) under the
    current predictions. Same inputs as free_anchor_loss; returns a list of B pairs
    (bag [G_b, n] anchor indices, weights [G_b, n] summing to 1 over each bag)."""
    B, A, K = _check_inputs(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    cls_logits, box_deltas = cls_logits.float(), box_deltas.float()  # [B, A, K], [B, A, 4]
    anchors = anchors.to(box_deltas.dtype)  # [A, 4]
    n = min(cfg.bag_size, A)
    boxes, labels, valid = _pad_objects(gt_boxes, gt_labels, box_deltas.dtype, box_deltas.device)  # [B, G, 4], [B, G], [B, G]
    step = max(1, IOU_CHUNK // max(1, B * A))
    bag = torch.cat([_top_n(box_iou(boxes[:, g0:g0 + step], anchors), n)
                     for g0 in range(0, boxes.shape[1], step)], dim=1) if boxes.shape[1] else \
        torch.empty(B, 0, n, dtype=torch.long, device=boxes.device)  # [B, G, n]
    img = torch.arange(B, device=bag.device)[:, None, None]  # [B, 1, 1]
    p_cls = torch.sigmoid(cls_logits[img, bag, labels[:, :, None]])  # [B, G, n]
    x = _bag_likelihood(p_cls, box_deltas, anchors, bag, boxes, cfg)  # [B, G, n]
    w = 1 / (1 - x).clamp(min=EPS)  # [B, G, n]
    w = w / w.sum(-1, keepdim=True)  # [B, G, n]
    return [(bag[b, valid[b]], w[b, valid[b]]) for b in range(B)]
