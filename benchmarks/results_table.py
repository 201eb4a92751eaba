#!/usr/bin/env python
"""Turn benchmarks/results/*.jsonl (written by efficacy.py) into benchmarks/RESULTS.md."""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
from collections import defaultdict
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jsonl import read_rows, row_version  # noqa: E402  (benchmarks/jsonl.py)


# Earlier versions whose runs took the current version's code path, and which of their runs: 0.3.1
# changed how a warp step's implicit term is estimated and added the small-set schedule (additive-only
# inner problem on at most 160 unlearning images at the default batch and step counts), so a 0.3.0
# run with neither is a 0.3.1 run. Such rows join the current tables, marked, unless a current row
# has the same key.
def _families(r: dict) -> list[str]:
    return r.get("perturbations") or ["additive"]


def _row_small_set(r: dict, **override) -> bool:
    """Whether the small-set schedule applies to a row's run, by the row's recorded unlearn config
    (keys this version no longer knows are dropped) with ``override`` on top."""
    from dataclasses import fields

    from ibau_cli.config import UnlearnConfig

    known = {f.name for f in fields(UnlearnConfig)}
    config = UnlearnConfig(**{**{k: v for k, v in r.get("unlearn_config", {}).items() if k in known}, **override})
    return config.resolved_small_set(r["n_unlearn"], len(_families(r)))


def _same_path_as_0_3_1(r: dict) -> bool:
    return "warp" not in _families(r) and not _row_small_set(r, small_set="auto")


def _same_path_as_0_3_2(r: dict) -> bool:
    """0.3.2 changed nothing on a CPU unless ``unlearn.amp = "bf16"`` is asked for (the synthesised
    probes now follow the autocast setting, and bf16 works on a CPU): every 0.3.1 row is CPU, fp32."""
    return r.get("unlearn_config", {}).get("amp", "auto") != "bf16"


def _same_path_as_0_3_3(r: dict) -> bool:
    """0.3.3 added the early stop, which by default (``early_stop = "auto"``) can only act on a guided
    repair (``guided_class`` set, with the probes on) on the small-set schedule: every other run took
    0.3.3's path."""
    early_stop = r.get("unlearn_config", {}).get("early_stop", "auto")
    return r.get("guided_class") is None or early_stop == "off" or not _row_small_set(r, small_set="auto")


SAME_PATH = {
    "0.3.1": {"0.3.0": _same_path_as_0_3_1},
    # newest first: a 0.3.1 row wins over a 0.3.0 row of the same run
    "0.3.2": {"0.3.1": _same_path_as_0_3_2, "0.3.0": _same_path_as_0_3_1},
    "0.3.3": {
        "0.3.2": _same_path_as_0_3_3,
        "0.3.1": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_2(r),
        "0.3.0": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_1(r),
    },
    # 0.3.4 fixed two CUDA failures: the warp is sampled with gathers (equal to grid_sample within
    # 2e-7, and twice differentiable on a GPU) and runtime comparisons run without TF32. Every 0.3.3
    # run takes its code path (no 0.3.3 GPU run used the warp: it failed there).
    "0.3.4": {
        "0.3.3": lambda r: True,
        "0.3.2": _same_path_as_0_3_3,
        "0.3.1": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_2(r),
        "0.3.0": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_1(r),
    },
    # 0.3.5 changed input checks and the all-to-all rule of the verdict, which names no class, so
    # never guides the unlearning: every 0.3.4 run takes its code path (its recorded probe verdict
    # may differ at 100 images).
    "0.3.5": {
        "0.3.4": lambda r: True,
        "0.3.3": lambda r: True,
        "0.3.2": _same_path_as_0_3_3,
        "0.3.1": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_2(r),
        "0.3.0": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_1(r),
    },
    # 0.3.6 writes each class's probe loss as a weighted sum (so that CUDA can batch classes) and
    # exports .pt2 programs from the CPU: the same triggers up to rounding (the six 500-image scans of
    # 0.3.5 in results/probes.jsonl rerun with 0.3.6: every verdict, class, flip rate and worst probe
    # unchanged, anomaly indices within 0.004), so every 0.3.5 run takes its code path.
    "0.3.6": {
        "0.3.5": lambda r: True,
        "0.3.4": lambda r: True,
        "0.3.3": lambda r: True,
        "0.3.2": _same_path_as_0_3_3,
        "0.3.1": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_2(r),
        "0.3.0": lambda r: _same_path_as_0_3_3(r) and _same_path_as_0_3_1(r),
    },
}
# 0.3.7 freezes the weights' requires_grad while the probes and the inner maximisation take
# gradients with respect to their triggers (autograd skips the weights' gradients; the triggers'
# gradients are the same): a 500-image scan and a 1,000-image sanitize of the GTSRB zoo gave the same
# figures, probe by probe, as 0.3.6; ONNX graphs ending in a Softmax are new input (none in the zoo).
SAME_PATH["0.3.7"] = {"0.3.6": lambda r: True, **SAME_PATH["0.3.6"]}
# 0.3.8 adds the patch family to a guided repair when the fixed probe that named the class is a patch:
# the zoo's patch-trigger models (BadNets, the Trojan square, the watermark) repaired with guidance
# take a new path; every other run (unguided, the baselines, the other triggers) is 0.3.7's.
PATCH_ATTACKS = ("badnets", "trojan-square", "watermark")


