#!/usr/bin/env python
"""How often does the all-to-all rule of the probes fire, by held-out set size?

The rule (ibau_cli.probes: a fixed pattern sends at least a quarter of the correctly classified images,
95 % lower bound, to their class's most common new label, with targets at least half as many as the
classes moved) is evaluated on every fixed pattern probe for random draws of the test split, with
two ways of counting a class's remapped images: "old" (ibau <= 0.3.4: any changed image counts) and
"new" (0.3.5: only when two images of the class agree on the new label). The forward passes are
shared, so the two columns come from the same images. docs/probes.md has the table.

    python benchmarks/all_to_all_rule.py --models gtsrb-smallcnn-all2all gtsrb-smallcnn-clean-s0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import zoo  # noqa: E402

from ibau_cli.formats import load_model  # noqa: E402
from ibau_cli.preprocess import Normalized  # noqa: E402
from ibau_cli.probes import ALL_TO_ALL_REMAP, ALL_TO_ALL_SPREAD, PROBES  # noqa: E402
from ibau_cli.probes.base import MIN_REMAP_AGREEMENT, remap_rate  # noqa: E402


def fires(pred: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor, k: int, agreement: int) -> bool:
    rate, targets, sources = remap_rate(pred, y, clean_pred, k, agreement)
    lo = (rate.wilson() or (0.0, 0.0))[0]
    return lo >= ALL_TO_ALL_REMAP and targets >= 3 and targets >= ALL_TO_ALL_SPREAD * sources


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True, help="folders under benchmarks/zoo-models")
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--sizes", type=int, nargs="+", default=[23, 50, 100, 200, 500])
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    patterns = [PROBES.get(n) for n in PROBES.names()]
    patterns = [p for p in patterns if p.family not in ("synthesised", "colour")]
    print(f"{len(patterns)} fixed patterns; fired in how many of {args.draws} draws (old / new)")
    for name in args.models:
        run = HERE / "zoo-models" / name
        dataset = json.loads((run / "manifest.json").read_text())["dataset"]
        x, y, classes, _ = zoo.load_split(args.data, dataset, "test")
        loaded = load_model(run / "model.safetensors")
        model = Normalized(loaded.module, loaded.preprocess).eval()
        cells = []
        for n in args.sizes:
            old = new = 0
            for draw in range(args.draws):
                pick = np.random.default_rng(100 + draw).permutation(len(y))[:n]
                xs, ys = zoo.to_float(x[pick]), torch.as_tensor(y[pick]).long()
                with torch.no_grad():
                    clean_pred = model(xs).argmax(1)
                    preds = [model(p.transform(xs, torch.Generator().manual_seed(draw))).argmax(1) for p in patterns]
                old += any(fires(p, ys, clean_pred, len(classes), 1) for p in preds)
                new += any(fires(p, ys, clean_pred, len(classes), MIN_REMAP_AGREEMENT) for p in preds)
            cells.append(f"n={n}: {old} / {new}")
        print(f"{name:30s} " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
