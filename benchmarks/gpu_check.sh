#!/usr/bin/env bash
# The checks that need a GPU (PARTS runs a subset, in this order):
#   1. the loss on CUDA against the float64 numpy oracle: values (float64 and float32) and gradients
#      (against finite differences of the oracle); and no host-device synchronisation in a loss call;
#   2. a training step of R-50 at 800x1333, B = 16 (benchmarks/train_step.py): the network alone and
#      with the FreeAnchor loss, eager (channels_last, the default on H100/H200);
#   3. evaluation's speed: detect in batches of 8, bf16, channels_last (benchmarks/inference.py),
#      then evaluate.py itself end to end, reading JPEG pictures, against detect alone
#      (benchmarks/evaluation.py: about 2 minutes), and COCOeval on the machine's CPUs
#      (benchmarks/cocoeval.py at 1000 images: about 20 s on 2 cores);
#   4. synchronisations of train.py's steady-state step, eager and --compile (padded to fixed shapes,
#      its default; with the number of graphs compiled over varying image sizes), and of detect
#      (benchmarks/syncs.py; its --dynamic adds --compile --no-fixed-shapes, which had not finished
#      compiling within 2.5 minutes on an H200);
#   5. the loss's speed at COCO scale (A = 201,600, K = 80): eager and compiled vs the per-image loop
#      (the benchmark also checks that compiled equals eager to float32 rounding) with a profile at
#      (B, G) = (2, 8) and (16, 8); then three pieces alone against their alternatives (the bag's
#      top-n: one top-n over all anchors or bag_indices' two stages; P{a_j in A+}: the loss's
#      class-major scatter-max, one into [B, A, K], a one-hot max; the negative term: P{a_j in A+}
#      read transposed (also in one flat sum), in [B, A, K], or a pass over the logits plus the rows
#      of the classes present, compiled for one shape or for any, with inductor's analysis of
#      tilings on or off);
#   6. the training step of part 2 compiled as train.py --compile compiles it by default, the network
#      for its one padded shape, static, the loss for its anchor count (the goal: >= 240 images/s):
#      the network alone, then with the loss, each with a profile of one step;
#   7. the step with the network compiled for any image size, as train.py --compile --no-fixed-shapes
#      marks it dynamic (on an H200: 4 minutes of compilation and a slower step than part 6's, which
#      is why fixed shapes are --compile's default), in a run of its own;
#   8. the compiled loss as CUDA graphs (torch.compile's "reduce-overhead") at B = 2, G = 8, where the
#      host's launches bound the compiled loss, against eager and compiled, alone (as a row of part 5
#      it ended the process with a segmentation fault on an H200, 2026-11-28);
#   9. part 6's step with every compiled graph replayed as CUDA graphs, the network only and with the
#      loss (train_step.py --modes compiled_static_graphs; not a train.py option).
# Everything printed is also appended to DIR/gpu_check.txt (default: $OUT if set, else runs/gpu_check), line by line,
# so a run stopped early keeps what it had. The whole run keeps to BUDGET seconds (default 290, under
# 5 minutes): every command's timeout is cut to the time left, and a part that has less than its
# minimum left is skipped with a line saying so. Parts run in the order PARTS gives, most wanted
# first (default "1 2 3 5 6 4 7 8 9": correctness, the eager step's speed, evaluation's, the loss's,
# then the compiled steps and the counts, which do not fit the same 5 minutes); run the skipped ones
# in further runs. On an H200 (2026-11-26) parts 1, 2, 3 and 5 took 235 s together, part 6 about
# 140 s, and part 7's compilation over 142 s: three runs, "1 2 3 5", "6 4" and "7". On 2026-11-27
# part 1 took 21 s, part 5 about 100 s without its pieces, part 6 120 s, and part 4 did not finish
# its last row (--compile, any size) in 235 s; tests/test_cuda.py took 49 s. On 2026-11-28 part 1
# took 20 s, part 5's table with one profile 107 s, part 6 117 s, and part 7 alone about 300 s.
# Later that day "6 5" in BUDGET=300 ran part 6 (then with a third row) in about 150 s and cut
# part 5 before its last size; "3 2 1" took 176 s (part 3 about 120 s). Part 5's table at the four
# sizes with two profiles, without the loop, took 87 s. On the evening of 2026-11-28 "6 5" took
# 283 s (part 5's table ended in a segmentation fault in its CUDA graphs row, now part 8), "1 6 5"
# 233 s, and "1 6 3" 174 s, where part 3's end-to-end run did not fit BUDGET=258.
#
#     bash benchmarks/gpu_check.sh [DIR]
#     PARTS="6 4" BUDGET=290 bash benchmarks/gpu_check.sh      # only some of the parts, in this order
#     DEVICE=cpu PARTS=1 bash benchmarks/gpu_check.sh           # a dry run of part 1 on the CPU (~20 s)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
log="$out/gpu_check.txt"
echo "==== $(date -u '+%Y-%m-%d %H:%M UTC'), PARTS=\"${PARTS:-1 2 3 5 6 4 7 8 9}\", BUDGET=${BUDGET:-290}" >> "$log"  # appended: pieces run one by one add up
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
parts=${PARTS:-1 2 3 5 6 4 7 8 9}
budget=${BUDGET:-290}
step() { echo "== $1" | tee -a "$log"; }
left() { echo $(( budget - SECONDS )); }
cap() { local l; l=$(left); l=$(( l < $1 ? l : $1 )); echo $(( l < 1 ? 1 : l )); }  # a timeout: at most $1 s and what is left, at least 1 (timeout 0 would mean none)
enough() {  # enough time left for a part that needs at least $1 s
    (( $(left) >= $1 )) && return 0
    echo "== part $2 skipped: $(left) s left of BUDGET=$budget, it needs $1 s or more (run it in another call)" | tee -a "$log"
    return 1
}

