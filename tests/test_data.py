"""Tests of data.py: COCO-layout loading and validation, transforms, batching, sampling, shapes.

Every dataset here is a handful of tiny images written into tmp_path. Run:
    python -m pytest -q tests/test_data.py
"""

import contextlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import (CocoDataset, DataError, ImageError, TrainSampler, canvas_shapes, collate, loader_batches, pad_to_canvas,
                  prepare_shapes, resolve_root, to_device)
from model import normalize, prepare_image, preprocess, resize_image, resized_size


# ----------------------------------------------------------------------------- helpers

def write_coco(root, split, images, annotations, categories):
    """Write root/annotations/instances_<split>.json (annotations None: without the key, a list of
    images); returns its path."""
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, split), exist_ok=True)
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    coco = {"images": images, "annotations": annotations, "categories": categories}
    with open(path, "w") as f:
        json.dump({k: v for k, v in coco.items() if v is not None}, f)
    return path


def image_entry(image_id, file_name, w, h):
    return {"id": image_id, "file_name": file_name, "width": w, "height": h}


def ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "iscrowd": iscrowd, "area": bbox[2] * bbox[3]}


CATEGORIES = [{"id": 42, "name": "c42"}, {"id": 3, "name": "c3"}, {"id": 10, "name": "c10"}]


@pytest.fixture
def tiny(tmp_path):
    """A user's own dataset: odd category ids, JPEG/PNG in modes RGB, L, RGBA, P and 16-bit,
    crowd regions, an empty image, zero-width and out-of-image boxes."""
    root = str(tmp_path / "tiny")
    os.makedirs(os.path.join(root, "val"))
    Image.new("RGB", (64, 48), (200, 100, 50)).save(os.path.join(root, "val", "a.jpg"), quality=95)
    Image.new("L", (40, 60), 128).save(os.path.join(root, "val", "b.png"))
    Image.new("RGBA", (50, 50), (10, 20, 30, 0)).save(os.path.join(root, "val", "c.png"))
    p = Image.new("P", (30, 20), 1)
    p.putpalette([0, 0, 0, 255, 0, 255] + [0] * 762)
    p.save(os.path.join(root, "val", "d.png"), transparency=0)
    Image.fromarray(np.full((16, 24), 65535 // 2, dtype=np.uint16)).save(os.path.join(root, "val", "e.png"))
    images = [image_entry(1, "a.jpg", 64, 48), image_entry(2, "b.png", 40, 60),
              image_entry(3, "c.png", 50, 50), image_entry(4, "d.png", 30, 20),
              image_entry(5, "e.png", 24, 16)]
    annotations = [
        ann(11, 1, 10, [4, 6, 20, 10]),  # usable, label 1
        ann(12, 1, 3, [30, 5, 20, 20], iscrowd=1),  # crowd: never reaches the loss
        ann(13, 1, 42, [10, 10, 0, 5]),  # zero width
        ann(14, 1, 42, [50, 30, 30, 40]),  # crosses the border: clipped to [50, 30, 64, 48]
        ann(21, 2, 3, [0, 0, 10, 30.5]),  # usable, label 0
        ann(41, 4, 3, [1, 1, 5, 5], iscrowd=1),  # image 4 has only unusable boxes
        ann(42, 4, 10, [100, 100, 10, 10]),  # entirely outside: nothing left after clipping
        ann(43, 4, 10, [2, 2, 10, 0.5]),  # under 1 px high
    ]
    write_coco(root, "val", images, annotations, CATEGORIES)
    return root


def one_line(e):
    message = str(e.value)
    assert "\n" not in message and message.strip() == message and message
    return message


# ----------------------------------------------------------------------------- COCO layout

def test_labels_are_contiguous_from_sorted_category_ids(tiny, capsys):
    ds = CocoDataset(tiny, "val", train=False)
    assert capsys.readouterr().out == ""  # pycocotools' chatter is silenced
    assert ds.categories == [{"id": 3, "name": "c3"}, {"id": 10, "name": "c10"}, {"id": 42, "name": "c42"}]
    image, target = ds[0]
    assert target["labels"].tolist() == [1, 2]
    assert [ds.categories[k]["id"] for k in target["labels"]] == [10, 42]
    assert target["labels"].dtype == torch.int64


def test_crowd_and_degenerate_boxes_are_dropped_and_boxes_clipped(tiny):
    ds = CocoDataset(tiny, "val", train=False)
    _, target = ds[0]
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[4, 6, 24, 16], [50, 30, 64, 48]]
    assert ds[1][1]["boxes"].tolist() == [[0, 0, 10, 30.5]]
    for i in (2, 3, 4):  # empty image, only-unusable image, no annotations
        assert ds[i][1]["boxes"].shape == (0, 4) and ds[i][1]["labels"].shape == (0,)


def test_training_skips_images_without_usable_box_evaluation_keeps_all(tiny):
    train = CocoDataset(tiny, "val", train=True)
    evaluation = CocoDataset(tiny, "val", train=False)
    assert train.image_ids == [1, 2]
    assert evaluation.image_ids == [1, 2, 3, 4, 5]
    assert train.tiny_boxes == evaluation.tiny_boxes == 3  # annotations 13, 42, 43; crowd not counted
    assert train.images_without_boxes == evaluation.images_without_boxes == 3  # images 3, 4, 5
    assert evaluation.aspect_ratios == [64 / 48, 40 / 60, 1.0, 30 / 20, 24 / 16]
    _, target = train[1]
    assert target["image_id"] == 2 and target["orig_size"] == (60, 40) and target["size"] == (60, 40)
    # The COCO ground truth for COCOeval keeps every annotation, crowd included.
    assert len(evaluation.coco.getAnnIds()) == 8


def test_every_pil_mode_becomes_rgb(tiny):
    ds = CocoDataset(tiny, "val", train=False)
    expected = {0: (200, 100, 50), 1: (128, 128, 128), 2: (10, 20, 30), 3: (255, 0, 255), 4: (127.5, 127.5, 127.5)}
    for i, rgb in expected.items():
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert tuple(image.shape[-2:]) == target["size"] == target["orig_size"]
        mean = image.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(rgb, dtype=torch.float32), atol=3), (i, mean)


def test_float_images_in_0_1_and_in_0_255_keep_their_brightness():
    from data import _to_rgb
    for values, grey in ((0.5, 128), (128.0, 128), (40000.0, 156)):  # [0, 1], [0, 255], 16-bit range
        rgb = _to_rgb(Image.fromarray(np.full((4, 6), values, dtype=np.float32), mode="F"))
        assert rgb.shape == (4, 6, 3) and (rgb == grey).all(), (values, rgb[0, 0])


def test_16_bit_images_keep_their_brightness_whatever_their_pixels(tmp_path):
    """A 16-bit grey PNG or PGM is scaled by 65535, also where no pixel is above 255 (a dark one):
    PIL reads 16-bit PGM, and older versions 16-bit PNG, as 32-bit integers (mode I), where the
    format, not the pixels, says the range."""
    for name in ("a.png", "a.pgm"):
        for brightest in (255, 256):
            pixels = np.full((4, 6), 200, dtype=np.uint16)
            pixels[0, 0] = brightest
            path = str(tmp_path / name)
            Image.fromarray(pixels).save(path)
            with Image.open(path) as img:
                assert img.mode in ("I", "I;16", "I;16B"), img.mode
            rgb = data.read_image(path)  # [4, 6, 3]
            assert (rgb[1:] == round(200 / 65535 * 255)).all(), (name, brightest, rgb[1, 0])


def box_image(tmp_path, w=80, h=60, box=(10, 20, 40, 30)):
    """A black image with one white box, and its dataset."""
    root = str(tmp_path / "box")
    os.makedirs(os.path.join(root, "s"))
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    pixels[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(pixels).save(os.path.join(root, "s", "x.png"))
    x1, y1, x2, y2 = box
    write_coco(root, "s", [image_entry(7, "x.png", w, h)], [ann(1, 7, 5, [x1, y1, x2 - x1, y2 - y1])],
               [{"id": 5, "name": "box"}])
    return root


def bright_box(image):
    """Tight xyxy box of the pixels brighter than half."""
    mask = image.mean(0) > 0.5  # [h, w]
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return [cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1]


def network_input(ds, key):
    """What the network sees of dataset[key], through collate and to_device: [3, h', w'] normalised."""
    images, boxes, labels = to_device(collate([ds[key]]), "cpu")
    h, w = ds[key][1]["size"]
    return images[0, :, :h, :w], boxes[0]


@pytest.mark.parametrize("min_size, max_size, size",
                         [(120, 1333, (120, 160)), (120, 100, (75, 100)), (45, 1333, (45, 60))])
def test_resize_and_flip_move_boxes_with_the_pixels(tmp_path, min_size, max_size, size):
    ds = CocoDataset(box_image(tmp_path), "s", train=True, max_size=max_size)
    plain, t0 = ds[0]
    assert t0["boxes"].tolist() == [[10, 20, 40, 30]] and bright_box(plain.float() / 255) == [10, 20, 40, 30]

    image, t = ds[(0, min_size, False)]
    assert torch.equal(image, plain)  # uint8 at its original size: the device resizes
    assert t["size"] == size and t["orig_size"] == (60, 80)
    seen, boxes = network_input(ds, (0, min_size, False))
    assert tuple(seen.shape[-2:]) == size
    s = size[0] / 60
    assert torch.allclose(boxes, torch.tensor([[10 * s, 20 * s, 40 * s, 30 * s]]))
    assert np.allclose(bright_box(seen), boxes[0].tolist(), atol=1)

    flipped, tf = ds[(0, min_size, True)]
    assert torch.equal(flipped, plain.flip(-1))
    seen_flipped, boxes = network_input(ds, (0, min_size, True))
    W = size[1]
    assert torch.allclose(seen_flipped, seen.flip(-1), atol=1e-5)  # mirror, then resize == resize, then mirror
    assert torch.allclose(boxes, torch.tensor([[W - 40 * s, 20 * s, W - 10 * s, 30 * s]]))
    assert np.allclose(bright_box(seen_flipped), boxes[0].tolist(), atol=1)
    assert tf["labels"].tolist() == [0]


def test_collate_pads_uint8_and_to_device_normalises_resizes_pads(tiny):
    ds = CocoDataset(tiny, "val", train=False)
    batch = [ds[0], ds[(1, 70, True)]]  # [3, 48, 64] and [3, 60, 40] -> 105x70
    images, targets = collate(batch)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 64, 64)
    assert [t["orig_size"] for t in targets] == [(48, 64), (60, 40)]
    assert [t["size"] for t in targets] == [(48, 64), (105, 70)]
    assert torch.equal(images[1, :, :60, :40], batch[1][0]) and images[1, :, 60:].sum() == 0

    x, gt_boxes, gt_labels = to_device((images, targets), "cpu")
    assert x.dtype == torch.float32 and x.shape == (2, 3, 128, 96)
    assert torch.equal(x[0, :, :48, :64], normalize(batch[0][0].float() / 255))
    expected = resize_image(normalize(batch[1][0].float() / 255), 70, 1333)  # torchvision's order
    assert torch.equal(x[1, :, :105, :70], expected)
    assert x[0, :, 48:].abs().sum() == 0 and x[0, :, :, 64:].abs().sum() == 0
    assert x[1, :, 105:].abs().sum() == 0 and x[1, :, :, 70:].abs().sum() == 0
    assert [b.tolist() for b in gt_boxes] == [t["boxes"].tolist() for t in targets]
    assert [b.tolist() for b in gt_labels] == [t["labels"].tolist() for t in targets]


