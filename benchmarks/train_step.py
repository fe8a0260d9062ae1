"""What a training step costs with FreeAnchor vs the RetinaNet loss vs torchvision (issue #7).

One SGD step (forward, loss, backward, update) on the same images and boxes for
  - ours + free_anchor_loss    (train.py --loss freeanchor)
  - ours + retinanet_loss      (train.py --loss retinanet): the baseline every ratio refers to
  - torchvision's retinanet_resnet50_fpn training step (its own matcher, focal loss and L1)
all with the same backbone, weights initialised identically (ours exported with to_torchvision),
frozen BatchNorm as with pretrained weights. The paper's anchor: FreeAnchor trains +5% slower than
RetinaNet (5.27 h vs 5.02 h, §4.3). Each configuration runs in its own subprocess so that its
peak memory is its own (CPU: peak resident memory; CUDA: torch.cuda.max_memory_allocated).

    python benchmarks/train_step.py                                 # CPU: resnet50, 2 images of 512x640
    python benchmarks/train_step.py --device cuda --amp --batch 2 16 --size 800 1333
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeanchor  # noqa: E402
from model import RetinaNet, batch_images, normalize, to_torchvision  # noqa: E402

METHODS = ("retinanet_loss", "free_anchor_loss", "torchvision")
K = 80


def make_batch(B, H, W, seed=0):
    """B images [3, H, W] in [0, 1] with 5-15 boxes each, and their boxes/labels."""
    g = torch.Generator().manual_seed(seed)
    images, boxes, labels = [], [], []
    for _ in range(B):
        images.append(torch.rand(3, H, W, generator=g))
        n = int(torch.randint(5, 16, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * torch.tensor([W / 3, H / 3]) + 16
        xy = torch.rand(n, 2, generator=g) * (torch.tensor([W, H]) - wh)
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, K, (n,), generator=g))
    return images, boxes, labels


def run_one(method, backbone, B, H, W, device, amp, steps):
    torch.manual_seed(0)
    # a "pretrained" backbone from a local file: FrozenBatchNorm and frozen stem, as in the paper's runs
    path = f"/tmp/freeanchor_bench_{backbone}.pt"
    if not os.path.exists(path):
        import torchvision
        torch.save(torchvision.models.get_model(backbone).state_dict(), path)
    model = RetinaNet(K, backbone=backbone, weights=path, min_size=min(H, W), max_size=max(H, W))
    images, boxes, labels = make_batch(B, H, W)
    device = torch.device(device)
    boxes, labels = [b.to(device) for b in boxes], [l.to(device) for l in labels]
    if method == "torchvision":
        net = to_torchvision(model).to(device).train()
        inputs = [im.to(device) for im in images]
        targets = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]
    else:
        net = model.to(device).train()
        batch = batch_images([normalize(im) for im in images]).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(steps + 1):  # the first step warms up
        if step == 1 and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if method == "torchvision":
                losses = net(inputs, targets)
            else:
                cls_logits, box_deltas, anchors = net(batch)
        if method != "torchvision":
            fn = freeanchor.free_anchor_loss if method == "free_anchor_loss" else freeanchor.retinanet_loss
            losses = fn(cls_logits, box_deltas, anchors, boxes, labels)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = sorted(times[1:])
    print(json.dumps({"seconds": times[len(times) // 2], "peak_mb": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, nargs="+", default=[2], help="images per step")
    ap.add_argument("--size", type=int, nargs=2, default=[512, 640], metavar=("H", "W"))
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (the loss stays float32)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    H, W = args.size
    if args._one:
        run_one(args._one[0], args.backbone, int(args._one[1]), H, W, args.device, args.amp, args.steps)
        return

    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        machine = f"{name}, {os.cpu_count()} cores"
    print(f"# training step, {args.backbone}, {H}x{W}, K = {K}, {'bf16 autocast' if args.amp else 'float32'}")
    print(f"# {args.device}: {machine}; torch {torch.__version__}; median of {args.steps} steps\n")
    print("| images | method | s/iter | images/s | vs retinanet_loss | peak memory (MB) |")
    print("|---|---|---|---|---|---|")
    for B in args.batch:
        rows = {}
        for method in METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--backbone", args.backbone,
                   "--size", str(H), str(W), "--steps", str(args.steps), "--_one", method, str(B)]
            if args.amp:
                cmd.append("--amp")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"| {B} | {method} | failed: {res.stderr.strip().splitlines()[-1]} | | | |")
                continue
            rows[method] = json.loads(res.stdout.strip().splitlines()[-1])
        base = rows.get("retinanet_loss", {}).get("seconds")
        for method, r in rows.items():
            ratio = f"{r['seconds'] / base:.3f}" if base else "-"
            print(f"| {B} | {method} | {r['seconds']:.3f} | {B / r['seconds']:.2f} | {ratio} | {r['peak_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
