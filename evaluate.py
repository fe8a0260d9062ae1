"""Evaluate a checkpoint of train.py: COCO AP, plus the analyses that only the FreeAnchor paper
(Zhang et al., "FreeAnchor: Learning to Match Anchors for Visual Object Detection", NeurIPS 2019)
defines (§4.2-4.3: Table 1, Figs. 5-6).

- COCO AP, AP50, AP75, APS, APM, APL (the columns of Table 2) with pycocotools, on the split the
  checkpoint was trained to be validated on, or on any COCO-layout data (--data, --split).
  detections.json holds the results in COCO's format (xywh boxes, the dataset's own category and
  image ids), metrics.json every number printed. A split without annotations, such as COCO's
  test-dev (--split test-dev2017: annotations/image_info_test-dev2017.json, images in test2017/),
  gets detections.json, the file COCO's evaluation server takes, and no AP.
- --nms-recall (Table 1): NR_tau = recall after NMS / recall before NMS at IoU tau, class-aware (an
  object is recalled when a detection of its own class overlaps it by >= tau), and also as the
  authors' script counts it (a detection of any class, IoU > tau); NR is the mean over
  tau = 0.50, 0.55, ..., 0.90. "Before NMS" is exactly what RetinaNet.detect feeds to NMS, "after"
  all that NMS keeps, before the detections are cut to the 100 best of each image (a cut by score,
  not NMS's doing; the recall of those 100 is printed too); both come from the same forward pass
  (NMS runs on the candidates already computed). The objects are those training sees: boxes
  clipped to the image, those under 1 px then left out, crowd regions left out.
- --breakdown: AP of square vs slender categories (Fig. 5: clock, traffic light, sports ball vs
  toothbrush, skis, couch, tie on COCO; data.SHAPES_SQUARE vs SHAPES_SLENDER on shapes) and AP
  over images grouped by object count [0,10], [11,20], [21,30], [31,inf) (Fig. 6); tables and
  PNG bar charts; and, as Fig. 5 for every category, each category's objects, AP, AP50 and AP75.
- --test-scales S1 S2 ... and --flip: multi-scale / flipped test (the paper's FreeAnchor** row is
  the authors' multi-scale test, without flip): the candidates of every scale and flip, mapped
  back to the image, go through one class-wise NMS together.
- --visualize N: pictures of detections and ground truth; --show-matching: Fig. 4, the anchors
  of a few objects' bags coloured by their Mean-max weight (Eq. 6) under this checkpoint, beside
  the same anchors coloured by IoU, the hand-crafted criterion FreeAnchor replaces.

    python evaluate.py --ckpt runs/freeanchor_resnet50_coco/model_final.pt
    python evaluate.py --ckpt runs/<name>/model_final.pt --nms-recall --breakdown --visualize 20
    python evaluate.py --ckpt ... --test-scales 480 640 800 960 1120 1280
    torchrun --nproc_per_node=8 evaluate.py --ckpt ...     # images sharded over ranks, rank 0 reports

Speed: images are read by DataLoader workers and go through the network a batch at a time; on
CUDA the network runs in channels_last with bfloat16 autocast by default (both from compute
capability 8.0; --no-amp, --no-channels-last), and --compile runs it under torch.compile.
COCOeval, a Python loop over images and categories, runs in processes, a category at a time,
once there are many detections (the same numbers as one process).

Tests: python -m pytest tests/test_evaluate.py
"""

import collections
import contextlib
import copy
import fnmatch
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field


def _stopped_before_main(signum, frame):
    """Ctrl-C or SIGTERM before main() (torch imports for seconds): one line, printed once under
    torchrun, whose every process gets the signal, then os._exit with 128 + the signal's number.
    A SystemExit raised here, in the middle of torch's imports, can abort the process with a C++
    trace, or be swallowed by them and leave it running; nothing needs cleaning up yet. (Written
    here and in the other script, not in data.py: it is installed before anything imports torch,
    and data.py does.)"""
    if os.environ.get("RANK", "0") == "0":  # not print: a signal handler may interrupt a print
        os.write(2, b"interrupted\n" if signum == signal.SIGINT else b"terminated\n")
    os._exit(128 + signum)


if __name__ == "__main__":
    # Ctrl-C or SIGTERM while torch imports (seconds): one line, as later on, not a traceback or a
    # silent end (a signal ignored, as `cmd &` in a script leaves SIGINT, stays ignored)
    for _signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_signum) is not signal.SIG_IGN:
            signal.signal(_signum, _stopped_before_main)

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from torchvision.ops import batched_nms

import freeanchor
from data import (SHAPES_SLENDER, SHAPES_SQUARE, ArgumentParser, CocoDataset, DataError, DeferredInterrupt,
                  FORKED, HelpFormatter, ImageError, add_config_arguments, available_cpus, catch_stop_signals,
                  config_from_args, device_defaults, directory_lock, end_progress_line, error_line, in_processes,
                  init_worker, load_checkpoint_file, loader_batches, on_rank0, print_stop, progress_line,
                  remove_partial_writes, resolve_root_once, run_program, setup_processes, stop_on_failure,
                  stopped_by, usable_workers, write_atomic)
from model import RetinaNet, box_iou, flip_boxes, preprocess, resize_image

COCO_STATS = ("AP", "AP50", "AP75", "APS", "APM", "APL")  # COCOeval.stats[:6], Table 2's columns
COCO_RECALLS = ("AR1", "AR10", "AR100", "ARS", "ARM", "ARL")  # COCOeval.stats[6:], the rest of its table
NR_THRESHOLDS = tuple(round(0.50 + 0.05 * i, 2) for i in range(9))  # Table 1: IoU 0.50:0.05:0.90
COCO_SQUARE = ("clock", "traffic light", "sports ball")  # Fig. 5
COCO_SLENDER = ("toothbrush", "skis", "couch", "tie")  # Fig. 5
CROWD_GROUPS = ((0, 10), (11, 20), (21, 30), (31, None))  # Fig. 6: objects per image, inclusive
# in an --output folder: each chart and picture an evaluation drew there, one a line, which the next
# evaluation there removes (and nothing else: a user's own pictures/ of the same names stay)
DRAWN = "drawn_by_evaluate.txt"
DRAWN_NAMES = ("ap_by_shape.png", "ap_by_crowdedness.png", "pictures/*.png", "matching/matching_*.png")
MATCHING_IMAGES, MATCHING_OBJECTS = 4, 2  # --show-matching draws this many images x objects
GT_COLOR, PRED_COLOR = (0, 200, 0), (255, 40, 40)


