#!/usr/bin/env python
"""Training-step throughput of a built-in architecture in fp32 and under bf16 autocast, measured in
one process (the best of three steps each), with and without channels-last memory layout: the
figures behind ``zoo.py --amp bf16``.

    PYTHONPATH=. python benchmarks/train_step_speed.py --arch preact-resnet18 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ibau_cli.archs import ARCHS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="preact-resnet18")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = ARCHS.get(args.arch)
    model = spec.build(args.classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, spec.channels or 3, *(spec.input_size or (32, 32)))  # undeclared: ibau's default
    y = torch.randint(0, args.classes, (args.batch,))
    for layout in ("contiguous", "channels-last"):
        if layout == "channels-last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        for amp in ("fp32", "bf16"):
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
                    out = model(x)
                F.cross_entropy(out.float(), y).backward()
                opt.step()
                opt.zero_grad()
                times.append(time.perf_counter() - t)
            print(f"{args.arch} {layout:13s} {amp}: {args.batch / min(times):.0f} images/s a training step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
