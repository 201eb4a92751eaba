"""The Python API: ``from ibau_cli import sanitize, scan``, with the CLI's behaviour.

Keyword arguments are the CLI's flags (``max_asr=0.05`` is ``--max-asr 0.05``); the same layers
(preset < config file < IBAU_* environment < arguments), the same checks, the same report, the
same atomic writes. Failures raise :class:`ibau_cli.errors.IbauError` subclasses whose
``exit_code`` is the CLI's; a failed gate is not an exception: look at ``report.verdict`` (or
``report.exit_code``). Installed plugins (entry points) are loaded as the CLI loads them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import IbauError, UsageError
from .pipeline import SanitizeRequest, TriggerSpec
from .progress import Progress
from .report import Report


def overrides_layer(
    settings: Mapping[str, Any] | Iterable[str] | None,
    *,
    input_size: Sequence[int] | int | str | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    seed: int | None = None,
    holdout: float | None = None,
    rounds: int | None = None,
    batch_size: int | None = None,
    max_asr: float | None = None,
    max_acc_drop: float | None = None,
    probes: bool = True,
) -> dict[str, Any]:
    """One override layer from ``--set`` style assignments (or a nested dict) and the flag shortcuts."""
    from .settings_resolve import parse_assignment

    layer: dict[str, Any] = {}
    given_by: dict[str, str] = {}  # key -> the assignment or flag that set it

    def put(section: str, key: str | None, value: Any, source: str) -> None:
        """Set one key; the same key set to another value twice in one command is a usage error
        (``--rounds 1 --set unlearn.rounds=3``: which one was meant?), the same value is not."""
        if value is None:
            return
        name = section if key is None else f"{section}.{key}"
        held = layer if key is None else layer.setdefault(section, {})
        slot = section if key is None else key
        if name in given_by and _plain(held[slot]) != _plain(value):
            raise UsageError(
                f"{name} is given twice with different values ({given_by[name]} and {source})",
                hint="give it once",
            )
        held[slot] = value
        given_by[name] = source

    if isinstance(settings, Mapping):
        for section, values in settings.items():
            if isinstance(values, Mapping):
                for key, value in values.items():
                    put(section, key, value, f"settings {section}.{key}")
            else:
                put(section, None, values, f"settings {section}")
    else:
        for text in settings or ():
            section, key, value = parse_assignment(text)
            put(section, key, value, f"--set {text}")
    put("preprocess", "input_size", None if input_size is None else list(input_size), "--input-size")
    put("preprocess", "mean", None if mean is None else list(mean), "--mean")
    put("preprocess", "std", None if std is None else list(std), "--std")
    put("split", "holdout", holdout, "--holdout")
    put("unlearn", "rounds", rounds, "--rounds")
    put("unlearn", "batch_size", batch_size, "--batch-size")
    put("gate", "max_asr", max_asr, "--max-asr")
    put("gate", "max_acc_drop", max_acc_drop, "--max-acc-drop")
    put("probes", "enabled", None if probes else False, "--no-probes")
    put("seed", None, seed, "--seed")
    return layer


def _plain(value: Any) -> Any:
    """A value to compare: tuples as lists ((32, 32) from Python is [32, 32] from a flag)."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def parse_size(text: str | None, flag: str = "--input-size") -> list[int] | None:
    """``"32x32"``, ``"32,32"`` or ``"32"`` (square) -> [H, W]."""
    if text is None:
        return None
    parts = str(text).lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected HxW or a single size, e.g. 32x32") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise UsageError(f"{flag} {text!r}: expected HxW")
    return values


def parse_floats(text: str | None, flag: str) -> list[float] | None:
    """``"0.5,0.5,0.5"`` -> [0.5, 0.5, 0.5]."""
    if text is None:
        return None
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers") from None


