"""The resolved configuration as TOML (loadable again with --config), each key with its origin."""

from __future__ import annotations

import json
from typing import Any

from .config import Settings
from .settings_resolve import SettingsSources


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def render_toml(settings: Settings, sources: SettingsSources) -> str:
    data = settings.to_dict()
    lines = [
        "# ibau resolved configuration (load it again with --config FILE)",
        "# layers, lowest first: " + " < ".join(sources.layers),
        "",
    ]

    def line(key: str, name: str, value: Any) -> str:
        origin = sources.origins.get(key, "defaults")
        if value is None:
            return f"# {name} = (unset: automatic)  # {origin}"
        return f"{name} = {_toml_value(value)}  # {origin}"

    lines.append(line("seed", "seed", data.pop("seed")))
    for section, values in data.items():
        lines += ["", f"[{section}]"]
        lines += [line(f"{section}.{k}", k, v) for k, v in values.items()]
    return "\n".join(lines) + "\n"


def render_json(settings: Settings, sources: SettingsSources) -> str:
    return (
        json.dumps({"config": settings.to_dict(), "layers": sources.layers, "origins": sources.origins}, indent=2)
        + "\n"
    )
