"""RetinaNet (Lin et al., 2017), the detector that FreeAnchor (Zhang et al., NeurIPS 2019) trains.

The network of FreeAnchor §4.1, with torchvision's conventions throughout so that a
model trained here converts both ways to `torchvision.models.detection.RetinaNet`:

- backbone: a torchvision ResNet / ResNeXt (`BACKBONES`); with pretrained weights, FrozenBatchNorm
  and the stem + res2 frozen; from scratch, BatchNorm trains (train.py turns it into SyncBatchNorm
  under DDP on CUDA);
- FPN P3-P7: P3-P5 from C3-C5, P6 = stride-2 conv on P5 and P7 = stride-2 conv on ReLU(P6)
  (torchvision's `retinanet_resnet50_fpn`, LastLevelP6P7(256, 256));
- heads: 4 x (3x3 conv 256 + ReLU) per branch, weights N(0, 0.01), class prior 0.02 (§4.1);
- anchors: exactly torchvision's (3 sizes x 3 ratios per position on P3-P7, same order);
- boxes are xyxy in pixels, width = x2 - x1 (no legacy +1);
- box coding: R-CNN deltas (dx, dy, dw, dh) with weights (10, 10, 5, 5), the authors' setting;
  `to_torchvision` rescales the last regression conv for torchvision's (1, 1, 1, 1);
- images: RGB in [0, 1], ImageNet mean/std, shorter side resized to `min_size` (longer side at
  most `max_size`), batched with zero padding to a multiple of 32, exactly as torchvision's
  `GeneralizedRCNNTransform` does it;
- inference (`RetinaNet.detect`): score > 0.05, top 1000 per level, class-wise NMS 0.5, 100
  detections per image, as torchvision's `RetinaNet.postprocess_detections`.

    m = RetinaNet(num_classes=80, backbone="resnet50", weights="imagenet")
    batch, _ = preprocess(images)                  # list of [3, h, w] -> [B, 3, H, W] normalised, padded
    cls_logits, box_deltas, anchors = m(batch)     # [B, A, K], [B, A, 4], [A, 4]
    detections = m.detect([image])                 # [{"boxes", "scores", "labels"}], original pixels
    tv = to_torchvision(m)                         # same detections from torchvision's RetinaNet

Run the tests with `python -m pytest tests/test_model.py`.
"""

import functools
import math
import operator
import os
import re
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, batched_nms

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (wx, wy, ww, wh): stds 0.1/0.1/0.2/0.2, authors' code
BOX_CLIP = math.log(1000.0 / 16)  # decode clamps dw, dh here (as torchvision and Detectron)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
             "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")  # paper, X-101-64x4d
# Anchors of P3..P7 (torchvision's _default_anchorgen, RetinaNet paper §4): 3 scales x 3 ratios.
ANCHOR_SIZES = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # height / width
NUM_ANCHORS = len(ANCHOR_RATIOS) * len(ANCHOR_SIZES[0])  # per position: 3 ratios x 3 scales
FPN_CHANNELS = 256
PRIOR_PROB = 0.02  # class prior at init: FreeAnchor's (the authors' configs, PRIOR_PROB: 0.02)
RETINANET_PRIOR_PROB = 0.01  # RetinaNet's own (Lin et al. 2017, §4.1; torchvision's, and the authors' baseline)


# ----------------------------------------------------------------------------- boxes

