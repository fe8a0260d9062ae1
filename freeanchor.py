"""The FreeAnchor loss (Zhang et al., "FreeAnchor: Learning to Match Anchors for Visual Object
Detection", NeurIPS 2019, §3, Eqs. 3-7) and the hand-crafted RetinaNet loss it replaces (Eq. 1).

Instead of assigning each anchor to an object by an IoU threshold, FreeAnchor lets every object
b_i pick its anchors from a bag A_i of candidates (the n anchors that overlap it most) by
maximising a likelihood that rewards both classification and localisation (recall, Eq. 3),
while every anchor that does not clearly predict an object is pushed towards background
(precision, Eq. 4). Eq. 5 is the product of the two likelihoods; Eq. 7 is the loss: its -log, with
the max over each bag made smooth enough to train by the Mean-max function (Eq. 6) and the
precision term weighted as a focal loss.

Letters of the shape comments: B images, A anchors, K classes, G objects per image (padded to at
least the largest count in the batch), n bag size; g the objects of one block (object_blocks),
m = min(n, number of anchor chunks) (bag_indices).

    free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels) -> {"positive", "negative"}
    retinanet_loss(same arguments) -> {"classification", "regression"}
    compile_loss(free_anchor_loss) -> the loss under torch.compile, as train.py --compile runs it

The two losses are dense tensor code on padded [B, G, ...] shapes: no Python loop over images or objects
(only over blocks of objects, where [B, G, A] would exceed 2^28 elements), no op whose output size
depends on the data, no host-device synchronisation, so the same handful of kernels runs for any
batch and `torch.compile(free_anchor_loss)` traces it as one graph.
Checked against the numpy transcription of the equations in reference/freeanchor_np.py by
`python -m pytest tests/test_freeanchor.py`; timed by `python benchmarks/loss.py`.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from model import box_iou, decode, encode

EPS = 1e-12  # the clamp of the authors' code: Mean-max weights, t2, and q of the negative term
# 1 - q once q is clamped to 1 - EPS: 9.99978e-13 in float64, not 1e-12 (see the negative term)
ONE_MINUS_Q_MIN = 1.0 - (1.0 - EPS)
MAX_IOU_ELEMENTS = 1 << 28  # IoU matrices [B, G, A] larger than this are built in blocks of objects
BAG_CHUNK = 64  # anchors per chunk of the bag's two-stage top-n (bag_indices): any size gives the same bag


@dataclass(frozen=True)
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
    smooth_l1_beta: float = field(default=0.11, metadata={"help": "SmoothL1's transition point in L_loc, not the paper's beta (authors' code: 0.11)"})


@dataclass(frozen=True)
class RetinaNetLossConfig:
    fg_iou: float = 0.5  # IoU >= 0.5: positive (Lin et al. 2017, §4)
    bg_iou: float = 0.4  # IoU < 0.4: negative; in between: ignored (Lin et al. 2017, §4)
    alpha: float = 0.25  # focal loss alpha (Lin et al. 2017, §4.1)
    gamma: float = 2.0  # focal loss gamma (Lin et al. 2017, §4.1)
    smooth_l1_beta: float = 0.11  # authors' code (maskrcnn-benchmark RetinaNet)


# ----------------------------------------------------------------------------- inputs

def _inputs(cls_logits, box_deltas, anchors, gt_boxes, gt_labels):
    """The losses' inputs checked and made dense, under autocast(enabled=False): the predictions
    lifted to float32 where an autocast forward gave half or bfloat16 (the loss is always
    computed in float32, or float64), the anchors in their dtype, the objects padded
    (pad_objects). -> cls_logits [B, A, K], box_deltas [B, A, 4], anchors [A, 4], boxes [B, G, 4],
    labels [B, G], valid [B, G]."""
    B, A, K = cls_logits.shape
    assert box_deltas.shape == (B, A, 4), f"box_deltas {tuple(box_deltas.shape)} != {(B, A, 4)}"
    assert anchors.shape == (A, 4), f"anchors {tuple(anchors.shape)} != {(A, 4)}"
    cls_logits, box_deltas = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                              for t in (cls_logits, box_deltas)]  # [B, A, K], [B, A, 4]
    anchors = anchors.to(box_deltas.dtype)  # [A, 4]
    boxes, labels, valid = pad_objects(gt_boxes, gt_labels, box_deltas.dtype, box_deltas.device)  # [B, G, 4], [B, G], [B, G]
    assert boxes.shape[0] == B, f"{boxes.shape[0]} images of objects for a batch of {B}"
    return cls_logits, box_deltas, anchors, boxes, labels, valid


def unit_box(dtype, device):
    """(0, 0, 1, 1), the box of the padding objects [4], computed on the device: torch.tensor(...,
    device="cuda") would be a blocking host-to-device copy, which waits for the GPU's queue."""
    return (torch.arange(4, device=device) >= 2).to(dtype)  # [4]  0, 0, 1, 1


