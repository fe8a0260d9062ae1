"""Tests of model.py: RetinaNet against torchvision's own pieces.

Oracles: torchvision's AnchorGenerator (through the RetinaNet it builds), BoxCoder((10, 10, 5, 5)),
and torchvision's RetinaNet itself (transform + postprocess_detections) on the same weights.
Everything is tiny (resnet18, images of ~64x96) so the file runs in seconds on a CPU.

Bit-for-bit equality is asserted only where both sides run the very same ops on the same inputs:
`detect` twice. Anything else is compared to float32 tolerances: `detect` against the RetinaNet of
`to_torchvision` (the same candidates and NMS, but batched top-k and a decode in our (10, 10, 5, 5)
units against torchvision's per-image, per-level ops in its (1, 1, 1, 1) units), ours against
torchvision's own model; where one rounding could flip a decision, candidates are paired by their
(anchor, class) index on ramp logits, never by equal scores.

    python -m pytest -q tests/test_model.py
"""

import collections
import math
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FrozenBatchNorm2d

import model
from model import BACKBONES, RetinaNet, from_torchvision, to_torchvision


def tiny(num_classes=5, backbone="resnet18", seed=0, **kwargs):
    """A from-scratch model with confident random heads: many scores above 0.05, and box deltas
    far from zero, so that thresholds, top-k, decoding, clipping and NMS all have work to do."""
    torch.manual_seed(seed)
    m = RetinaNet(num_classes, backbone=backbone, weights=kwargs.pop("weights", "none"),
                  min_size=kwargs.pop("min_size", 64), max_size=kwargs.pop("max_size", 96), **kwargs)
    with torch.no_grad():
        m.cls_head[-1].weight.normal_(0, 0.05)
        m.cls_head[-1].bias.fill_(-1.5)
        m.box_head[-1].weight.normal_(0, 0.05)
        m.box_head[-1].bias.normal_(0, 0.5)
    return m


def images(seed=1):
    g = torch.Generator().manual_seed(seed)
    # 50x70 is resized (x1.28 -> 64x89) and padded (to 64x96); 64x96 is neither.
    return [torch.rand(3, 50, 70, generator=g), torch.rand(3, 64, 96, generator=g)]


def assert_same_detections(ours, theirs):
    """The very same ops on the very same weights and inputs (on CPU): equal bit for bit."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        assert o["boxes"].shape == t["boxes"].shape
        assert torch.equal(o["scores"], t["scores"])
        assert torch.equal(o["labels"], t["labels"])
        assert torch.equal(o["boxes"], t["boxes"])


def assert_close_detections(ours, theirs):
    """The same detections from two computations: the same number, classes and order, scores and
    boxes to float32 rounding (boxes: ~1e-5 px apart, decoded in different units)."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        assert o["boxes"].shape == t["boxes"].shape
        assert torch.equal(o["labels"], t["labels"])
        torch.testing.assert_close(o["scores"], t["scores"].detach(), rtol=1.3e-6, atol=1e-7)
        torch.testing.assert_close(o["boxes"], t["boxes"].detach(), rtol=1e-5, atol=1e-4)