def test_uint8_and_float_images_prepare_identically():
    # uint8 is divided by 255 first: the same values a float caller passes, then the same ops
    image = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in (None, (37, 50), (64, 86), (20, 27)):
        assert torch.equal(prepare_image(image, size), prepare_image(image.float() / 255, size))
    batch, sizes = preprocess([image, image.float() / 255], [(64, 86), (64, 86)])
    assert sizes == [(64, 86)] * 2 and torch.equal(batch[0], batch[1])
    # resize-then-normalise differs from torchvision's normalise-then-resize only by rounding
    other = normalize(resize_image(image.float() / 255, 64, 1333))
    assert torch.allclose(other, prepare_image(image, (64, 86)), atol=1e-5)


def test_resized_size_is_what_interpolate_makes():
    for h, w in ((480, 640), (427, 640), (333, 500), (60, 80), (641, 479), (50, 999)):
        for min_size, max_size in ((800, 1333), (640, 1066), (192, 320), (45, 1333), (57, 101)):
            scale = min(min_size / min(h, w), max_size / max(h, w))
            out = torch.nn.functional.interpolate(torch.zeros(1, 3, h, w), scale_factor=scale, mode="bilinear",
                                                  recompute_scale_factor=True, align_corners=False)
            assert resized_size((h, w), min_size, max_size) == tuple(out.shape[-2:]), (h, w, min_size, max_size)
            assert tuple(resize_image(torch.zeros(3, h, w), min_size, max_size).shape[-2:]) == tuple(out.shape[-2:])


def test_image_longer_than_max_size_to_1_keeps_a_1_px_side(tmp_path):
    # 2x300 px at shorter side 64, longer at most 96: scale 0.32 would make the short side 0 px
    assert resized_size((2, 300), 64, 96) == (1, 96) and resized_size((300, 2), 64, 96) == (96, 1)
    root = str(tmp_path / "strip")
    os.makedirs(os.path.join(root, "s"))
    Image.new("RGB", (300, 2), (255, 255, 255)).save(os.path.join(root, "s", "strip.png"))
    write_coco(root, "s", [image_entry(1, "strip.png", 300, 2)], [ann(1, 1, 5, [30, 0, 150, 2])],
               [{"id": 5, "name": "line"}])
    ds = CocoDataset(root, "s", train=True, max_size=96)
    image, target = ds[(0, 64, False)]
    assert target["size"] == (1, 96)
    assert torch.allclose(target["boxes"], torch.tensor([[9.6, 0.0, 57.6, 1.0]]))  # x by 0.32, y by 1 / 2
    seen, boxes = network_input(ds, (0, 64, False))
    assert seen.shape == (3, 1, 96) and torch.allclose(seen, normalize(torch.ones(3, 1, 96)))


def test_resize_in_worker_or_on_device_gives_the_same_batches(tiny):
    ds = CocoDataset(tiny, "val", train=True)
    sampler = TrainSampler(ds, batch_size=2, min_sizes=(64, 96, 33), max_iter=6, seed=1)
    assert any(k[2] for keys in sampler for k in keys) and any(not k[2] for keys in sampler for k in keys)
    for keys in sampler:
        ds.resize_in_worker = False
        on_device = to_device(collate([ds[k] for k in keys]), "cpu")
        ds.resize_in_worker = True
        samples = [ds[k] for k in keys]
        assert all(image.dtype == torch.float32 and tuple(image.shape[-2:]) == t["size"] for image, t in samples)
        in_worker = to_device(collate(samples), "cpu")
        assert on_device[0].shape == in_worker[0].shape
        assert torch.allclose(on_device[0], in_worker[0], atol=1e-5)  # the very same code, up to rounding
        assert all(torch.equal(a, b) for a, b in zip(on_device[1], in_worker[1]))


def test_padded_shape_is_the_shape_of_the_padded_batch(tiny):
    """CocoDataset.padded_shape, from the annotated sizes alone, is the (H, W) that collate and
    to_device pad a batch to (train.py pads each DDP process's share to its whole batch's)."""
    ds = CocoDataset(tiny, "val", train=False, max_size=100)
    for in_worker in (False, True):
        ds.resize_in_worker = in_worker
        for keys in ([(0, 40, False)], [(0, 40, False), (4, 70, True)], [(1, 33, False), (2, 50, False), (3, 90, True)]):
            images = to_device(collate([ds[k] for k in keys]), "cpu")[0]
            assert tuple(images.shape[-2:]) == ds.padded_shape(keys), (in_worker, keys)


def test_resize_in_worker_does_not_depend_on_the_thread_count(tmp_path):
    """Bilinear resizing on a CPU rounds differently with the number of threads: --workers 0 (the
    main process's threads) and DataLoader workers (1 thread each) must still give the same batches,
    or a run resumed with another --workers would not continue the same run."""
    root = str(tmp_path / "noise")
    os.makedirs(os.path.join(root, "s"))
    pixels = np.random.default_rng(0).integers(0, 256, (317, 411, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "s", "noise.png"))
    write_coco(root, "s", [image_entry(1, "noise.png", 411, 317)], [ann(1, 1, 5, [30, 20, 150, 100])],
               [{"id": 5, "name": "box"}])
    ds = CocoDataset(root, "s", train=True, max_size=200)
    ds.resize_in_worker = True
    threads = torch.get_num_threads()
    try:
        images = []
        for n in (1, 3):
            torch.set_num_threads(n)
            images.append(ds[(0, 150, False)][0])
            assert torch.get_num_threads() == n  # left as it was
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(images[0], images[1])


@pytest.mark.parametrize("max_size", [80, 200])
def test_every_training_batch_fits_a_fixed_canvas(tiny, max_size):
    """train.py --fixed-shapes: landscape, portrait and square images at three scales (one above
    max_size) all land in one of at most 2 canvases per scale, padded with zeros, pixels kept."""
    ds = CocoDataset(tiny, "val", train=True, max_size=max_size)
    min_sizes = (64, 96, 33)
    canvases = canvas_shapes(min_sizes, max_size)
    assert len(canvases) <= 2 * len(min_sizes) and all(h % 32 == 0 and w % 32 == 0 for h, w in canvases)
    assert [h * w for h, w in canvases] == sorted(h * w for h, w in canvases)
    seen = set()
    for keys in TrainSampler(ds, batch_size=2, min_sizes=min_sizes, max_iter=40, seed=3):
        images = to_device(collate([ds[k] for k in keys]), "cpu")[0]  # [B, 3, H, W]
        padded = pad_to_canvas(images, canvases)  # [B, 3, H', W']
        assert tuple(padded.shape[-2:]) in canvases, (images.shape, canvases)
        H, W = images.shape[-2:]
        assert torch.equal(padded[..., :H, :W], images)
        assert not padded[..., H:, :].any() and not padded[..., :, W:].any()
        seen.add(tuple(padded.shape[-2:]))
    assert len(seen) >= 2  # both orientations were drawn (and with max_size 200, several scales)
    assert pad_to_canvas(torch.zeros(1, 3, 1000, 1000), canvases).shape == (1, 3, 1000, 1000)  # none fits: unchanged
    assert canvas_shapes((800,), 1333) == [(800, 1344), (1344, 800)]
    assert canvas_shapes((800, 640), 600) == [(608, 608)]  # scales above max_size: images of at most 600 a side


def test_dataloader_end_to_end(tiny):
    ds = CocoDataset(tiny, "val", train=True)
    sampler = TrainSampler(ds, batch_size=2, min_sizes=(64, 96), max_iter=3)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=1)
    seen = 0
    for batch in loader:
        assert batch[0].dtype == torch.uint8
        images, gt_boxes, gt_labels = to_device(batch, "cpu")
        assert images.shape[0] == 2 and images.shape[-1] % 32 == 0 and images.shape[-2] % 32 == 0
        for t, boxes, labels in zip(batch[1], gt_boxes, gt_labels):
            assert min(t["size"]) in (64, 96) and boxes.shape[0] == labels.shape[0] >= 1
        seen += 1
    assert seen == 3


# ----------------------------------------------------------------------------- sampling

class Fake:
    def __init__(self, n_landscape, n_portrait):
        ratios = [1.0 + 0.1 * (i % 3) for i in range(n_landscape)] + [0.75] * n_portrait
        order = np.random.default_rng(0).permutation(len(ratios))  # orientations interleaved
        self.aspect_ratios = [ratios[i] for i in order]

    def __len__(self):
        return len(self.aspect_ratios)


def per_rank(ds, world_size, **kw):
    """[iteration][rank] -> keys."""
    samplers = [list(TrainSampler(ds, rank=r, world_size=world_size, **kw)) for r in range(world_size)]
    return list(zip(*samplers))


def test_sampler_covers_every_image_once_per_epoch_across_two_ranks():
    ds = Fake(8, 4)  # group sizes divisible by the batch: exactly once
    sampler = TrainSampler(ds, batch_size=4, world_size=2)
    assert sampler.epoch_length == 3
    for epoch in range(2):
        its = per_rank(ds, 2, batch_size=4, start_iter=3 * epoch, max_iter=3 * epoch + 3)
        indices = [k[0] for it in its for rank_keys in it for k in rank_keys]
        assert sorted(indices) == list(range(12))
        assert all(len(rank_keys) == 2 for it in its for rank_keys in it)


def test_sampler_leftovers_are_padded_and_every_image_still_seen():
    ds = Fake(7, 5)
    sampler = TrainSampler(ds, batch_size=4, world_size=2, max_iter=40)
    assert sampler.epoch_length == 2 + 2
    its = per_rank(ds, 2, batch_size=4, max_iter=40)
    for epoch in range(10):
        keys = [k for it in its[4 * epoch: 4 * epoch + 4] for rank_keys in it for k in rank_keys]
        counts = Counter(k[0] for k in keys)
        assert set(counts) == set(range(12)) and len(keys) == 16
    # aspect grouping: one orientation per global batch
    for it in its:
        orientations = {ds.aspect_ratios[k[0]] >= 1 for rank_keys in it for k in rank_keys}
        assert len(orientations) == 1


