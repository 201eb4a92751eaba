#!/usr/bin/env python
"""Speed and memory of one I-BAU round against one plain fine-tuning epoch, per zoo model.

For each model: load it and N clean test images in a child process, then time one plain
fine-tuning epoch (forward, backward, SGD step over the N images, batch 64) and one I-BAU round
(the package's `unlearn`, default settings, rounds = 1) from the same weights, interleaved twice
in that one process after a warm-up batch; the faster of each pair gives the ratio round / epoch
(other jobs on a shared machine slow both alike). Two more children, one per measurement, give
the peaks. Peak memory: the child's peak resident set size on
CPU (minus the same child's RSS before the measured work), `torch.cuda.max_memory_allocated` on
CUDA. One JSON line per (model, device, N) in benchmarks/results/speed.jsonl.

    python benchmarks/speed.py --n 2500 --threads 2 [--device cuda] [--only gtsrb]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "speed.jsonl"


def _child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import numpy as np
    import torch
    import torch.nn.functional as F
    import zoo

    from ibau_cli.config import UnlearnConfig
    from ibau_cli.formats import load_model
    from ibau_cli.preprocess import Normalized
    from ibau_cli.unlearn import unlearn

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    x_te, y_te, _, _ = zoo.load_split(args.data, manifest["dataset"], "test")
    idx = np.random.default_rng(0).permutation(len(y_te))[: args.n]
    x = zoo.to_float(x_te[idx])  # on the CPU, moved a batch at a time in both measurements (as ibau does)
    y = torch.as_tensor(y_te[idx])
    loaded = load_model(args.model_dir / "model.safetensors")
    model = Normalized(loaded.module, loaded.preprocess).to(device).eval()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batch = 64
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def epoch() -> float:
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        sync()
        t = time.perf_counter()
        for s in range(0, len(x), batch):
            loss = F.cross_entropy(model(x[s : s + batch].to(device)), y[s : s + batch].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return time.perf_counter() - t

    hint = manifest.get("target") if manifest["attack"] not in ("clean", "all2all") else None

    from ibau_cli.probes import PROBES, patch_region

    corner = PROBES.get("patch-checker-br-10%")  # the region a corner-patch probe gives the patch family
    region = patch_region(lambda v: corner.transform(v, torch.Generator().manual_seed(0)), tuple(x.shape[1:]))

    def one_round(target_hint: int | None = None, perturbations: str = "additive", patch: bool = False) -> float:
        model.load_state_dict(state)
        sync()
        t = time.perf_counter()
        config = UnlearnConfig(rounds=1, perturbations=perturbations)
        unlearn(
            model, x, y, config, device=device, seed=0, target_hint=target_hint, patch_region=region if patch else None
        )
        sync()
        return time.perf_counter() - t

    F.cross_entropy(model(x[:batch].to(device)), y[:batch].to(device)).backward()  # warm-up
    model.zero_grad(set_to_none=True)
    if args.what == "epoch":
        seconds = epoch()
    elif args.what == "round":
        seconds = one_round()
    else:  # "time": both, interleaved twice, the faster of each (less noise from other jobs)
        times = {"epoch": [], "round": [], "guided_round": [], "warp_round": [], "patch_round": []}
        for _ in range(2):
            times["epoch"].append(epoch())
            times["round"].append(one_round())
            if hint is not None:  # guided by the backdoor's class, as when the probes suspect it
                times["guided_round"].append(one_round(hint))
                # guided, with the warp family too (as when a warp probe also fires)
                times["warp_round"].append(one_round(hint, "additive+warp"))
                # guided, with the patch family too (as when a corner-patch probe named the class)
                times["patch_round"].append(one_round(hint, patch=True))
        times = {k: v for k, v in times.items() if v}
        print(json.dumps({k: min(v) for k, v in times.items()}))
        return
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    )
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def _measure(model_dir: Path, what: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--model-dir", str(model_dir), "--n", str(args.n)]
    cmd += ["--threads", str(args.threads), "--device", args.device, "--data", str(args.data)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"{model_dir.name} {what}: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import zoo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=zoo.default_out_dir())
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--only", default="")
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--child", choices=["epoch", "round", "time"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.what = args.child
        _child(args)
        return 0
    import platform

    import torch
    from jsonl import append_row, read_rows, row_version

    from ibau_cli import __version__

    done = {(r["model"], r["device"], r["n"], row_version(r)) for r in read_rows(args.results)}
    for model_dir in sorted(p.parent for p in args.zoo.glob("*/manifest.json") if args.only in p.parent.name):
        if (model_dir.name, args.device, args.n, __version__) in done:
            continue
        timed = _measure(model_dir, "time", args)
        epoch = _measure(model_dir, "epoch", args)
        rnd = _measure(model_dir, "round", args)
        device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
        row = {
            "model": model_dir.name,
            "device": args.device,
            "device_name": device_name or platform.machine(),
            "threads": args.threads,
            "n": args.n,
            "epoch_seconds": timed["epoch"],
            "round_seconds": timed["round"],
            "round_over_epoch": timed["round"] / timed["epoch"],
            "guided_round_seconds": timed.get("guided_round"),
            "guided_round_over_epoch": timed["guided_round"] / timed["epoch"] if "guided_round" in timed else None,
            "warp_round_seconds": timed.get("warp_round"),
            "warp_round_over_epoch": timed["warp_round"] / timed["epoch"] if "warp_round" in timed else None,
            "patch_round_seconds": timed.get("patch_round"),
            "patch_round_over_epoch": timed["patch_round"] / timed["epoch"] if "patch_round" in timed else None,
            "tool_version": __version__,
            "epoch_peak_mib": epoch["peak_mib"],
            "round_peak_mib": rnd["peak_mib"],
            "torch": torch.__version__,
        }
        append_row(args.results, row)
        print(
            f"{row['model']:32s} {args.device}: epoch {row['epoch_seconds']:.2f} s, round {row['round_seconds']:.2f} s, "
            f"ratio {row['round_over_epoch']:.2f}; peak {row['epoch_peak_mib']:.0f} / {row['round_peak_mib']:.0f} MiB",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