def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes, broadcasting over leading dimensions.

    boxes1 [..., N, 4], boxes2 [..., M, 4] -> [..., N, M]. A pair whose union is empty (two
    zero-area boxes) has IoU 0, never NaN.
    """
    if not boxes1.is_floating_point():  # integer pixel boxes: IoU in float32, as torchvision's
        boxes1 = boxes1.float()
    if not boxes2.is_floating_point():
        boxes2 = boxes2.float()
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # [..., N]
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # [..., M]
    b1, b2 = boxes1[..., :, None, :], boxes2[..., None, :, :]  # [..., N, 1, 4], [..., 1, M, 4]
    # width and height of the intersections, one [N, M] coordinate at a time: [N, M, 2] corners
    # would take twice the memory, which bounds the loss's blocks of objects
    w = (torch.minimum(b1[..., 2], b2[..., 2]) - torch.maximum(b1[..., 0], b2[..., 0])).clamp(min=0)  # [..., N, M]
    h = (torch.minimum(b1[..., 3], b2[..., 3]) - torch.maximum(b1[..., 1], b2[..., 1])).clamp(min=0)  # [..., N, M]
    inter = w * h  # [..., N, M]
    union = area1[..., :, None] + area2[..., None, :] - inter  # [..., N, M]
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def encode(anchors, boxes, weights=BOX_WEIGHTS):
    """Regression targets that turn `anchors` into `boxes` (torchvision's BoxCoder.encode_single).

    anchors [..., 4], boxes [..., 4] (broadcastable) -> deltas [..., 4] = (dx, dy, dw, dh).
    """
    wx, wy, ww, wh = weights
    aw = anchors[..., 2] - anchors[..., 0]
    ah = anchors[..., 3] - anchors[..., 1]
    ax = anchors[..., 0] + 0.5 * aw
    ay = anchors[..., 1] + 0.5 * ah
    bw = boxes[..., 2] - boxes[..., 0]
    bh = boxes[..., 3] - boxes[..., 1]
    bx = boxes[..., 0] + 0.5 * bw
    by = boxes[..., 1] + 0.5 * bh
    return torch.stack((wx * (bx - ax) / aw, wy * (by - ay) / ah,
                        ww * torch.log(bw / aw), wh * torch.log(bh / ah)), dim=-1)


def decode(anchors, deltas, weights=BOX_WEIGHTS):
    """Boxes predicted by `deltas` on `anchors` (torchvision's BoxCoder.decode_single).

    anchors [..., 4], deltas [..., 4] (broadcastable) -> boxes [..., 4]; dw, dh clamped at
    log(1000/16) so that exp() cannot overflow.
    """
    wx, wy, ww, wh = weights
    aw = anchors[..., 2] - anchors[..., 0]
    ah = anchors[..., 3] - anchors[..., 1]
    ax = anchors[..., 0] + 0.5 * aw
    ay = anchors[..., 1] + 0.5 * ah
    cx = deltas[..., 0] / wx * aw + ax
    cy = deltas[..., 1] / wy * ah + ay
    half_w = 0.5 * torch.exp((deltas[..., 2] / ww).clamp(max=BOX_CLIP)) * aw
    half_h = 0.5 * torch.exp((deltas[..., 3] / wh).clamp(max=BOX_CLIP)) * ah
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


# ----------------------------------------------------------------------------- images

def resized_size(size, min_size, max_size):
    """(h, w) -> (h', w'): shorter side `min_size`, longer at most `max_size`, with torchvision's
    GeneralizedRCNNTransform scale rule and F.interpolate's rounding of the output size
    (recompute_scale_factor=True truncates size * scale), so that sizes match it exactly. A side
    that would truncate to 0 (an image longer than max_size : 1, on which torchvision's call fails)
    is kept at 1 px."""
    h, w = size
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(int(h * scale), 1), max(int(w * scale), 1)


def resize_image(image, min_size, max_size):
    """Resize so the shorter side is `min_size` and the longer at most `max_size`.

    image [3, h, w] float -> [3, h', w'], bilinear without antialiasing: torchvision's
    GeneralizedRCNNTransform's call (with recompute_scale_factor=True the kernel samples at
    in/out ratios of the integer sizes, exactly as with size=resized_size(...))."""
    return _resize(image, resized_size(image.shape[-2:], min_size, max_size))


def _resize(image, size):
    """[3, h, w] float -> [3, *size] bilinear (align_corners=False); a no-op at the same size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image  # bilinear at scale 1 samples every pixel exactly: skip the copy
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def flip_boxes(boxes, width):
    """xyxy boxes [N, 4] -> the same boxes in the horizontal mirror of an image of `width`:
    x1' = W - x2, x2' = W - x1 (its own inverse: flipping twice gives the boxes back)."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)  # [N, 4]


def one_column_padded(x):
    """x [B, C, h, w] as the stride-2 3x3 convolutions of P6 and P7 (padding 1) should get it: with a
    column of zeros on the right where w = 1 (images at most 32 or 64 pixels wide), which they read as
    padding anyway, so their output is the same. On a CPU, under bfloat16 autocast, oneDNN's backward
    for the weights of such a convolution on an input one column wide reads memory it never wrote
    (jit_bf16:avx512_core_bf16 in oneDNN 3.12, torch 2.14): a gradient that changes from run to run,
    and can be NaN. Two columns take another path, which is right."""
    return F.pad(x, (0, 1)) if x.shape[-1] == 1 else x  # [B, C, h, max(w, 2)]


def resize_boxes(boxes, old_size, new_size):
    """Move xyxy boxes [G, 4] from an image of size old_size (h, w) to one of new_size (h, w)."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32) / torch.tensor(old_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32) / torch.tensor(old_size[1], dtype=torch.float32)
    ratios = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))  # [4]
    return boxes * ratios.to(boxes.device, boxes.dtype if boxes.is_floating_point() else torch.float32)