def ramp_logits(cls_conv, high=2.0, low=-2.0):
    """Replace the output of the last classification conv [B, 9*K, h, w] by logits falling
    linearly from `high` to `low` along each level's (anchor, class) index (detect's order:
    position, then cell anchor, then class). Sorting by score then keeps the index order on any
    device and kernel: neighbours differ by >= 1e-4 in score, a thousand times float32 rounding,
    so two different computations of the same candidates can be paired by position."""
    def hook(module, inputs, out):
        B, C, h, w = out.shape
        ramp = torch.linspace(high, low, h * w * C, dtype=out.dtype, device=out.device)  # [h*w*9*K]
        ramp = ramp.view(h, w, model.NUM_ANCHORS, C // model.NUM_ANCHORS).permute(2, 3, 0, 1)  # [9, K, h, w]
        return ramp.reshape(1, C, h, w).expand(B, C, h, w)

    return cls_conv.register_forward_hook(hook)


# ----------------------------------------------------------------------------- anchors, boxes

@pytest.mark.parametrize("size", [(64, 64), (96, 160), (224, 128)])
def test_anchors_equal_torchvision(size):
    # Anchors are integers (rounded cell anchors plus integer shifts), so any correct computation
    # gives them exactly: compared bit for bit.
    m = tiny(num_classes=2)
    tv = to_torchvision(m)
    batch = torch.zeros(1, 3, *size)
    features = m.features(batch)
    expected = tv.anchor_generator(ImageList(batch, [size]), features)[0]  # [A, 4]
    _, _, anchors = m(batch)
    assert anchors.dtype == torch.float32
    assert torch.equal(anchors, expected)
    assert m(batch)[2] is anchors  # cached per feature-map size


@pytest.mark.parametrize("size", [(800, 1216), (800, 1344), (1344, 800), (608, 1024)])
def test_anchors_equal_torchvision_at_full_size(size):
    # Without running the network: the anchors only see the feature-map sizes, ceil(H / 2**l)
    # on P3..P7 (stride-2 convs with padding). 800 is not a multiple of 128, so P6/P7 get
    # torchvision's odd strides 800 // 13 and 800 // 7.
    feature_sizes = [(math.ceil(size[0] / 2 ** l), math.ceil(size[1] / 2 ** l)) for l in range(3, 8)]
    features = [torch.zeros(1, 1, h, w) for h, w in feature_sizes]
    generator = to_torchvision(tiny(num_classes=2)).anchor_generator
    expected = generator(ImageList(torch.zeros(1, 3, *size), [size]), features)[0]  # [A, 4]
    assert torch.equal(model.grid_anchors(feature_sizes, size, "cpu"), expected)


def test_cell_anchor_sizes():
    # P3's 9 anchors: ratios 0.5, 1, 2 (h/w) of sizes 32, 40, 50, centred on the origin
    cells = model.cell_anchors(model.ANCHOR_SIZES[0])
    assert model.ANCHOR_SIZES[0] == (32, 40, 50)
    w, h = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    assert torch.allclose(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3), rtol=0.06)
    assert torch.allclose((w * h).sqrt(), torch.tensor([32.0, 40, 50] * 3), rtol=0.03)


def random_boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 300 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_decode_round_trip_and_torchvision_box_coder():
    g = torch.Generator().manual_seed(0)
    anchors = random_boxes(1000, g)
    # boxes within the clamp's reach of their anchors (at most 1000/16 times wider or taller)
    boxes = model.decode(anchors, torch.randn(1000, 4, generator=g) * torch.tensor([5.0, 5.0, 3.0, 3.0]))
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    deltas = model.encode(anchors, boxes)
    torch.testing.assert_close(deltas, coder.encode_single(boxes, anchors))
    torch.testing.assert_close(model.decode(anchors, deltas), boxes, rtol=1e-5, atol=1e-3)
    # large deltas exercise the dw, dh clamp at log(1000/16)
    wild = torch.randn(1000, 4, generator=g) * 30
    torch.testing.assert_close(model.decode(anchors, wild), coder.decode_single(wild, anchors))
    assert torch.isfinite(model.decode(anchors, wild)).all()


def test_box_iou_equals_torchvision_and_broadcasts():
    """model.box_iou against torchvision.ops.box_iou, image by image, on a batch [B, N, 4] x [M, 4]
    (which torchvision's does not take), overlapping and disjoint boxes and exact duplicates; a pair
    of empty boxes has IoU 0 where torchvision's divides 0 by 0."""
    g = torch.Generator().manual_seed(1)
    boxes1 = torch.stack([random_boxes(7, g) for _ in range(3)])  # [3, 7, 4]
    boxes2 = torch.cat([random_boxes(40, g), boxes1[0, :2]])  # [42, 4], two exact duplicates
    iou = model.box_iou(boxes1, boxes2)  # [3, 7, 42]
    for b in range(3):
        torch.testing.assert_close(iou[b], torchvision.ops.box_iou(boxes1[b], boxes2))
    assert (iou == 0).any() and (iou[0, :2, -2:].diagonal() == 1).all()
    empty = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert model.box_iou(empty, empty).item() == 0 and torchvision.ops.box_iou(empty, empty).isnan().all()
    pixels = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10]])  # integer boxes: IoU in float, as torchvision's
    torch.testing.assert_close(model.box_iou(pixels, pixels), torchvision.ops.box_iou(pixels, pixels))


