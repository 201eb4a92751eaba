"""The command line: parse -> library call -> render -> exit code. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from . import __version__
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_TERMINATED,
    IbauError,
    UsageError,
)
from .repeated_options import OnceGroup

if TYPE_CHECKING:
    from .report import Report

EXIT_CODES_HELP = f"""
\b
Exit codes:
  {EXIT_OK}  passed: every evaluated gate is within its limit
  {EXIT_GATE_FAILED}  gate failed: ASR or accuracy drop past the limit, or (scan) a backdoor suspected, or (--strict) a gate not evaluated
  {EXIT_BAD_INPUT}  bad usage or bad input (one line says which file and what to do)
  {EXIT_RUNTIME}  runtime failure (device, numerics, writing the output)
  130  interrupted (Ctrl-C); no partial file is left
  143  terminated (SIGTERM: CI cancellation, docker stop); no partial file is left
"""

INSPECT_EXIT_CODES_HELP = f"""
\b
Exit codes:
  {EXIT_OK}  described
  {EXIT_BAD_INPUT}  bad usage or bad input (one line says which file and what to do)
  {EXIT_RUNTIME}  runtime failure
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM)
"""


class _RichProgress:
    """Progress bars on stderr, one task per phase, with a time estimate."""

    def __init__(self, console: Console, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.enabled = enabled
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> _RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def start(self, phase: str, total: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
        self.task = self.bar.add_task(phase, total=total)

    def advance(self, steps: int = 1) -> None:
        if self.task is not None:
            self.bar.advance(self.task, steps)

    def finish(self) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
        self.task = None


class _LineProgress:
    """Progress for a stderr that is not a terminal (a CI log): plain lines, no bars. Quiet for
    phases that end within ``first`` seconds (so short runs and one-line errors stay alone); a
    phase that runs longer gets a line then, another every ``every`` seconds, and one when it ends,
    so a runner that kills jobs silent for minutes sees a long repair advance."""

    def __init__(self, console: Console, first: float = 30.0, every: float = 60.0, clock=None) -> None:
        import time

        self.console = console
        self.first, self.every = first, every
        self.clock = clock or time.monotonic
        self.phase: str | None = None

    def __enter__(self) -> _LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.phase = None  # an error or Ctrl-C ends the run: no "done" line for the phase it cut

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def start(self, phase: str, total: int) -> None:
        self.finish()
        self.phase, self.total, self.done = phase, total, 0
        self.t0 = self.clock()
        self.last: float | None = None

    def advance(self, steps: int = 1) -> None:
        if self.phase is None:
            return
        self.done += steps
        now = self.clock()
        due = self.t0 + self.first if self.last is None else self.last + self.every
        if now >= due:
            self.last = now
            self._line(f"ibau: {self.phase}: {self.done}/{self.total} after {now - self.t0:.0f} s")

    def finish(self) -> None:
        if self.phase is not None and self.last is not None:
            self._line(f"ibau: {self.phase}: done in {self.clock() - self.t0:.0f} s")
        self.phase = None


def _progress(err: Console, quiet: bool) -> _RichProgress | _LineProgress:
    """Bars on a terminal, plain lines in a log, nothing with --quiet."""
    if quiet or err.is_terminal:
        return _RichProgress(err, enabled=not quiet)
    return _LineProgress(err)


def _fail(exc: IbauError, debug: bool) -> None:
    from rich.text import Text

    from .interrupts import remove_created_files

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    # a run that fails leaves none of the outputs it had created (a full disk under its second report
    # left the model and a first report saying "pass" in 0.4.5); the error stays the first line
    removed = remove_created_files()
    err.print(Text.assemble(("error:", "bold red"), " ", exc.one_line()))  # no markup: messages hold [brackets]
    if removed:
        err.print(f"removed the {len(removed)} file(s) this run had written: {', '.join(map(str, removed))}")
    if debug:
        import traceback

        traceback.print_exception(exc)
    sys.exit(exc.exit_code)


def _run(debug: bool, fn) -> Any:
    """Run ``fn`` mapping every failure to one line and a documented exit code."""
    try:
        return fn()
    except IbauError as exc:
        _fail(exc, debug)
    except KeyboardInterrupt:
        _exit_interrupted()
    except click.exceptions.Exit:
        raise
    except Exception as exc:  # anything unexpected is a runtime failure, not a traceback
        from .errors import RuntimeFailure, out_of_memory, out_of_memory_size

        if out_of_memory(exc):
            failure = RuntimeFailure(
                f"out of memory{out_of_memory_size(exc)}",
                hint="give fewer or smaller clean images, a smaller --batch-size or --input-size, or a machine "
                "with more memory (--device cpu if the GPU's ran out)",
            )
        else:
            failure = RuntimeFailure(
                f"unexpected {type(exc).__name__}: {exc}", hint="rerun with --debug for the traceback"
            )
        failure.__cause__ = exc
        _fail(failure, debug)


@click.group(cls=OnceGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ibau")
@click.option(
    "--plugin",
    "plugin_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Load a plugin file (registers architectures, probes or formats). Repeatable; env IBAU_PLUGINS.",
)
@click.option("--no-plugins", is_flag=True, help="Do not load installed plugins (entry points in ibau.plugins).")
def main(plugin_files: tuple[Path, ...], no_plugins: bool) -> None:
    """Find and remove backdoors in image classifiers with I-BAU, and gate on the result."""
    from .device import fit_threads_to_cpu_quota
    from .plugins import load_plugins

    fit_threads_to_cpu_quota()

    from_env = [Path(f) for f in os.environ.get("IBAU_PLUGINS", "").split(os.pathsep) if f.strip()]
    # plugins load before the command's own options are parsed: its --debug shows a plugin's traceback too
    debug = "--debug" in sys.argv[1:]
    _run(debug, lambda: load_plugins([*from_env, *plugin_files], entry_points=not no_plugins))


def _common_options(fn):
    """Options shared by sanitize and scan (model, data, preprocessing, trigger, gates, output)."""
    path = click.Path(path_type=Path)
    options = [
        click.argument("model", type=path),
        click.option("--clean", "clean_dir", required=True, type=path, help="Clean images, DIR/<class>/<image>."),
        click.option("--arch", help="Architecture: a built-in name (see `ibau archs`) or file.py:ClassOrFactory."),
        click.option("--classes", "classes_file", type=path, help="Class names, one per line, in output order."),
        click.option("--preset", help="Preprocessing/config preset: cifar10, gtsrb, mnist, imagenet."),
        click.option("--config", "config_file", type=path, help="TOML config file."),
        click.option(
            "--set",
            "assignments",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="Override any config key, e.g. unlearn.rounds=3.",
        ),
        click.option("--input-size", help="Model input size, HxW."),
        click.option("--mean", help="Normalisation mean, comma-separated per channel."),
        click.option("--std", help="Normalisation std, comma-separated per channel."),
        click.option("--seed", type=int, help="Seed for the split, the unlearning and the probes [0]."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--trigger", type=path, help="Known trigger image (a patch, or a full-size image)."),
        click.option("--trigger-mask", type=path, help="Grey-scale mask for a full-size trigger."),
        click.option("--trigger-blend", type=float, help="Blend a full-size trigger at this opacity."),
        click.option(
            "--trigger-additive", is_flag=True, help="Full-size trigger is an additive offset around mid-grey."
        ),
        click.option(
            "--trigger-pos", default="br", show_default=True, help="Patch position: br, bl, tr, tl, center or X,Y."
        ),
        click.option("--target", type=int, help="The trigger's target class index (required with --trigger)."),
        click.option(
            "--max-asr", type=float, help="Gate: highest ASR (true trigger, else the probes), fraction [0.2]."
        ),
        click.option("--force", is_flag=True, help="Continue even if clean accuracy is near chance."),
        click.option(
            "--strict", is_flag=True, help="A gate that could not be evaluated fails the run (exit 1): gate.strict."
        ),
        click.option("--artifacts", type=path, help="Write synthesised triggers and a before/after chart (PNG) here."),
        click.option(
            "--report",
            "report_paths",
            type=path,
            multiple=True,
            help="Write the report here; format from the name: .json, .sarif, .xml (JUnit), .html. Repeatable.",
        ),
        click.option(
            "--format",
            "stdout_format",
            type=click.Choice(["json", "sarif", "junit", "html"]),
            help="Print the report on stdout in this format (and nothing else; the summary goes to stderr).",
        ),
        click.option("--json", "json_stdout", is_flag=True, help="Same as --format json."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary (errors still go to stderr)."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command(epilog=EXIT_CODES_HELP)
@_common_options
@click.option("--out", type=click.Path(path_type=Path), help="Repaired model path [default: MODEL.sanitized.EXT].")
@click.option("--holdout", type=float, help="Fraction of the clean set held out for evaluation [0.2].")
@click.option(
    "--rounds", type=int, help="I-BAU rounds [5; doubled on sets of at most 160 unlearning images: unlearn.small_set]."
)
@click.option("--batch-size", type=int, help="Batch size [64].")
@click.option("--max-acc-drop", type=float, help="Gate: largest clean-accuracy drop, fraction [0.05].")
@click.option("--no-probes", is_flag=True, help="Skip the built-in trigger probes.")
def sanitize(**opts: Any) -> None:
    """Repair MODEL with I-BAU on the clean images, report before/after figures and gate.

    Every figure is measured on clean images held out from unlearning.
    """
    _run(opts["debug"], lambda: _sanitize(opts))


@main.command(epilog=EXIT_CODES_HELP)
@_common_options
def scan(**opts: Any) -> None:
    """Probe MODEL for a backdoor with built-in triggers, without repairing it.

    Every clean image is used for the probes. Exit 1 when a backdoor is suspected (or the ASR,
    true or estimated by the probes, is past --max-asr).
    """
    _run(opts["debug"], lambda: _scan(opts))


def _request(opts: dict[str, Any]):
    """The flags -> the library's request (the Python API builds it the same way)."""
    from .api import make_request

    return make_request(
        opts["model"],
        opts["clean_dir"],
        out=opts.get("out"),
        arch=opts["arch"],
        classes=opts["classes_file"],
        preset=opts["preset"],
        config=opts["config_file"],
        settings=(*opts.get("assignments", ()), *(("gate.strict=true",) if opts.get("strict") else ())),
        input_size=opts.get("input_size"),
        mean=opts.get("mean"),
        std=opts.get("std"),
        seed=opts.get("seed"),
        device=opts["device"],
        trigger=opts["trigger"],
        trigger_mask=opts["trigger_mask"],
        trigger_blend=opts["trigger_blend"],
        trigger_additive=opts["trigger_additive"],
        trigger_pos=opts["trigger_pos"],
        target=opts["target"],
        max_asr=opts.get("max_asr"),
        max_acc_drop=opts.get("max_acc_drop"),
        holdout=opts.get("holdout"),
        rounds=opts.get("rounds"),
        batch_size=opts.get("batch_size"),
        probes=not opts.get("no_probes"),
        force=opts["force"],
        artifacts=opts.get("artifacts"),
        environment=os.environ,
        argv=_argv(),
    )