def test_sampler_tiny_group_smaller_than_batch():
    ds = Fake(9, 1)  # a lone portrait image fills a whole batch by wrapping around
    assert TrainSampler(ds, batch_size=4).epoch_length == 3 + 1
    batches = [[k[0] for k in keys] for keys in TrainSampler(ds, batch_size=4, max_iter=4)]
    portrait = [i for i, r in enumerate(ds.aspect_ratios) if r < 1]
    assert sum(b == portrait * 4 for b in batches) == 1
    assert Counter(i for b in batches for i in b).keys() == set(range(10))


def test_two_ranks_see_the_same_global_batches_as_one():
    ds = Fake(13, 6)
    kw = dict(batch_size=4, min_sizes=(32, 48, 64), seed=3, max_iter=25)
    one = list(TrainSampler(ds, **kw))
    two = per_rank(ds, 2, **kw)
    four = per_rank(ds, 4, **kw)
    assert [r0 + r1 for r0, r1 in two] == one
    assert [sum(ranks, []) for ranks in four] == one


def test_sampler_restarts_mid_epoch_identically():
    ds = Fake(11, 6)
    kw = dict(batch_size=2, min_sizes=(32, 48), seed=5, max_iter=30)
    full = per_rank(ds, 2, **kw)
    epoch_length = TrainSampler(ds, batch_size=2).epoch_length
    assert epoch_length == 6 + 3
    for k in (1, epoch_length // 2, epoch_length + 3, 29):
        resumed = per_rank(ds, 2, start_iter=k, **kw)
        assert resumed == full[k:]
        assert len(TrainSampler(ds, start_iter=k, **kw)) == 30 - k


def test_sampler_is_a_function_of_seed_and_draws_sizes_and_flips():
    ds = Fake(40, 24)
    kw = dict(batch_size=8, min_sizes=(640, 800), max_iter=16)
    a, b = list(TrainSampler(ds, seed=1, **kw)), list(TrainSampler(ds, seed=1, **kw))
    c = list(TrainSampler(ds, seed=2, **kw))
    assert a == b and a != c
    epoch_length = TrainSampler(ds, **kw).epoch_length
    assert [k[0] for k in a[0]] != [k[0] for k in a[epoch_length]]  # reshuffled each epoch
    keys = [k for batch in a for k in batch]
    assert {k[1] for k in keys} == {640, 800}
    assert 0.3 < sum(k[2] for k in keys) / len(keys) < 0.7
    no_flip = [k for batch in TrainSampler(ds, seed=1, flip=False, **kw) for k in batch]
    assert not any(k[2] for k in no_flip)
    assert [k[:2] for k in no_flip] == [k[:2] for k in keys]  # flip=False changes nothing else


def test_sampler_rejects_batch_not_divisible_by_world_size():
    with pytest.raises(ValueError, match="world_size 4"):
        TrainSampler(Fake(4, 4), batch_size=6, world_size=4)


# ----------------------------------------------------------------------------- bad input

def test_missing_root(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError) as e:
        resolve_root(missing)
    assert missing in one_line(e)
    with pytest.raises(DataError) as e:
        CocoDataset(missing, "val", train=True)
    assert missing in one_line(e)
    assert resolve_root(str(tmp_path)) == str(tmp_path)


def test_a_folder_named_shapes_is_not_taken_for_the_synthetic_dataset(tmp_path, monkeypatch):
    """`--data shapes` where ./shapes holds a dataset of one's own: refused in one line pointing to
    ./shapes, before anything is built; ./shapes itself is that folder."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("shapes/annotations")
    with pytest.raises(DataError) as e:
        resolve_root("shapes")
    assert "give --data ./shapes" in one_line(e) and not os.path.exists("datasets")
    assert resolve_root("./shapes") == "./shapes"


def test_a_coco_test_split_is_a_list_of_images_to_detect_on(tiny):
    """split_files: instances_<split>.json first, else COCO's image list image_info_<split>.json; a
    split test-dev<year> without a folder of its own reads test<year>/, as COCO distributes it. A
    file without an 'annotations' list is a dataset of images without objects for evaluation
    (`annotated` False) and refused for training in one line, naming it."""
    import shutil
    with open(os.path.join(tiny, "annotations", "instances_val.json")) as f:
        coco = json.load(f)
    image_list = os.path.join(tiny, "annotations", "image_info_test-dev2017.json")
    with open(image_list, "w") as f:
        json.dump({"images": coco["images"][1:], "categories": coco["categories"]}, f)  # a part, as test-dev
    shutil.copytree(os.path.join(tiny, "val"), os.path.join(tiny, "test2017"))
    assert data.split_files(tiny, "test-dev2017") == (image_list, os.path.join(tiny, "test2017"))
    assert data.split_files(tiny, "val") == (os.path.join(tiny, "annotations", "instances_val.json"),
                                             os.path.join(tiny, "val"))
    ds = CocoDataset(tiny, "test-dev2017", train=False)
    annotated = CocoDataset(tiny, "val", train=False)
    assert not ds.annotated and annotated.annotated
    assert ds.ann_file == image_list and ds.image_ids == [2, 3, 4, 5] and ds.categories == annotated.categories
    for i in range(len(ds)):
        image, target = ds[i]
        assert torch.equal(image, annotated[i + 1][0]) and target["boxes"].shape == (0, 4)
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "test-dev2017", train=True)
    assert one_line(e).startswith(f"{image_list} has no 'annotations' list") and "nothing to train on" in one_line(e)
    os.rename(os.path.join(tiny, "test2017"), os.path.join(tiny, "test-dev2017"))  # a folder of its own comes first
    assert data.split_files(tiny, "test-dev2017")[1] == os.path.join(tiny, "test-dev2017")
    write_coco(tiny, "test-dev2017", coco["images"], coco["annotations"], coco["categories"])  # and instances
    assert data.split_files(tiny, "test-dev2017")[0] == os.path.join(tiny, "annotations", "instances_test-dev2017.json")
    assert CocoDataset(tiny, "test-dev2017", train=False).annotated


def test_missing_annotation_file(tiny):
    """Named, with the splits the folder has (the name of one given wrong, as train2017 by default
    for a dataset whose file is instances_train.json)."""
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "train", train=True)
    listed = sorted(f[len("instances_"):-len(".json")] for f in os.listdir(os.path.join(tiny, "annotations")))
    assert one_line(e) == (f"annotation file not found: {os.path.join(tiny, 'annotations', 'instances_train.json')} "
                           f"(the splits there: {', '.join(listed)})")
    os.rename(os.path.join(tiny, "annotations"), os.path.join(tiny, "elsewhere"))
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "train", train=True)
    assert one_line(e) == f"annotation file not found: {os.path.join(tiny, 'annotations', 'instances_train.json')}"


@pytest.mark.parametrize("content, culprit", [
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": []}', "'categories'"),
    ('[1, 2]', "expected a JSON object"),
    ('{"images": ' + "[" * 100000 + "]" * 100000 + "}", "not valid JSON"),  # too deep for json.load
])
def test_malformed_annotation_file(tiny, content, culprit):
    path = os.path.join(tiny, "annotations", "instances_val.json")
    with open(path, "w") as f:
        f.write(content)
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=True)
    assert path in one_line(e) and culprit in one_line(e)


@pytest.mark.parametrize("break_it, culprit", [
    (lambda d: d["images"][1].pop("file_name"), "images at list positions 1 (no 'file_name') need"),
    (lambda d: d["images"][0].update(width=0), "images at list positions 0 (a.jpg: no positive whole 'width' below 2^31 (0)) need"),
    (lambda d: d["images"][2].update(height=96.6), "positions 2 (c.png: no positive whole 'height' below 2^31 (96.6))"),
    (lambda d: d["images"][1].update(width=1e20), "positions 1 (b.png: no positive whole 'width' below 2^31 (1e+20))"),
    (lambda d: d["images"].append(dict(d["images"][2])), "image ids 3 appear more than once"),
    (lambda d: d["images"].append({**d["images"][2], "id": 77}), "file names c.png are listed under more than one "
                                                               "image id"),
    (lambda d: [d["images"][4].update(id=2**64), d["images"][3].update(id=-2**63)],
     f"image ids {2**64} do not fit in 64 bits"),
    (lambda d: [d["categories"][1].update(id=2**63 + 1), d["categories"][0].update(id=-1)],
     f"category ids {2**63 + 1} do not fit in 64 bits"),  # pycocotools would merge them as float64
    (lambda d: d["categories"][2].update(name="c\ud80010"), "category ids 10 have a 'name' that is not valid Unicode"),
    (lambda d: d["images"][1].update(file_name="\udfffb.png"), "positions 1 (a 'file_name' that is no file name"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, 3]), "annotation ids 13 need a 'bbox'"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, "3", None]), "annotation ids 12 need a 'bbox'"),
    (lambda d: d["annotations"][3].pop("id"), "annotations at list positions 3 need"),
    (lambda d: d["annotations"][4].update(image_id=99), "annotation ids 21 refer to an image_id"),
    (lambda d: d["annotations"][4].update(image_id="1"), "annotation ids 21 (image_id '1') need an integer 'image_id'"),
    (lambda d: d["categories"][0].pop("name"), "categories at list positions 0 need"),
    (lambda d: d["annotations"].append(dict(d["annotations"][0])), "annotation ids 11 appear more"),
    (lambda d: d["annotations"][0].update(bbox=[24, 6, -20, 10]), "annotation ids 11 have a 'bbox' [x, y, w, h] "
                                                                  "with a negative width or height"),
    (lambda d: d["annotations"][4].update(bbox=[0, 30, 10, -0.5]), "annotation ids 21 have a 'bbox'"),
    (lambda d: [d["annotations"][k].update(area=v) for k, v in ((1, "big"), (3, None), (5, -1))],
     "annotation ids 12, 14, 41 have an 'area' that is not a number >= 0"),
    (lambda d: d["annotations"][2].update(bbox=[1, 2, 10**400, 3]), "annotation ids 13 need a 'bbox'"),  # past float
    (lambda d: [d["annotations"][0].update(id=2**64), d["annotations"][1].update(id=-2**63)],
     f"annotation ids {2**64} do not fit in 64 bits"),
    (lambda d: [d["annotations"][2].update(bbox=[1, 2, 2**600, 2**600]), d["annotations"][2].pop("area", None)],
     "annotation ids 13 have a 'bbox' whose width x height is not a finite number"),  # each side within float
])
def test_incomplete_entries_are_named(tiny, break_it, culprit):
    path = os.path.join(tiny, "annotations", "instances_val.json")
    with open(path) as f:
        d = json.load(f)
    break_it(d)
    with open(path, "w") as f:
        json.dump(d, f)
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=False)
    assert path in one_line(e) and culprit in one_line(e)


def _record_task(task):
    """A task of in_processes' processes that leaves a file named by its process and takes a while;
    task -1 kills its own process, as the out-of-memory killer would."""
    if task == -1:
        os.kill(os.getpid(), signal.SIGKILL)
    open(os.path.join(data.FORKED["folder"], f"{task}_{os.getpid()}"), "w").close()
    time.sleep(data.FORKED["seconds"])
    return task


def _pids(folder):
    return {int(name.split("_")[1]) for name in os.listdir(folder)}


def _gone(pid):
    """Whether process pid has ended (a zombie not yet reaped by its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_processes_end_with_a_stop_a_killed_process_or_the_main_process(tmp_path, capsys):
    """The processes of the image check and of COCOeval (data.in_processes): a Ctrl-C in the main
    process raises there and ends them at once, the tasks not started never run; one of them
    killed (the out-of-memory killer) ends the others and is said in one line; and they end with
    the main process when it is killed (kill -9), instead of running on."""
    import multiprocessing
    before = set(multiprocessing.active_children())
    # a stop: 200 tasks of 0.2 s in 2 processes would take 20 s
    (tmp_path / "stop").mkdir()
    threading.Timer(0.6, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        data.in_processes(_record_task, list(range(200)), 2, {"folder": str(tmp_path / "stop"), "seconds": 0.2})
    assert 0 < len(os.listdir(tmp_path / "stop")) < 50
    assert not set(multiprocessing.active_children()) - before and not data.FORKED
    # a process killed while the other works on a long task
    (tmp_path / "killed").mkdir()
    with pytest.raises(RuntimeError) as e:  # BrokenProcessPool
        data.in_processes(_record_task, [0, -1, 1, 2], 2, {"folder": str(tmp_path / "killed"), "seconds": 60})
    assert not set(multiprocessing.active_children()) - before
    assert all(_gone(pid) for pid in _pids(tmp_path / "killed"))
    with pytest.raises(SystemExit) as exit_info:
        data.stop_on_failure(e.value)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and "(killed, out of memory?)" in err, err
    # the main process killed: a process forked from this one runs the pool, and is killed
    folder = tmp_path / "main_killed"
    folder.mkdir()
    main = multiprocessing.get_context("fork").Process(
        target=data.in_processes, args=(_record_task, [0, 1, 2], 2, {"folder": str(folder), "seconds": 60}))
    main.start()
    deadline = time.time() + 60
    while len(os.listdir(folder)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    workers = _pids(folder)
    assert len(workers) == 2
    os.kill(main.pid, signal.SIGKILL)
    main.join()
    while not all(_gone(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in workers)


def test_whole_number_float_ids_are_read_as_ints(tiny):
    """Ids written as 3.0 (some converters, pandas) are the ids 3: the annotations find their
    images and categories, and what comes back is an int."""
    path = os.path.join(tiny, "annotations", "instances_val.json")
    ints = CocoDataset(tiny, "val", train=False)
    with open(path) as f:
        d = json.load(f)
    for group, keys in (("categories", ["id"]), ("images", ["id"]), ("annotations", ["id", "image_id", "category_id"])):
        for entry in d[group]:
            entry.update({k: float(entry[k]) for k in keys})
    write_coco(tiny, "val", d["images"], d["annotations"], d["categories"])
    floats = CocoDataset(tiny, "val", train=False)
    assert floats.categories == ints.categories
    for i in range(len(ints)):
        (_, a), (_, b) = floats[i], ints[i]
        assert type(a["image_id"]) is int and a["image_id"] == b["image_id"]
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    d["annotations"][0]["category_id"] = 10.5  # not whole: still refused, naming it
    write_coco(tiny, "val", d["images"], d["annotations"], d["categories"])
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=False)
    assert "annotation ids 11 (category_id 10.5) have a category_id not in 'categories'" in one_line(e)


def test_file_names_that_are_not_utf8_on_disk(tmp_path):
    """A Latin-1 file name, as json.dump(os.listdir()) writes it (a lone surrogate): found and read."""
    root = str(tmp_path / "latin1")
    name = os.fsdecode(b"caf\xe9.png")  # 'caf\udce9.png'
    os.makedirs(os.path.join(root, "s"))
    Image.new("RGB", (20, 10), (255, 0, 0)).save(os.path.join(root, "s", name))
    write_coco(root, "s", [image_entry(7, name, 20, 10)], [ann(1, 7, 5, [2, 2, 6, 4])], [{"id": 5, "name": "box"}])
    ds = CocoDataset(root, "s", train=True)
    ds.check_images(show_progress=False)
    assert ds.file_name(0) == name
    image, target = ds[0]
    assert image.shape == (3, 10, 20) and image[0].min() == 255 and target["image_id"] == 7


def test_file_names_in_the_other_unicode_form_on_disk(tmp_path):
    """The annotations say "café.png" (NFC, one code point for é), the disk holds the NFD spelling
    (e + a combining accent), as a copy made on macOS does, or the other way round: found and read."""
    import unicodedata
    root = str(tmp_path / "nfd")
    os.makedirs(os.path.join(root, "s"))
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    assert nfc != nfd
    Image.new("RGB", (20, 10), (255, 0, 0)).save(os.path.join(root, "s", nfd))
    Image.new("RGB", (20, 10), (0, 0, 255)).save(os.path.join(root, "s", "x" + nfc))
    write_coco(root, "s", [image_entry(7, nfc, 20, 10), image_entry(8, "x" + nfd, 20, 10)],
               [ann(1, 7, 5, [2, 2, 6, 4])], [{"id": 5, "name": "box"}])
    ds = CocoDataset(root, "s", train=False)
    ds.check_images(show_progress=False)
    assert [ds.file_name(i) for i in range(2)] == [nfd, "x" + nfc]  # as on disk
    assert ds[0][0][0].min() == 255 and ds[1][0][2].min() == 255


def test_one_file_under_two_spellings_is_refused(tmp_path):
    """Two image entries whose names are spelled apart but name one file ("./a.png", "s/../a.png",
    "../<split>/a.png", or "café" in both Unicode forms with one of them on disk): one image listed twice, as with two
    entries of the same name, each entry's objects the other's background. Refused, naming them."""
    import unicodedata
    root = str(tmp_path / "alias")
    os.makedirs(os.path.join(root, "s", "sub"))
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    for name in ("a.png", nfd, "b.png"):
        Image.new("RGB", (20, 10)).save(os.path.join(root, "s", name))
    for names, culprit in ((["a.png", "./a.png"], "file names a.png and ./a.png name the same file"),
                           (["sub/../a.png", "b.png", "a.png"], "file names sub/../a.png and a.png name the same file"),
                           (["a.png", "../s/a.png"], "file names a.png and ../s/a.png name the same file"),
                           ([nfc, "b.png", nfd], f"file names {nfc} and {nfd} (one name in two Unicode forms) name")):
        write_coco(root, "s", [image_entry(i + 1, n, 20, 10) for i, n in enumerate(names)],
                   [ann(1, 1, 5, [2, 2, 6, 4])], [{"id": 5, "name": "box"}])
        with pytest.raises(DataError) as e:
            CocoDataset(root, "s", train=False)
        assert culprit in one_line(e) and "more than one image id" in one_line(e)
    write_coco(root, "s", [image_entry(1, "./a.png", 20, 10), image_entry(2, "sub/../b.png", 20, 10)],
               [ann(1, 1, 5, [2, 2, 6, 4])], [{"id": 5, "name": "box"}])
    assert len(CocoDataset(root, "s", train=False)) == 2  # other files, however spelled


def test_unknown_category_names_the_annotation(tiny):
    path = os.path.join(tiny, "annotations", "instances_val.json")
    with open(path) as f:
        d = json.load(f)
    d["annotations"][4]["category_id"] = 7  # annotation 21
    with open(path, "w") as f:
        json.dump(d, f)
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=True)
    message = one_line(e)
    assert "annotation ids 21 (category_id 7) have a category_id not in 'categories' (3, 10, 42)" in message
    assert path in message


def test_missing_images_are_counted_and_the_first_named(tiny):
    path = os.path.join(tiny, "annotations", "instances_val.json")
    with open(path) as f:
        d = json.load(f)
    d["images"] += [image_entry(100 + k, f"gone{k:02d}.jpg", 10, 10) for k in range(12)]
    with open(path, "w") as f:
        json.dump(d, f)
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=True)
    message = one_line(e)
    assert "12 image(s)" in message and path in message and message.endswith(", ... and 2 more")
    assert all(f"gone{k:02d}.jpg" in message for k in range(10))  # a line, not one name per image of the dataset
    os.rename(os.path.join(tiny, "val"), os.path.join(tiny, "elsewhere"))
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=True)
    assert os.path.join(tiny, "val") in one_line(e)


def test_missing_image_names_that_would_read_as_others_are_quoted(tiny):
    """A listed name with a space at its end (the file on disk has none) or a comma in it is
    quoted in the list of missing files, where it would read as another file or as two."""
    path = os.path.join(tiny, "annotations", "instances_val.json")
    with open(path) as f:
        d = json.load(f)
    d["images"] += [image_entry(100, "a.jpg ", 10, 10), image_entry(101, "x.jpg, b.jpg", 10, 10),
                    image_entry(102, "plain.jpg", 10, 10)]
    with open(path, "w") as f:
        json.dump(d, f)
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=True)
    assert one_line(e).endswith(": 'a.jpg ', 'x.jpg, b.jpg', plain.jpg")