@dataclass
class EvalConfig:
    """What an evaluation needs. `metadata["help"]` is the --help text."""
    ckpt: str = field(default=None, metadata={"help": "checkpoint of train.py (model_final.pt or last.pt); required"})
    data: str = field(default=None, metadata={
        "help": "COCO-layout root or 'shapes' (default: the checkpoint's training data)"})
    split: str = field(default=None, metadata={
        "help": "split to evaluate (default: the checkpoint's val split); one without annotations, such as COCO's "
                "test-dev2017, gets detections.json for COCO's evaluation server and no AP"})
    min_size: int = field(default=None, metadata={
        "help": "shorter image side (default: the checkpoint's, its last value if several)"})
    max_size: int = field(default=None, metadata={
        "help": "cap on the longer side (default: the checkpoint's, scaled by --min-size or each --test-scales "
                "value over the trained shorter side)"})
    score_thresh: float = field(default=0.05, metadata={
        "help": "keep detections scoring above this (paper and torchvision: 0.05)"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass (per process)"})
    workers: int = field(default=4, metadata={"help": "image reading processes per evaluating process "
                                                      "(at most the CPUs available)"})
    device: str = field(default=None, metadata={"help": "cuda, cuda:N or cpu (default: cuda when available)"})
    amp: bool = field(default=None, metadata={
        "help": "bfloat16 autocast for the network (default: on with a GPU of compute capability 8.0 or later, "
                "off on older GPUs and CPUs; where the processor has no native bfloat16, such as a V100 or a CPU "
                "without AVX512-BF16 or AMX, --amp falls back to float32, with a note)"})
    channels_last: bool = field(default=None, metadata={
        "help": "channels_last memory format for the network (default: on with a GPU of compute "
                "capability 8.0 or later, off on older GPUs and CPUs)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the network"})
    max_images: int = field(default=None, metadata={"help": "evaluate only the first N images of the split (default: all)"})
    output: str = field(default=None, metadata={
        "help": "folder for the results (default: <ckpt dir>/eval_<split> for model_final.pt, eval_<ckpt name>_<split> "
                "for another checkpoint, with the data folder's name before the split for another dataset than the "
                "checkpoint's)"})
    nms_recall: bool = field(default=False, metadata={
        "help": "NMS recall NR, NR50..NR90 (Table 1): recall after NMS (all it keeps) over recall before it, "
                "from the candidates of the same forward pass; class-aware, and as the authors' script counts "
                "(a detection of any class, IoU > tau)"})
    breakdown: bool = field(default=False, metadata={
        "help": "AP of square vs slender categories (Fig. 5) and by objects per image (Fig. 6), with charts, "
                "and each category's AP"})
    test_scales: tuple = field(default=None, metadata={
        "help": "shorter sides of a multi-scale test, e.g. 480 640 800 960 1120 1280 (FreeAnchor**) "
                "(default: one scale, --min-size)"})
    flip: bool = field(default=False, metadata={"help": "also detect on the horizontally flipped image and merge"})
    visualize: int = field(default=0, metadata={"help": "write pictures of this many images (detections and ground truth)"})
    vis_score: float = field(default=0.3, metadata={"help": "draw detections with at least this score"})
    show_matching: bool = field(default=False, metadata={
        "help": "draw Fig. 4: bag anchors of a few objects coloured by Mean-max weight vs by IoU"})
    seed: int = field(default=0, metadata={"help": "seed of the choice of pictured images"})
    raw_orientation: bool = field(default=None, metadata={
        "help": "read images as stored, ignoring their EXIF orientation tag; --no-raw-orientation: upright "
                "(default: as the checkpoint was trained, upright unless it was trained with --raw-orientation)"})
    skip_check: bool = field(default=False, metadata={"help": "skip opening every image's header first"})


def build_parser():
    parser = ArgumentParser(
        description="Evaluate a FreeAnchor / RetinaNet checkpoint: COCO AP and the paper's NR, Fig. 5, Fig. 6.",
        formatter_class=HelpFormatter)
    return add_config_arguments(parser, EvalConfig, "evaluation")


def parse_config(argv):
    """argv -> EvalConfig; bad values refused with one line (ValueError)."""
    args = vars(build_parser().parse_args(argv))
    if args["ckpt"] is None:
        raise ValueError("--ckpt is required: a checkpoint of train.py (model_final.pt or last.pt)")
    cfg = config_from_args(EvalConfig, args)
    for name in ("batch_size", "max_images", "min_size", "max_size"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if not 0 <= cfg.score_thresh < 1:
        raise ValueError(f"--score-thresh {cfg.score_thresh}: must be in [0, 1)")
    if not 0 <= cfg.vis_score <= 1:  # (also refuses nan, which would draw nothing)
        raise ValueError(f"--vis-score {cfg.vis_score}: must be in [0, 1]")
    for name in ("workers", "visualize"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} {getattr(cfg, name)}: must be >= 0")
    if cfg.test_scales is not None and any(s < 1 for s in cfg.test_scales):
        raise ValueError(f"--test-scales {' '.join(map(str, cfg.test_scales))}: sizes must be positive")
    if cfg.test_scales is not None and cfg.min_size is not None:
        raise ValueError("--min-size and --test-scales both set the shorter side: give one of them")
    scales = cfg.test_scales or ([cfg.min_size] if cfg.min_size else [])
    if cfg.max_size is not None and any(s > cfg.max_size for s in scales):
        raise ValueError(f"--{'test-scales' if cfg.test_scales else 'min-size'} {' '.join(map(str, scales))}: above "
                         f"--max-size {cfg.max_size}, the cap on the longer side")
    return device_defaults(cfg)


def load_checkpoint(path, device):
    """A checkpoint of train.py (model_final.pt or last.pt) -> (RetinaNet in eval mode on
    `device`, the checkpoint dict). A missing or foreign file is a ValueError naming it."""
    if os.path.isdir(path):
        raise ValueError(f"--ckpt {path} is a directory: give its model_final.pt or last.pt")
    if not os.path.exists(path):
        raise ValueError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):  # /dev/null, a pipe
        raise ValueError(f"--ckpt {path} is not a file: give its model_final.pt or last.pt")
    try:
        ckpt = load_checkpoint_file(path)  # checksums checked
    except Exception as e:  # whatever torch.load chokes on, the user needs the file name
        raise ValueError(f"cannot read checkpoint {path}: {error_line(e)}") from None
    missing = [k for k in ("model", "model_config", "categories") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a checkpoint of train.py (no {', '.join(missing)})")
    try:  # a checkpoint of another version of train.py, or of another program, fails here
        if not isinstance(ckpt.get("config") or {}, dict) or not all(
                isinstance(c, dict) and {"id", "name"} <= set(c) for c in ckpt["categories"]):
            raise TypeError("its config or categories are not what train.py writes")
        model = RetinaNet(**{**ckpt["model_config"], "weights": "none"})
        freeanchor.FreeAnchorConfig(**(ckpt.get("loss_config") or {}))  # for --show-matching
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{path} is not a checkpoint of this version of train.py: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: the weights do not fit its model_config ({str(e).splitlines()[0]})") from None
    if len(ckpt["categories"]) != model.num_classes:
        raise ValueError(f"{path} names {len(ckpt['categories'])} categories for a model of {model.num_classes} classes")
    bad = [name for name, w in model.state_dict().items() if w.is_floating_point() and not torch.isfinite(w).all()]
    if bad:  # train.py never writes them (it stops at a non-finite loss); its detections would be NaN
        raise ValueError(f"{path} holds weights that are not finite (NaN or inf), in {bad[0]}"
                         f"{f' and {len(bad) - 1} more tensors' if len(bad) > 1 else ''}: the weights of a diverged run?")
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- detection

def class_wise_nms(cands, nms_thresh):
    """Candidates of one image {"boxes" [N, 4], "scores" [N], "labels" [N]} -> what class-wise NMS
    at `nms_thresh` keeps, by decreasing score."""
    keep = batched_nms(cands["boxes"], cands["scores"], cands["labels"], nms_thresh)  # [N'] sorted by score
    return {k: v[keep] for k, v in cands.items()}


def detect(model, images, scales, max_sizes, flip=False, candidates=False, classes=None):
    """model.detect with test-time augmentation: every scale (shorter side scales[i], longer side
    at most max_sizes[i]), each also on the flipped image if `flip`. As in the authors'
    multi-scale test, the candidates of every pass (score threshold and per-level top-k, as each
    pass's NMS would see them), mapped back to the original image, go through one class-wise NMS
    together, and the model.detections_per_img best of an image are kept. One
    scale and no flip is exactly model.detect. candidates=True returns (detections, candidates,
    after_nms) from the same forward passes, the detections unchanged: the candidates are what
    NMS saw, after_nms all that NMS kept, before the cut to the best of an image. They are
    --nms-recall's "before" and "after": the cut by score is not NMS's doing. classes: the labels
    to detect (model.detect's; None: all)."""
    passes = [(s, m, f) for s, m in zip(scales, max_sizes) for f in ((False, True) if flip else (False,))]
    cap = model.detections_per_img
    only = {} if classes is None else {"classes": classes}
    if len(passes) == 1:
        if not candidates:
            return model.detect(images, min_size=scales[0], max_size=max_sizes[0], **only)
        try:
            model.detections_per_img = None  # all that NMS keeps; the detections are cut from it below
            kept, cands = model.detect(images, min_size=scales[0], max_size=max_sizes[0], candidates=True, **only)
        finally:
            model.detections_per_img = cap
    else:
        per_pass = []  # each pass's candidates, in the original image's pixels
        for s, m, f in passes:
            cands = model.detect([image.flip(-1) for image in images] if f else images, nms=False,
                                 min_size=s, max_size=m, **only)
            if f:
                cands = [{**d, "boxes": flip_boxes(d["boxes"], image.shape[-1])} for d, image in zip(cands, images)]
            per_pass.append(cands)
        cands = [{k: torch.cat([p[b][k] for p in per_pass]) for k in ("boxes", "scores", "labels")}
                 for b in range(len(images))]
        kept = [class_wise_nms(c, model.nms_thresh) for c in cands]
    # NMS returns its boxes by decreasing score: the first `cap` are what model.detect's cut keeps
    dets = [{k: v[:cap] for k, v in d.items()} for d in kept]
    return (dets, cands, kept) if candidates else dets


def best_iou(gt_boxes, gt_labels, boxes, labels, first=None):
    """For each object, the highest IoU of a detection of its own class, of a detection of any
    class (as the authors' script counts), and of one of its own class among the `first`
    detections (None: all), from one IoU matrix: gt [G, 4], [G]; detections [N, 4], [N] -> [G, 3]
    (0 where there is none). NMS returns its boxes by decreasing score and the detections of an
    image are the first model.detections_per_img of them, so one matrix with what NMS kept gives
    --nms-recall's "after" and the detections' recall both."""
    G = len(gt_boxes)
    if G == 0 or len(boxes) == 0:
        return gt_boxes.new_zeros(G, 3)  # [G, 3]
    iou = box_iou(gt_boxes.float(), boxes.float())  # [G, N]
    own = torch.where(gt_labels[:, None] == labels[None, :], iou, 0.0)  # [G, N]  detections of the object's class
    among_first = own[:, :first].amax(dim=1) if first != 0 else own.new_zeros(G)  # [G]
    return torch.stack((own.amax(dim=1), iou.amax(dim=1), among_first), dim=1)  # [G, 3]


def nms_recall(best_before, best_after, best_output=None, thresholds=NR_THRESHOLDS, strict=False):
    """NMS recall (Table 1) from per-object best IoUs before and after NMS (lists of [G_i], see
    best_iou). Returns percentages keyed by tau as "0.50": recall_before, recall_after, NR_tau =
    after / before, and "NR", the mean of NR_tau over thresholds (None where nothing is recalled
    before NMS); with best_output (of the detections, cut to the best 100 after NMS) also
    recall_output, the recall of the detections as output. An object is recalled at tau by an IoU
    >= tau (strict: > tau, as the authors' script counts)."""
    above = torch.gt if strict else torch.ge

    def recalled(best, tau):  # objects recalled at tau
        return above(best, tau).sum().item()

    def joined(best):  # [sum G]
        return torch.cat([b.float().cpu() for b in best]) if best else torch.zeros(0)

    before, after = joined(best_before), joined(best_after)  # [sum G] each
    output = None if best_output is None else joined(best_output)  # [sum G]
    objects = len(before)
    num_objects = max(objects, 1)
    out = {"objects": objects, "recall_before": {}, "recall_after": {}, "NR_tau": {}}
    if output is not None:
        out["recall_output"] = {}
    for tau in thresholds:
        key = f"{tau:.2f}"  # "0.50": the same keys in memory and in metrics.json
        r_before = recalled(before, tau) / num_objects
        r_after = recalled(after, tau) / num_objects
        out["recall_before"][key] = 100 * r_before if objects else None  # no object: n/a, not 0
        out["recall_after"][key] = 100 * r_after if objects else None
        if output is not None:
            out["recall_output"][key] = 100 * recalled(output, tau) / num_objects if objects else None
        out["NR_tau"][key] = 100 * r_after / r_before if r_before > 0 else None
    ratios = list(out["NR_tau"].values())
    out["NR"] = None if None in ratios else sum(ratios) / len(ratios)
    return out


def to_coco_results(dets, image_ids, categories):
    """Detections (labels 0..K-1) of the images `image_ids` -> COCO results: [{"image_id",
    "category_id" (the dataset's own id, categories[label]["id"]), "bbox" [x, y, w, h], "score"}]."""
    results = []
    for d, image_id in zip(dets, image_ids):
        boxes = d["boxes"].float().cpu()  # [N, 4]
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).tolist()  # [N, 4]
        for bbox, score, label in zip(xywh, d["scores"].float().tolist(), d["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": categories[label]["id"],
                            "bbox": [round(v, 3) for v in bbox], "score": round(score, 6)})
    return results


# ----------------------------------------------------------------------------- COCO metrics

# COCOeval evaluates and accumulates each category on its own, in Python: about 8 ms per image of
# COCO (100 detections each) on one core, 40 s for val2017. From this many detections it runs in
# processes, a category at a time (fewer: forking them costs more than it saves).
COCO_PROCESSES_FROM = 20_000


def _evaluate_category(k):
    """COCOeval's evaluate() of the k-th category of the forked evaluation, on its detections alone,
    then accumulate() on each image group -> one (precision, recall, scores) per group, with K = 1
    (None for a group without images)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt, params, groups = FORKED["coco_gt"], FORKED["params"], FORKED["groups"]
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": FORKED["detections"][k]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco_dt.createIndex()
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.params = copy.deepcopy(params)
        E.params.catIds = [params.catIds[k]]
        E.evaluate()
        I, A = len(E.params.imgIds), len(E.params.areaRng)
        arrays = []
        for keep_i in groups:
            if not keep_i:
                arrays.append(None)
                continue
            sub = copy.copy(E)  # E restricted to the images at positions keep_i
            sub.params = copy.deepcopy(E.params)
            sub.params.imgIds = [E.params.imgIds[n] for n in keep_i]
            sub._paramsEval = copy.deepcopy(sub.params)
            # evalImgs is laid out [category][area range][image] (COCOeval.evaluate), here one
            # category; passing the subset to accumulate() as its parameter would index it wrongly
            sub.evalImgs = [E.evalImgs[a * I + i] for a in range(A) for i in keep_i]
            sub.accumulate()
            arrays.append((sub.eval["precision"], sub.eval["recall"], sub.eval["scores"]))
    return arrays


def coco_evaluate(coco_gt, results, img_ids, image_groups=None, workers=None, show_progress=False):
    """COCOeval (bbox) of COCO `results` on the images `img_ids` of `coco_gt`: evaluate() and
    accumulate(), on all the images and on each of image_groups ({name: image ids}, for
    coco_summary(group=name); ids outside img_ids are left out). An empty `results` is fine.
    Returns {"params": COCOeval's parameters, "arrays": {None or name: (precision [T, R, K, A, M],
    recall [T, K, A, M], scores [T, R, K, A, M]) or None without images}}, K the categories.
    Each category is evaluated and accumulated on its own, on its own detections, so that in
    `workers` processes (None: every CPU available from COCO_PROCESSES_FROM detections on, else 1)
    the arrays are those of one process, bit for bit. The categories with the most work go first
    (on COCO, person holds a third of the objects and more of the work: it bounds the speed-up)."""
    from pycocotools.cocoeval import COCOeval

    if workers is None:
        workers = available_cpus() if len(results) >= COCO_PROCESSES_FROM else 1
    p = COCOeval(coco_gt, iouType="bbox").params  # as evaluate() sets them: sorted, without repeats
    p.imgIds, p.catIds, p.maxDets = sorted(set(img_ids)), sorted(set(p.catIds)), sorted(p.maxDets)
    # COCO.loadRes would make the same annotations, but fails on an empty list and edits `results`
    # in place; each category's go to its own list, in their order
    category = {k: n for n, k in enumerate(p.catIds)}
    detections = [[] for _ in p.catIds]
    for i, r in enumerate(results):
        if r["category_id"] in category:  # (COCOeval leaves out a category the ground truth lacks)
            detections[category[r["category_id"]]].append(
                {**r, "id": i + 1, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0})
    # the work of a category: about its detections times its objects, image by image
    counts = collections.Counter((a["image_id"], a["category_id"]) for a in coco_gt.dataset["annotations"])
    work = [sum(d * (counts[image, k] + 1) for image, d in collections.Counter(r["image_id"] for r in found).items())
            for k, found in zip(p.catIds, detections)]
    order = sorted(range(len(p.catIds)), key=lambda n: -work[n])
    position = {i: n for n, i in enumerate(p.imgIds)}
    names = [None, *(image_groups or {})]
    groups = [list(range(len(p.imgIds)))] + [sorted({position[i] for i in ids if i in position})
                                             for ids in (image_groups or {}).values()]
    what, start = f"COCOeval in {workers} process{'es' if workers > 1 else ''}, categories", time.time()
    done = in_processes(_evaluate_category, order, workers,
                        {"coco_gt": coco_gt, "params": p, "groups": groups, "detections": detections},
                        (lambda n, count: progress_line(what, count, len(order), start)) if show_progress else None)
    if show_progress:
        end_progress_line(f" done in {time.time() - start:.1f} s")
    parts = [None] * len(p.catIds)
    for n, part in zip(order, done):
        parts[n] = part
    arrays = {}
    for g, name in enumerate(names):  # the categories' arrays joined along K
        if groups[g]:
            arrays[name] = tuple(np.concatenate([part[g][j] for part in parts], axis=2 if j != 1 else 1)
                                 for j in range(3))
        else:
            arrays[name] = None
    return {"params": p, "arrays": arrays}


def coco_summary(evaluation, group=None, cat_ids=None):
    """COCO AP table of coco_evaluate's evaluation, on the image group `group` (None: all the images)
    and the categories `cat_ids` (None: all), without evaluating again: each category's arrays are
    its own, so this equals a COCOeval run with params.imgIds / catIds set to the subset. Returns
    ({name: % or None where there is no ground truth, for the names of COCO_STATS and COCO_RECALLS:
    every number of the table}, pycocotools' printed table)."""
    from pycocotools.cocoeval import COCOeval

    p, arrays = evaluation["params"], evaluation["arrays"][group]
    keep_k = [n for n, k in enumerate(p.catIds) if cat_ids is None or k in cat_ids]
    if arrays is None or not keep_k:
        return {name: None for name in COCO_STATS + COCO_RECALLS}, ""
    precision, recall, scores = arrays[0][:, :, keep_k], arrays[1][:, keep_k], arrays[2][:, :, keep_k]
    sub = COCOeval(iouType="bbox")  # summarize() reads only eval and the parameters
    sub.params = copy.deepcopy(p)
    sub.params.catIds = [p.catIds[n] for n in keep_k]
    sub.eval = {"params": sub.params, "counts": list(precision.shape), "precision": precision, "recall": recall,
                "scores": scores}
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        sub.summarize()
    stats = {name: (100 * float(v) if v >= 0 else None) for name, v in zip(COCO_STATS + COCO_RECALLS, sub.stats)}
    return stats, table.getvalue()


def shape_groups(categories):
    """Fig. 5's categories present in the dataset, by name: (square, slender) dicts of name -> the ids
    of the categories of that name (a dataset may give one name to several ids: their AP is then
    the mean over them, as COCO's summary averages over categories)."""
    ids = {}
    for c in categories:
        ids.setdefault(c["name"], []).append(c["id"])
    square = {n: ids[n] for n in COCO_SQUARE + tuple(SHAPES_SQUARE) if n in ids}
    slender = {n: ids[n] for n in COCO_SLENDER + tuple(SHAPES_SLENDER) if n in ids}
    return square, slender


def crowd_groups(coco_gt, img_ids):
    """Fig. 6: the images of `img_ids` grouped by their number of (non-crowd) objects ->
    [(label "0-10", image ids)] in CROWD_GROUPS order."""
    counts = {i: sum(1 for a in coco_gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)) for i in img_ids}
    groups = []
    for lo, hi in CROWD_GROUPS:
        label = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        groups.append((label, [i for i, c in counts.items() if c >= lo and (hi is None or c <= hi)]))
    return groups


