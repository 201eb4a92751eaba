#!/usr/bin/env python
"""How often does the all-to-all rule of the probes fire, by held-out set size?

The rule (ibau_cli.probes: a fixed pattern sends at least a quarter of the correctly classified images,
95 % lower bound, to their class's most common new label, with targets at least half as many as the
classes moved) is evaluated on every fixed pattern probe for random draws of the test split, with
three ways of counting a class's remapped images: "old" (ibau <= 0.3.4: any changed image counts),
"0.3.5" (only when two images of the class agree on the new label) and "0.4.4" (as 0.3.5, a target that
several classes go to counting the images of its largest source class only: a sink class is not a
remapping). The forward
passes are shared, so the columns come from the same images. docs/probes.md has the table.

    python benchmarks/all_to_all_rule.py --models gtsrb-smallcnn-all2all gtsrb-smallcnn-clean-s0
    python benchmarks/all_to_all_rule.py --model-file m.safetensors --arch net.py:Net --dataset cifar10
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

from ibau_cli.config import load_preset  # noqa: E402
from ibau_cli.formats import load_model  # noqa: E402
from ibau_cli.metrics import Rate  # noqa: E402
from ibau_cli.preprocess import Normalized, Preprocess  # noqa: E402
from ibau_cli.probes import ALL_TO_ALL_REMAP, ALL_TO_ALL_SPREAD, PROBES  # noqa: E402
from ibau_cli.probes.base import MIN_REMAP_AGREEMENT, remap_rate  # noqa: E402


def fires(pred: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor, k: int) -> tuple[bool, bool, bool]:
    """Whether the rule fires under the old, 0.3.5 and 0.4.4 counting."""
    out = []
    for agreement, discount in ((1, False), (MIN_REMAP_AGREEMENT, False), (MIN_REMAP_AGREEMENT, True)):
        rate, targets, sources, one_per_target = remap_rate(pred, y, clean_pred, k, agreement)
        counted = Rate(one_per_target if discount else rate.hits, rate.n)
        lo = (counted.wilson() or (0.0, 0.0))[0]
        out.append(lo >= ALL_TO_ALL_REMAP and targets >= 3 and targets >= ALL_TO_ALL_SPREAD * sources)
    return out[0], out[1], out[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[], help="folders under benchmarks/zoo-models")
    ap.add_argument("--model-file", type=Path, help="a model outside the zoo (with --dataset, and --arch if needed)")
    ap.add_argument("--arch")
    ap.add_argument("--dataset", choices=sorted(zoo.DATASETS))
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--sizes", type=int, nargs="+", default=[23, 50, 100, 200, 500])
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not args.models and args.model_file is None:
        ap.error("give --models (zoo folders) or --model-file")
    torch.set_num_threads(args.threads)
    patterns = [PROBES.get(n) for n in PROBES.names()]
    patterns = [p for p in patterns if p.family not in ("synthesised", "colour")]
    print(f"{len(patterns)} fixed patterns; fired in how many of {args.draws} draws (old / 0.3.5 / 0.4.4)")
    runs = [(name, HERE / "zoo-models" / name / "model.safetensors", None, None) for name in args.models]
    if args.model_file is not None:
        runs.append((args.model_file.parent.name, args.model_file, args.arch, args.dataset))
    for name, model_file, arch, dataset in runs:
        if dataset is None:
            dataset = json.loads((model_file.parent / "manifest.json").read_text())["dataset"]
        x, y, classes, _ = zoo.load_split(args.data, dataset, "test")
        loaded = load_model(model_file, arch=arch)
        preprocess = loaded.preprocess or Preprocess(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in load_preset(dataset)["preprocess"].items()}
        )
        model = Normalized(loaded.module, preprocess).eval()
        cells = []
        for n in args.sizes:
            counts = [0, 0, 0]
            for draw in range(args.draws):
                pick = np.random.default_rng(100 + draw).permutation(len(y))[:n]
                xs, ys = zoo.to_float(x[pick]), torch.as_tensor(y[pick]).long()
                with torch.no_grad():
                    clean_pred = model(xs).argmax(1)
                    preds = [model(p.transform(xs, torch.Generator().manual_seed(draw))).argmax(1) for p in patterns]
                fired = [fires(p, ys, clean_pred, len(classes)) for p in preds]
                for i in range(3):
                    counts[i] += any(f[i] for f in fired)
            cells.append(f"n={n}: {' / '.join(map(str, counts))}")
        print(f"{name:30s} " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