def _argv() -> list[str]:
    """This process's command line as the user typed it: ``ibau`` and the arguments."""
    return ["ibau", *sys.argv[1:]]


def _sanitize(opts: dict[str, Any]) -> None:
    from .pipeline import sanitize as run_sanitize

    _execute(run_sanitize, opts)


def _scan(opts: dict[str, Any]) -> None:
    from .pipeline import scan as run_scan

    _execute(run_scan, opts)


def _report_targets(
    opts: dict[str, Any], model: Path, out: Path | None, request: Any = None
) -> tuple[list[tuple[Path, str]], str | None]:
    """Check the report destinations before any work: (path, format) pairs and the stdout format."""
    from .api import report_targets

    stdout_format = opts.get("stdout_format")
    if opts.get("json_stdout"):
        if stdout_format not in (None, "json"):
            raise UsageError(f"--json and --format {stdout_format} both ask for stdout; use one")
        stdout_format = "json"
    return report_targets(opts.get("report_paths") or (), model=model, out=out, request=request), stdout_format


def _execute(fn, opts: dict[str, Any]) -> None:
    from .pipeline import output_path

    request = _request(opts)
    targets = _report_targets(opts, request.model, output_path(request) if "out" in opts else None, request)
    err = Console(stderr=True)
    with _progress(err, opts["quiet"]) as progress:
        report = fn(request, progress=progress)
    _emit(report, targets, opts["quiet"], err)