# ----------------------------------------------------------------------------- pictures (PIL only)

def _fmt(v):
    return "n/a" if v is None else f"{v:.1f}"


def bar_chart(output, name, title, labels, values, colors, xlabel, ylabel="AP (%)", legend=()):
    """A PNG bar chart `name` in the folder `output` (save_png): one bar per label with its value
    written on top (None = no data: 'n/a'). legend: [(text, colour)] drawn under the title."""
    font = ImageFont.load_default()
    slot, plot_h, left, top, bottom = 100, 240, 70, 40 + 14 * len(legend), 64
    W, H = left + slot * len(labels) + 20, top + plot_h + bottom
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black", font=font)
    for n, (text, color) in enumerate(legend):
        y = 26 + 14 * n
        d.rectangle((left, y, left + 10, y + 10), fill=color)
        d.text((left + 16, y - 1), text, fill="black", font=font)
    known = [v for v in values if v is not None]
    y_max = min(100.0, max(10.0, math.ceil(max(known, default=0) * 1.15 / 10) * 10))
    base = top + plot_h
    for k in range(6):  # y ticks and grid
        v = y_max * k / 5
        y = base - plot_h * k / 5
        d.line((left - 4, y, W - 10, y), fill=(225, 225, 225) if k else "black")
        d.text((left - 8 - d.textlength(f"{v:g}", font=font), y - 6), f"{v:g}", fill="black", font=font)
    d.line((left, top, left, base), fill="black")
    for n, (label, value, color) in enumerate(zip(labels, values, colors)):
        x0 = left + slot * n + 20
        if value is not None:
            y = base - plot_h * min(value, y_max) / y_max
            d.rectangle((x0, y, x0 + slot - 40, base), fill=color)
        else:
            y = base
        text = _fmt(value)
        d.text((x0 + (slot - 40 - d.textlength(text, font=font)) / 2, y - 14), text, fill="black", font=font)
        for m, line in enumerate(label.split("\n")):
            d.text((x0 + (slot - 40 - d.textlength(line, font=font)) / 2, base + 6 + 12 * m), line,
                   fill="black", font=font)
    d.text((left + (W - left - d.textlength(xlabel, font=font)) / 2, H - 18), xlabel, fill="black", font=font)
    ylab = Image.new("RGB", (int(d.textlength(ylabel, font=font)) + 4, 14), "white")
    ImageDraw.Draw(ylab).text((2, 1), ylabel, fill="black", font=font)
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (8, top + (plot_h - ylab.height) // 2))
    save_png(img, output, name)


def save_png(img, output, name):
    """The PIL image `img` as a PNG file `name` (relative, one of DRAWN_NAMES) in the --output
    folder `output`, whole or not at all (data.write_atomic): a Ctrl-C or a kill while pictures are
    drawn never leaves one cut short. Listed in output's DRAWN before it is written, so that the
    next evaluation there removes it even if this one is killed in the middle."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    with open(os.path.join(output, DRAWN), "a", encoding="utf-8") as f:
        f.write(name + "\n")
    write_atomic(os.path.join(output, name), buffer.getbuffer())


def drawn_here(output):
    """The files that evaluations listed in output's DRAWN as drawn there, those of DRAWN_NAMES
    only (an edited list names nothing else) -> paths."""
    try:
        with open(os.path.join(output, DRAWN), encoding="utf-8", errors="replace") as f:
            names = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [os.path.join(output, name) for name in dict.fromkeys(names)
            if any(fnmatch.fnmatchcase(name, pattern) and name.count("/") == pattern.count("/")
                   for pattern in DRAWN_NAMES) and ".." not in name.split("/")]


def _to_pil(image, scale=1.0):
    """[3, h, w] RGB in [0, 1] -> PIL image, enlarged `scale` times (small images stay legible)."""
    array = (image.detach().float().cpu().clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()  # [h, w, 3]
    pil = Image.fromarray(array)
    if scale != 1:
        pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.BILINEAR)
    return pil


def draw_detections(image, gt_boxes, gt_labels, det, names, min_score):
    """PIL picture: ground truth in green (gt_boxes None: a dataset without annotations, whose
    legend then names the detections only), detections with score >= min_score in red, each with
    'name' or 'name score', and a legend in a white strip under the image, which also leaves room
    for the names under the lowest boxes (the picture is at least as wide as the legend, so it is
    whole for an image of any shape, 1000x16 as well). image [3, h, w] in [0, 1]; boxes xyxy in its
    pixels; the image sits at the picture's top left, so its pixel (x, y) is at (x, y) * scale."""
    scale = max(1.0, 480 / max(image.shape[-2:]))
    enlarged = _to_pil(image, scale)
    font = ImageFont.load_default()
    legend = f"{'' if gt_boxes is None else 'green: ground truth, '}red: detections (score >= {min_score:g})"
    width = max(enlarged.width, math.ceil(font.getlength(legend)) + 8)
    # under the image: 13 pixels for the names under the lowest boxes (11 high), then the legend
    pil = Image.new("RGB", (width, enlarged.height + 13 + 16), "white")
    pil.paste(enlarged, (0, 0))
    d = ImageDraw.Draw(pil)

    def box(b, color, text, below):
        text = " ".join(text.split())  # one line: a category name may hold a newline
        x1, y1, x2, y2 = (v * scale for v in b.tolist())
        d.rectangle((x1, y1, x2, y2), outline=color, width=2)
        y = y2 + 1 if below else max(y1 - 12, 0)
        d.rectangle((x1, y, x1 + d.textlength(text, font=font) + 2, y + 11), fill=color)
        d.text((x1 + 1, y), text, fill="white" if not below else "black", font=font)

    if gt_boxes is not None:
        for b, k in zip(gt_boxes, gt_labels.tolist()):
            box(b, GT_COLOR, names[k], below=True)
    keep = det["scores"] >= min_score  # [N]
    for b, s, k in zip(det["boxes"][keep], det["scores"][keep].tolist(), det["labels"][keep].tolist()):
        box(b, PRED_COLOR, f"{names[k]} {s:.2f}", below=False)
    d.text((4, enlarged.height + 15), legend, fill="black", font=font)
    return pil


def _heat(t):
    """t in [0, 1] -> RGB on a dark blue - cyan - yellow - red scale."""
    stops = ((20, 20, 140), (0, 200, 255), (255, 230, 0), (230, 0, 0))
    t = min(max(float(t), 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1]))


