"""Tests of evaluate.py: COCO AP through the real code path (ground truth fed back scores 100),
subset AP without re-evaluating equals a fresh COCOeval, NMS recall on a hand-built case,
results mapped back to non-contiguous category ids, test-time scales and flips, pictures, the CLI
end to end (also 2 processes under torchrun) on a tiny COCO-layout dataset.

    python -m pytest tests/test_evaluate.py
"""

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools.cocoeval import COCOeval

import evaluate
import freeanchor
import data
from data import CocoDataset
from model import RetinaNet
from test_train import assert_a_bad_image_stops_it_and_its_workers, lock_held_elsewhere, run_two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = [{"id": 3, "name": "square"}, {"id": 17, "name": "needle"}, {"id": 42, "name": "blob"}]  # not contiguous
OBJECTS_PER_IMAGE = (1, 2, 12, 0, 3, 2)  # image 3 has none, image 2 is "crowded" (11-20)


def make_dataset(root, size=64):
    """val2017 of a COCO-layout dataset: same-size images with filled rectangles of three
    categories with non-contiguous ids, image ids not starting at 1, one crowd region."""
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "val2017"))
    gen = torch.Generator().manual_seed(0)
    images, annotations = [], []
    for n, count in enumerate(OBJECTS_PER_IMAGE):
        image_id = 100 + 7 * n
        img = Image.new("RGB", (size, size), (90, 90, 90))
        draw = ImageDraw.Draw(img)
        for _ in range(count):
            cat = CATEGORIES[len(annotations) % 3]["id"]
            w, h = torch.randint(14, 34, (2,), generator=gen).tolist()  # near the 32 px anchors
            if cat == 17:
                w = 4  # slender
            x, y = torch.randint(0, size - 34, (2,), generator=gen).tolist()
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=(40 + 60 * (cat % 4), 200 - cat, 90))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        img.save(os.path.join(root, "val2017", f"{image_id}.png"))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size, "height": size})
    annotations.append({"id": len(annotations) + 1, "image_id": 100, "category_id": 42,
                        "bbox": [40, 40, 20, 20], "area": 400, "iscrowd": 1})
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return root


def make_model():
    """resnet18 RetinaNet on 64 px images whose scores sit around 0.5, well spread, so that every
    image has a full set of detections of every class."""
    torch.manual_seed(0)
    model = RetinaNet(len(CATEGORIES), backbone="resnet18", weights="none", min_size=64, max_size=64)
    with torch.no_grad():
        model.cls_head[-1].bias.zero_()
        model.cls_head[-1].weight.mul_(30)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("tiny") / "data"))


@pytest.fixture(scope="module")
def dataset(tiny_data):
    return CocoDataset(tiny_data, "val2017", train=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_data, tmp_path_factory):
    return save_tiny_ckpt(tiny_data, str(tmp_path_factory.mktemp("run") / "model_final.pt"))


def save_tiny_ckpt(data, path):
    """make_model() saved at `path` in train.py's model_final.pt format, for the dataset at `data`."""
    model = make_model()
    torch.save({"model": model.state_dict(), "model_config": model.config, "categories": CATEGORIES,
                "config": {"data": data, "val_split": "val2017", "min_size": (64,), "max_size": 64},
                "loss_config": dataclasses.asdict(freeanchor.FreeAnchorConfig()), "iteration": 0}, path)
    return path


def ground_truth_detections(dataset):
    dets = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        dets.append({"boxes": target["boxes"], "scores": torch.ones(len(target["boxes"])), "labels": target["labels"]})
    return dets


def evaluate_on_cpu(argv):
    """evaluate.main pinned to the CPU, so that a GPU machine checks the same numbers (and the
    CPU's defaults: float32, NCHW); tests/test_cuda.py runs evaluate.py on the GPU there."""
    return evaluate.main(["--device", "cpu", *argv])


def run_main(argv, capsys):
    metrics = evaluate_on_cpu(argv)
    return metrics, capsys.readouterr()


# ----------------------------------------------------------------------------- COCO AP

def test_ground_truth_as_detections_scores_100(dataset):
    dets = ground_truth_detections(dataset)
    results = evaluate.to_coco_results(dets, dataset.image_ids, dataset.categories)
    stats, table = evaluate.coco_summary(evaluate.coco_evaluate(dataset.coco, results, dataset.image_ids))
    assert stats["AP"] == pytest.approx(100.0) and stats["AP50"] == pytest.approx(100.0)
    assert stats["AP75"] == pytest.approx(100.0)
    assert "Average Precision" in table
    # and the same path notices a wrong box: shift one object by its own width
    dets[0]["boxes"] = dets[0]["boxes"] + torch.tensor([20.0, 0.0, 20.0, 0.0])
    results = evaluate.to_coco_results(dets, dataset.image_ids, dataset.categories)
    stats, _ = evaluate.coco_summary(evaluate.coco_evaluate(dataset.coco, results, dataset.image_ids))
    assert stats["AP"] < 99.0


def test_annotation_ids_from_zero_or_negative_score_like_any_other(dataset, tmp_path):
    """COCOeval reads a matched ground truth's id 0 as "unmatched": a dataset whose annotation ids
    are 0, -1, -2, ... must score what ids 1, 2, 3 ... do, with each object matched once (a
    duplicate of every detection is a false positive)."""
    root = str(tmp_path / "ids")
    os.makedirs(os.path.join(root, "annotations"))
    os.symlink(dataset.img_dir, os.path.join(root, "val2017"))
    with open(dataset.ann_file) as f:
        d = json.load(f)
    for k, a in enumerate(d["annotations"]):
        a["id"] = -k  # 0, -1, -2, ...
    with open(os.path.join(root, "annotations", "instances_val2017.json"), "w") as f:
        json.dump(d, f)
    odd = CocoDataset(root, "val2017", train=False)
    dets = ground_truth_detections(dataset)
    doubled = [{"boxes": torch.cat([d["boxes"], d["boxes"]]), "scores": torch.cat([d["scores"], d["scores"] / 2]),
                "labels": torch.cat([d["labels"], d["labels"]])} for d in dets]
    for detections in (dets, doubled):
        results = evaluate.to_coco_results(detections, dataset.image_ids, dataset.categories)
        E = [evaluate.coco_evaluate(ds.coco, results, ds.image_ids) for ds in (dataset, odd)]
        stats = [evaluate.coco_summary(e)[0] for e in E]
        assert stats[1] == stats[0] and stats[1]["AP"] == pytest.approx(100.0)
        # recall at IoU 0.5, all areas, 100 detections: the matched detections over the objects of
        # each category, exactly 1: every object matched once (an unmatched one gives less, a
        # duplicate matched too more)
        for e in E:
            recall = e["arrays"][None][1][0, :, 0, -1]  # [K]
            assert recall.tolist() == [1.0] * len(CATEGORIES)


def test_results_map_back_to_dataset_ids(dataset):
    det = {"boxes": torch.tensor([[1.0, 2.0, 11.0, 7.0], [0.0, 0.0, 4.0, 4.0], [5.0, 5.0, 6.0, 9.5]]),
           "scores": torch.tensor([0.9, 0.5, 0.25]), "labels": torch.tensor([2, 0, 1])}
    results = evaluate.to_coco_results([det], [107], dataset.categories)
    assert [r["category_id"] for r in results] == [42, 3, 17]
    assert [r["image_id"] for r in results] == [107] * 3
    assert results[0]["bbox"] == [1.0, 2.0, 10.0, 5.0] and results[2]["bbox"] == [5.0, 5.0, 1.0, 4.5]
    assert results[1]["score"] == pytest.approx(0.5)
    json.dumps(results)  # plain Python numbers only


