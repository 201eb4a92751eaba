"""Plugin loading failures: a plugin loads whole or not at all, and never ends a run as a pass."""

from __future__ import annotations

import pytest
from test_cli_errors import assert_one_line_error, invoke

from ibau_cli.errors import PluginError

PARTIAL = """
import dataclasses
from ibau_cli.archs import ARCHS, register_arch
register_arch(dataclasses.replace(ARCHS.get("small-cnn"), name="partial-a"))
raise RuntimeError("half-way")
"""


def test_a_plugin_that_exits_is_an_error_not_a_silent_pass(backdoored, tmp_path):
    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(0)\n")
    out = tmp_path / "o.safetensors"
    code, _, err = invoke("--plugin", plugin, "sanitize", backdoored["model"], "--clean", backdoored["clean100"],
                          "--out", out)  # fmt: skip
    assert_one_line_error(code, err, 2, f"plugin {plugin}", "failed to load: SystemExit")
    assert not out.exists()


def test_a_plugin_that_fails_half_way_leaves_nothing_registered(backdoored, tmp_path):
    """Its first registration is undone, so loading it again reports the same error, not 'already
    registered', and the name is free."""
    from ibau_cli.api import scan
    from ibau_cli.archs import ARCHS

    plugin = tmp_path / "partial.py"
    plugin.write_text(PARTIAL)
    for _ in range(2):
        with pytest.raises(PluginError, match=r"failed to load: RuntimeError: half-way \(at .*partial.py:5\)"):
            scan(backdoored["model"], backdoored["clean100"], plugins=plugin, installed_plugins=False)
        assert "partial-a" not in ARCHS


def test_a_plugin_that_prints_does_not_corrupt_json_on_stdout(backdoored, tmp_path):
    import json

    plugin = tmp_path / "chatty.py"
    plugin.write_text("print('hello from a plugin')\n")
    code, out, err = invoke("--plugin", plugin, "scan", backdoored["model"], "--clean", backdoored["clean100"],
                            "--json", "-q", "--set", "probes.budget_steps=30")  # fmt: skip
    assert code in (0, 1), err
    assert json.loads(out)["command"] == "scan" and "hello from a plugin" in err
