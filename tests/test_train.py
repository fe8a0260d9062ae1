"""Tests of train.py: learning, the DDP normaliser, exact resume (also after kill -9), the
non-finite guard, the recipe, and the CLI end to end on tiny data.

The runs here are pinned to --device cpu, so a GPU machine checks the same claims: exact resume is
a CPU claim within one torch build (the same ops on the same inputs, run twice), and others rest on
the CPU's defaults (float32, NCHW). test_cli_end_to_end_on_tiny_shapes alone takes the default
device: on a GPU machine, train.py's CUDA defaults end to end (bf16 autocast and channels_last
from compute capability 8.0, pinned memory); tests/test_cuda.py has the GPU's own checks.

    python -m pytest tests/test_train.py
"""

import contextlib
import copy
import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image, ImageDraw

import freeanchor
import train
from data import CocoDataset, collate, prepare_shapes, to_device
from model import RetinaNet
from test_model import OpCounter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone", "resnet18", "--weights", "none", "--min-size", "64", "--max-size", "64",
        "--workers", "0", "--log-every", "1", "--device", "cpu"]


def make_dataset(root, num_images=8, size=64):
    """A COCO-layout dataset of same-size images with one to three filled rectangles of two
    categories (ids 5 and 9: not contiguous)."""
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "train2017"))
    gen = torch.Generator().manual_seed(0)
    images, annotations = [], []
    for i in range(num_images):
        img = Image.new("RGB", (size, size), (90, 90, 90))
        draw = ImageDraw.Draw(img)
        for _ in range(1 + i % 3):
            w, h = (torch.randint(12, 30, (2,), generator=gen)).tolist()
            x, y = torch.randint(0, size - 30, (2,), generator=gen).tolist()
            cat = 5 if len(annotations) % 2 else 9
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=(230, 40, 40) if cat == 5 else (40, 40, 230))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        img.save(os.path.join(root, "train2017", f"{i + 1}.png"))
        images.append({"id": i + 1, "file_name": f"{i + 1}.png", "width": size, "height": size})
    with open(os.path.join(root, "annotations", "instances_train2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 5, "name": "red"}, {"id": 9, "name": "blue"}]}, f)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("tiny") / "data"))


def run_cli(args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True,
                          text=True, cwd=kwargs.pop("cwd", ROOT), **kwargs)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ----------------------------------------------------------------------------- learning

@pytest.mark.slow  # 40 training steps
def test_overfits_a_fixed_batch(tiny_data):
    """40 SGD steps on one batch halve the loss. The learning rate is one at which the descent is
    smooth on every CPU kernel set: at 0.003 it bounced in the last steps, to 2.9-3.3 under
    ATEN_CPU_CAPABILITY=default against 1.9-2.2 under avx2, above half of the first loss (5.29)."""
    torch.manual_seed(0)
    dataset = CocoDataset(tiny_data, "train2017", train=True, max_size=64)
    batch = collate([dataset[(i, 64, False)] for i in range(4)])
    images, targets = to_device(batch, "cpu")[0], batch[1]  # normalised, resized, padded
    model = RetinaNet(2, backbone="resnet18", weights="none", min_size=64, max_size=64)
    optimizer = torch.optim.SGD(train.param_groups(model, 1e-4), lr=0.002, momentum=0.9)
    losses = []
    for _ in range(40):
        cls_logits, box_deltas, anchors = model(images)
        out = freeanchor.free_anchor_loss(cls_logits, box_deltas, anchors, [t["boxes"] for t in targets],
                                          [t["labels"] for t in targets])
        loss = out["positive"] + out["negative"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


def test_amp_falls_back_to_float32_on_a_cpu_without_native_bfloat16(monkeypatch, capsys):
    """bfloat16 autocast on a CPU that emulates it is slower than float32: --amp is dropped there,
    with a note, for training and evaluation alike; kept where the CPU has bfloat16 instructions."""
    import data
    import evaluate
    monkeypatch.delenv("RANK", raising=False)
    for native in (False, True):
        monkeypatch.setattr(data, "cpu_has_native_bf16", lambda: native)
        train_cfg, _ = train.parse_config(["--device", "cpu", "--amp"])
        eval_cfg = evaluate.parse_config(["--ckpt", "model_final.pt", "--device", "cpu", "--amp"])
        out = capsys.readouterr().out
        assert train_cfg.amp == eval_cfg.amp == native
        assert out.count("--amp ignored") == (0 if native else 2), out
    monkeypatch.setattr(data, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("RANK", "1")  # a torchrun worker other than the first: the same fallback, no note
    assert not train.parse_config(["--device", "cpu", "--amp"])[0].amp
    assert "--amp ignored" not in capsys.readouterr().out


def test_default_output_is_named_after_the_data_folder(monkeypatch, tmp_path):
    """runs/<loss>_<backbone>_<data folder's name>, also for a --data of "." or ending in a slash."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    for data_arg, name in (("shapes", "shapes"), ("mine/", "mine"), (".", tmp_path.name), ("mine/..", tmp_path.name),
                           ("/", "root")):
        cfg = train.parse_config(["--device", "cpu", "--data", data_arg, "--backbone", "resnet18"])[0]
        assert cfg.output == os.path.join("runs", f"freeanchor_resnet18_{name}"), data_arg


def test_compile_pads_to_fixed_shapes_unless_told_not_to(monkeypatch):
    """--compile pads every batch to a few fixed canvases by default (static graphs: faster to
    compile and to run than one graph for any size, measured on a GPU); --no-fixed-shapes compiles
    for any size; without --compile, no padding unless --fixed-shapes asks for it."""
    monkeypatch.delenv("RANK", raising=False)
    for argv, fixed in (([], False), (["--compile"], True), (["--compile", "--no-fixed-shapes"], False),
                        (["--fixed-shapes"], True), (["--compile", "--fixed-shapes"], True)):
        assert train.parse_config(["--device", "cpu", *argv])[0].fixed_shapes is fixed, argv


def test_cuda_defaults_follow_the_gpu_and_torchrun_takes_a_gpu_per_process(monkeypatch, capsys, tmp_path):
    """On CUDA bf16 autocast and channels_last are the defaults from compute capability 8.0 (A100,
    H100); a V100 (7.0) or T4 (7.5) emulates bfloat16, slower than float32: float32 and NCHW by
    default there, and --amp falls back to float32 with a note naming the GPU. The GPU asked about
    is the one the process will use (under torchrun, LOCAL_RANK's, or the only one it sees), and
    torchrun with more processes than GPUs is refused in one line. Checked with torch.cuda's
    queries replaced, on any machine."""
    import evaluate
    monkeypatch.setattr(torch.version, "hip", None)  # CUDA's rules (under ROCm, every AMD GPU has bfloat16)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for capability, name, native in (((7, 0), "Tesla V100-SXM2-32GB", False), ((7, 5), "Tesla T4", False),
                                     ((8, 0), "NVIDIA A100-SXM4-40GB", True), ((9, 0), "NVIDIA H100", True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: asked.append(index) or c)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None, n=name: n)
        for device in ([], ["--device", "cuda"], ["--device", "cuda:1"]):
            train_cfg, _ = train.parse_config(device)
            eval_cfg = evaluate.parse_config(["--ckpt", "model_final.pt", *device])
            assert train_cfg.amp == eval_cfg.amp == train_cfg.channels_last == eval_cfg.channels_last == native
        assert capsys.readouterr().out == ""  # a default is not a request: no note
        assert train.parse_config(["--device", "cuda", "--amp"])[0].amp == native
        out = capsys.readouterr().out
        if native:
            assert out == ""
        else:
            assert out == (f"note: --amp ignored: this GPU ({name}, compute capability {capability[0]}.{capability[1]}) "
                           "has no native bfloat16 (8.0 or later), where float32 is faster\n")
        assert not train.parse_config(["--device", "cuda", "--no-amp"])[0].amp
    asked.clear()
    train.parse_config(["--device", "cuda:1"])
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)  # torchrun's second process on a machine of 2 GPUs
    train.parse_config(["--device", "cuda"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # each process shown its own GPU by a
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")            # scheduler, whatever its LOCAL_RANK
    train.parse_config(["--device", "cuda"])
    assert asked == [1, 1, 0]
    # more processes than GPUs: the same line from every process, printed by the first alone
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for count in (2, 1):  # 2 GPUs; 1 GPU, the same for all processes
        monkeypatch.setattr(torch.cuda, "device_count", lambda c=count: c)
        for rank in ("1", "0"):
            monkeypatch.setenv("RANK", rank)
            monkeypatch.setenv("LOCAL_RANK", rank)
            with pytest.raises(SystemExit) as e:
                train.main(["--device", "cuda", "--output", str(tmp_path / "never")])
            assert e.value.code == 2
            assert capsys.readouterr().err == ("" if rank == "1" else
                                               f"error: 4 processes on this machine but {count} GPU(s) visible to "
                                               f"each: run one process per GPU (torchrun --nproc_per_node {count})\n")
    assert not (tmp_path / "never").exists()


def test_lr_schedule_and_weight_decay_groups():
    cfg, _ = train.parse_config(["--batch-size", "8", "--max-iter", "900"])
    assert cfg.lr == pytest.approx(0.005) and cfg.steps == (600, 800)
    assert train.lr_at(0, cfg) == pytest.approx(0.005 / 3)
    assert train.lr_at(250, cfg) == pytest.approx(0.005 * (1 / 3 + 2 / 3 * 0.5))
    assert train.lr_at(500, cfg) == pytest.approx(0.005)
    assert train.lr_at(600, cfg) == pytest.approx(0.0005)
    assert train.lr_at(899, cfg) == pytest.approx(0.00005)
    model = RetinaNet(3, backbone="resnet18", weights="none", min_size=64, max_size=64)
    decay, no_decay = train.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    assert decay["lr_factor"] == 1 and no_decay["lr_factor"] == 2  # the authors' BIAS_LR_FACTOR
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert all(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())


# ----------------------------------------------------------------------------- DDP

def run_two_processes(argv, check=True, **env):
    """Runs `python argv` as ranks 0 and 1 of a 2-process job on this machine, with the environment
    torchrun gives its workers but without torchrun's own process (2 s of imports here), on a free
    port; asserts both succeed, or with check=False returns their (exit status, stderr). The port is
    free when chosen; another program on the machine may take it before rank 0 binds it, and then
    the job runs again on another one."""
    for _ in range(3):
        outcomes = _two_processes_once(argv, env)
        if len(outcomes) == 2:
            break
    else:
        pytest.fail(f"the rendezvous port was taken 3 times: {outcomes[0][1][-3000:]}")
    for status, err in outcomes:
        assert not check or status == 0, err[-3000:]
    return outcomes


def _two_processes_once(argv, env):
    with socket.socket() as s:  # a free port for the rendezvous (a fixed one may be taken)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **env, "RANK": str(rank), "WORLD_SIZE": "2",
                                              "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for rank in (0, 1)]
    outcomes = []
    try:
        for p in procs:
            try:  # once rank 0 has failed, rank 1 may be left waiting for it: a minute, not five
                _, err = p.communicate(timeout=300 if p is procs[0] or procs[0].returncode == 0 else 60)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            outcomes.append((p.returncode, err))
            if "address already in use" in err.lower():  # rank 0 could not listen there: a lost race
                break  # for the port, and rank 1 would wait for it; both are killed below
    finally:
        for p in procs:  # a process left waiting for the other one
            p.kill()
    return outcomes


def test_a_taken_rendezvous_port_is_one_line_naming_it(tiny_data, tmp_path, monkeypatch, capsys):
    """Under torchrun, rank 0 listens at MASTER_ADDR:MASTER_PORT: where another program holds that
    port, the run ends with status 1 and one line naming the address and the cause (before, it
    said that another process of the run had stopped)."""
    threads = torch.get_num_threads()  # the DDP setup splits the CPUs between the processes
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
            monkeypatch.setenv(name, value)
        try:
            with pytest.raises(SystemExit) as stop:
                train.main([*TINY, "--data", tiny_data, "--device", "cpu", "--output", str(tmp_path / "run")])
        finally:
            torch.set_num_threads(threads)
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "address already in use" in err[0].lower(), err


@pytest.mark.slow
def test_two_processes_stop_on_bad_data_with_one_line_and_no_traceback(tiny_data, tmp_path):
    """Under torchrun, the image check that rank 0 alone makes stops both processes, its line
    printed once; with the check skipped, the process that meets the image at decode says so, and
    the other one, whose collective lost it, says that in one line: no traceback either way."""
    import shutil
    from data import TrainSampler
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)
    dataset = CocoDataset(data, "train2017", train=True)
    (bad, _, _), = next(iter(TrainSampler(dataset, 2, (64,), rank=1, world_size=2, max_iter=4)))  # rank 1's first
    path = dataset.path(bad)
    Image.new("RGB", (65, 64)).save(path)  # annotated 64x64
    args = [os.path.join(ROOT, "train.py"), *TINY, "--data", data, "--batch-size", "2", "--max-iter", "4"]
    (status0, err0), (status1, err1) = run_two_processes([*args, "--output", str(tmp_path / "a")], check=False,
                                                         OMP_NUM_THREADS="1")
    assert status0 == status1 == 2 and err1 == ""
    assert err0 == f"error: 1 of 8 images cannot be used: {path} (is 65x64 but the annotations say 64x64)\n"
    (status0, err0), (status1, err1) = run_two_processes([*args, "--skip-check", "--output", str(tmp_path / "b")],
                                                         check=False, OMP_NUM_THREADS="1")
    assert (status0, status1) == (1, 2)
    assert err1 == f"error: image {path} is 65x64 but the annotations say 64x64 ({dataset.ann_file})\n"
    assert err0 == "error: stopped: another process of this run stopped (its message, if any, is above)\n"


def assert_a_bad_image_stops_it_and_its_workers(main, argv, data, split, train):
    """main(argv + ["--data", copy]), on a copy of the dataset at `data` whose first image of `split`
    fails at decode in a DataLoader worker (--skip-check: the header check would name it first):
    status 2, the image's one line, and no worker left alive. Left alive (torch re-raises their
    error from a reference cycle that keeps the loader), they would hang the interpreter's exit:
    multiprocessing ends them with SIGTERM, which they ignore."""
    import gc
    import multiprocessing
    import shutil
    before = set(multiprocessing.active_children())
    copy = os.path.join(os.path.dirname(argv[argv.index("--output") + 1]), "data")
    shutil.copytree(data, copy)
    dataset = CocoDataset(copy, split, train=train)
    Image.new("RGB", (65, 64)).save(dataset.path(0))  # annotated 64x64
    with pytest.raises(SystemExit) as e:
        main([*argv, "--data", copy, "--skip-check", "--workers", "1"])
    assert e.value.code == 2
    del e
    left = set(multiprocessing.active_children()) - before
    gc.collect()  # frees a loader kept by a reference cycle, so that a failure does not hang pytest's exit
    assert not left
    return f"error: image {dataset.path(0)} is 65x64 but the annotations say 64x64 ({dataset.ann_file})\n"


def test_a_bad_image_met_by_a_worker_stops_the_run_and_its_workers(tiny_data, tmp_path, capsys):
    """An image that fails at decode in a DataLoader worker stops the run with its one line, and the
    workers end with it."""
    expected = assert_a_bad_image_stops_it_and_its_workers(
        train.main, [*TINY, "--batch-size", "2", "--max-iter", "4", "--output", str(tmp_path / "run")],
        tiny_data, "train2017", train=True)
    assert capsys.readouterr().err == expected


def train_single_and_ddp(tiny_data, tmp_path, backbone, *extra):
    """Two SGD steps of 2 images, in 1 process and in 2 gloo processes of 1 image (the cores split between them),
    from a local random backbone file (frozen BatchNorm, so nothing else differs); the final
    weights of both runs. Multi-scale, so that the images of a batch differ in size: each process
    pads its image as the whole batch is padded in one process (padding adds anchors, which the
    negative term sees). The backbone is seeded: with a random one, one run in ten moved a weight
    of one layer by a few percent of its update, where a ReLU input within float32 rounding of 0
    (the batch of 2 and the batches of 1 go through different convolution kernels) falls on the
    other side of it. (test_two_process_ddp_from_scratch_on_cpu runs torchrun itself.)"""
    import torchvision
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), backbone)
    args = [*TINY, "--weights", str(backbone), "--data", tiny_data, "--batch-size", "2", "--max-iter", "2",
            "--lr", "0.05", "--warmup-iters", "0", "--min-size", "64", "96", "--max-size", "96", *extra]
    train.main([*args, "--output", str(tmp_path / "single")])
    run_two_processes([os.path.join(ROOT, "train.py"), *args, "--output", str(tmp_path / "ddp")], OMP_NUM_THREADS="1")
    return weights(tmp_path / "single" / "model_final.pt"), weights(tmp_path / "ddp" / "model_final.pt")


@pytest.mark.slow
def test_two_process_ddp_step_equals_one_process(tiny_data, tmp_path):
    """2 gloo processes x 1 image == 1 process x 2 images, one SGD step: the gradients are averaged
    over processes and the loss normaliser ||B|| is all-reduced. Pretrained (here: a local random
    backbone file) so BatchNorm is frozen and nothing else differs. Different computations (batch
    split, thread counts): compared to float32 tolerances. With --fixed-shapes, each process pads to
    the canvas of the whole batch, not to the smallest that holds its own image (the RetinaNet test
    below runs without it)."""
    backbone = tmp_path / "resnet18.pt"
    a, b = train_single_and_ddp(tiny_data, tmp_path, backbone, "--fixed-shapes")
    moved = 0
    start = RetinaNet(2, backbone="resnet18", weights=str(backbone), min_size=64, max_size=64).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(a[k], start[k]) if k in start and "body" not in k else 0
    assert moved > 0  # the step did change the weights
    log = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl")]
    single_log = [json.loads(l) for l in open(tmp_path / "single" / "log.jsonl")]
    assert log[0]["positive"] == pytest.approx(single_log[0]["positive"], rel=1e-5)


@pytest.mark.slow
def test_two_process_ddp_from_scratch_on_cpu(tiny_data, tmp_path):
    """--weights none under torchrun on CPU: trainable BatchNorm without SyncBatchNorm (CUDA only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "scratch"
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", os.path.join(ROOT, "train.py"), *TINY, "--data", tiny_data,
                          "--batch-size", "2", "--max-iter", "2", "--output", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["iter"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert (out / "model_final.pt").exists()


# ----------------------------------------------------------------------------- resume

def test_resume_needs_no_backbone_file_and_takes_it_from_any_directory(tiny_data, tmp_path, monkeypatch, capsys):
    """A run started from a local backbone file resumes from another working directory, the file
    named by another relative path (the same file: accepted), and also once the file is gone:
    every weight comes from last.pt, the model laid out as pretrained weights lay it out (frozen
    BatchNorm, stem and res2: else the optimizer's state would not fit it). A log.jsonl removed
    meanwhile gets a note."""
    import torchvision
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "a" / "r18.pt")
    args = [*TINY, "--weights", "r18.pt", "--data", tiny_data, "--batch-size", "2", "--max-iter", "3",
            "--ckpt-every", "1", "--output", str(tmp_path / "run")]
    calls, real = {"n": 0}, freeanchor.free_anchor_loss

    def stop_at_2nd(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if stopped during iteration 2: last.pt at 1
        return real(*a, **k)

    monkeypatch.setattr(freeanchor, "free_anchor_loss", stop_at_2nd)
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.chdir(tmp_path / "b")
    calls["n"] = 1  # stopped again at the first step: past the checks of --resume
    with pytest.raises(SystemExit) as e:
        train.main([*args[:args.index("r18.pt")], "../a/r18.pt", *args[args.index("r18.pt") + 1:], "--resume"])
    assert e.value.code != 2  # not refused as another run's checkpoint
    monkeypatch.setattr(freeanchor, "free_anchor_loss", real)
    os.remove(tmp_path / "a" / "r18.pt")
    os.remove(tmp_path / "run" / "log.jsonl")
    capsys.readouterr()
    train.main([*args[:args.index("r18.pt")], str(tmp_path / "a" / "r18.pt"), *args[args.index("r18.pt") + 1:], "--resume"])
    assert (tmp_path / "run" / "model_final.pt").exists()
    assert f"note: {tmp_path / 'run' / 'log.jsonl'} is missing: it starts again at iteration 2\n" in capsys.readouterr().out
    assert [json.loads(l)["iter"] for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()] == [2, 3]


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tiny_data, tmp_path):
    """A real SIGKILL in the middle of the run (checkpoints every 2 iterations), then --resume:
    bit for bit on CPU, where both runs are the same ops on the same inputs (the uninterrupted run
    and the resumed one run in this process, the killed one in its own): the weights, the state a
    further resume starts from (momentum, the RNG states), and the logged losses, each iteration
    logged once."""
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "10", "--ckpt-every", "2",
            "--warmup-iters", "2", "--lr", "0.02", "--seed", "3"]
    train.main([*args, "--output", str(tmp_path / "whole")])
    log = tmp_path / "killed" / "log.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--output", str(tmp_path / "killed")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum(1 for _ in open(log)) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model_final.pt").exists()
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["iteration"] >= 2
    train.main([*args, "--output", str(tmp_path / "killed"), "--resume"])
    assert_same_weights(weights(tmp_path / "whole" / "model_final.pt"), weights(tmp_path / "killed" / "model_final.pt"))
    whole_last = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    killed_last = torch.load(tmp_path / "killed" / "last.pt", weights_only=False)
    for k, state in whole_last["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], killed_last["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(whole_last["rng"]["torch"], killed_last["rng"]["torch"])
    assert str(whole_last["rng"]["numpy"]) == str(killed_last["rng"]["numpy"])
    assert whole_last["rng"]["python"] == killed_last["rng"]["python"]
    whole_log = [json.loads(l) for l in open(tmp_path / "whole" / "log.jsonl")]
    killed_log = [json.loads(l) for l in open(log)]
    assert [r["iter"] for r in killed_log] == list(range(1, 11))
    assert [r["loss"] for r in killed_log] == [r["loss"] for r in whole_log]


@pytest.mark.slow
def test_refuses_a_directory_another_run_is_writing(tiny_data, tmp_path, capsys):
    """Two runs in one --output would write the same last.pt.tmp and log.jsonl (a resume while
    the workers of a torchrun stopped with kill -9 still run: they outlive it). The second is
    refused while the first lives, and kill -9 of the first leaves no stale lock behind, even while
    its DataLoader worker (forked, so holding its open files) lingers."""
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "100000", "--ckpt-every", "1",
            "--workers", "1", "--output", str(tmp_path / "r")]
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None and not (tmp_path / "r" / "last.pt").exists():
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        # a changed --max-iter keeps this short whatever happens: refused for the lock, or for the setting
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, "--resume", "--max-iter", "1"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "in use by another run" in err and err.count("\n") == 1, err
    finally:
        first.kill()
        first.wait()
    with pytest.raises(SystemExit) as exit_info:  # past the lock now, refused for its setting
        train.main([*args, "--resume", "--max-iter", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max-iter 100000 -> 1" in err, err


@contextlib.contextmanager
def lock_held_elsewhere(folder):
    """The lock of `folder` (its .lock, as train.py and evaluate.py take it) held by another
    process while the block runs: a POSIX record lock belongs to a process, which would get it again."""
    os.makedirs(folder, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.lockf(fd, fcntl.LOCK_EX); "
                               "print('held', flush=True); time.sleep(600)", os.path.join(folder, ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_processes_refused_by_the_lock_both_stop_at_once(tiny_data, tmp_path):
    """Under torchrun rank 0 alone takes the run directory's lock: refused, it says so in one line
    and every process stops with it (the other one used to wait in the rendezvous until torchrun
    killed it, a traceback and 30 s later)."""
    out = tmp_path / "r"
    args = [os.path.join(ROOT, "train.py"), *TINY, "--data", tiny_data, "--batch-size", "2", "--output", str(out)]
    with lock_held_elsewhere(out):
        (status0, err0), (status1, err1) = run_two_processes(args, check=False, OMP_NUM_THREADS="1")
    assert (status0, status1) == (2, 2) and err1 == ""
    assert err0 == (f"error: {out} is in use by another run of train.py or evaluate.py (after kill -9 on torchrun "
                    f"its workers go on): stop it, or use another --output\n")


def test_a_missing_weights_file_is_said_before_the_data_is_read(tmp_path, capsys):
    """--weights naming no file: one line at once, before the dataset (here one that is not there
    either) is looked for."""
    args = [*TINY, "--data", str(tmp_path / "no_data"), "--output", str(tmp_path / "run")]
    args[args.index("--weights") + 1] = str(tmp_path / "r18.pth")
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: --weights {tmp_path / 'r18.pth'}: no such file (a backbone state "
                                       f"dict, or 'imagenet' or 'none')\n")


def test_one_value_per_channel_for_batchnorm_is_one_line_naming_the_way_out(tiny_data, tmp_path, capsys):
    """One 32x32 image per process leaves a from-scratch BatchNorm one value per channel at C5:
    one line naming the iteration, the images and the settings that help."""
    args = [*TINY, "--data", tiny_data, "--batch-size", "1", "--max-iter", "2", "--output", str(tmp_path / "r")]
    args[args.index("--min-size") + 1] = args[args.index("--max-size") + 1] = "32"
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: iteration 1: 1 image(s) of 32x32 px per process leave BatchNorm one value "
                                       "per channel at stride 32 (from scratch, it normalises over the batch): use a "
                                       "larger --batch-size or --min-size\n")


def test_output_that_cannot_be_written_or_locked(tiny_data, tmp_path, monkeypatch, capsys):
    """--output under a file: one line naming it. A file system without locks (NFS mounted nolock):
    a note, and the run goes on; so does a --val-split without an annotation file (a typo, or a
    dataset without one), said at the start rather than by evaluate.py after the run."""
    import errno
    import fcntl
    (tmp_path / "afile").write_text("")
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1"]
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--output", str(tmp_path / "afile" / "run")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'afile' / 'run'}: cannot write there (Not a directory)\n"
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--output", str(tmp_path / "afile")])
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'afile'} is a file, not a directory\n"

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    train.main([*args, "--val-split", "vall2017", "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'run'} cannot be locked (No locks available)" in out
    assert f"note: --val-split vall2017: there is no {tiny_data}/annotations/instances_vall2017.json" in out
    assert (tmp_path / "run" / "model_final.pt").exists()


@pytest.mark.parametrize("where, signum", [("serialising", signal.SIGINT), ("writing the file", signal.SIGINT),
                                           ("writing the file", signal.SIGTERM)])
def test_ctrl_c_during_a_checkpoint_write_waits_for_it(tiny_data, tmp_path, monkeypatch, capsys, where, signum):
    """Ctrl-C in the middle of saving last.pt (while it is serialised, or while its bytes go to the
    file): the write completes, then the run stops with one line and status 130, as anywhere else;
    last.pt is whole and no temporary file is left. SIGTERM (a scheduler's preemption) the same,
    with status 143."""
    def sigint():
        os.kill(os.getpid(), signum)
        time.sleep(0.05)

    if where == "serialising":
        real_save = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f: (sigint(), real_save(obj, f)))
    else:
        real_fsync = os.fsync

        def interrupted_fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("last.pt.tmp"):
                sigint()
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", interrupted_fsync)
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "3", "--ckpt-every", "1",
            "--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 128 + signum
    word = "interrupted" if signum == signal.SIGINT else "terminated"
    assert capsys.readouterr().err == f"{word}: resume with --resume\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as main() found it
    monkeypatch.undo()
    assert torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=False)["iteration"] == 1
    assert sorted(os.listdir(tmp_path / "r")) == [".lock", "config.json", "last.pt", "log.jsonl"]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    """The second checkpoint cannot be written (ENOSPC): one line naming it, status 1, the first
    last.pt intact, no temporary file left; --resume then finishes the run."""
    real_fsync, calls = os.fsync, {"n": 0}

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("last.pt.tmp"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    out = tmp_path / "r"
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "3", "--ckpt-every", "1",
            "--output", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err == (f"error: {out / 'last.pt'}: cannot be written (No space left on "
                                                 f"device); the previous file, if any, is unchanged\n")
    assert torch.load(out / "last.pt", weights_only=False)["iteration"] == 1
    assert sorted(os.listdir(out)) == [".lock", "config.json", "last.pt", "log.jsonl"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    for name in ("model_final.pt.tmp", "config.json.tmp"):  # as a kill -9 in the middle of a write leaves them
        (out / name).write_bytes(b"half")
    with pytest.raises(SystemExit):  # refused (a changed setting), after the leftovers were cleaned
        train.main([*args, "--resume", "--seed", "9"])
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    train.main([*args, "--resume"])
    assert torch.load(out / "model_final.pt", weights_only=False)["iteration"] == 3


def test_the_same_weights_file_by_another_path(tmp_path, monkeypatch):
    (tmp_path / "r18.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert train.same_setting("weights", "r18.pt", str(tmp_path / "r18.pt"))
    assert train.same_setting("weights", "./r18.pt", "r18.pt") and train.same_setting("weights", "none", "none")
    assert not train.same_setting("weights", "r18.pt", "imagenet") and not train.same_setting("lr", 0.01, 0.02)


def test_ctrl_c_while_writing_model_final_says_the_run_is_complete(tiny_data, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def interrupted_final(obj, f):
        if "optimizer" not in obj:  # model_final.pt
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", interrupted_final)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1",
                    "--output", str(tmp_path / "r")])
    out = capsys.readouterr()
    assert exit_info.value.code == 130 and out.err == "interrupted after the run completed\n"
    assert out.out.strip().splitlines()[-1] == f"done: {tmp_path / 'r' / 'model_final.pt'}"
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(tmp_path / "r" / "model_final.pt", weights_only=False)["iteration"] == 1


def test_ctrl_c_after_done_says_the_run_is_complete(tiny_data, tmp_path, monkeypatch, capsys):
    """A Ctrl-C between "done:" and the end of the process interrupts a finished run: not a "resume"."""
    real_train = train.train

    def interrupted_after(*args):
        real_train(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted_after)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1",
                    "--output", str(tmp_path / "r")])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted after the run completed\n"


def test_ctrl_c_before_model_final_is_written_is_a_plain_interruption(tiny_data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = RetinaNet.state_dict

    def interrupted_state_dict(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: model_final.pt (the first is last.pt)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        return real(self, *a, **k)

    monkeypatch.setattr(RetinaNet, "state_dict", interrupted_state_dict)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1",
                    "--output", str(tmp_path / "r")])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted: resume with --resume\n"
    assert not (tmp_path / "r" / "model_final.pt").exists()


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_ctrl_c_or_sigterm_while_torch_imports_writes_one_line_once_and_exits_at_once(module, monkeypatch):
    """The handler of a Ctrl-C or SIGTERM before main() (torch imports for seconds): os._exit(130 or
    143), since a SystemExit raised inside torch's imports can abort with a C++ trace or be
    swallowed; its line on stderr from the first process of a torchrun alone."""
    import importlib
    handler = importlib.import_module(module)._stopped_before_main
    written, exits = [], []
    monkeypatch.setattr(os, "write", lambda fd, data: written.append((fd, data)))
    monkeypatch.setattr(os, "_exit", exits.append)
    for signum, word in ((signal.SIGINT, b"interrupted"), (signal.SIGTERM, b"terminated")):
        for rank, expected in ((None, 1), ("0", 1), ("1", 0)):
            if rank is None:
                monkeypatch.delenv("RANK", raising=False)
            else:
                monkeypatch.setenv("RANK", rank)
            written.clear()
            handler(signum, None)
            assert exits.pop() == 128 + signum and len(written) == expected
            assert all(fd == 2 and data.startswith(word) and data.endswith(b"\n") for fd, data in written)


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tiny_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the images are checked (progress on stdout) or before the first
    last.pt: one line that says there is nothing to resume, on a line of its own; the same command
    then runs the whole run from the start."""
    import data
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "3", "--output", str(tmp_path / "r")]
    real_check, calls = data._check_piece, {"n": 0}

    def interrupted_check(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the progress line has been drawn for the first chunks
            raise KeyboardInterrupt
        return real_check(*a, **k)

    monkeypatch.setattr(data, "_check_piece", interrupted_check)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the progress line redrawn with \r, left open
    with pytest.raises(SystemExit) as e:
        train.main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 130 and err == "interrupted before the first checkpoint: nothing to resume, run the command again\n"
    assert "\rchecking images" in out and out.endswith("\n")  # the line closed before the message
    monkeypatch.undo()
    real_loss, calls = freeanchor.free_anchor_loss, {"n": 0}

    def interrupted_loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # iteration 2 of 3, before the first checkpoint (at the end)
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(freeanchor, "free_anchor_loss", interrupted_loss)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert capsys.readouterr().err == "interrupted before the first checkpoint: nothing to resume, run the command again\n"
    monkeypatch.undo()
    train.main(args)  # the same command again: not refused, and a whole run
    assert [json.loads(l)["iter"] for l in open(tmp_path / "r" / "log.jsonl")] == [1, 2, 3]
    # while the arguments are read, the output folder (here one with checkpoints) is not known yet
    monkeypatch.setattr(train, "parse_config", lambda argv: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        train.main([*args, "--resume"])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted: nothing was started\n"


@pytest.mark.slow
def test_ctrl_c_while_torch_imports_is_one_line():
    """Ctrl-C in the seconds before main() runs (imports): one line and status 130 as later on, no
    traceback. -X importtime reports each finished import on stderr: the signal lands inside torch's."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", os.path.join(ROOT, "train.py"), "--help"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "torch" in line:
            break
    proc.send_signal(signal.SIGINT)
    err = line + proc.stderr.read()
    proc.wait()
    said = [l for l in err.splitlines() if not l.startswith("import time:")]
    assert proc.returncode == 130 and len(said) == 1 and said[0].startswith("interrupted"), said


def _raise(error):
    raise error


def test_resume_refuses_another_runs_checkpoint(tiny_data, tmp_path, capsys, monkeypatch):
    """--resume refuses a last.pt of other settings, naming them as flags (also another training split
    with the same categories); settings that change only the numbers get a note. A complete run is
    left as it is, and said to be complete where its folder is read-only."""
    import shutil
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)
    shutil.copy(os.path.join(data, "annotations", "instances_train2017.json"),
                os.path.join(data, "annotations", "instances_again.json"))
    os.symlink(os.path.join(data, "train2017"), os.path.join(data, "again"))
    args = [*TINY, "--data", data, "--batch-size", "2", "--max-iter", "1", "--output", str(tmp_path / "r")]
    train.main(args)
    capsys.readouterr()
    for change, culprit in ((["--seed", "5"], "--seed 0 -> 5"), (["--backbone", "resnet34"], "--backbone resnet18 -> resnet34"),
                            (["--train-split", "again"], "--train-split train2017 -> again"),
                            (["--min-size", "48", "64"], "--min-size 64 -> 48 64")):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, "--resume", *change])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and culprit in err, err
    run = tmp_path / "r"
    before = {name: (run / name).read_bytes() for name in ("last.pt", "model_final.pt", "config.json", "log.jsonl")}
    train.main([*args, "--resume", "--channels-last"])  # a complete run is left as it is
    assert capsys.readouterr().out.endswith(f"\nthe run in {run} is complete ({run / 'model_final.pt'}): nothing to resume\n")
    assert before == {name: (run / name).read_bytes() for name in before}
    with monkeypatch.context() as m:  # the same on a read-only file system: it cannot be locked, and is complete
        real_open, real_access = os.open, os.access
        m.setattr(os, "open", lambda path, *a, **k: _raise(OSError(errno.EROFS, "Read-only file system"))
                  if str(path).endswith(".lock") else real_open(path, *a, **k))
        m.setattr(os, "access", lambda path, mode, **k: mode != os.W_OK and real_access(path, mode, **k))
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, "--resume"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == (
        f"error: --output {run}: cannot write there (Read-only file system); it holds a finished run "
        f"(model_final.pt): nothing to resume\n")
    os.remove(run / "model_final.pt")  # as if stopped between its last checkpoint and the final model
    ann_file = os.path.join(data, "annotations", "instances_train2017.json")
    with open(ann_file) as f:
        coco = json.load(f)
    coco["annotations"][0]["bbox"][0] += 1  # the annotations changed under the same path
    with open(ann_file, "w") as f:
        json.dump(coco, f)
    train.main([*args, "--resume", "--channels-last"])
    out = capsys.readouterr().out
    assert "note: resuming with other settings than " in out and "(--no-channels-last -> --channels-last)" in out, out
    assert f"note: {ann_file} has changed since " in out, out
    good = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    broken = [lambda c: c.pop("rng"), lambda c: c.pop("iteration"), lambda c: c.update(iteration="1"),
              lambda c: c["rng"].pop("numpy"), lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
              lambda c: c.update(config=None), lambda c: c.update(model=None), lambda c: c.update(optimizer="x"),
              lambda c: c.update(iteration=10**6)]
    for k, break_it in enumerate([None, *broken]):
        if break_it is None:
            with open(tmp_path / "r" / "last.pt", "wb") as f:
                f.write(b"not a checkpoint")
        else:
            ckpt = copy.deepcopy(good)
            break_it(ckpt)
            torch.save(ckpt, tmp_path / "r" / "last.pt")
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, "--resume"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "last.pt" in err, (k, err)
    torch.save(good, tmp_path / "r" / "last.pt")  # damaged in its middle, where torch.load alone would not notice
    with open(tmp_path / "r" / "last.pt", "r+b") as f:
        f.seek(os.path.getsize(tmp_path / "r" / "last.pt") // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SystemExit):
        train.main([*args, "--resume"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read checkpoint {tmp_path / 'r' / 'last.pt'}: ValueError: its part ") \
        and err.endswith(" does not match its checksum: the file is damaged\n"), err
    torch.save(good["model"], tmp_path / "r" / "last.pt")  # a plain state dict saved over it
    with pytest.raises(SystemExit):
        train.main([*args, "--resume"])
    assert capsys.readouterr().err == (f"error: cannot read checkpoint {tmp_path / 'r' / 'last.pt'}: TypeError: not a "
                                       f"last.pt of train.py (no config, categories, iteration, model, optimizer, rng)\n")


# ----------------------------------------------------------------------------- failures

def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    real = freeanchor.free_anchor_loss
    calls = {"n": 0}

    def nan_at_4th(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        if calls["n"] == 4:
            out["positive"] = out["positive"] * float("nan")
        return out

    monkeypatch.setattr(freeanchor, "free_anchor_loss", nan_at_4th)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "6", "--ckpt-every", "2",
                    "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    # the 4th iteration, as the log would call it (its "iter 4" line)
    assert len(err.splitlines()) == 1 and "non-finite loss at iteration 4:" in err and "positive nan" in err
    assert "last.pt" in err
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["iteration"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_a_schedule_that_cannot_be_meant_gets_a_note(monkeypatch, capsys):
    """A warmup that outlasts the first lr step or the run (the default 500 iterations with a short
    --max-iter) and --steps at or past --max-iter are allowed, with a note: the lr would never be
    the one asked for, or a step never come. The default steps, scaled with --max-iter, get none."""
    monkeypatch.delenv("RANK", raising=False)
    for args, note in (
            (["--max-iter", "1000", "--warmup-iters", "100"], ""),
            (["--max-iter", "300"], "note: --warmup-iters 500 outlasts the first lr step (--steps 200): the lr never "
                                    "reaches --lr 0.01\n"),
            (["--max-iter", "30", "--warmup-iters", "30", "--steps", "30", "45"],
             "note: --steps 30 45 at or past --max-iter 30: those lr steps never come\n"
             "note: --warmup-iters 30 outlasts the run (--max-iter 30): the lr never reaches --lr 0.01\n"),
            (["--max-iter", "30", "--warmup-iters", "0", "--steps", "20", "30"],
             "note: --steps 30 at or past --max-iter 30: that lr step never comes\n"),
            (["--max-iter", "3", "--warmup-iters", "0"], "")):  # default steps 2 and 3: no note
        train.parse_config([*args, "--device", "cpu"])
        assert capsys.readouterr().out == note, args


@pytest.mark.slow
def test_a_bad_argument_gives_one_line_from_the_command_line(tiny_data, tmp_path):
    res = run_cli([*TINY, "--data", tiny_data, "--output", str(tmp_path / "x"), "--data", "/nonexistent/data"])
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "data root not found: /nonexistent/data" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/data"], "data root not found: /nonexistent/data"),
    (["--backbone", "resnet7"], "--backbone resnet7"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--loss", "focal"], "--loss focal"),
    (["--alpha", "1.5"], "--alpha 1.5: must be in [0, 1]"),
    (["--iou-threshold", "1"], "--iou-threshold 1.0: must be in [0, 1)"),
    (["--momentum", "-0.1"], "--momentum -0.1"),
    (["--lr", "nan"], "--lr nan"),
    (["--gamma", "inf"], "--gamma inf"),
    (["--workers", "-1"], "--workers -1"),
    (["--steps", "50", "20"], "--steps 50 20: must increase"),
    (["--steps", "-3", "1"], "--steps -3 1: iterations must be positive"),
    (["--min-size", "64", "96"], "--min-size 64 96: above --max-size 64, the cap on the longer side"),
    (["--device", "cuda:x"], "--device cuda:x: use cpu, cuda or cuda:N"),
    (["--seed", "-1"], "--seed -1: must be in [0, 2^32)"),
])
def test_bad_arguments_give_one_line(args, message, tiny_data, tmp_path, capsys):
    """train.main, as the command line runs it (the test above runs one case as a real command)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", tiny_data, "--output", str(tmp_path / "x"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert message in err and not (tmp_path / "x").exists()


def test_edge_values_of_the_checked_flags_are_accepted():
    cfg, loss_cfg = train.parse_config(["--alpha", "1", "--iou-threshold", "0", "--momentum", "0", "--clip-grad", "0",
                                        "--smooth-l1-beta", "0", "--device", "cpu"])
    assert loss_cfg.alpha == 1 and loss_cfg.iou_threshold == 0 and cfg.momentum == 0


def test_refuses_to_overwrite_a_run(tiny_data, tmp_path, capsys, monkeypatch):
    """Also a finished run whose last.pt was deleted (to save space): model_final.pt, config.json and
    log.jsonl stay as they are, with or without --resume. Refused before the dataset is read."""
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1", "--output", str(tmp_path / "r")]
    train.main(args)

    def no_reading(*a, **k):
        raise AssertionError("the dataset was read before the refusal")

    monkeypatch.setattr(train, "CocoDataset", no_reading)
    for removed, extra, message in ((None, [], "already holds a run (last.pt)"),
                                    ("last.pt", [], "holds a finished run (model_final.pt) without its last.pt"),
                                    ("last.pt", ["--resume"], "holds a finished run (model_final.pt) without its last.pt")):
        if removed and (tmp_path / "r" / removed).exists():
            os.remove(tmp_path / "r" / removed)
        before = {name: (tmp_path / "r" / name).read_bytes() for name in os.listdir(tmp_path / "r") if name != ".lock"}
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, "--seed", "7", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, err
        assert before == {name: (tmp_path / "r" / name).read_bytes() for name in os.listdir(tmp_path / "r") if name != ".lock"}


# ----------------------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli_end_to_end_on_tiny_shapes(tmp_path):
    """train.py from the command line; its folders named in bytes that are not UTF-8 (Linux allows
    any), with stdout in strict UTF-8, as in an en_US.UTF-8 locale: the paths it prints come out as
    their own bytes, not as an encoding error."""
    tmp_path = tmp_path / os.fsdecode(b"caf\xe9")  # 'caf\udce9' in Python
    root = prepare_shapes(str(tmp_path / "shapes"), num_train=12, num_val=4)
    res = run_cli(["--data", root, "--backbone", "resnet18", "--weights", "none", "--batch-size", "2",
                   "--max-iter", "4", "--min-size", "96", "112", "--max-size", "128", "--log-every", "2",
                   "--workers", "1", "--loss", "retinanet", "--output", str(tmp_path / "run")],
                  env={**os.environ, "PYTHONIOENCODING": "utf-8"}, errors="surrogateescape")
    assert res.returncode == 0, res.stderr
    assert f"output {tmp_path / 'run'}\n" in res.stdout
    lines = [l for l in res.stdout.splitlines() if l.startswith("iter ")]
    assert len(lines) == 2 and "4/4" in lines[-1] and "eta" in lines[-1] and "img/s" in lines[-1]
    records = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert [r["iter"] for r in records] == [2, 4]
    assert {"classification", "regression", "lr", "s_per_iter", "images_per_s", "eta_s", "peak_mem_mb"} <= records[0].keys()
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=False)
    assert [c["name"] for c in final["categories"]] == ["square", "disk", "triangle", "bar", "needle"]
    assert final["config"]["loss"] == "retinanet" and final["model_config"]["backbone"] == "resnet18"
    model = RetinaNet(**{**final["model_config"], "weights": "none"})
    model.load_state_dict(final["model"])


def test_every_loss_setting_is_a_flag_with_its_default_shown():
    """Each FreeAnchorConfig field: --help shows the flag with the dataclass default, and the flag
    sets the field that reaches the loss (a changed value, not the default coming back)."""
    help_text = " ".join(train.build_parser().format_help().split())
    argv, expected = [], {}
    for f in dataclasses.fields(freeanchor.FreeAnchorConfig):
        flag = "--" + f.name.replace("_", "-")
        entry = help_text.split(f"{flag} {f.name.upper()} ", 1)[1].split(" --", 1)[0]  # this flag's help
        assert f"(default: {f.default})" in entry, (flag, entry)
        expected[f.name] = f.default + 1 if isinstance(f.default, int) else f.default / 2
        argv += [flag, str(expected[f.name])]
    _, loss_cfg = train.parse_config(argv)
    assert dataclasses.asdict(loss_cfg) == pytest.approx(expected)
    _, default_cfg = train.parse_config([])
    assert default_cfg == freeanchor.FreeAnchorConfig()


def test_imagenet_weights_offline_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    import urllib.error
    import torchvision

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--weights", "imagenet", "--data", tiny_data, "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "--weights PATH" in err and "--weights none" in err


# ----------------------------------------------------------------------------- recipe, speed and the sync-free step

def test_optimizer_groups_in_last_pt(tiny_data, tmp_path):
    """The authors' groups: biases at 2x the lr without weight decay, everything else at the lr
    with --weight-decay; saved in last.pt with the rates of the last iteration."""
    train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1", "--lr", "0.03",
                "--warmup-iters", "0", "--weight-decay", "0.0005", "--output", str(tmp_path / "r")])
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    weights_group, bias_group = ckpt["optimizer"]["param_groups"]
    assert weights_group["lr"] == pytest.approx(0.03) and weights_group["weight_decay"] == pytest.approx(0.0005)
    assert bias_group["lr"] == pytest.approx(0.06) and bias_group["weight_decay"] == 0
    assert weights_group["momentum"] == bias_group["momentum"] == pytest.approx(0.9)
    model = RetinaNet(2, backbone="resnet18", weights="none", min_size=64, max_size=64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    biases = [n for n in names if n.endswith("bias")]
    assert len(bias_group["params"]) == len(biases) > 0
    assert len(weights_group["params"]) == len(names) - len(biases)


def test_each_loss_starts_from_its_own_class_prior(tiny_data, tmp_path, monkeypatch):
    """FreeAnchor's configs start the classifier at probability 0.02, RetinaNet (and the authors'
    baseline config) at 0.01."""
    priors = {}
    real = train.RetinaNet

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        priors[loss] = torch.sigmoid(model.cls_head[-1].bias.detach())  # [9 K]
        return model

    monkeypatch.setattr(train, "RetinaNet", recording)
    for loss in ("freeanchor", "retinanet"):
        train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1", "--loss", loss,
                    "--output", str(tmp_path / loss)])
    for loss, prior in (("freeanchor", 0.02), ("retinanet", 0.01)):
        torch.testing.assert_close(priors[loss], torch.full_like(priors[loss], prior))


def test_resume_refuses_changed_momentum_weight_decay_or_freeanchor_settings(tiny_data, tmp_path, capsys):
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "1", "--output", str(tmp_path / "r")]
    train.main(args)
    capsys.readouterr()
    for change, culprit in ((["--momentum", "0.8"], "--momentum 0.9 -> 0.8"),
                            (["--weight-decay", "0.001"], "--weight-decay 0.0001 -> 0.001"),
                            (["--bag-size", "30"], "--bag-size 50 -> 30"),
                            (["--iou-threshold", "0.5"], "--iou-threshold 0.6 -> 0.5")):
        with pytest.raises(SystemExit) as exit_info:
            train.main([*args, "--resume", *change])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and culprit in err, err


def test_step_unless_leaves_weights_and_momentum_untouched():
    """The device-side skip: a flagged step changes neither the parameters nor the momentum
    buffers, even with non-finite gradients and weight decay, also as the very first step; an
    unflagged step is plain SGD."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    reference.load_state_dict(net.state_dict())
    cfg = train.TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    optimizer = train.make_optimizer(net, cfg)
    plain = torch.optim.SGD(train.param_groups(reference, 0.01), lr=0.1, momentum=0.9)
    for group in plain.param_groups:
        group["lr"] = 0.1 * group["lr_factor"]
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * group["lr_factor"]
    x = torch.randn(5, 3, 8, 8)

    def grads(model, poison):
        model.zero_grad()
        (model(x).square().sum() * (float("nan") if poison else 1.0)).backward()

    def snapshot():
        return ([p.detach().clone() for p in net.parameters()],
                [optimizer.state[p]["momentum_buffer"].clone() for p in net.parameters()])

    before = snapshot()
    grads(net, poison=True)
    train.step_unless(optimizer, torch.ones(()))  # a skipped first step
    for a, b in zip(before, snapshot()):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    for poison in (False, False):  # then plain SGD, as if the skipped step never happened
        grads(net, poison)
        grads(reference, poison)
        train.step_unless(optimizer, torch.zeros(()))
        plain.step()
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = snapshot()
    for poison in (True, False):  # flagged steps, with non-finite and with finite gradients
        grads(net, poison)
        train.step_unless(optimizer, torch.ones(()))
        for a, b in zip(before, snapshot()):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_resumed_momentum_follows_its_weights_memory_layout():
    """--resume may change --channels-last (a CPU run resumed on a GPU, where it is the default):
    the momentum saved in one layout steps its weights in the other exactly as it would have in
    its own. (optimizer.load_state_dict alone keeps the saved strides; the fused step pairs weights
    and momentum by memory position, and gave an element of a weight the momentum of another.)"""
    cfg = train.TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    shapes = {}

    def net_and_optimizer(memory_format):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)).to(memory_format=memory_format)
        shapes.update({name: p.shape for name, p in net.named_parameters()})
        return net, train.make_optimizer(net, cfg)

    def step(net, optimizer, grads):
        for p, g in zip(net.parameters(), grads):
            p.grad = torch.empty_like(p).copy_(g)  # in the weight's layout, as autograd gives it
        optimizer.step()

    net, optimizer = net_and_optimizer(torch.contiguous_format)
    step(net, optimizer, [torch.randn(s, generator=gen) for s in shapes.values()])
    saved_weights, saved_state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    grads = [torch.randn(s, generator=gen) for s in shapes.values()]
    after = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        net, optimizer = net_and_optimizer(memory_format)
        net.load_state_dict(saved_weights)
        train.load_optimizer_state(optimizer, saved_state)
        step(net, optimizer, grads)
        after.append([p.detach().contiguous() for p in net.parameters()])
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*after):
        assert torch.equal(a, b)  # the same elementwise update of the same numbers


def test_non_finite_loss_found_at_the_next_log_names_its_iteration(tiny_data, tmp_path, monkeypatch, capsys):
    """No host read per step: a NaN at the 6th iteration is seen at the log after 8 iterations,
    yet the weights after iterations 6, 7 and 8 are those after iteration 5, the error names
    iteration 6, as the log counts, and last.pt is the checkpoint written after 4 iterations."""
    real_loss, real_step = freeanchor.free_anchor_loss, train.step_unless
    calls, after_step = {"n": 0}, []

    def nan_at_6th(*a, **k):
        calls["n"] += 1
        out = real_loss(*a, **k)
        if calls["n"] == 6:
            out["negative"] = out["negative"] * float("inf") * 0  # nan
        return out

    def recording_step(optimizer, skip):
        real_step(optimizer, skip)
        after_step.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])

    monkeypatch.setattr(freeanchor, "free_anchor_loss", nan_at_6th)
    monkeypatch.setattr(train, "step_unless", recording_step)
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "12", "--ckpt-every", "4",
                    "--log-every", "8", "--lr", "0.02", "--output", str(tmp_path / "run")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite loss at iteration 6:" in err and "negative nan" in err, err
    assert len(after_step) == 8  # the run went on to the log of iteration 8 without reading the flag
    assert any(not torch.equal(a, b) for a, b in zip(after_step[3], after_step[4]))  # good steps do move
    for later in after_step[5:]:
        assert all(torch.equal(a, b) for a, b in zip(after_step[4], later))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert ckpt["iteration"] == 4
    model = RetinaNet(2, backbone="resnet18", weights="none", min_size=64, max_size=64)
    model.load_state_dict(ckpt["model"])
    flat = [p for g in train.param_groups(model, 1e-4) for p in g["params"]]  # the optimizer's order
    assert len(flat) == len(after_step[3])
    for p, q in zip(flat, after_step[3]):
        assert torch.equal(p.detach(), q)
    assert not (tmp_path / "run" / "model_final.pt").exists()


@pytest.mark.parametrize("loss", ["freeanchor", "retinanet"])
def test_steps_read_nothing_from_the_device(tiny_data, tmp_path, loss):
    """A training step reads no value back from the device (on a GPU each read waits for it):
    reads happen where the run logs or checkpoints, so 2 and 5 steps with one log at the end make
    the same reads, and no op has an output size that depends on the data."""
    watched = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.item", "aten.masked_select"}
    reads = {}
    for steps in (2, 5):
        with OpCounter() as counter:
            train.main([*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", str(steps),
                        "--log-every", "100", "--ckpt-every", "100", "--loss", loss,
                        "--output", str(tmp_path / f"run{steps}")])
        reads[steps] = sum(counter.counts[name] for name in watched)
    assert reads[2] == reads[5], reads


def assert_close_runs(out_a, out_b):
    """Two runs of different computations (eager and compiled): the same losses in log.jsonl and
    the same final weights, to float32 tolerances."""
    log_a = [json.loads(l) for l in open(out_a / "log.jsonl")]
    log_b = [json.loads(l) for l in open(out_b / "log.jsonl")]
    assert [r["iter"] for r in log_a] == [r["iter"] for r in log_b]
    for a, b in zip(log_a, log_b):
        assert b["positive"] == pytest.approx(a["positive"], rel=1e-4, abs=1e-6)
        assert b["negative"] == pytest.approx(a["negative"], rel=1e-4, abs=1e-6)
    a, b = weights(out_a / "model_final.pt"), weights(out_b / "model_final.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_compiled_training_equals_eager(tiny_data, tmp_path, monkeypatch):
    """--compile --no-fixed-shapes (network and loss compiled for any size) against eager on CPU,
    through several padded sizes (multi-scale):
    the same losses and weights up to float32 rounding, and one compilation each for the network and
    the loss, whatever the size (sizes from 129 pixels up: below, P7 is 1 x 1, a size that
    torch.compile specialises on and that no real image has). torch.compile runs with the aot_eager
    backend here, which traces and partitions exactly as inductor does but skips its code
    generation (minutes on a 2-core CPU); the GPU benchmark exercises inductor."""
    import functools
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "4", "--min-size", "160", "192",
            "--max-size", "192", "--warmup-iters", "0", "--lr", "0.01"]
    train.main([*args, "--output", str(tmp_path / "eager")])
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    shapes = set()
    real_to_device = train.to_device

    def recording_to_device(*args, **kwargs):  # outside the compiled network, which it must not change
        images, gt_boxes, gt_labels = real_to_device(*args, **kwargs)
        shapes.add(tuple(images.shape[-2:]))
        return images, gt_boxes, gt_labels

    monkeypatch.setattr(train, "to_device", recording_to_device)
    train.main([*args, "--compile", "--no-fixed-shapes", "--output", str(tmp_path / "compiled")])
    assert len(shapes) > 1  # padded batches of 160 and 192 pixels
    compiled = [json.loads(l) for l in open(tmp_path / "compiled" / "log.jsonl")]
    assert [c["compilations"] for c in compiled] == [2] * 4  # network and loss, once each
    assert compiled[0]["compile_s"] > 0 and not any("compile_s" in c for c in compiled[1:])  # said once
    assert_close_runs(tmp_path / "eager", tmp_path / "compiled")


@pytest.mark.slow
def test_fixed_shapes_compile_once_per_canvas_and_equal_eager(tiny_data, tmp_path, monkeypatch):
    """--fixed-shapes: every batch is padded to its scale's canvas, the network is compiled once
    per canvas (static) and the loss once per canvas's anchor count (static in A, any object count),
    and training equals the eager run with the same padding.
    The "eager" backend: torch.compile's tracing and guards, which decide the graphs and their
    recompilation, without the forward and backward tracing that aot_eager adds (the test above runs
    that, and here the shapes are static); 8 s instead of 15 on 2 CPU cores."""
    import functools
    args = [*TINY, "--data", tiny_data, "--batch-size", "2", "--max-iter", "3", "--min-size", "160", "192",
            "--max-size", "192", "--warmup-iters", "0", "--lr", "0.01", "--fixed-shapes"]
    canvases = train.canvas_shapes((160, 192), 192)
    shapes = []
    real_pad = train.pad_to_canvas

    def recording_pad(images, canvases):
        padded = real_pad(images, canvases)
        shapes.append(tuple(padded.shape[-2:]))
        return padded

    monkeypatch.setattr(train, "pad_to_canvas", recording_pad)
    train.main([*args, "--output", str(tmp_path / "eager")])
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    train.main([*args, "--compile", "--output", str(tmp_path / "compiled")])
    assert set(shapes) <= set(canvases) and len(set(shapes)) == 2, shapes  # square images: landscape canvases
    compiled = [json.loads(l) for l in open(tmp_path / "compiled" / "log.jsonl")]
    seen = [len(set(shapes[3:3 + c["iter"]])) for c in compiled]  # canvases met by the compiled run so far
    # one per canvas for the network and one per anchor count for the loss: 160x192 and 192x192 have their own
    assert [c["compilations"] for c in compiled] == [2 * n for n in seen]
    assert_close_runs(tmp_path / "eager", tmp_path / "compiled")


def test_retinanet_loss_normalises_by_the_averaged_count():
    """average_count replaces the batch's positive count in both terms (train.py: its mean over
    DDP processes)."""
    torch.manual_seed(0)
    cls_logits, box_deltas = torch.randn(2, 90, 3), torch.randn(2, 90, 4) * 0.1
    anchors = torch.tensor([[x, y, x + 16.0, y + 16.0] for x in range(0, 60, 6) for y in range(0, 54, 6)])
    gt_boxes = [torch.tensor([[4.0, 4.0, 20.0, 22.0]]), torch.tensor([[30.0, 10.0, 50.0, 28.0], [6.0, 30.0, 22.0, 44.0]])]
    gt_labels = [torch.tensor([0]), torch.tensor([2, 1])]
    plain = freeanchor.retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels)
    seen = []

    def doubled(count):
        seen.append(count)
        return count * 2

    halved = freeanchor.retinanet_loss(cls_logits, box_deltas, anchors, gt_boxes, gt_labels, average_count=doubled)
    assert len(seen) == 1 and seen[0].ndim == 0 and seen[0] >= 1
    for k in plain:
        torch.testing.assert_close(halved[k], plain[k] / 2)


@pytest.mark.slow
def test_two_process_ddp_retinanet_equals_one_process(tiny_data, tmp_path):
    """The RetinaNet baseline under DDP: its positive count is averaged over processes, so 2
    gloo processes x 1 image train like 1 process x 2 images (frozen BatchNorm: a local backbone file)."""
    a, b = train_single_and_ddp(tiny_data, tmp_path, tmp_path / "resnet18.pt", "--loss", "retinanet")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl")]
    single_log = [json.loads(l) for l in open(tmp_path / "single" / "log.jsonl")]
    for key in ("classification", "regression"):
        assert log[0][key] == pytest.approx(single_log[0][key], rel=1e-5)