def make_request(
    model: str | Path,
    clean: str | Path,
    *,
    out: str | Path | None = None,
    arch: str | None = None,
    classes: str | Path | None = None,
    preset: str | None = None,
    config: str | Path | None = None,
    settings: Mapping[str, Any] | Iterable[str] | None = None,
    input_size: Sequence[int] | int | str | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    seed: int | None = None,
    device: str = "auto",
    trigger: str | Path | None = None,
    trigger_mask: str | Path | None = None,
    trigger_blend: float | None = None,
    trigger_additive: bool = False,
    trigger_pos: str = "br",
    target: int | None = None,
    max_asr: float | None = None,
    max_acc_drop: float | None = None,
    holdout: float | None = None,
    rounds: int | None = None,
    batch_size: int | None = None,
    probes: bool = True,
    force: bool = False,
    artifacts: str | Path | None = None,
    environment: Mapping[str, str] | None = os.environ,
    argv: Sequence[str] | None = None,
) -> SanitizeRequest:
    """Build the request the CLI would build from the same flags (``settings`` is ``--set``; sizes and
    statistics may be given as the CLI writes them: ``input_size="32x32"``, ``mean="0.5,0.5,0.5"``)."""
    if isinstance(input_size, str | int):
        input_size = parse_size(str(input_size))
    if isinstance(mean, str):
        mean = parse_floats(mean, "--mean")
    if isinstance(std, str):
        std = parse_floats(std, "--std")
    if isinstance(settings, str):  # one assignment, as one --set
        settings = [settings]
    spec = None
    if trigger is not None:
        if target is None:
            raise UsageError("--trigger needs --target N (the class the trigger flips to)")
        spec = TriggerSpec(
            image=trigger,
            target=target,
            mask=trigger_mask,
            blend=trigger_blend,
            additive=trigger_additive,
            position=trigger_pos,
        )
    else:
        given = [
            flag
            for flag, value in (
                ("--target", target is not None),
                ("--trigger-mask", trigger_mask is not None),
                ("--trigger-blend", trigger_blend is not None),
                ("--trigger-additive", bool(trigger_additive)),
                ("--trigger-pos", trigger_pos != "br"),
            )
            if value
        ]
        if given:
            many = len(given) > 1
            raise UsageError(
                f"{', '.join(given)} {'describe' if many else 'describes'} a trigger: "
                f"{'they need' if many else 'it needs'} --trigger IMAGE"
            )
    overrides = overrides_layer(
        settings,
        input_size=input_size,
        mean=mean,
        std=std,
        seed=seed,
        holdout=holdout,
        rounds=rounds,
        batch_size=batch_size,
        max_asr=max_asr,
        max_acc_drop=max_acc_drop,
        probes=probes,
    )
    return SanitizeRequest(
        model=model,
        clean=clean,
        out=out,
        arch=arch,
        classes_file=classes,
        preset=preset,
        config_file=config,
        overrides=overrides,
        device=device,
        trigger=spec,
        force=force,
        artifacts=artifacts,
        environment=None if environment is None else dict(environment),
        argv=None if argv is None else list(argv),
    )


def report_targets(
    paths: Iterable[str | Path],
    *,
    model: str | Path | None = None,
    out: str | Path | None = None,
    request: SanitizeRequest | None = None,
) -> list[tuple[Path, str]]:
    """Check report destinations before any work: (path, format) for each; format from the name.
    Each must be a writable file path; with ``model`` (and ``out``, the repaired model's path) none
    may be the input model, the repaired model or another report; with ``request``, none may be one
    of its other input files either, and its artifacts folder none of the outputs."""
    from .destinations import check_distinct, check_outside, check_regular_destination, check_writable_folder
    from .reporters import format_for_path

    targets = []
    for path in paths:
        path = Path(path)
        fmt = format_for_path(path)
        if not path.parent.exists():
            raise UsageError(f"--report {path}: folder {path.parent} does not exist", hint="create it first")
        if path.is_dir():
            raise UsageError(f"--report {path} is a folder; give a file name")
        check_regular_destination(path, "--report")
        if request is not None:  # before the write test, which would touch the clean folder
            check_outside(path, Path(request.clean), "--report", "--clean", is_file=True)
        check_writable_folder(path.parent, f"--report {path}")
        targets.append((path, fmt))
    if model is not None:
        inputs: dict[str, Path] = {}
        artifacts = None
        if request is not None:
            named = {"--classes": request.classes_file, "--config": request.config_file}
            if request.trigger is not None:
                named |= {"--trigger": request.trigger.image, "--trigger-mask": request.trigger.mask}
            inputs = {flag: Path(p) for flag, p in named.items() if p is not None}
            artifacts = None if request.artifacts is None else Path(request.artifacts)
        out_path = None if out is None else Path(out)
        check_distinct(Path(model), out_path, [p for p, _ in targets], inputs=inputs, artifacts=artifacts)
    return targets


