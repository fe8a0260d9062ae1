"""Inference speed: `RetinaNet.detect` against torchvision's `retinanet_resnet50_fpn`.

Both models are ResNet-50-FPN RetinaNets with 91 classes (torchvision's default head size) and the
very same weights (ours copied into torchvision's through `to_torchvision`), so they do the same
work: resize to 800 (at most 1333), normalise, pad, backbone, heads, score > 0.05, top 1000 per
level, class-wise NMS 0.5, 100 detections per image (torchvision's default of 300 is set to our
100). Random weights would score every anchor near the 0.02 prior, below the 0.05 threshold, and
leave NMS with nothing to do: the classification head gets a wider, shifted output instead, so that
each image sends thousands of candidates to NMS, as a trained detector does. The images are random
600x1000 pictures, which both models resize to 800x1333 (padded to 800x1344); each batch is timed
on one model then the other, after a warm-up. With --batch N, ours detects N images per call (one
forward pass, as evaluate.py does) while torchvision's gets them one by one (its batched forward
is the same network); --channels-last and --compile apply to ours (evaluate.py's defaults on a
GPU of compute capability 8.0 or later: --amp --channels-last --batch 8). "Same detections" compares the two; under --amp they differ by
more than rounding (our frozen BatchNorm runs in bfloat16, torchvision's in float32), so fewer
images match there.

    python benchmarks/inference.py                          # CPU, 5 images
    python benchmarks/inference.py --device cuda --amp --images 50
    python benchmarks/inference.py --device cuda --amp --channels-last --batch 8 --images 200

Prints a markdown table; never passes or fails on time.
"""

import argparse
import os
import platform
import sys
import time

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import RetinaNet, to_torchvision  # noqa: E402
from evaluate import compile_network  # noqa: E402


def confident_heads(m, seed=0):
    """Scores spread around the 0.05 threshold instead of sitting at the prior (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv = m.cls_head[-1]
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.05)
        conv.bias.fill_(-3.5)
        conv = m.box_head[-1]
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.02)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast, as evaluate.py on CUDA (on a CPU it uses it only with native bfloat16)")
    parser.add_argument("--images", type=int, default=5, help="timed images (in calls of --batch images)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per model first")
    parser.add_argument("--batch", type=int, default=1, help="images per detect call of ours")
    parser.add_argument("--channels-last", action="store_true", help="ours in channels_last")
    parser.add_argument("--compile", action="store_true", help="ours under torch.compile (the network)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.images < 1 or args.warmup < 0 or args.batch < 1:
        sys.exit("--images and --batch must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)

    torch.manual_seed(0)
    ours = RetinaNet(91, backbone="resnet50", weights="none")  # BatchNorm2d, like torchvision's below
    confident_heads(ours)
    theirs = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    theirs.load_state_dict(to_torchvision(ours).state_dict())
    theirs.detections_per_img = ours.detections_per_img
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
    if args.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    if args.compile:
        compile_network(ours)  # as evaluate.py --compile

    g = torch.Generator().manual_seed(1)
    n_batches = -(-args.images // args.batch)
    images = [torch.rand(3, 600, 1000, generator=g).to(device) for _ in range((n_batches + args.warmup) * args.batch)]
    batches = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]
    amp_dtype = torch.bfloat16  # evaluate.py's autocast dtype

    def run_ours(batch):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            return ours.detect(batch)

    def run_theirs(batch):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            return [theirs([image])[0] for image in batch]

    seconds = {"ours": 0.0, "theirs": 0.0}
    same, candidates = 0, 0
    for i, batch in enumerate(batches):
        t_ours, dets_ours = timed(lambda: run_ours(batch), device)
        t_theirs, dets_theirs = timed(lambda: run_theirs(batch), device)
        if i < args.warmup:
            continue
        seconds["ours"] += t_ours
        seconds["theirs"] += t_theirs
        for d_ours, d_theirs in zip(dets_ours, dets_theirs):
            same += len(d_ours["boxes"]) == len(d_theirs["boxes"]) and torch.equal(d_ours["labels"], d_theirs["labels"]) \
                and torch.allclose(d_ours["boxes"].float(), d_theirs["boxes"].float(), rtol=1e-3, atol=0.5)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
            candidates += sum(len(c["boxes"]) for c in ours.detect(batch, nms=False))

    n = n_batches * args.batch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"Inference, ResNet-50-FPN, 91 classes, 600x1000 images resized to 800x1333, ours: batch {args.batch}"
          f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}; theirs batch 1, "
          f"{n} images after {args.warmup} warm-up; {name}; AMP {'on' if args.amp else 'off'}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"{candidates / n:.0f} candidates per image before NMS; same detections on {same}/{n} images\n")
    print("| model | images/s | s/image | speed vs torchvision |")
    print("|---|---|---|---|")
    for key, label in (("ours", "`RetinaNet.detect` (model.py)"), ("theirs", "torchvision `retinanet_resnet50_fpn`")):
        print(f"| {label} | {n / seconds[key]:.2f} | {seconds[key] / n:.3f} | "
              f"{seconds['theirs'] / seconds[key]:.2f}x |")


if __name__ == "__main__":
    main()
