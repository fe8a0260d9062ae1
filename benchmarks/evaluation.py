"""evaluate.py end to end, against `RetinaNet.detect` alone on the same pictures.

evaluate.py's speed goal is >= 150 images/s on one H100/H200 at 800x1333 (COCO val2017 in about
half a minute). `benchmarks/inference.py` times the network and NMS alone; this runs the command a
user runs, as a subprocess with the defaults of the device, on a COCO-layout dataset of JPEG
pictures: reading and decoding them in DataLoader workers, resizing, detection, NMS, copying the
detections to the host. Its rows:

- `RetinaNet.detect` on the same pictures (the first 256), already decoded and on the device, in
  batches of evaluate.py's size, with its autocast and memory format: the ceiling (the baseline of
  the ratios);
- `evaluate.py`, and `evaluate.py --nms-recall` (NMS recall from the same forward pass: the
  candidates NMS saw, matched to the objects), with --compile on request:
  images/s as evaluate.py reports them in metrics.json, after the first batch (the pace, which the
  baseline's warm-up batch also leaves out) and from the first batch to the last detection; the
  first batch's seconds (the reading workers' start, the device's first-time work); and the whole
  command's seconds (imports, the header check of every picture, COCOeval).

The dataset (--images pictures of --picture W H pixels, smooth random texture with 1 to 8 filled
rectangles of 80 categories) and a checkpoint in train.py's format are built once under --root:
a RetinaNet from random weights whose classification head spreads its scores around the 0.05
threshold, so that each picture sends thousands of candidates to NMS, as a trained detector does
(benchmarks/inference.py's confident_heads). Its AP is meaningless; its speed is the point.

    python benchmarks/evaluation.py --device cuda --images 480        # R-50, 1333x800 pictures
    python benchmarks/evaluation.py --backbone resnet18 --picture 320 240 --min-size 240 --max-size 320 --images 16

Prints a markdown table; never passes or fails on time.
"""

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402
import freeanchor  # noqa: E402
from data import CocoDataset, available_cpus  # noqa: E402
from inference import confident_heads, cpu_name  # noqa: E402
from model import RetinaNet  # noqa: E402

NUM_CLASSES = 80  # COCO's
DETECT_ALONE = 256  # pictures timed for the baseline row (decoded beforehand: they take the device's memory)


