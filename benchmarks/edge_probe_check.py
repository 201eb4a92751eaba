"""Would 0.4.0's mid-edge patch probes have changed an earlier efficacy run's repair?

ibau 0.4.0 added fixed patch probes halfway along each edge (``patterns.PATCH_PLACES``). The probes
before a repair decide its path through ``judge`` (the suspected class: the strongest fixed probe
that flips at least half of the images, 95 % lower bound; else an all-to-all pattern; else the
synthesised probes, which the fixed ones do not affect) and through ``proxy_trigger`` (the fixed
probe that sends the largest share toward the class: the early stop's and the extension's trigger
and the patch family's region). For every ``ibau + probes`` row of ``benchmarks/results/``, this
script rebuilds the run's clean folder and held-out split exactly as ``efficacy.py`` and the
pipeline did, runs every fixed probe on the input model, and compares ``judge`` on the fixed probes
of 0.3.9's places with ``judge`` on all of them (the reasons, so the same top probe), and the proxy
for every class. Where nothing differs, the earlier run's repair is the one 0.4.0 makes, and
``results_table.py`` counts it as 0.4.0's (``same_decisions``).

    python benchmarks/edge_probe_check.py --data ../shared/data [--threads 1]

Appends to ``benchmarks/results/edge-probe-check.jsonl`` (one row per model, clean-set size and seed;
rows already there are skipped, so an interrupted run resumes).

``--since 0.4.2`` makes the same check for the frame probes 0.4.2 added (``PatternProbe.added_in``):
the probes before them against all of them, for the ``ibau + probes`` and ``ibau-trigger + probes``
rows, into ``benchmarks/results/frame-probe-check.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import zoo  # noqa: E402

from ibau_cli.data import load_clean_folder, stratified_split  # noqa: E402
from ibau_cli.formats import load_model  # noqa: E402
from ibau_cli.preprocess import Normalized  # noqa: E402
from ibau_cli.probes import PROBES, ProbeSuite, judge, proxy_trigger  # noqa: E402
from ibau_cli.probes.base import ProbeContext, predict  # noqa: E402
from ibau_cli.probes.patterns import PatternProbe  # noqa: E402

OUTPUTS = {"0.4.0": HERE / "results" / "edge-probe-check.jsonl", "0.4.2": HERE / "results" / "frame-probe-check.jsonl"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")) if text else ()


def _before(result, since: str) -> bool:
    """A probe the versions before ``since`` ran (``PatternProbe.added_in``)."""
    return _version(PROBES.get(result.name).added_in) < _version(since)


def _up_to(probe, since: str) -> bool:
    return _version(probe.added_in) <= _version(since)


def proxies(results: list, num_classes: int) -> list[str | None]:
    """``proxy_trigger``'s choice for every class, on these results: the suite is rebuilt around
    them and the function itself asked (registry order, first-wins ties, the edge margin)."""
    suite = ProbeSuite(results, "suspected", {}, 0.0, 0)
    chosen: list[str | None] = []
    for c in range(num_classes):
        found = proxy_trigger(suite, c, 0)
        chosen.append(None if found is None else found[0])
    return chosen


def runs_to_check(results: Path, methods: tuple[str, ...] = ("ibau",)) -> list[tuple[str, int, int]]:
    """(model, clean-set size, seed) of every row of ``methods`` with probes, CPU and GPU (the draw is
    the same)."""
    runs = set()
    for f in sorted(results.rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line) if line.strip() else {}
            if r.get("method") in methods and r.get("probes") and "n_clean" in r:
                runs.add((r["model"], int(r["n_clean"]), int(r["seed"])))
    return sorted(runs)


def check(model_dir: Path, data: Path, n: int, seed: int, since: str = "0.4.0") -> dict:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    x_te, y_te, _, _ = zoo.load_split(data, manifest["dataset"], "test")
    perm = np.random.default_rng(1000).permutation(len(y_te))
    pool = perm[: len(perm) // 2]
    chosen = np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False)
    loaded = load_model(model_dir / "model.safetensors")
    model = Normalized(loaded.module, loaded.preprocess).eval()
    num_classes = loaded.num_classes
    with tempfile.TemporaryDirectory(prefix="ibau-edge-") as tmp:
        zoo.write_folder(x_te[chosen], y_te[chosen], Path(tmp) / "clean")
        clean = load_clean_folder(Path(tmp) / "clean", loaded.preprocess, num_classes)
    split = stratified_split(clean.labels, 0.2, seed)
    x, y = clean.images[split.holdout_idx], clean.labels[split.holdout_idx]
    ctx = ProbeContext(x, y, num_classes, torch.device("cpu"), None, seed, torch.empty(0), 0, 1.0)
    ctx.clean_pred = predict(model, x, ctx)
    fixed = [PROBES.get(n) for n in PROBES.names() if isinstance(PROBES.get(n), PatternProbe)]
    everything = [p.run(model, ctx) for p in fixed if _up_to(p, since)]
    earlier = [r for r in everything if _before(r, since)]
    verdict_then, evidence_then = judge(earlier, len(y))
    verdict_now, evidence_now = judge(everything, len(y))
    proxy_then, proxy_now = proxies(earlier, num_classes), proxies(everything, num_classes)
    keys = ("suspected_class", "all_to_all_probe", "reasons")
    same = (
        verdict_then == verdict_now
        and all(evidence_then.get(k) == evidence_now.get(k) for k in keys)
        and proxy_then == proxy_now
    )
    new = [r for r in everything if not _before(r, since)]
    top = max(new, key=lambda r: max(r.per_class) if r.per_class else 0.0)
    return {
        "model": model_dir.name,
        "n_clean": n,
        "seed": seed,
        "n_holdout": len(y),
        "same_decisions": same,
        "suspected_then": evidence_then.get("suspected_class"),
        "suspected_now": evidence_now.get("suspected_class"),
        "changed_proxies": {c: [a, b] for c, (a, b) in enumerate(zip(proxy_then, proxy_now, strict=True)) if a != b},
        "strongest_new_probe": top.name,
        "its_class": top.worst_class,
        "its_share": round(max(top.per_class), 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=zoo.default_data_dir())
    ap.add_argument("--zoo", type=Path, default=HERE / "zoo-models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--since", choices=sorted(OUTPUTS), default="0.4.0", help="the version whose new probes to check")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = OUTPUTS[args.since]
    methods = ("ibau",) if args.since == "0.4.0" else ("ibau", "ibau-trigger")
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["n_clean"], r["seed"]))
    for model, n, seed in runs_to_check(HERE / "results", methods):
        if (model, n, seed) in done or not (args.zoo / model / "manifest.json").exists():
            continue
        row = check(args.zoo / model, args.data, n, seed, args.since)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