def test_subset_summary_equals_a_fresh_cocoeval(dataset):
    """coco_summary on a group of images or a subset of categories reuses one evaluation; it must
    give what COCOeval gives when run on that subset alone. Evaluated in processes, a chunk of
    categories each, the evaluation is the same."""
    gen = torch.Generator().manual_seed(1)
    dets = []
    for d in ground_truth_detections(dataset):  # jittered hits with random scores, plus false alarms
        n = len(d["boxes"])
        boxes = torch.cat((d["boxes"] + 0.6 * torch.randn(n, 4, generator=gen), torch.rand(5, 4, generator=gen) * 30))
        boxes = torch.cat((boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)), dim=1)  # [n + 5, 4]
        dets.append({"boxes": boxes, "scores": torch.rand(n + 5, generator=gen),
                     "labels": torch.cat((d["labels"], torch.randint(0, 3, (5,), generator=gen)))})
    results = evaluate.to_coco_results(dets, dataset.image_ids, dataset.categories)
    groups = {"a": [100, 114, 128], "b": [107, 114], "none": [999]}
    E = evaluate.coco_evaluate(dataset.coco, results, dataset.image_ids, image_groups=groups)
    # in processes, a chunk of categories each: the same arrays, bit for bit
    in_processes = evaluate.coco_evaluate(dataset.coco, results, dataset.image_ids, image_groups=groups, workers=2)
    assert E["arrays"].keys() == in_processes["arrays"].keys() == {None, "a", "b", "none"}
    assert E["arrays"]["none"] is None and evaluate.coco_summary(E, group="none")[0]["AP"] is None
    for name, arrays in E["arrays"].items():
        for ours, theirs in zip(arrays or (), in_processes["arrays"][name] or ()):
            assert ours.shape[2 if ours.ndim == 5 else 1] == len(CATEGORIES) and np.array_equal(ours, theirs)
    assert evaluate.coco_summary(E) == evaluate.coco_summary(in_processes)
    for group, cat_ids in ((None, None), ("a", None), (None, [17]), ("b", [3, 42])):
        ours, _ = evaluate.coco_summary(E, group=group, cat_ids=cat_ids)
        img_ids = groups.get(group)
        with contextlib.redirect_stdout(io.StringIO()):
            fresh = COCOeval(dataset.coco, dataset.coco.loadRes(copy.deepcopy(results)), "bbox")
            fresh.params.imgIds = img_ids or dataset.image_ids
            fresh.params.catIds = cat_ids or [c["id"] for c in CATEGORIES]
            fresh.evaluate()
            fresh.accumulate()
            fresh.summarize()
        expected = [100 * v if v >= 0 else None for v in fresh.stats[:6]]
        assert [ours[k] for k in evaluate.COCO_STATS] == pytest.approx(expected, abs=1e-9)
        assert ours["AP"] is not None and 0 < ours["AP"] < 100


def test_crowd_groups_count_non_crowd_objects(dataset):
    groups = dict(evaluate.crowd_groups(dataset.coco, dataset.image_ids))
    assert sorted(groups) == ["0-10", "11-20", "21-30", "31+"]
    assert sorted(groups["0-10"]) == [100, 107, 121, 128, 135]  # image 100 also holds a crowd region
    assert groups["11-20"] == [114] and groups["21-30"] == [] and groups["31+"] == []


# ----------------------------------------------------------------------------- NMS recall

def test_nms_recall_hand_built():
    """Objects: two of class 0, one of class 1. Before NMS: a class-0 box on object 0 (IoU 1), a
    class-0 box on object 1 at IoU 0.72, and a class-0 box exactly on object 2, which is of class
    1 and so does not count. After NMS only the first survives. Recall before: 2/3 for tau <= 0.70,
    1/3 above; after: 1/3 -> NR_tau = 50 for five thresholds, 100 for four; NR = 650 / 9."""
    gt_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]])
    gt_labels = torch.tensor([0, 0, 1])
    before = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 7.2], [40.0, 0.0, 50.0, 10.0]])
    best_before = evaluate.best_iou(gt_boxes, gt_labels, before, torch.tensor([0, 0, 0]))  # [3, 3]
    best_after = evaluate.best_iou(gt_boxes, gt_labels, before[:1], torch.tensor([0]))  # [3, 3]
    assert best_before[:, 0].tolist() == pytest.approx([1.0, 0.72, 0.0])
    # the third column: among the first detections only, here the first, which is what NMS kept
    assert evaluate.best_iou(gt_boxes, gt_labels, before, torch.tensor([0, 0, 0]), 1)[:, 2].tolist() == \
        best_after[:, 0].tolist()
    assert evaluate.best_iou(gt_boxes, gt_labels, before, torch.tensor([0, 0, 0]), 0)[:, 2].tolist() == [0, 0, 0]
    any_before, any_after = best_before[:, 1], best_after[:, 1]
    best_before, best_after = best_before[:, 0], best_after[:, 0]
    empty = evaluate.best_iou(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), before, torch.tensor([0, 0, 0]))[:, 0]
    nr = evaluate.nms_recall([best_before, empty], [best_after, empty])
    assert nr["objects"] == 3
    assert list(nr["NR_tau"]) == ["0.50", "0.55", "0.60", "0.65", "0.70", "0.75", "0.80", "0.85", "0.90"]
    assert list(nr["NR_tau"].values()) == pytest.approx([50.0] * 5 + [100.0] * 4)
    assert nr["recall_before"]["0.70"] == pytest.approx(200 / 3) and nr["recall_after"]["0.90"] == pytest.approx(100 / 3)
    assert nr["NR"] == pytest.approx(650 / 9) and "recall_output" not in nr
    # the detections as output (after the cut to the best 100) recall apart from NR: here none
    nr = evaluate.nms_recall([best_before, empty], [best_after, empty], [torch.zeros(3), empty])
    assert nr["NR"] == pytest.approx(650 / 9) and set(nr["recall_output"].values()) == {0.0}
    # as the authors' script counts: object 2 is recalled before NMS by the box of the other class,
    # and an IoU must exceed tau (0.72 > 0.70, but not 0.75)
    assert any_before.tolist() == pytest.approx([1.0, 0.72, 1.0]) and any_after.tolist() == [1.0, 0.0, 0.0]
    nr = evaluate.nms_recall([any_before], [any_after], strict=True)
    assert list(nr["NR_tau"].values()) == pytest.approx([100 / 3] * 5 + [50.0] * 4)
    edge = torch.tensor([0.7])
    assert evaluate.nms_recall([edge], [edge])["recall_before"]["0.70"] == pytest.approx(100.0)
    assert evaluate.nms_recall([edge], [edge], strict=True)["recall_before"]["0.70"] == 0.0
    # nothing recalled before NMS at some tau: NR_tau and NR are undefined, not 0 or 100
    nr = evaluate.nms_recall([torch.tensor([0.6])], [torch.tensor([0.6])])
    assert nr["NR_tau"]["0.50"] == pytest.approx(100.0) and nr["NR_tau"]["0.90"] is None and nr["NR"] is None
    nr = evaluate.nms_recall([torch.zeros(0)], [torch.zeros(0)])  # a split without objects: n/a, not 0
    assert nr["objects"] == 0 and nr["NR"] is None and set(nr["recall_before"].values()) == {None}


# ----------------------------------------------------------------------------- test-time scales and flips

def test_single_scale_is_plain_detect(dataset):
    model = make_model()
    images = [dataset[i][0] for i in range(2)] + [torch.rand(3, 48, 80)]
    ours = evaluate.detect(model, images, [64], [64], flip=False, candidates=True)[:2]
    plain = model.detect(images), model.detect(images, nms=False)
    for found, expected in zip(ours, plain):  # detections, then candidates
        for a, b in zip(found, expected):
            assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    assert len(plain[1][0]["boxes"]) > model.detections_per_img  # candidates, and plenty of them
    for a, b in zip(evaluate.detect(model, images, [64], [64]), plain[0]):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def _rows(det):
    rows = torch.cat((det["boxes"], det["scores"][:, None], det["labels"][:, None].float()), dim=1).numpy()
    return rows[np.lexsort(rows.T[::-1])]


