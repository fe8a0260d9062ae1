"""The CUDA kernels torch.compile writes for a loss, read without a GPU.

torch.compile's inductor turns the loss's forward and backward into a few fused Triton kernels; how
fast they run on a GPU depends much on how each kernel indexes memory. This script compiles a
loss as `train.py --compile` compiles it (G marked dynamic; A fixed for one canvas with
--static-anchors, as with --fixed-shapes, its default, or A dynamic as with --no-fixed-shapes)
at COCO scale, from bfloat16 predictions, and prints each Triton kernel inductor generates for an
NVIDIA H100 (132 SMs, compute capability 9.0): its kind, sizes and memory reads. It flags the
reads, in kernels of [B, A, K]'s size, whose address expression divides or takes a remainder by a
symbolic size: the mark of a flat reduction over the whole of [B, A, K], which reads its
operands out of order (an index computed on a line of its own is not flagged).

It needs no GPU: the graphs are captured on the CPU, then lowered again for a CUDA device whose
properties are filled in (torch.cuda's queries and Triton's driver answer as an H100 would). The
kernels' source is generated, not compiled to binaries, which needs the CUDA driver; on a machine
with a GPU nothing is filled in and they are compiled too. This leans on torch's internals (checked
with torch 2.14): what it reads, the generated code, is what a GPU would run, not its speed.

    python benchmarks/cuda_kernels.py                         # free_anchor_loss, B = 2, G = 8, A dynamic
    python benchmarks/cuda_kernels.py --static-anchors        # A fixed for one canvas, as train.py --compile
    python benchmarks/cuda_kernels.py --loss retinanet --batch 16 --objects 100
    python benchmarks/cuda_kernels.py --full                  # the whole generated source
"""

import argparse
import collections
import importlib
import logging
import math
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import freeanchor  # noqa: E402

H100 = collections.namedtuple("H100", "name major minor total_memory multi_processor_count warp_size "
                                      "max_threads_per_multi_processor max_threads_per_block regs_per_multiprocessor "
                                      "L2_cache_size shared_memory_per_block_optin gcnArchName uuid")(
    "NVIDIA H100 80GB HBM3", 9, 0, 80 << 30, 132, 32, 2048, 1024, 65536, 50 << 20, 232448, "", "0")


def answer_as_an_h100():
    """torch.cuda's queries, inductor's device interface and Triton's driver answer as one H100
    would, so that inductor generates its kernels where no GPU is present."""
    from torch._dynamo.device_interface import CudaInterface
    answers = {"is_available": True, "device_count": 1, "current_device": 0, "get_device_capability": (9, 0),
               "get_device_properties": H100, "get_device_name": H100.name, "_lazy_init": None,
               "is_initialized": True, "set_rng_state": None, "synchronize": None, "_exchange_device": 0,
               "_maybe_exchange_device": 0, "set_device": None,
               "get_rng_state": torch.zeros(16, dtype=torch.uint8)}
    for name, value in answers.items():
        setattr(torch.cuda, name, lambda *a, _v=value, **k: _v)
    for name, value in (("is_available", True), ("is_triton_capable", True), ("raise_if_triton_unavailable", None),
                        ("get_device_properties", H100), ("current_device", 0), ("device_count", 1),
                        ("exchange_device", 0), ("maybe_exchange_device", 0), ("synchronize", None),
                        ("is_bf16_supported", True)):
        setattr(CudaInterface, name, staticmethod(lambda *a, _v=value, **k: _v))
    for name, value in (("get_device_properties", H100), ("current_device", 0)):
        setattr(CudaInterface.Worker, name, staticmethod(lambda *a, _v=value, **k: _v))
    for module in ("torch.utils._triton", "torch._inductor.scheduler", "torch._inductor.utils"):
        module = importlib.import_module(module)
        if hasattr(module, "has_triton"):
            module.has_triton = lambda: True
    import triton.runtime.driver as driver_config  # the module's `driver` object, a DriverConfig
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver

    class H100Driver(CudaDriver):
        def __init__(self):  # no libcuda to load
            pass

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        @property
        def launcher_cls(self):  # loading a compiled kernel (some, such as a scatter-add's, load at once)
            raise RuntimeError("no libcuda here: the kernel's source is written, not loaded")

    driver_config._default = driver_config._active = H100Driver()


