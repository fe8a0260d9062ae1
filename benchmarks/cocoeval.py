"""COCO AP at the scale of COCO val2017: evaluate.py's COCOeval in processes against pycocotools'
COCOeval as it is usually run, in one process.

evaluate.py's COCO AP is pycocotools' COCOeval, whose evaluate() and accumulate() are Python loops
over images and categories: at val2017's scale (5000 images, 100 detections each, 80 categories)
they take longer than the detection itself at 150 images/s. Each category is evaluated and
accumulated on its own, so evaluate.coco_evaluate runs the categories in processes forked from
the main one (from evaluate.COCO_PROCESSES_FROM detections on). This times, on synthetic
ground truth and detections of that shape (objects of 5 to 200 pixels, 1 to 14 per image, 30%
of them of the first category, as person in COCO, the rest spread over the other 79; detections:
the objects jittered, 30% with another category, and scores falling off). The categories are
evaluated one per task, the heaviest first; the first bounds the speed-up on many cores:

- `pycocotools COCOeval`: COCO.loadRes, evaluate(), accumulate(), summarize(), one process
  (the baseline of the ratios);
- `coco_evaluate + coco_summary, 1 process` and `..., N processes`: evaluate.py's, the same AP
  (checked: every number of the table equal to the baseline's).

    python benchmarks/cocoeval.py                  # 5000 images, every CPU available
    python benchmarks/cocoeval.py --images 1000 --processes 2

Prints a markdown table; never passes or fails on time.
"""

import argparse
import contextlib
import copy
import io
import os
import sys
import time

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
from data import available_cpus  # noqa: E402
from inference import cpu_name  # noqa: E402

K = 80  # COCO's categories
PERSON = 0.3  # the share of the first category's objects, as person's in COCO (30% of val2017's)
WIDTH, HEIGHT = 640, 480


def synthetic(num_images, detections, seed=0):
    """A COCO ground truth (odd image and category ids) and detections of every image -> (coco_gt,
    records as evaluate.py makes them: {"boxes", "scores", "labels"} per image, image ids, categories)."""
    g = torch.Generator().manual_seed(seed)
    categories = [{"id": 2 * k + 1, "name": f"category {k}"} for k in range(K)]
    images, annotations, records = [], [], []
    for i in range(num_images):
        image_id = 1000 + 3 * i
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id}.jpg"})
        G = int(torch.randint(1, 15, (1,), generator=g))
        wh = torch.rand(G, 2, generator=g) * 195 + 5  # [G, 2]
        xy = torch.rand(G, 2, generator=g) * (torch.tensor([WIDTH, HEIGHT]) - wh)  # [G, 2]
        labels = torch.where(torch.rand(G, generator=g) < PERSON, 0, torch.randint(1, K, (G,), generator=g))  # [G]
        for b in range(G):
            w, h = wh[b].tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": categories[labels[b]]["id"],
                                "bbox": [*xy[b].tolist(), w, h], "area": w * h, "iscrowd": 0})
        boxes = torch.cat((xy, xy + wh), dim=1)  # [G, 4]
        which = torch.randint(0, G, (detections,), generator=g)  # [D]
        found = boxes[which] + torch.randn(detections, 4, generator=g) * 0.05 * wh[which].repeat(1, 2)  # [D, 4]
        found = torch.cat((found[:, :2], torch.maximum(found[:, 2:], found[:, :2] + 1)), dim=1)  # [D, 4]
        other = torch.rand(detections, generator=g) < 0.3  # [D]
        records.append({"boxes": found, "scores": torch.rand(detections, generator=g).sort(descending=True).values,
                        "labels": torch.where(other, torch.randint(0, K, (detections,), generator=g), labels[which])})
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, records, [image["id"] for image in images], categories


def pycocotools_alone(coco_gt, results, img_ids):
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        E.params.imgIds = img_ids
        E.evaluate()
        E.accumulate()
        E.summarize()
    return [100 * float(v) if v >= 0 else None for v in E.stats]


def ours(coco_gt, results, img_ids, processes):
    stats, _ = evaluate.coco_summary(evaluate.coco_evaluate(coco_gt, results, img_ids, workers=processes))
    return [stats[name] for name in evaluate.COCO_STATS + evaluate.COCO_RECALLS]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="images (COCO val2017: 5000)")
    ap.add_argument("--detections", type=int, default=100, help="detections per image (evaluate.py keeps 100)")
    ap.add_argument("--processes", type=int, default=available_cpus(), help="processes of the last row")
    args = ap.parse_args()

    coco_gt, records, img_ids, categories = synthetic(args.images, args.detections)
    started = time.time()
    results = evaluate.to_coco_results(records, img_ids, categories)
    to_results_s = time.time() - started
    print(f"# COCO AP of {len(results):,} detections on {args.images} images ({len(coco_gt.anns):,} objects), "
          f"{K} categories\n# {cpu_name()}, {available_cpus()} CPUs available; torch {torch.__version__}\n")
    print("| method | seconds | vs pycocotools | AP | AP50 |")
    print("|---|---|---|---|---|")
    rows = [("pycocotools COCOeval (loadRes, evaluate, accumulate, summarize)", pycocotools_alone, ()),
            ("coco_evaluate + coco_summary, 1 process", ours, (1,)),
            (f"coco_evaluate + coco_summary, {args.processes} processes", ours, (args.processes,))]
    base = reference = None
    for name, fn, extra in rows:
        started = time.time()
        stats = fn(coco_gt, results, img_ids, *extra)
        seconds = time.time() - started
        base = base or seconds
        reference = reference or stats
        assert stats == reference, (name, stats, reference)  # every number of the table
        print(f"| {name} | {seconds:.1f} | {seconds / base:.2f}x | {stats[0]:.2f} | {stats[1]:.2f} |", flush=True)
    print(f"\nevaluate.to_coco_results (the detections to COCO's format, before any of them): {to_results_s:.1f} s")


if __name__ == "__main__":
    main()