def test_corrupt_image_names_the_file_also_from_a_worker(tiny):
    good = open(os.path.join(tiny, "val", "a.jpg"), "rb").read()
    with open(os.path.join(tiny, "val", "a.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])  # truncated JPEG
    with open(os.path.join(tiny, "val", "b.png"), "wb") as f:
        f.write(b"not a png at all")
    ds = CocoDataset(tiny, "val", train=True)  # exists: fine up front
    for i, name in ((0, "a.jpg"), (1, "b.png")):
        with pytest.raises(DataError) as e:
            ds[i]
        assert os.path.join(tiny, "val", name) in one_line(e)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate)
    batches = iter(loader)
    with pytest.raises(DataError) as e:
        next(batches)
    assert one_line(e).startswith("cannot read image ") and "a.jpg" in one_line(e)
    batches._shutdown_workers()  # now, rather than whenever the garbage collector gets to it


class FailingDataset(torch.utils.data.Dataset):
    """One image whose decode fails, in a file whose name holds a line break."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        try:
            raise OSError("broken data stream when reading image file")
        except OSError as e:
            raise ImageError(f"cannot read image /data/scan\n2.png: {e}") from e


def test_a_workers_error_comes_back_as_its_message_on_one_line():
    """An error raised in a DataLoader worker reaches the main process as the worker's message
    alone, without torch's traceback around it and whole, also where it spans lines (a file name
    with a line break, written \\n); loader_batches stops the workers with it."""
    import gc
    import multiprocessing
    before = set(multiprocessing.active_children())
    expected = "cannot read image /data/scan\\n2.png: broken data stream when reading image file"
    assert str(ImageError("cannot read image /data/scan\n2.png: broken data stream when reading image file")) == expected
    assert str(DataError("missing: a\rb\x00c.png\t")) == "missing: a\\rb\\x00c.png\\t"  # any control character
    loader = torch.utils.data.DataLoader(FailingDataset(), batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(ImageError) as e:
        next(loader_batches(loader))
    assert str(e.value) == expected
    del e
    left = set(multiprocessing.active_children()) - before
    gc.collect()  # frees a loader kept by a reference cycle, so that a failure does not hang pytest's exit
    assert not left


class SelfKillingDataset(torch.utils.data.Dataset):
    """A worker killed from outside, as by the kernel's out-of-memory killer."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_is_one_line(capsys):
    """torch raises "DataLoader worker (pid N) is killed by signal: Killed." wherever the main
    process is, or "... exited unexpectedly" where the loader finds it first: stop_on_failure makes
    it one line with a hint, status 1."""
    loader = torch.utils.data.DataLoader(SelfKillingDataset(), batch_size=1, num_workers=1, collate_fn=collate)
    with pytest.raises(RuntimeError) as e:
        next(iter(loader))
    with pytest.raises(SystemExit) as stop:
        data.stop_on_failure(e.value)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert re.fullmatch(r"error: DataLoader worker \(pid \d+\) is killed by signal: Killed \(out of memory\? fewer "
                        r"--workers use less\)\n|error: DataLoader worker \(pid\(s\) \d+\) exited unexpectedly "
                        r"\(killed, out of memory\? --workers 0 shows an error of its own\)\n", err), err