def test_resize_boxes_of_integer_pixels():
    boxes = torch.tensor([[10, 20, 30, 40]])
    expected = torch.tensor([[5.0, 10.0, 15.0, 20.0]])
    assert torch.equal(model.resize_boxes(boxes, (100, 100), (50, 50)), expected)
    assert torch.equal(model.resize_boxes(boxes.double(), (100, 100), (50, 50)), expected.double())


# ----------------------------------------------------------------------------- torchvision equivalence

def test_detect_equals_torchvision():
    # detect's batched postprocessing against torchvision's per-image, per-level one, on the very
    # weights to_torchvision exports: the same detections to float32 rounding.
    m = tiny()
    tv = to_torchvision(m)
    ours = m.detect(images())
    assert_close_detections(ours, tv(images()))
    assert all(len(d["boxes"]) == m.detections_per_img for d in ours)  # the limit is reached
    for d, image in zip(ours, images()):
        h, w = image.shape[-2:]
        assert d["boxes"][:, 0::2].max() <= w + 1e-3 and d["boxes"][:, 1::2].max() <= h + 1e-3  # original pixels
        assert d["boxes"][:, 2].max() > 0.9 * w  # not left in resized pixels either
        assert d["labels"].dtype == torch.int64 and 0 <= d["labels"].min() and d["labels"].max() < 5