def host_to_device(t, device):
    """A tensor made on the host, on `device` without the host waiting for the device. On a GPU a
    copy from ordinary (pageable) memory may wait for the GPU's queue, even with non_blocking, and
    torch.tensor(..., device="cuda") always does: page-locked memory first."""
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@functools.cache
def _imagenet_stats(dtype, device):
    """ImageNet's mean and std [3, 1, 1] on `device`, copied there once per process and dtype
    (normalize runs on every image of every batch). Made outside inference mode even when first
    asked for inside it: an inference tensor, once cached, could never be saved for a backward."""
    with torch.inference_mode(False):
        return tuple(host_to_device(torch.tensor(v, dtype=dtype)[:, None, None], device)
                     for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize(image):
    """[3, h, w] RGB in [0, 1] -> ImageNet-normalised [3, h, w]."""
    mean, std = _imagenet_stats(image.dtype, image.device)  # [3, 1, 1] each
    return (image - mean) / std


def batch_images(images, size_divisible=SIZE_DIVISIBLE):
    """List of [3, h_i, w_i] -> [B, 3, H, W] of their dtype, zero-padded at the bottom/right to
    the largest height and width rounded up to a multiple of `size_divisible` (padding after
    normalisation, as torchvision does)."""
    H = max(img.shape[-2] for img in images)
    W = max(img.shape[-1] for img in images)
    H = int(math.ceil(H / size_divisible) * size_divisible)
    W = int(math.ceil(W / size_divisible) * size_divisible)
    batch = images[0].new_zeros((len(images), 3, H, W))  # [B, 3, H, W]
    for b, img in enumerate(images):
        batch[b, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch


def prepare_image(image, size=None, dtype=torch.float32):
    """One image as the network sees it, before padding: uint8 [3, h, w] in 0..255 or float
    [3, h, w] in [0, 1], on any device -> `dtype` [3, h', w'] ImageNet-normalised, resized
    (bilinear) to size (h', w') when given.

    The order is torchvision's: to float, normalise, then resize. uint8 is first divided by 255
    in `dtype`, which is exactly the float image x / 255 a float caller would pass, and every
    later step is the same op on the same values: uint8 input and its float twin give the same
    result bit for bit. (Resizing first would be cheaper when shrinking, but bilinear and the
    affine normalisation commute only up to float rounding.)"""
    image = image.to(dtype) / 255 if image.dtype == torch.uint8 else image.to(dtype)  # [3, h, w]
    image = normalize(image)
    return image if size is None else _resize(image, size)  # [3, h', w']


def preprocess(images, sizes=None, dtype=torch.float32, size_divisible=SIZE_DIVISIBLE):
    """What training and RetinaNet.detect both feed the network: a list of B images (uint8 or
    float [3, h_b, w_b], see prepare_image) and their target sizes (h'_b, w'_b) (None: keep)
    -> (batch [B, 3, H, W] normalised and zero-padded to a multiple of `size_divisible`,
    [(h'_b, w'_b)]). Runs on the images' device: on a GPU, resizing there costs next to nothing."""
    sizes = [None] * len(images) if sizes is None else sizes
    prepared = [prepare_image(image, size, dtype) for image, size in zip(images, sizes)]
    return batch_images(prepared, size_divisible), [tuple(p.shape[-2:]) for p in prepared]


# ----------------------------------------------------------------------------- anchors

def cell_anchors(sizes, ratios=ANCHOR_RATIOS):
    """The zero-centred anchors of one position, [len(ratios) * len(sizes), 4], ratio-major and
    rounded to whole pixels, as torchvision's AnchorGenerator.generate_anchors makes them."""
    scales = torch.tensor(sizes, dtype=torch.float32)  # [S]
    h_ratios = torch.sqrt(torch.tensor(ratios, dtype=torch.float32))  # [R]
    w_ratios = 1 / h_ratios  # [R]
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)  # [R*S]
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)  # [R*S]
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()  # [R*S, 4]


def _positive_int(x):
    """x is a whole number above 0: an int, a numpy integer or a 0-d integer tensor; not a bool."""
    try:
        return not isinstance(x, bool) and operator.index(x) > 0
    except TypeError:
        return False


def _cells():
    """The cell anchors of the 5 levels [5, 9, 4], whole pixels, as int32 on the CPU (whatever
    default device the caller has set)."""
    with torch.device("cpu"):
        return torch.stack([cell_anchors(sizes) for sizes in ANCHOR_SIZES]).int()  # [5, 9, 4]


def grid_anchors(feature_sizes, image_size, device, cells=None):
    """Anchors of every level, concatenated: [A, 4] float32, A = sum over levels of h*w*9, ordered
    level, then y, then x, then the 9 cell anchors (torchvision's RetinaNet layout).

    feature_sizes: [(h, w)] of P3..P7; image_size: (H, W) of the padded batch; cells: the cell
    anchors of the levels [5, 9, 4] already on `device` (RetinaNet keeps them there), or None to
    make them here (copied from the host: on a GPU, a copy that waits for it).
    """
    if cells is None:
        cells = _cells().to(device)  # [5, 9, 4]
    anchors = []
    for level, (h, w) in enumerate(feature_sizes):
        # torchvision's stride rule, image // feature, rather than 2**level: the two differ for
        # P6/P7 when H or W is not a multiple of 128 (e.g. 800 // 13 = 61, not 64), and we must
        # match its anchors exactly.
        stride_y, stride_x = image_size[0] // h, image_size[1] // w
        shift_x = torch.arange(w, dtype=torch.int32, device=device) * stride_x  # [w]
        shift_y = torch.arange(h, dtype=torch.int32, device=device) * stride_y  # [h]
        shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")  # [h, w]
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).view(-1, 1, 4)  # [h*w, 1, 4]
        anchors.append((shifts + cells[level][None]).reshape(-1, 4).float())  # [h*w*9, 4] float32
    return torch.cat(anchors)  # [A, 4]


# ----------------------------------------------------------------------------- the network

def _head(out_channels, bias):
    """One RetinaNet subnet (RetinaNet §4, FreeAnchor §4.1): 4 x (3x3 conv 256 + ReLU) and a 3x3
    prediction conv; indices 0, 2, 4, 6 are the hidden convs, 8 the prediction conv."""
    layers = []
    for _ in range(4):
        layers += [nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(FPN_CHANNELS, out_channels, 3, padding=1))
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    nn.init.constant_(layers[-1].bias, bias)
    return nn.Sequential(*layers)