def _same_path_as_0_3_8(r: dict) -> bool:
    return r.get("guided_class") is None or r.get("attack") not in PATCH_ATTACKS


SAME_PATH["0.3.8"] = {
    v: (lambda r, same=same: _same_path_as_0_3_8(r) and same(r))
    for v, same in {"0.3.7": lambda r: True, **SAME_PATH["0.3.7"]}.items()
}


# 0.3.9 runs a guided repair's schedule once more when the fixed probe that named the class still
# sends more than a tenth of the unlearning images there after it (unlearn.extend). An earlier run
# took 0.3.9's path when no such check could have happened: a baseline, an unguided repair, one the
# early stop ended, or an additive-only repair on the small-set schedule with no early stop recorded
# (no fixed probe named the class, so no proxy trigger). The others are rerun or listed as earlier.
def _same_path_as_0_3_9(r: dict) -> bool:
    if r.get("method") != "ibau" or r.get("guided_class") is None:
        return True
    stop = r.get("early_stop")
    if stop is not None:
        return stop.get("stopped_after_round") is not None
    families = [p.get("family") if isinstance(p, dict) else p for p in r.get("perturbations") or []]
    from ibau_cli.config import UnlearnConfig  # noqa: PLC0415  (imported where used, as main imports ibau_cli)

    return "warp" not in families and UnlearnConfig().resolved_small_set(r.get("n_unlearn", 10**9), 1)


SAME_PATH["0.3.9"] = {
    v: (lambda r, same=same: _same_path_as_0_3_9(r) and same(r))
    for v, same in {"0.3.8": lambda r: True, **SAME_PATH["0.3.8"]}.items()
}


# 0.4.0 added fixed patch probes halfway along each edge. They change a repair only through the
# probes' decisions before it (the suspected class and its evidence, the proxy trigger);
# benchmarks/edge_probe_check.py rebuilt every ibau + probes run's held-out draw and compared those
# decisions with and without the new places (results/edge-probe-check.jsonl; the draw does not depend
# on the device, and GPU runs were checked on the CPU). Where they are the same, and for every run
# without probes, the earlier run took 0.4.0's path.
@functools.cache
def _replayed(name: str) -> dict[tuple[str, int, int], tuple[bool, float]]:
    """A probe replay's rows (``edge_probe_check.py``): (model, clean-set size, seed) -> whether the
    probes' decisions were the same without the new probes, and the strongest new probe's share."""
    path = Path(__file__).resolve().parent / "results" / name
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["model"], r["n_clean"], r["seed"]): (r["same_decisions"], r["its_share"]) for r in rows}


GPU_MARGIN = 0.4  # a GPU row (bf16 probes) also needs every new probe well under 0.5 in the fp32 replay


def _decisions_unchanged(r: dict, replay: str, methods: tuple[str, ...]) -> bool:
    """Whether the new probes a replay checked leave this run's path as it was: runs of other
    methods, or without probes, always; the others where the replay found the same decisions."""
    if r.get("method") not in methods or not r.get("probes"):
        return True
    same, share = _replayed(replay).get((r["model"], int(r["n_clean"]), int(r["seed"])), (False, 1.0))
    return same and (r.get("device", "cpu") == "cpu" or share < GPU_MARGIN)