def _emit(report: Report, targets: tuple[list[tuple[Path, str]], str | None], quiet: bool, err: Console) -> None:
    from .api import write_reports
    from .reporters import render
    from .reporters.console import render_console

    data = report.to_dict()
    files, stdout_format = targets
    write_reports(report, files)
    if stdout_format is not None:
        try:
            sys.stdout.write(render(stdout_format, data, report.images))
            sys.stdout.flush()
        except BrokenPipeError:  # `... --json | head -1`: the outputs are written and stay; the reader left
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        if not quiet:
            render_console(data, err)
    elif not quiet:
        render_console(data, Console())
    sys.exit(EXIT_OK if data["verdict"] == "pass" else EXIT_GATE_FAILED)


@main.command(epilog=INSPECT_EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "json_stdout", is_flag=True, help="Print JSON on stdout.")
@click.option("--debug", is_flag=True)
def inspect(model: Path, json_stdout: bool, debug: bool) -> None:
    """Describe MODEL: format, architecture, parameters, classes, input shape, metadata, sha256."""
    _run(debug, lambda: _inspect(model, json_stdout))


def _inspect(model: Path, json_stdout: bool) -> None:
    from .inspect_model import inspect_file

    info = inspect_file(model)
    if json_stdout:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    console = Console()
    for key in (
        "path",
        "format",
        "architecture",
        "graph",
        "num_classes",
        "num_classes_source",
        "input_shape",
        "parameters",
        "tensors",
        "dtypes",
        "size_bytes",
        "sha256",
    ):
        if key in info:
            console.print(f"[bold]{key:13s}[/] {info[key]}")
    first = info.get("first_tensors", {})
    for k, v in first.items():  # names --arch must match; the first 12 (--json has them too)
        console.print(f"[bold]tensor[/]        {k} {v['shape']} {v['dtype']}", markup=True, highlight=False)
    if first and info.get("tensors", 0) > len(first):
        console.print(f"[bold]tensor[/]        ... {info['tensors'] - len(first)} more (ibau inspect --json)")
    for k, v in info["metadata"].items():
        console.print(f"[bold]metadata[/]      {k} = {v}", markup=True, highlight=False)
    for w in info.get("warnings", []):
        Console(stderr=True, highlight=False).print(f"warning: {w}", markup=False)