class BatchHalfTakenDataset(torch.utils.data.Dataset):
    """In a DataLoader worker, what a main process stopped while it takes a batch leaves: the
    worker's resource sharer (which hands the main process the shared memory of each batch) is
    connected to, and the other end is gone before the handshake."""

    def __len__(self):
        return 1

    def __getitem__(self, index):
        import socket
        from multiprocessing import resource_sharer
        resource_sharer.DupFd(os.open(os.devnull, os.O_RDONLY))  # starts the sharer's thread, as a batch does
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(resource_sharer._resource_sharer._address)
        time.sleep(0.5)  # the thread meets the closed connection
        return torch.zeros(1)


def test_a_main_process_gone_mid_batch_leaves_no_worker_traceback(capfd):
    """A Ctrl-C or SIGTERM while the main process takes a batch from a worker: without
    data.init_worker the worker prints a traceback (BrokenPipeError) under the stop's one line."""
    for init, traceback in ((None, True), (data.init_worker, False)):
        loader = torch.utils.data.DataLoader(BatchHalfTakenDataset(), batch_size=1, num_workers=1, worker_init_fn=init)
        next(iter(loader))
        del loader
        err = capfd.readouterr().err
        assert ("Traceback" in err) == traceback, err


def test_a_stop_signal_during_the_programs_exit_is_ignored():
    """After main(), train.py and evaluate.py exit with their status though a SIGTERM comes while
    Python finalizes (its last garbage collection takes about a second after a run): a handler of
    ours would be put back to the default action there, a death by the signal. Here the signal
    comes from an object's __del__, run by that last collection."""
    code = ("import os, signal, time, data\n"
            "data.signals_while_exiting()\n"
            "class Late:\n"
            "    def __del__(self):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.2)\n"
            "late = Late(); late.cycle = late; del late\n"
            "raise SystemExit(143)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    assert done.returncode == 143 and done.stderr == ""


def test_a_second_stop_signal_is_ignored_and_a_third_ends_at_once(monkeypatch):
    """catch_stop_signals: the first Ctrl-C or SIGTERM raises; a second one, which would cut the
    stop short with a traceback, is ignored; a third ends the process at once (the first may have
    been lost inside a __del__); restore() starts the count again, and so does each call."""
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(os, "write", lambda fd, text: None)
    for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, data.Terminated)):
        restore = data.catch_stop_signals()
        try:
            with pytest.raises(raised):
                os.kill(os.getpid(), signum)
                time.sleep(1)  # the handler runs at the next bytecode
            os.kill(os.getpid(), signum)  # ignored
            time.sleep(0.1)
            assert exits == []
            os.kill(os.getpid(), signum)
            time.sleep(0.1)
            assert exits == [128 + signum]
            exits.clear()
        finally:
            restore()
    def send(signum, times=1):  # the handler runs at the next bytecode
        for _ in range(times):
            os.kill(os.getpid(), signum)
            time.sleep(0.1)

    @contextlib.contextmanager
    def stop_signals_caught():  # a fresh count, and no exit seen yet
        exits.clear()
        restore = data.catch_stop_signals()
        try:
            yield
        finally:
            restore()

    with stop_signals_caught():
        with pytest.raises(data.DeferredInterrupt):
            with data.signals_deferred():  # as a checkpoint's write
                send(signal.SIGINT)
        send(signal.SIGINT)  # ignored: the deferred one counted as the first
    assert exits == []
    with stop_signals_caught():
        with pytest.raises(data.DeferredInterrupt):
            with data.signals_deferred():  # a write that hangs: the third signal ends the process
                send(signal.SIGTERM, 3)
                assert exits == [128 + signal.SIGTERM]
    with stop_signals_caught():
        with pytest.raises(data.DeferredInterrupt):
            with data.signals_deferred():  # as train.py's serialising of a checkpoint
                send(signal.SIGINT)
                with data.signals_deferred():  # and its write, inside: the third in all ends the process
                    send(signal.SIGINT, 2)
                    assert exits == [128 + signal.SIGINT]
        assert data._held_back == 0
    with stop_signals_caught():
        with pytest.raises(data.DeferredInterrupt):
            with data.signals_deferred():  # two held back in one block: both count
                send(signal.SIGINT, 2)
        assert exits == []
        send(signal.SIGINT)  # the third
        assert exits == [128 + signal.SIGINT]


def test_a_third_stop_signal_ends_the_process_during_a_long_write(tmp_path, monkeypatch):
    """A checkpoint's write or fsync that takes seconds (a slow disk) is one system call, which no
    signal interrupts and in which Python runs no handler: three Ctrl-C sent meanwhile would come
    out as one, after it. write_atomic writes from another thread, so the third ends the process
    while the write still runs. (The write is modelled by an fsync that blocks the signals in its
    thread, as the kernel does while it writes a regular file, until the three were sent; each is
    sent once the one before was handled, or after 5 s.)"""
    exits, real_fsync, exits_when_fsync_ended = [], os.fsync, []
    writing, sent = threading.Event(), threading.Event()
    monkeypatch.setattr(os, "_exit", exits.append)
    monkeypatch.setattr(os, "write", lambda fd, text: None)

    def slow_fsync(fd):
        if exits_when_fsync_ended:  # the folder's, after the file's
            return real_fsync(fd)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # this thread only
        writing.set()
        try:
            sent.wait(20)
            exits_when_fsync_ended.append(len(exits))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        real_fsync(fd)

    def three_ctrl_c():
        writing.wait(20)
        held_back = data._held_back
        for n in range(1, 4):
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.time() + 5
            while data._held_back - held_back < n and not exits and time.time() < deadline:
                time.sleep(0.01)
        sent.set()

    monkeypatch.setattr(os, "fsync", slow_fsync)
    restore = data.catch_stop_signals()
    try:
        sender = threading.Thread(target=three_ctrl_c)
        sender.start()
        with pytest.raises(data.DeferredInterrupt):
            data.write_atomic(str(tmp_path / "last.pt"), b"checkpoint")
        sender.join()
    finally:
        restore()
    assert exits == [128 + signal.SIGINT] and exits_when_fsync_ended == [1]  # ended before the write did
    assert (tmp_path / "last.pt").read_bytes() == b"checkpoint"  # (os._exit is a stub here: the write went on)


def test_a_write_waits_for_its_thread_when_a_signal_handler_raises(tmp_path):
    """An exception raised by a signal handler while write_atomic waits for its writing thread
    (torch raises one when a DataLoader worker is killed) comes out once the file is written and
    closed, not while the thread still writes to it (which a join interrupted by it would allow)."""
    wrote = []

    def fn():
        time.sleep(0.5)
        wrote.append(True)

    def raising(signum, frame):
        raise RuntimeError("a handler's")

    previous = signal.signal(signal.SIGUSR1, raising)
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with pytest.raises(RuntimeError, match="a handler's"):
            data._in_a_thread(fn)
        assert wrote == [True]
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_output_encoding_never_fails():
    """train.py's and evaluate.py's stdout and stderr: a path's bytes that are not UTF-8 go out as
    they are, and a character the stream cannot encode as an escape."""
    path = os.fsdecode(b"/data/caf\xe9")  # as Python holds such a path: '/data/caf\udce9'
    for encoding, expected in (("utf-8", b"/data/caf\xe9 \xe6\x97\xa5\n"), ("latin-1", b"/data/caf\xe9 \\u65e5\n"),
                               ("ascii", b"/data/caf\xe9 \\u65e5\n")):
        out = io.BytesIO()
        stream = io.TextIOWrapper(out, encoding=encoding, errors="bytes_or_escape")
        print(path, "\u65e5", file=stream)
        stream.flush()
        assert out.getvalue() == expected, encoding


def test_image_size_disagreeing_with_annotations(tiny):
    Image.new("RGB", (65, 48)).save(os.path.join(tiny, "val", "a.jpg"))
    with pytest.raises(DataError) as e:
        CocoDataset(tiny, "val", train=True)[0]
    assert "a.jpg" in one_line(e) and "65x48" in one_line(e) and "64x48" in one_line(e)


# ----------------------------------------------------------------------------- shapes

