"""Where the host waits for the GPU: host-device synchronisations of a training step and of detect.

Every synchronisation stops the host from queueing work ahead of the GPU, so a loop that waits for
the device several times per step leaves it idle in between. This counts them, with
torch.cuda.set_sync_debug_mode("warn") (which flags every synchronising call torch makes: reads
of a value, data-dependent shapes, blocking copies; a first row checks the count on two known
reads), in
  - train.py's steady-state step: `train.main` on a small generated COCO-layout dataset, as a user
    runs it (uint8 images through the loader, resized and normalised on the GPU, network, loss,
    backward, the device-side skip of non-finite steps), counted between the optimizer steps
    after the first two; the target is 0 (the host reads values only where it logs);
  - `RetinaNet.detect` on a batch of 8 images: two reads for the batch up to NMS, then
    torchvision's batched_nms for each image; and evaluate.py's copy of the results to the host,
    one per field.
On a CPU (no synchronisation exists there) it counts the ops that would be one on a GPU (reads of
a value, data-dependent shapes) instead, as a dry run; blocking copies are invisible there.

    python benchmarks/syncs.py --device cuda --compile
    python benchmarks/syncs.py --device cuda --compile --dynamic    # also --compile --no-fixed-shapes
    python benchmarks/syncs.py                  # CPU dry run (~1 min)

Prints a small table; never passes or fails.
"""

import argparse
import os
import sys
import tempfile
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]
import train  # noqa: E402
from evaluate import batch_to_host  # noqa: E402
from inference import confident_heads  # noqa: E402
from model import RetinaNet  # noqa: E402
from test_train import make_dataset  # noqa: E402

DATA_DEPENDENT = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.item", "aten.masked_select"}


SYNC_WARNING = "called a synchronizing CUDA operation"  # set_sync_debug_mode("warn")'s message


