"""Data path costs: a worker's CPU time per sample against a plain JPEG decode, loader throughput
with 1, 2, ... workers, the header check per 10k images, and the resident memory of a training
dataset built from a COCO-shaped annotation file.

Everything is synthetic and generated into a temporary folder:
- 640x480 JPEGs (COCO's typical size) of smooth shapes on noisy gradients, quality 90;
- a COCO-shaped annotation file the size of 1/5 of train2017 (23,600 images, ~170k annotations with
  polygon segmentations, ~60 MB of JSON; its image files are empty: construction only checks
  that they exist).

Rows:
- "decode": PIL open + decode + RGB array, the floor of any sample;
- "sample, uint8 (device resizes)": dataset[(i, 800, flip)] as the workers of a GPU run produce it;
- "sample, resized in the worker": the same key with resize_in_worker (float32, normalised, resized
  on the CPU: what every run's workers did before samples became uint8, and what a CPU-only run
  still does);
- per-image CPU time in one process with one torch thread, like a DataLoader worker;
- loader: images/s through DataLoader(batch_sampler=TrainSampler(batch 2), collate) with k
  workers into a consumer that does nothing, uint8 path, and the bytes of one batch;
- memory: RSS growth of a fresh process while it builds CocoDataset(train=True) from the
  annotation file, against the same process building pycocotools' COCO index of it (what the
  dataset kept before); --baseline-code DIR also builds the CocoDataset of an older checkout.

    python benchmarks/data.py                      # all of it (~3 min on 2 cores)
    python benchmarks/data.py --device cuda        # + the step's preprocessing on the GPU
    python benchmarks/data.py --baseline-code /path/to/older/checkout

Prints markdown tables; never passes or fails on time.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from data import CocoDataset, TrainSampler, collate, to_device  # noqa: E402


def write_jpegs(folder, n, size=(640, 480), seed=0):
    """n photo-like JPEGs; returns their COCO 'images' entries and one annotation each."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    images, annotations = [], []
    for k in range(n):
        t = np.linspace(0, 1, w)[None, :, None] * rng.uniform(40, 200, 3) + np.linspace(0, 1, h)[:, None, None] * 40
        pixels = np.clip(t + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)  # [h, w, 3]
        img = Image.fromarray(pixels)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 80)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        name = f"{k:012d}.jpg"
        img.save(os.path.join(folder, name), quality=90)
        images.append({"id": k + 1, "file_name": name, "width": w, "height": h})
        annotations.append({"id": k + 1, "image_id": k + 1, "category_id": 1, "bbox": [100, 100, 200, 150],
                            "iscrowd": 0, "area": 30000.0})
    return images, annotations


def write_coco(root, split, images, annotations):
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in range(1, 91)]}, f)
    return path


def cpu_ms_per_call(fn, keys, repeats):
    """CPU time (this process) per call of fn(key), best of `repeats` passes over keys."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for key in keys:
            fn(key)
        best = min(best, (time.process_time() - start) / len(keys) * 1000)
    return best


def sample_costs(root, n, repeats):
    torch.set_num_threads(1)  # a DataLoader worker runs one torch thread
    ds = CocoDataset(root, "img", train=True)
    keys = [(i, 800, i % 2 == 1) for i in range(n)]

    def decode(i):
        with Image.open(ds.path(i)) as img:
            return np.asarray(img.convert("RGB"))

    decode_ms = cpu_ms_per_call(decode, range(n), repeats)
    uint8_ms = cpu_ms_per_call(ds.__getitem__, keys, repeats)
    ds.resize_in_worker = True
    worker_ms = cpu_ms_per_call(ds.__getitem__, keys, repeats)
    print("\n| per 640x480 JPEG, one thread | CPU ms | x decode |\n|---|---:|---:|")
    for name, ms in (("decode (PIL open + decode + RGB)", decode_ms), ("sample, uint8 (device resizes)", uint8_ms),
                     ("sample, resized in the worker (float32, 1067x800)", worker_ms)):
        print(f"| {name} | {ms:.2f} | {ms / decode_ms:.2f} |")


def loader_throughput(root, worker_counts, batches):
    ds = CocoDataset(root, "img", train=True)
    print("\n| workers | images/s (consumer does nothing) |\n|---:|---:|")
    for workers in worker_counts:
        sampler = TrainSampler(ds, batch_size=2, min_sizes=(800,), max_iter=batches + 5)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        it = iter(loader)
        for _ in range(5):  # start-up and warm-up
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = 2 * batches / (time.perf_counter() - start)
        del it
        print(f"| {workers} | {rate:.0f} |")
    ds.resize_in_worker = False
    images, targets = collate([ds[(0, 800, False)], ds[(1, 800, True)]])
    ds.resize_in_worker = True
    floats, _ = collate([ds[(0, 800, False)], ds[(1, 800, True)]])
    print(f"\nbytes of a 2-image batch through shared/pinned memory: uint8 {images.numel() / 2**20:.1f} MB, "
          f"float32 resized in the worker {floats.numel() * 4 / 2**20:.1f} MB")
    return ds, images, targets


def header_check(root, count):
    ds = CocoDataset(root, "img", train=True)
    paths, sizes = [ds.path(i) for i in range(len(ds))], ds._sizes.tolist()
    count = max(1, count)
    reps = -(-count // len(paths))  # the same files again: the page cache holds them, as after a first epoch
    paths, sizes = (paths * reps)[:count], (sizes * reps)[:count]
    cpus = data.available_cpus()
    print(f"\n| header check of {len(paths)} JPEGs | s | s per 10k images |\n|---|---:|---:|")
    for workers in sorted({1, cpus}):
        start = time.perf_counter()
        data.check_images(paths, sizes, workers=workers, show_progress=False)
        seconds = time.perf_counter() - start
        print(f"| {workers} process(es) | {seconds:.2f} | {seconds / len(paths) * 1e4:.2f} |")


MEMORY_CHILD = """
import gc, os, sys, contextlib, io
sys.path.insert(0, sys.argv[1])
import data
def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss()
if sys.argv[3] == "dataset":
    ds = data.CocoDataset(sys.argv[2], "big", train=True)