def capture_graphs(loss_fn, batch, objects, anchors_count, num_classes, static_anchors, dtype):
    """The forward and backward graphs inductor compiles for loss_fn (forward + backward on CPU
    tensors), with their example inputs and compile options: [(graph, inputs, options)]."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.compile_fx import compile_fx
    torch._inductor.config.fx_graph_cache = False  # lower every graph, not a cached one
    torch._functorch.config.enable_autograd_cache = False
    captured = []

    def keep(graph, inputs, **options):
        captured.append((graph, inputs, options))

        def run(args):  # the captured graph runs as it is, on the CPU
            out = graph(*args)
            args.clear()
            return out
        run._boxed_call = True
        return run

    B, A, K, G = batch, anchors_count, num_classes, objects
    gen = torch.Generator().manual_seed(0)
    # the network's outputs in bfloat16, as train.py's autocast gives them on an H100 (the loss
    # computes in float32)
    cls_logits = torch.randn(B, A, K, generator=gen).to(dtype).requires_grad_()
    box_deltas = (torch.randn(B, A, 4, generator=gen) * 0.1).to(dtype).requires_grad_()
    corner = torch.rand(A, 2, generator=gen) * 1000
    anchors = torch.cat([corner, corner + 32 + torch.rand(A, 2, generator=gen) * 100], 1)
    corner = torch.rand(B, G, 2, generator=gen) * 1000
    boxes = torch.cat([corner, corner + 20 + torch.rand(B, G, 2, generator=gen) * 200], 2)
    labels = torch.randint(0, K, (B, G), generator=gen)
    torch._dynamo.maybe_mark_dynamic(boxes, 1), torch._dynamo.maybe_mark_dynamic(labels, 1)  # G, as train.py
    if not static_anchors:  # A, as train.py marks it
        torch._dynamo.maybe_mark_dynamic(cls_logits, 1), torch._dynamo.maybe_mark_dynamic(box_deltas, 1)
        torch._dynamo.maybe_mark_dynamic(anchors, 0)
    # train.py passes the object count as a 0-d tensor (the RetinaNet loss counts its positives)
    extra = {"num_objects": torch.tensor(float(B * G))} if loss_fn is freeanchor.free_anchor_loss else {}
    compiled = torch.compile(loss_fn, backend=lambda gm, inputs: compile_fx(gm, inputs, inner_compile=keep))
    sum(compiled(cls_logits, box_deltas, anchors, boxes, labels, **extra).values()).backward()
    return captured


def cuda_sources(captured, gpu, tiling_analysis):
    """The source inductor generates for each captured graph on a CUDA device (`gpu`: a real one),
    with inductor's analysis of tilings off as freeanchor.compile_loss turns it off, or on."""
    import torch._inductor.config
    from torch._inductor.codecache import output_code_log
    from torch._inductor.compile_fx import compile_fx_inner
    sources = []
    options = {"triton.coalesce_tiling_analysis": tiling_analysis} if hasattr(
        torch._inductor.config.triton, "coalesce_tiling_analysis") else {}

    class Keep(logging.Handler):
        def emit(self, record):
            sources.append(record.getMessage())

    output_code_log.setLevel(logging.DEBUG)
    output_code_log.addHandler(Keep())
    output_code_log.propagate = False
    for graph, inputs, kwargs in captured:
        fake_mode = torch._guards.detect_fake_mode(inputs)
        with fake_mode:
            inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda") if torch.is_tensor(t)
                      else t for t in inputs]
        for node in graph.graph.nodes:  # tensors the graph creates: on the GPU too
            if node.kwargs.get("device") == torch.device("cpu"):
                node.kwargs = {**node.kwargs, "device": torch.device("cuda", 0)}
        graph.recompile()
        try:
            with torch._guards.tracing(torch._guards.TracingContext(fake_mode)), fake_mode, \
                    torch._inductor.config.patch(options):
                compile_fx_inner(graph, inputs, **kwargs)
        except Exception as e:  # without a GPU: loading the kernels needs the driver, the source is written
            if gpu or "libcuda" not in str(e):
                raise
    sources = [s for s in sources if "@triton.jit" in s]
    if len(sources) != len(captured):
        raise SystemExit(f"error: {len(captured)} graphs compiled but {len(sources)} sources with Triton kernels "
                         "came back: this torch writes or logs its code otherwise")
    return sources