step "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee -a "$log"

part1() {
enough 30 1 || return 0
step "1. the loss on CUDA against the float64 numpy oracle"
timeout "$(cap 120)" $py - <<'PY' 2>&1 | tee -a "$log"
import os
import sys
import numpy as np
import torch
sys.path[:0] = [".", "tests"]
import test_freeanchor as T
from freeanchor import free_anchor_loss
from reference import freeanchor_np as oracle

DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu bash benchmarks/gpu_check.sh: a dry run of part 1

def to(batch, device, dtype):
    x, d, a, boxes, labels = batch
    return (x.to(device, dtype), d.to(device, dtype), a.to(device, dtype),
            [b.to(device, dtype) for b in boxes], [l.to(device) for l in labels])

cases = {"random %d" % s: T.make_batch(s, [s % 7 + 1, (3 * s) % 11], K=2 + s % 5) for s in range(8)}
cases["hundred objects"] = T.make_batch(7, [110, 4], A=600, size=256)
cases["large logits"] = T.make_batch(7, [4, 2], logit_scale=12.0)
cases["no objects"] = T.make_batch(7, [0, 0])
worst = {}
for name, batch in cases.items():
    ref = T.oracle_loss(*batch)
    for dtype, tol in ((torch.float64, 1e-6 if name == "large logits" else 1e-9), (torch.float32, 1e-4)):
        out = free_anchor_loss(*to(batch, DEVICE, dtype))
        rel = max(abs(float(out[k]) - ref[k]) / max(abs(ref[k]), 1e-12) for k in ref)
        worst[dtype] = max(worst.get(dtype, 0), rel)
        assert rel <= tol, (name, dtype, rel)
print(f"values: {len(cases)} batches, worst relative error float64 {worst[torch.float64]:.1e}, "
      f"float32 {worst[torch.float32]:.1e}")

x, d, a, boxes, labels = T.make_batch(23, [2, 1], A=30, K=3, size=64)
xc, dc, ac, bc, lc = to((x, d, a, boxes, labels), DEVICE, torch.float64)
xc, dc = xc.clone().requires_grad_(), dc.clone().requires_grad_()
out = free_anchor_loss(xc, dc, ac, bc, lc)
gx, = torch.autograd.grad(out["positive"] + out["negative"], xc, retain_graph=True)
gd, = torch.autograd.grad(out["positive"], dc)
bn, ln = [b.numpy() for b in boxes], [l.numpy() for l in labels]
fx = T.finite_difference(lambda v: sum(oracle.free_anchor_loss(v, d.numpy(), a.numpy(), bn, ln).values()), x.numpy().copy())
fd = T.finite_difference(lambda v: oracle.free_anchor_loss(x.numpy(), v, a.numpy(), bn, ln)["positive"], d.numpy().copy())
np.testing.assert_allclose(gx.cpu().numpy(), fx, rtol=1e-5, atol=1e-9)
np.testing.assert_allclose(gd.cpu().numpy(), fd, rtol=1e-5, atol=1e-9)
print(f"gradients: logits and deltas match finite differences of the oracle "
      f"(max abs diff {np.abs(gx.cpu().numpy() - fx).max():.1e}, {np.abs(gd.cpu().numpy() - fd).max():.1e})")

if DEVICE == "cuda":  # no host-device synchronisation: torch raises on any synchronising call
    from freeanchor import retinanet_loss
    x, d, a, boxes, labels = to(T.make_batch(5, [9, 0, 3], A=3000, K=80, size=256), DEVICE, torch.float32)
    padded_boxes = torch.nn.utils.rnn.pad_sequence(boxes, batch_first=True)  # [B, G, 4]
    padded_labels = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-1)  # [B, G]
    calls = [(free_anchor_loss, boxes, labels), (free_anchor_loss, padded_boxes, padded_labels),
             (retinanet_loss, boxes, labels), (retinanet_loss, padded_boxes, padded_labels)]
    for check in (False, True):  # once to warm up (lazy CUDA initialisation), once checked
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            for loss_fn, gb, gl in calls:
                xc, dc = x.clone().requires_grad_(), d.clone().requires_grad_()
                sum(loss_fn(xc, dc, a, gb, gl).values()).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    print("no host-device synchronisation in either loss, forward + backward, lists or padded "
          "(torch.cuda.set_sync_debug_mode('error'))")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || echo "FAILED: the oracle check" | tee -a "$log"
}