else:
    from pycocotools.coco import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        ds = COCO(os.path.join(sys.argv[2], "annotations", "instances_big.json"))
print(rss() - before)
"""


def memory(tmp, images=23600, per_image=7.2, seed=0):
    """RSS growth (MB) of building the training dataset of a COCO-shaped annotation file."""
    rng = np.random.default_rng(seed)
    root = os.path.join(tmp, "big")
    os.makedirs(os.path.join(root, "big"))
    entries, annotations = [], []
    for k in range(images):
        w, h = (640, 480) if rng.random() < 0.7 else (480, 640)
        name = f"{k + 1:012d}.jpg"
        open(os.path.join(root, "big", name), "wb").close()
        entries.append({"license": 1, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                        "height": h, "width": w, "date_captured": "2013-11-14 16:28:13",
                        "flickr_url": f"http://farm4.staticflickr.com/3153/{name}", "id": k + 1})
        for _ in range(rng.poisson(per_image)):
            x, y, bw, bh = (round(float(v), 2) for v in (rng.uniform(0, w - 20), rng.uniform(0, h - 20),
                                                         rng.uniform(2, 200), rng.uniform(2, 200)))
            poly = [round(float(v), 2) for v in rng.uniform(0, 400, 2 * int(rng.integers(6, 24)))]
            annotations.append({"segmentation": [poly], "area": round(bw * bh, 4), "iscrowd": 0, "image_id": k + 1,
                                "bbox": [x, y, bw, bh], "category_id": int(rng.integers(1, 91)),
                                "id": len(annotations) + 1})
    path = write_coco(root, "big", entries, annotations)
    mb = os.path.getsize(path) / 2**20
    print(f"\n| resident memory after construction: {images} images, {len(annotations)} annotations, "
          f"{mb:.0f} MB JSON | MB |\n|---|---:|")
    return root


def measure_memory(root, code, what):
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, code, root, what], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def device_preprocess(ds, images, targets, device, repeats=50):
    batch = (images.pin_memory(), [{**t, "boxes": t["boxes"].pin_memory(), "labels": t["labels"].pin_memory()}
                                   for t in targets])
    for _ in range(5):
        to_device(batch, device)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        to_device(batch, device)
    torch.cuda.synchronize(device)
    ms = (time.perf_counter() - start) / repeats * 1000
    print(f"\nto_device on {torch.cuda.get_device_name(device)}: {ms:.2f} ms per 2-image batch "
          f"(copy uint8, normalise, resize 640x480 -> 1067x800, pad)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="JPEGs for the per-sample and loader rows")
    parser.add_argument("--repeats", type=int, default=3, help="passes per per-sample row (best is kept)")
    parser.add_argument("--batches", type=int, default=40, help="batches timed per worker count")
    parser.add_argument("--check-images", type=int, default=4000, help="headers opened by the check rows")
    parser.add_argument("--device", default=None, help="also time to_device on this CUDA device")
    parser.add_argument("--baseline-code", default=None, help="a checkout whose CocoDataset to measure too")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the memory rows (they need pycocotools)")
    args = parser.parse_args()
    if args.device is not None and (not args.device.startswith("cuda") or not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: a CUDA device (cuda, cuda:1), and torch sees none here"
                     if args.device.startswith("cuda") else f"--device {args.device}: a CUDA device (cuda, cuda:1)")
    print(f"{platform.processor() or platform.machine()}, {data.available_cpus()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "jpegs")
        images, annotations = write_jpegs(os.path.join(root, "img"), args.images)
        write_coco(root, "img", images, annotations)
        sample_costs(root, args.images, args.repeats)
        torch.set_num_threads(max(1, data.available_cpus()))
        counts = sorted({1, 2, data.available_cpus() // 2, data.available_cpus()} - {0})
        ds, batch_images, batch_targets = loader_throughput(root, counts, args.batches)
        header_check(root, args.check_images)
        if args.device:
            device_preprocess(ds, batch_images, batch_targets, torch.device(args.device))
        if args.skip_memory:
            return
        big = memory(tmp)
        rows = [("CocoDataset(train=True), this checkout", ROOT, "dataset"),
                ("pycocotools COCO index of the same file (what the dataset kept before)", ROOT, "coco")]
        if args.baseline_code:
            rows.append((f"CocoDataset(train=True), {args.baseline_code}", args.baseline_code, "dataset"))
        for name, code, what in rows:
            print(f"| {name} | {measure_memory(big, code, what):.0f} |")


if __name__ == "__main__":
    main()