def picture(args):
    """Picture i of the dataset, saved under folder as JPEG -> (its images entry, its annotations
    without ids). Its own generator, seeded by (seed, i): the same picture in any process."""
    folder, i, width, height, seed = args
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    texture = torch.rand(1, 3, height // 16 + 1, width // 16 + 1, generator=g)  # smooth, like a photo's
    pixels = torch.nn.functional.interpolate(texture, size=(height, width), mode="bilinear")[0]  # [3, H, W]
    img = Image.fromarray((pixels * 255).byte().permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    annotations = []
    for _ in range(int(torch.randint(1, 9, (1,), generator=g))):
        w, h = (torch.rand(2, generator=g) * torch.tensor([width / 3, height / 3]) + 8).tolist()
        x, y = (torch.rand(2, generator=g) * torch.tensor([width - w, height - h])).tolist()
        draw.rectangle((x, y, x + w, y + h), fill=tuple(torch.randint(0, 256, (3,), generator=g).tolist()))
        annotations.append({"image_id": i + 1, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                            "category_id": int(torch.randint(1, NUM_CLASSES + 1, (1,), generator=g))})
    img.save(os.path.join(folder, f"{i + 1:06d}.jpg"), quality=90)
    return {"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": width, "height": height}, annotations


def build_dataset(root, num_images, width, height, seed=0):
    """A COCO-layout dataset under root (split "val"), unless one of these parameters is there;
    the pictures drawn by a process per CPU."""
    params = {"images": num_images, "width": width, "height": height, "seed": seed}
    marker = os.path.join(root, "params.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return
    folder = os.path.join(root, "val")
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(folder, exist_ok=True)
    start = time.time()
    with multiprocessing.Pool(available_cpus()) as pool:  # forked: main() calls this before CUDA is initialised
        made = pool.map(picture, [(folder, i, width, height, seed) for i in range(num_images)])
    images = [entry for entry, _ in made]
    annotations = [{"id": k + 1, **a} for k, a in enumerate(a for _, anns in made for a in anns)]
    categories = [{"id": k + 1, "name": f"class {k + 1}"} for k in range(NUM_CLASSES)]
    with open(os.path.join(root, "annotations", "instances_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    with open(marker, "w") as f:
        json.dump(params, f)
    print(f"built {num_images} pictures in {root} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)


def save_checkpoint(path, root, backbone, min_size, max_size):
    """A RetinaNet from random weights with confident heads, in train.py's model_final.pt format."""
    torch.manual_seed(0)
    model = RetinaNet(NUM_CLASSES, backbone=backbone, weights="none", min_size=min_size, max_size=max_size)
    confident_heads(model)
    with open(os.path.join(root, "annotations", "instances_val.json")) as f:
        categories = json.load(f)["categories"]
    torch.save({"model": model.state_dict(), "model_config": model.config, "categories": categories,
                "config": {"data": root, "val_split": "val", "min_size": (min_size,), "max_size": max_size},
                "loss_config": dataclasses.asdict(freeanchor.FreeAnchorConfig()), "iteration": 0}, path)


def detect_alone(ckpt, root, device, batch_size, amp, channels_last, min_size, max_size):
    """images/s of evaluate.detect on the dataset's first DETECT_ALONE pictures, decoded and on the
    device beforehand, in batches as evaluate.py sorts and forms them, after one warm-up batch."""
    model, _ = evaluate.load_checkpoint(ckpt, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    dataset = CocoDataset(root, "val", train=False, max_size=max_size, categories=None)
    order = sorted(range(min(len(dataset), DETECT_ALONE)), key=lambda i: dataset.aspect_ratios[i])
    images = [dataset[i][0].to(device) for i in order]
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        evaluate.detect(model, batches[0], [min_size], [max_size])  # warm-up (cuDNN's choices, caches)
        sync()
        start = time.perf_counter()
        for batch in batches:
            dets = evaluate.detect(model, batch, [min_size], [max_size])
            for key in ("boxes", "scores", "labels"):  # to the host, as evaluate.py copies them
                evaluate.batch_to_host([d[key] for d in dets])
        sync()
    return len(images) / (time.perf_counter() - start)


def run_evaluate(ckpt, root, device, out, extra, timeout):
    """evaluate.py as a user runs it -> (metrics.json's images/s after the first batch, over the whole
    detection, the first batch's seconds, the command's seconds) or an error line."""
    command = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", ckpt, "--data", root, "--split", "val",
               "--device", device, "--output", out, *extra]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout} s"
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return f"failed ({done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    return m["images_per_s_after_first_batch"], m["images_per_s"], m["first_batch_s"], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--images", type=int, default=96, help="pictures in the dataset")
    parser.add_argument("--picture", type=int, nargs=2, default=(1333, 800), metavar=("W", "H"),
                        help="the pictures' size (COCO's are about 640x480; at 1333x800 the test size is the picture's)")
    parser.add_argument("--min-size", type=int, default=800, help="the checkpoint's shorter side (the paper's 800)")
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--batch-size", type=int, default=8, help="evaluate.py's --batch-size (its default: 8)")
    parser.add_argument("--workers", type=int, default=None, help="evaluate.py's --workers (default: its own, 4)")
    parser.add_argument("--compile", action="store_true", help="a row with evaluate.py --compile too")
    parser.add_argument("--root", default="runs/evaluation_benchmark", help="where the dataset and checkpoint go")
    parser.add_argument("--timeout", type=int, default=300, help="seconds each evaluate.py run may take")
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda"):
        sys.exit(f"--device {args.device}: cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.images < 1 or args.batch_size < 1 or min(args.picture) < 1:
        sys.exit("--images, --batch-size and --picture must be >= 1")
    device = torch.device(args.device)
    data = os.path.join(args.root, f"data_{args.images}_{args.picture[0]}x{args.picture[1]}")
    build_dataset(data, args.images, *args.picture)
    cfg = evaluate.parse_config(["--ckpt", "-", "--device", args.device])  # evaluate.py's defaults here
    ckpt = os.path.join(args.root, f"{args.backbone}_{args.min_size}_{args.max_size}.pt")
    save_checkpoint(ckpt, os.path.abspath(data), args.backbone, args.min_size, args.max_size)

    extra = ["--batch-size", str(args.batch_size), *(["--workers", str(args.workers)] if args.workers is not None else [])]
    base = detect_alone(ckpt, data, device, args.batch_size, cfg.amp, cfg.channels_last, args.min_size, args.max_size)
    rows = [("`RetinaNet.detect`, pictures decoded and on the device beforehand", (base, None, None, None))]
    variants = [("`evaluate.py`", []), ("`evaluate.py --nms-recall`", ["--nms-recall"])]
    if args.compile:
        variants.append(("`evaluate.py --compile`", ["--compile"]))
    for label, flags in variants:
        out = os.path.join(args.root, "eval_" + ("_".join(f.strip("-") for f in flags) or "plain"))
        rows.append((label, run_evaluate(ckpt, data, args.device, out, [*extra, *flags], args.timeout)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    workers = min(args.workers if args.workers is not None else cfg.workers, available_cpus())
    print(f"evaluate.py end to end: {args.backbone}, {NUM_CLASSES} classes, {args.images} JPEG pictures of "
          f"{args.picture[0]}x{args.picture[1]} tested at {args.min_size}/{args.max_size}, batches of {args.batch_size}, "
          f"{workers} reading workers, bf16 autocast {'on' if cfg.amp else 'off'}, channels_last "
          f"{'on' if cfg.channels_last else 'off'}; {name}; torch {torch.__version__}\n")
    print("| run | images/s | vs detect alone | with the first batch | the first batch (s) | the whole command (s) |")
    print("|---|---|---|---|---|---|")
    for label, result in rows:
        if isinstance(result, str):
            print(f"| {label} | {result} | | | | |")
            continue
        rate, whole, first, seconds = result
        cells = ["-" if v is None else f"{v:.1f}" for v in (whole, first, seconds)]
        print(f"| {label} | {'-' if rate is None else f'{rate:.1f}'} | "
              f"{'-' if rate is None else f'{rate / base:.2f}x'} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
