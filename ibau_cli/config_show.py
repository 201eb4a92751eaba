"""The resolved configuration as TOML (loadable again with --config), each key with its origin."""

from __future__ import annotations

import json
from typing import Any

from .config import UNSET_MEANS, Settings
from .settings_resolve import SettingsSources


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_toml(settings: Settings, sources: SettingsSources, num_classes: int | None = None) -> str:
    """``num_classes``: the model's, when one was given (the accuracy floor depends on it)."""
    data = settings.to_dict()
    automatic = settings.automatic_values(num_classes)
    lines = [
        "# ibau resolved configuration (load it again with --config FILE)",
        "# layers, lowest first: " + " < ".join(sources.layers),
        "",
    ]

    def line(key: str, name: str, value: Any) -> str:
        origin = sources.origins.get(key, "defaults")
        if value is None and key in UNSET_MEANS:
            return f"# {name} = (unset: {UNSET_MEANS[key]})  # {origin}"
        if value is None:
            rule = automatic.get(key)
            return f"# {name} = (unset: automatic{': ' + rule if rule else ''})  # {origin}"
        return f"{name} = {_toml_value(value)}  # {origin}"

    lines.append(line("seed", "seed", data.pop("seed")))
    for section, values in data.items():
        lines += ["", f"[{section}]"]
        lines += [line(f"{section}.{k}", k, v) for k, v in values.items()]
    return "\n".join(lines) + "\n"


def render_json(settings: Settings, sources: SettingsSources, num_classes: int | None = None) -> str:
    data = settings.to_dict()
    automatic = {
        key: rule
        for key, rule in settings.automatic_values(num_classes).items()
        if data[key.split(".")[0]][key.split(".")[1]] is None
    }
    unset = {key: meaning for key, meaning in UNSET_MEANS.items() if data[key.split(".")[0]][key.split(".")[1]] is None}
    body = {
        "config": data,
        "layers": sources.layers,
        "origins": sources.origins,
        "automatic": automatic,
        "unset": unset,
    }
    return json.dumps(body, indent=2) + "\n"