def write_reports(report: Report, targets: Iterable[tuple[Path, str]]) -> None:
    """Write the report in each (path, format), each file atomically."""
    from .formats.base import write_atomically
    from .reporters import render

    data = report.to_dict()
    for path, fmt in targets:
        text = render(fmt, data, report.images)
        write_atomically(path, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def _paths(value: str | Path | Iterable[str | Path]) -> list[Path]:
    """One path or several (a lone string is one path, not its letters)."""
    return [Path(value)] if isinstance(value, str | Path) else [Path(v) for v in value]


# CLI flags whose keyword is spelled differently in the API
_RENAMED = {"no_probes": "probes=False", "report": "reports=[...]", "set": "settings", "classes_file": "classes"}


def _check_keywords(command: str, options: Mapping[str, Any]) -> None:
    """An unknown keyword is a usage error naming it (and the right spelling), not a bare TypeError."""
    import difflib
    import inspect

    known = [p for p in inspect.signature(make_request).parameters if p not in ("model", "clean")]
    for key in options:
        if key in known:
            continue
        if key in _RENAMED:
            hint = f"use {_RENAMED[key]}"
        elif key in ("quiet", "json", "debug", "format"):
            hint = "the API prints nothing; read the returned Report (report.to_dict() is the JSON)"
        else:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the keywords are {', '.join(known)}"
        raise UsageError(f"{command}(): unknown keyword {key!r}", hint=hint)


# CLI flags whose API spelling is not the flag with dashes as underscores
_API_SPELLING = {
    "no-probes": "probes=False",
    "no-plugins": "installed_plugins=False",
    "report": "reports=",
    "set": "settings=",
    "plugin": "plugins=",
    "force": "force=True",
    "trigger-additive": "trigger_additive=True",
}
_API_HINTS = {"rerun with --debug for the traceback": "the traceback is the exception's __cause__"}
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)( (?=\S*[A-Z0-9\[./=_]))?")


def api_spelling(text: str | None) -> str | None:
    """A CLI message in the API's words: ``--max-asr 0.05`` -> ``max_asr=0.05``, ``--no-probes`` ->
    ``probes=False`` (an API caller never typed a flag)."""
    if not text:
        return text
    for cli_words, api_words in _API_HINTS.items():
        text = text.replace(cli_words, api_words)

    def spell(match: re.Match) -> str:
        flag = match.group(1)
        if flag in _API_SPELLING:
            return _API_SPELLING[flag]
        return flag.replace("-", "_") + "="

    return _FLAG.sub(spell, text)


def _run(command: str, model, clean, reports, progress, plugins, load_installed, options) -> Report:
    try:
        return _run_unchecked(command, model, clean, reports, progress, plugins, load_installed, options)
    except IbauError as error:
        error.message, error.hint = api_spelling(error.message), api_spelling(error.hint)
        error.args = (error.message,)
        raise


def _run_unchecked(command: str, model, clean, reports, progress, plugins, load_installed, options) -> Report:
    from . import pipeline
    from .plugins import load_plugins

    load_plugins(_paths(plugins), entry_points=load_installed)
    _check_keywords(command, options)
    if command == "scan" and options.get("out") is not None:
        raise UsageError("scan writes no model: drop out=")
    request = make_request(model, clean, **options)
    out = pipeline.output_path(request) if command == "sanitize" else None
    targets = report_targets(_paths(reports), model=request.model, out=out, request=request)
    report = getattr(pipeline, command)(request, progress=progress)
    write_reports(report, targets)
    return report


def sanitize(
    model: str | Path,
    clean: str | Path,
    *,
    reports: str | Path | Iterable[str | Path] = (),
    progress: Progress | None = None,
    plugins: str | Path | Iterable[str | Path] = (),
    installed_plugins: bool = True,
    **options: Any,
) -> Report:
    """Repair ``model`` with I-BAU on the images in ``clean`` and gate; the same as ``ibau sanitize``.

    ``reports``: files to write (.json, .sarif, .xml, .html); ``plugins``: plugin files to load
    (the API does not read ``IBAU_PLUGINS``); ``installed_plugins=False`` is ``--no-plugins``;
    ``options``: :func:`make_request`'s keywords (the CLI flags). Returns the :class:`Report`.
    """
    return _run("sanitize", model, clean, reports, progress, plugins, installed_plugins, options)


def scan(
    model: str | Path,
    clean: str | Path,
    *,
    reports: str | Path | Iterable[str | Path] = (),
    progress: Progress | None = None,
    plugins: str | Path | Iterable[str | Path] = (),
    installed_plugins: bool = True,
    **options: Any,
) -> Report:
    """Probe ``model`` for a backdoor without repairing it; the same as ``ibau scan``."""
    return _run("scan", model, clean, reports, progress, plugins, installed_plugins, options)


__all__ = ["make_request", "report_targets", "sanitize", "scan", "write_reports"]