def _same_path_as_0_4_0(r: dict) -> bool:
    return _decisions_unchanged(r, "edge-probe-check.jsonl", ("ibau",))


SAME_PATH["0.4.0"] = {
    v: (lambda r, same=same: _same_path_as_0_4_0(r) and same(r))
    for v, same in {"0.3.9": lambda r: True, **SAME_PATH["0.3.9"]}.items()
}

# 0.4.1 changed a repair only where the user gives a --trigger that works (it is then also unlearned
# directly, and guides the repair when the probes suspect nothing): no earlier efficacy run gave one.
SAME_PATH["0.4.1"] = {"0.4.0": lambda r: r.get("method") != "ibau-trigger", **SAME_PATH["0.4.0"]}


# 0.4.2 added fixed frame probes (a border 1 or 2 pixels wide, white or black). As for 0.4.0's
# mid-edge patches, `edge_probe_check.py --since 0.4.2` rebuilt every probe run's held-out draw and
# compared the probes' decisions with and without them (results/frame-probe-check.jsonl); where they
# are the same, and for every run without probes, the earlier run took 0.4.2's path.
def _same_path_as_0_4_2(r: dict) -> bool:
    return _decisions_unchanged(r, "frame-probe-check.jsonl", ("ibau", "ibau-trigger"))


SAME_PATH["0.4.2"] = {
    v: (lambda r, same=same: _same_path_as_0_4_2(r) and same(r))
    for v, same in {"0.4.1": lambda r: True, **SAME_PATH["0.4.1"]}.items()
}


# 0.4.3 steps a guided repair's weights back toward the input's while its proxy trigger stays gone
# (unlearn.step_back, by default on the small-set schedule only), which is where the early stop watches
# the same trigger: an earlier run whose report recorded an early stop, on the small-set schedule, takes
# a new path; every other run (larger sets, unguided repairs, no proxy, the baselines) is 0.4.2's.
def _same_path_as_0_4_3(r: dict) -> bool:
    if r.get("method") not in ("ibau", "ibau-trigger") or r.get("early_stop") is None:
        return True
    return not _row_small_set(r)


SAME_PATH["0.4.3"] = {
    v: (lambda r, same=same: _same_path_as_0_4_3(r) and same(r))
    for v, same in {"0.4.2": lambda r: True, **SAME_PATH["0.4.2"]}.items()
}


# 0.4.4 changed the probes' verdict only where no class guides the repair (three families agreeing make it
# inconclusive, which guides nothing; the all-to-all rule names no class) and the gates' warnings: every
# 0.4.3 run takes its code path.
SAME_PATH["0.4.4"] = {"0.4.3": lambda r: True, **SAME_PATH["0.4.3"]}
# 0.4.5 reads an input shape nothing declares from the model and the clean images (every zoo model
# declares it in its metadata) and changes the probes' verdict after the repair only (a class named
# only then is inconclusive): the repair itself is 0.4.4's.
SAME_PATH["0.4.5"] = {"0.4.4": lambda r: True, **SAME_PATH["0.4.4"]}
# 0.4.6 reads more ONNX operators, no longer refuses a scripted nn.MultiheadAttention, and changes a
# warning and ibau inspect: no repair or probe of a zoo model changes.
SAME_PATH["0.4.6"] = {"0.4.5": lambda r: True, **SAME_PATH["0.4.5"]}


def round_over_epoch(r: dict) -> float:
    """One round's time over one plain epoch. Rows written before efficacy.py recorded ``rounds_run``
    divided by the configured rounds, which the small-set schedule doubles: those are corrected here."""
    from ibau_cli.config import SMALL_SET_ROUNDS

    if "rounds_run" in r or "small_set" not in r.get("unlearn_config", {}):
        return r["round_over_epoch"]
    return r["round_over_epoch"] / SMALL_SET_ROUNDS if _row_small_set(r) else r["round_over_epoch"]


def _run_key(r: dict) -> tuple:
    return (
        r["model"],
        r["n_clean"],
        r["method"],
        bool(r.get("probes")),
        json.dumps(r.get("extra_config", {}), sort_keys=True),
        r["seed"],
    )


