"""The README documents every command, option, exit code, config key and report format."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import click
import pytest

from ibau_cli.cli import main
from ibau_cli.config import Settings
from ibau_cli.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_RUNTIME
from ibau_cli.reporters import REPORT_FORMATS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out = {}
    for name, cmd in group.commands.items():
        out[f"{prefix}{name}"] = cmd
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, f"{prefix}{name} "))
    return out


def test_every_command_and_option_is_in_the_readme():
    missing = []
    for name, cmd in {"": main, **_commands(main)}.items():
        if name and f"ibau {name}" not in README:
            missing.append(f"command ibau {name}")
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                documented = re.search(rf"[`\[ ]{re.escape(opt)}(?![\w-])", README)
                if opt.startswith("--") and opt not in ("--help", "--version") and not documented:
                    missing.append(f"ibau {name} {opt}")
    assert not missing, missing


def test_exit_codes_config_keys_and_formats_are_in_the_readme():
    for code in (EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_RUNTIME):
        assert f"| {code} |" in README
    for section in ("preprocess", "unlearn", "split", "gate", "probes"):
        for f in dataclasses.fields(type(getattr(Settings(), section))):
            assert f"\n{f.name} = " in README or f"\n# {f.name} = " in README, f"{section}.{f.name}"
    for fmt in REPORT_FORMATS:
        assert f"`--format {fmt}`" in README, fmt


def test_shell_completion_documented_in_the_readme_works():
    assert "_IBAU_COMPLETE=bash_source ibau" in README
    env = dict(
        os.environ, COMP_WORDS="ibau sanitize m.safetensors --for", COMP_CWORD="3", _IBAU_COMPLETE="bash_complete"
    )
    res = subprocess.run([sys.executable, "-m", "ibau_cli"], capture_output=True, text=True, env=env, timeout=120)
    assert "--format" in res.stdout and "--force" in res.stdout


@pytest.mark.slow
def test_the_readme_demo_command_runs_end_to_end(tmp_path):
    """`ibau demo`, the README's first command, as a subprocess: it trains the demo model, sanitizes it
    and removes the backdoor (the held-out figures in its report), and writes the report it is asked for."""
    env = dict(os.environ, COLUMNS="120")
    cmd = [sys.executable, "-m", "ibau_cli", "demo", "--dir", str(tmp_path / "demo"), "--json",
           "--report", str(tmp_path / "demo.html")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr
    import json

    report = json.loads(res.stdout)
    assert report["before"]["asr"]["value"] > 0.9 and report["after"]["asr"]["value"] < 0.1, report["after"]
    assert (tmp_path / "demo.html").stat().st_size > 0 and (tmp_path / "demo" / "fixed.safetensors").exists()


def _demo_dir_from(backdoored, root):
    """A demo folder as `ibau demo` leaves it, from the session's backdoored model (no training)."""
    root.mkdir()
    shutil.copy(backdoored["model"], root / "model.safetensors")
    shutil.copytree(backdoored["clean100"], root / "clean")
    shutil.copy(backdoored["trigger"], root / "trigger.png")
    return root


def test_the_demo_reads_the_environment_as_sanitize_does(backdoored, tmp_path, monkeypatch):
    """It prints "running: ibau sanitize ..."; 0.3.5 ran it without IBAU_* and IBAU_CONFIG."""
    from test_cli_errors import invoke

    demo = _demo_dir_from(backdoored, tmp_path / "demo")
    monkeypatch.setenv("IBAU_UNLEARN__ROUNDS", "abc")
    code, _, err = invoke("demo", "--dir", demo)
    assert code == 2 and "IBAU_UNLEARN__ROUNDS" in err, err
    assert not (demo / "fixed.safetensors").exists()


def test_an_interrupted_demo_build_leaves_no_half_written_folder(backdoored, tmp_path, monkeypatch):
    import ibau_cli.demo as demo

    real_write = demo.write_image_folder

    def write_then_interrupt(x, y, root):
        real_write(x[:3], y[:3], root)
        raise KeyboardInterrupt

    # the training is not the point here: the session's trained model stands in for it
    monkeypatch.setattr(demo, "train_backdoored", lambda seed: SimpleNamespace(model=backdoored["module"]))
    monkeypatch.setattr(demo, "write_image_folder", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo(tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["model.safetensors"]
