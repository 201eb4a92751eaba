#!/usr/bin/env python
"""Synthesised probes fitted one class at a time against several classes per batch
(``probes.class_batch``), through the real scan, in one process.

For each zoo model: N clean test images drawn as `probe_eval.py` draws them (never efficacy.py's
evaluation half), one warm-up scan (CUDA start-up, cuDNN autotuning), then the scan with every
requested class batch, repeated; per run the seconds of the two class-wise synthesised probes
(mask-pattern and universal perturbation), the whole probe suite, the verdict and the suspected
class. The ratio is the one-class-at-a-time time over the batched time, the faster of the repeats
of each. One JSON line per run in benchmarks/results/probes-class-batch.jsonl (or --out).

    python benchmarks/probe_batch_speed.py --device cuda --only gtsrb-smallcnn-badnets cifar10-smallvgg-badnets
    python benchmarks/probe_batch_speed.py --device cpu --threads 2 --only gtsrb-smallcnn-badnets --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import zoo  # noqa: E402
from jsonl import append_row  # noqa: E402
from probe_eval import scan_indices  # noqa: E402

import ibau_cli  # noqa: E402
from ibau_cli.pipeline import SanitizeRequest, scan  # noqa: E402
from ibau_cli.probes.base import resolved_class_batch  # noqa: E402

CLASSWISE = ("synth-mask-pattern", "synth-universal-perturbation")


def one_scan(model: Path, clean: Path, device: str, class_batch: int | None, seed: int) -> dict:
    overrides: dict = {"seed": seed}
    if class_batch is not None:
        overrides["probes"] = {"class_batch": class_batch}
    t = time.perf_counter()
    report = scan(SanitizeRequest(model=model, clean=clean, overrides=overrides, device=device)).to_dict()
    wall = time.perf_counter() - t
    suite = report["probes"]["before"]
    by_name = {p["name"]: p for p in suite["probes"]}
    return {
        "classwise_seconds": sum(by_name[n]["seconds"] for n in CLASSWISE),
        "probe_seconds": suite["seconds"],
        "wall_seconds": wall,
        "verdict": suite["verdict"],
        "suspected_class": suite["evidence"].get("suspected_class"),
        "uap_class": by_name["synth-universal-perturbation"]["worst_class"],
        "mask_class": by_name["synth-mask-pattern"]["worst_class"],
        "anomaly_index": by_name["synth-mask-pattern"].get("details", {}).get("anomaly_index"),
        "n_images": suite["n_images"],
        "device_name": report.get("device"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=HERE / "zoo-models")
    ap.add_argument("--only", nargs="+", required=True, help="zoo model folder names")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("IBAU_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--n", type=int, default=1000, help="clean images per scan")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", nargs="+", default=["1", "auto"], help="class batches: integers or 'auto'")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "probes-class-batch.jsonl")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [None if b == "auto" else int(b) for b in args.batches]
    warm = False
    for name in args.only:
        model_dir = args.zoo / name
        manifest = json.loads((model_dir / "manifest.json").read_text())
        x_te, y_te, _, _ = zoo.load_split(args.data, manifest["dataset"], "test")
        chosen = scan_indices(len(y_te), args.n, args.seed)
        tmp = Path(tempfile.mkdtemp(prefix="ibau-probe-batch-"))
        try:
            zoo.write_folder(x_te[chosen], y_te[chosen], tmp / "clean")
            model = model_dir / "model.safetensors"
            if not warm:
                one_scan(model, tmp / "clean", args.device, None, args.seed)
                warm = True
            best: dict[str, float] = {}
            for rep in range(args.repeats):
                for cb in batches:
                    row = one_scan(model, tmp / "clean", args.device, cb, args.seed)
                    resolved = resolved_class_batch(
                        cb, torch.device(args.device), (x_te.shape[3], *x_te.shape[1:3]), 64
                    )
                    key = "auto" if cb is None else str(cb)
                    best[key] = min(best.get(key, float("inf")), row["classwise_seconds"])
                    row.update(
                        model=name,
                        n=args.n,
                        seed=args.seed,
                        repeat=rep,
                        class_batch=key,
                        resolved_class_batch=resolved,
                        threads=torch.get_num_threads(),
                        torch=torch.__version__,
                        tool_version=ibau_cli.__version__,
                    )
                    append_row(args.out, row)
                    print(
                        f"{name} class_batch={key} ({resolved}) rep {rep}: class-wise probes "
                        f"{row['classwise_seconds']:.2f} s, all probes {row['probe_seconds']:.2f} s, "
                        f"{row['verdict']} {row['suspected_class']} (mask {row['mask_class']}, uap {row['uap_class']})",
                        flush=True,
                    )
            base = best.get("1")
            for key, sec in best.items():
                if base and key != "1":
                    print(
                        f"{name}: one class at a time / class_batch={key}: {base / sec:.2f}x ({base:.2f} s vs {sec:.2f} s)"
                    )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