@main.group()
def config() -> None:
    """Configuration: `ibau config show` prints what a run would use."""


@config.command("show")
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--arch", help="Architecture (as for sanitize).")
@click.option("--preset", help="Preset: cifar10, gtsrb, mnist, imagenet.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--set", "assignments", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a key.")
@click.option("--input-size", help="Model input size, HxW (as for sanitize).")
@click.option("--mean", help="Normalisation mean, comma-separated per channel (as for sanitize).")
@click.option("--std", help="Normalisation std, comma-separated per channel (as for sanitize).")
@click.option("--seed", type=int, help="Seed (as for sanitize).")
@click.option(
    "--clean",
    type=click.Path(path_type=Path),
    help="The clean folder a run would read: with MODEL, its images' size when nothing declares the input size.",
)
@click.option("--json", "json_stdout", is_flag=True, help="Print JSON (config, layers, origins) instead of TOML.")
@click.option("--debug", is_flag=True)
def config_show(
    model: Path | None,
    arch: str | None,
    preset: str | None,
    config_file: Path | None,
    assignments: tuple[str, ...],
    input_size: str | None,
    mean: str | None,
    std: str | None,
    seed: int | None,
    clean: Path | None,
    json_stdout: bool,
    debug: bool,
) -> None:
    """Print the resolved configuration, each key with the layer that set it.

    Layers, lowest first: defaults < the model and the clean images (an input shape nothing else
    declares) < architecture < model graph < model metadata < preset < config file (--config, else
    $IBAU_CONFIG) < environment (IBAU_SECTION__KEY) < command line. With MODEL, the model's own
    metadata and input shape take part, as in a run; with --clean too, its images' size.
    """
    shortcuts = {"input_size": input_size, "mean": mean, "std": std, "seed": seed}
    _run(debug, lambda: _config_show(model, arch, preset, config_file, assignments, shortcuts, json_stdout, clean))


def _config_show(model, arch, preset, config_file, assignments, shortcuts, json_stdout, clean=None) -> None:
    from .api import overrides_layer, parse_floats, parse_size
    from .config_show import render_json, render_toml
    from .pipeline import SanitizeRequest, settings_for
    from .settings_resolve import resolve_settings

    overrides = overrides_layer(
        assignments,
        input_size=parse_size(shortcuts["input_size"]),
        mean=parse_floats(shortcuts["mean"], "--mean"),
        std=parse_floats(shortcuts["std"], "--std"),
        seed=shortcuts["seed"],
    )
    if arch is not None and ":" not in arch:
        from .archs import ARCHS

        if arch not in ARCHS:
            raise UsageError(f"--arch {arch}: unknown architecture", hint=f"known: {', '.join(ARCHS.names())}")
    if clean is not None and model is None:
        raise UsageError("--clean is read with MODEL only (the size its images share, for that model)",
                         hint="give the model: ibau config show MODEL --clean DIR")  # fmt: skip
    if clean is not None and not clean.is_dir():
        raise UsageError(f"--clean {clean} is not a folder", hint="pass the clean folder a run would read")
    if model is not None:
        from .formats import load_model

        request = SanitizeRequest(
            model=model,
            clean=Path("."),
            arch=arch,
            preset=preset,
            config_file=config_file,
            overrides=overrides,
            environment=dict(os.environ),
        )
        loaded = load_model(model, arch=arch)
        settings, sources = settings_for(loaded, request, clean)
        num_classes = loaded.num_classes or _output_width(loaded.module, settings.preprocess)
    else:
        num_classes = None
        settings, sources = resolve_settings(
            arch=arch,
            model_preprocess=None,
            preset=preset,
            config_file=config_file,
            overrides=overrides,
            environment=dict(os.environ),
        )
    sys.stdout.write((render_json if json_stdout else render_toml)(settings, sources, num_classes))


def _output_width(module, preprocess) -> int | None:
    """The class count of a model whose file does not say it (TorchScript, a .pt2 program, a plain
    state dict): its output width on one blank input of the resolved shape, as sanitize finds it;
    None when it does not run on that shape (config show then names the rule without a number)."""
    import torch

    from .output_check import class_count
    from .preprocess import Normalized

    try:
        with torch.no_grad():
            out = Normalized(module, preprocess).eval()(torch.zeros(1, preprocess.channels, *preprocess.input_size))
        return class_count(out, "the model")
    except Exception:  # noqa: BLE001 - a display: the run itself reports what is wrong
        return None


@main.command()
@click.option("--json", "json_stdout", is_flag=True, help="Print JSON on stdout.")
def plugins(json_stdout: bool) -> None:
    """List the loaded plugins and every registered architecture, probe and format, with its origin."""
    from .archs import ARCHS
    from .formats import FORMATS
    from .plugins import loaded_plugins
    from .probes import PROBES

    registries = {"architectures": ARCHS, "probes": PROBES, "formats": FORMATS}
    data = {
        "plugins": [{"name": p.name, "origin": p.origin, "target": p.target} for p in loaded_plugins()],
        **{kind: [{"name": n, "origin": reg.origin(n)} for n in reg.names()] for kind, reg in registries.items()},
    }
    if json_stdout:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    console = Console(highlight=False)
    console.print(f"[bold]plugins[/] ({len(data['plugins'])} loaded)")
    for p in data["plugins"]:
        console.print(f"  {p['name']}  [dim]{p['origin']} -> {p['target']}[/]", markup=True)
    for kind, reg in registries.items():
        builtin = [n for n in reg.names() if reg.origin(n) == "builtin"]
        extra = [n for n in reg.names() if reg.origin(n) != "builtin"]
        console.print(f"[bold]{kind}[/] ({len(builtin)} built in, {len(extra)} from plugins)")
        for n in reg.names() if kind != "probes" else extra:
            console.print(f"  {n}  [dim]{reg.origin(n)}[/]")
        if kind == "probes":
            console.print(f"  and {len(builtin)} built-in probes (docs/probes.md)")


@main.command()
def archs() -> None:
    """List the registered architectures."""
    from .archs import ARCHS

    console = Console()
    for name in ARCHS.names():
        spec = ARCHS.get(name)
        shape = "input not declared" if spec.input_size is None else "{}x{}".format(*spec.input_size)
        if spec.channels is not None:
            shape = f"{spec.channels}x{shape}" if spec.input_size is not None else f"{spec.channels} channels"
        console.print(f"[bold]{name}[/]  {shape}  {spec.description}  [dim]({ARCHS.origin(name)})[/]")


@main.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--dir",
    "workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to build the demo [~/.cache/ibau/demo].",
)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_stdout", is_flag=True, help="Print the JSON report on stdout.")
@click.option(
    "--report",
    "report_paths",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Write the report here (.json, .sarif, .xml, .html). Repeatable.",
)
@click.option("--debug", is_flag=True)
def demo(workdir: Path | None, device: str, json_stdout: bool, report_paths: tuple[Path, ...], debug: bool) -> None:
    """Build a small backdoored model and clean folder, then sanitize it with the report shown."""
    _run(debug, lambda: _demo(workdir, device, json_stdout, report_paths))