def test_repeated_scale_merges_to_the_single_scale_boxes(dataset):
    """The same scale twice gives every detection twice; the merge must keep exactly one of each."""
    model = make_model()
    images = [dataset[i][0] for i in range(2)]
    single = model.detect(images)
    merged = evaluate.detect(model, images, [64, 64], [64, 64])
    for a, b in zip(merged, single):
        assert len(b["boxes"]) > 20
        np.testing.assert_array_equal(_rows(a), _rows(b))
    # several real scales and flips: at most detections_per_img per image, inside the image
    for det in evaluate.detect(model, images, [48, 64, 80], [48, 64, 80], flip=True):
        assert 0 < len(det["boxes"]) <= model.detections_per_img
        assert det["boxes"].min() >= 0 and det["boxes"].max() <= 64
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])


class BrightBoxDetector:
    """A stand-in for RetinaNet.detect that finds the box of the bright pixels: a detector whose
    answer we know on flipped images too."""
    nms_thresh, detections_per_img = 0.5, 100

    def detect(self, images, nms=True, min_size=None, max_size=None, candidates=False):
        dets = []
        for image in images:
            ys, xs = torch.where(image[0] > 0.5)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            dets.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])})
        return (dets, dets) if candidates else dets


def test_flip_maps_boxes_back():
    image = torch.zeros(3, 40, 60)
    image[0, 10:30, 5:20] = 1.0  # x 5..20, y 10..30, off-centre
    det, = evaluate.detect(BrightBoxDetector(), [image], [40], [60], flip=True)
    assert det["boxes"].tolist() == [[5.0, 10.0, 20.0, 30.0]]  # both passes agree: one box after NMS
    (det,), (candidates,), (after_nms,) = evaluate.detect(BrightBoxDetector(), [image], [40], [60], flip=True,
                                                          candidates=True)
    assert det["boxes"].tolist() == after_nms["boxes"].tolist() == [[5.0, 10.0, 20.0, 30.0]]
    assert candidates["boxes"].tolist() == [[5.0, 10.0, 20.0, 30.0]] * 2
    assert evaluate.flip_boxes(torch.tensor([[5.0, 10.0, 20.0, 30.0]]), 60).tolist() == [[40.0, 10.0, 55.0, 30.0]]


def test_passes_pool_their_candidates_into_one_nms():
    """As in the authors' multi-scale test, one class-wise NMS over the candidates of every scale:
    a candidate that its own scale's NMS would remove (C, under B) survives when B is removed by
    a better box of another scale (D) that does not overlap C by 0.5. NMS per scale, then again
    over the survivors, would lose C."""
    B, C, D = [4.0, 0.0, 14.0, 10.0], [7.0, 0.0, 17.0, 10.0], [2.0, 0.0, 12.0, 10.0]

    class TwoScales:  # candidates of scale 40: B and C; of scale 60: D
        nms_thresh, detections_per_img = 0.5, 100

        def detect(self, images, nms=True, min_size=None, max_size=None, candidates=False):
            boxes, scores = ([B, C], [0.85, 0.5]) if min_size == 40 else ([D], [0.95])
            return [{"boxes": torch.tensor(boxes), "scores": torch.tensor(scores),
                     "labels": torch.zeros(len(boxes), dtype=torch.long)} for _ in images]

    det, = evaluate.detect(TwoScales(), [torch.zeros(3, 20, 20)], [40, 60], [60, 90])
    assert det["boxes"].tolist() == [D, C]


# ----------------------------------------------------------------------------- the CLI end to end

def known_detect(dataset):
    """A stand-in for RetinaNet.detect with a known answer on the tiny dataset: after NMS, every
    object's own box, except that blobs are shifted right by a fifth of their width (IoU 2/3);
    before NMS, the blobs' own boxes as well. So COCO AP: square and needle 100, blob 40 (matched at
    IoU 0.50..0.65, 4 of 10 thresholds) -> AP 80, AP50 100, AP75 200/3; NMS recall: 100 before NMS,
    after it 100 up to tau = 0.65 and 14/20 objects above -> NR = (4 * 100 + 5 * 70) / 9. Given
    `classes`, only the objects of those."""
    truth = {dataset[i][0].numpy().tobytes(): dataset[i][1] for i in range(len(dataset))}
    blob = next(k for k, c in enumerate(dataset.categories) if c["name"] == "blob")

    def detect(self, images, nms=True, min_size=None, max_size=None, candidates=False, classes=None):
        if candidates:
            return detect(self, images, classes=classes), detect(self, images, nms=False, classes=classes)
        dets = []
        for image in images:
            target = truth[image.cpu().numpy().tobytes()]
            boxes, labels = target["boxes"], target["labels"]  # [G, 4], [G]
            if classes is not None:
                wanted = torch.isin(labels, torch.tensor(classes))  # [G]
                boxes, labels = boxes[wanted], labels[wanted]
            shifted = boxes + (boxes[:, 2:3] - boxes[:, 0:1]) / 5 * torch.tensor([1.0, 0.0, 1.0, 0.0])  # [G, 4]
            is_blob = labels == blob  # [G]
            after = torch.where(is_blob[:, None], shifted, boxes)  # [G, 4]
            boxes = after if nms else torch.cat((after, boxes[is_blob]))
            labels = labels if nms else torch.cat((labels, labels[is_blob]))
            dets.append({"boxes": boxes.to(image.device), "scores": torch.full((len(boxes),), 0.9, device=image.device),
                         "labels": labels.to(image.device)})
        return dets

    return detect


def colour_mask(img, color):
    return (np.asarray(img.convert("RGB")) == np.array(color, dtype=np.uint8)).all(-1)  # [h, w]


def test_a_split_without_annotations_gets_its_detections_only(tiny_data, tiny_ckpt, tmp_path, capsys):
    """COCO's test-dev: annotations/image_info_test-dev2017.json lists a part of the images in
    test2017/, without annotations. --split test-dev2017 writes the detections that the same images
    get in an annotated split (the same ops on the same images: equal), no AP, and pictures without
    ground truth; what needs the ground truth is refused in one line, before any detection."""
    root = tmp_path / "coco"
    shutil.copytree(os.path.join(tiny_data, "val2017"), root / "test2017")
    with open(os.path.join(tiny_data, "annotations", "instances_val2017.json")) as f:
        coco = json.load(f)
    os.makedirs(root / "annotations")
    with open(root / "annotations" / "image_info_test-dev2017.json", "w") as f:
        json.dump({"info": {}, "images": coco["images"][2:], "categories": coco["categories"]}, f)
    common = ["--ckpt", tiny_ckpt, "--workers", "0", "--batch-size", "1"]
    run_main([*common, "--output", str(tmp_path / "val"), "--visualize", "6"], capsys)
    metrics, printed = run_main([*common, "--data", str(root), "--split", "test-dev2017", "--visualize", "6",
                                 "--output", str(tmp_path / "dev")], capsys)
    with open(tmp_path / "val" / "detections.json") as f:
        dev_ids = {im["id"] for im in coco["images"][2:]}
        want = [r for r in json.load(f) if r["image_id"] in dev_ids]
    with open(tmp_path / "dev" / "detections.json") as f:
        assert json.load(f) == want and want
    with open(tmp_path / "dev" / "metrics.json") as f:
        saved = json.load(f)
    assert saved["coco"] is None and metrics["coco"] is None and saved["images"] == len(dev_ids)
    assert "Average Precision" not in printed.out and "no AP without annotations" in printed.out
    assert "detections_test-dev2017_<method>_results.json" in printed.out
    for image_id in dev_ids:  # ground truth in green in the annotated split's pictures only
        greens = [int((np.asarray(Image.open(tmp_path / run / "pictures" / f"{image_id}.png").convert("RGB"))
                       == evaluate.GT_COLOR).all(-1).sum()) for run in ("val", "dev")]
        assert greens[1] == 0 and (greens[0] > 0 or image_id == 121), (image_id, greens)  # 121: no object
    for flags in (["--nms-recall"], ["--breakdown", "--show-matching"]):
        out = tmp_path / "refused"
        with pytest.raises(SystemExit) as e:
            run_main([*common, "--data", str(root), "--split", "test-dev2017", "--output", str(out), *flags], capsys)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and " and ".join(flags) in err and "no annotations" in err, err
        assert not out.exists()


