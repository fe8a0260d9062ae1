"""The paper's claims, probed at small scale on the built-in `shapes` dataset.

Trains FreeAnchor and the RetinaNet baseline with identical budgets and seeds (the same train.py
command, only --loss differs), evaluates both with --nms-recall --breakdown, and prints one table:
AP, AP50, AP75 (Table 2), NMS recall NR (Table 1; class-aware, and counted as the authors' script
counts it: a detection of any class), AP of the slender vs square classes (Fig. 5),
and AP over images grouped by object count (Fig. 6). Every number comes from the runs' own
metrics.json files, which stay under --output for inspection.

    python benchmarks/claims.py -- --amp              # 2 seeds x 2 losses, the quickstart's command (~50 min on 2 cores)
    python benchmarks/claims.py --seeds 0 --max-iter 300
    python benchmarks/claims.py --report-only         # re-print the table from finished runs

Extra arguments after `--` go to train.py unchanged (e.g. `-- --device cuda --amp`).
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSSES = ("retinanet", "freeanchor")


def run(cmd):
    """cmd in the repository's folder; a failure ends this script with its status (the command
    has said why)."""
    print("$ " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=ROOT).returncode
    if status:
        sys.exit(status)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(v):
    return "n/a" if v is None else f"{v:.1f}"


def row(metrics):
    """The table's columns from one evaluation's metrics.json."""
    coco, nr, br = metrics["coco"], metrics["nms_recall"], metrics["breakdown"]
    any_class = metrics.get("nms_recall_any_class", {}).get("NR")  # absent from older evaluations
    return [coco["AP"], coco["AP50"], coco["AP75"], nr["NR"], any_class, mean(br["slender"].values()),
            mean(br["square"].values())] + [v["AP"] for v in br["crowdedness"].values()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-iter", type=int, default=1000, help="training iterations of every run")
    ap.add_argument("--test-size", type=int, default=256, help="shorter side at evaluation (the quickstart's)")
    ap.add_argument("--output", default=os.path.join(ROOT, "runs", "claims"))
    ap.add_argument("--report-only", action="store_true", help="only print the table of finished runs")
    ap.add_argument("train_args", nargs="*", help="extra train.py arguments (after --)")
    args = ap.parse_args()
    args.output = os.path.abspath(args.output)  # the runs start in the repository's folder
    # the README quickstart's settings: resnet18 from scratch, 4 images of ~192 px per iteration
    common = ["--data", "shapes", "--backbone", "resnet18", "--weights", "none", "--batch-size", "4",
              "--lr", "0.02", "--clip-grad", "5", "--warmup-iters", "100", "--min-size", "192",
              "--max-size", "288", "--workers", "1", "--log-every", "50", "--max-iter", str(args.max_iter),
              *args.train_args]

    results = {}
    for seed in args.seeds:
        for loss in LOSSES:
            out = os.path.join(args.output, f"{loss}_seed{seed}")
            metrics_path = os.path.join(out, "eval_val2017", "metrics.json")
            if not args.report_only and not os.path.exists(metrics_path):
                if not os.path.exists(os.path.join(out, "model_final.pt")):
                    resume = ["--resume"] if os.path.exists(os.path.join(out, "last.pt")) else []
                    run([sys.executable, "train.py", *common, "--loss", loss, "--seed", str(seed), "--output", out, *resume])
                run([sys.executable, "evaluate.py", "--ckpt", os.path.join(out, "model_final.pt"), "--nms-recall",
                     "--breakdown", "--workers", "1", "--min-size", str(args.test_size)])
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    results[(loss, seed)] = json.load(f)

    if not results:
        sys.exit("no finished runs to report")
    labels = list(next(iter(results.values()))["breakdown"]["crowdedness"])
    header = ["loss", "seed", "AP", "AP50", "AP75", "NR", "NR any class", "AP slender", "AP square"] + [f"AP {l} obj" for l in labels]
    print(f"\n# shapes val2017, resnet18 from scratch, {args.max_iter} iterations x 4 images, seeds {args.seeds}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for loss in LOSSES:
        rows = {s: row(results[(loss, s)]) for s in args.seeds if (loss, s) in results}
        for s, values in rows.items():
            print(f"| {loss} | {s} | " + " | ".join(fmt(v) for v in values) + " |")
        if len(rows) > 1:
            print(f"| **{loss}** | mean | " + " | ".join(fmt(mean(col)) for col in zip(*rows.values())) + " |")


if __name__ == "__main__":
    main()