class FrozenBatchNorm(FrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d (same buffers, same float32 result), computed in its
    input's dtype: under bfloat16 autocast its float32 buffers would otherwise promote every
    backbone activation after a norm layer (and the ReLUs, residual additions and what backward
    keeps of them) to float32, which the next convolution casts back. The authors'
    FrozenBatchNorm2d (maskrcnn-benchmark) likewise casts its buffers to half precision inputs."""

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        bias = self.bias - self.running_mean * scale  # [C]
        return x * scale.to(x.dtype)[:, None, None] + bias.to(x.dtype)[:, None, None]  # [B, C, H, W]


def _resnet(backbone, frozen_bn):
    """A torchvision ResNet/ResNeXt without its ImageNet classifier (avgpool, fc)."""
    norm_layer = FrozenBatchNorm if frozen_bn else nn.BatchNorm2d
    body = torchvision.models.get_model(backbone, weights=None, norm_layer=norm_layer)
    del body.avgpool, body.fc
    return body


def _read_backbone_weights(backbone, weights):
    """The ImageNet state dict to start `backbone` from: torchvision's (weights="imagenet") or a
    local file in torchvision's format. Returns (state_dict, where it came from)."""
    if weights == "imagenet":
        # IMAGENET1K_V1, not DEFAULT (= V2 for most ResNets): the classic weights, those of the
        # paper's era and of torchvision's own retinanet_resnet50_fpn. Except for resnext101_64x4d,
        # whose only torchvision weights came with its newer training recipe (83.2% top-1 against
        # about 79.6% for the Facebook ResNeXt the authors started from).
        enum = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
        try:
            return enum.get_state_dict(progress=True, check_hash=True), cached
        except Exception as e:  # no network (an OSError), a bad hash, a damaged file in the cache
            where = f"its copy in {cached} is damaged (delete it and retry)" if os.path.isfile(cached) else f"from {enum.url}"
            raise RuntimeError(
                f"cannot get the ImageNet weights of {backbone}: {where} ({type(e).__name__}: "
                f"{' '.join(str(e).split())}); pass a local backbone state dict with --weights PATH, or train "
                f"from scratch with --weights none") from None
    if not os.path.isfile(weights):
        raise ValueError(f"weights must be 'imagenet', 'none' or the path of a backbone state dict; "
                         f"{weights!r} is none of these ({'not a file' if os.path.exists(weights) else 'no such file'})")
    try:
        with warnings.catch_warnings():  # torch's note on a plain pickle's protocol: the error below says more
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever torch.load chokes on, the user needs the file name
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # torch's message has terminal colour codes
                 for line in str(e).splitlines() if line.strip()]
        # weights_only's refusal: its first lines advise weights_only=False, wrong for a damaged
        # file; the cause follows "WeightsUnpickler error:"
        cause = next((i for i, line in enumerate(lines) if "WeightsUnpickler error:" in line), None)
        if cause is not None:
            detail = lines[cause].split("WeightsUnpickler error:", 1)[1].strip() or " ".join(lines[cause + 1:cause + 2])
            raise ValueError(f"{weights}: not a state dict of tensors (torch.load with weights_only=True: "
                             f"{detail.split('. ')[0]}); --weights takes a torchvision ResNet state dict saved by "
                             f"torch.save (convert a Detectron2 or maskrcnn-benchmark .pkl first)") from None
        raise ValueError(f"{weights}: not a torch state dict ({type(e).__name__}: {lines[0] if lines else ''})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state dict (a dict of tensors), got {type(state).__name__}")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise ValueError(f"{weights}: expected a state dict of tensors; not tensors: {', '.join(not_tensors[:3])}"
                         f"{' ...' if len(not_tensors) > 3 else ''}")
    return state, weights


def _load_backbone(body, state, source, backbone):
    """Copy a torchvision-format ResNet state dict into `body`; the classifier (fc.*) is ignored,
    anything else that does not fit is one clear error naming the file and the first keys."""
    own = body.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # FrozenBatchNorm2d has no num_batches_tracked buffer: its presence or absence is not a mismatch.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = [f"{what} {items[:3]}{' ...' if len(items) > 3 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if items]
    if problems:
        raise ValueError(f"{source} does not fit a torchvision {backbone}: " + "; ".join(problems))
    body.load_state_dict(state, strict=False)


