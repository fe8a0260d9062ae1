"""RetinaNet (Lin et al., 2017), the detector that FreeAnchor (Zhang et al., NeurIPS 2019) trains.

This file holds everything geometric that the loss and the detector share, with torchvision's
conventions (design.md §5), so that a model trained here can be exported to
`torchvision.models.detection.RetinaNet`:

- boxes are xyxy in pixels, width = x2 - x1 (no legacy +1);
- box coding: R-CNN deltas (dx, dy, dw, dh) with weights (10, 10, 5, 5), the authors' setting;
- images: RGB in [0, 1], ImageNet mean/std, shorter side resized to `min_size` (longer side at
  most `max_size`), batched with zero padding to a multiple of 32, exactly as torchvision's
  `GeneralizedRCNNTransform` does it.

Run the tests with `python -m pytest tests/test_model.py`.
"""

import math

import torch
import torch.nn.functional as F

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (wx, wy, ww, wh): stds 0.1/0.1/0.2/0.2, authors' code
BOX_CLIP = math.log(1000.0 / 16)  # decode clamps dw, dh here (as torchvision and Detectron)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32


# ----------------------------------------------------------------------------- boxes

def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes, broadcasting over leading dimensions.

    boxes1 [..., N, 4], boxes2 [..., M, 4] -> [..., N, M]. A pair whose union is empty (two
    zero-area boxes) has IoU 0, never NaN.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])  # [..., N]
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])  # [..., M]
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # [..., N, M, 2]
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])  # [..., N, M, 2]
    wh = (rb - lt).clamp(min=0)  # [..., N, M, 2]
    inter = wh[..., 0] * wh[..., 1]  # [..., N, M]
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

def resize_image(image, min_size, max_size):
    """Resize so the shorter side is `min_size` and the longer at most `max_size`.

    image [3, h, w] -> [3, h', w'], bilinear, with the very scale rule and interpolation call of
    torchvision's GeneralizedRCNNTransform (so sizes and pixels match it exactly).
    """
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                         recompute_scale_factor=True, align_corners=False)[0]


def resize_boxes(boxes, old_size, new_size):
    """Move xyxy boxes [G, 4] from an image of size old_size (h, w) to one of new_size (h, w)."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32) / torch.tensor(old_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32) / torch.tensor(old_size[1], dtype=torch.float32)
    ratios = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h)).to(boxes)
    return boxes * ratios


def normalize(image):
    """[3, h, w] RGB in [0, 1] -> ImageNet-normalised [3, h, w]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device)[:, None, None]
    return (image - mean) / std


def batch_images(images, size_divisible=SIZE_DIVISIBLE):
    """List of [3, h_i, w_i] -> [B, 3, H, W], zero-padded at the bottom/right to the largest
    height and width rounded up to a multiple of `size_divisible` (padding after normalisation,
    as torchvision does)."""
    H = max(img.shape[-2] for img in images)
    W = max(img.shape[-1] for img in images)
    H = int(math.ceil(H / size_divisible) * size_divisible)
    W = int(math.ceil(W / size_divisible) * size_divisible)
    batch = images[0].new_zeros((len(images), 3, H, W))  # [B, 3, H, W]
    for b, img in enumerate(images):
        batch[b, :, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch
