"""One self-contained HTML file: figures, gates, probes, and the images embedded as data URIs."""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}
th{background:#f5f5f5}.pass{color:#17803d;font-weight:600}.fail{color:#b42318;font-weight:600}
.not_evaluated{color:#777}.verdict{font-size:1.3em;padding:.4em .8em;border-radius:6px;display:inline-block}
.verdict.pass{background:#e6f4ea}.verdict.fail{background:#fde8e7}figure{display:inline-block;margin:.5em}
figure img{image-rendering:pixelated;border:1px solid #ccc;max-width:100%}figcaption{font-size:.85em;color:#555}
code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.8em;overflow:auto}
"""


def _pct(rate: dict | None) -> str:
    if not rate or rate.get("value") is None:
        return "-"
    lo, hi = rate["ci95"]
    return f"{rate['value']:.1%} <small>[{lo:.1%}, {hi:.1%}] n={rate['n']}</small>"


def _row(*cells: str, head: bool = False) -> str:
    tag = "th" if head else "td"
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _figures(report: dict[str, Any]) -> str:
    before, after = report["before"], report.get("after")
    rows = [_row("", "before", "after" if after else "", head=True)]
    rows.append(_row("clean accuracy", _pct(before["accuracy"]), _pct(after["accuracy"]) if after else ""))
    if before.get("asr") is not None:
        rows.append(_row("true-trigger ASR", _pct(before["asr"]), _pct(after["asr"]) if after else ""))
    probes = report.get("probes") or {}
    pb, pa = probes.get("before"), probes.get("after")
    if pb:
        cell = lambda s: f"{escape(s['worst_probe'])} &rarr; {s['worst_class']}: {_pct(s['worst_flip_rate'])}"  # noqa: E731
        rows.append(_row("strongest probe", cell(pb), cell(pa) if pa else ""))
        verdict = lambda s: escape(s["verdict"].replace("_", " "))  # noqa: E731
        rows.append(_row("probe verdict", verdict(pb), verdict(pa) if pa else ""))
    return "<table>" + "".join(rows) + "</table>"


def _gates(report: dict[str, Any]) -> str:
    rows = [_row("gate", "status", "value", "limit", "detail", head=True)]
    for g in report["gates"]:
        v = "-" if g["value"] is None else f"{g['value']:.1%}"
        lim = "-" if g["limit"] is None else f"{g['limit']:.1%}"
        status = f'<span class="{escape(g["status"])}">{escape(g["status"].upper())}</span>'
        rows.append(_row(escape(g["name"]), status, v, lim, escape(g["detail"])))
    return "<table>" + "".join(rows) + "</table>"


def _probe_table(report: dict[str, Any]) -> str:
    probes = report.get("probes") or {}
    pb, pa = probes.get("before"), probes.get("after")
    if not pb:
        return "<p>Probes were not run.</p>"
    after = {p["name"]: p for p in (pa or {}).get("probes", [])}
    rows = [_row("probe", "family", "before (class)", "after (class)" if pa else "", head=True)]
    for p in sorted(pb["probes"], key=lambda p: -(p["flip_rate"]["value"] or 0))[:15]:
        a = after.get(p["name"])
        rows.append(
            _row(
                escape(p["name"]),
                escape(p["family"]),
                f"{_pct(p['flip_rate'])} ({p['worst_class']})",
                f"{_pct(a['flip_rate'])} ({a['worst_class']})" if a else "",
            )
        )
    reasons = "".join(
        f"<li>{escape(stage)}: {escape(r)}</li>"
        for stage, s in (("before", pb), ("after", pa))
        if s
        for r in s["evidence"].get("reasons", [])
    )
    return ("<ul>" + reasons + "</ul>" if reasons else "") + "<table>" + "".join(rows) + "</table>"


def _images(images: dict[str, bytes]) -> str:
    if not images:
        return "<p>No images.</p>"
    parts = []
    for name, data in images.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(
            f'<figure><img alt="{escape(name)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{escape(name)}</figcaption></figure>"
        )
    return "".join(parts)


def render_html(report: dict[str, Any], images: dict[str, bytes] | None = None) -> str:
    inp, verdict = report["input"], report["verdict"]
    out = report.get("output")
    warnings = "".join(f"<li>{escape(w)}</li>" for w in report.get("warnings", []))
    d = report["data"]
    meta = [
        _row(
            "model",
            f"<code>{escape(inp['path'])}</code> ({escape(inp['format'])}, sha256 {escape(inp['sha256'][:16])}&hellip;)",
        ),
        _row(
            "architecture",
            f"{escape(str(report['model'].get('architecture')))}, {report['model']['num_classes']} classes",
        ),
        _row(
            "clean data",
            f"<code>{escape(d['clean_dir'])}</code>: {d['n_images']} images, "
            f"{d.get('n_unlearn', 0)} for unlearning, {d.get('n_holdout', 0)} held out",
        ),
        _row("device / seed", f"{escape(report['device'])} / {report['seed']}"),
    ]
    if report.get("trigger"):
        meta.append(
            _row("trigger", f"{escape(report['trigger']['description'])} &rarr; class {report['trigger']['target']}")
        )
    if out:
        meta.append(_row("output", f"<code>{escape(out['path'])}</code> ({escape(out['format'])})"))
    config = escape(json.dumps(report["config"], indent=2))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ibau {escape(report["command"])}: {escape(verdict.upper())}</title>
<style>{_CSS}</style></head><body>
<h1>ibau {escape(report["command"])} report</h1>
<p class="verdict {escape(verdict)}">verdict: {escape(verdict.upper())}</p>
<table>{"".join(meta)}</table>
<h2>Figures (held-out clean images)</h2>{_figures(report)}
<h2>Gates</h2>{_gates(report)}
{"<h2>Warnings</h2><ul>" + warnings + "</ul>" if warnings else ""}
<h2>Probes</h2>{_probe_table(report)}
<h2>Images</h2>{_images(images or {})}
<h2>Configuration</h2><details><summary>resolved configuration ({escape(", ".join(report["config_layers"]))})</summary>
<pre>{config}</pre></details>
<p><small>ibau {escape(report["tool"]["version"])}, report schema {escape(report["schema_version"])}, torch
{escape(report["environment"]["torch"])}</small></p>
</body></html>
"""