class RetinaNet(nn.Module):
    """RetinaNet with a ResNet/ResNeXt-FPN backbone, laid out like torchvision's.

    num_classes: K, without background (sigmoid classifier).
    backbone: one of BACKBONES.
    weights: "imagenet" (torchvision's IMAGENET1K_V1 download), "none" (from scratch) or the path
        of a torchvision-format backbone state dict (e.g. `torchvision.models.resnet50().state_dict()`).
    min_size, max_size: the test-time resize (shorter side, longer-side cap); min_size may be a
        tuple, of which detect uses the last value, as torchvision does.
    frozen_bn: None = FrozenBatchNorm2d iff the weights are pretrained; True/False forces it.
    prior_prob: the class probability the classifier starts from (its bias at init only: not in
        `config`, a checkpoint holds the trained bias).

    With pretrained weights the stem and res2 (body.conv1, body.bn1, body.layer1) are frozen.
    `m.config` holds what rebuilds the same architecture without downloading:
    `RetinaNet(**{**m.config, "weights": "none"})` then `load_state_dict`. Not the training flags:
    built with weights "none", nothing is frozen (to fine-tune as from pretrained weights, call
    requires_grad_(False) on body.conv1, body.bn1 and body.layer1), and BatchNorm's eps is the
    default 1e-5 (from_torchvision copies torchvision's, 0 for its COCO_V1 weights).
    Module names: `body` (the ResNet trunk), `fpn`, `cls_head`, `box_head`.
    """

    def __init__(self, num_classes, backbone="resnet50", weights="imagenet", min_size=800, max_size=1333,
                 frozen_bn=None, prior_prob=PRIOR_PROB):
        super().__init__()
        if not _positive_int(num_classes):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        if not isinstance(weights, (str, os.PathLike)):
            raise ValueError(f"weights must be 'imagenet', 'none' or a path, got {weights!r}")
        weights = os.fspath(weights)
        sizes = min_size if isinstance(min_size, (tuple, list)) else (min_size,)
        if not sizes or not all(_positive_int(s) for s in sizes):
            raise ValueError(f"min_size must be a positive int or a tuple of them, got {min_size!r}")
        if not _positive_int(max_size):
            raise ValueError(f"max_size must be a positive int, got {max_size!r}")
        if frozen_bn is not None and not isinstance(frozen_bn, bool):
            raise ValueError(f"frozen_bn must be None, True or False, got {frozen_bn!r}")
        if not (isinstance(prior_prob, (int, float)) and 0 < prior_prob < 1):
            raise ValueError(f"prior_prob must be a number in (0, 1), got {prior_prob!r}")
        pretrained = weights != "none"
        frozen_bn = pretrained if frozen_bn is None else frozen_bn

        num_classes, max_size = int(num_classes), int(max_size)  # numpy integers too; the config is written as JSON
        self.num_classes = num_classes
        self.min_size = tuple(int(s) for s in min_size) if isinstance(min_size, (tuple, list)) else int(min_size)
        self.max_size = max_size
        self.config = dict(num_classes=num_classes, backbone=backbone, min_size=self.min_size,
                           max_size=max_size, frozen_bn=frozen_bn)
        # Inference thresholds (RetinaNet §4.1, torchvision's defaults but 100 detections per image).
        self.score_thresh = 0.05
        self.topk_candidates = 1000  # per level
        self.nms_thresh = 0.5
        self.detections_per_img = 100

        self.body = _resnet(backbone, frozen_bn)
        if pretrained:
            state, source = _read_backbone_weights(backbone, weights)
            _load_backbone(self.body, state, source, backbone)
            self.freeze_stem()

        c5 = self.body.inplanes  # channels out of layer4: 512 (BasicBlock) or 2048 (Bottleneck)
        in_channels = (c5 // 4, c5 // 2, c5)  # C3, C4, C5
        self.fpn = nn.ModuleDict({
            "lateral": nn.ModuleList(nn.Conv2d(c, FPN_CHANNELS, 1) for c in in_channels),
            "output": nn.ModuleList(nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, padding=1) for _ in in_channels),
            "p6": nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, stride=2, padding=1),
            "p7": nn.Conv2d(FPN_CHANNELS, FPN_CHANNELS, 3, stride=2, padding=1),
        })
        for conv in self.fpn.modules():
            if isinstance(conv, nn.Conv2d):  # torchvision's FPN init (Detectron's c2_xavier_fill)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

        self.cls_head = _head(NUM_ANCHORS * num_classes, -math.log((1 - prior_prob) / prior_prob))
        self.box_head = _head(NUM_ANCHORS * 4, 0.0)

        # Anchors depend only on the feature-map sizes: cached per (sizes, device), 16 at most; a
        # miss costs a few small kernels on the device. Callers must not edit them in place.
        self._anchor_cache = {}
        # The cell anchors of the 5 levels [5, 9, 4], whole pixels, as a buffer: they follow the model
        # to its device, so that new anchors never wait for a host copy; integers, so that no
        # .to(dtype) of the model rounds them; not saved in checkpoints (always the same).
        self.register_buffer("cells", _cells(), persistent=False)
        self.register_load_state_dict_post_hook(RetinaNet._cells_after_load)

    def freeze_stem(self):
        """Stem and res2 keep their ImageNet values (Detectron's FREEZE_AT=2, torchvision's
        trainable_layers=3): low-level filters gain nothing from detection batch sizes. Done by
        the constructor with pretrained weights; train.py calls it for a resumed run, whose
        weights all come from its checkpoint."""
        for module in (self.body.conv1, self.body.bn1, self.body.layer1):
            module.requires_grad_(False)

    def features(self, images):
        """images [B, 3, H, W] -> [P3, P4, P5, P6, P7], each [B, 256, h_l, w_l] (strides 8..128)."""
        body = self.body
        x = body.maxpool(body.relu(body.bn1(body.conv1(images))))  # [B, 64, H/4, W/4]
        c3 = body.layer2(body.layer1(x))  # [B, C3, H/8, W/8]
        c4 = body.layer3(c3)  # [B, C4, H/16, W/16]
        c5 = body.layer4(c4)  # [B, C5, H/32, W/32]
        lateral, output = self.fpn["lateral"], self.fpn["output"]
        # Top-down pathway (FPN §3): the coarser map, upsampled (nearest), plus the 1x1 lateral.
        top = lateral[2](c5)
        p5 = output[2](top)
        top = lateral[1](c4) + F.interpolate(top, size=c4.shape[-2:], mode="nearest")
        p4 = output[1](top)
        top = lateral[0](c3) + F.interpolate(top, size=c3.shape[-2:], mode="nearest")
        p3 = output[0](top)
        p6 = self.fpn["p6"](one_column_padded(p5))  # from P5 (not C5), as torchvision's LastLevelP6P7(256, 256)
        p7 = self.fpn["p7"](one_column_padded(F.relu(p6)))
        return [p3, p4, p5, p6, p7]

    def anchors(self, feature_sizes, image_size, device):
        """Cached grid_anchors(): [A, 4] float32 on `device`. Under torch.compile they are
        computed in the graph instead: a cache keyed by the padded size would make the compiled
        network specialise on every size (a recompilation per size, then eager past the limit),
        where the graph's sizes can stay symbolic."""
        if torch.compiler.is_compiling():
            return grid_anchors(feature_sizes, image_size, device, self.cells)
        key = (tuple(feature_sizes), tuple(image_size), str(device))
        if key not in self._anchor_cache:
            if len(self._anchor_cache) >= 16:  # bound the memory; drop the oldest
                self._anchor_cache.pop(next(iter(self._anchor_cache)))
            with torch.inference_mode(False):  # cached for later forwards, which may need their gradient
                self._anchor_cache[key] = grid_anchors(feature_sizes, image_size, device, self.cells)
        return self._anchor_cache[key]

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .to_empty() and the like: the cell anchors, which checkpoints do not hold,
        are made again on the model's new device (after .to_empty(), the usual step after building
        a model on the meta device, the buffer would hold garbage and so would every anchor)."""
        super()._apply(fn, recurse)
        self._remake_cells(self.cells.device)
        return self

    def _remake_cells(self, device):
        with torch.inference_mode(False):  # also when moved inside inference mode: a plain buffer
            self.cells = _cells().to(device)
        self._anchor_cache.clear()

    @staticmethod
    def _cells_after_load(module, incompatible_keys):
        """load_state_dict(..., assign=True) into a model built on the meta device gives it real
        weights but leaves the cell anchors on the meta device: made again beside the weights."""
        if module.cells.is_meta:
            module._remake_cells(module.cls_head[-1].weight.device)

    def forward(self, images):
        """images [B, 3, H, W] normalised and padded -> (cls_logits [B, A, K] pre-sigmoid,
        box_deltas [B, A, 4] encoded with BOX_WEIGHTS, anchors [A, 4] xyxy float32)."""
        cls_logits, box_deltas, anchors, _ = self._predict(images)
        return cls_logits, box_deltas, anchors

    def _predict(self, images):
        """forward(), plus the number of anchors of each level."""
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RetinaNet expects images [B, 3, H, W], got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        features = self.features(images)
        K = self.num_classes
        cls_logits, box_deltas = [], []
        for p in features:
            B, _, h, w = p.shape
            # [B, 9*K, h, w] -> [B, h*w*9, K]: position-major, then the 9 anchors (torchvision's order)
            cls_logits.append(self.cls_head(p).view(B, NUM_ANCHORS, K, h, w).permute(0, 3, 4, 1, 2).reshape(B, -1, K))
            box_deltas.append(self.box_head(p).view(B, NUM_ANCHORS, 4, h, w).permute(0, 3, 4, 1, 2).reshape(B, -1, 4))
        feature_sizes = [tuple(p.shape[-2:]) for p in features]
        anchors = self.anchors(feature_sizes, images.shape[-2:], images.device)  # [A, 4]
        per_level = [h * w * NUM_ANCHORS for h, w in feature_sizes]
        return torch.cat(cls_logits, dim=1), torch.cat(box_deltas, dim=1), anchors, per_level

    @torch.no_grad()
    def detect(self, images, nms=True, min_size=None, max_size=None, candidates=False, classes=None):
        """Detections of a list of RGB images [3, h, w] (floats in [0, 1], or uint8 as data.py
        reads them), at their original size, on any device.

        Returns one dict per image: boxes [N, 4] xyxy in original pixels, scores [N], labels [N]
        int64 in [0, K). Resizing, normalising and padding as torchvision's GeneralizedRCNNTransform;
        postprocessing as its RetinaNet.postprocess_detections, batched: the same detections as the
        RetinaNet of to_torchvision to float32 rounding. nms=False returns the candidates
        that NMS would see (score threshold, per-level top-k, decoded, clipped, in original pixels);
        candidates=True returns both, (detections, candidates), from the one forward pass (the
        detections after NMS whatever `nms` says).
        min_size, max_size override the model's (test-time scales). classes: the labels to detect
        (None: all K); the others' scores never become candidates, so they take none of the top-k
        and detections_per_img places (evaluate.py on a split that lists some of the model's
        categories). Eval-mode semantics; the training flags of the modules are left as they were.
        """
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"detect expects a list of [3, H, W] tensors, got {type(images).__name__}")
        if not images:
            return ([], []) if candidates else []
        min_size = self.min_size if min_size is None else min_size
        max_size = self.max_size if max_size is None else max_size
        scale = min_size[-1] if isinstance(min_size, (tuple, list)) else min_size
        if not (_positive_int(scale) and _positive_int(max_size)):
            raise ValueError(f"detect: min_size and max_size must be positive ints, got {min_size!r} and {max_size!r}")
        if classes is not None:
            classes = [int(c) for c in classes]
            if not all(0 <= c < self.num_classes for c in classes):
                raise ValueError(f"detect: classes must be labels in [0, {self.num_classes}), got {classes}")
        weight = self.cls_head[-1].weight  # the model's device and dtype
        original_sizes = []
        for i, image in enumerate(images):
            if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 or image.shape[1:].numel() == 0:
                raise ValueError(f"detect: image {i} must be a [3, H, W] tensor with H, W > 0, got "
                                 f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
            if not (image.is_floating_point() or image.dtype == torch.uint8):
                raise TypeError(f"detect: image {i} is {image.dtype}; expected floats in [0, 1] or uint8")
            original_sizes.append(tuple(image.shape[-2:]))
        # the same preparation as training (data.to_device): to float, normalise, resize, pad
        batch, image_sizes = preprocess([image.to(weight.device) for image in images],
                                        [resized_size(s, scale, max_size) for s in original_sizes], weight.dtype)

        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            cls_logits, box_deltas, anchors, per_level = self._predict(batch)  # [B, A, K], [B, A, 4], [A, 4]
        finally:
            for module, training in modes:
                module.training = training

        # torchvision's postprocess_detections, for the whole batch at once: per image and level,
        # the top-k (anchor, class) pairs whose score passes the threshold, decoded and clipped,
        # then class-wise NMS per image. Here the top-k comes first, over the logits (sigmoid is
        # monotonic), and the threshold after it as a mask: the same candidates in the same order
        # (ties at the k-th score aside), with no data-dependent shape until the one compaction of
        # the batch. The host waits for the GPU twice per batch, then in each image's NMS (torchvision's
        # loop over images and levels waits at every level of every image).
        B, K = len(images), self.num_classes
        if classes is not None:
            wanted = torch.zeros(K, dtype=torch.bool)  # [K]
            wanted[classes] = True
            cls_logits.masked_fill_(~host_to_device(wanted, cls_logits.device), -math.inf)  # [B, A, K]
        top_logits, top_index, first = [], [], 0
        for n in per_level:
            logits, index = cls_logits[:, first:first + n].flatten(1).topk(
                min(self.topk_candidates, n * K), dim=1)  # [B, k], index = anchor*K + class in the level
            top_logits.append(logits)
            top_index.append(index + first * K)
            first += n
        scores = torch.sigmoid(torch.cat(top_logits, dim=1).float())  # [B, N]  N = sum of the levels' k
        top_index = torch.cat(top_index, dim=1)  # [B, N]
        anchor_idx, labels = top_index // K, top_index % K  # [B, N]
        deltas = box_deltas.gather(1, anchor_idx[..., None].expand(B, -1, 4)).float()  # [B, N, 4]
        boxes = decode(anchors[anchor_idx], deltas)  # [B, N, 4]  in the resized image's pixels
        # per image: (w, h, w, h) to clip to, and the ratios back to the original size (float32
        # division, as torchvision's resize_boxes)
        sizes = torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32)  # [B, 4]
        originals = torch.tensor([[w, h, w, h] for h, w in original_sizes], dtype=torch.float32)  # [B, 4]
        sizes, ratios = host_to_device(torch.stack((sizes, originals / sizes)), boxes.device)  # [B, 4] each
        boxes = torch.minimum(boxes.clamp(min=0), sizes[:, None])  # [B, N, 4]
        passed = scores > self.score_thresh  # [B, N]
        counts = passed.sum(1).tolist()  # candidates per image: a host read
        where = passed.nonzero(as_tuple=True)  # the batch's candidates, image by image: a host read
        per_image = zip(*(t[where].split(counts) for t in (boxes, scores, labels)))  # B x ([n_b, 4], [n_b], [n_b])
        results, before_nms = [], []
        for b, (boxes_b, scores_b, labels_b) in enumerate(per_image):
            found = {"boxes": boxes_b * ratios[b], "scores": scores_b, "labels": labels_b}  # in original pixels
            before_nms.append(found)
            if nms or candidates:  # NMS in the resized image's pixels, as torchvision's
                keep = batched_nms(boxes_b, scores_b, labels_b, self.nms_thresh)[: self.detections_per_img]
                found = {k: v[keep] for k, v in found.items()}
            results.append(found)
        return (results, before_nms) if candidates else results


# ----------------------------------------------------------------------------- torchvision

def _torchvision_names():
    """Prefix of each of our modules -> the prefix of the same module in torchvision's RetinaNet."""
    names = {"body.": "backbone.body."}
    for i in range(3):
        names[f"fpn.lateral.{i}."] = f"backbone.fpn.inner_blocks.{i}.0."
        names[f"fpn.output.{i}."] = f"backbone.fpn.layer_blocks.{i}.0."
    names["fpn.p6."] = "backbone.fpn.extra_blocks.p6."
    names["fpn.p7."] = "backbone.fpn.extra_blocks.p7."
    for i in range(4):
        names[f"cls_head.{2 * i}."] = f"head.classification_head.conv.{i}.0."
        names[f"box_head.{2 * i}."] = f"head.regression_head.conv.{i}.0."
    names["cls_head.8."] = "head.classification_head.cls_logits."
    names["box_head.8."] = "head.regression_head.bbox_reg."
    return names


