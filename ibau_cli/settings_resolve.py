"""Build the effective Settings from every layer, lowest first, and say where each came from."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .archs import ARCHS
from .config import Settings, apply_layer, load_preset, load_toml
from .errors import ConfigError
from .preprocess import Preprocess

ENV_PREFIX = "IBAU_"
INFERRED_LAYER = "the model and the clean images"  # input_shape.infer_input, when nothing declares the shape


@dataclass
class SettingsSources:
    """Each layer's name, in the order applied, and the layer that last set each key."""

    layers: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # "section.key" (or "seed") -> layer name


def _keys(layer: dict[str, Any]) -> list[str]:
    """The dotted keys a layer sets: {"gate": {"max_asr": 0.1}, "seed": 3} -> ["gate.max_asr", "seed"]."""
    keys = []
    for section, values in layer.items():
        if isinstance(values, dict):
            keys += [f"{section}.{k}" for k in values]
        else:
            keys.append(section)
    return keys


_SECTIONS = {f.name for f in fields(Settings) if f.name != "seed"}  # preprocess, split, unlearn, ...


def environment_layer(environ: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """``IBAU_SECTION__KEY=value`` (TOML value, bare strings allowed) and ``IBAU_SEED``, one layer per
    variable so an error names it. Other ``IBAU_*`` variables (``IBAU_CONFIG``, ``IBAU_DATA`` ...) are not
    configuration keys and are left alone."""
    layers = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        if rest == "SEED":
            section, key = "seed", None
        elif "__" in rest:
            section, key = (part.lower() for part in rest.split("__", 1))
        elif rest.split("_", 1)[0].lower() in _SECTIONS and "_" in rest and environ[name].strip():
            # IBAU_GATE_MAX_ASR: a setting with one underscore where two go, not another tool's variable
            section, key = rest.split("_", 1)
            raise ConfigError(
                f"environment {name}: a setting's variable takes two underscores between section and key",
                hint=f"name it {ENV_PREFIX}{section}__{key}",
            )
        else:
            continue
        if not environ[name].strip():
            continue  # an empty variable (common in CI templates) means unset
        value = _parse_value(environ[name])
        layers.append((f"environment {name}", {section: value} if key is None else {section: {key: value}}))
    return layers


def resolve_settings(
    *,
    arch: str | None,
    model_preprocess: Preprocess | None,
    preset: str | None,
    model_input: tuple[int, int, int] | None = None,
    inferred: dict[str, Any] | None = None,
    config_file: Path | None,
    overrides: dict[str, Any],
    environment: Mapping[str, str] | None = None,
) -> tuple[Settings, SettingsSources]:
    """defaults < what the model's first convolution and the clean images say of the input shape
    (``inferred``, a preprocess layer) < architecture defaults < the graph's input shape < model file
    metadata < preset < config file < environment (IBAU_SECTION__KEY) < flags."""
    settings = Settings()
    sources = SettingsSources(["defaults"], {k: "defaults" for k in _keys(settings.to_dict())})

    def overlay(layer: dict[str, Any], name: str, source: str | None = None) -> None:
        nonlocal settings
        settings = apply_layer(settings, layer, source or name)
        sources.layers.append(name)
        sources.origins.update({k: name for k in _keys(layer)})

    if inferred:
        overlay(inferred, INFERRED_LAYER)
    spec = ARCHS.get(arch) if arch else None
    if spec is not None:
        pre = {} if spec.input_size is None else {"input_size": list(spec.input_size)}
        pre.update({} if spec.channels is None else {"channels": spec.channels})
        pre.update({k: v for k, v in spec.defaults.items() if k in ("mean", "std")})
        if pre:
            overlay({"preprocess": pre}, f"architecture {spec.name}")
    if model_input is not None:
        c, h, w = model_input
        if h and w:
            pre = {"channels": c, "input_size": [h, w]}
            if c == 1:
                pre.update({"mean": [0.0], "std": [1.0]})
            overlay({"preprocess": pre}, "model graph input shape")
    if model_preprocess is not None:
        settings = replace(settings, preprocess=model_preprocess)
        sources.layers.append("model metadata")
        sources.origins.update({k: "model metadata" for k in _keys({"preprocess": model_preprocess.to_dict()})})
    if preset:
        overlay(load_preset(preset), f"preset {preset}")
    environment = environment or {}
    config_from = "--config"
    if config_file is None and environment.get("IBAU_CONFIG"):
        config_file, config_from = Path(environment["IBAU_CONFIG"]), "environment IBAU_CONFIG"
    if config_file is not None:
        if Path(config_file).is_dir():
            raise ConfigError(f"config file {config_file} (from {config_from}) is a folder", hint="name a .toml file")
        if not Path(config_file).is_file():
            raise ConfigError(f"config file not found: {config_file} (from {config_from})")
        overlay(load_toml(config_file), f"config {config_file}", str(config_file))
    for name, layer in environment_layer(environment):
        overlay(layer, name)
    if overrides:
        overlay(overrides, "command line")
    pre = settings.preprocess
    if len(pre.mean) == 1 and pre.channels > 1:
        settings = replace(settings, preprocess=replace(pre, mean=pre.mean * pre.channels))
    pre = settings.preprocess
    if len(pre.std) == 1 and pre.channels > 1:
        settings = replace(settings, preprocess=replace(pre, std=pre.std * pre.channels))
    pre = settings.preprocess
    if pre.channels == 1 and len(pre.mean) == 3 and pre.mean == (0.0, 0.0, 0.0):
        settings = replace(settings, preprocess=replace(pre, mean=(0.0,), std=(1.0,)))
    try:
        settings.check()
    except ConfigError as exc:
        raise ConfigError(_with_origins(str(exc), sources.origins)) from None
    return settings, sources


def _with_origins(message: str, origins: dict[str, str]) -> str:
    """Each problem of a failed check followed by the layer that set its key: "unlearn.rounds must
    be >= 0 (set by config file x.toml)"."""
    head, _, body = message.partition(": ")
    problems = []
    for problem in body.split("; "):
        keys = [k for k in re.findall(r"\b[a-z_]+\.[a-z_]+\b", problem) if k in origins]
        problems.append(problem + (f" (set by {origins[keys[0]]})" if keys else ""))
    return f"{head}: {'; '.join(problems)}"


def parse_assignment(text: str) -> tuple[str, str | None, Any]:
    """``section.key=value`` with a TOML value (strings may be bare); ``seed=N``, the one top-level
    key, gives a key of None."""
    from .errors import UsageError

    if text.split("=", 1)[0].strip() == "seed" and "=" in text:
        return "seed", None, _parse_value(text.split("=", 1)[1])
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UsageError(f"--set {text!r}: expected SECTION.KEY=VALUE (or seed=N), e.g. unlearn.rounds=3")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    return section, key, _parse_value(rhs)


def _parse_value(text: str) -> Any:
    """A TOML value (number, boolean, list, quoted string); anything else is a bare string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()
