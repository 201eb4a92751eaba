"""SARIF 2.1.0, so code-scanning UIs (GitHub, GitLab, Azure DevOps) show failed gates as findings.

A finding is a failed gate (level ``error``); a model that passes every gate gives a run with no
results. Report warnings go to the invocation's ``toolExecutionNotifications`` (not alerts). Every
gate, passed or not, is also listed in the run's ``properties`` with its value and limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .. import __version__

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://arxiv.org/abs/2110.03735"  # the I-BAU paper: ibau itself is not on PyPI

RULES: dict[str, tuple[str, str]] = {
    "asr": ("AttackSuccessRateGate", "Attack success rate (true trigger, else the strongest probe) past the limit"),
    "accuracy_drop": ("AccuracyDropGate", "Clean accuracy dropped more than the limit during repair"),
    "probe_verdict": ("BackdoorSuspected", "The built-in trigger probes found evidence of a backdoor"),
}


def _rule_id(name: str) -> str:
    return f"ibau/{name.replace('_', '-')}"


def _location(path: str) -> dict[str, Any]:
    """A path relative to the working directory (code scanning needs repository-relative URIs) when it is
    inside it, else an absolute file URI."""
    p = Path(path).resolve()
    try:
        rel = p.relative_to(Path(os.getcwd()).resolve())
        artifact = {"uri": quote(rel.as_posix()), "uriBaseId": "%SRCROOT%"}
    except ValueError:
        artifact = {"uri": p.as_uri()}
    return {"physicalLocation": {"artifactLocation": artifact}}


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def _rule(name: str) -> dict[str, Any]:
    short, text = RULES.get(name, (name.title().replace("_", ""), f"Gate {name} failed"))
    return {
        "id": _rule_id(name),
        "name": short,
        "shortDescription": {"text": text},
        "helpUri": INFORMATION_URI,
        "defaultConfiguration": {"level": "error"},
    }


def _command_line(report: dict[str, Any], model: str) -> dict[str, Any]:
    """SARIF's commandLine (and arguments): the CLI's own command line where the report has it (a run
    from the Python API has none: the command and the model then)."""
    argv = (report.get("invocation") or {}).get("argv")
    if not argv:
        return {"commandLine": f"ibau {report['command']} {model}"}
    return {"commandLine": shlex.join(argv), "arguments": list(argv[1:])}


def render_sarif(report: dict[str, Any]) -> str:
    model = report["input"]["path"]
    sha = report["input"]["sha256"]
    results: list[dict[str, Any]] = []
    used: list[str] = []
    for gate in report["gates"]:
        if gate["status"] != "fail":
            continue
        used.append(gate["name"])
        value = "-" if gate["value"] is None else f"{gate['value']:.1%}"
        limit = "" if gate["limit"] is None else f" (limit {gate['limit']:.1%})"
        results.append(
            {
                "ruleId": _rule_id(gate["name"]),
                "level": "error",
                "kind": "fail",
                "message": {"text": f"{report['command']}: {gate['name']} {value}{limit}: {gate['detail']}"},
                "locations": [_location(model)],
                "partialFingerprints": {"ibauModelGate/v1": _fingerprint(sha, gate["name"])},
                "properties": {"value": gate["value"], "limit": gate["limit"]},
            }
        )
    rule_index = {_rule_id(name): i for i, name in enumerate(used)}
    for r in results:
        r["ruleIndex"] = rule_index[r["ruleId"]]
    notifications = [{"level": "warning", "message": {"text": text}} for text in report.get("warnings", [])]
    sarif = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "ibau",
                        "version": __version__,
                        "informationUri": INFORMATION_URI,
                        "rules": [_rule(n) for n in used],
                    }
                },
                "invocations": [
                    {
                        "executionSuccessful": True,
                        "exitCode": 0 if report["verdict"] == "pass" else 1,
                        **_command_line(report, model),
                        "toolExecutionNotifications": notifications,
                    }
                ],
                "artifacts": [
                    {"location": _location(model)["physicalLocation"]["artifactLocation"], "hashes": {"sha-256": sha}}
                ],
                "results": results,
                "properties": {
                    "ibauSchemaVersion": report["schema_version"],
                    "verdict": report["verdict"],
                    "gates": report["gates"],
                },
            }
        ],
    }
    return json.dumps(sarif, indent=2) + "\n"
