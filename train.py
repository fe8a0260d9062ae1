"""Train RetinaNet with the FreeAnchor loss (Zhang et al., NeurIPS 2019), or with the hand-crafted
RetinaNet loss it replaces, on COCO or any COCO-layout dataset.

The recipe is the paper's (§4.1) and the authors' configs: SGD with momentum 0.9 and weight decay
1e-4, lr 0.01 for 16 images per iteration (scaled linearly with the batch), biases at 2x that lr
without weight decay, linear warmup over 500 iterations from lr/3, 90k iterations with lr / 10 at
60k and 80k, horizontal flips.

    torchrun --nproc_per_node=8 train.py --backbone resnet50          # the paper's R-50 1x on COCO
    python train.py --data shapes --backbone resnet18 --weights none  # offline, CPU (see README)
    python train.py ... --resume                                      # continue DIR/last.pt exactly

One process per GPU (or CPU process under torchrun with gloo); rank 0 logs and saves. Every
--ckpt-every iterations DIR/last.pt is written atomically; --resume continues from it with the
same model, optimizer, schedule, RNG states and data order, so a run killed at any moment and
resumed ends with the same weights as one that never stopped (bit for bit on CPU).
At the end DIR/model_final.pt holds what evaluate.py needs.

Speed: on CUDA the network runs in channels_last with bfloat16 autocast by default (both from
compute capability 8.0, A100 and H100 on; --no-amp, --no-channels-last turn them off; the loss is
float32 either way), cudnn picks its kernels per padded shape, and --compile runs the network
and the loss under torch.compile. A steady-state step never waits for the GPU: object counts come
from the host, and a non-finite loss is not read back each step but turns the optimizer step into
a no-op on the device (see `step_unless`); the flag is read where a log line or checkpoint needs
the host anyway, and the run stops there, naming the first bad iteration, before writing anything.

Tests: python -m pytest tests/test_train.py
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import resource
import signal
import sys
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
        os.write(2, (b"interrupted" if signum == signal.SIGINT else b"terminated") + b": nothing was started\n")
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
from torch.nn.parallel import DistributedDataParallel as DDP

import freeanchor
from data import (ArgumentParser, CocoDataset, DataError, DeferredInterrupt, HelpFormatter, ImageError,
                  TrainSampler, add_config_arguments, canvas_shapes, catch_stop_signals, collate,
                  config_from_args, device_defaults, directory_lock, end_progress_line, error_line, format_eta,
                  init_worker, load_checkpoint_file, loader_batches, on_rank0, pad_to_canvas, print_stop,
                  remove_partial_writes, resolve_root_once, run_program, setup_processes, signals_deferred,
                  split_files, stop_on_failure, stopped_by, to_device, usable_workers, write_atomic)
from model import BACKBONES, PRIOR_PROB, RETINANET_PRIOR_PROB, RetinaNet

# maskrcnn-benchmark's SOLVER.BIAS_LR_FACTOR = 2 and SOLVER.WEIGHT_DECAY_BIAS = 0, kept by the
# authors' FreeAnchor configs: every bias trains at twice the learning rate, without weight decay.
BIAS_LR_FACTOR = 2.0
WEIGHT_DECAY_BIAS = 0.0


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
        "help": "SGD weight decay; biases train at 2x the lr without it (paper and authors' configs: 1e-4)"})
    min_size: tuple = field(default=(800,), metadata={
        "help": "shorter image side; several values: drawn per image (multi-scale training, e.g. "
                "640 672 704 736 768 800); the last is also evaluate.py's default test size (paper: 800)"})
    max_size: int = field(default=1333, metadata={"help": "cap on the longer image side (paper: 1333)"})
    output: str = field(default=None, metadata={"help": "run directory (default: runs/<loss>_<backbone>_<data>)"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --output from its last.pt (starts afresh if the directory holds no run yet)"})
    ckpt_every: int = field(default=1000, metadata={"help": "write last.pt every this many iterations"})
    log_every: int = field(default=20, metadata={"help": "log a line (and log.jsonl) every this many iterations"})
    device: str = field(default=None, metadata={"help": "cuda, cuda:N or cpu (default: cuda when available)"})
    amp: bool = field(default=None, metadata={
        "help": "bfloat16 autocast for the network; the loss stays float32 (default: on with a GPU of compute "
                "capability 8.0 or later, off on older GPUs and CPUs; where the processor has no native bfloat16, "
                "such as a V100 or a CPU without AVX512-BF16 or AMX, --amp falls back to float32, with a note)"})
    channels_last: bool = field(default=None, metadata={
        "help": "channels_last memory format for the network (default: on with a GPU of compute "
                "capability 8.0 or later, off on older GPUs and CPUs)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the network and the loss: the network once per padded shape of --fixed-shapes "
                "(on by default with --compile), the loss once per anchor count of those shapes (with "
                "--no-fixed-shapes, for any), for any object count (the log counts the compilations)"})
    fixed_shapes: bool = field(default=None, metadata={
        "help": "pad every batch to the largest shape of its orientation and scale, (min size, max size) "
                "rounded up to 32 or its transpose: at most 2 image shapes per --min-size, and with --compile "
                "the network is compiled for each of them, static (costs the compute of the extra padding; the "
                "losses change a little, as padding adds anchors). Default: on with --compile (on an H200, R-50 "
                "at 800x1333: steps 1.17x faster than with the network compiled for any size, and minutes less "
                "compilation), off otherwise; --compile --no-fixed-shapes compiles for any image size instead"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and of the data order"})
    workers: int = field(default=4, metadata={"help": "data loading processes per training process (at most the CPUs available)"})
    raw_orientation: bool = field(default=False, metadata={
        "help": "read images as stored, ignoring their EXIF orientation tag (for datasets annotated that way); "
                "by default images are turned upright as labelling tools show them"})
    skip_check: bool = field(default=False, metadata={
        "help": "skip opening every image's header before iteration 0 (a broken image then stops the run "
                "when first drawn)"})


def build_parser():
    parser = ArgumentParser(
        description="Train RetinaNet with the FreeAnchor loss (NeurIPS 2019) or the RetinaNet baseline.",
        formatter_class=HelpFormatter)
    add_config_arguments(parser, TrainConfig, "training")
    add_config_arguments(parser, freeanchor.FreeAnchorConfig, "FreeAnchor loss (--loss freeanchor)")
    return parser


def parse_config(argv):
    """argv -> (TrainConfig, FreeAnchorConfig), defaults resolved, bad values refused in one line."""
    args = vars(build_parser().parse_args(argv))
    cfg = config_from_args(TrainConfig, args)
    loss_cfg = config_from_args(freeanchor.FreeAnchorConfig, args)
    problems = []
    if cfg.backbone not in BACKBONES:
        problems.append(f"--backbone {cfg.backbone}: choose one of {', '.join(BACKBONES)}")
    if cfg.loss not in ("freeanchor", "retinanet"):
        problems.append(f"--loss {cfg.loss}: choose freeanchor or retinanet")
    for name in ("batch_size", "max_iter", "ckpt_every", "log_every", "max_size", "bag_size"):
        value = args[name]
        if value < 1:
            problems.append(f"--{name.replace('_', '-')} {value}: must be at least 1")
    for name in ("warmup_iters", "workers", "clip_grad", "weight_decay", "gamma", "loc_weight", "smooth_l1_beta"):
        if not 0 <= args[name] < math.inf:  # (also refuses nan)
            problems.append(f"--{name.replace('_', '-')} {args[name]}: must be >= 0 and finite")
    for name in ("momentum", "iou_threshold"):
        if not 0 <= args[name] < 1:
            problems.append(f"--{name.replace('_', '-')} {args[name]}: must be in [0, 1)")
    if not 0 <= loss_cfg.alpha <= 1:  # 1: no negative term
        problems.append(f"--alpha {loss_cfg.alpha}: must be in [0, 1]")
    if cfg.lr is not None and not 0 < cfg.lr < math.inf:
        problems.append(f"--lr {cfg.lr}: must be positive and finite")
    if cfg.steps is not None and list(cfg.steps) != sorted(set(cfg.steps)):
        problems.append(f"--steps {' '.join(map(str, cfg.steps))}: must increase")
    if any(s < 1 for s in cfg.min_size):
        problems.append(f"--min-size {' '.join(map(str, cfg.min_size))}: sizes must be positive")
    if any(s > cfg.max_size for s in cfg.min_size):  # the cap would win: images smaller than asked, scales merged
        problems.append(f"--min-size {' '.join(map(str, cfg.min_size))}: above --max-size {cfg.max_size}, the cap "
                        f"on the longer side")
    if cfg.steps is not None and any(s < 1 for s in cfg.steps):
        problems.append(f"--steps {' '.join(map(str, cfg.steps))}: iterations must be positive")
    if not 0 <= cfg.seed < 2**32:  # numpy's seeds
        problems.append(f"--seed {cfg.seed}: must be in [0, 2^32)")
    if problems:
        raise ValueError(problems[0])
    if cfg.fixed_shapes is None:
        cfg.fixed_shapes = cfg.compile
    if cfg.lr is None:
        cfg.lr = 0.01 * cfg.batch_size / 16  # linear scaling rule (Goyal et al.), paper: 0.01 @ 16
    steps_given = cfg.steps is not None
    if cfg.steps is None:  # the paper's 60k/80k of 90k, kept in proportion
        cfg.steps = (round(cfg.max_iter * 60000 / 90000), round(cfg.max_iter * 80000 / 90000))
    cfg.steps, cfg.min_size = tuple(cfg.steps), tuple(cfg.min_size)
    if cfg.weights not in ("imagenet", "none"):  # a file: the same one, wherever --resume starts from
        cfg.weights = os.path.abspath(cfg.weights)
    if cfg.output is None:
        data_name = os.path.basename(os.path.abspath(cfg.data)) or "root"  # "." -> this folder's name
        cfg.output = os.path.join("runs", f"{cfg.loss}_{cfg.backbone}_{data_name}")
    cfg = device_defaults(cfg)  # a --device error before any note
    if os.environ.get("RANK", "0") == "0":  # a schedule that cannot be what was meant (said once under torchrun)
        late = [s for s in cfg.steps if s >= cfg.max_iter]  # iterations count from 0 to max_iter - 1
        if late and steps_given:
            print(f"note: --steps {' '.join(map(str, late))} at or past --max-iter {cfg.max_iter}: "
                  f"{'that lr step never comes' if len(late) == 1 else 'those lr steps never come'}", flush=True)
        if cfg.warmup_iters >= min(cfg.steps[0], cfg.max_iter):  # full lr from warmup_iters to the first step
            until = f"first lr step (--steps {cfg.steps[0]})" if cfg.steps[0] < cfg.max_iter else f"run (--max-iter {cfg.max_iter})"
            print(f"note: --warmup-iters {cfg.warmup_iters} outlasts the {until}: the lr never reaches --lr {cfg.lr:g}",
                  flush=True)
    return cfg, loss_cfg


def lr_at(it, cfg):
    """Linear warmup from lr/3 over warmup_iters, then lr / 10 at each step (paper §4.1)."""
    warmup = 1.0 if it >= cfg.warmup_iters else 1 / 3 + (1 - 1 / 3) * it / cfg.warmup_iters
    return cfg.lr * warmup * 0.1 ** sum(it >= s for s in cfg.steps)


def param_groups(model, weight_decay):
    """The authors' two groups (maskrcnn-benchmark's make_optimizer): every trainable parameter
    but biases at the base lr with `weight_decay` (trainable BatchNorm scales included, as there;
    with pretrained weights BatchNorm is frozen and has none); biases at BIAS_LR_FACTOR x the lr
    with WEIGHT_DECAY_BIAS. "lr_factor" (saved in the optimizer's state) scales lr_at's rate per group."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    return [{"params": weights, "weight_decay": weight_decay, "lr_factor": 1.0},
            {"params": biases, "weight_decay": WEIGHT_DECAY_BIAS, "lr_factor": BIAS_LR_FACTOR}]