def test_shapes_small_build_loads_through_the_coco_path(tmp_path, capsys):
    root = str(tmp_path / "shapes")
    assert prepare_shapes(root, num_train=30, num_val=4) == root
    out = capsys.readouterr().out  # one line, ended also by an error or Ctrl-C (end_progress_line)
    assert out.startswith("shapes: generating 30 + 4 images") and out.count("\n") == 1 and " ... done in " in out
    train = CocoDataset(root, "train2017", train=True)
    val = CocoDataset(root, "val2017", train=False)
    assert len(val) == 4 and len(train) >= 28
    names = [c["name"] for c in train.categories]
    ids = [c["id"] for c in train.categories]
    assert len(names) >= 4 and set(data.SHAPES_SQUARE + data.SHAPES_SLENDER) <= set(names)
    assert ids != list(range(1, len(ids) + 1))  # non-contiguous on purpose
    assert any(r >= 1 for r in train.aspect_ratios) and any(r < 1 for r in train.aspect_ratios)

    coco = train.coco
    per_image = Counter(a["image_id"] for a in coco.dataset["annotations"])
    assert max(per_image.values()) >= 20 and min(per_image.values()) <= 8  # crowded and sparse
    aspect = {n: [] for n in names}
    for a in coco.dataset["annotations"]:
        w, h = a["bbox"][2:]
        aspect[coco.cats[a["category_id"]]["name"]].append(max(w, h) / min(w, h))
    for n in data.SHAPES_SQUARE:
        assert max(aspect[n]) <= 1.25, n
    for n in data.SHAPES_SLENDER:
        assert np.median(aspect[n]) >= 4.5, n
    assert max(aspect["needle"]) >= 8
    image, target = train[0]
    assert image.shape[0] == 3 and target["boxes"].shape[0] >= 1


def test_a_shapes_build_stopped_by_kill_9_leaves_no_folder_behind(tmp_path):
    """The folder of a build whose process has ended (kill -9 runs no cleanup) goes at the next
    build; that of a live process (a concurrent build) stays."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    for name, pid in ((".shapes-tmp-dead", ended.pid), (".shapes-stale-dead", ended.pid), (".shapes-tmp-live", os.getpid())):
        os.makedirs(tmp_path / name / "train2017")
        (tmp_path / name / "owner").write_text(f"{os.uname().nodename} {pid}")
    prepare_shapes(str(tmp_path / "shapes"), num_train=3, num_val=1)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".shapes")) == [".shapes-tmp-live"]


def test_shapes_is_deterministic_atomic_and_built_once(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prepare_shapes(a, num_train=5, num_val=2)
    prepare_shapes(b, num_train=5, num_val=2)
    for rel in ("annotations/instances_train2017.json", "annotations/instances_val2017.json",
                "train2017/000000000003.jpg", "val2017/000001000002.jpg"):
        assert open(os.path.join(a, rel), "rb").read() == open(os.path.join(b, rel), "rb").read(), rel
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".shapes")]  # no temp dirs left
    capsys.readouterr()

    prepare_shapes(a, num_train=5, num_val=2)  # complete: nothing to do
    assert capsys.readouterr().out == ""
    assert sorted(os.listdir(a)) == ["COMPLETE", "annotations", "train2017", "val2017"]
    os.remove(os.path.join(a, "COMPLETE"))  # as if interrupted: rebuilt
    prepare_shapes(a, num_train=5, num_val=2)
    assert "generating" in capsys.readouterr().out and os.path.exists(os.path.join(a, "COMPLETE"))

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DataError) as e:
        prepare_shapes(str(foreign), num_train=1, num_val=1)
    assert "precious.txt" in one_line(e) and (foreign / "precious.txt").exists()


@pytest.mark.parametrize("name", [n for _, n in data.SHAPES_CATEGORIES])
def test_shapes_boxes_are_tight_around_painted_pixels(name):
    rng = np.random.default_rng(1)
    for _ in range(20):
        geometry, extent = data._shape_geometry(rng, name, crowded=False)
        img = Image.new("RGB", (300, 300))
        cx, cy = 150 + rng.uniform(), 150 + rng.uniform()
        box, area = data._paint_shape(img, geometry, extent, cx, cy, (255, 255, 255), (128, 128, 128))
        painted = np.asarray(img).max(axis=2) > 0  # [h, w]
        rows, cols = np.flatnonzero(painted.any(1)), np.flatnonzero(painted.any(0))
        assert box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        assert area == painted.sum()
        # and the raster is the geometry: within a pixel and a half of the exact extent
        exact = (cx + extent[0], cy + extent[1], cx + extent[2], cy + extent[3])
        assert np.allclose(box, exact, atol=1.5), (box, exact)


# ----------------------------------------------------------------------------- EXIF orientation

# the stored picture that EXIF orientation k turns into the upright one: the inverse of
# exif_transpose's transposition (all are their own inverse except the two quarter turns)
INVERSE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}
UPRIGHT_BOX = (8, 4, 40, 14)  # a white box in an 80x50 upright photo: asymmetric, so every transposition moves it


def phone_photos(tmp_path, orientations=range(1, 9), annotate="upright", ext="jpg"):
    """JPEGs (or files of another `ext`) stored turned by EXIF orientation k whose upright picture
    holds UPRIGHT_BOX, annotated as a labelling tool shows them ("upright") or as stored ("raw")."""
    root = str(tmp_path / f"phone_{annotate}_{ext}")
    os.makedirs(os.path.join(root, "s"), exist_ok=True)
    upright = np.zeros((50, 80, 3), dtype=np.uint8)
    x1, y1, x2, y2 = UPRIGHT_BOX
    upright[y1:y2, x1:x2] = 255
    upright = Image.fromarray(upright)
    images, annotations = [], []
    for k in orientations:
        stored = upright if INVERSE[k] is None else upright.transpose(INVERSE[k])
        exif = Image.Exif()
        exif[0x0112] = k
        stored.save(os.path.join(root, "s", f"o{k}.{ext}"), quality=95, exif=exif)
        box = UPRIGHT_BOX if annotate == "upright" else bright_box_of(np.asarray(stored))
        w, h = (80, 50) if annotate == "upright" else stored.size
        images.append(image_entry(k, f"o{k}.{ext}", w, h))
        annotations.append(ann(k, k, 5, [box[0], box[1], box[2] - box[0], box[3] - box[1]]))
    write_coco(root, "s", images, annotations, [{"id": 5, "name": "box"}])
    return root


def bright_box_of(pixels):
    rows, cols = np.flatnonzero(pixels.mean(2).max(1) > 127), np.flatnonzero(pixels.mean(2).max(0) > 127)
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


@pytest.mark.parametrize("ext", ["jpg", "tif"])  # PIL itself turns a TIFF upright, at open and load
def test_exif_orientations_1_to_8_read_upright_as_exif_transpose(tmp_path, capsys, ext):
    from PIL import ImageOps
    root = phone_photos(tmp_path, ext=ext)
    ds = CocoDataset(root, "s", train=True)
    ds.check_images(show_progress=False)  # every header fits its annotation once turned upright
    # a size cannot tell how a mirrored or upside-down image was annotated (EXIF 2-4): a note says
    # that turned images are there and what reads them as stored
    assert capsys.readouterr().out == ("note: 7 of 8 images are stored turned or mirrored (an EXIF orientation) and "
                                       "are read upright, as labelling tools show them; if their boxes were drawn on "
                                       "the stored pixels, use --raw-orientation\n")
    CocoDataset(phone_photos(tmp_path, [1], ext=ext), "s", train=True).check_images(show_progress=False)
    CocoDataset(phone_photos(tmp_path, [3, 6], annotate="raw", ext=ext), "s", train=True,
                exif=False).check_images(show_progress=False)
    assert capsys.readouterr().out == ""  # none turned, or read as stored
    for i in range(len(ds)):
        image, target = ds[i]
        with Image.open(ds.path(i)) as img:
            expected = np.array(ImageOps.exif_transpose(img).convert("RGB"))  # [h, w, 3]
        assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1)), ds.file_name(i)
        # the annotated box lands on the object (JPEG blurs edges by a pixel)
        assert np.allclose(bright_box(image.float() / 255), target["boxes"][0].tolist(), atol=1), ds.file_name(i)


@pytest.mark.parametrize("k", [3, 6, 8])
def test_exif_rotated_boxes_land_on_the_object_through_training_input(tmp_path, k):
    ds = CocoDataset(phone_photos(tmp_path, [k]), "s", train=True)
    for flip in (False, True):
        seen, boxes = network_input(ds, (0, 64, flip))  # resized, normalised: what the loss sees
        assert np.allclose(bright_box(seen), boxes[0].tolist(), atol=1.5)


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_raw_orientation_reads_as_stored(tmp_path, ext):
    root = phone_photos(tmp_path, annotate="raw", ext=ext)
    ds = CocoDataset(root, "s", train=True, exif=False)
    ds.check_images(show_progress=False)
    for i in range(len(ds)):
        image, target = ds[i]
        k = int(ds.file_name(i)[1])  # o{k}.ext: stored 50 wide and 80 high where k turns it by 90 degrees
        assert tuple(image.shape[-2:]) == ((80, 50) if k >= 5 else (50, 80)), ds.file_name(i)
        assert np.allclose(bright_box(image.float() / 255), target["boxes"][0].tolist(), atol=1)
    # the same raw annotations read upright: 5-8 no longer fit, and the message says what to do
    with pytest.raises(DataError) as e:
        CocoDataset(root, "s", train=True).check_images(show_progress=False)
    message = one_line(e)
    assert message.startswith("4 of 8 images cannot be used: ") and "--raw-orientation" in message
    assert all(f"o{k}.{ext}" in message for k in (5, 6, 7, 8))
    # and upright annotations read raw: the other way round
    with pytest.raises(DataError) as e:
        CocoDataset(phone_photos(tmp_path, ext=ext), "s", train=True, exif=False).check_images(show_progress=False)
    assert "4 of 8 images" in one_line(e) and "use --no-raw-orientation" in one_line(e)


def test_unchecked_image_of_another_size_is_named_at_decode_in_the_checks_words(tmp_path):
    """Unchecked (--skip-check), an image that is not of its annotated size stops at its first
    decode, named, with the header check's words: the EXIF hint only where EXIF explains it."""
    root = phone_photos(tmp_path, [6], annotate="raw")  # stored 50x80, read upright as 80x50
    ds = CocoDataset(root, "s", train=True)
    with pytest.raises(DataError) as e:
        ds[0]
    message = one_line(e)
    assert message.startswith(f"image {ds.path(0)} is 80x50 with EXIF orientation 6 applied, the annotations say 50x80")
    assert "use --raw-orientation" in message and message.endswith(f"({ds.ann_file})")
    Image.new("RGB", (51, 80)).save(ds.path(0))  # no EXIF at all, one column too many
    with pytest.raises(DataError) as e:
        ds[0]
    assert one_line(e) == f"image {ds.path(0)} is 51x80 but the annotations say 50x80 ({ds.ann_file})"


def move_chunks_after_pixels(path, kinds):
    """Rewrite the PNG file at `path` with its chunks of `kinds` (e.g. b"eXIf") moved after its
    pixels, just before IEND, which the PNG format allows; PIL writes them before the pixels."""
    with open(path, "rb") as f:
        raw = f.read()
    chunks, pos = [], 8
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        chunks.append((kind, raw[pos:pos + 12 + length]))
        pos += 12 + length
    late = [c for kind, c in chunks if kind not in (*kinds, b"IEND")] + [c for kind, c in chunks if kind in kinds]
    with open(path, "wb") as f:
        f.write(raw[:8] + b"".join(late) + chunks[-1][1])


