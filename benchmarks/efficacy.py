#!/usr/bin/env python
"""Efficacy and cost of `ibau sanitize` on a zoo model, with two baselines, measured in one run.

For each clean-set size and seed: a clean folder is drawn from the first half of a fixed
permutation of the test split and written as PNGs; the real pipeline (`ibau_cli.sanitize`) runs on
it (its own 20 % hold-out included); the written model is then reloaded and evaluated
independently on the other half of the test split (clean accuracy, and ASR on triggered images
whose label is not the target). Baselines run the same loop with the same optimiser and steps:
  no-implicit  the implicit hypergradient switched off (delta treated as a constant)
  finetune     delta forced to zero: plain fine-tuning on the clean set
Cost: unlearning time per round divided by one plain fine-tuning epoch over the same clean images,
timed in the same process. Results are appended to a JSON-lines file, so a killed run resumes.

    PYTHONPATH=. python benchmarks/efficacy.py --model-dir ~/.cache/ibau-zoo/cifar10-smallvgg-badnets \
        --n-clean 5000 100 --seeds 0 1 2 --methods ibau no-implicit finetune
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402
import zoo  # noqa: E402
from jsonl import append_row, read_rows, row_version  # noqa: E402

from ibau_cli import __version__  # noqa: E402
from ibau_cli.formats import load_model  # noqa: E402
from ibau_cli.pipeline import SanitizeRequest, TriggerSpec, sanitize  # noqa: E402
from ibau_cli.preprocess import Normalized  # noqa: E402

METHODS = {
    "ibau": {},
    # ibau given the model's own trigger (the manifest's cli_hint), as `sanitize --trigger --target` runs
    "ibau-trigger": {},
    "no-implicit": {"unlearn": {"hypergrad": False}},
    "finetune": {"unlearn": {"hypergrad": False, "radius": 1e-9}},
}


def given_trigger(model_dir: Path, manifest: dict) -> TriggerSpec | None:
    """The trigger `sanitize --trigger` would be given for this zoo model, from the manifest's
    ``cli_hint``; None where the trigger is not a file (SIG, WaNet) or has no single target (all2all)."""
    hint = (manifest.get("trigger") or {}).get("cli_hint")
    if not hint or manifest.get("target") is None or manifest["attack"] == "all2all":
        return None
    opts: dict = {}
    i = 0
    while i < len(hint):
        flag = hint[i]
        if flag == "--trigger-additive":
            opts["additive"] = True
            i += 1
            continue
        value = hint[i + 1]
        if flag == "--trigger":
            opts["image"] = model_dir / value
        elif flag == "--trigger-mask":
            opts["mask"] = model_dir / value
        elif flag == "--trigger-blend":
            opts["blend"] = float(value)
        elif flag == "--trigger-pos":
            opts["position"] = value
        else:
            raise SystemExit(f"efficacy: {model_dir}: unknown cli_hint flag {flag!r}")
        i += 2
    return TriggerSpec(target=int(manifest["target"]), **opts)


@torch.no_grad()
def figures(
    model,
    x_eval: np.ndarray,
    y_eval: np.ndarray,
    x_trig: np.ndarray,
    target_of: np.ndarray,
    keep: np.ndarray,
    device: torch.device = torch.device("cpu"),
):
    """Clean accuracy and ASR in full precision (fp32), whatever the repair's autocast was; the ASR
    is None when no image is kept for it (a clean model: no trigger)."""
    model = model.to(device)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [model(zoo.to_float(x[i : i + 500]).to(device)).argmax(1).cpu().numpy() for i in range(0, len(x), 500)]
        )

    pred = predict(x_eval)
    if not keep.any():
        return float((pred == y_eval).mean()), None, 0
    pred_t = predict(x_trig[keep])
    return float((pred == y_eval).mean()), float((pred_t == target_of[keep]).mean()), int(keep.sum())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch_seconds(
    model, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device = torch.device("cpu")
) -> float:
    """One epoch of plain fine-tuning (forward + backward + Adam step) over the same images, moved to
    the device a batch at a time as ibau moves them; on a GPU after one untimed warm-up step."""
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    model.eval()

    def step(s: int) -> None:
        loss = F.cross_entropy(model(x[s : s + batch].to(device)), y[s : s + batch].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()

    if device.type == "cuda":
        step(0)
    _sync(device)
    t = time.perf_counter()
    for s in range(0, len(x), batch):
        step(s)
    _sync(device)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model-dir", required=True, type=Path, help="a zoo run folder (model.safetensors + manifest.json)"
    )
    ap.add_argument("--data", default=str(zoo.default_data_dir()))
    ap.add_argument("--n-clean", type=int, nargs="+", default=[5000, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config, SECTION.KEY=VALUE")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N: the repair, the evaluation and the timed plain epoch (GPU rows go to results/gpu/)",
    )
    ap.add_argument(
        "--probes", action="store_true", help="run the probes in ibau runs (the CLI default; they guide the unlearning)"
    )
    ap.add_argument("--results", type=Path, default=None, help="JSON-lines file [benchmarks/results/<model>.jsonl]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"efficacy: --device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"efficacy: --device {args.device}: this torch build sees no CUDA device")
    gpu = device.type == "cuda"

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    attack, target, dataset = manifest["attack"], manifest.get("target"), manifest["dataset"]
    trigger_seed = manifest.get("trigger_seed", 0)
    results = args.results or REPO / "benchmarks" / "results" / ("gpu" if gpu else "") / f"{args.model_dir.name}.jsonl"
    done = {
        (
            r["model"],
            r["method"],
            r["n_clean"],
            r["seed"],
            json.dumps(r["extra_config"], sort_keys=True),
            r.get("probes", False),
        )
        for r in read_rows(results)
        if row_version(r) == __version__
    }

    extra: dict = {}
    from ibau_cli.settings_resolve import parse_assignment

    for text in args.sets:
        section, key, value = parse_assignment(text)
        extra.setdefault(section, {})[key] = value

    x_te, y_te, _, _ = zoo.load_split(Path(args.data), dataset, "test")
    perm = np.random.default_rng(1000).permutation(len(y_te))
    half = len(perm) // 2
    pool, evaluation = perm[:half], perm[half:]
    x_eval, y_eval = x_te[evaluation], y_te[evaluation]
    x_trig = zoo.triggered_uint8(attack, x_eval, trigger_seed)
    num_classes = manifest.get("num_classes") or int(y_te.max()) + 1
    target_of = attacks.target_labels(attack, torch.as_tensor(y_eval), target or 0, num_classes).numpy()
    keep = target_of != y_eval
    if attack == "clean":  # no trigger: accuracy only (what sanitizing a clean model costs)
        keep = np.zeros_like(keep)

    trigger = given_trigger(args.model_dir, manifest)
    if "ibau-trigger" in args.methods and trigger is None:
        raise SystemExit(f"efficacy: {args.model_dir.name}: no trigger file to give (--methods ibau-trigger)")
    model_path = args.model_dir / "model.safetensors"
    base = load_model(model_path)
    pre = base.preprocess
    base_wrapped = Normalized(base.module, pre).eval()
    acc0, asr0, n_asr = figures(base_wrapped, x_eval, y_eval, x_trig, target_of, keep, device)
    print(
        f"{args.model_dir.name}: before acc {acc0:.4f} asr {_pct(asr0)} on {len(y_eval)} / {n_asr} evaluation images",
        flush=True,
    )

    for n in args.n_clean:
        for seed in args.seeds:
            chosen = np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False)
            tmp = Path(tempfile.mkdtemp(prefix="ibau-eff-"))
            try:
                zoo.write_folder(x_te[chosen], y_te[chosen], tmp / "clean")
                for method in args.methods:
                    overrides = json.loads(json.dumps(METHODS[method]))
                    for section, values in extra.items():
                        overrides.setdefault(section, {}).update(values)
                    probes_on = bool(args.probes and method.startswith("ibau"))
                    key = (args.model_dir.name, method, n, seed, json.dumps(extra, sort_keys=True), probes_on)
                    if key in done:
                        continue
                    out = tmp / f"{method}.safetensors"
                    overrides["seed"] = seed
                    # probes: only where asked, and only for ibau (the baselines take no guidance)
                    overrides.setdefault("probes", {})["enabled"] = probes_on
                    t = time.perf_counter()
                    report = sanitize(
                        SanitizeRequest(
                            model=model_path,
                            clean=tmp / "clean",
                            out=out,
                            overrides=overrides,
                            device=args.device,
                            trigger=trigger if method == "ibau-trigger" else None,
                        )
                    ).to_dict()
                    wall = time.perf_counter() - t
                    fixed = load_model(out)
                    wrapped = Normalized(fixed.module, pre).eval()
                    acc1, asr1, _ = figures(wrapped, x_eval, y_eval, x_trig, target_of, keep, device)
                    # cost ratio, timed now in this process on the same unlearning images
                    fresh = Normalized(load_model(model_path).module, pre)
                    xs = torch.stack([zoo.to_float(x_te[chosen][i : i + 1])[0] for i in range(len(chosen))])
                    n_unlearn = report["data"]["n_unlearn"]
                    epoch_s = plain_epoch_seconds(
                        fresh,
                        xs[:n_unlearn],
                        torch.as_tensor(y_te[chosen][:n_unlearn]),
                        report["config"]["unlearn"]["batch_size"],
                        device,
                    )
                    # the rounds that ran: the small-set schedule doubles the configured number
                    rounds = len(report["rounds"]) or report["config"]["unlearn"]["rounds"]
                    row = {
                        "model": args.model_dir.name,
                        "attack": attack,
                        "method": method,
                        "n_clean": n,
                        "n_unlearn": n_unlearn,
                        "seed": seed,
                        "extra_config": extra,
                        "acc_before": acc0,
                        "asr_before": asr0,
                        "acc_after": acc1,
                        "asr_after": asr1,
                        "n_eval": len(y_eval),
                        "n_eval_asr": n_asr,
                        "holdout_acc_after": report["after"]["accuracy"]["value"],
                        "unlearn_seconds": report["unlearning"]["seconds"],
                        "round_over_epoch": report["unlearning"]["seconds"] / rounds / epoch_s,
                        "rounds_run": rounds,
                        "early_stop": report["unlearning"].get("early_stop"),
                        "extension": report["unlearning"].get("extension"),
                        "step_back": report["unlearning"].get("step_back"),
                        "plain_epoch_seconds": epoch_s,
                        "wall_seconds": wall,
                        "threads": torch.get_num_threads(),
                        "tool_version": report["tool"]["version"],
                        "unlearn_config": report["config"]["unlearn"],
                        "probes": probes_on,
                        "guided_class": report["unlearning"].get("guided_class"),
                        "guided_by": report["unlearning"].get("guided_by"),
                        "known_trigger": report["unlearning"].get("known_trigger"),
                        "perturbations": [f["family"] for f in report["unlearning"].get("perturbations", [])],
                        "probe_verdict_before": ((report.get("probes") or {}).get("before") or {}).get("verdict"),
                        "torch": torch.__version__,
                        "device": report["device"],
                        "amp": report["unlearning"].get("amp"),
                    }
                    append_row(results, row)
                    print(
                        f"{method:12s} n={n:5d} seed={seed}: acc {acc0:.4f}->{acc1:.4f}  asr {_pct(asr0)}->{_pct(asr1)}  "
                        f"unlearn {row['unlearn_seconds']:.0f}s  round/epoch {row['round_over_epoch']:.1f}",
                        flush=True,
                    )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
