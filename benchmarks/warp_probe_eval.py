#!/usr/bin/env python
"""The synthesised warp probe (``synth-warp``) and the fixed warp probes on zoo models: how many of
the held-out images each sends to its worst class, and the median for the other classes.

    python benchmarks/warp_probe_eval.py [--models gtsrb-smallcnn-wanet gtsrb-smallcnn-clean-s0 ...]
        [--seeds 1 2] [--n 500]

The images are the ones ``probe_eval.py`` scans (``scan_indices``: first half of the benchmarks'
test-split permutation), so nothing here touches the efficacy benchmark's evaluation half.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo  # noqa: E402
from probe_eval import scan_indices  # noqa: E402

from ibau_cli.formats import load_model  # noqa: E402
from ibau_cli.preprocess import Normalized  # noqa: E402
from ibau_cli.probes import run_probes  # noqa: E402

DEFAULT_MODELS = [
    "gtsrb-smallcnn-wanet",
    "gtsrb-smallcnn-badnets",
    "gtsrb-smallcnn-sig",
    "gtsrb-smallcnn-clean-s0",
    "gtsrb-smallcnn-clean-s1",
    "cifar10-smallcnn-clean-s0",
    "cifar10-smallvgg-clean-s0",
    "cifar10-smallvgg-badnets",
]
NAMES = ["synth-warp", "warp-k4-s0.5", "warp-k4-s1.0", "warp-k8-s1.0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=Path(__file__).resolve().parent / "zoo-models")
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | attack (target) | seed | probe | worst class | flip rate (n) | median other classes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models:
        run = args.zoo / name
        if not (run / "manifest.json").is_file():
            print(f"{name}: no manifest.json in {run}", file=sys.stderr)
            return 2
        manifest = json.loads((run / "manifest.json").read_text())
        x, y, _, _ = zoo.load_split(args.data, manifest["dataset"], "test")
        loaded = load_model(run / "model.safetensors")
        model = Normalized(loaded.module, loaded.preprocess).eval()
        for seed in args.seeds:
            pick = scan_indices(len(y), args.n, seed)
            suite = run_probes(
                model,
                zoo.to_float(x[pick]),
                torch.as_tensor(y[pick]).long(),
                loaded.num_classes,
                device=torch.device("cpu"),
                seed=seed,
                names=NAMES,
            )
            for r in suite.results:
                others = [v for k, v in enumerate(r.per_class) if k != r.worst_class]
                print(
                    f"| {name} | {manifest['attack']} ({manifest.get('target') if manifest['attack'] != 'clean' else '-'}) "
                    f"| {seed} | {r.name} | {r.worst_class} | {r.flip.value:.0%} ({r.flip.n}) "
                    f"| {statistics.median(others) if others else 0:.0%} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