def _demo(workdir: Path | None, device: str, json_stdout: bool, report_paths: tuple[Path, ...]) -> None:
    import os

    from .demo import build_demo
    from .destinations import check_artifacts_folder
    from .pipeline import SanitizeRequest, TriggerSpec
    from .pipeline import sanitize as run_sanitize

    root = workdir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ibau" / "demo"
    check_artifacts_folder(root, "--dir" if workdir is not None else "the demo folder")
    targets = _report_targets(
        {"report_paths": report_paths, "json_stdout": json_stdout},
        root / "model.safetensors",
        root / "fixed.safetensors",
    )
    err = Console(stderr=True)
    if not (root / "model.safetensors").exists() or not (root / "clean").exists():
        with err.status("building the demo: training a small CNN with a BadNets backdoor (about 20 s on a CPU)"):
            paths = build_demo(root)
        from .interrupts import track_created_files

        track_created_files()  # the demo's model and images are a cache, not outputs a failed run removes
    else:
        paths = {"model": root / "model.safetensors", "clean": root / "clean", "trigger": root / "trigger.png"}
    err.print(
        f"demo model {paths['model']} (BadNets: 3x3 white patch, target 0)\n"
        f"running: ibau sanitize {paths['model']} --clean {paths['clean']} --trigger {paths['trigger']} --target 0 "
        f"--out {root / 'fixed.safetensors'}",
        soft_wrap=True,  # one line, so that it can be copied as a command
        markup=False,
        highlight=False,
    )
    request = SanitizeRequest(
        model=paths["model"],
        clean=paths["clean"],
        out=root / "fixed.safetensors",
        device=device,
        trigger=TriggerSpec(image=paths["trigger"], target=0),
        environment=dict(os.environ),  # IBAU_SECTION__KEY and IBAU_CONFIG, as `ibau sanitize` reads them
        argv=_argv(),
    )
    with _progress(err, False) as progress:
        report = run_sanitize(request, progress=progress)
    _emit(report, targets, False, err)


