#!/usr/bin/env python
"""Does `ibau scan` flag backdoored zoo models, name the target, and leave clean ones alone?

For each zoo model (a folder with model.safetensors + manifest.json) and seed, the real scan
(`ibau_cli.scan`, the CLI's code path) runs on N clean test images drawn from the half of the test
split that `efficacy.py` uses for clean sets (never its evaluation half). One JSON line per
(model, N, seed) is appended to the results file, so a killed run resumes. ``--table`` writes
benchmarks/PROBES.md with the per-model rows and the true/false positive counts.

    python benchmarks/probe_eval.py --n 1000 --seeds 0 --threads 1          # every finished zoo model
    python benchmarks/probe_eval.py --only gtsrb --n 1000 --seeds 0 1
    python benchmarks/probe_eval.py --table
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import zoo  # noqa: E402
from jsonl import append_row, read_rows  # noqa: E402

from ibau_cli import __version__  # noqa: E402
from ibau_cli.pipeline import SanitizeRequest, scan  # noqa: E402

RESULTS = HERE / "results" / "probes.jsonl"


def zoo_models(root: Path, only: str) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/manifest.json") if only in p.parent.name)


def scan_indices(n_test: int, n: int, seed: int) -> np.ndarray:
    """The test images a scan uses: ``n`` drawn (seeded) from the first half of the permutation
    efficacy.py draws clean sets from; its evaluation half is never used here."""
    perm = np.random.default_rng(1000).permutation(n_test)
    pool = perm[: n_test // 2]
    return np.random.default_rng([seed, 77]).choice(pool, size=min(n, len(pool)), replace=False)


def scan_row(model_dir: Path, data: Path, n: int, seed: int) -> dict:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    x_te, y_te, _, _ = zoo.load_split(data, manifest["dataset"], "test")
    chosen = scan_indices(len(y_te), n, seed)
    tmp = Path(tempfile.mkdtemp(prefix="ibau-probe-eval-"))
    try:
        zoo.write_folder(x_te[chosen], y_te[chosen], tmp / "clean")
        t = time.perf_counter()
        report = scan(
            SanitizeRequest(
                model=model_dir / "model.safetensors", clean=tmp / "clean", overrides={"seed": seed}, device="cpu"
            )
        ).to_dict()
        wall = time.perf_counter() - t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    probes = report["probes"]["before"]
    by_name = {p["name"]: p for p in probes["probes"]}
    uap = by_name.get("synth-universal-perturbation", {})
    return {
        "model": model_dir.name,
        "dataset": manifest["dataset"],
        "arch": manifest.get("arch"),
        "attack": manifest["attack"],
        "target": manifest.get("target") if manifest["attack"] not in ("clean", "all2all") else None,
        "model_acc": manifest.get("metrics", {}).get("clean_acc"),
        "model_asr": manifest.get("metrics", {}).get("asr"),
        "n": n,
        "n_scanned": probes["n_images"],
        "seed": seed,
        "verdict": probes["verdict"],
        "suspected_class": probes["evidence"].get("suspected_class"),
        "reasons": probes["evidence"].get("reasons"),
        "anomaly_index": probes["evidence"].get("anomaly_index"),
        "worst_probe": probes["worst_probe"],
        "worst_flip": probes["worst_flip_rate"]["value"],
        "worst_class": probes["worst_class"],
        "uap_flip": (uap.get("flip_rate") or {}).get("value"),
        "uap_class": uap.get("worst_class"),
        "probe_seconds": probes["seconds"],
        # every probe's result as the report gives it: enough to judge the scan again offline
        "probe_results": [{k: v for k, v in p.items() if k != "seconds"} for p in probes["probes"]],
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tool_version": __version__,
    }


UNRECORDED = "<= 0.4.2"  # rows written before probe_eval.py recorded the version


def _version_key(r: dict) -> tuple[int, ...]:
    """The release numbers of a row's version (0.4.3rc1 and 0.4.3+local count as 0.4.3)."""
    v = r.get("tool_version")
    return (0,) if v is None else tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def latest(rows: list[dict]) -> list[dict]:
    """One row per (model, N, seed): the newest version's (a rerun with new probes replaces the old)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["n"], r["seed"])
        if key not in best or _version_key(r) >= _version_key(best[key]):
            best[key] = r
    return list(best.values())


def outcome(r: dict) -> str:
    flagged = r["verdict"] == "suspected"
    if r["attack"] == "clean":
        return "FP" if flagged else ("TN (inconclusive)" if r["verdict"] == "inconclusive" else "TN")
    if not flagged:
        return "FN (inconclusive)" if r["verdict"] == "inconclusive" else "FN"
    if r["target"] is None:
        return "TP"
    return "TP, right target" if r["suspected_class"] == r["target"] else "TP, wrong target"


def _manifest_metrics(r: dict) -> str:
    acc = "-" if r["model_acc"] is None else f"{r['model_acc']:.1%}"
    asr = "-" if r["model_asr"] is None else f"{r['model_asr']:.1%}"
    return f"{acc} | {asr}"


def table(rows: list[dict]) -> str:
    lines = [
        "# Probe evaluation: `ibau scan` on the zoo",
        "",
        f"Generated {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()} "
        f"({platform.processor() or platform.system()}), torch {torch.__version__}, by `benchmarks/probe_eval.py`.",
        "Each row is one scan (default settings) of one zoo model on N clean test images that no evaluation uses.",
        "Model acc / ASR are the zoo manifest's figures on the whole test split. Positive = verdict `suspected`.",
        "",
        "The newest scan of each (model, N, seed) is shown; `ibau` is the version that ran it "
        f"(`{UNRECORDED}`: before versions were recorded, so before the frame probes of 0.4.2 at the latest).",
        "",
        "| model | attack | target | model acc | model ASR | N | seed | ibau | verdict | suspected class | outcome | "
        "worst probe (flip) | UAP flip | anomaly index | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = latest(rows)
    for r in sorted(rows, key=lambda r: (r["dataset"], r["attack"] == "clean", r["model"], r["n"], r["seed"])):
        ai = "-" if r["anomaly_index"] is None else f"{r['anomaly_index']:.1f}"
        uap = "-" if r["uap_flip"] is None else f"{r['uap_flip']:.0%} (class {r['uap_class']})"
        lines.append(
            f"| {r['model']} | {r['attack']} | {'-' if r['target'] is None else r['target']} | {_manifest_metrics(r)} "
            f"| {r['n_scanned']} | {r['seed']} | {r.get('tool_version', UNRECORDED)} | {r['verdict']} | "
            f"{'-' if r['suspected_class'] is None else r['suspected_class']} | {outcome(r)} | "
            f"{r['worst_probe']} ({r['worst_flip']:.0%}) | {uap} | {ai} | {r['wall_seconds']:.0f} s |"
        )
    lines += ["", "## Counts", ""]
    for n in sorted({r["n"] for r in rows}):
        at_n = [r for r in rows if r["n"] == n]
        bd = [r for r in at_n if r["attack"] != "clean"]
        cl = [r for r in at_n if r["attack"] == "clean"]
        single = [r for r in bd if r["target"] is not None and r["verdict"] == "suspected"]
        tp = sum(r["verdict"] == "suspected" for r in bd)
        fp = sum(r["verdict"] == "suspected" for r in cl)
        named = [r for r in bd if r["verdict"] == "inconclusive" and r["target"] is not None]
        lines += [
            f"N = {n} clean images:",
            "",
            f"- Backdoored scans: {len(bd)} ({len({r['model'] for r in bd})} models); flagged (true positives): "
            f"{tp}; missed: {len(bd) - tp} (of which inconclusive: {sum(r['verdict'] == 'inconclusive' for r in bd)}"
            f", naming the right target: {sum(r['suspected_class'] == r['target'] for r in named)}).",
            f"- Right target among flagged single-target scans: "
            f"{sum(r['suspected_class'] == r['target'] for r in single)} of {len(single)}.",
            f"- Clean scans: {len(cl)} ({len({r['model'] for r in cl})} models); flagged (false positives): {fp}; "
            f"inconclusive: {sum(r['verdict'] == 'inconclusive' for r in cl)}.",
            "",
        ]
    lines += [
        "Reproduce: `python benchmarks/zoo_plan.py` (trains the zoo), then "
        "`python benchmarks/probe_eval.py --n N --seeds S` and `python benchmarks/probe_eval.py --table`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=zoo.default_out_dir())
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--only", default="", help="only models whose name contains this")
    ap.add_argument("--n", type=int, default=1000, help="clean images per scan")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="write benchmarks/PROBES.md from the results and stop")
    args = ap.parse_args(argv)
    rows = read_rows(args.results)
    if args.table:
        (HERE / "PROBES.md").write_text(table(rows))
        print(f"wrote {HERE / 'PROBES.md'} ({len(rows)} scans)")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    done = {(r["model"], r["n"], r["seed"]) for r in rows if r.get("tool_version") == __version__}
    for model_dir in zoo_models(args.zoo, args.only):
        for seed in args.seeds:
            if (model_dir.name, args.n, seed) in done:
                continue
            r = scan_row(model_dir, args.data, args.n, seed)
            append_row(args.results, r)
            print(
                f"{r['model']:32s} seed {seed}: {r['verdict']:12s} class {r['suspected_class']} "
                f"({outcome(r)}), worst {r['worst_probe']} {r['worst_flip']:.0%}, {r['wall_seconds']:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