def _rename(key, names):
    for old, new in names.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def _box_scale(device):
    """[9*4]: BOX_WEIGHTS for each output channel of the last regression conv (channel a*4 + c
    predicts coordinate c of cell anchor a)."""
    return torch.tensor(BOX_WEIGHTS, device=device).repeat(NUM_ANCHORS)


def _torchvision_box_conv(weight, bias):
    """The last regression conv's (weight [36, 256, 3, 3], bias [36]) for torchvision's BoxCoder
    weights (1, 1, 1, 1): ours predict (10, 10, 5, 5) x theirs, so divide the rows instead of
    changing the math. The dw, dh clamp at log(1000/16) is applied after dividing by the weight in
    both decoders, so it clamps the same quantity."""
    scale = _box_scale(weight.device)  # [36]
    return weight / scale[:, None, None, None], bias / scale


def _copy_flags(src, dst, names):
    """requires_grad of every parameter and eps of every BatchNorm, which state dicts do not carry
    (torchvision's COCO_V1 checkpoint runs FrozenBatchNorm with eps = 0)."""
    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        dst_params[_rename(name, names)].requires_grad_(p.requires_grad)
    dst_modules = dict(dst.named_modules())
    for name, module in src.named_modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)):
            dst_modules[_rename(name + ".", names)[:-1]].eps = module.eps


