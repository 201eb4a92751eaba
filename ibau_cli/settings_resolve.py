"""Build the effective Settings from every layer, lowest first, and say where each came from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .archs import ARCHS
from .config import Settings, apply_layer, load_preset, load_toml
from .preprocess import Preprocess


@dataclass
class SettingsSources:
    """Each layer's name, in the order applied."""

    layers: list[str] = field(default_factory=list)


def resolve_settings(
    *,
    arch: str | None,
    model_preprocess: Preprocess | None,
    preset: str | None,
    model_input: tuple[int, int, int] | None = None,
    config_file: Path | None,
    overrides: dict[str, Any],
) -> tuple[Settings, SettingsSources]:
    """defaults < architecture defaults < the graph's input shape < model file metadata < preset
    < config file < flags."""
    settings = Settings()
    sources = SettingsSources(["defaults"])
    spec = ARCHS.get(arch) if arch else None
    if spec is not None:
        pre = {"input_size": list(spec.input_size), "channels": spec.channels}
        pre.update({k: v for k, v in spec.defaults.items() if k in ("mean", "std")})
        settings = apply_layer(settings, {"preprocess": pre}, f"architecture {spec.name}")
        sources.layers.append(f"architecture {spec.name}")
    if model_input is not None:
        c, h, w = model_input
        if h and w:
            pre = {"channels": c, "input_size": [h, w]}
            if c == 1:
                pre.update({"mean": [0.0], "std": [1.0]})
            settings = apply_layer(settings, {"preprocess": pre}, "model graph")
            sources.layers.append("model graph input shape")
    if model_preprocess is not None:
        settings = replace(settings, preprocess=model_preprocess)
        sources.layers.append("model metadata")
    if preset:
        settings = apply_layer(settings, load_preset(preset), f"preset {preset}")
        sources.layers.append(f"preset {preset}")
    if config_file is not None:
        settings = apply_layer(settings, load_toml(config_file), str(config_file))
        sources.layers.append(f"config {config_file}")
    if overrides:
        settings = apply_layer(settings, overrides, "command line")
        sources.layers.append("command line")
    pre = settings.preprocess
    if len(pre.mean) == 1 and pre.channels > 1:
        settings = replace(settings, preprocess=replace(pre, mean=pre.mean * pre.channels))
    pre = settings.preprocess
    if len(pre.std) == 1 and pre.channels > 1:
        settings = replace(settings, preprocess=replace(pre, std=pre.std * pre.channels))
    pre = settings.preprocess
    if pre.channels == 1 and len(pre.mean) == 3 and pre.mean == (0.0, 0.0, 0.0):
        settings = replace(settings, preprocess=replace(pre, mean=(0.0,), std=(1.0,)))
    settings.check()
    return settings, sources


def parse_assignment(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` with a TOML value (strings may be bare)."""
    import tomllib

    from .errors import UsageError

    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UsageError(f"--set {text!r}: expected SECTION.KEY=VALUE, e.g. unlearn.rounds=3")
    lhs, rhs = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {rhs.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = rhs.strip()
    return section, key, value
