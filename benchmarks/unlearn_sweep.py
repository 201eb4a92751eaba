#!/usr/bin/env python
"""Unlearning settings side by side on one zoo model, in process (no probes, no CLI): the harness
behind the settings sweeps in docs/algorithm.md (the small-set schedule, BatchNorm-only updates,
the warp step's implicit term).

The draw follows `efficacy.py`: the test split permuted once (seed 1000); 80 % of N images taken
from the first half with the run's seed (what `ibau sanitize` would keep for unlearning), accuracy
and ASR measured on the first 2,000 images of the second half. Guidance is given as a class
(`--hint`), standing in for the class the probes name in the efficacy runs.

    PYTHONPATH=. python benchmarks/unlearn_sweep.py --model gtsrb-smallcnn-watermark --n 100 \\
        --seeds 0 1 2 --variant "" --variant "unlearn.small_set=off"
    PYTHONPATH=. python benchmarks/unlearn_sweep.py --model gtsrb-smallcnn-wanet --n 2500 --hint 25 \\
        --variant "unlearn.perturbations=additive+warp"
    PYTHONPATH=. python benchmarks/unlearn_sweep.py --model gtsrb-smallcnn-blend --n 100 --hint 5 --trace

`--trace` prints accuracy and ASR on the evaluation images after every round (with `--watch-probe
NAME`, also that fixed probe's flip rate toward `--hint` on the unlearning | evaluation images) (and each round's
untargeted delta's fooling rate on the unlearning images): where in the repair the backdoor goes
and where the accuracy goes.

A variant is comma-separated SECTION.KEY=VALUE assignments to the `unlearn` section ("" for the
defaults), optionally with `bn-only` among them (train only the BatchNorm parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402
import zoo  # noqa: E402

from ibau_cli.config import UnlearnConfig  # noqa: E402
from ibau_cli.formats import load_model  # noqa: E402
from ibau_cli.preprocess import Normalized  # noqa: E402
from ibau_cli.settings_resolve import parse_assignment  # noqa: E402
from ibau_cli.unlearn import unlearn  # noqa: E402


def _config(variant: str) -> UnlearnConfig:
    changes = {}
    for text in filter(None, variant.split(",")):
        if text == "bn-only":
            continue
        section, key, value = parse_assignment(text)
        if section != "unlearn":
            raise SystemExit(f"unlearn_sweep: {text!r}: only unlearn.* settings apply here")
        changes[key] = value
    config = dataclasses.replace(UnlearnConfig(), **changes)
    problems = config.check()
    if problems:
        raise SystemExit(f"unlearn_sweep: {variant!r}: {'; '.join(problems)}")
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a zoo run name under --zoo")
    ap.add_argument("--zoo", type=Path, default=zoo.default_out_dir())
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--n", type=int, required=True, help="clean images (80 %% of them unlearn)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--hint", type=int, help="the class to guide toward (unset: unguided)")
    ap.add_argument("--variant", action="append", default=[], help="repeatable; see above")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--trace",
        action="store_true",
        help="print accuracy and ASR after every round (the time printed then includes them)",
    )
    ap.add_argument(
        "--watch-probe", help="with --trace and --hint: also a fixed probe's flip rate toward the hint, each round"
    )
    ap.add_argument(
        "--patch-probe",
        help="with --hint: the fixed probe the pipeline would grow the patch family's region from "
        "(the one that named the class); variants with unlearn.patch=off run without it",
    )
    ap.add_argument(
        "--known-trigger",
        action="store_true",
        help="give unlearn() the model's own trigger (what `sanitize --trigger` passes when it works)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variant or [""]
    configs = {v: _config(v) for v in variants}

    run = args.zoo / args.model
    manifest = json.loads((run / "manifest.json").read_text())
    x_te, y_te, _, _ = zoo.load_split(args.data, manifest["dataset"], "test")
    perm = np.random.default_rng(1000).permutation(len(y_te))
    half = len(perm) // 2
    evaluation = perm[half:][:2000]
    x_eval = zoo.to_float(x_te[evaluation])
    y_eval = torch.as_tensor(y_te[evaluation])
    if manifest["attack"] == "clean":  # no trigger: the ASR column stays 0
        x_trig, target = x_eval, y_eval
    else:
        x_trig = zoo.to_float(
            zoo.triggered_uint8(manifest["attack"], x_te[evaluation], manifest.get("trigger_seed", 0))
        )
        target = attacks.target_labels(manifest["attack"], y_eval, manifest["target"], manifest["num_classes"])
    keep = target != y_eval

    def fresh() -> torch.nn.Module:
        loaded = load_model(run / "model.safetensors")
        return Normalized(loaded.module, loaded.preprocess).eval()

    def figures(model: torch.nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            acc = float((model(x_eval).argmax(1) == y_eval).float().mean())
            asr = float((model(x_trig[keep]).argmax(1) == target[keep]).float().mean())
        return acc, asr

    if args.watch_probe:
        from ibau_cli.probes.patterns import builtin_patterns

        watch = next((p for p in builtin_patterns() if p.name == args.watch_probe), None)
        if watch is None or args.hint is None:
            raise SystemExit(
                f"unlearn_sweep: --watch-probe needs --hint and a fixed probe name, not {args.watch_probe!r}"
            )
    region = None
    if args.patch_probe:
        from ibau_cli.probes import PROBES, patch_region

        probe = PROBES.get(args.patch_probe)
        if probe is None or args.hint is None:
            raise SystemExit(
                f"unlearn_sweep: --patch-probe needs --hint and a fixed probe name, not {args.patch_probe!r}"
            )
        region = patch_region(lambda x: probe.transform(x, torch.Generator().manual_seed(0)), tuple(x_eval.shape[1:]))
        print(f"patch region from {args.patch_probe}: {None if region is None else int(region.sum())} pixels")
    acc0, asr0 = figures(fresh())
    print(f"{args.model}: before accuracy {acc0:.3f}, ASR {asr0:.3f} ({len(y_eval)} / {int(keep.sum())} images)")
    for seed in args.seeds:
        pick = perm[:half][np.random.default_rng(seed).permutation(half)[: int(args.n * 0.8)]]
        x, y = zoo.to_float(x_te[pick]), torch.as_tensor(y_te[pick])
        for variant, config in configs.items():
            model = fresh()
            if "bn-only" in variant.split(","):
                for module in model.modules():
                    is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(is_bn)
            t = time.perf_counter()
            trace = []

            def on_round(r: int, m: torch.nn.Module, trace: list = trace, x=x, y=y) -> dict:
                acc_r, asr_r = figures(m)
                trace.append(f"{acc_r:.3f}/{asr_r:.3f}")
                if args.watch_probe:
                    with torch.no_grad():
                        xp = watch.transform(x, torch.Generator().manual_seed(0))
                        pe = m(xp).argmax(1)
                        pc = m(x).argmax(1)
                    ok = (y != args.hint) & (pc != args.hint)
                    ev = m(watch.transform(x_eval, torch.Generator().manual_seed(0))).argmax(1)
                    pce = m(x_eval).argmax(1)
                    oke = (y_eval != args.hint) & (pce != args.hint)
                    trace[-1] += (
                        f"[{float((pe[ok] == args.hint).float().mean()):.2f}|{float((ev[oke] == args.hint).float().mean()):.2f}]"
                    )
                return {}

            hook = on_round if args.trace else None
            patch = None if config.patch == "off" else region
            known = None
            if args.known_trigger and manifest["attack"] != "clean":

                def known(xb: torch.Tensor) -> torch.Tensor:
                    return attacks.apply(manifest["attack"], xb, manifest.get("trigger_seed", 0))

            _, log = unlearn(
                model,
                x,
                y,
                config,
                target_hint=args.hint,
                seed=seed,
                on_round=hook,
                patch_region=patch,
                known_trigger=known,
            )
            acc, asr = figures(model)
            print(
                f"  n={args.n} seed={seed} {variant or 'defaults':40s} accuracy {acc:.3f}  ASR {asr:.3f}  "
                f"{time.perf_counter() - t:.1f} s (outer {log.outer_seconds:.1f} s)",
                flush=True,
            )
            if trace:
                print(f"    rounds (accuracy/ASR): {' '.join(trace)}", flush=True)
                rates = " ".join(f"{r.delta_fooling_rate:.2f}" for r in log.rounds)
                print(f"    each round's untargeted delta, fooling rate: {rates}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