_terminated = False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM takes Ctrl-C's way out: the exception unwinds through every ``finally`` that removes
    a temporary file, then the exit code says which signal it was."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    from .interrupts import remove_created_files

    _ignore_interrupts()  # a second Ctrl-C while exiting would end the process with no message
    removed = remove_created_files()  # a cancelled run leaves none of its outputs, complete or not
    Console(stderr=True).print("terminated" if _terminated else "interrupted")
    if removed:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"removed the {len(removed)} file(s) this run had written: {', '.join(map(str, removed))}", markup=False
        )
    sys.exit(EXIT_TERMINATED if _terminated else EXIT_INTERRUPTED)


def _ignore_interrupts() -> None:
    """Once the outcome is decided (every output written or removed), Ctrl-C and SIGTERM are ignored:
    the interpreter's shutdown takes a moment with torch loaded, and a signal then killed the process
    by the signal, no message and no exit code, after a run that had finished."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_GLOBAL_OPTIONS = ("--plugin", "--no-plugins", "--version")  # options of `ibau` itself, not of its commands


def run(argv: list[str] | None = None) -> None:
    """The ``ibau`` entry point: ``main`` with Ctrl-C mapped to exit 130 and SIGTERM to 143 at any
    moment (click's own handling prints "Aborted!" and exits 1, the gate-failed code, when Ctrl-C
    comes during start-up; Python's default for SIGTERM skips every clean-up)."""
    import signal

    from .interrupts import track_created_files

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # one the parent ignored stays ignored
        signal.signal(signal.SIGTERM, _on_sigterm)
    track_created_files()
    for stream in (sys.stdout, sys.stderr):  # a terminal or log that cannot show a character gets an escape
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        rv = main.main(args=argv, prog_name="ibau", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _exit_interrupted()
    except click.ClickException as exc:  # click's own usage errors, on one line as ibau's are
        ctx = getattr(exc, "ctx", None)
        where = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        if isinstance(exc, click.NoSuchOption) and exc.option_name in _GLOBAL_OPTIONS and ctx is not None:
            # `ibau sanitize M --plugin p.py`: a global option after the command
            where = (
                f"; {exc.option_name} is an option of ibau itself: put it before the command "
                f"(`ibau {exc.option_name} ... {ctx.info_name} ...`; see `ibau --help`)"
            )
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"error: {exc.format_message().rstrip('.')}{where}", markup=False
        )
        sys.exit(exc.exit_code)
    finally:  # the outcome is decided, whichever way the run ended
        _ignore_interrupts()
        from .interrupts import stop_tracking_created_files

        stop_tracking_created_files()
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)


if __name__ == "__main__":  # pragma: no cover
    run()