def pad_objects(gt_boxes, gt_labels, dtype, device):
    """The objects of a batch as dense tensors: boxes [B, G, 4], labels [B, G], valid [B, G].

    gt_boxes, gt_labels: lists of B tensors [G_b, 4] and [G_b], labels in [0, K); or already
    padded, a tensor [B, G, 4] and labels [B, G] that are -1 at the padding (what data.to_device
    gives train.py, and what torch.compile wants: a list's length and which of its images are
    empty are Python structure, which torch.compile specialises on, a graph for each). G is at
    least 1, so that an empty batch needs no special case. Padding is a harmless unit box (finite
    encode and IoU, so masked-out entries can't leak NaN into gradients) with label 0.
    No host-device synchronisation: the lists' lengths, known on the host, are copied non-blocking;
    the padding box is made on the device. (On a GPU a non-blocking copy from ordinary host memory
    can still wait for the GPU's queue: train.py passes padded tensors, copied from pinned memory.)
    """
    if not torch.is_tensor(gt_boxes):
        assert len(gt_boxes) == len(gt_labels), "one gt_boxes and one gt_labels tensor per image"
        for boxes, labels in zip(gt_boxes, gt_labels):
            assert boxes.ndim == 2 and boxes.shape[1] == 4 and labels.shape == boxes.shape[:1], \
                f"gt_boxes [G, 4] and gt_labels [G] expected, got {tuple(boxes.shape)} and {tuple(labels.shape)}"
        counts = [boxes.shape[0] for boxes in gt_boxes]  # host ints
        G, N = max([1, *counts]), sum(counts)
        counts = torch.tensor(counts, dtype=torch.long).to(device, non_blocking=True)  # [B]
        start = counts.cumsum(0) - counts  # [B]  where each image's objects begin in the concatenation
        slot = torch.arange(G, device=device)  # [G]
        # object `slot` of image b is row start_b + slot of the concatenated lists; padding reads
        # row N, an appended padding object (gathered, not scattered: the same ops for any counts)
        row = torch.where(slot < counts[:, None], start[:, None] + slot, N)  # [B, G]
        gt_boxes = F.pad(torch.cat(gt_boxes).to(device, dtype), (0, 0, 0, 1))[row]  # [B, G, 4]
        gt_labels = F.pad(torch.cat(gt_labels).to(device, torch.long), (0, 1), value=-1)[row]  # [B, G]  -1: padding
    B, G = gt_labels.shape
    assert gt_boxes.shape == (B, G, 4), f"padded gt_boxes {tuple(gt_boxes.shape)} != {(B, G, 4)}"
    # at least one object, a padding one in a batch without objects (the same ops for any G);
    # G below stands for max(G, 1)
    gt_boxes = F.pad(gt_boxes, (0, 0, 0, max(0, 1 - G)))  # [B, G, 4]
    gt_labels = F.pad(gt_labels, (0, max(0, 1 - G)), value=-1)  # [B, G]
    valid = (gt_labels >= 0).to(device)  # [B, G]
    boxes = torch.where(valid[..., None], gt_boxes.to(device, dtype), unit_box(dtype, device))  # [B, G, 4]
    labels = gt_labels.to(device).clamp(min=0)  # [B, G]  padding: class 0, masked out by `valid`
    return boxes, labels, valid


