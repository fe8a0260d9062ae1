"""Checks of the CUDA paths, run where torch sees a GPU and skipped elsewhere: the loss on the GPU
against the float64 numpy oracle, its gradients against the CPU's, no host-device synchronisation
in either loss, a train.py run on the GPU resumed in another memory layout with its checkpoints on
the CPU, and evaluate.py end to end with its GPU defaults (bf16 autocast and channels_last where
the GPU has native bfloat16, pinned memory). train.py's GPU defaults run end to end in
test_train.py's test_cli_end_to_end_on_tiny_shapes, which takes the default device; the rest of
the suite pins the CPU, so a GPU machine checks the same numbers as any other. Speed is measured by
benchmarks/gpu_check.sh, never here.

    python -m pytest tests/test_cuda.py
"""

import json
import os

import pytest
import torch

import evaluate
import freeanchor
from data import gpu_has_native_bf16
from freeanchor import free_anchor_loss, retinanet_loss
from test_evaluate import CATEGORIES, OBJECTS_PER_IMAGE, make_dataset, save_tiny_ckpt
from test_freeanchor import TERMS, make_batch, oracle_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def on_cuda(batch, dtype):
    """A batch of make_batch on the GPU in `dtype`; the objects stay lists, one tensor per image."""
    cls_logits, box_deltas, anchors, gt_boxes, gt_labels = batch
    return (cls_logits.to("cuda", dtype), box_deltas.to("cuda", dtype), anchors.to("cuda", dtype),
            [b.to("cuda", dtype) for b in gt_boxes], [l.to("cuda") for l in gt_labels])


@pytest.mark.parametrize("seed", range(8))
def test_loss_on_cuda_matches_the_oracle(seed):
    """float64 to 1e-9 relative, as on the CPU; float32 to 1e-4 (an H200 measured 1.2e-6)."""
    batch = make_batch(seed, [seed % 7 + 1, (3 * seed) % 11], K=2 + seed % 5)
    want = oracle_loss(*batch)
    for dtype, rel in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        got = free_anchor_loss(*on_cuda(batch, dtype))
        for term in TERMS:
            assert float(got[term]) == pytest.approx(want[term], rel=rel, abs=1e-12), (term, dtype)


def test_gradients_on_cuda_equal_the_cpus():
    """The same loss on both devices in float64: the gradients agree to float64 rounding (the
    reductions run in another order), also with a hundred objects in one image."""
    for batch in (make_batch(3, [5, 2, 0], K=4), make_batch(7, [110, 4], A=600, size=256)):
        grads = []
        for device_batch in (batch, on_cuda(batch, torch.float64)):
            x, d = device_batch[0].clone().requires_grad_(), device_batch[1].clone().requires_grad_()
            out = free_anchor_loss(x, d, *device_batch[2:])
            grads.append([g.cpu() for g in torch.autograd.grad(out["positive"] + out["negative"], (x, d))])
        for cpu, gpu in zip(*grads):
            torch.testing.assert_close(gpu, cpu, rtol=1e-7, atol=1e-12)


def test_losses_on_cuda_never_wait_for_the_gpu():
    """Forward and backward of both losses, objects as lists on the GPU or padded as train.py passes
    them (with a 0-d tensor for ||B||), under torch.cuda.set_sync_debug_mode("error"): torch raises
    on any call that makes the host wait for the GPU (.item(), nonzero, a blocking copy)."""
    x, d, anchors, boxes, labels = on_cuda(make_batch(5, [9, 0, 3], A=3000, K=80, size=256), torch.float32)
    padded_boxes = torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)  # [B, G, 4]
    padded_labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-1)  # [B, G]
    num_objects = torch.full((), 12.0, device="cuda")
    calls = [(free_anchor_loss, boxes, labels, {}), (free_anchor_loss, padded_boxes, padded_labels, {}),
             (free_anchor_loss, padded_boxes, padded_labels, {"num_objects": num_objects}),
             (retinanet_loss, boxes, labels, {}), (retinanet_loss, padded_boxes, padded_labels, {})]
    for checked in (False, True):  # once to warm up (CUDA's lazy initialisation synchronises), once checked
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else 0)
        try:
            for loss_fn, gt_boxes, gt_labels, kwargs in calls:
                xc, dc = x.clone().requires_grad_(), d.clone().requires_grad_()
                sum(loss_fn(xc, dc, anchors, gt_boxes, gt_labels, **kwargs).values()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_a_cuda_run_saves_cpu_checkpoints_and_resumes_in_another_layout(tmp_path, monkeypatch, capsys):
    """train.py on the default device, the GPU here, stopped after its checkpoint at iteration 2:
    last.pt loads with a plain torch.load, every tensor on the CPU (on a machine without a GPU
    too), and the run resumes with --no-channels-last, another memory layout than the GPU's
    default where that is channels_last: the momentum follows its weights' layout (the fused SGD
    step refuses other strides on CUDA), and the run completes."""
    import train
    from test_train import make_dataset
    data = make_dataset(str(tmp_path / "data"))
    args = ["--data", data, "--backbone", "resnet18", "--weights", "none", "--min-size", "64", "--max-size", "64",
            "--workers", "0", "--batch-size", "2", "--max-iter", "4", "--ckpt-every", "2", "--log-every", "1",
            "--output", str(tmp_path / "run")]
    real, calls = freeanchor.free_anchor_loss, {"n": 0}

    def stop_at_3rd(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a Ctrl-C during iteration 3
        return real(*a, **k)

    monkeypatch.setattr(freeanchor, "free_anchor_loss", stop_at_3rd)
    with pytest.raises(SystemExit):
        train.main(args)
    monkeypatch.setattr(freeanchor, "free_anchor_loss", real)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    tensors = [*last["model"].values(), *(t for s in last["optimizer"]["state"].values() for t in s.values()
                                          if torch.is_tensor(t))]
    assert last["iteration"] == 2 and tensors and all(t.device.type == "cpu" for t in tensors)
    train.main([*args, "--resume", "--no-channels-last"])
    capsys.readouterr()
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert [r["iter"] for r in log] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    final = torch.load(tmp_path / "run" / "model_final.pt", weights_only=False)
    assert all(t.device.type == "cpu" for t in final["model"].values())


def test_evaluate_on_cuda_with_its_defaults(tmp_path, capsys):
    """evaluate.py on the default device, the GPU here, with a DataLoader worker (pinned memory) and
    batches of 2: it completes, records the GPU's defaults, and its results name the dataset's own
    category ids (no comparison of AP with the CPU's: bf16, TF32 and another reduction order move
    the scores, and an AP of 6 images can change with them)."""
    ckpt = save_tiny_ckpt(make_dataset(str(tmp_path / "data")), str(tmp_path / "model_final.pt"))
    out = str(tmp_path / "eval")
    metrics = evaluate.main(["--ckpt", ckpt, "--workers", "1", "--batch-size", "2", "--nms-recall", "--output", out])
    capsys.readouterr()
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved["amp"] == saved["channels_last"] == gpu_has_native_bf16(None)
    assert saved["coco"] == pytest.approx(metrics["coco"]) and saved["nms_recall"]["objects"] == sum(OBJECTS_PER_IMAGE)
    with open(os.path.join(out, "detections.json")) as f:
        detections = json.load(f)
    assert detections and {d["category_id"] for d in detections} <= {c["id"] for c in CATEGORIES}