def draw_matching(image, box, anchors, weights, ious, caption):
    """Fig. 4 for one object: two panels of the image around `box`, the centres of its bag's
    anchors [n, 4] as dots coloured by Mean-max weight [n] (left) and by IoU with the object [n]
    (right, the hand-crafted criterion), each with a colour bar. Where several anchors share a
    centre, the dot shows the highest value. image [3, h, w] in [0, 1]."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2  # [n, 2]
    lo = torch.minimum(box[:2], centres.min(0).values)  # [2]
    hi = torch.maximum(box[2:], centres.max(0).values)  # [2]
    margin = 0.15 * (hi - lo).max() + 8
    h, w = image.shape[-2:]
    x0, y0 = max(int(lo[0] - margin), 0), max(int(lo[1] - margin), 0)
    x1, y1 = min(int(hi[0] + margin) + 1, w), min(int(hi[1] + margin) + 1, h)
    scale = 300 / max(x1 - x0, y1 - y0)
    crop = _to_pil(image[:, y0:y1, x0:x1], scale)
    font = ImageFont.load_default()
    panel_w, panel_h = crop.width, crop.height + 56
    out = Image.new("RGB", (2 * panel_w + 30, panel_h + 30), "white")
    ImageDraw.Draw(out).text((10, 6), " ".join(caption.split()), fill="black", font=font)  # one line
    for p, (values, title) in enumerate(((weights, "Mean-max weight (FreeAnchor, Eq. 6)"),
                                         (ious, "IoU with the object (hand-crafted)"))):
        panel = crop.copy()
        d = ImageDraw.Draw(panel)
        bx = [(box[0] - x0) * scale, (box[1] - y0) * scale, (box[2] - x0) * scale, (box[3] - y0) * scale]
        d.rectangle([float(v) for v in bx], outline=GT_COLOR, width=2)
        top = float(values.max()) if len(values) and float(values.max()) > 0 else 1.0
        for n in values.argsort().tolist():  # highest drawn last, on top
            cx, cy = ((centres[n] - torch.tensor([x0, y0])) * scale).tolist()
            d.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=_heat(values[n] / top), outline="black")
        x_off = 10 + p * (panel_w + 10)
        out.paste(panel, (x_off, 22))
        d = ImageDraw.Draw(out)
        d.text((x_off, 22 + crop.height + 4), title, fill="black", font=font)
        bar_y = 22 + crop.height + 20
        for x in range(panel_w):  # colour bar, 0 .. max
            d.line((x_off + x, bar_y, x_off + x, bar_y + 10), fill=_heat(x / max(panel_w - 1, 1)))
        d.text((x_off, bar_y + 12), "0", fill="black", font=font)
        text = f"{top:.3f}"
        d.text((x_off + panel_w - d.textlength(text, font=font), bar_y + 12), text, fill="black", font=font)
    return out


def show_matching(model, dataset, indices, loss_config, min_size, output):
    """Fig. 4 pictures in the folder `output`/matching, for the first MATCHING_IMAGES images of
    `indices` that hold objects: the image resized, normalised and padded exactly as in training
    (dataset[(i, min_size, False)], model.preprocess), one forward pass, freeanchor.bag_weights;
    the MATCHING_OBJECTS most slender objects of each image. Returns the paths written."""
    os.makedirs(os.path.join(output, "matching"), exist_ok=True)
    device = model.cls_head[-1].weight.device
    paths, pictured = [], 0
    for i in indices:
        if pictured == MATCHING_IMAGES:
            break
        image, target = dataset[(i, min_size, False)]  # uint8 [3, h, w], boxes at shorter side min_size
        if len(target["boxes"]) == 0:
            continue
        pictured += 1
        images, _ = preprocess([image], [target["size"]])  # [1, 3, H, W]
        image = resize_image(image.float() / 255, min_size, dataset.max_size)  # [3, h', w'] to draw
        with torch.no_grad():  # a picture, not a training step
            cls_logits, box_deltas, anchors = model(images.to(device))
            gt_boxes, gt_labels = target["boxes"].to(device), target["labels"].to(device)
            (bag, weights), = freeanchor.bag_weights(cls_logits, box_deltas, anchors, [gt_boxes], [gt_labels],
                                                     cfg=loss_config)  # [G, n], [G, n]
        wh = target["boxes"][:, 2:] - target["boxes"][:, :2]  # [G, 2]
        elongation = wh.max(1).values / wh.min(1).values.clamp(min=1e-6)  # [G]
        for g in elongation.argsort(descending=True)[:MATCHING_OBJECTS].tolist():
            bag_anchors = anchors[bag[g]].cpu()  # [n, 4]
            box = target["boxes"][g]  # [4]
            ious = box_iou(box[None], bag_anchors)[0]  # [n]
            name = dataset.categories[target["labels"][g].item()]["name"]
            caption = (f"image {target['image_id']}, {name} {wh[g, 0]:.0f}x{wh[g, 1]:.0f} px at shorter side "
                       f"{min_size}: its bag of {bag.shape[1]} anchors")
            name = f"matching/matching_{target['image_id']}_{g}.png"
            save_png(draw_matching(image, box, bag_anchors, weights[g].float().cpu(), ious, caption), output, name)
            paths.append(os.path.join(output, name))
    return paths


# ----------------------------------------------------------------------------- the run

def batch_to_host(tensors):
    """Per-image tensors on the device -> the same on the CPU, in one copy for the batch (each copy
    to the host waits for the device to finish). Each image's comes back as a tensor of its own: a
    view of the batch's would carry the whole batch with it where the records are pickled (the
    gather across processes)."""
    return [t.clone() for t in torch.cat(tensors).cpu().split([len(t) for t in tensors])]


def compile_network(model):
    """The network inside model.detect (backbone, FPN, heads) under torch.compile, for any batch and
    image size, which vary with the images' aspect ratios (a last batch of one image compiles once
    more). Batch, height and width are marked dynamic, not every dimension (dynamic=True): that
    gives equal sizes one symbol and compiles again once they differ (the height and width of a
    square first batch; a batch of 3 images and the 3 colour channels)."""
    compiled = torch.compile(model._predict)

    def predict(images):  # [B, 3, H, W]
        torch._dynamo.maybe_mark_dynamic(images, [0, 2, 3])
        return compiled(images)
    model._predict = predict


def run_inference(model, dataset, indices, scales, max_sizes, cfg, show_progress, total):
    """Detect on dataset[indices] -> (records, first_batch_s, rate): one record per image, in the
    order they were detected (by aspect ratio): {"index", "image_id", "boxes", "scores", "labels"}
    on the CPU, plus with --nms-recall each object's best IoUs (best_iou) "before" and "after" NMS,
    "before_any" and "after_any" (a detection of any class) and "output"; the seconds the
    first batch took (the reading workers' start and first pictures, the device's first-time work,
    and with --compile the compilation), and images/s from then on (None after a single batch).
    Under DDP the counts are rank 0's share times the processes."""
    device = torch.device(cfg.device)
    # Batches of images of similar shape: a batch is padded to its largest height and width, so one
    # portrait image among landscape ones nearly doubles the pixels the network sees (1.47x over
    # shapes' val split in index order, 1.02x sorted). The records keep their index; the caller
    # puts them back in dataset order.
    aspect_ratios = dataset.aspect_ratios
    indices = sorted(indices, key=lambda i: aspect_ratios[i])
    workers = usable_workers(cfg.workers, say=show_progress)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size,
                                         num_workers=workers, collate_fn=list,
                                         pin_memory=device.type == "cuda", worker_init_fn=init_worker)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    if cfg.channels_last:  # convolutions in NHWC follow the weights' layout
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_network(model)
    records, start, position = [], time.time(), 0
    first_batch_s, rate_from = None, None
    # a split that lists some of the model's categories: only those are detected, so the others
    # take none of the 100 detections an image keeps (COCO's AP would not count them anyway)
    classes = None if len(dataset.listed_labels) == len(dataset.categories) else dataset.listed_labels.tolist()
    shares = total / max(len(indices), 1)  # under DDP, rank 0 counts its share for everyone
    for batch in loader_batches(loader):
        images = [image.to(device, non_blocking=True) for image, _ in batch]
        with autocast:
            if cfg.nms_recall:
                dets, candidates, after_nms = detect(model, images, scales, max_sizes, cfg.flip, candidates=True,
                                                     classes=classes)
            else:
                dets = detect(model, images, scales, max_sizes, cfg.flip, classes=classes)
        on_host = {k: batch_to_host([d[k] for d in dets]) for k in ("boxes", "scores", "labels")}
        if cfg.nms_recall:
            targets = [(t["boxes"].to(device, non_blocking=True), t["labels"].to(device, non_blocking=True))
                       for _, t in batch]
            # per object: the best IoU before NMS (own class, any class), after it (own, any) and among
            # the detections output, the first detections_per_img of what NMS kept; one copy for the batch
            best = batch_to_host([torch.cat((best_iou(*gt, c["boxes"], c["labels"])[:, :2],
                                             best_iou(*gt, k["boxes"], k["labels"], model.detections_per_img)), dim=1)
                                  for gt, c, k in zip(targets, candidates, after_nms)])  # [G_b, 5] each
            for column, key in enumerate(("before", "before_any", "after", "after_any", "output")):
                on_host[key] = [b[:, column].contiguous() for b in best]
        for b, (_, target) in enumerate(batch):
            if not (on_host["boxes"][b].isfinite().all() and on_host["scores"][b].isfinite().all()):
                raise ValueError(f"{cfg.ckpt}: the network's detections on image id {target['image_id']} are not finite "
                                 f"(NaN or inf){' (try without --amp)' if cfg.amp else ''}")
            records.append({"index": indices[position], "image_id": target["image_id"],
                            **{k: v[b] for k, v in on_host.items()}})
            position += 1
        done = min(round(position * shares), total)
        if first_batch_s is None:  # the rate and the ETA leave the first batch out: a slow start, not the pace
            first_batch_s, rate_from = time.time() - start, (time.time(), done)
            if show_progress and cfg.compile:
                print(f"first batch (compilation) {first_batch_s:.1f} s", flush=True)
        if show_progress:
            progress_line("evaluated images" + (" (rank 0's share x processes)" if shares > 1 else ""),
                          done, total, start, rate_from)
    end_progress_line(f" done in {time.time() - start:.1f} s" if show_progress else "")
    since, done_then = rate_from or (None, total)
    rate = (total - done_then) / max(time.time() - since, 1e-9) if total > done_then else None
    return records, first_batch_s, rate