def to_torchvision(m):
    """A `torchvision.models.detection.RetinaNet` (eval mode, on m's device) with m's weights,
    sizes, thresholds and anchors, whose detections equal `m.detect`'s in float32 (under bf16
    autocast torchvision's FrozenBatchNorm2d runs in float32, ours in bfloat16)."""
    from torchvision.models.detection import RetinaNet as TorchvisionRetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    resnet = torchvision.models.get_model(m.config["backbone"], weights=None,
                                          norm_layer=FrozenBatchNorm2d if m.config["frozen_bn"] else nn.BatchNorm2d)
    c5 = resnet.inplanes
    backbone = BackboneWithFPN(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c5 // 4, c5 // 2, c5],
                               FPN_CHANNELS, extra_blocks=LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS))
    tv = TorchvisionRetinaNet(backbone, m.num_classes, min_size=m.min_size, max_size=m.max_size,
                              score_thresh=m.score_thresh, nms_thresh=m.nms_thresh,
                              detections_per_img=m.detections_per_img, topk_candidates=m.topk_candidates)
    names = _torchvision_names()
    state = {_rename(k, names): v for k, v in m.state_dict().items()}
    state["head.regression_head.bbox_reg.weight"], state["head.regression_head.bbox_reg.bias"] = (
        _torchvision_box_conv(m.box_head[-1].weight.detach(), m.box_head[-1].bias.detach()))
    tv.load_state_dict(state)
    _copy_flags(m, tv, names)
    return tv.to(m.cls_head[-1].weight.device).eval()


