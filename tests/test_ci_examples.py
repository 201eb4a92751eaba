"""The CI examples are valid for their CI systems and use real ibau flags; the registry hook really
scans a folder and quarantines the backdoored and the broken models."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")


def _vendored_schema(name: str) -> dict:
    pytest.importorskip("check_jsonschema")
    return json.loads((resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / name).read_text())


def _ibau_commands(text: str) -> list[list[str]]:
    """Every `ibau ...` command line in a CI file (continued lines joined)."""
    joined = text.replace("\\\n", " ")
    doc = yaml.safe_load(joined)
    scripts: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("run", "script") and isinstance(v, str):
                    scripts.extend(v.splitlines())
                elif k == "script" and isinstance(v, list):
                    scripts.extend(" ".join(str(s).split()) for s in v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return [shlex.split(s.strip(), comments=True) for s in scripts if s.strip().startswith("ibau ")]


def _parse_with_the_real_cli(argv: list[str]) -> None:
    from ibau_cli.cli import main

    ctx = main.make_context("ibau", list(argv[1:]), resilient_parsing=True)
    command = main.get_command(ctx, argv[1])
    assert command is not None, argv
    command.make_context(argv[1], argv[2:], parent=ctx)  # raises on an unknown flag or a bad value


@pytest.mark.parametrize(
    ("name", "schema"), [("github-actions.yml", "github-workflows.json"), ("gitlab-ci.yml", "gitlab-ci.json")]
)
def test_ci_example_is_valid_for_its_ci_system_and_uses_real_flags(name, schema):
    text = (EXAMPLES / "ci" / name).read_text()
    doc = yaml.safe_load(text)
    if "on" not in doc and True in doc:  # YAML 1.1 reads the key `on` as True
        doc["on"] = doc.pop(True)
    jsonschema.validate(doc, _vendored_schema(schema))
    commands = _ibau_commands(text)
    assert commands and all(c[1] == "sanitize" for c in commands)
    for argv in commands:
        _parse_with_the_real_cli(argv)
        assert "--max-asr" in argv and "--report" in argv
    reports = {a for c in commands for a in c if a.startswith("reports/")}
    assert any(r.endswith(".xml") for r in reports) and any(r.endswith(".json") for r in reports)


@pytest.mark.slow
def test_registry_hook_quarantines_backdoored_and_broken_models(backdoored, demo_zoo, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "clean.safetensors").write_bytes(demo_zoo["clean0"][0].read_bytes())
    (incoming / "backdoored.safetensors").write_bytes(backdoored["model"].read_bytes())
    (incoming / "truncated.safetensors").write_bytes(backdoored["model"].read_bytes()[:100])
    (incoming / "notes.txt").write_text("not a model")
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / "registry_hook.py"), str(incoming), "--clean", str(backdoored["clean500"]),
         "--", "--set", "probes.budget_steps=60"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr  # something was quarantined
    approved, quarantine = tmp_path / "approved", tmp_path / "quarantine"
    assert (approved / "clean.safetensors").exists() and (approved / "clean.safetensors.report.json").exists()
    assert (quarantine / "backdoored.safetensors").exists()
    report = json.loads((quarantine / "backdoored.safetensors.report.json").read_text())
    assert report["verdict"] == "fail" and report["probes"]["before"]["evidence"]["suspected_class"] == 0
    assert (quarantine / "truncated.safetensors").exists()
    assert "truncated.safetensors" in (quarantine / "truncated.safetensors.error.txt").read_text()
    assert sorted(p.name for p in incoming.iterdir()) == ["notes.txt"]  # only the non-model is left
    log = [json.loads(line) for line in (tmp_path / "hook-log.jsonl").read_text().splitlines()]
    assert {e["file"]: e["exit_code"] for e in log} == {
        "clean.safetensors": 0,
        "backdoored.safetensors": 1,
        "truncated.safetensors": 2,
    }


def test_registry_hook_in_sanitize_mode_approves_the_repaired_model_not_its_input(backdoored, demo_zoo, tmp_path):
    """With --sanitize a passing model's *repaired* file is approved; the input, which may be the
    backdoored one, goes to originals/. An ONNX graph's external-data file moves with it."""
    import onnx
    import torch

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    (incoming / "backdoored.safetensors").write_bytes(backdoored["model"].read_bytes())
    exported = tmp_path / "exported.onnx"
    torch.onnx.export(demo_zoo["clean0"][1].model.eval(), (torch.rand(2, 3, 32, 32),), str(exported), dynamo=False,
                      opset_version=17, input_names=["image"], dynamic_axes={"image": {0: "batch"}})  # fmt: skip
    onnx.save_model(onnx.load(str(exported)), str(incoming / "graph.onnx"), save_as_external_data=True,
                    location="graph.onnx.data", size_threshold=0)  # fmt: skip
    assert (incoming / "graph.onnx.data").exists()
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / "registry_hook.py"), str(incoming), "--clean", str(backdoored["clean100"]),
         "--sanitize", "--", "--trigger", str(backdoored["trigger"]), "--target", "0", "--no-probes",
         "--max-acc-drop", "0.2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    approved, originals = tmp_path / "approved", tmp_path / "originals"
    assert sorted(p.name for p in approved.iterdir()) == [
        "backdoored.safetensors.report.json",
        "backdoored.sanitized.safetensors",
        "graph.onnx.report.json",
        "graph.sanitized.onnx",
    ]
    assert sorted(p.name for p in originals.iterdir()) == ["backdoored.safetensors", "graph.onnx", "graph.onnx.data"]
    assert list(incoming.iterdir()) == []
    onnx.load(str(originals / "graph.onnx"))  # loads: its external data moved with it
    log = [json.loads(line) for line in (tmp_path / "hook-log.jsonl").read_text().splitlines()]
    assert {e["file"]: Path(e["approved"]).name for e in log} == {
        "backdoored.safetensors": "backdoored.sanitized.safetensors",
        "graph.onnx": "graph.sanitized.onnx",
    }
