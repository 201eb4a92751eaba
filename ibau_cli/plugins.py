"""Plugins: code that registers architectures, probes or model formats.

Two ways in, both recorded with their origin (``ibau plugins`` lists them):

- an installed package that declares an entry point in the group ``ibau.plugins``, e.g. in its
  pyproject.toml ``[project.entry-points."ibau.plugins"] my-archs = "my_pkg.ibau_plugin"``. The target
  is a module (importing it registers things) or a callable (called with no arguments);
- a Python file named with ``--plugin FILE`` (or ``IBAU_PLUGINS=file1.py:file2.py``). If it defines
  ``register()``, that is called after the import.

A plugin registers with ``ibau_cli.archs.register_arch``, ``ibau_cli.probes.register_probe`` or
``ibau_cli.formats.register_format``. Entry points are loaded once per process.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

from .errors import PluginError
from .registry import registering_from
from .user_code import import_file

GROUP = "ibau.plugins"


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    origin: str  # "entry point NAME (DIST VERSION)" or "file PATH"
    target: str  # the entry point's "module:attr" or the file path


_LOADED: dict[str, LoadedPlugin] = {}
_ENTRY_POINTS_DONE = False


def loaded_plugins() -> list[LoadedPlugin]:
    return list(_LOADED.values())


def load_entry_point_plugins() -> list[LoadedPlugin]:
    """Load every installed ``ibau.plugins`` entry point (once per process)."""
    global _ENTRY_POINTS_DONE
    if _ENTRY_POINTS_DONE:
        return loaded_plugins()
    for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        origin = f"entry point {ep.name} ({dist})"
        key = f"ep:{ep.name}:{ep.value}"
        if key in _LOADED:
            continue
        try:
            with registering_from(origin), contextlib.redirect_stdout(sys.stderr):  # keep --json stdout clean
                obj = ep.load()
                if callable(obj) and not isinstance(obj, ModuleType):
                    obj()
        except (Exception, SystemExit) as exc:  # a broken plugin is the user's input: say which and why
            raise PluginError(
                f"plugin {ep.name} ({ep.value}, from {dist}) failed to load: {type(exc).__name__}: {exc}",
                hint=f"fix or uninstall {ep.dist.name if ep.dist else 'the package'}, "
                "or run ibau --no-plugins to skip installed plugins",
            ) from exc
        _LOADED[key] = LoadedPlugin(ep.name, origin, ep.value)
    _ENTRY_POINTS_DONE = True  # only once every entry point loaded: a caller that caught an error can retry
    return loaded_plugins()


def load_plugin_file(path: Path) -> LoadedPlugin:
    """Import a plugin from a Python file and call its ``register()`` if it has one."""
    path = Path(path).expanduser().resolve()
    key = f"file:{path}"
    if key in _LOADED:
        return _LOADED[key]
    if path.is_dir():
        raise PluginError(
            f"plugin file {path} is a folder", hint="name the plugin's .py file, or pip install its package"
        )
    if not path.is_file():
        raise PluginError(f"plugin file not found: {path}")
    if path.suffix != ".py":
        raise PluginError(f"plugin {path} is not a .py file")
    origin = f"file {path}"
    try:
        with registering_from(origin), contextlib.redirect_stdout(sys.stderr):  # keep --json stdout clean
            module = import_file(path, "ibau_plugin")
            register = getattr(module, "register", None)
            if callable(register):
                register()
    except PluginError:
        raise
    except (Exception, SystemExit) as exc:  # SystemExit too: a plugin must not end the run as a pass
        raise PluginError(
            f"plugin {path} failed to load: {type(exc).__name__}: {exc}{_where(exc, path)}",
            hint="rerun with --debug for the traceback",
        ) from exc
    # a package's __init__.py is named after its package (ibau_example_plugin, not __init__)
    plugin = LoadedPlugin(path.parent.name if path.stem == "__init__" else path.stem, origin, str(path))
    _LOADED[key] = plugin
    return plugin


def load_plugins(files: list[Path] | tuple[Path, ...] = (), *, entry_points: bool = True) -> list[LoadedPlugin]:
    """Entry-point plugins (unless ``entry_points`` is False), then the given files, in order."""
    from . import archs, formats, probes  # noqa: F401  (built-ins first, so they keep origin "builtin")

    if entry_points:
        load_entry_point_plugins()
    for f in files:
        if str(f).strip():  # IBAU_PLUGINS="a.py:" or "a.py::b.py" leave empty entries
            load_plugin_file(Path(f))
    return loaded_plugins()


__all__ = ["GROUP", "LoadedPlugin", "load_entry_point_plugins", "load_plugin_file", "load_plugins", "loaded_plugins"]


def _where(exc: BaseException, path: Path) -> str:
    """ " (at FILE:LINE)" for the deepest frame of ``exc`` inside the plugin file, else ""."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path.resolve()]
    return f" (at {path}:{frames[-1].lineno})" if frames else ""