def make_output_folder(path, subfolders=()):
    """The `subfolders` the pictures go to in --output (made, and locked, by data.directory_lock)
    before the first detection: a name taken by a file, or a folder that cannot be written, is said
    then, not once the metrics are computed."""
    try:  # a folder that exists but takes no file (read-only): said now too
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"--output {path}: cannot write there ({e.strerror})") from None
    for name in subfolders:
        try:
            os.makedirs(os.path.join(path, name), exist_ok=True)
        except OSError as e:
            raise ValueError(f"--output {path}: cannot make the folder {os.path.join(path, name)} ({e.strerror})") from None
    remove_partial_writes(path, ("detections.json", "metrics.json", *DRAWN_NAMES))
    # what earlier evaluations drew here, which this one may not draw again (other options, another
    # checkpoint): charts and pictures never sit beside results they were not made from. Only the
    # files they listed in DRAWN go: a picture of the same name that no evaluation drew stays.
    for file in drawn_here(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(file)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, DRAWN))
    for name in {"pictures", "matching"} - set(subfolders):  # emptied above: gone, unless it holds other files
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(path, name))


def evaluate(cfg):
    """The whole evaluation; returns the metrics dict on rank 0 (None on other ranks)."""
    # ------------------------------------------------------------------ processes (torchrun or plain python)
    ddp, rank, world, cfg.device = setup_processes(cfg.device)
    master = rank == 0
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, taken in _evaluate
            return _evaluate(cfg, ddp, rank, world, master, held)
    finally:
        if ddp:
            dist.destroy_process_group()