def test_cli_end_to_end(tiny_ckpt, dataset, tmp_path, capsys, monkeypatch):
    """The CLI on a detector with a known answer (known_detect): every number, chart bar and drawn
    box is checked against it. The Fig. 4 pictures come from the checkpoint's real network.
    COCOeval runs in processes, as for a large dataset (where the machine has more than one CPU)."""
    known = known_detect(dataset)
    monkeypatch.setattr(RetinaNet, "detect", known)
    monkeypatch.setattr(evaluate, "COCO_PROCESSES_FROM", 1)
    out = str(tmp_path / "eval")
    metrics, printed = run_main(["--ckpt", tiny_ckpt, "--output", out, "--workers", "0", "--batch-size", "4",
                                 "--nms-recall", "--breakdown", "--visualize", "6", "--vis-score", "0.5",
                                 "--show-matching"], capsys)
    with open(os.path.join(out, "detections.json")) as f:
        results = json.load(f)
    assert {r["category_id"] for r in results} == {3, 17, 42}  # the dataset's own ids
    assert len(results) == sum(OBJECTS_PER_IMAGE) and {r["image_id"] for r in results} == set(dataset.image_ids) - {121}
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["images"] == len(dataset) and set(saved["coco"]) == {*evaluate.COCO_STATS, *evaluate.COCO_RECALLS}
    assert (saved["score_thresh"], saved["batch_size"], saved["amp"], saved["raw_orientation"]) == (0.05, 4, False, False)
    assert saved["coco"]["AP"] == pytest.approx(80.0) and saved["coco"]["AP50"] == pytest.approx(100.0)
    assert saved["coco"]["AP75"] == pytest.approx(200 / 3)
    nr = saved["nms_recall"]
    assert nr["objects"] == sum(OBJECTS_PER_IMAGE) == 20
    assert list(nr["recall_before"].values()) == pytest.approx([100.0] * 9)
    assert list(nr["recall_after"].values()) == pytest.approx([100.0] * 4 + [70.0] * 5)
    assert list(nr["NR_tau"].values()) == pytest.approx([100.0] * 4 + [70.0] * 5)
    assert nr["NR"] == pytest.approx(750 / 9)
    assert saved["nms_recall_any_class"]["NR"] == pytest.approx(750 / 9)  # no detection of another class overlaps
    assert saved["breakdown"]["square"] == pytest.approx({"square": 100.0})
    assert saved["breakdown"]["slender"] == pytest.approx({"needle": 100.0})
    crowd = saved["breakdown"]["crowdedness"]
    assert {k: (v["images"], v["AP"]) for k, v in crowd.items()} == {
        "0-10": (5, pytest.approx(80.0)), "11-20": (1, pytest.approx(80.0)), "21-30": (0, None), "31+": (0, None)}
    # each category (its crowd region not counted); COCO's AP, AP50, AP75 are their means
    per_category = saved["breakdown"]["per_category"]
    assert [(c["id"], c["name"], c["objects"]) for c in per_category] == [(3, "square", 7), (17, "needle", 7), (42, "blob", 6)]
    assert [c[k] for c in per_category for k in ("AP", "AP50", "AP75")] == pytest.approx([100, 100, 100] * 2 + [40, 100, 0])
    for k in ("AP", "AP50", "AP75"):
        assert sum(c[k] for c in per_category) / 3 == pytest.approx(saved["coco"][k])
    assert re.search(r"^ +42 blob +6 +40\.0 +100\.0 +0\.0$", printed.out, re.M), printed.out
    assert metrics["coco"] == pytest.approx(saved["coco"])
    # metrics.json holds every number of pycocotools' printed table, its Average Recall lines too
    table = re.findall(r"^ Average (?:Precision|Recall) .* = (-?[0-9.]+)$", printed.out, re.M)[:12]
    assert [float(v) for v in table] == pytest.approx(
        [-1 if saved["coco"][k] is None else saved["coco"][k] / 100  # -1: no object of that size
         for k in (*evaluate.COCO_STATS, *evaluate.COCO_RECALLS)], abs=6e-4)
    assert "AP50" in printed.out and "83.3" in printed.out and "Fig. 5" in printed.out and "Fig. 6" in printed.out
    assert "evaluated images: done in" in printed.out  # off a terminal, a task of less than a second
    if data.available_cpus() > 1:
        assert f"COCOeval in {data.available_cpus()} processes, categories: done in" in printed.out

    # Charts: a bar's height over the y axis' (black, 0 to 100) is its AP / 100.
    def height(img, color):
        return colour_mask(img, color).sum(0).max()

    with Image.open(os.path.join(out, "ap_by_shape.png")) as img:
        axis = height(img, (0, 0, 0))
        assert height(img, (70, 120, 220)) == pytest.approx(axis, abs=2)  # square: 100
        assert height(img, (240, 140, 40)) == pytest.approx(axis, abs=2)  # slender: 100
    with Image.open(os.path.join(out, "ap_by_crowdedness.png")) as img:
        bars = colour_mask(img, (70, 120, 220)).sum(0)  # [w]
        assert bars.max() / height(img, (0, 0, 0)) == pytest.approx(0.8, abs=0.01)
        columns = np.flatnonzero(bars)
        assert (bars[columns] == bars.max()).all() and (np.diff(columns) > 1).sum() == 1  # two bars; n/a: none

    # Pictures: on the left edge of each object's box, red where the detection lies on the object
    # (drawn over the ground truth), green where it was shifted (blobs). Images whose boxes and
    # labels stay clear of each other's left edges.
    assert sorted(os.listdir(os.path.join(out, "pictures"))) == sorted(f"{i}.png" for i in dataset.image_ids)
    for image_id in (100, 128, 135):
        with Image.open(os.path.join(out, "pictures", f"{image_id}.png")) as img:
            pixels = np.asarray(img.convert("RGB"))
        scale = pixels.shape[1] / 64
        for a in dataset.coco.imgToAnns[image_id]:
            if a["iscrowd"]:
                continue
            x, y, w, h = a["bbox"]
            edge = {tuple(c) for c in pixels[round((y + h / 2) * scale), round(x * scale) - 1: round(x * scale) + 3]}
            color, other = ((evaluate.GT_COLOR, evaluate.PRED_COLOR) if a["category_id"] == 42
                            else (evaluate.PRED_COLOR, evaluate.GT_COLOR))
            assert color in edge and other not in edge, (image_id, a["id"], edge)

    # Fig. 4: the object's box in green in both panels, at the same place, with the object's aspect.
    matching = sorted(os.listdir(os.path.join(out, "matching")))
    assert 0 < len(matching) <= evaluate.MATCHING_IMAGES * evaluate.MATCHING_OBJECTS
    for name in matching:
        image_id, g = (int(v) for v in name[len("matching_"):-len(".png")].split("_"))
        x1, y1, x2, y2 = dataset[dataset.image_ids.index(image_id)][1]["boxes"][g].tolist()
        with Image.open(os.path.join(out, "matching", name)) as img:
            green = colour_mask(img, evaluate.GT_COLOR)  # [h, w]
        extents = []
        for half in (green[:, : green.shape[1] // 2], green[:, green.shape[1] // 2:]):
            ys, xs = np.nonzero(half)
            extents.append((ys.min(), ys.max(), xs.max() - xs.min(), ys.max() - ys.min()))
        assert extents[0] == extents[1], name
        _, _, w_px, h_px = extents[0]
        assert w_px / h_px == pytest.approx((x2 - x1) / (y2 - y1), rel=0.1), name

    # evaluated again in the same folder without the drawings: none of the earlier ones stays beside its results
    run_main(["--ckpt", tiny_ckpt, "--output", out, "--workers", "0", "--max-images", "1"], capsys)
    assert not any(os.path.exists(os.path.join(out, name)) for name in ("ap_by_shape.png", "ap_by_crowdedness.png"))
    assert not os.path.exists(os.path.join(out, "pictures")) and not os.path.exists(os.path.join(out, "matching"))


def test_pictures_of_a_category_name_with_a_newline():
    """Names come from the user's JSON; PIL measures one line of text only."""
    image = torch.full((3, 40, 60), 0.5)
    det = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 20.0]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    pil = evaluate.draw_detections(image, det["boxes"], det["labels"], det, ["traffic\nsign"], 0.3)
    assert pil.size == (480, 320 + 29)  # the image enlarged 8x, the strip of names and legend under it
    pil = evaluate.draw_matching(image, det["boxes"][0], det["boxes"].repeat(3, 1), torch.ones(3) / 3, torch.ones(3),
                                 "image 1, traffic\nsign 25x15 px")
    assert pil.width > 0


@pytest.mark.parametrize("h, w", [(16, 1000), (1000, 16), (3, 3)])
def test_pictures_of_images_of_any_shape_hold_the_whole_legend(h, w):
    """The legend is written in a strip under the image, inside the picture for any image shape:
    its dark pixels stop short of the picture's right and bottom edges. The image keeps its
    place at the top left, enlarged to 480 pixels on its longer side where it is smaller."""
    image = torch.full((3, h, w), 0.5)
    boxes = torch.tensor([[0.0, 0.0, w, h]])
    det = {"boxes": boxes, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    pil = evaluate.draw_detections(image, boxes, torch.tensor([0]), det, ["needle"], 0.3)
    pixels = np.asarray(pil.convert("RGB")).astype(int)
    scale = max(1.0, 480 / max(h, w))
    height = round(h * scale)
    strip = pixels[height + 13:]  # under the image and the names under its boxes
    dark = np.argwhere(strip.sum(-1) < 200)  # [N, 2]  rows, columns of the legend's text
    assert len(dark) > 0
    assert dark[:, 1].max() < pil.width - 2 and dark[:, 0].max() < strip.shape[0] - 1
    inside = pixels[height // 2, round(w * scale) // 2]  # the image's centre, grey under the boxes' outlines
    assert tuple(inside) == (128, 128, 128)


def test_orientation_follows_the_checkpoint_unless_given(tiny_ckpt, tmp_path, capsys, monkeypatch):
    ckpt = torch.load(tiny_ckpt, weights_only=False)
    ckpt["config"]["raw_orientation"] = True
    raw_ckpt = str(tmp_path / "raw" / "model_final.pt")
    os.makedirs(os.path.dirname(raw_ckpt))
    torch.save(ckpt, raw_ckpt)
    seen = []

    class Recording(CocoDataset):
        def __init__(self, *args, exif=True, **kwargs):
            seen.append(exif)
            super().__init__(*args, exif=exif, **kwargs)

    monkeypatch.setattr(evaluate, "CocoDataset", Recording)
    for path, flags, exif in ((tiny_ckpt, [], True), (tiny_ckpt, ["--raw-orientation"], False),
                              (raw_ckpt, [], False), (raw_ckpt, ["--no-raw-orientation"], True)):
        run_main(["--ckpt", path, "--output", str(tmp_path / "eval"), "--workers", "0", "--max-images", "1", *flags], capsys)
        assert seen.pop() is exif, (path, flags)


def test_more_workers_than_cpus_are_lowered_with_a_note(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "available_cpus", lambda: 1)
    args = ["--ckpt", tiny_ckpt, "--output", str(tmp_path / "eval"), "--max-images", "1"]
    _, printed = run_main([*args, "--workers", "3"], capsys)
    assert "note: --workers 3 lowered to 1, the CPUs available here\n" in printed.out
    _, printed = run_main([*args, "--workers", "1"], capsys)
    assert "lowered" not in printed.out


def test_cli_subset_scales_and_flip(tiny_ckpt, tmp_path, capsys):
    out = str(tmp_path / "eval")
    metrics, _ = run_main(["--ckpt", tiny_ckpt, "--output", out, "--workers", "0", "--max-images", "2",
                           "--test-scales", "48", "64", "--flip"], capsys)
    assert metrics["images"] == 2 and metrics["scales"] == [48, 64]
    assert metrics["max_sizes"] == [48, 64]  # the trained 64 / 64, scaled with each scale
    with open(os.path.join(out, "detections.json")) as f:
        assert {r["image_id"] for r in json.load(f)} == {100, 107}
    metrics, _ = run_main(["--ckpt", tiny_ckpt, "--output", out, "--workers", "0", "--max-images", "1",
                           "--min-size", "32"], capsys)
    assert metrics["scales"] == [32] and metrics["max_sizes"] == [32]  # the cap follows --min-size
    counts = []
    for thresh in ("0.05", "0.6"):
        run_main(["--ckpt", tiny_ckpt, "--output", out, "--workers", "0", "--max-images", "2",
                  "--score-thresh", thresh], capsys)
        with open(os.path.join(out, "detections.json")) as f:
            detections = json.load(f)
        assert min(r["score"] for r in detections) > float(thresh)
        assert {r["category_id"] for r in detections} <= {c["id"] for c in CATEGORIES}
        counts.append(len(detections))
    assert counts[0] > counts[1] > 0


def test_multi_scale_caps_are_the_authors():
    """Trained at 800 / 1333, the paper's six test scales get the caps of the authors' test."""
    caps = [evaluate.longer_side_cap(s, 800, 1333) for s in (480, 640, 800, 960, 1120, 1280)]
    assert caps == [800, 1067, 1333, 1600, 1867, 2133]
    assert evaluate.longer_side_cap(256, 192, 288) == 384  # the quickstart's test


def test_cli_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: checkpoint not found") and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", os.devnull])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: --ckpt {os.devnull} is not a file: give its model_final.pt or last.pt\n"

    ckpt = torch.load(tiny_ckpt, weights_only=False)
    ckpt["categories"] = [{"id": 1, "name": "square"}, {"id": 2, "name": "needle"}, {"id": 3, "name": "blob"}]
    other = str(tmp_path / "other.pt")
    torch.save(ckpt, other)
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", other, "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "categories the model was not trained on (3:square, 17:needle, 42:blob)" in err \
        and err.count("\n") == 1

    # checkpoints of another version of train.py, or of another program
    for broken in ({"model_config": {**ckpt["model_config"], "new_option": 1}}, {"model_config": None},
                   {"model": None}, {"config": [1, 2]}, {"categories": ["square", "needle"]},
                   {"categories": ckpt["categories"][:2]}, {"loss_config": {**ckpt["loss_config"], "old_knob": 1}},
                   {"loss_config": "x"}):
        torch.save({**ckpt, **broken}, other)
        with pytest.raises(SystemExit) as e:
            evaluate_on_cpu(["--ckpt", other, "--output", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {other}") and err.count("\n") == 1, (broken, err)

    # weights that are not finite (a diverged run's): refused, not scored (COCOeval matches a NaN box)
    torch.save({**ckpt, "model": {**ckpt["model"], "box_head.8.bias": torch.full_like(ckpt["model"]["box_head.8.bias"], math.nan)}},
               other)
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", other, "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: {other} holds weights that are not finite (NaN or inf), in "
                                         f"box_head.8.bias: the weights of a diverged run?\n"), err

    damaged = bytearray(open(tiny_ckpt, "rb").read())  # a byte changed in its middle, where torch.load would not notice
    damaged[len(damaged) // 2] ^= 0xFF
    with open(other, "wb") as f:
        f.write(damaged)
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", other, "--output", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: cannot read checkpoint {other}: ValueError: its part ") \
        and err.endswith(" does not match its checksum: the file is damaged\n"), err
    # cut short: torch.load's own errors, over two lines or on into a paragraph of advice, in one short line
    for size, reason in ((1, "UnpicklingError: A load persistent id instruction was encountered, but no "
                             "persistent_load function was specified.\n"),
                         (len(damaged) // 2, "RuntimeError: PytorchStreamReader failed reading zip archive: failed "
                                             "finding central directory\n")):
        with open(other, "wb") as f:
            f.write(open(tiny_ckpt, "rb").read()[:size])
        with pytest.raises(SystemExit) as e:
            evaluate_on_cpu(["--ckpt", other, "--output", str(tmp_path / "x")])
        assert e.value.code == 2 and capsys.readouterr().err == f"error: cannot read checkpoint {other}: {reason}"

    for argv, culprit in ((["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "x"], "--batch-size: invalid int"),
                          (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                          (["--vis-score", "nan"], "--vis-score nan: must be in [0, 1]"),
                          (["--min-size", "100", "--max-size", "50"], "--min-size 100: above --max-size 50"),
                          (["--test-scales", "40", "60", "--max-size", "50"], "--test-scales 40 60: above --max-size 50"),
                          (["--max-size", "32"], "--max-size 32: below the shorter side 64 (the checkpoint's;")):
        with pytest.raises(SystemExit) as e:
            evaluate_on_cpu(["--ckpt", tiny_ckpt, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and culprit in err and err.count("\n") == 1, err  # no usage block

    (tmp_path / "afile").write_text("")
    afile, below = tmp_path / "afile", tmp_path / "afile" / "sub"
    read_only = [("/sys/kernel", "error: --output /sys/kernel: cannot write there")] if os.path.ismount("/sys") else []
    for output, said in ((afile, f"error: --output {afile} is a file, not a directory"),
                         (below, f"error: --output {below}: cannot write there"), *read_only):  # sysfs: even for root
        with pytest.raises(SystemExit) as e:
            evaluate_on_cpu(["--ckpt", tiny_ckpt, "--output", str(output), "--workers", "0", "--max-images", "1"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(said) and err.count("\n") == 1, err
    # a file where the pictures go: said before the first detection, not once the metrics are computed
    os.makedirs(tmp_path / "blocked")
    (tmp_path / "blocked" / "pictures").write_text("")
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", tiny_ckpt, "--output", str(tmp_path / "blocked"), "--workers", "0", "--visualize", "1"])
    err = capsys.readouterr()
    assert e.value.code == 2 and err.err.startswith(f"error: --output {tmp_path / 'blocked'}: cannot make the folder ") \
        and err.err.count("\n") == 1 and "evaluating" not in err.out, err


def test_detections_that_are_not_finite_stop_the_evaluation(tiny_ckpt, dataset, tmp_path, capsys, monkeypatch):
    """Finite weights whose detections overflow (NaN or inf boxes): one line naming the image, and
    no detections.json (json would hold NaN, and COCOeval counts a NaN box as a match)."""
    real = RetinaNet.detect

    def nan_boxes(self, *args, **kwargs):
        dets = real(self, *args, **kwargs)
        return [{**d, "boxes": d["boxes"] * math.nan} if k == 1 else d for k, d in enumerate(dets)]

    monkeypatch.setattr(RetinaNet, "detect", nan_boxes)
    with pytest.raises(SystemExit) as e:
        evaluate_on_cpu(["--ckpt", tiny_ckpt, "--output", str(tmp_path / "e"), "--workers", "0", "--score-thresh", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {tiny_ckpt}: the network's detections on image id ") \
        and err.endswith(" are not finite (NaN or inf)\n"), err
    assert not os.path.exists(tmp_path / "e" / "detections.json")


def test_objects_of_zero_width_or_height_get_a_note(tiny_data, tmp_path, capsys):
    """COCOeval gives a box of zero width or height IoU 0 with anything: such an object is always
    missed. The evaluation says so, naming its annotation id, for the images it evaluates only."""
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)
    path = os.path.join(data, "annotations", "instances_val2017.json")
    with open(path) as f:
        coco = json.load(f)
    coco["annotations"][1]["bbox"][3] = 0
    last_image = coco["images"][-1]["id"]
    assert coco["annotations"][1]["image_id"] == coco["images"][1]["id"] != last_image
    next(a for a in coco["annotations"] if a["image_id"] == last_image)["bbox"][2] = 0  # not evaluated below
    with open(path, "w") as f:
        json.dump(coco, f)
    ckpt = save_tiny_ckpt(data, str(tmp_path / "model_final.pt"))
    _, out = run_main(["--ckpt", ckpt, "--workers", "0", "--max-images", "2"], capsys)
    assert (f"note: 1 object(s) of {path} have a box of zero width or height (annotation ids "
            f"{coco['annotations'][1]['id']}): COCOeval can never match them") in out.out, out.out


def test_a_bad_image_met_by_a_worker_stops_the_evaluation_and_its_workers(tiny_data, tiny_ckpt, tmp_path, capsys):
    """An image that fails at decode in a DataLoader worker: one line, status 2, and the workers
    end with the evaluation."""
    expected = assert_a_bad_image_stops_it_and_its_workers(
        evaluate_on_cpu, ["--ckpt", tiny_ckpt, "--output", str(tmp_path / "eval")], tiny_data, "val2017", train=False)
    assert capsys.readouterr().err == expected


def test_each_checkpoint_gets_its_own_default_folder(tiny_ckpt, tmp_path, capsys):
    """last.pt and model_final.pt of one run, evaluated with the defaults, write to eval_last_<split>
    and eval_<split>: neither replaces the other's results."""
    import shutil
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_final.pt", "last.pt"):
        shutil.copy(tiny_ckpt, run / name)
        run_main(["--ckpt", str(run / name), "--workers", "0", "--max-images", "1"], capsys)
    for folder in ("eval_val2017", "eval_last_val2017"):
        with open(run / folder / "metrics.json") as f:
            assert json.load(f)["ckpt"].endswith("last.pt" if "last" in folder else "model_final.pt")


def test_a_split_with_some_of_the_models_categories(tiny_ckpt, tiny_data, dataset, tmp_path, capsys, monkeypatch):
    """A validation file that lists only some of the categories the model was trained on (here
    only "square") is evaluated in the model's labels, over the categories it holds: the known
    detector's shifted blob boxes no longer count, so AP is 100, and Fig. 5 leaves out "needle";
    only that category is detected, so the others take none of an image's 100 places (RetinaNet.detect's
    `classes`, whose own test is in test_model.py). A category the model does not know, listed
    without annotations, changes nothing but a note. The results go beside the checkpoint, in a folder
    named after this dataset, not the checkpoint's own dataset's."""
    subset = str(tmp_path / "subset")
    shutil.copytree(tiny_data, subset)
    path = os.path.join(subset, "annotations", "instances_val2017.json")
    with open(path) as f:
        d = json.load(f)
    d["categories"] = [c for c in d["categories"] if c["name"] == "square"] + [{"id": 99, "name": "kite"}]
    d["annotations"] = [a for a in d["annotations"] if a["category_id"] == 3]
    with open(path, "w") as f:
        json.dump(d, f)
    monkeypatch.setattr(RetinaNet, "detect", known_detect(dataset))
    metrics, printed = run_main(["--ckpt", tiny_ckpt, "--data", subset, "--workers", "0", "--breakdown"], capsys)
    out = os.path.join(os.path.dirname(tiny_ckpt), "eval_subset_val2017")  # not the trained dataset's eval_val2017
    assert metrics["coco"]["AP"] == pytest.approx(100.0)
    assert metrics["breakdown"]["square"] == {"square": pytest.approx(100.0)} and metrics["breakdown"]["slender"] == {}
    assert "note: " in printed.out and "without any annotation (99:kite): they do not count in AP" in printed.out
    assert ": 6 images, 1 of the model's 3 classes (only those detected), " in printed.out  # what AP averages over
    with open(os.path.join(out, "detections.json")) as f:
        assert {r["category_id"] for r in json.load(f)} == {3}


def test_interrupted_evaluation_leaves_no_mismatched_results(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C in COCO's evaluation: detections.json is this run's, whole, and the metrics.json of the
    previous run's detections is gone with them; a complete run writes both again. SIGTERM stops it
    the same way, with its own line and status."""
    out = str(tmp_path / "eval")
    args = ["--ckpt", tiny_ckpt, "--output", out, "--workers", "0"]
    run_main([*args, "--max-images", "2"], capsys)
    real = evaluate.coco_evaluate

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)

    monkeypatch.setattr(evaluate, "coco_evaluate", terminated)
    with pytest.raises(SystemExit) as e:
        run_main([*args, "--max-images", "2"], capsys)
    assert e.value.code == 143 and capsys.readouterr().err == "terminated\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as main() found it

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "coco_evaluate", interrupted)
    with pytest.raises(SystemExit) as e:
        run_main([*args, "--max-images", "3"], capsys)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with open(os.path.join(out, "detections.json")) as f:
        assert {r["image_id"] for r in json.load(f)} == {100, 107, 114}
    assert sorted(os.listdir(out)) == [".lock", "detections.json"]
    monkeypatch.setattr(evaluate, "coco_evaluate", real)
    metrics, _ = run_main([*args, "--max-images", "3"], capsys)
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["images"] == metrics["images"] == 3


def test_a_stop_while_pictures_are_drawn_leaves_none_cut_short(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C in the middle of a picture's PNG encoding (here: PIL has written half of it): the
    pictures written before it are whole and that one is not there at all; the next evaluation
    in the folder also removes what a kill -9 during a write would leave (a temporary file)."""
    out = tmp_path / "eval"
    real_save = Image.Image.save
    saved = []

    def save_half_then_interrupt(img, fp, *args, **kwargs):
        if len(saved) < 1:
            saved.append(fp)
            return real_save(img, fp, *args, **kwargs)
        whole = io.BytesIO()
        real_save(img, whole, format="PNG")
        if isinstance(fp, (str, os.PathLike)):
            with open(fp, "wb") as f:
                f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        else:
            fp.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_half_then_interrupt)
    args = ["--ckpt", tiny_ckpt, "--output", str(out), "--workers", "0", "--max-images", "3"]
    with pytest.raises(SystemExit) as e:
        run_main([*args, "--visualize", "3"], capsys)
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    pictures = os.listdir(out / "pictures")
    assert len(pictures) == 1
    with Image.open(out / "pictures" / pictures[0]) as img:
        img.load()  # whole
    monkeypatch.setattr(Image.Image, "save", real_save)
    (out / "pictures" / "5.png.tmp").write_bytes(b"\x89PNG")  # what a kill -9 in write_atomic leaves
    (out / "pictures" / "notes.txt").write_text("the user's")
    run_main(args, capsys)
    assert os.listdir(out / "pictures") == ["notes.txt"]  # the pictures gone, the folder kept for the other file


def test_only_what_an_evaluation_drew_is_removed_from_its_folder(tiny_ckpt, tmp_path, capsys):
    """An --output folder that holds a user's own pictures of the names evaluate.py draws: they
    stay. What an evaluation drew there is listed as it is drawn, and the next evaluation removes
    those files only; a list edited to name other files removes nothing else."""
    out = tmp_path / "eval"
    (out / "pictures").mkdir(parents=True)
    own = [out / "pictures" / "holiday.png", out / "ap_by_shape.png", out / "matching" / "matching_1_0.png"]
    (out / "matching").mkdir()
    for file in own:
        file.write_bytes(b"\x89PNG the user's")
    args = ["--ckpt", tiny_ckpt, "--output", str(out), "--workers", "0", "--max-images", "2"]
    run_main([*args, "--visualize", "2"], capsys)
    drawn = (out / evaluate.DRAWN).read_text().splitlines()
    assert sorted(drawn) == sorted(f"pictures/{p}" for p in os.listdir(out / "pictures") if p != "holiday.png")
    assert len(drawn) == 2 and all((out / name).is_file() for name in drawn)
    assert all(file.read_bytes() == b"\x89PNG the user's" for file in own)

    (tmp_path / "elsewhere.png").write_bytes(b"\x89PNG")
    with open(out / evaluate.DRAWN, "a") as f:
        f.write("../elsewhere.png\npictures/../../elsewhere.png\ndetections.json\nmetrics.json\n")
    run_main(args, capsys)  # no pictures this time: those drawn before go, nothing else
    assert sorted(p.name for p in (out / "pictures").iterdir()) == ["holiday.png"]
    assert all(file.read_bytes() == b"\x89PNG the user's" for file in own)
    assert (tmp_path / "elsewhere.png").exists() and (out / "detections.json").exists() and (out / "metrics.json").exists()
    assert not (out / evaluate.DRAWN).exists()


def test_a_folder_another_evaluation_writes_to_is_refused(tiny_ckpt, tmp_path, capsys):
    """Two evaluations in one --output would leave a metrics.json beside the other's detections:
    the second is refused in one line while the first holds the folder, and nothing there is
    touched; the first one's end frees it."""
    out = tmp_path / "eval"
    args = ["--ckpt", tiny_ckpt, "--output", str(out), "--workers", "0", "--max-images", "2"]
    run_main(args, capsys)
    before = {name: (out / name).read_bytes() for name in ("detections.json", "metrics.json")}
    with lock_held_elsewhere(out):
        with pytest.raises(SystemExit) as e:
            run_main([*args, "--max-images", "1"], capsys)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: {out} is in use by another run of train.py or evaluate.py (after "
                                       f"kill -9 on torchrun its workers go on): stop it, or use another --output\n")
    assert {name: (out / name).read_bytes() for name in before} == before
    metrics, _ = run_main([*args, "--max-images", "1"], capsys)
    assert metrics["images"] == 1


def test_a_stop_while_metrics_json_is_written_says_the_evaluation_completed(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM (or Ctrl-C) that lands while the last file is written: the write
    completes, the results line is printed, and the stop line says nothing was lost."""
    out = str(tmp_path / "eval")
    real_replace = os.replace

    def stopped_replace(src, dst):
        if str(dst).endswith("metrics.json"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped_replace)
    with pytest.raises(SystemExit) as e:
        run_main(["--ckpt", tiny_ckpt, "--output", out, "--workers", "0", "--max-images", "2"], capsys)
    monkeypatch.setattr(os, "replace", real_replace)
    said = capsys.readouterr()
    assert e.value.code == 143 and said.err == "terminated after the evaluation completed\n", said.err
    assert said.out.strip().splitlines()[-1].startswith(f"results in {out} (2 images in ")
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["images"] == 2


def test_batches_images_of_one_shape_and_writes_results_in_dataset_order(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A batch is padded to its largest height and width: landscape and portrait images that
    alternate in the file are batched by aspect ratio, so the network never sees a batch padded
    beyond its own images, and the results still come out in the dataset's order."""
    root = tmp_path / "mixed"
    os.makedirs(root / "annotations")
    os.makedirs(root / "val2017")
    images, annotations = [], []
    for n in range(8):
        w, h = (64, 32) if n % 2 == 0 else (32, 64)  # model scale 64: kept as they are, padded to 32
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "val2017" / f"{n}.png")
        images.append({"id": 50 - n, "file_name": f"{n}.png", "width": w, "height": h})
        annotations.append({"id": n + 1, "image_id": 50 - n, "category_id": 3, "bbox": [4, 4, 20, 20],
                            "area": 400, "iscrowd": 0})
    with open(root / "annotations" / "instances_val2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    shapes, real_predict = [], RetinaNet._predict

    def recording_predict(self, batch):
        shapes.append(tuple(batch.shape))
        return real_predict(self, batch)

    monkeypatch.setattr(RetinaNet, "_predict", recording_predict)
    out = str(tmp_path / "eval")
    run_main(["--ckpt", tiny_ckpt, "--data", str(root), "--split", "val2017", "--batch-size", "2", "--workers", "0",
              "--device", "cpu", "--output", out], capsys)
    assert sorted(shapes) == [(2, 3, 32, 64)] * 2 + [(2, 3, 64, 32)] * 2  # index order: 4 batches of 64x64
    with open(os.path.join(out, "detections.json")) as f:
        ids = [r["image_id"] for r in json.load(f)]
    assert ids and ids == sorted(ids, reverse=True)  # image ids 50, 49, ..., as in the file


def test_nms_recall_copies_to_the_host_once_per_batch(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """--nms-recall comes from the forward pass of the detections, and per batch its five best IoUs
    of every object (before and after NMS, of its class and of any, and among the detections
    output) reach the host in one copy, beside the detections' three (on a GPU each copy waits for
    the device): 2 batches of 3 and 2 images, 8 copies."""
    copies = []
    real = evaluate.batch_to_host
    monkeypatch.setattr(evaluate, "batch_to_host", lambda tensors: copies.append(len(tensors)) or real(tensors))
    metrics, _ = run_main(["--ckpt", tiny_ckpt, "--workers", "0", "--max-images", "5", "--batch-size", "3",
                           "--min-size", "160", "--max-size", "160", "--nms-recall", "--output", str(tmp_path / "e")],
                          capsys)
    assert copies == [3, 3, 3, 3, 2, 2, 2, 2]
    assert metrics["nms_recall"]["objects"] > 0


@pytest.mark.slow
def test_two_processes_match_one(tiny_ckpt, tmp_path, capsys):
    """Images sharded over 2 gloo processes (the environment torchrun sets up) and gathered on
    rank 0: the same results as 1 process. Each image is the very same computation in both runs
    (CPU, one image per batch, and the thread count evaluate.py gives each of 2 CPU processes), so
    the detection lists must match one for one; with another thread count, a near-tie in NMS
    could legitimately flip. The output folder of the 2 processes is named in bytes that are not
    UTF-8, and their stdout is strict UTF-8 (an en_US.UTF-8 locale): the paths they print come out
    as their own bytes, not as an encoding error."""
    out1, out2 = str(tmp_path / "eval1"), str(tmp_path / os.fsdecode(b"eval\xe9"))
    args = ["--ckpt", tiny_ckpt, "--workers", "0", "--batch-size", "1", "--device", "cpu", "--nms-recall"]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, data.available_cpus() // 2))  # evaluate.py's rule for 2 CPU processes
    try:
        one, _ = run_main(args + ["--output", out1], capsys)
    finally:
        torch.set_num_threads(threads)
    run_two_processes([os.path.join(ROOT, "evaluate.py"), *args, "--output", out2], PYTHONIOENCODING="utf-8")
    results = []
    for out in (out1, out2):
        with open(os.path.join(out, "detections.json")) as f:
            results.append(json.load(f))
    assert [(r["image_id"], r["category_id"]) for r in results[0]] == [(r["image_id"], r["category_id"]) for r in results[1]]
    flat = [[v for r in rs for v in r["bbox"] + [r["score"]]] for rs in results]
    assert flat[0] == pytest.approx(flat[1], abs=1e-3)
    with open(os.path.join(out2, "metrics.json")) as f:
        two = json.load(f)
    assert two["processes"] == 2 and two["images"] == one["images"]
    assert [two["coco"][k] for k in evaluate.COCO_STATS] == pytest.approx([one["coco"][k] for k in evaluate.COCO_STATS])
    for key in ("recall_before", "recall_after", "NR_tau"):
        assert two["nms_recall"][key] == pytest.approx(one["nms_recall"][key])


# ----------------------------------------------------------------------------- one forward pass for NMS recall

def test_candidates_and_detections_from_one_pass(dataset, monkeypatch):
    """--nms-recall's candidates come from the forward passes that give the detections: the
    network runs once per scale and flip, the detections are those of detect() without
    candidates, and the candidates are every pass's NMS input (detect(nms=False) of the pass)."""
    model = make_model()
    model.detections_per_img = 20  # fewer than NMS keeps here
    images = [dataset[i][0] for i in range(2)] + [torch.rand(3, 48, 80)]
    for scales, flip in (([64], False), ([48, 64], True)):
        expected = evaluate.detect(model, images, scales, scales, flip=flip)
        per_pass = [model.detect([im.flip(-1) for im in images] if f else images, nms=False, min_size=s, max_size=s)
                    for s in scales for f in ((False, True) if flip else (False,))]
        calls = {"n": 0}
        real_predict = model._predict

        def counting(*a, **k):
            calls["n"] += 1
            return real_predict(*a, **k)

        monkeypatch.setattr(model, "_predict", counting)
        dets, candidates, after_nms = evaluate.detect(model, images, scales, scales, flip=flip, candidates=True)
        monkeypatch.undo()
        assert calls["n"] == len(per_pass)
        assert model.detections_per_img == 20  # restored
        pass_flips = [f for _ in scales for f in ((False, True) if flip else (False,))]
        for b, (d, e, c, a) in enumerate(zip(dets, expected, candidates, after_nms)):
            assert len(d["boxes"]) > 0
            assert all(torch.equal(d[k], e[k]) for k in ("boxes", "scores", "labels"))
            # "after NMS" is all that NMS kept, the detections its 20 best (a cut by score, not NMS's
            # doing); with several passes, NMS ran once over all their candidates
            assert len(a["boxes"]) > 20
            assert all(torch.equal(d[k], a[k][:20]) for k in ("boxes", "scores", "labels"))
            # the candidates are each pass's NMS input, mapped back to the unflipped image
            inputs = [{**p[b], "boxes": evaluate.flip_boxes(p[b]["boxes"], images[b].shape[-1]) if f else p[b]["boxes"]}
                      for p, f in zip(per_pass, pass_flips)]
            assert all(torch.equal(c[k], torch.cat([x[k] for x in inputs])) for k in ("boxes", "scores", "labels"))
            d_rows, c_rows = (torch.cat((x["boxes"], x["scores"][:, None], x["labels"][:, None].float()), 1) for x in (d, c))
            assert (d_rows[:, None] == c_rows[None]).all(-1).any(1).all()  # every detection is a candidate
    assert evaluate.detect(model, [], [64], [64], candidates=True) == ([], [], []) and evaluate.detect(model, [], [64], [64]) == []
    # some of the classes (a split that lists some of the model's categories): in every pass
    for scales, flip in (([64], False), ([48, 64], True)):
        for found in evaluate.detect(model, images, scales, scales, flip=flip, candidates=True, classes=[1]):
            assert all(len(d["labels"]) > 0 and (d["labels"] == 1).all() for d in found)


@pytest.mark.slow
def test_compiled_evaluation_equals_eager(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """--compile (the network inside detect) against eager on CPU: the same AP and NMS recall up
    to float32 rounding, and one graph for batches of 3 and 2 images (compiled with every dimension
    dynamic, the batch of 3 shared a symbol with the 3 colour channels, and the batch of 2 compiled
    again). The "eager" backend: torch.compile's tracing and guards, without the forward tracing
    that aot_eager adds (4 s instead of 15 on 2 CPU cores; test_train's compiled training test runs
    the network through aot_eager, backward included). At 160 pixels: below 129, P7 is 1 x 1, a
    size torch.compile specialises on."""
    import functools
    from torch._dynamo.testing import CompileCounterWithBackend
    args = ["--ckpt", tiny_ckpt, "--workers", "0", "--max-images", "5", "--batch-size", "3", "--nms-recall",
            "--min-size", "160", "--max-size", "160"]
    eager, _ = run_main([*args, "--output", str(tmp_path / "eager")], capsys)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    compiled, out = run_main([*args, "--compile", "--output", str(tmp_path / "compiled")], capsys)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for batches of 3 and 2 images"
    # the first batch compiled the network: said, and in metrics.json as part of the whole time; the
    # pace after it counts the 2 images of the second batch
    assert "first batch (compilation) " in out.out
    assert compiled["compile"] and 0 < compiled["first_batch_s"] <= compiled["seconds"]
    assert not eager["compile"] and 0 < eager["first_batch_s"] <= eager["seconds"]
    for m in (eager, compiled):
        assert 1 < m["images_per_s_after_first_batch"] * (m["seconds"] - m["first_batch_s"]) < 3.5  # 2, not 5
    for name in evaluate.COCO_STATS:
        if eager["coco"][name] is None:
            assert compiled["coco"][name] is None
        else:
            assert compiled["coco"][name] == pytest.approx(eager["coco"][name], abs=1e-3)
    assert compiled["nms_recall"]["NR"] == pytest.approx(eager["nms_recall"]["NR"], abs=1e-3)


def test_shape_groups_keep_every_id_of_a_name():
    """Fig. 5's breakdown goes by category name; a dataset that gives one name to several ids has all
    of them in that name's AP (COCO's mean over categories), not only the last one listed."""
    cats = [{"id": 40, "name": "tie"}, {"id": 7, "name": "clock"}, {"id": 2, "name": "cat"}, {"id": 90, "name": "clock"},
            {"id": 5, "name": "needle"}]
    square, slender = evaluate.shape_groups(cats)
    assert square == {"clock": [7, 90]} and slender == {"tie": [40], "needle": [5]}
    assert evaluate.shape_groups([{"id": 1, "name": "cat"}]) == ({}, {})