def make_optimizer(model, cfg):
    """SGD with momentum over param_groups, fused (one kernel for all parameters, and the only
    form whose step can be skipped on the device: step_unless). The momentum buffers start at
    zero instead of being created by the first step: buf = momentum * 0 + grad is that step's
    buffer exactly, and a first step that step_unless skips then leaves defined buffers behind."""
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, fused=True)
    for group in optimizer.param_groups:
        for p in group["params"] if cfg.momentum != 0 else ():
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict(state), then each momentum buffer laid out like its weight.
    load_state_dict keeps the strides the buffers were saved with, and the fused step pairs a
    weight with its momentum by memory position: after a change of --channels-last (a CPU run
    resumed on a GPU, where it is the default) it would refuse the step on CUDA and, on the CPU,
    give each element of a weight the momentum of another."""
    optimizer.load_state_dict(state)
    for p, p_state in optimizer.state.items():
        if torch.is_tensor(p_state.get("momentum_buffer")):
            p_state["momentum_buffer"] = torch.empty_like(p).copy_(p_state["momentum_buffer"])


def step_unless(optimizer, skip):
    """optimizer.step(), except that nothing changes (parameters, momentum) where `skip`, a 0-dim
    float tensor on the parameters' device, is non-zero; the host never reads `skip`, so the step
    does not wait for the GPU. Fused SGD takes the flag GradScaler uses for overflowed steps."""
    optimizer.grad_scale, optimizer.found_inf = None, skip
    optimizer.step()


def on_cpu(obj):
    """obj with every tensor in it (through dicts, lists and tuples) copied to the CPU; a state
    dict keeps its type and its _metadata (the modules' versions, which load_state_dict reads)."""
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if type(obj) in (list, tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def save_atomic(obj, path):
    """torch.save(obj) to `path` atomically (data.write_atomic), its tensors on the CPU, so that it
    loads on any machine, with a GPU or without. Serialised in memory first, so that a full disk is
    the OSError of a plain write, not torch's stream error."""
    with signals_deferred():  # Ctrl-C and SIGTERM wait for the whole checkpoint
        buffer = io.BytesIO()
        torch.save(on_cpu(obj), buffer)
        write_atomic(path, buffer.getbuffer())


# settings that define a run: --resume refuses a last.pt saved with others (it would not continue that run),
# the FreeAnchor settings (loss_config) included
RESUME_MUST_MATCH = ("train_split", "backbone", "weights", "loss", "batch_size", "lr", "max_iter", "steps",
                     "warmup_iters", "momentum", "weight_decay", "min_size", "max_size", "seed", "clip_grad",
                     "raw_orientation")
# settings a run may change on resuming (another machine, the data moved), though its weights then
# differ from an uninterrupted run's: said in a note
RESUME_MAY_CHANGE = ("data", "device", "amp", "channels_last", "compile", "fixed_shapes")


def resume_changes(names, saved, given):
    """The changes "--flag saved -> given", one for each of `names` that last.pt's settings (dict
    `saved`) hold with another value than this run's (dict `given`), written as on the command line
    (an on/off setting as its two flags: "--no-amp -> --amp")."""
    def shown(value):
        return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    def change(k):
        name = k.replace("_", "-")
        if isinstance(saved[k], bool) and isinstance(given[k], bool):
            return " -> ".join(f"--{name}" if on else f"--no-{name}" for on in (saved[k], given[k]))
        return f"--{name} {shown(saved[k])} -> {shown(given[k])}"
    return [change(k) for k in names if k in saved and not same_setting(k, saved[k], given[k])]


def same_setting(name, saved, given):
    """Whether a setting of last.pt and of this run agree; a weights file is the same file by
    whatever path it is named (./r50.pt, an absolute path)."""
    if name == "weights" and os.path.isfile(str(saved)) and os.path.isfile(str(given)):
        return os.path.samefile(saved, given)
    return saved == given


def rng_state(device):
    """The random states a resumed run needs: the host's, and on CUDA this process's GPU's only
    (a run resumed where fewer GPUs are visible can't restore the others')."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if torch.is_tensor(state["cuda"]) and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def print_dataset_notes(dataset):
    """What training leaves out of the annotation file or reads other than it is written, said once
    before the run, never silently."""
    if dataset.tiny_boxes or dataset.images_without_boxes:
        print(f"note: training leaves out {dataset.tiny_boxes} box(es) of {dataset.ann_file} under 1 px wide or "
              f"high once clipped to their image, and {dataset.images_without_boxes} image(s) without a usable box "
              f"(none annotated, or only crowd regions and such boxes)", flush=True)
    if dataset.unseen_categories:
        print(f"note: {len(dataset.unseen_categories)} of the {len(dataset.categories)} categories of "
              f"{dataset.ann_file} {'has' if len(dataset.unseen_categories) == 1 else 'have'} no usable box there ({', '.join(dataset.unseen_categories[:8])}"
              f"{', ...' if len(dataset.unseen_categories) > 8 else ''}): the model gets a class for each, which it "
              f"never sees an example of", flush=True)
    if dataset.shared_names:
        print(f"note: categories of {dataset.ann_file} share a name ({', '.join(dataset.shared_names[:8])}"
              f"{', ...' if len(dataset.shared_names) > 8 else ''}): they are told apart by id only, in the "
              f"evaluation's tables and pictures", flush=True)
    if dataset.boxes_past_border:
        print(f"note: {dataset.boxes_past_border} of the {dataset.num_boxes} boxes of {dataset.ann_file} extend more "
              f"than 1 px past their image and are clipped to it (COCO boxes are [x, y, width, height])", flush=True)


def resume_from(last_path, cfg, loss_cfg, dataset, model, optimizer, device, world, master):
    """--resume: last.pt checked against this run (its settings, categories and data), its weights,
    optimizer state and random number generators loaded into this process; notes on what differs
    but may (settings that change only the numbers, the annotations, the number of processes).
    Returns the iteration to go on from, and whether the run is complete (at --max-iter, its
    model_final.pt written): then nothing is said here and the caller touches nothing."""
    try:
        # on the CPU: the RNG states must stay CPU tensors; the optimizer moves its own state
        ckpt = load_checkpoint_file(last_path)
        missing = [k for k in ("config", "categories", "iteration", "model", "optimizer", "rng")
                   if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:  # a plain state dict, say, saved over last.pt
            raise TypeError(f"not a last.pt of train.py (no {', '.join(missing)})")
        saved, ckpt_categories, start_iter = ckpt["config"], ckpt["categories"], ckpt["iteration"]
        if not isinstance(saved, dict) or not isinstance(ckpt.get("loss_config") or {}, dict):
            raise TypeError("its settings are not a dict")
        if not isinstance(start_iter, int) or not 0 <= start_iter <= saved.get("max_iter", start_iter):
            raise TypeError(f"iteration {start_iter!r} is not a count from 0 to its --max-iter {saved.get('max_iter')}")
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {last_path}: {error_line(e)}") from None
    if ckpt_categories != dataset.categories:
        raise ValueError(f"{last_path} was trained on other categories than {dataset.ann_file}")
    given, given_loss = dataclasses.asdict(cfg), dataclasses.asdict(loss_cfg)
    changed = resume_changes(RESUME_MUST_MATCH, saved, given)
    changed += resume_changes(given_loss, ckpt.get("loss_config") or {}, given_loss)
    if changed:
        raise ValueError(f"{last_path} belongs to a different run ({'; '.join(changed)}): "
                         f"resume with the run's own settings, or use another --output")
    try:
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"])
    except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{last_path} does not fit this model: {str(e).splitlines()[0]}") from None
    try:
        set_rng_state(ckpt["rng"], device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot read checkpoint {last_path}: its random number generator states: "
                         f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    if start_iter == cfg.max_iter and os.path.exists(os.path.join(cfg.output, "model_final.pt")):
        return start_iter, True
    changed = resume_changes(RESUME_MAY_CHANGE, saved, given)
    if changed and master:
        print(f"note: resuming with other settings than {last_path}'s ({'; '.join(changed)}): the run goes on, "
              f"but its weights will not be those of an uninterrupted run", flush=True)
    digest = dataset.fingerprint
    if ckpt.get("dataset", digest) != digest and master:
        print(f"note: {dataset.ann_file} has changed since {last_path} was written (its images or boxes): the run "
              f"goes on, but its batches and weights will not be those of an uninterrupted run", flush=True)
    if master:
        print(f"resuming {last_path} at iteration {start_iter}/{cfg.max_iter}", flush=True)
        if ckpt.get("world_size", world) != world:
            per_process_bn = not model.config["frozen_bn"] and device.type != "cuda"  # no SyncBatchNorm on CPU
            print(f"note: {last_path} was written by {ckpt['world_size']} process(es), this run has {world}: the "
                  f"batches are the same{', but BatchNorm statistics (per process) differ' if per_process_bn else ''}",
                  flush=True)
    return start_iter, False


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg, loss_cfg, held):
    """The run; `held` (an ExitStack) keeps the run directory's lock until the caller is done."""
    # ------------------------------------------------------------------ processes (torchrun or plain python)
    ddp, rank, world, cfg.device = setup_processes(cfg.device)
    master = rank == 0
    last_path, final_path = os.path.join(cfg.output, "last.pt"), os.path.join(cfg.output, "model_final.pt")

    def lock_output():
        try:
            held.enter_context(directory_lock(cfg.output))
        except ValueError as e:
            if cfg.resume and os.path.isfile(final_path) and not os.access(cfg.output, os.W_OK):
                raise ValueError(f"{e}; it holds a finished run (model_final.pt): nothing to resume") from None
            raise

    # rank 0 locks the run directory; a refusal stops every process at once (not one left waiting)
    on_rank0(lock_output, ddp, master)
    device = torch.device(cfg.device)
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # a handful of padded shapes recur all run long
    # a run already there is refused before the dataset is read and its images checked
    if os.path.exists(final_path) and not os.path.exists(last_path):
        raise ValueError(f"{cfg.output} holds a finished run (model_final.pt) without its last.pt: nothing to "
                         f"resume; use another --output")
    if not cfg.resume and os.path.exists(last_path):
        raise ValueError(f"{cfg.output} already holds a run (last.pt): pass --resume to continue it, "
                         f"or --output to start another")
    if cfg.weights not in ("imagenet", "none") and not os.path.isfile(cfg.weights) and not os.path.exists(last_path):
        raise ValueError(f"--weights {cfg.weights}: {'not a file' if os.path.exists(cfg.weights) else 'no such file'}"
                         f" (a backbone state dict, or 'imagenet' or 'none')")  # said before the data is read

    # ------------------------------------------------------------------ data (all checks before iteration 0)
    root = resolve_root_once(cfg.data, ddp, master)  # builds shapes once
    # recorded for evaluate.py, which may run from another directory (and there would build another shapes)
    cfg.data = os.path.abspath(root)
    dataset = CocoDataset(root, cfg.train_split, train=True, max_size=cfg.max_size, exif=not cfg.raw_orientation)
    if master:
        print_dataset_notes(dataset)
    val_file, _ = split_files(root, cfg.val_split)
    if master and not os.path.isfile(val_file):  # said now, not when evaluate.py looks for it after the run
        print(f"note: --val-split {cfg.val_split}: there is no {val_file}; evaluate.py will need --split", flush=True)
    if not cfg.skip_check:  # every image's header, on all CPUs of rank 0; the other ranks wait
        on_rank0(dataset.check_images, ddp, master)
    # Where images get resized: on a GPU inside the step (uint8 through the loader, ~free there);
    # on a CPU-only run in the workers, which otherwise idle beside the step (benchmarks/data.py).
    dataset.resize_in_worker = device.type == "cpu"

    # ------------------------------------------------------------------ model, optimizer, resume
    os.makedirs(cfg.output, exist_ok=True)
    if master:  # this process holds the directory's lock: no other writes there
        remove_partial_writes(cfg.output, ("last.pt", "model_final.pt", "log.jsonl", "config.json"))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    # a resumed run takes every weight from last.pt: the backbone's file (or download) is not read
    # again, only the model laid out as pretrained weights lay it out (frozen BatchNorm, stem, res2)
    resuming, pretrained = cfg.resume and os.path.exists(last_path), cfg.weights != "none"
    try:
        model = RetinaNet(len(dataset.categories), backbone=cfg.backbone, weights="none" if resuming else cfg.weights,
                          min_size=cfg.min_size, max_size=cfg.max_size, frozen_bn=pretrained,
                          prior_prob=RETINANET_PRIOR_PROB if cfg.loss == "retinanet" else PRIOR_PROB)
    except RuntimeError as e:  # ImageNet weights not downloadable: model.py's one-line advice
        raise ValueError(str(e)) from None
    if resuming and pretrained:
        model.freeze_stem()
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    if ddp and not model.config["frozen_bn"] and device.type == "cuda":
        # from scratch: BatchNorm statistics over all GPUs. SyncBatchNorm exists only on CUDA: CPU
        # processes normalise over their own images (rank 0's running statistics are broadcast).
        # Its forward waits for the GPU once per layer, and torch.compile breaks its graph there.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = make_optimizer(model, cfg)

    start_iter = 0
    if cfg.resume and os.path.exists(last_path):
        start_iter, complete = resume_from(last_path, cfg, loss_cfg, dataset, model, optimizer, device, world, master)
        if complete:  # nothing left to do: touch nothing
            if master:
                print(f"the run in {cfg.output} is complete ({final_path}): nothing to resume", flush=True)
            return final_path
    elif cfg.resume and master:
        print(f"no checkpoint in {cfg.output} yet: starting from iteration 0", flush=True)
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    free_anchor_loss, retinanet_loss = freeanchor.free_anchor_loss, freeanchor.retinanet_loss
    canvases = canvas_shapes(cfg.min_size, cfg.max_size) if cfg.fixed_shapes else None  # [(H, W)]
    if cfg.compile:
        # With --fixed-shapes (the default with --compile) every batch is padded to one of a few
        # canvases and the network is compiled once per canvas, static; the loss once per anchor
        # count of those canvases (a landscape canvas and its portrait transpose have the same), static
        # in A and for any object count (the loop marks G dynamic, below). On an H200 (R-50, 800x1333,
        # B = 16) the step ran 3% faster with the loss static in A than with A marked dynamic: its sums
        # over [B, A, K] get constant sizes. With --no-fixed-shapes the loop also marks H, W and A
        # dynamic, so that aspect-ratio groups and multi-scale training do not recompile:
        # slower to compile and to run on a GPU, and the backend may add guards of its own (on a
        # CPU, inductor's convolutions compile again for each new padded size). The log counts
        # the compilations.
        if master and device.type == "cpu":
            print("note: --compile on a CPU: compiled steps measured no faster than eager, it is meant for CUDA"
                  + ("" if cfg.fixed_shapes else "; inductor compiles the network again for each new image size "
                     "(up to torch.compile's limit of 8, then eager), which --fixed-shapes, the default, bounds"),
                  flush=True)
        compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # this process may have compiled before
        if cfg.fixed_shapes:  # one static graph per canvas; all of them fit under the recompile limit
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(canvases) + 1)
            model = torch.compile(model, dynamic=False)
        else:
            model = torch.compile(model)
        free_anchor_loss, retinanet_loss = freeanchor.compile_loss(free_anchor_loss), freeanchor.compile_loss(retinanet_loss)

    sampler = TrainSampler(dataset, cfg.batch_size, min_sizes=cfg.min_size, flip=True, rank=rank,
                           world_size=world, seed=cfg.seed, start_iter=start_iter, max_iter=cfg.max_iter)
    workers = usable_workers(cfg.workers, say=master)  # the batches do not depend on it (the sampler draws)
    # The loader draws its workers' seed when iteration starts: from a generator of its own, not
    # from the global RNG that checkpoints save, or a resumed run would be one draw ahead of an
    # uninterrupted one (nothing random reads it today; dropout or a random crop would).
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=workers, pin_memory=device.type == "cuda",  # non_blocking copies
                                         generator=torch.Generator().manual_seed(cfg.seed),
                                         worker_init_fn=init_worker)

    log_path = os.path.join(cfg.output, "log.jsonl")
    if master:
        write_atomic(os.path.join(cfg.output, "config.json"), json.dumps(
            {"train": dataclasses.asdict(cfg), "freeanchor": dataclasses.asdict(loss_cfg), "model": raw_model.config,
             "categories": dataset.categories, "world_size": world}, indent=1).encode())
        if os.path.exists(log_path):  # a resumed run: forget what happened after the checkpoint
            with open(log_path) as f:
                kept = [l for l in f if l.strip() and (i := _iter_of(l)) is not None and i <= start_iter]
            write_atomic(log_path, "".join(kept).encode())
        elif start_iter > 0:  # removed since the checkpoint: what it held is gone, not to be taken for the run
            print(f"note: {log_path} is missing: it starts again at iteration {start_iter + 1}", flush=True)
        speed = ", ".join(name for name, on in (("bf16 autocast", cfg.amp), ("channels_last", cfg.channels_last),
                                                ("torch.compile", cfg.compile), ("fixed shapes", cfg.fixed_shapes)) if on) or "float32"
        print(f"{len(dataset)} training images, {len(dataset.categories)} classes, {world} process(es) x "
              f"{cfg.batch_size // world} image{'' if cfg.batch_size == world else 's'}, {cfg.loss} loss, {cfg.backbone} ({cfg.weights}), "
              f"iterations {start_iter}..{cfg.max_iter}, {cfg.device} ({speed}), output {cfg.output}", flush=True)

    data_digest = dataset.fingerprint

    def checkpoint(iteration):
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "iteration": iteration, "rng": rng_state(device), "categories": dataset.categories, "world_size": world,
                     "dataset": data_digest,  # --resume notes annotations changed under the same path
                     "model_config": raw_model.config, "config": dataclasses.asdict(cfg),
                     "loss_config": dataclasses.asdict(loss_cfg)}, last_path)

    def average_over_processes(count):
        """A count of this process's batch -> its mean over the processes, so that N processes x b
        images train like 1 process x N b (DETR does the same with its box count)."""
        if ddp:
            dist.all_reduce(count)
            count = count / world
        return count

    # Device-side record of the run's health, read by the host only where it logs or checkpoints:
    # all_finite (every step so far had a finite loss and gradient), the first bad iteration and its loss terms.
    terms = ("positive", "negative") if cfg.loss == "freeanchor" else ("classification", "regression")
    all_finite = torch.ones((), dtype=torch.bool, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    bad_terms = torch.zeros(len(terms), device=device)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]

    def stop_if_not_finite():
        if all_finite.item():  # a host-device sync, where the host waits anyway (log, checkpoint)
            return
        values = ", ".join(f"{k} {v:.4g}" for k, v in zip(terms, bad_terms.tolist()))
        what = "loss" if not math.isfinite(sum(bad_terms.tolist())) else "gradient"
        kept = f"the last good checkpoint is {last_path}" if os.path.exists(last_path) else "no checkpoint was written"
        # counted from 1, as the log's "iter N" (the N-th iteration done)
        raise FloatingPointError(f"non-finite {what} at iteration {first_bad.item() + 1}: {values}; weights not updated "
                                 f"from it on; stopped, {kept} (try a lower --lr or longer --warmup-iters)")

    # ------------------------------------------------------------------ the loop
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)
    model.train()
    window_start, window_iters = time.time(), 0
    compile_s = None  # with --compile: how long the first iteration, which compiles, took
    for it, batch in zip(range(start_iter, cfg.max_iter), loader_batches(loader)):
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        # images [B, 3, H, W] normalised and padded; objects padded: gt_boxes [B, G, 4], gt_labels [B, G]
        images, gt_boxes, gt_labels = to_device(batch, device, pad_to=8)
        if ddp:  # this process's share padded as the whole batch is in one process: the same anchors,
            # and with --fixed-shapes the same canvas
            images = pad_to_canvas(images, [dataset.padded_shape(sampler.global_batch(it))])  # [B, 3, H, W]
        if canvases:
            images = pad_to_canvas(images, canvases)  # [B, 3, H, W]  one of a few fixed shapes
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        if cfg.compile:  # image size and object count vary: compile for any of them at once
            if not canvases:
                torch._dynamo.maybe_mark_dynamic(images, [2, 3])  # H, W
            torch._dynamo.maybe_mark_dynamic(gt_boxes, 1)  # G
            torch._dynamo.maybe_mark_dynamic(gt_labels, 1)

        with autocast:
            try:
                cls_logits, box_deltas, anchors = model(images)
            except ValueError as e:  # BatchNorm of a from-scratch backbone given one value per channel
                if "value per channel" not in str(e):
                    raise
                raise ValueError(f"iteration {it + 1}: {cfg.batch_size // world} image(s) of {images.shape[-2]}x"
                                 f"{images.shape[-1]} px per process leave BatchNorm one value per channel at stride 32"
                                 f" (from scratch, it normalises over the batch): use a larger --batch-size or "
                                 f"--min-size") from None
        if cfg.compile and canvases:  # A, fixed by the canvas: the loss compiled once per canvas's A
            torch._dynamo.mark_static(cls_logits, 1)
            torch._dynamo.mark_static(box_deltas, 1)
            torch._dynamo.mark_static(anchors, 0)
        elif cfg.compile:  # A, which follows H and W
            torch._dynamo.maybe_mark_dynamic(cls_logits, 1)
            torch._dynamo.maybe_mark_dynamic(box_deltas, 1)
            torch._dynamo.maybe_mark_dynamic(anchors, 0)
        if cfg.loss == "freeanchor":
            # ||B|| of Eq. 7 from the host's lists (no device read), averaged over processes; made
            # on the device by a fill, not a copy, and a tensor, so that torch.compile does not
            # specialise the loss on its value
            num_objects = torch.full((), float(sum(len(t["labels"]) for t in batch[1])), device=device)
            if ddp:
                num_objects = average_over_processes(num_objects)
            losses = free_anchor_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels,
                                      cfg=loss_cfg, num_objects=num_objects)
        else:
            losses = retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels,
                                    average_count=average_over_processes)
        loss = sum(losses.values())

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        # a non-finite loss or gradient on any process skips this step and every later one on every
        # process, without the host waiting for the answer
        finite = (torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)).float()
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        newly_bad = all_finite & (finite == 0)
        first_bad = torch.where(newly_bad, it, first_bad)
        bad_terms = torch.where(newly_bad, torch.stack([losses[k].detach().float() for k in terms]), bad_terms)
        all_finite = all_finite & (finite > 0)
        step_unless(optimizer, (~all_finite).float())
        window_iters += 1

        done = it + 1
        log_now = done % cfg.log_every == 0 or done == cfg.max_iter
        if cfg.compile and done == start_iter + 1:
            loss.item()  # wait for the first step, which compiled the network and the loss
            compile_s = time.time() - window_start
            if master:
                print(f"first iteration (compilation) {compile_s:.1f} s", flush=True)
            if not log_now:  # the first log's speed and ETA: compiled steps
                window_start, window_iters = time.time(), 0
        if log_now:
            stop_if_not_finite()
            values = torch.stack([losses[k].detach().float() for k in terms])
            if ddp:
                dist.all_reduce(values)
                values /= world
            elapsed = time.time() - window_start
            sec_per_iter = elapsed / window_iters
            record = {"iter": done, "max_iter": cfg.max_iter, **{k: round(v, 6) for k, v in zip(terms, values.tolist())},
                      "loss": round(values.sum().item(), 6), "lr": lr, "s_per_iter": round(sec_per_iter, 4),
                      "images_per_s": round(cfg.batch_size / sec_per_iter, 2),
                      "eta_s": round(sec_per_iter * (cfg.max_iter - done)), "peak_mem_mb": round(peak_memory_mb(device))}
            if cfg.compile:  # graphs torch.compile has built so far: 2 (network, loss) unless it recompiled
                record["compilations"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - compiled_before
                if compile_s is not None:  # the run's first record also says how long the compilation took
                    record["compile_s"], compile_s = round(compile_s, 1), None
            if master:
                shown = "  ".join(f"{k} {record[k]:.4f}" for k in terms)
                print(f"iter {done}/{cfg.max_iter}  {shown}  loss {record['loss']:.4f}  lr {lr:.3g}  "
                      f"{sec_per_iter:.3f} s/it  {record['images_per_s']:.1f} img/s  "
                      f"eta {format_eta(record['eta_s'])}  mem {record['peak_mem_mb']} MB"
                      + (f"  compilations {record['compilations']}" if cfg.compile else ""), flush=True)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            window_start, window_iters = time.time(), 0
        if done % cfg.ckpt_every == 0 or done == cfg.max_iter:
            stop_if_not_finite()  # only a run whose every step was finite is saved
            if master:
                checkpoint(done)

    stop_if_not_finite()
    if master:
        final = {"model": raw_model.state_dict(), "model_config": raw_model.config, "categories": dataset.categories,
                 "config": dataclasses.asdict(cfg), "loss_config": dataclasses.asdict(loss_cfg), "iteration": cfg.max_iter}
        try:
            save_atomic(final, final_path)
        except DeferredInterrupt as e:  # Ctrl-C during the write, which completed first: the run is done
            print(f"done: {final_path}", flush=True)
            raise DeferredInterrupt(e.signum, "after the run completed") from None
        print(f"done: {final_path}", flush=True)
    if ddp:
        dist.barrier()
    return final_path


def _iter_of(line):
    try:
        return json.loads(line)["iter"]
    except (ValueError, KeyError, TypeError):
        return None


def main(argv=None):
    """CLI entry: user mistakes (bad arguments, data, checkpoints, a diverging run) end with one
    line on stderr and exit status 2 (1 for a non-finite loss), never a traceback; Ctrl-C and
    SIGTERM with one line and status 130 or 143."""
    cfg = None
    restore_signals = catch_stop_signals()  # from here Ctrl-C and SIGTERM are the KeyboardInterrupt below
    try:
        cfg, loss_cfg = parse_config(argv)
        with contextlib.ExitStack() as held:  # the run directory's lock, taken in train()
            return train(cfg, loss_cfg, held)
    except (DataError, ValueError, FloatingPointError) as e:
        end_progress_line()
        print_stop(f"error: {e}", own=isinstance(e, ImageError))
        sys.exit(1 if isinstance(e, FloatingPointError) else 2)
    except (OSError, RuntimeError) as e:  # the machine's (a full disk), another process's, or a bug
        stop_on_failure(e)
    except KeyboardInterrupt as e:
        end_progress_line()
        word, status = stopped_by(e)
        if e.args:
            message = f"{word} {e.args[0]}"
        elif cfg is None:  # while the arguments were read
            message = f"{word}: nothing was started"
        elif os.path.exists(os.path.join(cfg.output, "model_final.pt")):  # after "done:"
            message = f"{word} after the run completed"
        elif os.path.exists(os.path.join(cfg.output, "last.pt")):
            message = f"{word}: resume with --resume"
        else:
            message = f"{word} before the first checkpoint: nothing to resume, run the command again"
        print_stop(message)  # once under torchrun, whose every process gets the signal
        sys.exit(status)
    finally:  # also when a run stops on an error (NCCL warns, and may hang at exit, otherwise)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        restore_signals()


if __name__ == "__main__":
    run_program(main, _stopped_before_main)