def png_with_exif_after_pixels(path, picture, orientation):
    """Save `picture` as a PNG whose eXIf chunk (EXIF orientation tag) follows the pixels."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture.save(path, "PNG", exif=exif)
    move_chunks_after_pixels(path, (b"eXIf",))


def test_png_with_exif_after_its_pixels_is_checked_as_it_is_read(tmp_path):
    from PIL import ImageOps
    root = str(tmp_path / "late")
    os.makedirs(os.path.join(root, "s"))
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[2:6, 30:38] = 255
    path = os.path.join(root, "s", "late.png")
    png_with_exif_after_pixels(path, Image.fromarray(stored), 6)
    with Image.open(path) as img:
        assert "exif" not in img.info  # not in the header: PIL finds it only by decoding
        upright = np.array(ImageOps.exif_transpose(img).convert("RGB"))  # [40, 20, 3]
    assert upright.shape == (40, 20, 3)
    write_coco(root, "s", [image_entry(1, "late.png", 20, 40)], [ann(1, 1, 5, [14, 30, 4, 8])],
               [{"id": 5, "name": "box"}])
    ds = CocoDataset(root, "s", train=True)
    ds.check_images(show_progress=False)  # annotated upright, as exif_transpose shows it
    image, target = ds[0]
    assert torch.equal(image, torch.from_numpy(upright).permute(2, 0, 1))
    assert bright_box(image.float() / 255) == target["boxes"][0].tolist() == [14, 30, 18, 38]
    # annotated as stored: refused by the header check, with the hint, not at decode
    write_coco(root, "s", [image_entry(1, "late.png", 40, 20)], [ann(1, 1, 5, [30, 2, 8, 4])],
               [{"id": 5, "name": "box"}])
    with pytest.raises(DataError) as e:
        CocoDataset(root, "s", train=True).check_images(show_progress=False)
    assert "with EXIF orientation 6 applied" in one_line(e) and "--raw-orientation" in one_line(e)
    CocoDataset(root, "s", train=True, exif=False).check_images(show_progress=False)


def test_categories_the_model_does_not_know(tmp_path):
    """Given a trained model's categories, a file that also lists a category the model does not know
    is refused when an annotation uses it, and read with a note when none does (a label list
    exported whole): AP has nothing to count there."""
    root = str(tmp_path / "cats")
    os.makedirs(os.path.join(root, "s"))
    Image.new("RGB", (40, 30)).save(os.path.join(root, "s", "a.png"))
    trained = [{"id": 42, "name": "c42"}, {"id": 3, "name": "c3"}]
    listed = [*trained, {"id": 7, "name": "c7"}]
    write_coco(root, "s", [image_entry(5, "a.png", 40, 30)], [ann(1, 5, 42, [1, 1, 10, 10])], listed)
    ds = CocoDataset(root, "s", train=False, categories=trained)
    assert ds.categories == trained and "(7:c7)" in ds.category_note and "do not count in AP" in ds.category_note
    assert CocoDataset(root, "s", train=False, categories=listed).category_note is None
    write_coco(root, "s", [image_entry(5, "a.png", 40, 30)], [ann(1, 5, 42, [1, 1, 10, 10]), ann(2, 5, 7, [1, 1, 5, 5])],
               listed)
    with pytest.raises(DataError) as e:
        CocoDataset(root, "s", train=False, categories=trained)
    assert "holds categories the model was not trained on (7:c7)" in one_line(e)
    for annotations in ([], None):  # none of the model's categories: nothing to detect (also a list of images)
        write_coco(root, "s", [image_entry(5, "a.png", 40, 30)], annotations, [{"id": 7, "name": "c7"}])
        with pytest.raises(DataError) as e:
            CocoDataset(root, "s", train=False, categories=trained)
        assert one_line(e).endswith("lists none of the categories the model was trained on (42:c42, 3:c3)")


def test_check_of_the_first_images_only(tmp_path):
    """evaluate.py --max-images N checks the headers of the N images it evaluates, not a broken one after them."""
    root = str(tmp_path / "two")
    os.makedirs(os.path.join(root, "s"))
    Image.new("RGB", (40, 30)).save(os.path.join(root, "s", "a.png"))
    Image.new("RGB", (41, 30)).save(os.path.join(root, "s", "b.png"))  # annotated 40x30
    write_coco(root, "s", [image_entry(1, "a.png", 40, 30), image_entry(2, "b.png", 40, 30)],
               [ann(1, 1, 5, [1, 1, 10, 10])], [{"id": 5, "name": "box"}])
    ds = CocoDataset(root, "s", train=False)
    ds.check_images(show_progress=False, count=1)
    with pytest.raises(DataError) as e:
        ds.check_images(show_progress=False)
    assert "1 of 2 images cannot be used" in one_line(e) and "b.png" in one_line(e)


def test_images_above_pils_decompression_bomb_limit_are_used(tmp_path):
    """PIL refuses images above 179 Mpx by default; a dataset's own aerial tiles can be that large."""
    path = str(tmp_path / "huge.png")
    Image.new("1", (15000, 12000)).save(path)  # 180 Mpx, a small file
    assert data._check_one(path, (12000, 15000), True) is None


@pytest.mark.parametrize("where, after_pixels", [("text chunk", False), ("text chunk", True), ("xmp", False),
                                                 ("xmp", True), ("tiff xmp", False)])
def test_png_orientation_outside_an_exif_chunk_is_checked_as_it_is_read(tmp_path, where, after_pixels):
    """A PNG may carry its orientation in ImageMagick's "Raw profile type exif" text chunk or as XMP
    tiff:Orientation instead of an eXIf chunk, before or after its pixels; exif_transpose (and
    read_image) turn the picture by it, and so must the header check, or it refuses images that
    read fine and passes images that don't. A TIFF may carry it as XMP too, instead of its own
    tag: PIL turns the pixels by it as it loads them but, unlike for the tag, reports the stored
    size. Read as stored (--raw-orientation), each is accepted annotated as stored."""
    from PIL import ImageOps, PngImagePlugin
    root = str(tmp_path / "png")
    os.makedirs(os.path.join(root, "s"))
    info = PngImagePlugin.PngInfo()
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    if where == "text chunk":
        exif = Image.Exif()
        exif[0x0112] = 6
        raw = exif.tobytes().hex()
        info.add_text("Raw profile type exif", f"\nexif\n{len(raw) // 2:8d}\n{raw}\n", zip=True)
    elif where == "xmp":
        info.add_itxt("XML:com.adobe.xmp", xmp)
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[2:6, 30:38] = 255
    name = "turned.tif" if where == "tiff xmp" else "turned.png"
    path = os.path.join(root, "s", name)
    if where == "tiff xmp":
        Image.fromarray(stored).save(path, tiffinfo={700: xmp.encode()})  # 700: the TIFF tag of XMP
    else:
        Image.fromarray(stored).save(path, pnginfo=info)
    if after_pixels:
        move_chunks_after_pixels(path, (b"zTXt", b"iTXt"))
    with Image.open(path) as img:
        if after_pixels:  # not in the header: PIL finds it only by decoding
            assert "XML:com.adobe.xmp" not in img.info and "Raw profile type exif" not in img.info
        upright = np.array(ImageOps.exif_transpose(img).convert("RGB"))
    assert upright.shape == (40, 20, 3)  # PIL turns it
    write_coco(root, "s", [image_entry(1, name, 20, 40)], [ann(1, 1, 5, [14, 30, 4, 8])],
               [{"id": 5, "name": "box"}])
    ds = CocoDataset(root, "s", train=True)
    ds.check_images(show_progress=False)  # annotated upright: accepted
    assert torch.equal(ds[0][0], torch.from_numpy(upright).permute(2, 0, 1))
    write_coco(root, "s", [image_entry(1, name, 40, 20)], [ann(1, 1, 5, [30, 2, 8, 4])],
               [{"id": 5, "name": "box"}])
    with pytest.raises(DataError) as e:  # annotated as stored: refused up front, with the hint
        CocoDataset(root, "s", train=True).check_images(show_progress=False)
    assert "with EXIF orientation 6 applied" in one_line(e) and "--raw-orientation" in one_line(e)
    ds = CocoDataset(root, "s", train=True, exif=False)
    ds.check_images(show_progress=False)  # and read as stored: accepted
    assert torch.equal(ds[0][0], torch.from_numpy(stored).permute(2, 0, 1))


# ----------------------------------------------------------------------------- the header check

def test_progress_redraws_one_line_on_a_terminal_and_prints_tenths_in_a_log(capsys, monkeypatch):
    start = time.time() - 10  # a task under way for 10 s
    for done in range(1, 101):
        data.progress_line("work", done, 100, start)
    data.end_progress_line(" done in 10.0 s")
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[1] for l in lines[:-1]] == [f"{k}/100" for k in [1, *range(10, 101, 10)]]  # a line a tenth
    assert lines[-1] == "work: done in 10.0 s"
    start = time.time()  # a task of less than a second: its last line alone
    for done in range(1, 101):
        data.progress_line("work", done, 100, start)
    data.end_progress_line(" done in 0.1 s")
    assert capsys.readouterr().out == "work: done in 0.1 s\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    start = time.time()
    for done in range(1, 101):
        data.progress_line("work", done, 100, start)
    data.end_progress_line(" done in 1.0 s")
    out = capsys.readouterr().out
    assert out.count("\r") == 100 and out.count("\n") == 1  # one line, redrawn
    assert out.split("\r")[-1].startswith("work: 100/100") and out.endswith(" done in 1.0 s\n")
    data.end_progress_line(" again")  # nothing open: nothing printed
    assert capsys.readouterr().out == ""


def test_header_check_names_every_kind_of_unusable_image(tiny, capsys):
    ds = CocoDataset(tiny, "val", train=False)
    ds.check_images()
    out = capsys.readouterr().out
    assert out.startswith("checking images: done in")  # on stdout; off a terminal a short check shows its end alone
    with open(os.path.join(tiny, "val", "b.png"), "wb") as f:
        f.write(b"not a png at all")
    Image.new("RGB", (65, 48)).save(os.path.join(tiny, "val", "a.jpg"))
    os.remove(os.path.join(tiny, "val", "e.png"))
    os.remove(os.path.join(tiny, "val", "d.png"))
    os.mkdir(os.path.join(tiny, "val", "d.png"))  # unreadable
    os.remove(os.path.join(tiny, "val", "c.png"))
    os.mkfifo(os.path.join(tiny, "val", "c.png"))  # opening it would wait for a writer forever
    with pytest.raises(DataError) as e:
        ds.check_images(show_progress=False)
    message = one_line(e)
    assert message.startswith("5 of 5 images cannot be used: ")  # in file order
    assert os.path.join(tiny, "val", "a.jpg") + " (is 65x48 but the annotations say 64x48)" in message
    assert os.path.join(tiny, "val", "b.png") + " (not an image)" in message
    assert os.path.join(tiny, "val", "e.png") + " (missing)" in message
    assert os.path.join(tiny, "val", "d.png") + " (unreadable: IsADirectoryError" in message
    assert os.path.join(tiny, "val", "c.png") + " (unreadable: OSError: not a regular file" in message
    with pytest.raises(ImageError, match="c.png: OSError: not a regular file"):
        ds[2]  # what the loader meets with --skip-check


