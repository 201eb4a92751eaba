#!/usr/bin/env python
"""Ablations of I-BAU settings on the synthetic demo backdoor (no data download, minutes on a CPU).

Two backdoored small-cnn models (seeds 0, 1) x three clean sets (seeds 0, 1, 2) of N images;
every configuration is scored on 1,000 independent images: clean accuracy and BadNets ASR
(non-target images). Prints min/mean accuracy and max/mean ASR over the six runs.

    PYTHONPATH=. python benchmarks/ablation_demo.py --n 80 '{}' '{"optimizer": "adam", "lr": 1e-3}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibau_cli.archs import ARCHS  # noqa: E402
from ibau_cli.config import UnlearnConfig  # noqa: E402
from ibau_cli.demo import add_badnets_trigger, synthetic_images, train_backdoored  # noqa: E402
from ibau_cli.unlearn import unlearn  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="JSON objects of [unlearn] overrides; '{}' is the default")
    ap.add_argument("--n", type=int, default=80, help="clean images used for unlearning")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    states = {ms: train_backdoored(ms).model.state_dict() for ms in (0, 1)}
    xt, yt = synthetic_images(1000, seed=9999)

    def score(model):
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
            k = yt != 0
            asr = float((model(add_badnets_trigger(xt[k])).argmax(1) == 0).float().mean())
        return acc, asr

    for text in args.configs:
        kw = json.loads(text)
        res, t = [], time.time()
        for ms, ds in itertools.product((0, 1), (0, 1, 2)):
            m = ARCHS.get("small-cnn").build(10)
            m.load_state_dict(states[ms])
            x, y = synthetic_images(args.n, seed=500 + ds)
            m, _ = unlearn(m, x, y, UnlearnConfig(**kw), seed=ds)
            res.append(score(m))
        accs, asrs = [r[0] for r in res], [r[1] for r in res]
        print(
            f"{json.dumps(kw)}  n={args.n}: acc min {min(accs):.3f} mean {sum(accs) / 6:.3f} | "
            f"ASR max {max(asrs):.3f} mean {sum(asrs) / 6:.3f} | {time.time() - t:.0f}s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