part2() {
enough 60 2 || return 0
step "2. a training step, R-50 at 800x1333, B = 16, bf16, eager"
# the rows that answer the project's eager speed goals (>= 110 images/s; part 6 the compiled ones); the
# full table at B = 2, 8, 16 with every method takes longer: benchmarks/train_step.py --device cuda
$py benchmarks/train_step.py --device cuda --batch 16 --size 800 1333 --methods model_only free_anchor_loss \
    --modes channels_last --row-timeout "$(( ($(cap 120) + 1) / 2 ))" 2>&1 | tee -a "$log"
}

part3() {
enough 40 3 || return 0
step "3. evaluate.py's detect, R-50 at 800x1333, batches of 8, bf16, channels_last"
timeout "$(cap 120)" $py benchmarks/inference.py --device cuda --amp --channels-last --batch 8 --images 96 2>&1 | tee -a "$log"
enough 90 "3 (evaluate.py end to end)" || return 0
step "3. evaluate.py end to end on 960 JPEG pictures of 1333x800, against detect alone"
timeout "$(cap 240)" $py benchmarks/evaluation.py --device cuda --images 960 --root /tmp/evaluation_benchmark \
    --timeout "$(( $(cap 240) / 3 ))" 2>&1 | tee -a "$log"
enough 30 "3 (COCOeval)" || return 0
step "3. COCOeval of 100,000 detections: pycocotools in one process, evaluate.py's in every CPU's"
timeout "$(cap 60)" $py benchmarks/cocoeval.py --images 1000 2>&1 | tee -a "$log"
}

part4() {
enough 90 4 || return 0
step "4. host-device synchronisations: train.py's step (eager and --compile), detect"
timeout "$(cap 420)" $py benchmarks/syncs.py --device "${DEVICE:-cuda}" --compile --steps 8 2>&1 | grep --line-buffered -v "^iter \|training images, \|^done:\|checking images\|^note: " | tee -a "$log"
}

part5() {
enough 60 5 || return 0
step "5. the loss at COCO scale (forward + backward, median of 7)"
timeout "$(cap 270)" $py benchmarks/loss.py --device cuda --compile --repeats 7 --batch 2 16 --objects 8 100 \
    --methods free_anchor_loss "per-image loop" --profile 2 8 --profile 16 8 2>&1 | tee -a "$log"
enough 40 "5 (pieces)" || return 0
step "5. the loss at COCO scale: the bag's top-n, P{a_j in A+} and the negative term alone, with alternatives"
timeout "$(cap 270)" $py benchmarks/loss.py --device cuda --parts 16 8 52 2>&1 | tee -a "$log"  # 52: a block of G = 100 at B = 16
}

part6() {
enough 120 6 || return 0  # a compiled R-50 row needs about a minute
step "6. the training step of part 2 compiled for its one padded shape (train.py --compile)"
# the second row finds the network's kernels in inductor's on-disk cache
$py benchmarks/train_step.py --device cuda --batch 16 --size 800 1333 --methods model_only free_anchor_loss \
    --modes compiled_static --profile --row-timeout "$(( ($(cap 300) + 1) / 2 ))" 2>&1 | tee -a "$log"
}

part7() {
enough 200 7 || return 0
step "7. the training step with the network compiled for any image size (train.py --compile --no-fixed-shapes)"
$py benchmarks/train_step.py --device cuda --batch 16 --size 800 1333 --methods free_anchor_loss \
    --modes compiled --row-timeout "$(cap 560)" 2>&1 | tee -a "$log"
}
part8() {
enough 60 8 || return 0
step "8. the compiled loss as CUDA graphs at B = 2, G = 8, against eager and compiled (with faulthandler)"
# in part 5's table on 2026-11-28 this row ended the process with a segmentation fault, so it runs
# alone, with Python's stack at a fault
timeout "$(cap 150)" $py -X faulthandler benchmarks/loss.py --device cuda --compile --cudagraphs --repeats 7 \
    --batch 2 --objects 8 --methods free_anchor_loss 2>&1 | tee -a "$log"
}
part9() {
enough 120 9 || return 0
step "9. the training step of part 6 with its compiled graphs replayed as CUDA graphs (mode=\"reduce-overhead\")"
# whether the host's launches bound the compiled step: part 6's profile shows the GPU idle about 5.5 ms a step
$py -X faulthandler benchmarks/train_step.py --device cuda --batch 16 --size 800 1333 --methods model_only free_anchor_loss \
    --modes compiled_static_graphs --row-timeout "$(( ($(cap 300) + 1) / 2 ))" 2>&1 | tee -a "$log"
}
for p in $parts; do
    case $p in [1-9]) "part$p" ;; *) echo "PARTS: no part $p (1-9)" | tee -a "$log" ;; esac
done
echo "written to $log ($SECONDS s)"