def longer_side_cap(scale, trained_min, trained_max):
    """The longer-side cap of a test at shorter side `scale`: the trained cap grows with the shorter
    side, rounded up, which from 800 / 1333 gives the sizes of the authors' multi-scale test:
    (480, 800), (640, 1067), (800, 1333), (960, 1600), (1120, 1867), (1280, 2133)."""
    return -(-trained_max * scale // trained_min)  # ceil, in integers


def _evaluate(cfg, ddp, rank, world, master, held):
    device = torch.device(cfg.device)
    model, ckpt = load_checkpoint(cfg.ckpt, device)
    model.score_thresh = cfg.score_thresh
    train_cfg = ckpt.get("config") or {}
    cfg.data = cfg.data or train_cfg.get("data")
    cfg.split = cfg.split or train_cfg.get("val_split")
    if cfg.data is None or cfg.split is None:
        raise ValueError(f"{cfg.ckpt} records no dataset: pass --data and --split")
    trained_min = model.config["min_size"]
    trained_min = trained_min[-1] if isinstance(trained_min, (tuple, list)) else trained_min  # torchvision's rule
    trained_max = model.config["max_size"]
    scales = list(cfg.test_scales) if cfg.test_scales else [cfg.min_size or trained_min]
    max_sizes = [cfg.max_size or longer_side_cap(s, trained_min, trained_max) for s in scales]
    if not cfg.test_scales and cfg.min_size is None and trained_min > max_sizes[0]:  # (given sizes: parse_config)
        raise ValueError(f"--max-size {cfg.max_size}: below the shorter side {trained_min} (the checkpoint's; "
                         f"give --min-size too)")

    # ------------------------------------------------------------------ data
    try:
        root = resolve_root_once(cfg.data, ddp, master)  # builds shapes once
    except DataError as e:
        if cfg.data != train_cfg.get("data"):
            raise
        raise DataError(f"{e} (the dataset {cfg.ckpt} was trained on: pass --data)") from None
    if cfg.output is None:  # beside the checkpoint: eval_[<ckpt>_][<dataset>_]<split>, one folder per evaluation
        same = cfg.data == train_cfg.get("data") or os.path.abspath(root) == train_cfg.get("data")
        stem = os.path.splitext(os.path.basename(cfg.ckpt))[0]
        name = "_".join([*([] if stem == "model_final" else [stem]),
                         *([] if same else [os.path.basename(os.path.abspath(root)) or "root"]), cfg.split])
        cfg.output = os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), f"eval_{name}")
    raw = cfg.raw_orientation
    if raw is None:  # read images as training did
        raw = train_cfg.get("raw_orientation", False)
    # the model's labels; the split may hold only some of its categories (AP is over those it holds)
    dataset = CocoDataset(root, cfg.split, train=False, max_size=max_sizes[0], exif=not raw,
                          categories=ckpt["categories"])
    if dataset.category_note and master:
        print(f"note: {dataset.category_note}", flush=True)
    needs_objects = [flag for flag, on in (("--nms-recall", cfg.nms_recall), ("--breakdown", cfg.breakdown),
                                           ("--show-matching", cfg.show_matching)) if on]
    if needs_objects and not dataset.annotated:  # refused before the first detection
        raise ValueError(f"{' and '.join(needs_objects)} need{'s' if len(needs_objects) == 1 else ''} the ground truth, "
                         f"and {dataset.ann_file} has no annotations (a list of images to detect on): leave "
                         f"{'it' if len(needs_objects) == 1 else 'them'} out")
    num_images = len(dataset) if cfg.max_images is None else min(cfg.max_images, len(dataset))
    evaluated = set(dataset.image_ids[:num_images])
    ids = [a for a, i in zip(dataset.zero_area_ids.tolist(), dataset.zero_area_image_ids.tolist()) if i in evaluated]
    if ids and master:
        print(f"note: {len(ids)} object(s) of {dataset.ann_file} have a box of zero width or height (annotation "
              f"ids {', '.join(map(str, ids[:8]))}{', ...' if len(ids) > 8 else ''}): COCOeval can never match "
              f"them, AP counts them as missed, and NMS recall leaves them out", flush=True)
    if not cfg.skip_check:  # the header of every image to evaluate before the first detection; the other ranks wait
        on_rank0(lambda: dataset.check_images(count=num_images), ddp, master)
    shard = [i for i in range(num_images) if i % world == rank]
    subfolders = [name for name, wanted in (("pictures", cfg.visualize), ("matching", cfg.show_matching)) if wanted]

    def output_folder():  # locked by rank 0 to the end: a second evaluation there is refused, not mixed in
        held.enter_context(directory_lock(cfg.output))
        make_output_folder(cfg.output, subfolders)
    on_rank0(output_folder, ddp, master)
    if master:
        K, listed = len(dataset.categories), len(dataset.listed_labels)
        classes = f"{K} classes" if listed == K else f"{listed} of the model's {K} classes (only those detected)"
        tta = ", ".join(f"{s}/{m}" for s, m in zip(scales, max_sizes))
        print(f"{'evaluating' if dataset.annotated else 'detecting with'} {cfg.ckpt} on {dataset.ann_file}"
              f"{'' if dataset.annotated else ' (no annotations: detections only, no AP)'}: {num_images} images, {classes}, "
              f"shorter/longer side {tta}{', flip' if cfg.flip else ''}, {world} process(es) on {cfg.device}, "
              f"output {cfg.output}", flush=True)

    # ------------------------------------------------------------------ detect, gather on rank 0
    start = time.time()
    records, first_batch_s, rate = run_inference(model, dataset, shard, scales, max_sizes, cfg,
                                                 show_progress=master, total=num_images)
    if ddp:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    seconds = time.time() - start
    if not master:
        return None
    records.sort(key=lambda r: r["index"])
    img_ids = [r["image_id"] for r in records]
    metrics = {"ckpt": cfg.ckpt, "data": cfg.data, "split": cfg.split, "images": num_images,
               "scales": scales, "max_sizes": max_sizes, "flip": cfg.flip, "score_thresh": cfg.score_thresh,
               "batch_size": cfg.batch_size, "amp": cfg.amp, "channels_last": cfg.channels_last,
               "raw_orientation": raw, "processes": world,
               "compile": cfg.compile, "seconds": round(seconds, 2),
               "images_per_s": round(num_images / max(seconds, 1e-9), 2),
               # the first batch alone (included in seconds; with --compile, the compilation) and the pace after it
               "first_batch_s": None if first_batch_s is None else round(first_batch_s, 2),
               "images_per_s_after_first_batch": None if rate is None else round(rate, 2)}

    # ------------------------------------------------------------------ COCO AP (Table 2)
    results = to_coco_results(records, img_ids, dataset.categories)
    # each file whole or not at all; the metrics.json of the detections about to be replaced goes first
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cfg.output, "metrics.json"))
    write_atomic(os.path.join(cfg.output, "detections.json"), json.dumps(results, allow_nan=False).encode())
    if dataset.annotated:
        print(f"COCO AP: pycocotools' COCOeval on {num_images} images ...", flush=True)
        started = time.time()
        crowd_images = crowd_groups(dataset.coco, img_ids) if cfg.breakdown else []  # Fig. 6's groups
        evaluation = coco_evaluate(dataset.coco, results, img_ids, image_groups=dict(crowd_images), show_progress=True)
        metrics["coco"], table = coco_summary(evaluation)
        print(f"COCO box AP (Table 2), {num_images} images, in {time.time() - started:.1f} s:\n{table}", end="")
        print("\n" + "  ".join(f"{name:>6}" for name in COCO_STATS))
        print("  ".join(f"{_fmt(metrics['coco'][name]):>6}" for name in COCO_STATS), flush=True)
    else:  # COCO's test-dev: its annotations are kept by COCO's evaluation server, which takes this file
        metrics["coco"] = None
        print(f"{len(results)} detections of {num_images} images in {os.path.join(cfg.output, 'detections.json')}, "
              f"COCO's results format; no AP without annotations (for COCO's test-dev, upload the file, renamed "
              f"detections_{cfg.split}_<method>_results.json and zipped, to COCO's evaluation server)", flush=True)

    # ------------------------------------------------------------------ NMS recall (Table 1)
    if cfg.nms_recall:
        nr = nms_recall([r["before"] for r in records], [r["after"] for r in records], [r["output"] for r in records])
        metrics["nms_recall"] = nr
        shown = (0.5, 0.6, 0.7, 0.8, 0.9)
        print(f"\nNMS recall (Table 1), class-aware, {nr['objects']} objects; recall in %:")
        print(f"{'IoU':>16}" + "".join(f"{t:>7.2f}" for t in NR_THRESHOLDS))
        for key, label in (("recall_before", "before NMS"), ("recall_after", "after NMS"), ("NR_tau", "NR_tau"),
                           ("recall_output", f"{model.detections_per_img} best/image")):
            print(f"{label:>16}" + "".join(f"{_fmt(v):>7}" for v in nr[key].values()))
        # the authors' script (nms_recall/inference_for_NR.py) recalls an object by a detection of any
        # class at IoU > tau: the same passes, counted that way
        any_class = nms_recall([r["before_any"] for r in records], [r["after_any"] for r in records], strict=True)
        metrics["nms_recall_any_class"] = any_class
        print("      NR" + "".join(f"  NR{round(t * 100)}" for t in shown))
        for counted, label in ((nr, "class-aware"), (any_class, "any class, IoU > tau (as the authors' script)")):
            print(f"{_fmt(counted['NR']):>8}" + "".join(f"{_fmt(counted['NR_tau'][f'{t:.2f}']):>6}" for t in shown)
                  + f"  {label}")
        sys.stdout.flush()

    # ------------------------------------------------------------------ Fig. 5 and Fig. 6
    if cfg.breakdown:
        square, slender = shape_groups([c for c in dataset.categories if c["id"] in dataset.coco.cats])
        shapes = {n: coco_summary(evaluation, cat_ids=ids)[0]["AP"] for n, ids in (square | slender).items()}
        crowd = [(label, len(ids), coco_summary(evaluation, group=label)[0]["AP"]) for label, ids in crowd_images]
        # every category the model detects here, as Fig. 5 for all: its objects and AP, AP50, AP75
        # (COCO's AP is the mean of the categories' APs, over those with objects)
        per_category = []
        for c in (dataset.categories[k] for k in dataset.listed_labels.tolist()):
            stats = coco_summary(evaluation, cat_ids=[c["id"]])[0]
            objects = len(dataset.coco.getAnnIds(imgIds=img_ids, catIds=[c["id"]], iscrowd=False))
            per_category.append({"id": c["id"], "name": c["name"], "objects": objects,
                                 **{k: stats[k] for k in ("AP", "AP50", "AP75")}})
        metrics["breakdown"] = {"square": {n: shapes[n] for n in square},
                                "slender": {n: shapes[n] for n in slender},
                                "crowdedness": {label: {"images": n, "AP": ap} for label, n, ap in crowd},
                                "per_category": per_category}
        print("\nAP by object shape (Fig. 5):")
        if not square and not slender:
            print("  none of Fig. 5's categories is in this dataset")
        for group, cats in (("square", square), ("slender", slender)):
            if cats:
                print(f"  {group:>8}: " + "   ".join(f"{n} {_fmt(shapes[n])}" for n in cats))
        print("AP by objects per image (Fig. 6):")
        print(f"  {'objects':>8} {'images':>7} {'AP':>6}")
        for label, n, ap in crowd:
            print(f"  {label:>8} {n:>7} {_fmt(ap):>6}")
        shown = [" ".join(c["name"].split()) for c in per_category]  # a name on one line, as in the pictures
        width, id_width = max(map(len, shown)), max(8, *(len(str(c["id"])) for c in per_category))
        print("AP by category:")
        print(f"  {'id':>{id_width}} {'name':<{width}} {'objects':>8} {'AP':>6} {'AP50':>6} {'AP75':>6}")
        for c, name in zip(per_category, shown):
            print(f"  {c['id']:>{id_width}} {name:<{width}} {c['objects']:>8} "
                  + " ".join(f"{_fmt(c[k]):>6}" for k in ("AP", "AP50", "AP75")))
        if square or slender:
            cats = [*square, *slender]
            bar_chart(cfg.output, "ap_by_shape.png", "AP of square and slender categories (Fig. 5)",
                      [n.replace(" ", "\n") for n in cats], [shapes[n] for n in cats],
                      [(70, 120, 220)] * len(square) + [(240, 140, 40)] * len(slender), "category",
                      legend=(("square", (70, 120, 220)), ("slender", (240, 140, 40))))
        bar_chart(cfg.output, "ap_by_crowdedness.png", "AP by objects per image (Fig. 6)",
                  [f"{label}\n{n} images" for label, n, _ in crowd], [ap for _, _, ap in crowd],
                  [(70, 120, 220)] * len(crowd), "objects per image")
        sys.stdout.flush()

    # ------------------------------------------------------------------ pictures
    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(num_images, generator=generator).tolist()  # which images get pictured
    if cfg.visualize:
        folder = os.path.join(cfg.output, "pictures")
        os.makedirs(folder, exist_ok=True)
        names = [c["name"] for c in dataset.categories]
        for i in sorted(order[:cfg.visualize]):
            image, target = dataset[i]  # uint8
            image = image.float() / 255  # [3, h, w] in [0, 1]
            gt_boxes = target["boxes"] if dataset.annotated else None
            save_png(draw_detections(image, gt_boxes, target["labels"], records[i], names, cfg.vis_score),
                     cfg.output, f"pictures/{target['image_id']}.png")
        print(f"\n{min(cfg.visualize, num_images)} pictures in {folder}")
    if cfg.show_matching:
        loss_config = freeanchor.FreeAnchorConfig(**(ckpt.get("loss_config") or {}))
        paths = show_matching(model, dataset, order, loss_config, scales[0], cfg.output)
        print(f"{len(paths)} matching pictures (Fig. 4) in {os.path.join(cfg.output, 'matching')}")

    pace = metrics["images_per_s_after_first_batch"]
    done = (f"results in {cfg.output} ({num_images} images in {seconds:.1f} s, {metrics['images_per_s']:.1f} img/s"
            + ("" if pace is None else f"; {pace:.1f} after the first batch of {first_batch_s:.1f} s") + ")")
    try:
        write_atomic(os.path.join(cfg.output, "metrics.json"), json.dumps(metrics, indent=1).encode())
    except DeferredInterrupt as e:  # Ctrl-C during the write, which completed first: the evaluation is done
        print(done, flush=True)
        raise DeferredInterrupt(e.signum, "after the evaluation completed") from None
    print(done, flush=True)
    return metrics


def main(argv=None):
    """CLI entry: user mistakes (arguments, data, checkpoints) end with one line on stderr and
    exit status 2, never a traceback; Ctrl-C and SIGTERM with one line and status 130 or 143."""
    restore_signals = catch_stop_signals()  # from here Ctrl-C and SIGTERM are the KeyboardInterrupt below
    try:
        return evaluate(parse_config(argv))
    except (DataError, ValueError) as e:
        end_progress_line()
        print_stop(f"error: {e}", own=isinstance(e, ImageError))
        sys.exit(2)
    except (OSError, RuntimeError) as e:  # the machine's (a full disk), another process's, or a bug
        stop_on_failure(e)
    except KeyboardInterrupt as e:
        end_progress_line()
        word, status = stopped_by(e)
        print_stop(f"{word} {e.args[0]}" if e.args else word)  # once under torchrun, whose every process gets the signal
        sys.exit(status)
    finally:
        restore_signals()


if __name__ == "__main__":
    run_program(main, _stopped_before_main)