def current_rows(rows: list[dict], version: str) -> list[dict]:
    """The rows of ``version``, plus the earlier rows that took the same code path (``carried_from``
    set to their version) where ``version`` has no row for the same run."""
    current = [r for r in rows if row_version(r) == version]
    done = {_run_key(r) for r in current}
    for older, same in SAME_PATH.get(version, {}).items():
        for r in rows:
            if row_version(r) == older and same(r) and _run_key(r) not in done:
                current.append({**r, "carried_from": older})
                done.add(_run_key(r))
    return current


def _efficacy_rows() -> list[dict]:
    rows = []
    for path in sorted((HERE / "results").glob("*.jsonl")):
        if (
            path.name in ("probes.jsonl", "speed.jsonl")
            or path.name.endswith("-probe-check.jsonl")
            or path.name.startswith("probes-")
        ):
            continue
        rows += read_rows(path)
    return rows


def _gpu_efficacy_rows() -> list[dict]:
    rows = []
    for path in sorted((HERE / "results" / "gpu").glob("*.jsonl")):
        rows += read_rows(path)
    return rows


def _gpu_section(version: str) -> list[str]:
    """Efficacy rows measured on a GPU (``efficacy.py --device cuda``), kept apart from the CPU tables:
    there the repair's forward passes run under bf16 autocast."""
    every = _gpu_efficacy_rows()
    rows = current_rows(every, version)
    if not rows:
        return []
    earlier = []  # GPU runs of an earlier version that did not take this version's code path
    for older in sorted({row_version(r) for r in every} - {version}):
        same = SAME_PATH.get(version, {}).get(older, lambda r: False)
        left = [r for r in every if row_version(r) == older and not same(r)]
        if left:
            earlier += ["", f"### Earlier defaults on a GPU (ibau {older}), not on {version}'s code path", ""]
            earlier += _efficacy_table(left)
    devices = sorted({r.get("device", "cuda") for r in rows})
    torches = sorted({r["torch"] for r in rows})
    amps = sorted({str(r.get("amp")) for r in rows})
    return [
        "",
        f"## Efficacy on a GPU (ibau {version})",
        "",
        f"Device: {', '.join(devices)}; torch {', '.join(torches)}; autocast {', '.join(amps)} (the default on a",
        "GPU: the inner problem, the probes and the forward-only work in bf16, the outer step and its implicit",
        "hypergradient in fp32). Same protocol as above (the same permutation, clean sets and evaluation half),",
        "`efficacy.py --device cuda`; the evaluation itself runs in fp32.",
        *_both_tables(rows),
        *earlier,
    ]


def _both_tables(rows: list[dict]) -> list[str]:
    return [
        "",
        "### Against the targets (default settings, worst seed per model)",
        "",
        *_targets_table(rows),
        *_clean_table(rows),
        "",
        "### Every run",
        "",
        *_efficacy_table(rows),
    ]


def _speed_rows() -> list[dict]:
    return read_rows(HERE / "results" / "speed.jsonl")


def _class_batch_section() -> list[str]:
    """``benchmarks/probe_batch_speed.py``: the class-wise synthesised probes, one class at a time
    against several per batch (``probes.class_batch``), the faster repeat of each."""
    rows = read_rows(HERE / "results" / "probes-class-batch.jsonl")
    if not rows:
        return []
    out = [
        "",
        "## Probe class batching (`benchmarks/probe_batch_speed.py`)",
        "",
        "The two class-wise synthesised probes (mask-pattern and universal perturbation: one optimisation",
        "per class) fitted one class at a time, or several classes per step (`probes.class_batch`; unset:",
        "1 on a CPU, 16 classes of 64 32x32 images on CUDA), through the real scan (default settings",
        "otherwise) in one process, after a warm-up scan; the faster repeat of each. The ratio is the",
        "one-class-at-a-time time over the batched one. The same triggers are fitted either way (the images",
        "are drawn up front in one order; a test holds the per-class figures equal on a CPU).",
        "",
        "| model | device | torch | ibau | N | class batch | repeats | class-wise probes s | all probes s | speed-up | verdict (class) | anomaly index |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(
            (r["model"], r["device_name"], r["torch"], row_version(r), r["n"], r["class_batch"]), []
        ).append(r)
    for key in sorted(groups, key=lambda k: (k[1], k[0], k[2], k[3], k[4], k[5] != "1", k[5])):
        model, device, torch_version, version, n, cb = key
        best = min(groups[key], key=lambda r: r["classwise_seconds"])
        one = groups.get((model, device, torch_version, version, n, "1"))
        ratio = (
            "-"
            if cb == "1" or not one
            else f"{min(r['classwise_seconds'] for r in one) / best['classwise_seconds']:.2f}x"
        )
        label = f"{cb} ({best['resolved_class_batch']})" if cb == "auto" else cb
        out.append(
            f"| {model} | {device} | {torch_version} | {version} | {n} | {label} | {len(groups[key])} | "
            f"{best['classwise_seconds']:.2f} | {best['probe_seconds']:.2f} | {ratio} | "
            f"{best['verdict']} ({best['suspected_class']}) | {best['anomaly_index']:.2f} |"
        )
    return out