def test_detect_equals_torchvision_other_thresholds_and_scales():
    # tuple min_size (the last one counts), and every threshold carried over by to_torchvision
    m = tiny(min_size=(48, 72), max_size=120, seed=3)
    m.score_thresh, m.topk_candidates, m.nms_thresh, m.detections_per_img = 0.2, 40, 0.6, 60
    batch = images() + [torch.rand(3, 100, 33)]  # three sizes in one padded batch
    ours = m.detect(batch)
    assert_close_detections(ours, to_torchvision(m)(batch))
    assert all(0 < len(d["boxes"]) <= 60 and d["scores"].min() > 0.2 for d in ours)
    # test-time overrides of the scale equal a model built at that scale
    m2 = tiny(min_size=72, max_size=120, seed=3)
    m2.score_thresh, m2.topk_candidates, m2.nms_thresh, m2.detections_per_img = 0.2, 40, 0.6, 60
    m.min_size, m.max_size = 64, 96
    assert_same_detections(m.detect(images(), min_size=72, max_size=120), m2.detect(images()))


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """How many times each op runs (aten and torchvision's), by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_detect_postprocesses_the_batch_at_once():
    """The postprocessing works on the whole batch: one data-dependent op for the batch (the
    compaction of its candidates; on a GPU, each such op waits for the device), one NMS per image,
    and a handful of ops per image, not a loop over images and levels (~300 ops per image)."""
    m = tiny()
    m.topk_candidates = 50  # <= 245 candidates per image: torchvision's batched_nms runs one NMS
    m.detect(images())  # the anchors of this padded size, made once and cached

    def counts(n):
        with OpCounter() as counter:
            m.detect((images() * 2)[:n])
        return counter.counts

    one, four = counts(1), counts(4)
    assert one["aten.nonzero"] == four["aten.nonzero"] == 1
    assert one["torchvision.nms"] == 1 and four["torchvision.nms"] == 4
    assert sum(four.values()) - sum(one.values()) <= 3 * 30, (sum(one.values()), sum(four.values()))


def test_preprocessing_makes_no_host_tensor_per_image():
    """model.preprocess (training's to_device and detect, on the GPU) copies nothing from the host
    per image: a tensor made from host data is a copy that may wait for the GPU. ImageNet's mean
    and std are copied once per device and dtype."""
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g), torch.rand(3, 64, 48, generator=g)]
    model.preprocess(batch, [(64, 90), (64, 48)])  # the first call may copy the constants
    with OpCounter() as counter:
        model.preprocess(batch, [(64, 90), (64, 48)])
    assert counter.counts["aten.lift_fresh"] == 0, counter.counts


def test_detect_without_nms_returns_the_candidates():
    m = tiny()
    m.topk_candidates = 50
    with_nms, candidates = m.detect(images()), m.detect(images(), nms=False)
    for d, c in zip(with_nms, candidates):
        # top-k of P3..P6, all of P7 (1x1 positions x 9 anchors x 5 classes): scores are all > 0.05 here
        assert len(c["boxes"]) == 4 * 50 + 45
        assert len(d["boxes"]) < len(c["boxes"])
        # every detection is one of the candidates
        match = (d["boxes"][:, None] == c["boxes"][None]).all(-1) & (d["scores"][:, None] == c["scores"][None])
        assert match.any(1).all()
    # both from one call: the same detections and candidates as the two calls
    for found, expected in zip(m.detect(images(), candidates=True), (with_nms, candidates)):
        for a, b in zip(found, expected):
            assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_detect_some_classes_gives_their_places_to_them():
    """classes=[...]: only those labels come out, and every candidate of theirs that detecting all
    classes finds is among them (the same box and score, to float32 rounding: the same anchors
    decoded in a batch of other length); the per-level top-k, filled with other classes before,
    now holds more of theirs."""
    m = tiny()
    m.topk_candidates = 50
    every = m.detect(images(), nms=False)
    some = m.detect(images(), nms=False, classes=[1, 3])
    for e, s in zip(every, some):
        assert set(s["labels"].tolist()) == {1, 3}
        mine = (e["labels"] == 1) | (e["labels"] == 3)  # [N]
        assert 0 < mine.sum() < len(s["labels"])
        same = (torch.isclose(e["boxes"][mine][:, None], s["boxes"][None], rtol=1e-5, atol=1e-4).all(-1)
                & torch.isclose(e["scores"][mine][:, None], s["scores"][None], rtol=1e-5)
                & (e["labels"][mine][:, None] == s["labels"][None]))  # [n, N']
        assert same.any(1).all()
    for d in m.detect(images(), classes=[2]):
        assert len(d["labels"]) > 0 and (d["labels"] == 2).all()
    m.score_thresh = 0.0  # P7's top-50 (9 anchors x 5 classes) now takes the other classes too: below any threshold
    for s in m.detect(images(), nms=False, classes=[4]):
        assert len(s["labels"]) > 0 and (s["labels"] == 4).all()
    for bad in ([5], [-1]):
        with pytest.raises(ValueError, match=r"classes must be labels in \[0, 5\)"):
            m.detect(images(), classes=bad)


def test_detect_decodes_what_forward_predicts():
    # detect's batched top-k, gather and decode against forward's deltas decoded for every anchor:
    # the same boxes up to rounding. Threshold 0 and an unbounded top-k keep every (anchor, class) pair. The class logits are a ramp over the
    # (anchor, class) index, so detect's candidates come out in index order and pair with
    # forward's by position; the boxes come from the network's real box head.
    m = tiny()
    m.score_thresh, m.topk_candidates = 0.0, 10**9
    ramp_logits(m.cls_head[-1])
    image = images()[1]  # 64x96: neither resized nor padded
    (candidates,) = m.detect([image], nms=False)
    with torch.no_grad():
        cls_logits, box_deltas, anchors = m.eval()(model.normalize(image)[None])
    boxes = model.decode(anchors, box_deltas[0])  # [A, 4]
    boxes = torch.stack((boxes[:, 0].clamp(0, 96), boxes[:, 1].clamp(0, 64),
                         boxes[:, 2].clamp(0, 96), boxes[:, 3].clamp(0, 64)), dim=1)  # [A, 4]
    scores = cls_logits[0].sigmoid().flatten()  # [A*K], index = anchor*K + class
    index = torch.arange(len(scores))  # [A*K]
    assert len(candidates["scores"]) == len(scores) == 1161 * 5
    assert torch.equal(candidates["labels"], index % 5)
    torch.testing.assert_close(candidates["scores"], scores)  # float32 tolerances: 1.3e-6 relative
    torch.testing.assert_close(candidates["boxes"], boxes[index // 5], rtol=1e-5, atol=1e-3)
    assert (boxes[:, 2:] - boxes[:, :2]).std(0).min() > 1  # boxes of many sizes, not one repeated


def test_detect_keeps_training_flags_and_runs_without_grad():
    m = tiny()
    m.train()
    m.body.layer1.eval()  # e.g. a caller that keeps a frozen stage in eval mode
    out = m.detect(images()[:1])
    assert m.training and m.cls_head.training and not m.body.layer1.training
    assert not out[0]["scores"].requires_grad


def test_round_trip_through_torchvision_keeps_the_state(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    m = tiny(weights=path)  # pretrained: FrozenBatchNorm and a frozen stem, carried both ways
    m.nms_thresh = 0.45
    back = from_torchvision(to_torchvision(m))
    assert back.config == m.config and back.nms_thresh == 0.45
    ours, theirs = m.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=1e-6, atol=0, msg=k)
    assert ({n for n, p in back.named_parameters() if p.requires_grad}
            == {n for n, p in m.named_parameters() if p.requires_grad})


def test_from_torchvision_of_torchvisions_own_model(monkeypatch):
    # Two different computations: our regression conv is torchvision's times (10, 10, 5, 5). So the
    # network outputs are compared to float32 tolerances, index by index, and the postprocessing
    # before NMS (where one rounding can flip an IoU at the threshold) on ramp logits (see
    # ramp_logits), candidate by candidate.
    torch.manual_seed(0)
    tv = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=64, max_size=96)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        tv.head.regression_head.bbox_reg.weight.normal_(0, 0.05)
        tv.head.classification_head.cls_logits.bias.fill_(-1.5)
    tv.eval()
    m = from_torchvision(tv)
    assert m.config == dict(num_classes=4, backbone="resnet50", min_size=64, max_size=96, frozen_bn=False)
    assert m.detections_per_img == 300  # torchvision's default, carried over
    assert (m.score_thresh, m.nms_thresh, m.topk_candidates) == (tv.score_thresh, tv.nms_thresh, tv.topk_candidates)

    batch = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cls_logits, box_deltas, anchors = m(batch)
        head = tv.head(list(tv.backbone(batch).values()))
    assert cls_logits.abs().max() > 1 and box_deltas.abs().max() > 1  # values to compare, not zeros
    torch.testing.assert_close(cls_logits, head["cls_logits"], rtol=1e-4, atol=1e-4)
    weights = torch.tensor(model.BOX_WEIGHTS)  # [4]
    torch.testing.assert_close(box_deltas / weights, head["bbox_regression"], rtol=1e-4, atol=1e-4)

    ramp_logits(m.cls_head[-1])
    ramp_logits(tv.head.classification_head.cls_logits)
    # torchvision's candidates: its postprocessing with NMS replaced by "keep all, in order"
    monkeypatch.setattr(torchvision.ops.boxes, "batched_nms",
                        lambda boxes, scores, labels, threshold: torch.arange(len(scores)))
    tv.detections_per_img = 10**9
    theirs = tv(images())
    for ours, t in zip(m.detect(images(), nms=False), theirs):
        # scores > 0.05 everywhere: the top 1000 of each level of the 64x96 batch, or all of it
        levels = ((8, 12), (4, 6), (2, 3), (1, 2), (1, 1))  # P3..P7
        assert len(ours["scores"]) == sum(min(1000, h * w * 9 * 4) for h, w in levels)
        assert torch.equal(ours["labels"], t["labels"])
        torch.testing.assert_close(ours["scores"], t["scores"])
        torch.testing.assert_close(ours["boxes"], t["boxes"], rtol=1e-5, atol=1e-3)


def test_from_torchvision_refuses_v2():
    tv = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=2)
    with pytest.raises(ValueError, match="v2"):
        from_torchvision(tv)


# ----------------------------------------------------------------------------- architecture

@pytest.mark.parametrize("backbone", [b if b in ("resnet18", "resnet34", "resnet50")
                                      else pytest.param(b, marks=pytest.mark.slow) for b in BACKBONES])
def test_output_shapes_every_backbone(backbone):
    torch.manual_seed(0)
    m = RetinaNet(3, backbone=backbone, weights="none").eval()
    with torch.no_grad():
        cls_logits, box_deltas, anchors = m(torch.randn(2, 3, 64, 96))
    A = 9 * (8 * 12 + 4 * 6 + 2 * 3 + 1 * 2 + 1 * 1)  # P3..P7 of a 64x96 batch
    assert cls_logits.shape == (2, A, 3) and box_deltas.shape == (2, A, 4) and anchors.shape == (A, 4)
    assert not any(isinstance(mod, FrozenBatchNorm2d) for mod in m.modules())
    assert all(p.requires_grad for p in m.parameters())  # from scratch: everything trains
    assert model._infer_backbone(m.body.state_dict()) == backbone  # from_torchvision can recognise it


def test_frozen_batchnorm_is_torchvisions_and_keeps_bfloat16():
    """FrozenBatchNorm: torchvision's FrozenBatchNorm2d to the bit in float32; under bfloat16
    autocast it stays in bfloat16 (torchvision's promotes to float32), so the pretrained backbone's
    activations do too."""
    ours, theirs = model.FrozenBatchNorm(8), FrozenBatchNorm2d(8)
    g = torch.Generator().manual_seed(0)
    state = {"weight": torch.randn(8, generator=g), "bias": torch.randn(8, generator=g),
             "running_mean": torch.randn(8, generator=g), "running_var": torch.rand(8, generator=g) + 0.1}
    ours.load_state_dict(state), theirs.load_state_dict(state)
    x = torch.randn(2, 8, 5, 7, generator=g)
    assert torch.equal(ours(x), theirs(x))
    assert ours(x.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(ours(x.bfloat16()).float(), theirs(x), rtol=2e-2, atol=2e-2)
    m = RetinaNet(3, backbone="resnet18", weights="none", frozen_bn=True, min_size=64, max_size=64)
    body = m.body
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = body.maxpool(body.relu(body.bn1(body.conv1(torch.randn(1, 3, 64, 64)))))  # [1, 64, 16, 16]
        c5 = body.layer4(body.layer3(body.layer2(body.layer1(x))))  # [1, 512, 2, 2]
    assert x.dtype == c5.dtype == torch.bfloat16


@pytest.mark.parametrize("width", [32, 64, 96])
def test_p6_p7_of_narrow_images_are_exact_and_their_gradients_steady_under_bfloat16(width):
    """Images 32 or 64 pixels wide give P5 or P6 one column: P6 and P7 see it with a column of
    zeros added (model.one_column_padded), the same output as without it, since their padding reads
    zeros there anyway. Under bfloat16 autocast on a CPU their weights' gradient is the same from run
    to run (without that column, oneDNN's AVX512-BF16 kernel reads memory it never wrote: another
    gradient each run, NaN at times, though the loss is finite) and near float32's."""
    torch.manual_seed(0)
    # BatchNorm on its running statistics: those of a batch of 2 x 3 x 1 values amplify bfloat16's rounding
    m = RetinaNet(3, backbone="resnet18", weights="none", min_size=64, max_size=96).eval()
    images = torch.randn(2, 3, 96, width)
    with torch.no_grad():  # the column changes nothing in float32
        p5 = m.features(images)[2]  # [2, 256, 3, width / 32]
        p6 = m.fpn["p6"](p5)
        p7 = m.fpn["p7"](torch.relu(p6))
        for conv, x, y in ((m.fpn["p6"], p5, p6), (m.fpn["p7"], torch.relu(p6), p7)):
            torch.testing.assert_close(y, torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1),
                                       rtol=1e-5, atol=1e-6)
    weights = [m.fpn["p6"].weight, m.fpn["p7"].weight]
    directions = [torch.randn(2, 256, *p.shape[-2:]) for p in (p6, p7)]

    def gradients(dtype):
        m.zero_grad()
        stale = [torch.full((1 << k,), float("nan")) for k in range(10, 22)]  # freed memory that holds NaN
        del stale
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            p6, p7 = m.features(images)[3:]
        sum((p.float() * d).sum() for p, d in zip((p6, p7), directions)).backward()
        return [w.grad.clone() for w in weights]

    exact = gradients(torch.float32)
    runs = [gradients(torch.bfloat16) for _ in range(4)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    for got, want in zip(runs[0], exact):
        assert torch.isfinite(got).all()
        assert (got - want).norm() <= 0.05 * want.norm()


def test_config_rebuilds_the_model():
    m = tiny(frozen_bn=True, min_size=(32, 64))
    rebuilt = RetinaNet(**{**m.config, "weights": "none"})
    rebuilt.load_state_dict(m.state_dict())  # strict: same architecture
    assert m.config == dict(num_classes=5, backbone="resnet18", min_size=(32, 64), max_size=96, frozen_bn=True)
    assert_same_detections(rebuilt.detect(images()), m.detect(images()))


def test_built_on_the_meta_device_then_loaded():
    """The usual way to build a large model without initialising it twice: on the meta device,
    to_empty(), then load_state_dict. The cell anchors are not in the state dict: made again."""
    m = tiny()
    with torch.device("meta"):
        shell = RetinaNet(**{**m.config, "weights": "none"})
        shell = shell.to_empty(device="cpu")  # also inside the meta block
    shell.load_state_dict(m.state_dict())
    assert torch.equal(shell.cells, m.cells)
    assert_same_detections(shell.detect(images()), m.detect(images()))
    with torch.device("meta"):  # or the real weights assigned in place of the meta ones
        assigned = RetinaNet(**{**m.config, "weights": "none"})
    assigned.load_state_dict(m.state_dict(), assign=True)
    assert torch.equal(assigned.cells, m.cells)
    assert_same_detections(assigned.detect(images()), m.detect(images()))


def test_caches_filled_in_inference_mode_serve_autograd_later():
    """detect under torch.inference_mode fills the anchor and normalisation caches; a later forward
    that needs gradients (to the input image, or through the anchors) must not meet inference
    tensors there."""
    m = tiny().eval()
    with torch.inference_mode():
        m.detect(images())
        m(model.preprocess(images())[0])
        m.to("cpu")  # a move that changes nothing leaves plain buffers (DDP copies into them)
    m.cells.copy_(m.cells.clone())
    image = images()[1].requires_grad_()
    cls_logits, box_deltas, anchors = m(model.preprocess([image])[0])
    assert not anchors.is_inference()
    (cls_logits.sum() + (box_deltas[0] * anchors).sum()).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_head_initialisation():
    torch.manual_seed(0)
    m = RetinaNet(7, backbone="resnet18", weights="none")
    prior = torch.sigmoid(m.cls_head[-1].bias)
    torch.testing.assert_close(prior, torch.full((9 * 7,), 0.02))
    baseline = RetinaNet(7, backbone="resnet18", weights="none", prior_prob=0.01)
    torch.testing.assert_close(torch.sigmoid(baseline.cls_head[-1].bias), torch.full((9 * 7,), 0.01))
    for head in (m.cls_head, m.box_head):
        convs = [layer for layer in head if isinstance(layer, torch.nn.Conv2d)]
        assert len(convs) == 5 and sum(isinstance(layer, torch.nn.ReLU) for layer in head) == 4
        for conv in convs:
            assert abs(conv.weight.std().item() - 0.01) < 0.001 and abs(conv.weight.mean().item()) < 0.001
    assert m.box_head[-1].bias.abs().max() == 0 and m.cls_head[0].bias.abs().max() == 0
    assert math.isclose(m.cls_head[-1].bias[0].item(), -math.log(0.98 / 0.02), rel_tol=1e-6)


def test_forward_rejects_bad_input():
    m = tiny()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        m(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="image 1"):
        m.detect([torch.rand(3, 32, 32), torch.rand(32, 32)])
    with pytest.raises(TypeError, match="int32"):  # floats in [0, 1] or uint8 only
        m.detect([torch.zeros(3, 32, 32, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"image 0 .* got \(3, 0, 32\)"):
        m.detect([torch.rand(3, 0, 32)])
    for sizes in ({"min_size": 0}, {"max_size": 0}, {"min_size": 32.5}, {"min_size": True}):
        with pytest.raises(ValueError, match="positive ints"):
            m.detect([torch.rand(3, 32, 32)], **sizes)
    assert len(m.detect([torch.rand(3, 32, 32)], min_size=np.int64(32), max_size=torch.tensor(48))) == 1
    with pytest.raises(ValueError, match="backbone 'resnet9'"):
        RetinaNet(3, backbone="resnet9", weights="none")


# ----------------------------------------------------------------------------- weights

def test_local_weights_file_and_frozen_set(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # torchvision's format, fc included
    m = RetinaNet(3, backbone="resnet18", weights=str(path))
    for k, v in reference.state_dict().items():
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(m.body.state_dict()[k], v), k
    assert m.config["frozen_bn"] is True
    assert isinstance(m.body.bn1, FrozenBatchNorm2d) and not any(
        isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith(("body.conv1.", "body.layer1."))}
    assert "body.layer1.0.conv1.weight" in frozen and "body.layer2.0.conv1.weight" not in frozen

    forced = RetinaNet(3, backbone="resnet18", weights=path, frozen_bn=False)  # pretrained, trainable BN
    assert isinstance(forced.body.bn1, torch.nn.BatchNorm2d) and not forced.body.layer1[0].bn1.weight.requires_grad
    scratch_frozen = RetinaNet(3, backbone="resnet18", weights="none", frozen_bn=True)
    assert isinstance(scratch_frozen.body.bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in scratch_frozen.parameters())  # nothing frozen from scratch


def test_bad_weights_files(tmp_path):
    wrong = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong)
    with pytest.raises(ValueError, match=r"resnet34\.pth does not fit a torchvision resnet50: .*conv"):
        RetinaNet(3, backbone="resnet50", weights=wrong)
    with pytest.raises(ValueError, match="no such file"):
        RetinaNet(3, backbone="resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="is none of these .not a file."):
        RetinaNet(3, backbone="resnet18", weights=tmp_path)  # a directory
    garbage, module = tmp_path / "garbage.pth", tmp_path / "module.pth"
    garbage.write_text("not a checkpoint")
    torch.save({"fc": torch.nn.Linear(2, 2)}, module)  # a pickled module, not tensors
    for path in (garbage, module):
        with pytest.raises(ValueError, match=rf"{path.name}: not a (torch )?state dict") as e:
            RetinaNet(3, backbone="resnet18", weights=path)
        # torch's own advice, weights_only=False, is wrong for a damaged file: not passed on
        assert "\n" not in str(e.value) and "Re-running" not in str(e.value)


def test_weights_of_other_types_and_bad_constructor_arguments(tmp_path):
    """A weights file holding something else than tensors, and constructor arguments of the wrong
    kind, are one ValueError naming them, not a traceback from deep inside; numpy integers are
    taken as ints (the config is written as JSON)."""
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = 5
    path = tmp_path / "ints.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"ints\.pth: expected a state dict of tensors; not tensors: conv1\.weight \(int\)"):
        RetinaNet(3, backbone="resnet18", weights=path)
    for kwargs, culprit in (({"prior_prob": 0}, "prior_prob"), ({"prior_prob": math.nan}, "prior_prob"),
                            ({"prior_prob": "0.01"}, "prior_prob"), ({"frozen_bn": "false"}, "frozen_bn"),
                            ({"min_size": True}, "min_size"), ({"max_size": True}, "max_size")):
        with pytest.raises(ValueError, match=culprit):
            RetinaNet(3, backbone="resnet18", weights="none", **kwargs)
    m = RetinaNet(np.int64(3), backbone="resnet18", weights="none", min_size=np.int64(64), max_size=np.int64(96))
    assert m.config["num_classes"] == 3 and type(m.config["min_size"]) is int and type(m.config["max_size"]) is int


def test_imagenet_download_failure_is_one_clear_error(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=r"--weights PATH.*--weights none") as info:
        RetinaNet(3, backbone="resnet18", weights="imagenet")
    assert "\n" not in str(info.value) and info.value.__cause__ is None and info.value.__suppress_context__
