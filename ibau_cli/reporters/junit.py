"""JUnit XML, so CI test tabs (GitHub, GitLab, Jenkins) show each gate as a test case."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    """Drop characters XML 1.0 cannot hold (a folder name could carry one)."""
    return _XML_INVALID.sub("", text)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def render_junit(report: dict[str, Any]) -> str:
    gates = report["gates"]
    model = report["input"]["path"]
    total = sum(report.get("timings_s", {}).values())
    failures = sum(g["status"] == "fail" for g in gates)
    skipped = sum(g["status"] == "not_evaluated" for g in gates)
    root = ET.Element("testsuites", name="ibau", tests=str(len(gates)), failures=str(failures), errors="0")
    suite = ET.SubElement(
        root,
        "testsuite",
        name=_clean(f"ibau {report['command']} {model}"),
        tests=str(len(gates)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{total:.3f}",
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("verdict", report["verdict"]),
        ("model_sha256", report["input"]["sha256"]),
        ("schema_version", report["schema_version"]),
        ("ibau_version", report["tool"]["version"]),
        ("device", report["device"]),
        ("seed", str(report["seed"])),
    ):
        ET.SubElement(props, "property", name=name, value=_clean(value))
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname=f"ibau.{report['command']}.gates", name=g["name"], time="0")
        text = _clean(f"{g['name']}: {_fmt(g['value'])} (limit {_fmt(g['limit'])}) - {g['detail']}")
        if g["status"] == "fail":
            ET.SubElement(case, "failure", message=text, type="GateFailed").text = text
        elif g["status"] == "not_evaluated":
            ET.SubElement(case, "skipped", message=text)
        else:
            ET.SubElement(case, "system-out").text = text
    if report.get("warnings"):
        ET.SubElement(suite, "system-err").text = _clean("\n".join(report["warnings"]))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