def _infer_backbone(body_state):
    """The name in BACKBONES whose torchvision trunk has exactly these tensor names and shapes."""
    shapes = {k: tuple(v.shape) for k, v in body_state.items() if not k.endswith("num_batches_tracked")}
    for name in BACKBONES:
        with torch.device("meta"):  # no memory, no init cost
            ref = _resnet(name, frozen_bn=True).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in ref.items()}:
            return name
    raise ValueError("from_torchvision: the backbone is none of " + ", ".join(BACKBONES))


def from_torchvision(tv, backbone=None):
    """Our RetinaNet from a `torchvision.models.detection.RetinaNet` built like
    `retinanet_resnet50_fpn` (ResNet/ResNeXt trunk, FPN on layer2-4, LastLevelP6P7(256, 256),
    default anchors and head): same weights, sizes and thresholds. Inverse of to_torchvision: brings
    torchvision's checkpoints into this project's model (to evaluate them, or as a starting point
    for your own training code). `backbone` is inferred if None."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    fpn = getattr(tv.backbone, "fpn", None)
    if not (isinstance(getattr(fpn, "extra_blocks", None), LastLevelP6P7) and fpn.extra_blocks.use_P5):
        raise ValueError("from_torchvision: expected a retinanet_resnet50_fpn-style model (P6 from P5, "
                         "LastLevelP6P7(256, 256)); retinanet_resnet50_fpn_v2 is not supported")
    ag = tv.anchor_generator
    if tuple(map(tuple, ag.sizes)) != ANCHOR_SIZES or any(tuple(r) != ANCHOR_RATIOS for r in ag.aspect_ratios):
        raise ValueError(f"from_torchvision: anchors must be torchvision's defaults, got sizes {ag.sizes}")
    t = tv.transform
    if (tuple(t.image_mean) != IMAGENET_MEAN or tuple(t.image_std) != IMAGENET_STD
            or t.size_divisible != SIZE_DIVISIBLE or t.fixed_size is not None):
        raise ValueError("from_torchvision: the model's transform must use ImageNet mean/std, "
                         "padding to 32 and no fixed size")
    if tuple(tv.box_coder.weights) != (1.0, 1.0, 1.0, 1.0):
        raise ValueError(f"from_torchvision: expected box weights (1, 1, 1, 1), got {tv.box_coder.weights}")

    body_state = tv.backbone.body.state_dict()
    backbone = _infer_backbone(body_state) if backbone is None else backbone
    frozen_bn = any(isinstance(module, FrozenBatchNorm2d) for module in tv.backbone.body.modules())
    min_size = t.min_size[0] if len(t.min_size) == 1 else tuple(t.min_size)
    m = RetinaNet(tv.head.classification_head.num_classes, backbone=backbone, weights="none",
                  min_size=min_size, max_size=t.max_size, frozen_bn=frozen_bn)
    m.score_thresh, m.nms_thresh = tv.score_thresh, tv.nms_thresh
    m.detections_per_img, m.topk_candidates = tv.detections_per_img, tv.topk_candidates

    names = {new: old for old, new in _torchvision_names().items()}
    tv_state = tv.state_dict()
    unknown = [k for k in tv_state if _rename(k, names) is None]
    if unknown:
        raise ValueError(f"from_torchvision: tensors with no counterpart here: {unknown[:3]}")
    state = {_rename(k, names): v for k, v in tv_state.items()}
    scale = _box_scale(state["box_head.8.bias"].device)
    state["box_head.8.weight"] = state["box_head.8.weight"] * scale[:, None, None, None]
    state["box_head.8.bias"] = state["box_head.8.bias"] * scale
    m.load_state_dict(state)
    _copy_flags(tv, m, names)
    return m.to(tv.head.regression_head.bbox_reg.weight.device).train(tv.training)
