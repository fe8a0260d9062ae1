"""Train RetinaNet with the FreeAnchor loss (Zhang et al., NeurIPS 2019), or with the hand-crafted
RetinaNet loss it replaces, on COCO or any COCO-layout dataset.

The recipe is the paper's (§4.1) and the authors' configs: SGD with momentum 0.9 and weight decay
1e-4, lr 0.01 for 16 images per iteration (scaled linearly with the batch), linear warmup over 500
iterations from lr/3, 90k iterations with lr / 10 at 60k and 80k, horizontal flips.

    torchrun --nproc_per_node=8 train.py --backbone resnet50          # the paper's R-50 1x on COCO
    python train.py --data shapes --backbone resnet18 --weights none  # offline, CPU (see README)
    python train.py ... --resume                                      # continue DIR/last.pt exactly

One process per GPU (or CPU process under torchrun with gloo); rank 0 logs and saves. Every
--ckpt-every iterations DIR/last.pt is written atomically; --resume continues from it with the
same model, optimizer, schedule, RNG states and data order, so a run killed at any moment and
resumed ends with the same weights as one that never stopped (bit for bit on CPU).
At the end DIR/model_final.pt holds what evaluate.py needs. Tests: python -m pytest tests/test_train.py
"""

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import freeanchor
from data import CocoDataset, DataError, TrainSampler, available_cpus, collate, resolve_root, to_device
from model import BACKBONES, RetinaNet


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint. `metadata["help"]` is the --help text."""
    data: str = field(default="datasets/coco", metadata={
        "help": "COCO-layout root (annotations/instances_<split>.json, <split>/ images), or 'shapes' "
                "for the built-in synthetic dataset (built once under datasets/shapes)"})
    train_split: str = field(default="train2017", metadata={"help": "training split (COCO 2017: train2017)"})
    val_split: str = field(default="val2017", metadata={"help": "validation split, recorded for evaluate.py"})
    backbone: str = field(default="resnet50", metadata={
        "help": f"one of {', '.join(BACKBONES)} (paper: resnet50, resnet101, resnext101_64x4d)"})
    weights: str = field(default="imagenet", metadata={
        "help": "backbone initialisation: 'imagenet' (torchvision's weights, downloaded; paper), 'none' "
                "(from scratch, BatchNorm trains), or a path to a torchvision-format state dict"})
    loss: str = field(default="freeanchor", metadata={
        "help": "'freeanchor' (the paper's loss) or 'retinanet' (IoU assignment + focal loss, the baseline)"})
    batch_size: int = field(default=16, metadata={
        "help": "images per iteration over all processes (paper: 16)"})
    lr: float = field(default=None, metadata={"help": "base learning rate (default: 0.01 x batch-size / 16, paper)"})
    max_iter: int = field(default=90000, metadata={"help": "iterations (paper 1x: 90000; 2x: 180000)"})
    steps: tuple = field(default=None, metadata={
        "help": "iterations where lr drops 10x (default: 60000 80000, scaled by max-iter / 90000)"})
    warmup_iters: int = field(default=500, metadata={"help": "linear warmup from lr/3 (paper: 500)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)"})
    clip_grad: float = field(default=0.0, metadata={
        "help": "clip the gradient's total L2 norm to this (0: off, as in the paper; helps from-scratch runs "
                "survive higher learning rates)"})
    weight_decay: float = field(default=1e-4, metadata={
        "help": "SGD weight decay, not applied to biases and norm parameters (paper: 1e-4)"})
    min_size: tuple = field(default=(800,), metadata={
        "help": "shorter image side; several values: drawn per image (multi-scale training, e.g. "
                "640 672 704 736 768 800) (paper: 800)"})
    max_size: int = field(default=1333, metadata={"help": "cap on the longer image side (paper: 1333)"})
    output: str = field(default=None, metadata={"help": "run directory (default: runs/<loss>_<backbone>_<data>)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --output from its last.pt (starts afresh if there is none yet)"})
    ckpt_every: int = field(default=1000, metadata={"help": "write last.pt every this many iterations"})
    log_every: int = field(default=20, metadata={"help": "log a line (and log.jsonl) every this many iterations"})
    device: str = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    amp: bool = field(default=False, metadata={
        "help": "bfloat16 autocast for the network (CUDA); the loss stays float32"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and of the data order"})
    workers: int = field(default=4, metadata={"help": "data loading processes per training process"})
    raw_orientation: bool = field(default=False, metadata={
        "help": "read images as stored, ignoring their EXIF orientation tag (for datasets annotated that way); "
                "by default images are turned upright as labelling tools show them"})
    skip_check: bool = field(default=False, metadata={
        "help": "skip opening every image's header before iteration 0 (a broken image then stops the run "
                "when first drawn)"})


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train RetinaNet with the FreeAnchor loss (NeurIPS 2019) or the RetinaNet baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for config, title in ((TrainConfig, "training"), (freeanchor.FreeAnchorConfig, "FreeAnchor loss (--loss freeanchor)")):
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(config):
            flag = "--" + f.name.replace("_", "-")
            if f.type is bool:
                group.add_argument(flag, action="store_true", help=f.metadata["help"])
            elif f.type is tuple:
                group.add_argument(flag, type=int, nargs="+", default=f.default, help=f.metadata["help"])
            else:
                kind = {"int": int, "float": float, "str": str}.get(getattr(f.type, "__name__", f.type), str)
                group.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return parser


def parse_config(argv):
    """argv -> (TrainConfig, FreeAnchorConfig), defaults resolved, bad values refused in one line."""
    args = vars(build_parser().parse_args(argv))
    cfg = TrainConfig(**{f.name: args[f.name] for f in dataclasses.fields(TrainConfig)})
    loss_cfg = freeanchor.FreeAnchorConfig(**{f.name: args[f.name] for f in dataclasses.fields(freeanchor.FreeAnchorConfig)})
    problems = []
    if cfg.backbone not in BACKBONES:
        problems.append(f"--backbone {cfg.backbone}: choose one of {', '.join(BACKBONES)}")
    if cfg.loss not in ("freeanchor", "retinanet"):
        problems.append(f"--loss {cfg.loss}: choose freeanchor or retinanet")
    for name in ("batch_size", "max_iter", "ckpt_every", "log_every", "max_size", "bag_size"):
        value = args[name]
        if value < 1:
            problems.append(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if cfg.warmup_iters < 0 or cfg.workers < 0 or cfg.clip_grad < 0:
        problems.append("--warmup-iters, --workers and --clip-grad must be >= 0")
    if any(s < 1 for s in cfg.min_size):
        problems.append(f"--min-size {' '.join(map(str, cfg.min_size))}: sizes must be positive")
    if cfg.device not in (None, "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        problems.append(f"--device {cfg.device}: use cpu or cuda")
    if problems:
        raise ValueError(problems[0])
    if cfg.lr is None:
        cfg.lr = 0.01 * cfg.batch_size / 16  # linear scaling rule (Goyal et al.), paper: 0.01 @ 16
    if cfg.steps is None:  # the paper's 60k/80k of 90k, kept in proportion
        cfg.steps = (round(cfg.max_iter * 60000 / 90000), round(cfg.max_iter * 80000 / 90000))
    cfg.steps, cfg.min_size = tuple(cfg.steps), tuple(cfg.min_size)
    if cfg.output is None:
        data_name = os.path.basename(os.path.normpath(cfg.data))
        cfg.output = os.path.join("runs", f"{cfg.loss}_{cfg.backbone}_{data_name}")
    if cfg.device is None:
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available here (use --device cpu)")
    return cfg, loss_cfg


def lr_at(it, cfg):
    """Linear warmup from lr/3 over warmup_iters, then lr / 10 at each step (paper §4.1)."""
    warmup = 1.0 if it >= cfg.warmup_iters else 1 / 3 + (1 - 1 / 3) * it / cfg.warmup_iters
    return cfg.lr * warmup * 0.1 ** sum(it >= s for s in cfg.steps)


def param_groups(model, weight_decay):
    """Weight decay on conv/linear weights only, not on biases or norm parameters."""
    decay, no_decay = [], []
    for module in model.modules():
        is_norm = isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if is_norm or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_atomic(obj, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a kill at any
    moment leaves either the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# settings that define a run: --resume refuses a last.pt saved with others (it would not continue that run)
RESUME_MUST_MATCH = ("backbone", "weights", "loss", "batch_size", "lr", "max_iter", "steps", "warmup_iters",
                     "min_size", "max_size", "seed", "clip_grad")


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def format_eta(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg, loss_cfg):
    # ------------------------------------------------------------------ processes (torchrun or plain python)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{local_rank}"
            torch.cuda.set_device(cfg.device)
        else:  # CPU processes share the machine's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    else:
        rank, world = 0, 1
    master = rank == 0
    device = torch.device(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")

    # ------------------------------------------------------------------ data (all checks before iteration 0)
    if master:
        root = resolve_root(cfg.data)  # builds shapes once
    if ddp:
        dist.barrier()
    if not master:
        root = resolve_root(cfg.data)
    dataset = CocoDataset(root, cfg.train_split, train=True, max_size=cfg.max_size, exif=not cfg.raw_orientation)
    if master and not cfg.skip_check:  # every image's header, on all CPUs; the other ranks wait
        dataset.check_images()
    if ddp:
        dist.barrier()
    # Where images get resized: on a GPU inside the step (uint8 through the loader, ~free there);
    # on a CPU-only run in the workers, which otherwise idle beside the step (benchmarks/data.py).
    dataset.resize_in_worker = device.type == "cpu"

    # ------------------------------------------------------------------ model, optimizer, resume
    os.makedirs(cfg.output, exist_ok=True)
    last_path = os.path.join(cfg.output, "last.pt")
    if os.path.exists(last_path) and not cfg.resume:
        raise ValueError(f"{cfg.output} already holds a run (last.pt): pass --resume to continue it, "
                         f"or --output to start another")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    try:
        model = RetinaNet(len(dataset.categories), backbone=cfg.backbone, weights=cfg.weights,
                          min_size=cfg.min_size, max_size=cfg.max_size)
    except RuntimeError as e:  # ImageNet weights not downloadable: model.py's one-line advice
        raise ValueError(str(e)) from None
    model = model.to(device)
    if ddp and not model.config["frozen_bn"] and device.type == "cuda":
        # from scratch: BatchNorm statistics over all GPUs. SyncBatchNorm exists only on CUDA: CPU
        # processes normalise over their own images (rank 0's running statistics are broadcast).
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)

    start_iter = 0
    if cfg.resume and os.path.exists(last_path):
        try:
            # on the CPU: the RNG states must stay CPU tensors; the optimizer moves its own state
            ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
            saved, ckpt_categories = ckpt["config"], ckpt["categories"]
        except Exception as e:
            raise ValueError(f"cannot read checkpoint {last_path}: {type(e).__name__}: {e}") from None
        if ckpt_categories != dataset.categories:
            raise ValueError(f"{last_path} was trained on other categories than {dataset.ann_file}")
        changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(cfg, k)}" for k in RESUME_MUST_MATCH
                   if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{last_path} belongs to a different run ({'; '.join(changed)}): "
                             f"resume with the run's own settings, or use another --output")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{last_path} does not fit this model: {str(e).splitlines()[0]}") from None
        set_rng_state(ckpt["rng"])
        start_iter = ckpt["iteration"]
        if master:
            print(f"resuming {last_path} at iteration {start_iter}/{cfg.max_iter}", flush=True)
    elif cfg.resume and master:
        print(f"no checkpoint in {cfg.output} yet: starting from iteration 0", flush=True)
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = TrainSampler(dataset, cfg.batch_size, min_sizes=cfg.min_size, flip=True, rank=rank,
                           world_size=world, seed=cfg.seed, start_iter=start_iter, max_iter=cfg.max_iter)
    workers = min(cfg.workers, available_cpus())  # the batches do not depend on it (the sampler draws)
    if master and workers < cfg.workers:
        print(f"note: --workers {cfg.workers} lowered to {workers}, the CPUs available here", flush=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=workers, pin_memory=device.type == "cuda")  # non_blocking copies

    log_path = os.path.join(cfg.output, "log.jsonl")
    if master:
        with open(os.path.join(cfg.output, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "freeanchor": dataclasses.asdict(loss_cfg),
                       "model": raw_model.config, "categories": dataset.categories, "world_size": world}, f, indent=1)
        if os.path.exists(log_path):  # a resumed run: forget what happened after the checkpoint
            with open(log_path) as f:
                kept = [l for l in f if l.strip() and _iter_of(l) is not None and _iter_of(l) <= start_iter]
            with open(log_path + ".tmp", "w") as f:  # atomic, like the checkpoints
                f.writelines(kept)
            os.replace(log_path + ".tmp", log_path)
        print(f"{len(dataset)} training images, {len(dataset.categories)} classes, {world} process(es) x "
              f"{cfg.batch_size // world} images, {cfg.loss} loss, {cfg.backbone} ({cfg.weights}), "
              f"iterations {start_iter}..{cfg.max_iter}, output {cfg.output}", flush=True)

    def checkpoint(iteration):
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "iteration": iteration, "rng": rng_state(), "categories": dataset.categories,
                     "model_config": raw_model.config, "config": dataclasses.asdict(cfg),
                     "loss_config": dataclasses.asdict(loss_cfg)}, last_path)

    # ------------------------------------------------------------------ the loop
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    model.train()
    window_start, window_iters = time.time(), 0
    for it, batch in zip(range(start_iter, cfg.max_iter), loader):
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, gt_boxes, gt_labels = to_device(batch, device)  # [B, 3, H, W] normalised, padded

        with autocast:
            cls_logits, box_deltas, anchors = model(images)
        if cfg.loss == "freeanchor":
            # ||B|| of Eq. 7 averaged over processes: N processes x b images == 1 process x N b (design §4.8)
            num_objects = torch.tensor(float(sum(len(b) for b in gt_boxes)), device=device)
            if ddp:
                dist.all_reduce(num_objects)
                num_objects /= world
            losses = freeanchor.free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels,
                                                 cfg=loss_cfg, num_objects=num_objects)
        else:
            losses = freeanchor.retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
        loss = sum(losses.values())

        # a non-finite loss on any process stops every process before the weights are touched
        finite = torch.isfinite(loss.detach()).float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            terms = ", ".join(f"{k} {v.item():.4g}" for k, v in losses.items())
            kept = f"the last good checkpoint is {last_path}" if os.path.exists(last_path) else "no checkpoint was written"
            raise FloatingPointError(f"non-finite loss at iteration {it}: {terms}; stopped, {kept} "
                                     f"(try a lower --lr or longer --warmup-iters)")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.clip_grad)
        optimizer.step()
        window_iters += 1

        done = it + 1
        if done % cfg.log_every == 0 or done == cfg.max_iter:
            values = torch.stack([v.detach().float() for v in losses.values()])
            if ddp:
                dist.all_reduce(values)
                values /= world
            elapsed = time.time() - window_start
            sec_per_iter = elapsed / window_iters
            record = {"iter": done, "max_iter": cfg.max_iter, **{k: round(v, 6) for k, v in zip(losses, values.tolist())},
                      "loss": round(values.sum().item(), 6), "lr": lr, "s_per_iter": round(sec_per_iter, 4),
                      "images_per_s": round(cfg.batch_size / sec_per_iter, 2),
                      "eta_s": round(sec_per_iter * (cfg.max_iter - done)), "peak_mem_mb": round(peak_memory_mb(device))}
            if master:
                terms = "  ".join(f"{k} {record[k]:.4f}" for k in losses)
                print(f"iter {done}/{cfg.max_iter}  {terms}  loss {record['loss']:.4f}  lr {lr:.5f}  "
                      f"{sec_per_iter:.3f} s/it  {record['images_per_s']:.1f} img/s  "
                      f"eta {format_eta(record['eta_s'])}  mem {record['peak_mem_mb']} MB", flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window_start, window_iters = time.time(), 0
        if master and (done % cfg.ckpt_every == 0 or done == cfg.max_iter):
            checkpoint(done)

    if master:
        final = os.path.join(cfg.output, "model_final.pt")
        save_atomic({"model": raw_model.state_dict(), "model_config": raw_model.config,
                     "categories": dataset.categories, "config": dataclasses.asdict(cfg),
                     "loss_config": dataclasses.asdict(loss_cfg), "iteration": cfg.max_iter}, final)
        print(f"done: {final}", flush=True)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return os.path.join(cfg.output, "model_final.pt")


def _iter_of(line):
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return None


def main(argv=None):
    """CLI entry: user mistakes (bad arguments, data, checkpoints, a diverging run) end with one
    line on stderr and exit status 2 (1 for a non-finite loss), never a traceback."""
    try:
        cfg, loss_cfg = parse_config(argv)
        return train(cfg, loss_cfg)
    except (DataError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(e, FloatingPointError) else 2)
    except KeyboardInterrupt:
        print("interrupted: resume with --resume", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