def test_header_check_in_parallel_names_the_first_few_and_counts_all(tiny):
    good = os.path.join(tiny, "val", "a.jpg")
    bad = os.path.join(tiny, "val", "nothing.jpg")
    paths = [good] * 1500 + [bad] * 7 + [good] * 10
    with pytest.raises(DataError) as e:
        data.check_images(paths, [(48, 64)] * len(paths), workers=2, show_progress=False)
    message = one_line(e)
    assert message.startswith(f"7 of {len(paths)} images cannot be used: {bad} (missing), ")
    assert message.count(bad) == 5 and message.endswith("... and 2 more")
    data.check_images([good] * 1500, [(48, 64)] * 1500, workers=2, show_progress=False)  # all fine


@pytest.mark.parametrize("name, cut", [("a.jpg", 0.5), ("a.jpg", 2), ("b.png", 0.5)])
def test_truncated_image_is_found_by_the_check_and_named_at_decode(tiny, name, cut):
    """A JPEG or PNG cut short (half of it, or only its last 2 bytes: a JPEG without its end
    marker, which PIL refuses): the header check, which reads each file's last bytes, names it before iteration 0;
    unchecked (--skip-check), its first decode does. A JPEG with data after its end passes."""
    path = os.path.join(tiny, "val", name)
    h, w = Image.open(path).size[::-1]
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(noise).convert(Image.open(path).mode).save(path)  # pixels behind a short header
    good = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(good[: int(len(good) * cut)] if cut < 1 else good[:-cut])
    ds = CocoDataset(tiny, "val", train=True)
    with pytest.raises(DataError) as e:
        ds.check_images(show_progress=False)
    assert one_line(e).startswith("1 of 5 images cannot be used") and path in str(e.value)  # every listed one
    with pytest.raises(DataError) as e:
        ds[ds.image_ids.index(1 if name == "a.jpg" else 2)]
    assert one_line(e).startswith(f"cannot read image {path}")
    with open(path, "wb") as f:
        f.write(good + b"\x00" * 100)  # complete, then data after its end
    ds.check_images(show_progress=False)


def test_malformed_exif_reads_without_pil_warnings(tmp_path):
    """A JPEG whose EXIF orientation tag claims more data than the file holds: PIL warns in two
    lines that name no file (from every loader worker); the image reads, without them."""
    import warnings
    from data import _check_one, read_image
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 100, 50)).save(buf, "JPEG", quality=95)
    payload = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x0112, 3, 1000000, 26) \
        + struct.pack("<I", 0)
    data = buf.getvalue()
    path = str(tmp_path / "bad_exif.jpg")
    with open(path, "wb") as f:
        f.write(data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert _check_one(path, (48, 64), exif=True) is None
        assert read_image(path).shape == (48, 64, 3)
    with pytest.warns(UserWarning):  # what PIL itself does with it
        Image.open(path).close()


def test_phone_jpeg_of_several_frames_cut_short_is_found_by_the_check(tmp_path):
    """Phones write MPO files (JPEGs of several frames), which PIL reports as format 'MPO'."""
    from data import _check_one
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = str(tmp_path / "phone.jpg")
    Image.fromarray(noise).save(path, "MPO", save_all=True, append_images=[Image.fromarray(noise[::-1])])
    assert Image.open(path).format == "MPO" and _check_one(path, (48, 64), exif=True) is None
    good = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(good[: len(good) // 4])
    assert "truncated" in _check_one(path, (48, 64), exif=True)


# ----------------------------------------------------------------------------- memory

def test_training_dataset_keeps_only_flat_arrays(tiny):
    ds = CocoDataset(tiny, "val", train=True)
    for name, value in vars(ds).items():
        if name == "categories":  # K small dicts, the label -> category id table
            assert all(set(c) == {"id", "name"} for c in value)
        elif name in ("unseen_categories", "shared_names"):  # at most K "id:name" strings
            assert all(isinstance(c, str) for c in value)
        else:
            assert value is None or isinstance(value, (np.ndarray, str, bool, int)), name
    assert ds._coco is None  # no pycocotools index until evaluation asks for one
    assert len(ds.coco.getAnnIds()) == 8 and ds._coco is not None


def test_training_checks_the_images_it_leaves_out(tiny):
    """Images without a usable box never reach training, but the header check opens them too: a
    size other than annotated may be why their boxes were clipped away."""
    Image.new("RGB", (300, 200)).save(os.path.join(tiny, "val", "d.png"))  # listed as 30x20: box 42 clipped away
    open(os.path.join(tiny, "val", "e.png"), "wb").close()  # no annotation at all
    ds = CocoDataset(tiny, "val", train=True)
    assert ds.image_ids == [1, 2]
    with pytest.raises(DataError) as e:
        ds.check_images(show_progress=False)
    val = os.path.join(tiny, "val")
    assert one_line(e) == (f"2 of 5 images cannot be used: {os.path.join(val, 'd.png')} (is 300x200 but the "
                           f"annotations say 30x20), {os.path.join(val, 'e.png')} (not an image)")
    ds.check_images(show_progress=False, count=2)  # the dataset's first two: fine


def test_training_stops_before_iteration_0_on_an_image_it_would_never_draw(tmp_path, capsys):
    # one iteration of 2 images draws 2 of the 8; the corrupt one is named before anything runs
    import train
    root = str(tmp_path / "user")
    os.makedirs(os.path.join(root, "s"))
    for k in range(8):
        Image.new("RGB", (48, 32), (k * 30, 90, 160)).save(os.path.join(root, "s", f"p{k}.jpg"))
    with open(os.path.join(root, "s", "p5.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not really a JPEG")
    write_coco(root, "s", [image_entry(k + 1, f"p{k}.jpg", 48, 32) for k in range(8)],
               [ann(k + 1, k + 1, 5, [4, 4, 20, 12]) for k in range(8)], [{"id": 5, "name": "thing"}])
    args = ["--data", root, "--train-split", "s", "--backbone", "resnet18", "--weights", "none",
            "--batch-size", "2", "--max-iter", "1", "--min-size", "32", "--max-size", "64", "--workers", "0",
            "--device", "cpu", "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: 1 of 8 images cannot be used: {os.path.join(root, 's', 'p5.jpg')} (not an image)\n"
    assert "checking images" not in captured.err  # progress goes to stdout
    assert not os.path.exists(tmp_path / "run")  # nothing written, not even the run directory


def test_training_says_what_it_leaves_out(tiny, tmp_path, capsys):
    import train
    with open(os.path.join(tiny, "val", "b.png"), "wb") as f:  # stops the run at the header check, before any model
        f.write(b"not a png")
    args = ["--data", tiny, "--train-split", "val", "--backbone", "resnet18", "--weights", "none", "--batch-size", "2",
            "--max-iter", "1", "--min-size", "32", "--max-size", "64", "--workers", "0", "--device", "cpu",
            "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit):
        train.main(args)
    path = os.path.join(tiny, "annotations", "instances_val.json")
    out = capsys.readouterr().out
    assert f"note: training leaves out 3 box(es) of {path} under 1 px wide or high once clipped to their " \
           f"image, and 3 image(s) without a usable box (none annotated, or only crowd regions and such boxes)\n" in out
    assert f"note: 2 of the 6 boxes of {path} extend more than 1 px past their image and are clipped to it " \
           f"(COCO boxes are [x, y, width, height])\n" in out  # annotations 14 and 42
    assert "no usable box there" not in out
    with open(path) as f:  # a label list exported whole: a category without any box
        coco = json.load(f)
    coco["categories"].append({"id": 7, "name": "unused"})
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(SystemExit):
        train.main(args)
    out = capsys.readouterr().out
    assert f"note: 1 of the 4 categories of {path} has no usable box there (7:unused): the model gets a class " \
           f"for each, which it never sees an example of\n" in out
    assert "share a name" not in out
    coco["categories"][-1]["name"] = coco["categories"][0]["name"]  # two categories of one name
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(SystemExit):
        train.main(args)
    name = coco["categories"][0]["name"]
    shared = ", ".join(f"{i}:{name}" for i in sorted((coco["categories"][0]["id"], 7)))  # in the order of the ids
    assert f"note: categories of {path} share a name ({shared}): they are " \
           f"told apart by id only, in the evaluation's tables and pictures\n" in capsys.readouterr().out


def test_to_device_pads_the_objects_for_the_loss(tiny):
    """pad_to: the objects as [B, G, 4] / [B, G] tensors, G the largest count rounded up to a
    multiple of pad_to, label -1 at the padding, the lists' values in front."""
    ds = CocoDataset(tiny, "val", train=False)
    batch = collate([ds[i] for i in range(len(ds))])
    _, lists_boxes, lists_labels = to_device(batch, "cpu")
    _, boxes, labels = to_device(batch, "cpu", pad_to=8)
    counts = [len(b) for b in lists_boxes]
    assert boxes.shape == (len(ds), max(8, -(-max(counts) // 8) * 8), 4) and labels.shape == boxes.shape[:2]
    for b, (bx, lb) in enumerate(zip(lists_boxes, lists_labels)):
        assert torch.equal(boxes[b, :len(bx)], bx) and torch.equal(labels[b, :len(lb)], lb)
        assert (labels[b, len(lb):] == -1).all()


def test_cpu_processes_share_the_cpus_unless_the_user_set_the_threads(monkeypatch):
    """Under torchrun on CPUs each process takes its share of the CPUs, also where torchrun set
    OMP_NUM_THREADS=1 itself (which it does for several processes where the user set none); a
    user's own OMP_NUM_THREADS is kept, so that torchrun with 1 process runs as plain python."""
    monkeypatch.setattr(data, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert data.cpu_threads(1) == 8 and data.cpu_threads(2) == 4 and data.cpu_threads(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert data.cpu_threads(2) == 4  # torchrun's own setting
    assert data.cpu_threads(1) is None  # torchrun sets none for 1 process: the user's
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert data.cpu_threads(2) is None and data.cpu_threads(1) is None