class SyncCounter:
    """Counts synchronisations on CUDA (set_sync_debug_mode's warnings), data-dependent ops on CPU.

    torch turns a C++ warning into a Python warning only for ops called through its Python
    bindings; ops called through torch.ops (torchvision's nms, compiled graphs' calls) print it to
    stderr instead. So on CUDA both are counted: Python's warnings, and the lines written to file
    descriptor 2 while counting (captured in a file, and passed on to stderr at the end, all but
    the counted warnings)."""

    def __init__(self, device):
        self.device, self.count = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._start_capture()
            torch.cuda.set_sync_debug_mode("warn")
        else:
            counter = self

            class Mode(torch.utils._python_dispatch.TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    counter.count += str(func.overloadpacket) in DATA_DEPENDENT
                    return func(*args, **(kwargs or {}))

            self._mode = Mode()
            self._mode.__enter__()
        return self

    def _start_capture(self):
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved_stderr = os.dup(2)
        os.dup2(self._file.fileno(), 2)

    def _captured(self):
        fd = self._file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")  # pread: leaves the offset

    def read(self):
        if self.device == "cuda":
            self.count = (sum(SYNC_WARNING in str(w.message) for w in self._caught)
                          + self._captured().count(SYNC_WARNING))
        return self.count

    def _stop_capture(self, *exc):
        self.read()
        os.dup2(self._saved_stderr, 2)
        os.close(self._saved_stderr)
        other = [line for line in self._captured().splitlines(keepends=True) if SYNC_WARNING not in line]
        self._file.close()
        sys.stderr.write("".join(other))
        self._warnings.__exit__(*exc)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            self._stop_capture(*exc)
        else:
            self._mode.__exit__(*exc)


def training_step_syncs(device, steps, compile, fixed_shapes=False):
    """Synchronisations in each of train.main's steps after the first two (warm-up, and the first
    step's caches)."""
    work = tempfile.TemporaryDirectory()  # the dataset and the run's checkpoints (~230 MB), removed after
    root = make_dataset(os.path.join(work.name, "data"), num_images=16, size=256)
    real_step, per_step = train.step_unless, []
    counter = SyncCounter(device)

    def recording_step(optimizer, skip):
        real_step(optimizer, skip)
        per_step.append(counter.read())

    canvases = set()  # the padded shapes the network met (--fixed-shapes: one graph each)
    real_pad = train.pad_to_canvas

    def recording_pad(images, shapes):
        images = real_pad(images, shapes)
        canvases.add(tuple(images.shape[-2:]))
        return images

    train.step_unless, train.pad_to_canvas = recording_step, recording_pad
    args = ["--data", root, "--backbone", "resnet18", "--weights", "none", "--min-size", "224", "256",
            "--max-size", "320", "--batch-size", "4", "--max-iter", str(steps), "--log-every", "1000",
            "--ckpt-every", "1000", "--workers", "2", "--device", device,
            "--output", os.path.join(work.name, "run")] + (["--compile"] if compile else []) \
        + ([] if fixed_shapes else ["--no-fixed-shapes"])
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    try:
        with counter:
            train.main(args)
    finally:
        train.step_unless, train.pad_to_canvas = real_step, real_pad
        work.cleanup()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    # a canvas and its transpose have the same anchor count (the loss's graph is one per anchor count)
    anchor_counts = len({tuple(sorted(c)) for c in canvases})
    return [b - a for a, b in zip(per_step[1:], per_step[2:])], graphs, len(canvases), anchor_counts


def detect_syncs(device, batch):
    """Synchronisations of detect before NMS, with NMS, and of evaluate.py's copy to the host; and
    the detections per image (at the prior's scores, below the threshold, there would be none, and
    NMS and the copies, which skip empty tensors, would count nothing)."""
    torch.manual_seed(0)  # the random backbone decides whether any score passes the threshold: some seeds give none
    model = RetinaNet(80, backbone="resnet18", weights="none").to(device)
    confident_heads(model)
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=g).to(device) for _ in range(batch)]
    model.detect(images)  # warm-up: cuDNN, caches
    counts = {}
    for nms in (False, True):
        with SyncCounter(device) as counter:
            dets = model.detect(images, nms=nms)
        counts[nms] = counter.count
    with SyncCounter(device) as counter:
        for k in ("boxes", "scores", "labels"):
            batch_to_host([d[k] for d in dets])
    return counts[False], counts[True] - counts[False], counter.count, [len(d["boxes"]) for d in dets]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=6, help="training steps (the first two are not counted)")
    ap.add_argument("--compile", action="store_true", help="also count train.py --compile's steps")
    ap.add_argument("--dynamic", action="store_true",
                    help="with --compile, also count train.py --compile --no-fixed-shapes's steps (its network "
                         "compiled for any size: not finished within 2.5 minutes of compilation on an H200)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    what = "host-device synchronisations" if args.device == "cuda" else "data-dependent ops (CPU dry run)"
    print(f"\n# {what}, {args.device}, torch {torch.__version__}\n")
    print("| what | count |")
    print("|---|---|", flush=True)
    x = torch.ones((), device=args.device)
    with SyncCounter(args.device) as counter:  # the counter's own check: two known reads of a value
        x.item(), torch.ops.aten._local_scalar_dense(x)
    print(f"| control: a .item() and the same read through torch.ops | {counter.count} (expected: 2) |")
    before_nms, nms, copies, detections = detect_syncs(args.device, 8)
    if min(detections) == 0:  # the training rows still count
        print(f"| RetinaNet.detect: not counted, no detection in some images ({detections}) | - |")
    else:
        print(f"| RetinaNet.detect, 8 images ({min(detections)}-{max(detections)} detections each), up to NMS | "
              f"{before_nms} (target on CUDA: 2, the compaction of the batch; the CPU dry run sees 1, a .tolist() "
              f"is no op there) |")
        print(f"| its NMS, one batched_nms per image | {nms} |")
        print(f"| evaluate.py's copy of the 8 images' detections to the host | {copies} (target on CUDA: 3, one per field) |",
              flush=True)
    runs = [("train.py step (eager)", False, False)]
    if args.compile:
        # the static graphs first: they compile in a fraction of the dynamic ones' time
        runs += [("train.py step (--compile, fixed shapes)", True, True)]
        runs += [("train.py step (--compile --no-fixed-shapes)", True, False)] * args.dynamic
    for name, compile, fixed_shapes in runs:  # each row printed as soon as it is measured
        torch._dynamo.reset()  # each run compiles afresh, as a new process would
        counts, graphs, canvases, anchor_counts = training_step_syncs(args.device, args.steps, compile, fixed_shapes)
        print(f"| {name}, steps 3..{args.steps} | {' '.join(map(str, counts))} (target on CUDA: 0 each) |", flush=True)
        if compile and args.device == "cuda":  # (on CPU the dry run's counting mode keeps torch.compile off)
            # image sizes vary (--min-size 224 256): the network once per canvas met (224 only where all
            # 4 images of a batch drew 224) and the loss once per their anchor counts, or with
            # --no-fixed-shapes dynamic shapes, not a graph per size
            expected = (f"{canvases + anchor_counts}: network for the {canvases} canvas(es) met, loss for their "
                        f"{anchor_counts} anchor count(s)" if fixed_shapes else "2: network and loss")
            print(f"| {name}: graphs compiled in {args.steps} steps | {graphs} ({expected}) |", flush=True)


if __name__ == "__main__":
    main()
