"""What a training step costs: the network alone, with the FreeAnchor loss, with the RetinaNet
loss, and torchvision's RetinaNet, eager (NCHW), in channels_last, and under torch.compile.

One SGD step (forward, loss, backward, fused SGD update, as train.py does) on the same images and
boxes for
  - model_only          the network with a trivial loss (a scaled sum of its outputs): the ceiling, the
                        reference every ratio refers to
  - free_anchor_loss    train.py --loss freeanchor
  - retinanet_loss      train.py --loss retinanet
  - torchvision         torchvision's retinanet_resnet50_fpn training step (its own matcher and
                        losses), eager only
each in the modes
  - eager               NCHW
  - channels_last       the network's weights and input in channels_last (train.py's default on
                        GPUs from compute capability 8.0)
  - compiled            channels_last, network and loss each under torch.compile, image size, object
                        and anchor counts marked dynamic as train.py --compile --no-fixed-shapes marks them
  - compiled_static     train.py --compile, which by default pads every batch to one of a few fixed
                        shapes (--fixed-shapes; faster on an H200, to compile and to run): the network
                        compiled for this one padded shape, static, the loss for its anchor count
                        (static) and any object count
  - compiled_static_graphs  the same with every shape static and torch.compile's mode="reduce-overhead":
                        each compiled forward and backward replayed as one CUDA graph, without the
                        host's kernel launches (CUDA only; not a train.py option)
with the same backbone, weights initialised identically, frozen BatchNorm as with pretrained
weights. On CUDA the network runs under bfloat16 autocast by default where the GPU has native
bfloat16, compute capability 8.0 on, as in train.py (--no-amp: float32), the loss in float32.
Each row runs in its own subprocess, so that its peak memory is its own (CPU: peak resident
memory; CUDA: torch.cuda.max_memory_allocated); "first step" is the first step's time,
compilation included for compiled rows. s/iter is the median of steps timed one by one, each
starting with an idle GPU; on CUDA, "back to back" is the mean of as many steps run with no
synchronisation between them, as train.py runs them, where the host queues a step's work while the
GPU still runs the step before.

    python benchmarks/train_step.py --backbone resnet18 --size 128 160 --batch 2      # CPU smoke test
    python benchmarks/train_step.py --device cuda --size 800 1333 --batch 2 8 16      # every row
    python benchmarks/train_step.py --device cuda --size 800 1333 --batch 16 --modes compiled \\
        --methods model_only free_anchor_loss                                         # ~3 min on an H100

Prints a markdown table; never passes or fails on time.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.autograd import DeviceType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeanchor  # noqa: E402
from data import gpu_has_native_bf16, pad_targets  # noqa: E402
from model import RetinaNet, batch_images, host_to_device, normalize, to_torchvision  # noqa: E402

MODES = ("eager", "channels_last", "compiled", "compiled_static", "compiled_static_graphs")
METHODS = ("model_only", "free_anchor_loss", "retinanet_loss", "torchvision")
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


def model_only_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels):
    """A trivial loss that touches every output: the step then costs the network alone. A sum, not a
    mean: the mean's gradient (1 / (B A K) per logit) turns into denormal floats further back, which
    a CPU computes many times slower (it made this row 5-15x slower than the FreeAnchor one)."""
    return {"outputs": 1e-3 * (cls_logits.float().sum() + box_deltas.float().sum())}


def run_one(mode, method, backbone, B, H, W, device, amp, steps, warmup, profile=False):
    torch.manual_seed(0)
    # a "pretrained" backbone from a local file: FrozenBatchNorm and frozen stem, as in the paper's runs
    path = f"/tmp/freeanchor_bench_{backbone}.pt"
    if not os.path.exists(path):
        import torchvision
        torch.save(torchvision.models.get_model(backbone).state_dict(), path + f".{os.getpid()}")
        os.replace(path + f".{os.getpid()}", path)
    model = RetinaNet(K, backbone=backbone, weights=path, min_size=min(H, W), max_size=max(H, W))
    images, boxes, labels = make_batch(B, H, W)
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    # the objects as train.py passes them: padded to a multiple of 8, label -1 at the padding
    gt_boxes, gt_labels = pad_targets(boxes, labels, 8)  # [B, G, 4], [B, G]
    gt_boxes, gt_labels = host_to_device(gt_boxes, device), host_to_device(gt_labels, device)
    num_objects = torch.full((), float(sum(len(l) for l in labels)), device=device)  # [], as train.py
    boxes, labels = [b.to(device) for b in boxes], [l.to(device) for l in labels]
    memory_format = torch.contiguous_format if mode == "eager" else torch.channels_last
    if method == "torchvision":
        net = to_torchvision(model).to(device, memory_format=memory_format).train()
        inputs = [im.to(device) for im in images]
        targets = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]
    else:
        net = model.to(device, memory_format=memory_format).train()
        batch = batch_images([normalize(im) for im in images]).to(device, memory_format=memory_format)
        loss_fn = {"model_only": model_only_loss, "free_anchor_loss": freeanchor.free_anchor_loss,
                   "retinanet_loss": freeanchor.retinanet_loss}[method]
        if mode == "compiled_static_graphs":  # every shape static, replayed as CUDA graphs
            net = torch.compile(net, dynamic=False, mode="reduce-overhead")
            loss_fn = freeanchor.compile_loss(loss_fn, dynamic=False, mode="reduce-overhead")
        elif mode.startswith("compiled"):  # compiled_static: the network static, as train.py --compile
            net = torch.compile(net, dynamic=None if mode == "compiled" else False)
            loss_fn = freeanchor.compile_loss(loss_fn)
            # the dimensions train.py --compile marks dynamic: the object count, and with
            # --no-fixed-shapes the image size and the anchor count
            torch._dynamo.maybe_mark_dynamic(gt_boxes, 1), torch._dynamo.maybe_mark_dynamic(gt_labels, 1)
        if mode == "compiled":
            torch._dynamo.maybe_mark_dynamic(batch, [2, 3])
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9, fused=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if method == "torchvision":
                losses = net(inputs, targets)
            else:
                cls_logits, box_deltas, anchors = net(batch)
        if mode == "compiled" and method != "torchvision":  # A, as train.py --no-fixed-shapes marks it
            torch._dynamo.maybe_mark_dynamic(cls_logits, 1), torch._dynamo.maybe_mark_dynamic(box_deltas, 1)
            torch._dynamo.maybe_mark_dynamic(anchors, 0)
        if method == "free_anchor_loss":
            losses = loss_fn(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, num_objects=num_objects)
        elif method != "torchvision":
            losses = loss_fn(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = []
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    back_to_back = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        # as train.py runs: no synchronisation between steps, so that the host queues a step's work
        # while the GPU still runs the step before (each timed step above starts with an idle GPU)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync()
        back_to_back = (time.perf_counter() - t0) / steps
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = sorted(times[warmup:])
    if profile:  # one more step: the ops (CPU) or kernels (CUDA) that take the most of it
        from torch.profiler import ProfilerActivity
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            one_step()
            sync()
        print(prof.key_averages().table(sort_by="self_device_time_total" if device.type == "cuda" else
                                        "self_cpu_time_total", row_limit=25, max_name_column_width=80))
        print(step_regions(prof, device.type == "cuda"))
    print(json.dumps({"seconds": timed[len(timed) // 2], "first": times[0], "peak_mb": peak, "back_to_back": back_to_back}))


def step_regions(prof, cuda, kernels=6):
    """The profiled step's top-level ops in the order they started (the network's and the loss's
    compiled forwards, their backwards, the optimizer, ...), each with the time of everything it ran
    (on CUDA: the device time of the kernels it launched) and its longest kernels: which part of the
    step each kernel belongs to, where the table above sums kernels of one name over the step."""
    def own_kernels(event):
        found = list(event.kernels)
        for child in event.cpu_children:
            found += own_kernels(child)
        return found

    tops = sorted((e for e in prof.events() if e.cpu_parent is None and e.device_type == DeviceType.CPU),
                  key=lambda e: e.time_range.start)  # the ops the host ran (kernels have no parent either)
    lines = ["", "| top-level op, in order | %s (ms) | longest kernels (ms) |" % ("device" if cuda else "CPU"),
             "|---|---|---|"]
    for event in tops:
        total = (event.device_time_total if cuda else event.cpu_time_total) / 1e3
        if total < 0.01:
            continue
        by_name = {}
        for k in own_kernels(event):
            by_name[k.name] = by_name.get(k.name, 0.0) + k.duration / 1e3
        longest = sorted(by_name.items(), key=lambda kv: -kv[1])[:kernels]
        lines.append(f"| {event.name[:72]} | {total:.3f} | " + "; ".join(f"{n[:90]} {t:.3f}" for n, t in longest) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, nargs="+", default=[2], help="images per step")
    ap.add_argument("--size", type=int, nargs=2, default=[512, 640], metavar=("H", "W"))
    ap.add_argument("--modes", nargs="+", default=[m for m in MODES if m != "compiled_static_graphs"], choices=MODES)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bfloat16 autocast for the network, the loss stays float32 (default: on with a GPU "
                         "of compute capability 8.0 or later, as train.py)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default: 1, compiled rows 3: compilation and a recompilation)")
    ap.add_argument("--row-timeout", type=float, default=None, help="give up a row after this many seconds")
    ap.add_argument("--profile", action="store_true",
                    help="after the table, torch.profiler's table of one more step of each row (on CUDA its "
                         "kernels by GPU time)")
    ap.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if "compiled_static_graphs" in args.modes and args.device != "cuda":
        ap.error("--modes compiled_static_graphs: CUDA graphs need --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    amp = (args.device == "cuda" and gpu_has_native_bf16(None)) if args.amp is None else args.amp
    H, W = args.size
    if args._one:
        mode, method, B = args._one
        warmup = args.warmup if args.warmup is not None else (3 if mode.startswith("compiled") else 1)
        run_one(mode, method, args.backbone, int(B), H, W, args.device, amp, args.steps, warmup, args.profile)
        return

    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        machine = f"{name}, {os.cpu_count()} cores"
    print(f"# training step, {args.backbone}, {H}x{W}, K = {K}, {'bf16 autocast' if amp else 'float32'}, fused SGD")
    print(f"# {args.device}: {machine}; torch {torch.__version__}; median of {args.steps} steps, "
          f"then {args.steps} back to back (CUDA)\n")
    print("| images | mode | method | s/iter | images/s | vs model_only | first step (s) | peak memory (MB) "
          "| back to back: s/iter | images/s | vs model_only |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    profiles = []  # printed after the table
    for B in args.batch:
        for mode in args.modes:
            base = base_b2b = None
            for method in args.methods:
                if method == "torchvision" and mode.startswith("compiled"):
                    continue  # its step has data-dependent Python control flow; eager and channels_last only
                cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--backbone",
                       args.backbone, "--size", str(H), str(W), "--steps", str(args.steps),
                       "--amp" if amp else "--no-amp", "--_one", mode, method, str(B)]
                if args.warmup is not None:
                    cmd += ["--warmup", str(args.warmup)]
                if args.profile:
                    cmd += ["--profile"]
                try:
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout)
                except subprocess.TimeoutExpired:
                    print(f"| {B} | {mode} | {method} | over --row-timeout {args.row_timeout:g} s | | | | | | | |", flush=True)
                    continue
                if res.returncode != 0:
                    last = (res.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"| {B} | {mode} | {method} | failed: {last} | | | | | | | |", flush=True)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                b2b = r.get("back_to_back")
                if method == "model_only":
                    base, base_b2b = r["seconds"], b2b
                ratio = f"{r['seconds'] / base:.3f}" if base else "-"
                b2b_cells = (f"{b2b:.4f} | {B / b2b:.1f} | {b2b / base_b2b:.3f}" if b2b and base_b2b else
                             f"{b2b:.4f} | {B / b2b:.1f} | -" if b2b else "- | - | -")
                print(f"| {B} | {mode} | {method} | {r['seconds']:.4f} | {B / r['seconds']:.1f} | {ratio} | "
                      f"{r['first']:.1f} | {r['peak_mb']:.0f} | {b2b_cells} |", flush=True)
                if args.profile:
                    profiles.append((f"{mode}, {method}, B = {B}", res.stdout.strip().splitlines()[:-1]))
    for name, lines in profiles:
        print(f"\n# profile of one step: {name}")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