def object_blocks(B, G, A):
    """Slices of the object dimension such that each [B, g, A] IoU matrix holds about
    MAX_IOU_ELEMENTS at most: one slice (all objects) unless images are crowded and large, so the
    matching's memory stays bounded for datasets with hundreds of objects per image (eager, it
    peaks at about 25 bytes per element of a block: the IoU, box_iou's temporaries and the bag's
    int64 keys, 6.7 GB at 2^28; measured on a CPU).
    The objects are split into `blocks` (a power of two) slices of ceil(G / blocks), fewer where
    the last ones would be empty (G = 20 in 8 blocks: 7 slices of 3): under torch.compile,
    where G and A are symbolic, the graph depends on the number of blocks, so object counts that
    are multiples of it (train.py pads G to a multiple of 8) share one graph, and the loss compiles
    again when B G A crosses 2^28 times a power of two, not for each object count."""
    blocks = 1
    while B * G * A > blocks * MAX_IOU_ELEMENTS and blocks < G:
        blocks *= 2
    if blocks == 1:
        return [slice(None)]
    step = -(-G // blocks)  # ceil(G / blocks)
    return [slice(i * step, (i + 1) * step) for i in range(blocks) if i * step < G]


# ----------------------------------------------------------------------------- matching (no gradient)

@torch.no_grad()
def bag_indices(iou, n):
    """The bag A_i of each object (§3.3): indices [B, g, n] of the n anchors with the largest
    IoU(b_i, a_j) in each row of iou [B, g, A], over all levels, without threshold.

    Ties are common (every anchor of one shape inside an object has the same IoU with it, and a
    small object's bag is topped up with anchors of IoU 0) and topk leaves them to the device.
    They go to the lower anchor index, so that the loss is the same on every device: in float32,
    the ranking is on an exact integer key, the IoU's bits (monotonic for IoU >= 0, its sign
    cleared) above the reversed anchor index; in float64 (tests), a stable sort does the same.

    A top-n over all A anchors reads each row many times (one pass per radix digit on a GPU), so it
    runs in two stages: first the n chunks of BAG_CHUNK neighbouring anchors whose best key ranks
    highest, then the top-n of those n * BAG_CHUNK candidates. Exact: each chunk that ranks above
    the chunk of one of the n best anchors holds an anchor better than that one, and fewer than n
    anchors are better, so that chunk is among the n best chunks.
    """
    A = iou.shape[-1]
    if iou.dtype != torch.float32:
        return torch.sort(iou, dim=-1, descending=True, stable=True).indices[..., :n]  # [B, g, n]
    reverse_index = torch.arange(A - 1, -1, -1, device=iou.device)  # [A]  A-1 ... 0
    # abs: an IoU of -0.0 (a box edge at -0.0 meeting an anchor's at 0.0) has the sign bit set, so
    # its bits would rank below every other IoU, and below the padding
    key = (iou.abs().view(torch.int32).long() << 32) | reverse_index  # [B, g, A]  IoU first, then lower index
    chunks = -(-A // BAG_CHUNK)
    key = F.pad(key, (0, chunks * BAG_CHUNK - A), value=-1)  # [B, g, chunks * BAG_CHUNK]  padding ranks last
    key = key.unflatten(-1, (chunks, BAG_CHUNK))  # [B, g, chunks, BAG_CHUNK]
    best_chunks = key.amax(-1).topk(min(n, chunks), dim=-1).indices  # [B, g, m], m = min(n, chunks)
    candidates = key.gather(2, best_chunks[..., None].expand(-1, -1, -1, BAG_CHUNK))  # [B, g, m, BAG_CHUNK]
    best = candidates.flatten(2).topk(n, dim=-1).values  # [B, g, n]  keys, best first
    return A - 1 - (best & 0xFFFFFFFF)  # [B, g, n]  the anchor index, from the key's low bits


@torch.no_grad()
def match(anchors, pred_boxes, boxes, labels, valid, n, t, K):
    """Bags and P{a_j in A+}: the parts of the loss that the paper treats as given, without
    gradient. The bag is a set of indices; P{a_j -> b_i} (§3.2), the probability that anchor a_j
    already predicts object b_i, comes from the IoU of b_i with a_j's predicted box and is not
    learned through: it only decides which anchors the negative term leaves alone.

    anchors [A, 4], pred_boxes [B, A, 4] (decoded predictions), boxes [B, G, 4], labels [B, G],
    valid [B, G]; n the bag size, t the IoU threshold of P{a_j -> b_i}, K the classes. Returns
    bag [B, G, n] anchor indices and p_plus [B, A, K] = P{a_j in A+} per class: the max of
    P{a_j -> b_i} over the objects i of class c (0 with no object of class c), a transposed view of
    a [B, K, A] tensor.
    """
    B, G = labels.shape
    A = anchors.shape[0]
    bag = torch.empty(B, G, n, dtype=torch.long, device=boxes.device)  # [B, G, n]
    # class-major: each object's row of P{a_j -> b_i} lands in one contiguous row of its class
    # (on an H200 the scatter and one read in [B, A, K] order take 2.1 ms at B = 16 and 52
    # objects, against 7.0 ms for a scatter into [B, A, K], whose writes are K apart)
    p_plus = torch.zeros(B, K, A, dtype=boxes.dtype, device=boxes.device)  # [B, K, A]
    for block in object_blocks(B, G, A):
        bag[:, block] = bag_indices(box_iou(boxes[:, block], anchors), n)  # [B, g, n]
        iou_loc = box_iou(boxes[:, block], pred_boxes)  # [B, g, A]  IoU(b_i, prediction of a_j)
        # t2, the upper knee of the saturated linear: each object's best IoU_loc, kept above t
        t2 = iou_loc.amax(dim=2, keepdim=True).clamp(min=t + EPS)  # [B, g, 1]
        # saturated linear (§3.2); where IoU <= t the quotient is discarded, so t2 - t = 0 (all IoU <= t:
        # t + EPS rounds to t in float32) does no harm
        p_match = torch.where(iou_loc > t, (iou_loc - t) / (t2 - t), 0.0).clamp(max=1)  # [B, g, A]
        p_match = p_match * valid[:, block, None]  # [B, g, A]  padding objects match nothing
        # P{a_j in A+}[b, j, c] = max over objects i of class c: a scatter-max along the classes
        # (a max, never "last write wins", whatever the order of the objects)
        p_plus.scatter_reduce_(1, labels[:, block, None].expand(-1, -1, A), p_match, reduce="amax")  # [B, K, A]
    return bag, p_plus.transpose(1, 2)  # [B, G, n], [B, A, K] (a view)


# ----------------------------------------------------------------------------- the FreeAnchor loss

def bag_likelihood(cls_logits, box_deltas, anchors, bag, boxes, labels, cfg):
    """P_ij = P_cls_ij * P_loc_ij of every anchor j in the bag of every object i (Eq. 3): [B, G, n].

    P_cls_ij = sigmoid(cls_logits)[j, label_i]; P_loc_ij = exp(-beta L_loc_ij) (beta of Eq. 1,
    cfg.loc_weight), L_loc the SmoothL1 between the predicted deltas and those that would move a_j
    onto b_i. Gradient flows into both.

    The predictions are read with gathers, not advanced indexing (cls_logits[img, bag, labels]): the
    backward of a gather adds each anchor's share of the gradient in a fixed order, where that of
    advanced indexing, on a CPU with several threads, adds them in parallel once the bags hold 32768
    values (one image with about 160 objects): another rounding on each run.
    """
    B, G, n = bag.shape
    K = cls_logits.shape[-1]
    logit = cls_logits.flatten(1).gather(1, (bag * K + labels[:, :, None]).flatten(1))  # [B, G n]  row j, column label_i
    p_cls = torch.sigmoid(logit).view(B, G, n)  # [B, G, n]  P_cls_ij
    deltas = box_deltas.gather(1, bag.flatten(1)[..., None].expand(-1, -1, 4)).view(B, G, n, 4)  # [B, G, n, 4]
    target = encode(anchors[bag], boxes[:, :, None, :])  # [B, G, n, 4]  deltas a_j -> b_i
    loss_loc = F.smooth_l1_loss(deltas, target, beta=cfg.smooth_l1_beta, reduction="none").sum(-1)  # [B, G, n]  L_loc_ij
    p_loc = torch.exp(-cfg.loc_weight * loss_loc)  # [B, G, n]  P_loc_ij
    return p_cls * p_loc  # [B, G, n]


def mean_max_weights(x):
    """w_j = 1 / (1 - x_j) of Mean-max (Eq. 6), x [B, G, n] -> [B, G, n]. They keep their gradient:
    detaching them is a tempting shortcut that lowers AP."""
    return 1 / (1 - x).clamp(min=EPS)  # [B, G, n]


def negative_focal_sum(cls_logits, p_plus, gamma):
    """The sum of FL(q) = q^gamma (-log(1 - q)) over every anchor and class (Eq. 4 as Eq. 7 weighs it),
    q = P{a_j in A-} (1 - P_bg) per class = P_cls (1 - P{a_j in A+}). cls_logits [B, A, K],
    p_plus [B, A, K] = P{a_j in A+} (match's; no gradient) -> [].
    1 - q as (1 - P_cls) + P_cls P{a_j in A+}: exact where float32 rounds P_cls to 1 (logits > 17).
    The authors clamp q to [EPS, 1 - EPS]: the upper clamp is that of 1 - q below, at the value 1 - q
    takes in float64 at q = 1 - EPS (in float32, 1 - EPS rounds to 1, and a clamp of q would do
    nothing); the lower one only matters for gamma < 1, where q^gamma has an infinite slope at q = 0.
    The sum runs over each anchor's K classes first, then over the anchors: under torch.compile
    with a symbolic A (train.py), one sum over all of [B, A, K] became a flat reduction whose every
    read divides by the symbolic sizes, which reads P{a_j in A+} (a transposed view) and the
    logits out of order; summed by rows, both are read with plain strides, as for a fixed A
    (benchmarks/cuda_kernels.py shows the CUDA kernels)."""
    p = torch.sigmoid(cls_logits)  # [B, A, K]  P_cls
    p_taken = p * p_plus  # [B, A, K]  P_cls P{a_j in A+}
    q = p - p_taken  # [B, A, K]
    if gamma < 1:
        q = q.clamp(min=EPS)  # [B, A, K]
    one_minus_q = (torch.sigmoid(-cls_logits) + p_taken).clamp(min=ONE_MINUS_Q_MIN)  # [B, A, K]
    return -(q.pow(gamma) * torch.log(one_minus_q)).sum(-1).sum()  # []  FL(q) summed over the classes ([B, A]), then the rest


def free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=FreeAnchorConfig(),
                     num_objects=None):
    """FreeAnchor's detection customised likelihood as a loss (Eq. 7).

    cls_logits [B, A, K] pre-sigmoid; box_deltas [B, A, 4] encoded (model.encode); anchors [A, 4]
    xyxy, shared by the batch; gt_boxes: B tensors [G_b, 4] xyxy; gt_labels: B int64 tensors [G_b]
    in [0, K) (or both padded, see pad_objects). num_objects: ||B|| of Eq. 7 (None: this batch's
    object count; train.py passes the host's count, averaged over DDP processes, as a 0-d tensor:
    torch.compile takes a Python number for a constant and compiles again for each). Returns
    {"positive", "negative"}, weighted and normalised; the training loss is their sum. Always
    computed in float32 (or float64), even under autocast.
    """
    with torch.autocast(cls_logits.device.type, enabled=False):
        cls_logits, box_deltas, anchors, boxes, labels, valid = _inputs(
            cls_logits, box_deltas, anchors, gt_boxes, gt_labels)  # [B, A, K], [B, A, 4], [A, 4], [B, G, 4], [B, G], [B, G]
        B, A, K = cls_logits.shape
        n = min(cfg.bag_size, A)  # a bag can't hold more anchors than there are (tiny images)
        if num_objects is None:
            num_objects = valid.sum()  # []  ||B||
        elif not torch.is_tensor(num_objects):  # a host number: filled on the device, as
            # torch.as_tensor(x, device="cuda") would be a blocking copy, a sync
            num_objects = torch.full((), float(num_objects), dtype=box_deltas.dtype, device=box_deltas.device)  # []
        num_objects = num_objects.to(box_deltas.device, box_deltas.dtype, non_blocking=True)  # []

        # the predicted boxes only decide P{a_j -> b_i}, which is not learned through (§3.2)
        pred_boxes = decode(anchors, box_deltas.detach())  # [B, A, 4]
        bag, p_plus = match(anchors, pred_boxes, boxes, labels, valid, n, cfg.iou_threshold, K)  # [B, G, n], [B, A, K]

        # positive term, recall (Eq. 3, its max over the bag made smooth by Mean-max, Eq. 6):
        # -log Mean-max of each object's bag
        x = bag_likelihood(cls_logits, box_deltas, anchors, bag, boxes, labels, cfg)  # [B, G, n]  P_ij
        w = mean_max_weights(x)  # [B, G, n]
        bag_prob = (w * x).sum(-1) / w.sum(-1)  # [B, G]  Mean-max(X_i), Eq. 6
        # -log Mean-max as the authors' BCE against 1: the log clamped at -100; below Mean-max 1e-12
        # the gradient is damped (BCE's backward divides by max(p (1 - p), 1e-12)). A NaN Mean-max (a
        # diverged network) would trip BCE's range check, on a GPU a device assert that ends the
        # process before train.py can name the iteration: BCE sees 1/2 there, the loss gets the NaN.
        is_nan = bag_prob.isnan()  # [B, G]
        loss_obj = F.binary_cross_entropy(bag_prob.clamp(max=1).masked_fill(is_nan, 0.5), torch.ones_like(bag_prob),
                                          reduction="none")  # [B, G]
        loss_obj = torch.where(is_nan, bag_prob, loss_obj)  # [B, G]
        positive = cfg.alpha * torch.where(valid, loss_obj, 0.0).sum() / num_objects.clamp(min=1)  # []

        # negative term, precision (Eq. 4, as Eq. 7 weighs it)
        focal_sum = negative_focal_sum(cls_logits, p_plus, cfg.gamma)  # []
        # max(1, n ||B||) with the configured n, as the authors, also where a bag holds fewer anchors
        negative = (1 - cfg.alpha) * focal_sum / (cfg.bag_size * num_objects).clamp(min=1)  # []
    return {"positive": positive, "negative": negative}


@torch.no_grad()
def bag_weights(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=FreeAnchorConfig()):
    """What the positive term sees, for pictures (the paper's Fig. 4): for each image, the bag of
    every object and the normalised Mean-max weights w_j / sum w of its anchors (Eq. 6) under the
    current predictions. Same inputs as free_anchor_loss; returns a list of B pairs
    (bag [G_b, n] anchor indices, weights [G_b, n] summing to 1 over each bag). No gradient: for
    pictures only."""
    with torch.autocast(cls_logits.device.type, enabled=False):  # in float32, as the loss
        cls_logits, box_deltas, anchors, boxes, labels, valid = _inputs(
            cls_logits, box_deltas, anchors, gt_boxes, gt_labels)  # [B, A, K], [B, A, 4], [A, 4], [B, G, 4], [B, G], [B, G]
        B, A, K = cls_logits.shape
        n = min(cfg.bag_size, A)
        pred_boxes = decode(anchors, box_deltas)  # [B, A, 4]
        bag, _ = match(anchors, pred_boxes, boxes, labels, valid, n, cfg.iou_threshold, K)  # [B, G, n]
        w = mean_max_weights(bag_likelihood(cls_logits, box_deltas, anchors, bag, boxes, labels, cfg))  # [B, G, n]
        w = w / w.sum(-1, keepdim=True)  # [B, G, n]
    return [(bag[b, valid[b]], w[b, valid[b]]) for b in range(B)]  # B x ([G_b, n], [G_b, n])


def compile_loss(loss_fn, **kwargs):
    """torch.compile(loss_fn, **kwargs) for free_anchor_loss or retinanet_loss, as train.py --compile
    and the benchmarks compile them, with one inductor option off where this torch has it: the
    analysis of how a fused kernel's tiles read memory (a heuristic that picks tile shapes; the values
    are the same without it). With dynamic shapes on CUDA it failed an internal assertion on
    free_anchor_loss (torch 2.11 on an H200: AssertionError in tiling_utils.get_pw_red_splits).
    The caller's `options` are kept; a `mode` becomes the options it stands for (torch.compile takes
    mode or options, not both)."""
    import torch._inductor
    import torch._inductor.config
    options = dict(kwargs.pop("options", None) or {})
    if kwargs.get("mode") is not None:
        options = {**torch._inductor.list_mode_options(kwargs.pop("mode"), kwargs.get("dynamic")), **options}
    if hasattr(torch._inductor.config.triton, "coalesce_tiling_analysis"):
        options.setdefault("triton.coalesce_tiling_analysis", False)
    return torch.compile(loss_fn, options=options or None, **kwargs)


# ----------------------------------------------------------------------------- the RetinaNet baseline

@torch.no_grad()
def retinanet_assign(anchors, boxes, valid, cfg):
    """RetinaNet's hand-crafted assignment (Lin et al. 2017, §4), a fixed rule without gradient.

    Each anchor takes the object it overlaps most (the first on ties): IoU >= fg_iou is positive,
    < bg_iou negative, in between ignored; every object also keeps the anchors that overlap it
    best (torchvision's low-quality matches, which take their own best object), so small objects
    are never left without a positive; unlike torchvision's Matcher, not where that best IoU is 0
    (an object that overlaps no anchor would make every anchor positive for it).
    anchors [A, 4], boxes [B, G, 4], valid [B, G] -> best_obj [B, A], positive [B, A], ignored [B, A].
    """
    B, G = valid.shape
    A = anchors.shape[0]
    best_iou = torch.full((B, A), -1.0, dtype=boxes.dtype, device=boxes.device)  # [B, A]
    best_obj = torch.zeros(B, A, dtype=torch.long, device=boxes.device)  # [B, A]
    low_quality = torch.zeros(B, A, dtype=torch.bool, device=boxes.device)  # [B, A]
    first = 0
    for block in object_blocks(B, G, A):
        iou = box_iou(boxes[:, block], anchors).masked_fill(~valid[:, block, None], -1)  # [B, g, A]
        block_iou, block_obj = iou.max(dim=1)  # [B, A]
        better = block_iou > best_iou  # [B, A]  strict: earlier objects win ties
        best_iou = torch.where(better, block_iou, best_iou)  # [B, A]
        best_obj = torch.where(better, block_obj + first, best_obj)  # [B, A]
        obj_best = iou.amax(dim=2, keepdim=True)  # [B, g, 1]
        low_quality |= ((iou == obj_best) & (obj_best > 0)).any(dim=1)  # [B, A]
        first += iou.shape[1]
    positive = (best_iou >= cfg.fg_iou) | low_quality  # [B, A]
    ignored = ~positive & (best_iou >= cfg.bg_iou)  # [B, A]
    return best_obj, positive, ignored


def retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=RetinaNetLossConfig(),
                   average_count=None):
    """The hand-crafted baseline of Eq. 1: RetinaNet's IoU assignment (retinanet_assign) with
    focal loss. Classification: sigmoid focal loss over all non-ignored anchors and classes.
    Regression: SmoothL1 on the (10, 10, 5, 5) deltas of the positives, averaged over the 4
    coordinates (the authors' RetinaNet baseline divides by 4 x positives: maskrcnn-benchmark's
    BBOX_REG_WEIGHT = 4). Both are normalised by the number of positive anchors: this batch's, or
    average_count(count) when given (train.py passes a function that averages the count over DDP
    processes, so N processes train like one). Same inputs as free_anchor_loss; returns {"classification", "regression"}.
    """
    with torch.autocast(cls_logits.device.type, enabled=False):
        cls_logits, box_deltas, anchors, boxes, labels, valid = _inputs(
            cls_logits, box_deltas, anchors, gt_boxes, gt_labels)  # [B, A, K], [B, A, 4], [A, 4], [B, G, 4], [B, G], [B, G]
        B, A, K = cls_logits.shape
        best_obj, positive, ignored = retinanet_assign(anchors, boxes, valid, cfg)  # [B, A] each
        num_pos = positive.sum().to(box_deltas.dtype)  # []
        if average_count is not None:
            num_pos = average_count(num_pos)  # []
        num_pos = num_pos.clamp(min=1)  # []

        cls_target = torch.zeros_like(cls_logits).scatter_(
            2, labels.gather(1, best_obj)[..., None], positive[..., None].to(cls_logits.dtype))  # [B, A, K]
        focal = sigmoid_focal_loss(cls_logits, cls_target, alpha=cfg.alpha, gamma=cfg.gamma)  # [B, A, K]
        # each anchor's K classes summed first, as in negative_focal_sum
        classification = torch.where(ignored[..., None], 0.0, focal).sum(-1).sum() / num_pos  # []

        target = encode(anchors, boxes.gather(1, best_obj[..., None].expand(B, A, 4)))  # [B, A, 4]
        loss_loc = F.smooth_l1_loss(box_deltas, target, beta=cfg.smooth_l1_beta, reduction="none")  # [B, A, 4]
        regression = torch.where(positive[..., None], loss_loc, 0.0).sum() / (4 * num_pos)  # []
    return {"classification": classification, "regression": regression}
