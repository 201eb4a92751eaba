"""`from ibau_cli import sanitize, scan`: the CLI's behaviour as function calls."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

import ibau_cli
from conftest import independent_figures, run_cli, sanitize_with_trigger
from ibau_cli.errors import InputError, UsageError


def test_sanitize_from_the_package_matches_the_cli(backdoored, tmp_path):
    common = dict(trigger=str(backdoored["trigger"]), target=0, probes=False, settings=["unlearn.known_trigger=off"])
    report = ibau_cli.sanitize(
        str(backdoored["model"]),
        str(backdoored["clean500"]),
        out=str(tmp_path / "api.safetensors"),
        reports=[tmp_path / "api.json", tmp_path / "api.xml"],
        **common,
    )
    assert report.verdict == "pass" and report.exit_code == 0
    assert report.before.asr.value > 0.9 and report.after.asr.value < 0.2
    from ibau_cli.formats import load_model

    acc, asr = independent_figures(load_model(tmp_path / "api.safetensors").module, backdoored["x_eval"],
                                   backdoored["y_eval"])  # fmt: skip
    assert asr < 0.2 and acc > 0.9
    written = json.loads((tmp_path / "api.json").read_text())
    assert written["after"] == report.to_dict()["after"]
    assert ET.parse(tmp_path / "api.xml").getroot().find("testsuite").get("failures") == "0"

    res = run_cli(*sanitize_with_trigger(backdoored, backdoored["model"], "clean500", tmp_path / "cli.safetensors",
                                         "--json"))  # fmt: skip
    cli = json.loads(res.stdout)
    assert res.returncode == report.exit_code
    assert cli["before"] == written["before"] and cli["config"] == written["config"]
    assert [g["status"] for g in cli["gates"]] == [g["status"] for g in written["gates"]]
    assert written["invocation"] is None and cli["invocation"]["argv"][:2] == ["ibau", "sanitize"]
    assert abs(cli["after"]["asr"]["value"] - written["after"]["asr"]["value"]) <= 0.05


def test_scan_from_the_package_flags_the_backdoor(backdoored):
    report = ibau_cli.scan(backdoored["model"], backdoored["clean500"], settings=["probes.budget_steps=60"])
    assert report.exit_code == 1 and report.probes["before"]["evidence"]["suspected_class"] == 0


def test_api_errors_carry_the_cli_exit_codes(backdoored, tmp_path):
    with pytest.raises(UsageError, match="trigger= needs target=N") as err:  # the API's words, not flags
        ibau_cli.sanitize(backdoored["model"], backdoored["clean100"], trigger=backdoored["trigger"])
    assert err.value.exit_code == 2 and "--" not in str(err.value)
    with pytest.raises(UsageError, match="trigger_blend= describes a trigger: it needs trigger=IMAGE"):
        ibau_cli.sanitize(backdoored["model"], backdoored["clean100"], trigger_blend=0.2)
    with pytest.raises(InputError) as err:
        ibau_cli.scan(tmp_path / "missing.safetensors", backdoored["clean100"])
    assert err.value.exit_code == 2 and "missing.safetensors" in err.value.one_line()
    with pytest.raises(UsageError, match="cannot tell the report format"):
        ibau_cli.scan(backdoored["model"], backdoored["clean100"], reports=[tmp_path / "r.txt"])
    with pytest.raises(UsageError, match="scan writes no model"):
        ibau_cli.scan(backdoored["model"], backdoored["clean100"], out=tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="unknown keyword 'max_asrr'") as err:
        ibau_cli.scan(backdoored["model"], backdoored["clean100"], max_asrr=0.1)
    assert err.value.hint == "did you mean max_asr?"
    with pytest.raises(UsageError, match="unknown keyword 'no_probes'") as err:
        ibau_cli.sanitize(backdoored["model"], backdoored["clean100"], no_probes=True)
    assert err.value.hint == "use probes=False"


def test_api_takes_sizes_and_settings_as_the_cli_writes_them(backdoored, tmp_path):
    """input_size="32x32", mean="0,0,0" and one --set string, as on the command line."""
    report = ibau_cli.sanitize(backdoored["model"], backdoored["clean100"], out=tmp_path / "o.safetensors",
                               probes=False, rounds=0, input_size="32x32", mean="0,0,0", std="1,1,1",
                               settings="unlearn.batch_size=32")  # fmt: skip
    config = report.to_dict()["config"]
    assert config["preprocess"]["input_size"] == [32, 32] and config["unlearn"]["batch_size"] == 32


def test_unlearn_checks_its_config():
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.unlearn import unlearn

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(ValueError, match="unlearn.rounds must be >= 0"):
        unlearn(model, torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]), UnlearnConfig(rounds=-1))
