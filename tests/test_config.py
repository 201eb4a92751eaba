"""Configuration: documented presets, the environment layer, `ibau config show`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ibau_cli.config import Settings, preset_names
from ibau_cli.errors import ConfigError
from ibau_cli.settings_resolve import resolve_settings

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ibau_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, **(env or {})),
        timeout=300,
    )


@pytest.mark.parametrize("name", ["cifar10", "gtsrb", "mnist", "imagenet"])
def test_every_preset_documents_every_key_with_its_real_default(name):
    text = (REPO / "configs" / f"{name}.toml").read_text()
    active = tomllib.loads(text)
    defaults = Settings().to_dict()
    section = None
    seen: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^#?\s*\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^(#\s*)?(\w+) =\s*(.*?)\s+# \S", line)
        if m:
            key = m.group(2) if m.group(2) == "seed" else f"{section}.{m.group(2)}"
            seen[key] = m.group(3)
            if m.group(1) and m.group(3):  # a commented-out key shows the code's default
                default = defaults[section][m.group(2)] if key != "seed" else defaults["seed"]
                assert tomllib.loads(f"v = {m.group(3)}")["v"] == default, (name, key)
    expected = {"seed"} | {
        f"{s}.{f.name}"
        for s in ("unlearn", "split", "gate", "probes", "preprocess")
        for f in dataclasses.fields(type(getattr(Settings(), s)))
    }
    assert expected <= set(seen), expected - set(seen)
    assert "preprocess" in active


def test_presets_are_installed_with_the_package():
    assert {"cifar10", "gtsrb", "mnist", "imagenet"} <= set(preset_names())


def test_environment_sits_between_the_config_file_and_the_flags(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[gate]\nmax_asr = 0.3\nmax_acc_drop = 0.1\n[unlearn]\nrounds = 2\n")
    env = {"IBAU_GATE__MAX_ASR": "0.15", "IBAU_UNLEARN__ROUNDS": "4", "IBAU_DATA": "/elsewhere"}
    s, src = resolve_settings(
        arch=None, model_preprocess=None, preset=None, config_file=cfg,
        overrides={"unlearn": {"rounds": 7}}, environment=env,
    )  # fmt: skip
    assert (s.gate.max_asr, s.gate.max_acc_drop, s.unlearn.rounds) == (0.15, 0.1, 7)
    assert src.origins["gate.max_asr"] == "environment IBAU_GATE__MAX_ASR"
    assert src.origins["gate.max_acc_drop"] == f"config {cfg}"
    assert src.origins["unlearn.rounds"] == "command line"


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("IBAU_GATE__MAX_ASRR", "0.1", "IBAU_GATE__MAX_ASRR"),
        ("IBAU_UNLEARN__ROUNDS", "many", "integer"),
        ("IBAU_SEED", "99999999999999999999", "IBAU_SEED: seed must be between 0 and 4294967295"),
        ("IBAU_SEED", "-1", "IBAU_SEED: seed must be between 0"),
    ],
)
def test_bad_environment_variables_are_errors_naming_them(var, value, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve_settings(
            arch=None, model_preprocess=None, preset=None, config_file=None, overrides={}, environment={var: value}
        )


def test_config_show_prints_loadable_toml_with_origins(tmp_path, backdoored):
    res = _cli("config", "show", backdoored["model"], "--preset", "gtsrb", "--set", "unlearn.rounds=3",
               env={"IBAU_GATE__MAX_ASR": "0.1"})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "rounds = 3  # command line" in res.stdout
    assert "max_asr = 0.1  # environment IBAU_GATE__MAX_ASR" in res.stdout
    assert "mean = [0.3403, 0.3121, 0.3214]  # preset gtsrb" in res.stdout
    assert "model metadata" in res.stdout.splitlines()[1]
    # automatic keys say what they resolve to for this model (10 classes, 3x32x32 images)
    assert "# radius = (unset: automatic: 10 for 3x32x32 images" in res.stdout
    assert "0.325 for 10 classes" in res.stdout and "3 for 3x32x32 images: 0.3 x unlearn.radius" in res.stdout
    # a file that does not state its class count (TorchScript without metadata): counted by running it
    # (0.4.5 named the rule without a number)
    import warnings

    import torch

    scripted = tmp_path / "bare.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(backdoored["module"].eval()), str(scripted))
    bare = _cli("config", "show", scripted)
    assert bare.returncode == 0 and "0.325 for 10 classes" in bare.stdout, bare.stdout + bare.stderr
    saved = tmp_path / "resolved.toml"
    saved.write_text(res.stdout)
    again = _cli("config", "show", "--config", saved, "--json")
    assert again.returncode == 0, again.stderr
    import json

    data = json.loads(again.stdout)
    assert data["config"]["unlearn"]["rounds"] == 3 and data["config"]["gate"]["max_asr"] == 0.1
    assert "from the model's class count" in data["automatic"]["gate.min_clean_acc"]  # no model: the rule


def test_config_show_takes_the_preprocessing_shortcuts_of_sanitize():
    """A QA user could not preview what --preset mnist --mean 0 --std 1 resolves to: config show
    refused the flags sanitize takes."""
    res = _cli(
        "config", "show", "--preset", "mnist", "--mean", "0", "--std", "1", "--input-size", "28x28", "--seed", "3"
    )
    assert res.returncode == 0, res.stderr
    for line in (
        "mean = [0.0]  # command line",
        "std = [1.0]  # command line",
        "input_size = [28, 28]  # command line",
    ):
        assert line in res.stdout, res.stdout
    assert "seed = 3  # command line" in res.stdout
    res = _cli("config", "show", "--mean", "0,x")
    assert res.returncode == 2 and res.stderr.startswith("error: --mean '0,x'"), res.stderr


def test_seed_is_a_key_of_set_and_out_of_range_seeds_are_usage_errors():
    res = _cli("config", "show", "--set", "seed=5")
    assert res.returncode == 0 and "seed = 5  # command line" in res.stdout, res.stderr
    res = _cli("config", "show", "--set", f"seed={2**64}")
    assert res.returncode == 2 and "seed must be between 0 and 4294967295" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_config_show_rejects_unknown_keys_and_archs():
    res = _cli("config", "show", "--set", "unlearn.roundz=3")
    assert res.returncode == 2 and "unlearn.roundz" in res.stderr and "Traceback" not in res.stderr
    res = _cli("config", "show", "--arch", "nope")
    assert res.returncode == 2 and "nope" in res.stderr


def test_empty_environment_values_and_plugin_entries_count_as_unset():
    s, src = resolve_settings(
        arch=None, model_preprocess=None, preset=None, config_file=None, overrides={},
        environment={"IBAU_GATE__MAX_ASR": "", "IBAU_SEED": " "},
    )  # fmt: skip
    assert s.gate.max_asr == Settings().gate.max_asr and src.origins["gate.max_asr"] == "defaults"
    res = _cli("archs", env={"IBAU_PLUGINS": os.pathsep})
    assert res.returncode == 0, res.stderr


def test_a_missing_config_file_names_where_its_path_came_from(tmp_path):
    res = _cli("config", "show", env={"IBAU_CONFIG": str(tmp_path / "nope.toml")})
    assert res.returncode == 2 and "from environment IBAU_CONFIG" in res.stderr, res.stderr
    res = _cli("config", "show", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "from --config" in res.stderr, res.stderr
    res = _cli("config", "show", "--config", str(tmp_path))
    assert res.returncode == 2 and "is a folder" in res.stderr, res.stderr
    res = _cli("--plugin", str(tmp_path), "archs")
    assert res.returncode == 2 and "is a folder" in res.stderr, res.stderr


def test_zero_inner_steps_is_refused_rather_than_silently_fine_tuning():
    res = _cli("config", "show", "--set", "unlearn.inner_steps=0")
    assert res.returncode == 2 and "unlearn.inner_steps must be >= 1" in res.stderr, res.stderr


@pytest.mark.parametrize("setting", ["unlearn.lr=nan", "unlearn.radius=inf"])
def test_non_finite_numbers_are_refused_before_any_work(setting, tmp_path):
    """nan slips through every `x <= 0` check: 0.3.5 ran a whole repair with lr=nan and blamed the
    model ("the repair diverged"), and max_grad_norm=nan wrote a broken model and a report with NaN."""
    res = _cli("config", "show", "--set", setting)
    key = setting.split("=")[0]
    assert res.returncode == 2 and f"{key} must be a finite number" in res.stderr, res.stderr
    if setting != "unlearn.lr=nan":
        return
    (tmp_path / "c.toml").write_text("[unlearn]\nlr = nan\n")
    res = _cli("config", "show", "--config", str(tmp_path / "c.toml"))
    assert res.returncode == 2 and "unlearn.lr must be a finite number" in res.stderr, res.stderr
    res = _cli("config", "show", "--set", "preprocess.mean=[0.5, nan, 0.5]")
    assert res.returncode == 2 and "preprocess.mean must be a list of finite numbers" in res.stderr, res.stderr


def test_a_preset_is_a_name_not_a_path(tmp_path):
    (tmp_path / "mine.toml").write_text("[unlearn]\nrounds = 2\n")
    res = _cli("config", "show", "--preset", str(tmp_path / "mine"))
    assert res.returncode == 2 and "unknown preset" in res.stderr and "--config" in res.stderr, res.stderr
    res = _cli("config", "show", "--preset", "../configs/cifar10")
    assert res.returncode == 2 and "unknown preset" in res.stderr, res.stderr


def test_an_optional_key_goes_back_to_automatic_with_auto_or_none(tmp_path):
    """A preset or file that sets unlearn.radius (or clips gradients) could not be undone from the
    command line: TOML has no null, and --set radius= was "must be a number"."""
    (tmp_path / "r.toml").write_text("[unlearn]\nradius = 5.0\n[probes]\nclass_batch = 4\n")
    res = _cli("config", "show", "--config", str(tmp_path / "r.toml"), "--set", "unlearn.radius=auto",
               "--set", "unlearn.max_grad_norm=none", "--set", "probes.class_batch=AUTO", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(res.stdout)
    assert data["config"]["unlearn"]["radius"] is None and data["config"]["unlearn"]["max_grad_norm"] is None
    assert data["config"]["probes"]["class_batch"] is None and "unlearn.radius" in data["automatic"]
    assert data["unset"] == {"unlearn.max_grad_norm": "no clipping"}  # not "automatic": it means something
    res = _cli("config", "show", "--set", "unlearn.max_grad_norm=none")
    assert "# max_grad_norm = (unset: no clipping)" in res.stdout, res.stdout
    res = _cli("config", "show", "--set", "unlearn.lr=auto")  # not optional: still an error naming it
    assert res.returncode == 2 and "unlearn.lr must be a number" in res.stderr, res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["config", "show", "--seed", "1", "--set", "seed=2"],
        ["config", "show", "--set", "unlearn.rounds=1", "--set", "unlearn.rounds=2"],
        ["sanitize", "m.safetensors", "--clean", "c", "--rounds", "1", "--set", "unlearn.rounds=3"],
    ],
)
def test_a_key_given_twice_with_different_values_is_a_usage_error(args):
    """0.4.5 kept one of them without a word (a QA pass): --seed 1 beat --set seed=2, --rounds 1 beat
    --set unlearn.rounds=3, and the last of two --set won. The same value twice is fine."""
    res = _cli(*args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "given twice with different values" in lines[0], res.stderr
    same = _cli("config", "show", "--seed", "1", "--set", "seed=1")
    assert same.returncode == 0, same.stderr


def test_a_setting_variable_with_one_underscore_is_named_not_ignored():
    """IBAU_GATE_MAX_ASR (one underscore where two go) was ignored in 0.4.5 and the run gated on the
    default (a QA pass); other IBAU_ variables (IBAU_DATA, IBAU_ZOO_DIR) stay other tools' business."""
    with pytest.raises(ConfigError, match="IBAU_GATE_MAX_ASR: a setting's variable takes two underscores") as info:
        resolve_settings(arch=None, model_preprocess=None, preset=None, config_file=None, overrides={},
                         environment={"IBAU_GATE_MAX_ASR": "0.1"})  # fmt: skip
    assert "IBAU_GATE__MAX_ASR" in info.value.hint
    settings, _ = resolve_settings(arch=None, model_preprocess=None, preset=None, config_file=None, overrides={},
                                   environment={"IBAU_DATA": "x", "IBAU_ZOO_DIR": "y"})  # fmt: skip
    assert settings.gate.max_asr == 0.2
    # empty, it means unset, as an empty IBAU_GATE__MAX_ASR does (CI templates leave variables blank)
    settings, _ = resolve_settings(arch=None, model_preprocess=None, preset=None, config_file=None, overrides={},
                                   environment={"IBAU_GATE_MAX_ASR": ""})  # fmt: skip
    assert settings.gate.max_asr == 0.2