KERNEL = re.compile(r"@triton_heuristics\.(\w+)\((.*?)\)\n@triton\.jit\ndef (\w+)\(.*?\):\n(.*?)''', device_str", re.S)
# a read whose address divides or takes a remainder by a symbolic size (ks0, ks1, ...) for every element
SYMBOLIC_DIVISION = re.compile(r"(//|%) \(?[^()]*ks\d")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=["freeanchor", "retinanet"], default="freeanchor")
    parser.add_argument("--batch", type=int, default=2, help="B")
    parser.add_argument("--objects", type=int, default=8, help="G")
    parser.add_argument("--anchors", type=int, default=201600, help="A (201,600: a padded 800x1344 image)")
    parser.add_argument("--static-anchors", action="store_true", help="A fixed, not marked dynamic")
    parser.add_argument("--float32", action="store_true",
                        help="float32 predictions (default: bfloat16, as train.py's autocast gives them on an H100)")
    parser.add_argument("--tiling-analysis", action="store_true",
                        help="inductor's analysis of tilings on (train.py, through freeanchor.compile_loss, turns it off)")
    parser.add_argument("--full", action="store_true", help="print the whole generated source")
    args = parser.parse_args()
    loss_fn = freeanchor.free_anchor_loss if args.loss == "freeanchor" else freeanchor.retinanet_loss
    captured = capture_graphs(loss_fn, args.batch, args.objects, args.anchors, 80, args.static_anchors,
                              torch.float32 if args.float32 else torch.bfloat16)
    gpu = torch.cuda.is_available()
    if not gpu:
        answer_as_an_h100()
    sources = cuda_sources(captured, gpu, args.tiling_analysis)
    device = torch.cuda.get_device_name() if gpu else f"{H100.name} (no GPU here: its properties filled in)"
    print(f"# {args.loss} loss, forward + backward, B = {args.batch}, G = {args.objects} (dynamic), "
          f"A = {args.anchors} ({'static' if args.static_anchors else 'dynamic'}), K = 80, "
          f"{'float32' if args.float32 else 'bfloat16'} predictions, tiling analysis "
          f"{'on' if args.tiling_analysis else 'off'}; "
          f"Triton kernels for {device}; torch {torch.__version__}\n")
    flagged = kernels = 0
    for n, source in enumerate(sources):
        if args.full:
            print(source)
            continue
        print(f"## graph {n + 1} of {len(sources)}" + (f" ({('forward', 'backward')[n]})" if len(sources) == 2 else ""))
        for kind, heuristics, name, body in KERNEL.findall(source):
            kernels += 1
            sizes = re.search(r"size_hints=(\{[^}]*\})", heuristics)
            sizes = sizes.group(1) if sizes else "{}"
            large = math.prod(int(v) for v in re.findall(r": (\d+)", sizes)) >= 1 << 24  # [B, A, K]-sized
            print(f"{kind} {name} {sizes}")
            for line in body.splitlines():
                line = line.strip()
                if re.match(r"(x|y|r0_)numel = ", line) or "tl.load(" in line:
                    slow = large and "tl.load(" in line and SYMBOLIC_DIVISION.search(line)
                    flagged += bool(slow)
                    print(f"    {'!! ' if slow else ''}{line}")
        print()
    if not args.full and not kernels:
        raise SystemExit("error: no Triton kernel found in the generated code: this torch writes it otherwise")
    if not args.full:
        print(f"{kernels} Triton kernels; {flagged} reads flagged (!!): in a kernel whose size hints (powers of "
              "two) reach 2^24 elements, a read whose own address expression divides or takes a remainder by a "
              "symbolic size")


if __name__ == "__main__":
    main()
