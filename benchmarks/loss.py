"""Speed and memory of the FreeAnchor loss at COCO scale.

Compares, on identical inputs, forward + backward of
  - `free_anchor_loss`: dense over images and objects, plain autograd (freeanchor.py);
  - `free_anchor_loss compiled` (with --compile): the same under torch.compile (dynamic shapes);
    the first call, which compiles, is not timed, and its duration is printed below the table;
  - `free_anchor_loss compiled, CUDA graphs` (with --cudagraphs, CUDA only): the same compiled for
    each shape with mode="reduce-overhead", which replays each shape's kernels as one CUDA graph,
    without the host's launches (its inputs copied into the graph's own memory at each call); three
    untimed calls first (compilation, a warm-up, the recording);
  - `per-image loop`: the same loss written the way the published implementations do it, one image
    at a time with plain autograd (kept here as the baseline every ratio refers to);
  - `retinanet_loss`: the hand-crafted IoU assignment + focal loss baseline (Eq. 1);
  - `sigmoid pass`: one elementwise torch.sigmoid over the B x A x K logits, forward only (the
    floor: the negative term must touch every logit at least once).
at a padded 800x1344 image (201,600 anchors), K = 80 classes, B in {2, 16}, G in {8, 100} objects
per image. On the CPU every configuration runs in a fresh subprocess so that its peak memory is
its own (peak resident memory over what the inputs already took); on CUDA all run in one process
(torch.cuda.max_memory_allocated, reset for each), so the compiled loss compiles once.

    python benchmarks/loss.py                      # CPU, all configurations (~15 min on 2 cores)
    python benchmarks/loss.py --batch 2 --objects 8 --compile
    python benchmarks/loss.py --device cuda --compile --repeats 7
    python benchmarks/loss.py --device cuda --compile --batch 16 --objects 100 --profile 16 100
    python benchmarks/loss.py --device cuda --compile --profile 2 8 --profile 16 8   # profiles at two sizes
    python benchmarks/loss.py --device cuda --parts 16 8 52    # pieces alone, with alternatives
    python benchmarks/loss.py --device cuda --parts 16 8 --pieces negative
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import pad_targets  # noqa: E402
from freeanchor import (ONE_MINUS_Q_MIN, FreeAnchorConfig, bag_indices, compile_loss, free_anchor_loss,  # noqa: E402
                        negative_focal_sum, retinanet_loss)
from model import box_iou, decode, encode, grid_anchors  # noqa: E402

H, W, K = 800, 1344, 80


def coco_anchors():
    """The anchors of a padded 800x1344 batch as the network makes them: 201,600 (P3-P7, 9 per cell)."""
    feature_sizes = [(-(-H // stride), -(-W // stride)) for stride in (8, 16, 32, 64, 128)]  # P3..P7
    return grid_anchors(feature_sizes, (H, W), "cpu")  # [A, 4]


def make_inputs(B, G, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    anchors = coco_anchors()
    gt_boxes, gt_labels = [], []
    for _ in range(B):
        wh = torch.rand(G, 2, generator=g) * 300 + 16
        xy = torch.rand(G, 2, generator=g) * (torch.tensor([W, H]) - wh)
        gt_boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        gt_labels.append(torch.randint(0, K, (G,), generator=g).to(device))
    cls_logits = (torch.randn(B, len(anchors), K, generator=g) - 4).to(device)
    box_deltas = (torch.randn(B, len(anchors), 4, generator=g) * 0.5).to(device)
    # a share of predictions lands on objects so that P{a_j in A+} has work to do
    for b in range(B):
        near = box_iou(gt_boxes[b].cpu(), anchors).argmax(0)
        box_deltas[b] = (encode(anchors, gt_boxes[b].cpu()[near]) + torch.randn(len(anchors), 4, generator=g) * 0.5).to(device)
    return cls_logits, box_deltas, anchors.to(device), gt_boxes, gt_labels


def per_image_loop(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, cfg=FreeAnchorConfig()):
    """FreeAnchor one image at a time with plain autograd, as the published implementations do."""
    B, A, K = cls_logits.shape
    n = min(cfg.bag_size, A)
    cls_prob = torch.sigmoid(cls_logits)
    num_objects = max(1, sum(len(b) for b in gt_boxes))
    positive, box_probs = [], []
    for b in range(B):
        boxes, labels = gt_boxes[b], gt_labels[b]
        with torch.no_grad():
            pred = decode(anchors, box_deltas[b].detach())
            iou = box_iou(boxes, pred)
            t2 = iou.max(dim=1, keepdim=True).values.clamp(min=cfg.iou_threshold + 1e-12)
            prob = ((iou - cfg.iou_threshold) / (t2 - cfg.iou_threshold)).clamp(0, 1)
            box_prob = torch.zeros(A, K, device=cls_logits.device)
            for i, c in enumerate(labels.tolist()):  # one read of the classes per image, not one per object
                box_prob[:, c] = torch.maximum(box_prob[:, c], prob[i])
            box_probs.append(box_prob)
        if len(boxes) == 0:
            continue
        bag = box_iou(boxes, anchors).topk(n, dim=1).indices
        p_cls = cls_prob[b][bag, labels[:, None]]
        loss_loc = F.smooth_l1_loss(box_deltas[b][bag], encode(anchors[bag], boxes[:, None]),
                                    beta=cfg.smooth_l1_beta, reduction="none").sum(-1)
        x = p_cls * torch.exp(-cfg.loc_weight * loss_loc)
        w = 1 / (1 - x).clamp(min=1e-12)
        bag_prob = (w / w.sum(1, keepdim=True) * x).sum(1)
        positive.append(F.binary_cross_entropy(bag_prob.clamp(max=1), torch.ones_like(bag_prob), reduction="sum"))
    q = (cls_prob * (1 - torch.stack(box_probs))).clamp(1e-12, 1 - 1e-12)
    negative = (q.pow(cfg.gamma) * -torch.log1p(-q)).sum()
    pos = sum(positive) if positive else box_deltas.sum() * 0
    return {"positive": cfg.alpha * pos / num_objects,
            "negative": (1 - cfg.alpha) * negative / (cfg.bag_size * num_objects)}


def sigmoid_pass(cls_logits, *rest):
    return {"sigmoid": torch.sigmoid(cls_logits).sum() * 0}


METHODS = {"free_anchor_loss": free_anchor_loss, "free_anchor_loss compiled": None,
           "free_anchor_loss compiled, CUDA graphs": None,
           "per-image loop": per_image_loop, "retinanet_loss": retinanet_loss, "sigmoid pass": sigmoid_pass}
COMPILED, GRAPHED = "free_anchor_loss compiled", "free_anchor_loss compiled, CUDA graphs"


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


compiled_loss = compile_loss(free_anchor_loss, dynamic=True)  # dynamic shapes: one graph for every (B, G)
# a CUDA graph per shape, compiled for each shape (static): CUDA graphs record one graph per shape
# anyway, and compiled with dynamic=True this row ended the process with a segmentation fault on an
# H200 (torch 2.11), as CUDA graph trees with dynamic shapes and a backward have before
graphed_loss = compile_loss(free_anchor_loss, dynamic=False, mode="reduce-overhead")
COMPILED_LOSSES = {COMPILED: compiled_loss, GRAPHED: graphed_loss}


def padded(gt_boxes, gt_labels):
    """The objects padded to [B, G, 4] and [B, G] on their device, as train.py passes them to the loss
    (the compiled loss takes these: lists would fix B in the graph)."""
    device = gt_boxes[0].device
    boxes, labels = pad_targets([b.cpu() for b in gt_boxes], [l.cpu() for l in gt_labels], 8)
    return boxes.to(device), labels.to(device)


def run_one(method, B, G, device, repeats):
    """Time one configuration in this process: {"seconds" (median), "first_call_s", "peak_mb", "values", ...}."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_inputs(B, G, device)
    fn = COMPILED_LOSSES.get(method) or METHODS[method]
    if method in COMPILED_LOSSES:
        gt_boxes, gt_labels = padded(gt_boxes, gt_labels)
    warmup = 3 if method == GRAPHED else 1  # CUDA graphs: compiled, then run once, then recorded
    forward_only = method == "sigmoid pass"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, values = [], None
    for r in range(repeats + warmup):  # the first runs warm up (allocator, kernels)
        x = cls_logits.clone().requires_grad_(not forward_only)
        d = box_deltas.clone().requires_grad_(not forward_only)
        if r == warmup:  # measure memory from here: inputs exist, the loss's own tensors don't
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = rss_bytes()
        sync()
        t0 = time.perf_counter()
        out = fn(x, d, anchors, gt_boxes, gt_labels)
        if not forward_only:
            sum(out.values()).backward()
        sync()
        times.append(time.perf_counter() - t0)
        values = {k: float(v) for k, v in out.items()}
        first_call = times[0]
        del x, d, out
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = sorted(times[warmup:])
    return {"method": method, "B": B, "G": G, "seconds": times[len(times) // 2],
            "first_call_s": first_call, "peak_mb": max(peak, 0) / 2**20, "values": values}


def profile(B, G, device, methods):
    """Where one forward + backward spends its time (torch.profiler): the ops, or on CUDA the
    kernels, that take the most, for each of `methods` at (B, G), after one warm-up call."""
    from torch.profiler import ProfilerActivity
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = make_inputs(B, G, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for method in methods:
        fn = COMPILED_LOSSES.get(method) or METHODS[method]
        boxes, labels = padded(gt_boxes, gt_labels) if method in COMPILED_LOSSES else (gt_boxes, gt_labels)

        def step():
            x, d = cls_logits.clone().requires_grad_(), box_deltas.clone().requires_grad_()
            sum(fn(x, d, anchors, boxes, labels).values()).backward()
            sync()

        step()  # warm-up (and compilation, for a size not timed above)
        with torch.profiler.profile(activities=activities) as prof:
            step()
        print(f"\n# profile of {method}, B = {B}, G = {G}, forward + backward")
        print(prof.key_averages().table(
            sort_by="self_device_time_total" if device == "cuda" else "self_cpu_time_total",
            row_limit=15, max_name_column_width=70))


def one_stage_bag(iou, n):
    """The bag by one top-n over all A anchors, on the same exact key as bag_indices."""
    key = (iou.view(torch.int32).long() << 32) | torch.arange(iou.shape[-1] - 1, -1, -1, device=iou.device)
    return key.topk(n, dim=-1).indices  # [B, g, n]


def scatter_by_anchor(p_match, labels, K):
    """P{a_j in A+} by a scatter-max into [B, A, K] (free_anchor_loss's before it went class-major)."""
    B, g, A = p_match.shape
    return p_match.new_zeros(B, A, K).scatter_reduce_(2, labels[:, None].expand(B, A, g), p_match.transpose(1, 2),
                                                      reduce="amax")  # [B, A, K]


def scatter_by_class(p_match, labels, K):
    """The same scatter-max into a class-major [B, K, A] (contiguous rows of p_match), read as [B, A, K]:
    free_anchor_loss's."""
    B, g, A = p_match.shape
    return p_match.new_zeros(B, K, A).scatter_reduce_(1, labels[..., None].expand(B, g, A), p_match,
                                                      reduce="amax").transpose(1, 2)  # [B, A, K]


def one_hot_max(p_match, labels, K):
    """The same as a max over the objects of a one-hot product, [B, A, K, g] (compiled only: eager would
    hold it in memory)."""
    one_hot = labels[:, None, None, :] == torch.arange(K, device=labels.device)[None, None, :, None]  # [B, 1, K, g]
    return (p_match.transpose(1, 2)[:, :, None, :] * one_hot).amax(-1)  # [B, A, K]


def first_of_class(labels):
    """[B, G] True for the first object of each class in its image (all objects valid here)."""
    G = labels.shape[1]
    earlier = torch.ones(G, G, dtype=torch.bool, device=labels.device).tril(-1)  # [G, G]  i' < i
    return ~((labels[:, :, None] == labels[:, None, :]) & earlier).any(-1)  # [B, G]


def focal(q, one_minus_q, gamma):
    """FL(q) = q^gamma (-log(1 - q)) elementwise, 1 - q given apart (as negative_focal_sum computes it)."""
    return -q.pow(gamma) * torch.log(one_minus_q.clamp(min=ONE_MINUS_Q_MIN))


def negative_by_class_rows(cls_logits, p_plus, labels, first, gamma):
    """The same sum as negative_focal_sum, split: FL(P_cls) over all of [B, A, K] (as if P{a_j in A+}
    were 0 everywhere: a pass over the logits alone), plus FL(q) - FL(P_cls) on the rows of the
    classes present, one object standing for each class ([B, A, G] entries, P{a_j in A+} read along
    its class-major rows). cls_logits [B, A, K], p_plus [B, A, K] (a view of [B, K, A]), labels
    [B, G] in [0, K) (no padding objects), first [B, G] -> []. Without the loss's clamp of q for
    gamma < 1: timed at gamma = 2."""
    # FL(P_cls) everywhere, each anchor's classes summed first, as negative_focal_sum sums
    total = focal(torch.sigmoid(cls_logits), torch.sigmoid(-cls_logits), gamma).sum(-1).sum()  # []
    cls = labels[:, None, :].expand(-1, cls_logits.shape[1], -1)  # [B, A, G]  class c_i at every anchor
    x, taken = cls_logits.gather(2, cls), p_plus.gather(2, cls)  # [B, A, G]  logits, P{a_j in A+} of c_i
    p, p_not = torch.sigmoid(x), torch.sigmoid(-x)  # [B, A, G]  P_cls, 1 - P_cls
    p_taken = p * taken  # [B, A, G]
    change = focal(p - p_taken, p_not + p_taken, gamma) - focal(p, p_not, gamma)  # [B, A, G]  FL(q) - FL(P_cls)
    return total + torch.where(first[:, None, :], change, 0.0).sum()  # []


def negative_flat_sum(cls_logits, p_plus, gamma):
    """negative_focal_sum's terms summed in one flat reduction over [B, A, K], as the loss summed them
    before it summed each anchor's classes first (for a fixed A, inductor reduced rows of 4 anchors x
    80 classes; for a symbolic A, the flat reduction that read out of order). gamma >= 1."""
    p = torch.sigmoid(cls_logits)  # [B, A, K]
    p_taken = p * p_plus  # [B, A, K]
    return focal(p - p_taken, torch.sigmoid(-cls_logits) + p_taken, gamma).sum()  # []


def negative_term_rows(p_match, labels, B, G, device):
    """The negative term alone, forward + backward through the logits, from P{a_j -> b_i} [B, G, A]:
    the loss's (negative_focal_sum: FL(q) over all of [B, A, K], P{a_j in A+} built class-major and
    read through a transposed view), the same in one flat sum (negative_flat_sum), the same with
    P{a_j in A+} built in [B, A, K], and split into a
    pass over the logits plus the rows of the classes present (negative_by_class_rows); eager, and
    compiled for one shape or for any (dynamic=True), each with inductor's analysis of tilings on
    (torch's default) or off (compile_loss, as train.py compiles the loss). On an H200 the
    transposed read cost nothing compiled for one shape with the analysis on and doubled the term's
    time compiled for any shape with it off, when the term was one flat sum over [B, A, K]; the
    generated code (benchmarks/cuda_kernels.py) showed the flat reduction over symbolic sizes as
    the cause, not the analysis, and the terms now sum each anchor's classes first."""
    cls_logits = torch.randn(B, p_match.shape[-1], K, device=device, requires_grad=True)  # [B, A, K]
    first = first_of_class(labels)  # [B, G]
    variants = (
        ("FL(q) over [B, A, K], P{a_j in A+} class-major, read transposed (the loss's)",
         lambda x, p_match, labels: negative_focal_sum(x, scatter_by_class(p_match, labels, K), 2.0)),
        ("FL(q) over [B, A, K], P{a_j in A+} class-major, one flat sum (the loss's before it summed by anchor)",
         lambda x, p_match, labels: negative_flat_sum(x, scatter_by_class(p_match, labels, K), 2.0)),
        ("FL(q) over [B, A, K], P{a_j in A+} in [B, A, K]",
         lambda x, p_match, labels: negative_focal_sum(x, scatter_by_anchor(p_match, labels, K), 2.0)),
        ("FL(P_cls) over [B, A, K] + the rows of the classes present",
         lambda x, p_match, labels: negative_by_class_rows(x, scatter_by_class(p_match, labels, K), labels, first, 2.0)))
    want = None
    for name, term in variants:
        value = term(cls_logits, p_match, labels)
        want = value if want is None else want
        assert torch.allclose(value, want, rtol=1e-4), (name, float(value), float(want))
        eager = median_ms(lambda x, *rest: torch.autograd.grad(term(x, *rest), x), cls_logits, p_match, labels)
        for how, compiled_with in (("one shape, analysis on", lambda f: torch.compile(f)),
                                   ("one shape, analysis off (train.py --compile's: A fixed)", lambda f: compile_loss(f)),
                                   ("any shape, analysis on", lambda f: torch.compile(f, dynamic=True)),
                                   ("any shape, analysis off (train.py --compile --no-fixed-shapes')", lambda f: compile_loss(f, dynamic=True))):
            torch._dynamo.reset()  # each variant compiles afresh
            compiled = compiled_with(term)

            def step(cls_logits, p_match, labels, compiled=compiled):
                return torch.autograd.grad(compiled(cls_logits, p_match, labels), cls_logits)  # no accumulation

            try:
                got = compiled(cls_logits, p_match, labels)
            except Exception as e:  # an inductor failure is a result here
                got, ms = None, f"failed: {type(e).__name__}"
            if got is not None:
                close = torch.allclose(got, want, rtol=1e-4)
                ms = f"{median_ms(step, cls_logits, p_match, labels):.2f}" if close else f"wrong value {float(got)}"
            print(f"| {G} | negative term | {name}, compiled for {how} | {eager:.2f} | {ms} |", flush=True)
    torch._dynamo.reset()


def median_ms(fn, *args, repeats=10):
    """Median time of fn(*args) in ms after one call (compilation, warm-up), with CUDA events on a GPU."""
    fn(*args)
    times = []
    for _ in range(repeats):
        if args[0].is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def parts(B, objects, device, pieces=("bag", "p_plus", "negative")):
    """Pieces of the loss alone, each against its alternatives, at [B, G, 201,600] (median of 10):
    the bag's top-n (one top-n over all anchors vs bag_indices' two stages), P{a_j in A+} followed
    by one read of it in [B, A, K] order (as the negative term reads it), and the negative term
    forward + backward at the first G (negative_term_rows); `pieces` picks some of the three."""
    anchors = coco_anchors().to(device)
    g = torch.Generator().manual_seed(0)
    print(f"# the bag's top-50, P{{a_j in A+}} and the negative term alone, B = {B}, A = {len(anchors)}, K = {K}, "
          f"median of 10 (ms)\n")
    print("| G | piece | variant | eager | compiled |")
    print("|---|---|---|---|---|")
    for G in objects:
        wh = torch.rand(B, G, 2, generator=g) * 300 + 16
        xy = torch.rand(B, G, 2, generator=g) * (torch.tensor([W, H]) - wh)
        iou = box_iou(torch.cat([xy, xy + wh], -1).to(device), anchors)  # [B, G, A]
        assert torch.equal(one_stage_bag(iou, 50), bag_indices(iou, 50))
        bag_variants = (("one top-50", one_stage_bag), ("two stages (bag_indices)", bag_indices))
        for name, fn in bag_variants if "bag" in pieces else ():
            eager, compiled = median_ms(fn, iou, 50), median_ms(torch.compile(fn), iou, 50)
            print(f"| {G} | bag | {name} | {eager:.2f} | {compiled:.2f} |", flush=True)
        p_match = torch.where(iou > 0.6, iou, 0.0)  # [B, G, A]  a stand-in for P{a_j -> b_i}
        labels = torch.randint(0, K, (B, G), generator=g).to(device)  # [B, G]
        p_cls = torch.rand(B, len(anchors), K, generator=g).to(device)  # [B, A, K]
        want = scatter_by_anchor(p_match, labels, K)
        p_plus_variants = (("scatter into [B, A, K]", scatter_by_anchor),
                           ("scatter into [B, K, A] (the loss's)", scatter_by_class),
                           ("one-hot max over G", one_hot_max))
        for name, build in p_plus_variants if "p_plus" in pieces else ():
            def piece(p_match, labels, build=build, p_cls=p_cls):
                return (p_cls * build(p_match, labels, K)).sum()  # []  one read in [B, A, K] order

            compiled_piece = torch.compile(piece)
            assert torch.allclose(compiled_piece(p_match, labels), (p_cls * want).sum(), rtol=1e-4)
            eager = "-" if build is one_hot_max else f"{median_ms(piece, p_match, labels):.2f}"
            print(f"| {G} | P{{a_j in A+}} | {name} | {eager} | {median_ms(compiled_piece, p_match, labels):.2f} |",
                  flush=True)
        if "negative" in pieces and G == objects[0]:
            negative_term_rows(p_match, labels, B, G, device)
        del iou, p_match, p_cls, want


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 16], help="images per batch (B)")
    ap.add_argument("--objects", type=int, nargs="+", default=[8, 100], help="objects per image (G)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    ap.add_argument("--methods", nargs="+", default=[m for m in METHODS if m not in COMPILED_LOSSES], choices=list(METHODS))
    ap.add_argument("--compile", action="store_true", help=f"add the '{COMPILED}' row")
    ap.add_argument("--cudagraphs", action="store_true", help=f"add the '{GRAPHED}' row (CUDA only)")
    ap.add_argument("--profile", type=int, nargs=2, metavar=("B", "G"), action="append",
                    help="after the table, profile the free_anchor_loss rows at this (B, G); may be repeated")
    ap.add_argument("--parts", type=int, nargs="+", metavar=("B", "G"),
                    help="instead of the table: time the bag's top-n and P{a_j in A+} alone, with their "
                         "alternatives, at batch B and each G that follows, and the negative term at the first G")
    ap.add_argument("--pieces", nargs="+", default=["bag", "p_plus", "negative"], choices=["bag", "p_plus", "negative"],
                    help="with --parts: which pieces (default: all three)")
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.cudagraphs or GRAPHED in args.methods) and args.device != "cuda":
        ap.error(f"'{GRAPHED}': CUDA graphs need --device cuda")
    if args.parts:
        if len(args.parts) < 2:
            ap.error("--parts takes B and at least one G")
        parts(args.parts[0], args.parts[1:], args.device, args.pieces)
        return
    if args._one:
        method, B, G = args._one
        print(json.dumps(run_one(method, int(B), int(G), args.device, args.repeats)))
        return

    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        model_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        machine = f"{model_name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"# FreeAnchor loss, forward + backward, A = {len(coco_anchors()):,} anchors (800x1344), K = {K}")
    print(f"# {args.device}: {machine}; torch {torch.__version__}; median of {args.repeats} runs\n")
    methods = args.methods + [m for m, wanted in ((COMPILED, args.compile), (GRAPHED, args.cudagraphs))
                              if wanted and m not in args.methods]
    compile_times = []
    print("| B | G | method | time (ms) | vs per-image loop | vs retinanet_loss | x sigmoid pass | peak extra memory (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for B in args.batch:
        for G in args.objects:
            rows = {}
            for method in methods:
                if args.device == "cuda":
                    rows[method] = run_one(method, B, G, args.device, args.repeats)
                    torch.cuda.empty_cache()
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device,
                       "--repeats", str(args.repeats), "--_one", method, str(B), str(G)]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(f"| {B} | {G} | {method} | failed: {res.stderr.strip().splitlines()[-1]} | | | | |")
                    continue
                rows[method] = json.loads(res.stdout.strip().splitlines()[-1])
            loop = rows.get("per-image loop", {}).get("seconds")
            retina = rows.get("retinanet_loss", {}).get("seconds")
            sig = rows.get("sigmoid pass", {}).get("seconds")
            for method, r in rows.items():
                ratio = lambda base: f"{r['seconds'] / base:.2f}" if base else "-"
                print(f"| {B} | {G} | {method} | {r['seconds'] * 1e3:.1f} | {ratio(loop)} | {ratio(retina)} "
                      f"| {ratio(sig)} | {r['peak_mb']:.0f} |", flush=True)
            for compiled in (m for m in COMPILED_LOSSES if m in rows):
                compile_times.append(f"{compiled}, B={B} G={G}: {rows[compiled]['first_call_s']:.1f} s")
                a, b = rows[compiled]["values"], rows.get("free_anchor_loss", {}).get("values")
                if b:  # the same loss, compiled: float32 rounding apart
                    assert all(abs(a[k] - b[k]) <= 1e-4 * abs(b[k]) for k in a), f"compiled {a} vs eager {b}"
            if "free_anchor_loss" in rows and "per-image loop" in rows:  # same loss, two implementations
                # The negative term must agree to float32 rounding. The positive term only closely:
                # anchors with exactly equal IoU (common with integer anchors) tie for the last places
                # of a bag, and topk breaks ties arbitrarily while free_anchor_loss takes the lower index.
                a, b = rows["free_anchor_loss"]["values"], rows["per-image loop"]["values"]
                rel = {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a}
                assert rel["negative"] < 1e-4 and rel["positive"] < 1e-2, \
                    f"free_anchor_loss and the per-image loop disagree: {a} vs {b}"
    if compile_times:
        print(f"\nfirst call of the compiled loss (includes compiling, or recompiling where a guard fails): "
              f"{'; '.join(compile_times)}")
    for B, G in args.profile or []:
        profile(B, G, args.device, [m for m in methods if m == "free_anchor_loss" or m in COMPILED_LOSSES])


if __name__ == "__main__":
    main()