def _efficacy_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        method = r["method"] + (" + probes" if r.get("probes") else "")
        groups[(r["model"], r["n_clean"], method, json.dumps(r.get("extra_config", {}), sort_keys=True))].append(r)
    order = {"ibau + probes": 0, "ibau-trigger + probes": 1, "ibau": 2, "no-implicit": 3, "finetune": 4}
    out = [
        "| model | eval images | clean images (unlearning) | method | seeds | guided (class) | acc before | acc after mean / worst | ASR before | ASR after mean / worst | unlearn s (mean) | round/epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in sorted(groups, key=lambda k: (k[0], -k[1], order.get(k[2], 9), k[3])):
        g = groups[key]
        model, n, method, extra = key
        accs = [r["acc_after"] for r in g]
        asrs = [r["asr_after"] for r in g if r["asr_after"] is not None]
        asr_before = "-" if g[0]["asr_before"] is None else f"{g[0]['asr_before']:.1%}"
        asr_after = f"{statistics.mean(asrs):.1%} / {max(asrs):.1%}" if asrs else "- (clean model)"
        label = method + ("" if extra == "{}" else f" {extra}")
        carried = sum("carried_from" in r for r in g)
        seeds = f"{len(g)}" + (f" ({carried} by {g[0].get('carried_from') or 'an earlier version'})" if carried else "")
        out.append(
            f"| {model} | {g[0].get('n_eval', '?')} | {n} ({g[0]['n_unlearn']}) | {label} | {seeds} | {_guided(g)} | {g[0]['acc_before']:.1%} | "
            f"{statistics.mean(accs):.1%} / {min(accs):.1%} | {asr_before} | "
            f"{asr_after} | {statistics.mean(r['unlearn_seconds'] for r in g):.0f} | "
            f"{statistics.mean(round_over_epoch(r) for r in g):.1f} |"
        )
    return out


def _guided(g: list[dict]) -> str:
    if not any("guided_class" in r for r in g):
        return "-"
    classes = sorted({r["guided_class"] for r in g if r.get("guided_class") is not None})
    k = sum(r.get("guided_class") is not None for r in g)
    warp = sum("warp" in (r.get("perturbations") or []) for r in g)
    stopped = [r for r in g if (r.get("early_stop") or {}).get("stopped_after_round") is not None]
    rounds = statistics.mean(r["rounds_run"] for r in stopped) if stopped else 0
    return (
        f"{k} of {len(g)}"
        + (f" ({', '.join(map(str, classes))})" if classes else "")
        + (f"; warp in {warp}" if warp else "")
        + (f"; early stop in {len(stopped)}, {rounds:.1f} rounds" if stopped else "")
    )


def _clean_table(rows: list[dict]) -> list[str]:
    """What `ibau sanitize` (default settings, probes on) costs a model with no backdoor: most models
    an intake pipeline sees. Empty when no clean model was run."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] == "ibau" and r["attack"] == "clean" and not r.get("extra_config") and r.get("probes"):
            by[(r["model"].split("-")[0], r["n_clean"])].append(r)
    if not by:
        return []
    out = [
        "",
        "### Clean models (no backdoor): what the default repair costs",
        "",
        "| data | clean images | models | runs | guided (runs) | accuracy drop, mean | worst drop |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data, n in sorted(by, key=lambda k: (k[0], -k[1])):
        g = by[(data, n)]
        drops = [r["acc_before"] - r["acc_after"] for r in g]
        worst = max(g, key=lambda r: r["acc_before"] - r["acc_after"])
        guided = sum(r.get("guided_class") is not None for r in g)
        out.append(
            f"| {data} | {n} | {len({r['model'] for r in g})} | {len(g)} | {guided} | "
            f"{100 * statistics.mean(drops):.1f} pts | {100 * max(drops):.1f} pts ({worst['model']}, seed {worst['seed']}) |"
        )
    return out


def _targets_table(rows: list[dict]) -> list[str]:
    """Per clean-set size, the default ibau runs against the issue's targets (worst seed per model):
    as the CLI runs by default, so with the probes where such rows exist."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    with_probes = any(r.get("probes") for r in rows if r["method"] == "ibau")
    for r in rows:
        if (
            r["method"] == "ibau"
            and r["attack"] != "clean"
            and not r.get("extra_config")
            and bool(r.get("probes")) == with_probes
        ):
            by[(r["model"].split("-")[0], r["n_clean"], r["model"])].append(r)
    out = [
        "| data | clean images | models | seeds | ASR after, worst seed: models <= 2 % (all-to-all <= 5 %) | worst ASR | accuracy drop, worst seed: models <= 1 pt / <= 3 pts | mean drop | worst drop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data, n in sorted({k[:2] for k in by}, key=lambda k: (k[0], -k[1])):
        models = sorted(m for (d, size, m) in by if size == n and d == data)
        worst_asr, worst_drop, ok_asr, ok1, ok3, mean_drop = [], [], 0, 0, 0, []
        for m in models:
            g = by[(data, n, m)]
            asr = max(r["asr_after"] for r in g)
            drop = max(r["acc_before"] - r["acc_after"] for r in g)
            limit = 0.05 if g[0]["attack"] == "all2all" else 0.02
            ok_asr += asr <= limit
            ok1 += drop <= 0.01
            ok3 += drop <= 0.03
            worst_asr.append((asr, m))
            worst_drop.append((drop, m))
            mean_drop += [r["acc_before"] - r["acc_after"] for r in g]
        a, am = max(worst_asr)
        d, dm = max(worst_drop)
        seeds = sorted({len(by[(data, n, m)]) for m in models})
        out.append(
            f"| {data} | {n} | {len(models)} | {'/'.join(map(str, seeds))} | {ok_asr} of {len(models)} | {a:.1%} ({am}) | "
            f"{ok1} / {ok3} of {len(models)} | {100 * statistics.mean(mean_drop):.1f} pts | {100 * d:.1f} pts ({dm}) |"
        )
    return out


def main() -> int:
    from ibau_cli import __version__

    rows = _efficacy_rows()
    current = current_rows(rows, __version__)
    older = sorted({row_version(r) for r in rows} - {__version__})
    carried = list(SAME_PATH.get(__version__, {}))
    carried_note = (
        [
            f"Runs marked `(k by V)` under `seeds` were made by an earlier ibau V ({', '.join(carried)}), which ran"
            f" them on the code path of {__version__} (the rule is `SAME_PATH` in `benchmarks/results_table.py`)."
        ]
        if carried
        else []
    )
    out = [
        "# Benchmark results",
        "",
        f"Generated by `benchmarks/results_table.py` on {date.today()} from `benchmarks/results/*.jsonl`;",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch {rows[0]['torch'] if rows else '?'}.",
        "Probe (scan) results: [PROBES.md](PROBES.md).",
        "",
        f"## Efficacy (ibau {__version__})",
        "",
        "Each model's test split is permuted once (seed 1000): the clean sets are drawn from the first half,",
        "accuracy and ASR are measured on the second half (`eval` images; ASR on the triggered ones whose",
        "label is not the target, or for all2all not label + 1), which no run ever uses for unlearning.",
        "ibau holds out 20 % of each clean set for its own report. Methods: `ibau + probes` (what",
        "`ibau sanitize` does by default: probes on the held-out part before and after, the unlearning",
        "guided toward the class they suspect; `guided` says in how many seeds and toward which class, and",
        "in how many the early stop ended the repair, after how many rounds on average),",
        "`ibau-trigger + probes` (the same given the model's own trigger, as `sanitize --trigger --target`:",
        "since 0.4.1 a trigger that works is also unlearned directly and guides the repair when the probes",
        "suspect nothing, so its ASR is measured with a trigger the repair was shown; not in the targets",
        "table), `ibau` (the same without the probes, so never guided),",
        "`no-implicit` (the same loop with the implicit hypergradient off), `finetune` (the same loop with",
        "the perturbation forced to zero: plain fine-tuning with the same optimiser and steps).",
        "`round/epoch` is one I-BAU round's time over one plain fine-tuning epoch on the same unlearning",
        "images, timed in the same process; seconds were measured on a shared 2-core machine running other",
        "jobs: compare the ratios, not the seconds. With 100 clean images a round takes at least",
        "`min_steps_per_round` (10) steps while a plain epoch over 80 images is 2 batches, hence the ratio.",
        "A round is the rounds that ran: runs on the small-set schedule (twice the configured rounds) written",
        "before `efficacy.py` recorded `rounds_run` are divided by the rounds that ran, not the configured ones.",
        *carried_note,
        *_both_tables(current),
    ]
    for version in older:
        old = [r for r in rows if row_version(r) == version]
        same = SAME_PATH.get(__version__, {}).get(version)
        if same is not None and all(same(r) for r in old):
            continue  # every run of that version is in the current tables already
        out += [
            "",
            f"## Earlier defaults (ibau {version}), kept for comparison",
            "",
            *_targets_table(old),
            "",
            *_efficacy_table(old),
        ]
    out += _gpu_section(__version__)
    speed = _speed_rows()
    if speed:
        out += [
            "",
            "## Speed and memory (`benchmarks/speed.py`)",
            "",
            "One I-BAU round (default settings) against one plain fine-tuning epoch (SGD, batch 64) over the",
            "same N clean images, from the same weights, interleaved twice in one process (the faster of each);",
            "peak memory of a child process doing only that work (CPU: resident set growth; CUDA: allocated).",
            "",
            "A guided round (the backdoor's class given, as when the probes suspect it) adds a targeted inner",
            "maximisation; a warp round (guided, with the warp family, as when a warp probe fires) adds two more",
            "inner problems and perturbs half of every warp step's batch; a patch round (0.3.8: guided, with the",
            "patch family in a corner region, as when a corner-patch probe named the class) adds one more inner",
            "problem of 30 steps; all are measured in the same interleaving.",
            "",
            "The `cuda` rows (torch 2.11, bf16 autocast, the data on the CPU and moved a batch at a time as",
            "ibau moves it): the H100 rows say 0.3.3 but ran with 0.3.4's warp sampler in the tree: with 0.3.3's",
            "the warp round fails on CUDA (no derivative for grid_sampler's backward); the H200 rows are 0.3.5",
            "and 0.3.8 (another card and other versions: compare each with the CPU rows, not the H100's). On a GPU these",
            "small models are bound by kernel launches, not arithmetic: an I-BAU step issues several times the kernels of a",
            "plain step (the inner gradient, its double backward for the Neumann terms), hence ratios above",
            "the CPU's.",
            "",
            "| model | ibau | device | threads | N | epoch s | round s | round / epoch | guided round / epoch | warp round / epoch | patch round / epoch | peak MiB epoch / round |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in sorted(speed, key=lambda r: (r["device"], r["model"], r["n"], row_version(r))):
            guided = r.get("guided_round_over_epoch")
            warp = r.get("warp_round_over_epoch")
            patch = r.get("patch_round_over_epoch")
            out.append(
                f"| {r['model']} | {row_version(r)} | {r['device']} ({r['device_name']}) | {r['threads']} | {r['n']} | "
                f"{r['epoch_seconds']:.2f} | {r['round_seconds']:.2f} | {r['round_over_epoch']:.2f} | "
                f"{'-' if guided is None else f'{guided:.2f}'} | {'-' if warp is None else f'{warp:.2f}'} | "
                f"{'-' if patch is None else f'{patch:.2f}'} | {r['epoch_peak_mib']:.0f} / {r['round_peak_mib']:.0f} |"
            )
    out += _class_batch_section()
    out += [
        "",
        "## Reproduce (from the repository root)",
        "",
        "```bash",
        "python benchmarks/zoo_plan.py                       # trains the zoo (resumable), ~/.cache/ibau-zoo",
        "# `ibau + probes` rows (the CLI's default) need --probes; rows without it are `ibau`",
        "python benchmarks/efficacy.py --model-dir ~/.cache/ibau-zoo/cifar10-smallvgg-badnets \\",
        "    --n-clean 5000 100 --seeds 0 1 2 --methods ibau no-implicit finetune --probes --threads 1",
        "for attack in badnets badnets-p20 sig blend invisible trojan-square watermark wanet all2all; do",
        "  python benchmarks/efficacy.py --model-dir ~/.cache/ibau-zoo/gtsrb-smallcnn-$attack \\",
        "      --n-clean 2500 500 100 --seeds 0 1 2 --methods ibau no-implicit finetune --probes --threads 1",
        "done",
        "# clean models (the 'Clean models' table): the committed ones, ibau with probes only",
        "for m in gtsrb-smallcnn-clean-s0 gtsrb-smallcnn-clean-s1 gtsrb-smallcnn-clean-s2; do",
        "  python benchmarks/efficacy.py --model-dir benchmarks/zoo-models/$m \\",
        "      --n-clean 2500 500 100 --seeds 0 1 2 --methods ibau --probes --threads 1",
        "done",
        "python benchmarks/efficacy.py --model-dir benchmarks/zoo-models/cifar10-smallcnn-clean-s0 \\",
        "    --n-clean 5000 500 100 --seeds 0 1 2 --methods ibau --probes --threads 2",
        "# PreAct-ResNet-18, CPU recipe (bf16 training, 36 min on 2 threads), then its 100-image rows",
        "python benchmarks/zoo_plan.py --resnet-cpu --only preactresnet18-badnets-cpu --threads 2",
        "python benchmarks/efficacy.py --model-dir ~/.cache/ibau-zoo/cifar10-preactresnet18-badnets-cpu \\",
        "    --n-clean 100 --seeds 0 1 2 --methods ibau no-implicit finetune --probes --threads 2",
        "python benchmarks/efficacy.py --model-dir ~/.cache/ibau-zoo/cifar10-preactresnet18-badnets-cpu \\",
        "    --n-clean 500 --seeds 0 1 2 --methods ibau no-implicit --threads 2   # its 500-image rows (no probes)",
        "python benchmarks/speed.py --n 2500 --threads 1",
        "# on a GPU: the full-size GTSRB PreAct-ResNet-18 (about 50 s to train on one H100), its rows, the speed rows",
        "python benchmarks/zoo_plan.py --gpu-recipes --only gtsrb-preactresnet18-badnets --threads 8",
        "python benchmarks/efficacy.py --device cuda --threads 8 --model-dir ~/.cache/ibau-zoo/gtsrb-preactresnet18-badnets \\",
        "    --n-clean 2500 100 --seeds 0 1 2 --methods ibau --probes",
        "python benchmarks/efficacy.py --device cuda --threads 8 --model-dir ~/.cache/ibau-zoo/gtsrb-preactresnet18-badnets \\",
        "    --n-clean 2500 --seeds 0 1 2 --methods no-implicit finetune",
        "python benchmarks/speed.py --zoo benchmarks/zoo-models --only cifar10-smallvgg-badnets --device cuda --n 2500 --threads 8",
        "# the committed small models on a GPU (0.3.8 rows: one H200)",
        "python benchmarks/efficacy.py --device cuda --threads 8 --model-dir benchmarks/zoo-models/gtsrb-smallcnn-badnets \\",
        "    --n-clean 2500 500 100 --seeds 0 1 2 --methods ibau --probes",
        "python benchmarks/efficacy.py --device cuda --threads 8 --model-dir benchmarks/zoo-models/cifar10-smallvgg-badnets \\",
        "    --n-clean 100 --seeds 0 1 2 --methods ibau --probes",
        "python benchmarks/speed.py --zoo benchmarks/zoo-models --only gtsrb-smallcnn-badnets --device cuda --n 2500 --threads 8",
        "# probe class batching (the committed models; on a CPU: --device cpu --threads 2 --n 300 --batches 1 10 --repeats 1)",
        "python benchmarks/probe_batch_speed.py --device cuda --only gtsrb-smallcnn-badnets cifar10-smallvgg-badnets \\",
        "    --n 1000 --repeats 2 --batches 1 auto 64",
        "# rows with extra settings: the same command with --set SECTION.KEY=VALUE (shown in the method column)",
        "python benchmarks/results_table.py",
        "```",
        "",
    ]
    (HERE / "RESULTS.md").write_text("\n".join(out))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
