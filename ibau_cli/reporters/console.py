"""The terminal summary (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def _pct(rate: dict | None) -> str:
    if rate is None or rate.get("value") is None:
        return "-"
    lo, hi = rate["ci95"]
    return f"{rate['value']:.1%}  [{lo:.1%}, {hi:.1%}]  n={rate['n']}"


def render_console(report: dict[str, Any], console: Console) -> None:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    inp = report["input"]
    head.add_row(
        "model",
        f"{inp['path']}  ({', '.join(dict.fromkeys([inp['format'], report['model']['architecture']]))}, "
        f"{report['model']['num_classes']} classes)",
    )
    d = report["data"]
    head.add_row(
        "clean data",
        f"{d['clean_dir']}: {d['n_images']} images -> {d['n_unlearn']} unlearning, {d['n_holdout']} held out "
        f"(classes: {report['class_mapping']['rule']})",
    )
    if report.get("trigger"):
        head.add_row("trigger", f"{report['trigger']['description']} -> class {report['trigger']['target']}")
    head.add_row("device", report["device"])
    if report.get("output"):
        out = report["output"]
        ver = report.get("verification") or {}
        head.add_row(
            "output",
            f"{out['path']} ({out['format']}; reloaded, max logit diff {ver.get('max_abs_logit_diff', float('nan')):.1e})",
        )

    figs = Table(title="held-out figures (95 % Wilson interval)", title_justify="left")
    figs.add_column("")
    figs.add_column("clean accuracy")
    figs.add_column("attack success rate")
    figs.add_row("before", _pct(report["before"]["accuracy"]), _pct(report["before"]["asr"]))
    if report.get("after"):
        figs.add_row("after", _pct(report["after"]["accuracy"]), _pct(report["after"]["asr"]))

    unlearning = report.get("unlearning") or {}
    guided = unlearning.get("guided_class")
    families = [p["family"] for p in unlearning.get("perturbations", [])]
    notes = []
    if len(families) > 1:
        notes.append("perturbations: " + " + ".join(families))
    if guided is not None:
        by = "the given trigger's class" if unlearning.get("guided_by") == "trigger" else "suspected by the probes"
        notes.append(f"guided toward class {guided}, {by}")
    known = unlearning.get("known_trigger")
    if known:
        notes.append(f"the given trigger unlearned directly, on {known['fraction']:.0%} of each batch's clean images")
    if unlearning.get("small_set"):
        notes.append("small-set schedule: shorter steps, twice the rounds")
    stop = unlearning.get("early_stop")
    if stop and stop["stopped_after_round"] is not None:
        notes.append(
            f"done after round {stop['stopped_after_round']} of {unlearning.get('rounds_planned', '?')} "
            f"(then one cool-down round): {stop['proxy_trigger']} sent at most {stop['threshold']:.0%} of "
            f"{stop['n_images']} unlearning images to class {stop['target']} for {stop['patience']} rounds"
        )
    back = unlearning.get("step_back")
    if back and back["kept_fraction"] < 1:
        notes.append(
            f"then stepped back to {back['kept_fraction']:.0%} of the way from the input weights: "
            f"{back['proxy_trigger']} sent at most {back['threshold']:.0%} of the unlearning images to class "
            f"{guided} at {back['patience']} points in a row"
        )
    title = "I-BAU rounds" + (f" ({'; '.join(notes)})" if notes else "")
    rounds = Table(title=title, title_justify="left")
    columns = ["round", "|delta|2", "delta fools", "outer loss", "steps", "held-out acc", "held-out ASR", "time"]
    if stop:
        columns.insert(7, f"{stop['proxy_trigger']} -> {stop['target']}")
    for col in columns:
        rounds.add_column(col, justify="right")
    for i, r in enumerate(report.get("rounds", [])):
        proxy = []
        if stop:
            proxy = [f"{stop['rates'][i]:.0%}" if i < len(stop["rates"]) else "-"]
        rounds.add_row(
            str(r["round"]),
            f"{r['delta_l2']:.2f}",
            f"{r['delta_fooling_rate']:.0%}",
            f"{r['outer_loss']:.3f}",
            str(r["outer_steps"]),
            "-" if r["holdout_accuracy"] is None else f"{r['holdout_accuracy']:.1%}",
            "-" if r["holdout_asr"] is None else f"{r['holdout_asr']:.1%}",
            *proxy,
            f"{r['seconds']:.1f}s",
        )

    probes = None
    if report.get("probes"):
        probes = Table(title="trigger probes (held-out images)", title_justify="left")
        for col in ("", "verdict", "suspected class", "worst probe", "flip rate", "mask anomaly index"):
            probes.add_column(col)
        for stage in ("before", "after"):
            suite = report["probes"].get(stage)
            if not suite:
                continue
            ev = suite["evidence"]
            ai = ev.get("anomaly_index")
            probes.add_row(
                stage if report["command"] == "sanitize" else "scan",
                suite["verdict"].replace("_", " "),
                "-" if ev.get("suspected_class") is None else str(ev["suspected_class"]),
                f"{suite['worst_probe']} -> {suite['worst_class']}",
                _pct(suite["worst_flip_rate"]),
                "-" if ai is None else f"{ai:.1f}",
            )
        reasons = [
            Text(f"{stage}: {reason}", style="dim")
            for stage in ("before", "after")
            for reason in ((report["probes"].get(stage) or {}).get("evidence", {}).get("reasons", []))
        ]

    timing = "  ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())
    gates = Table.grid(padding=(0, 2))
    style = {"pass": "green", "fail": "bold red", "not_evaluated": "yellow"}
    for g in report["gates"]:
        value = "-" if g["value"] is None else f"{g['value']:.1%}"
        limit = "" if g["limit"] is None else f" (limit {g['limit']:.1%})"
        # a gate with neither a value nor a limit (the probe verdict) is named by its detail alone
        measured = g["name"] if g["value"] is None and g["limit"] is None else f"{g['name']}: {value}{limit}"
        gates.add_row(
            Text(g["status"].replace("_", " ").upper(), style=style[g["status"]]),
            f"{measured} - {g['detail']}",
        )
    verdict = report["verdict"].upper()
    parts: list[Any] = [head, Text(""), figs]
    if report.get("rounds"):
        parts += [Text(""), rounds]
    if probes is not None:
        parts += [Text(""), probes, *reasons]
    parts += [Text(""), Text(f"time: {timing}", style="dim"), Text(""), gates]
    for w in report.get("warnings", []):
        parts.append(Text(f"warning: {w}", style="yellow"))
    console.print(
        Panel(
            Group(*parts),
            title=f"ibau {report['command']}",
            subtitle=Text(f"verdict: {verdict}", style="bold green" if verdict == "PASS" else "bold red"),
        )
    )
