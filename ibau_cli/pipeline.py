"""sanitize(): load -> check -> evaluate -> unlearn -> evaluate -> save -> verify -> Report.

No terminal, no click: progress goes through a callback and problems are IbauErrors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .artifacts import render_images, write_artifacts
from .config import Settings
from .data import duplicate_groups, load_clean_folder, stratified_split
from .destinations import (
    check_artifacts_folder,
    check_outside,
    check_regular_destination,
    check_writable_folder,
    same_file,
)
from .device import amp_dtype, resolve_device
from .errors import ModelMismatchError, RuntimeFailure, UsageError, first_line, out_of_memory
from .evaluate import attack_success, predictions
from .formats import format_for_output, load_model, save_model, sha256_file
from .formats.metadata import num_classes_from_metadata
from .formats.onnx_graph import NodeFailure
from .gates import asr_probe_gate, gates_for, true_trigger_gate, unshown_passes, verdict_of
from .guidance import (
    GIVEN_TRIGGER,
    TRIGGER_WORKS,
    class_to_guide,
    guide_proxy,
    known_trigger_to_unlearn,
    patch_region_for,
    perturbation_families,
    proxy_is_patch,
    proxy_monitor,
)
from .input_shape import infer_input
from .metrics import Rate
from .normalisation_check import BetterPreprocess, better_preprocess
from .output_check import (
    PARITY_TOL,
    check_deterministic,
    class_count,
    model_output_kind,
    reference_parity,
    round_to_stored_dtypes,
    verify_written,
)
from .preprocess import Normalized
from .progress import NoProgress, Progress
from .report import Figures, Gate, Report
from .settings_resolve import INFERRED_LAYER, SettingsSources, resolve_settings
from .triggers import load_trigger
from .unlearn import unlearn


@dataclass(frozen=True)
class TriggerSpec:
    image: Path
    target: int
    mask: Path | None = None
    blend: float | None = None
    additive: bool = False
    position: str = "br"

    def __post_init__(self) -> None:
        _as_paths(self, ("image", "mask"))


def _as_paths(obj: object, names: tuple[str, ...]) -> None:
    """Library callers may pass strings; every path field becomes a Path."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not isinstance(value, Path):
            object.__setattr__(obj, name, Path(value))


@dataclass(frozen=True)
class SanitizeRequest:
    model: Path
    clean: Path
    out: Path | None = None
    arch: str | None = None
    classes_file: Path | None = None
    preset: str | None = None
    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    trigger: TriggerSpec | None = None
    force: bool = False
    save: bool = True
    artifacts: Path | None = None
    environment: Mapping[str, str] | None = None  # IBAU_SECTION__KEY variables (the CLI passes os.environ)
    argv: Sequence[str] | None = None  # the command line that asked for the run, for the report (the CLI's own)

    def __post_init__(self) -> None:
        _as_paths(self, ("model", "clean", "out", "classes_file", "config_file", "artifacts"))


class _Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t


def default_output_path(model: Path) -> Path:
    # a pickled checkpoint (.pkl, read with weights_only) is written as a torch checkpoint: .pt
    suffix = ".pt" if model.suffix.lower() == ".pkl" else model.suffix
    return model.with_name(f"{model.stem}.sanitized{suffix}")


def _check_output_path(model: Path, out: Path) -> None:
    if same_file(out, model):
        raise UsageError(
            f"--out {out} is the input model; ibau never modifies its input",
            hint="choose another output path",
        )
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file path")
    check_regular_destination(out, "--out")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: output folder does not exist: {out.parent}", hint="create it first")
    check_writable_folder(out.parent, f"--out {out}")


def _check_finite_weights(module: torch.nn.Module, path: Path) -> None:
    """NaN or infinite weights make every figure meaningless and spread through the repair."""
    bad = [(name, t) for name, t in [*module.named_parameters(), *module.named_buffers()]
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]  # fmt: skip
    if bad:
        count = sum(int((~torch.isfinite(t)).sum()) for _, t in bad)
        raise ModelMismatchError(
            f"{path}: {count} weights are NaN or infinite (in {len(bad)} tensors, first {bad[0][0]})",
            hint="the file is corrupt or its training diverged; ibau cannot evaluate or repair it",
        )


def output_path(request: SanitizeRequest) -> Path | None:
    """Where sanitize will write the repaired model (None when it writes none)."""
    if not request.save:
        return None
    return Path(request.out) if request.out else default_output_path(Path(request.model))


@dataclass
class _Prepared:
    """Everything sanitize and scan share: the model, settings, data and trigger, checked."""

    loaded: Any
    settings: Any
    sources: Any
    model: Normalized
    num_classes: int
    clean: Any
    x_u: torch.Tensor
    y_u: torch.Tensor
    x_h: torch.Tensor
    y_h: torch.Tensor
    trigger: Any
    device: torch.device
    amp: Any
    eval_kw: dict
    input_sha: str
    parity: dict | None
    before: Figures
    out_fmt: Any  # the output's ModelFormat, None when nothing is written
    timer: _Timer
    warnings: list[str]
    holdout_files: list[str]  # the held-out images, paths under the clean folder
    trigger_sha: dict  # the --trigger file's sha256 and its mask's, as read (empty without one)

    def figures(self) -> Figures:
        return _figures(self.model, self.x_h, self.y_h, self.trigger, self.eval_kw)


def _figures(model, x, y, trigger, eval_kw) -> Figures:
    correct = (predictions(model, x, **eval_kw) == y).tolist() if len(y) else []
    asr = attack_success(model, x, y, trigger, **eval_kw) if trigger else None
    return Figures(Rate(sum(correct), len(correct)), asr, correct)


def settings_for(loaded, request: SanitizeRequest, clean: Path | None = None) -> tuple[Settings, SettingsSources]:
    """The effective settings for a loaded model and a request, with where each key came from. The
    input shape nothing declares is read from the model's first convolution and, given ``clean``,
    from the size all its images share (input_shape.py)."""

    def resolved(inferred_layer: dict | None) -> tuple[Settings, SettingsSources]:
        return resolve_settings(
            arch=loaded.arch if request.arch is None or ":" not in (request.arch or "") else None,
            model_preprocess=loaded.preprocess,
            model_input=loaded.input_hint,
            inferred=inferred_layer,
            preset=request.preset,
            config_file=request.config_file,
            overrides=request.overrides,
            environment=request.environment,
        )

    settings, sources = resolved(None)
    undeclared = {k for k in ("preprocess.channels", "preprocess.input_size") if sources.origins.get(k) == "defaults"}
    # only then are the model and the clean images read for it (the images' headers: 0.9 s for 5,000)
    inferred = None
    if undeclared:
        inferred = infer_input(loaded.module, clean if "preprocess.input_size" in undeclared else None)
    if inferred is not None:
        settings, sources = resolved(inferred.layer())
        said = {
            "preprocess.channels": inferred.channels_from,
            "preprocess.input_size": inferred.size_from,
        }
        taken = [why for key, why in said.items() if why and sources.origins.get(key) == INFERRED_LAYER]
        pre = settings.preprocess
        note = (
            f"input shape {pre.channels}x{pre.input_size[0]}x{pre.input_size[1]} read from the model and the clean "
            f"images, as nothing declares it ({'; '.join(taken)}); --input-size HxW or --set preprocess.channels=N "
            "sets it"
        )
        if taken and note not in loaded.notes:
            loaded.notes.append(note)
    return settings, sources


def _duplicate_warnings(groups: torch.Tensor, labels: torch.Tensor, files: list[str], split: bool) -> list[str]:
    """What copies of images in the clean set mean for the figures (``duplicate_groups``)."""
    copied = (groups != torch.arange(len(groups))).nonzero().flatten().tolist()
    if not copied:
        return []
    said = [
        f"{len(copied)} of {len(groups)} clean images are exact copies of others (the same pixels, e.g. "
        f"{files[copied[0]]} of {files[int(groups[copied[0]])]}): every n counts each copy, so the figures rest "
        "on fewer distinct images than n says"
        + ("; an image and its copies of the same class were kept on one side of the split" if split else "")
    ]
    mixed = [i for i in copied if int(labels[i]) != int(labels[int(groups[i])])]
    if mixed:
        said.append(
            f"{len(mixed)} images are stored under two classes (e.g. {files[mixed[0]]} and "
            f"{files[int(groups[mixed[0]])]}): their labels contradict each other; remove the wrong copies"
        )
    return said


def _prepare(request: SanitizeRequest, *, split: bool, out_path: Path | None) -> _Prepared:
    """Load, resolve settings, read and split the clean data, check parity and sanity."""
    timer = _Timer()
    warnings: list[str] = []
    device = resolve_device(request.device)
    with timer.phase("load"):
        loaded = load_model(Path(request.model), arch=request.arch, device="cpu")
        input_sha = sha256_file(Path(request.model))
    out_fmt = None
    if out_path is not None:
        out_fmt = format_for_output(out_path, loaded.fmt)
        if not out_fmt.can_save_from(loaded.fmt):
            raise UsageError(
                f"--out {out_path}: cannot write {out_fmt.name} from {'an' if loaded.fmt[0] in 'aeio' else 'a'} "
                f"{loaded.fmt} model",
                hint=f"write {loaded.fmt} (the input's format); conversions: safetensors <-> checkpoint, either "
                "-> TorchScript or .pt2; ONNX only from ONNX",
            )
        out_fmt.check_can_save(loaded.module, out_path)
    settings, sources = settings_for(loaded, request, Path(request.clean))
    pre = settings.preprocess
    _check_finite_weights(loaded.module, Path(request.model))
    model = Normalized(loaded.module, pre).to(device).eval()
    amp = amp_dtype(device, settings.unlearn.amp)
    with torch.no_grad():
        dummy = torch.zeros(1, pre.channels, *pre.input_size, device=device)
        try:
            raw = model(dummy)
        except NodeFailure as exc:  # an ONNX graph: say where it failed, not only what may be the cause
            raise ModelMismatchError(
                f"{request.model}: ibau could not run the ONNX graph on a {pre.channels}x{pre.input_size[0]}x"
                f"{pre.input_size[1]} input: {first_line(exc)}",
                hint="if the input size is wrong set it (--input-size, --preset, --set preprocess.input_size=[H,W]); "
                "otherwise report the exporter and opset (ibau inspect MODEL lists the graph's operators)",
            ) from None
        except Exception as exc:
            if out_of_memory(exc):
                raise
            raise ModelMismatchError(
                f"{request.model}: the model does not run on a {pre.channels}x{pre.input_size[0]}x{pre.input_size[1]} input ({first_line(exc)})",
                hint="set the input size and channels with --input-size, --preset, --config or --set "
                "preprocess.input_size=[H,W] / --set preprocess.channels=N",
            ) from None
    outputs = class_count(raw, request.model)
    num_classes = loaded.num_classes or outputs
    said = num_classes_from_metadata(loaded.metadata, request.model)
    if said is not None and said != num_classes == outputs:
        # a state dict's class count is its classifier's rows: ibau inspect warned of such metadata and
        # sanitize said nothing (a QA pass); the file ibau writes carries the right count
        warnings.append(
            f"the model's metadata says {said} classes but its classifier has {outputs} outputs: the outputs "
            "count (the file ibau writes says so)"
        )
    if num_classes != outputs:
        raise ModelMismatchError(
            f"{request.model}: the file says {num_classes} classes but the model has {outputs} outputs",
            hint="fix the file's ibau.num_classes metadata (or its architecture's num_classes)",
        )

    with timer.phase("data"):
        clean = load_clean_folder(Path(request.clean), pre, num_classes, classes_file=request.classes_file)
        groups = duplicate_groups(clean.images)
        if split:
            parts = stratified_split(clean.labels, settings.split.holdout, settings.seed, groups)
            x_u, y_u = clean.images[parts.unlearn_idx], clean.labels[parts.unlearn_idx]
            x_h, y_h = clean.images[parts.holdout_idx], clean.labels[parts.holdout_idx]
            holdout_files = [clean.files[i] for i in parts.holdout_idx.tolist()]
        else:  # nothing is unlearned: every image is held out
            x_u, y_u = clean.images[:0], clean.labels[:0]
            x_h, y_h = clean.images, clean.labels
            holdout_files = list(clean.files)
    present = set(torch.unique(clean.labels).tolist())
    if len(present) < num_classes:
        missing = [c for c in range(num_classes) if c not in present]
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        warnings.append(
            f"the clean set has images of {len(present)} of the model's {num_classes} classes (none of {shown}): "
            "every figure is measured on those classes only, and the repair cannot keep what it never sees"
        )
    if split and len(y_u) < MIN_TESTED_UNLEARN:
        warnings.append(
            f"only {len(y_u)} images for unlearning; ibau is tested down to {MIN_TESTED_UNLEARN} "
            "(100 clean images, 22 held out)"
        )
    if len(y_h) < 100:
        warnings.append(f"only {len(y_h)} held-out images: every rate measured on them has a wide confidence interval")
    warnings += _conversion_warnings(clean, pre)
    shrunk = clean.conversions.get("shrunk_2x_or_more", 0)
    resized = clean.conversions.get("resized", 0)
    assumed = sources.origins.get("preprocess.input_size") == "defaults"
    if sources.origins.get("preprocess.input_size") == INFERRED_LAYER:
        warnings.append(
            f"the model's input size, {pre.input_size[0]}x{pre.input_size[1]}, is the size of every clean image: "
            "nothing declares it (no --input-size, preset, config, architecture or model metadata); if the model "
            "was trained at another size, set --input-size HxW"
        )
    if shrunk == len(clean.labels) and shrunk and assumed:
        # every image at least twice the size ibau assumed when nothing said the model's input size
        warnings.append(
            f"all {shrunk} clean images are at least twice {pre.input_size[0]}x{pre.input_size[1]} on each side, "
            "the input size ibau assumes when nothing sets it (no --input-size, preset, config or model metadata): "
            "if the model takes larger images, set --input-size HxW, or every figure is measured on shrunk images"
        )
    elif resized == len(clean.labels) and resized and assumed:
        # every image resized to the assumed size (a QA model trained at 40x40 ran at 32x32 unremarked)
        example = clean.examples.get("resized", "")
        warnings.append(
            f"all {resized} clean images were resized to {pre.input_size[0]}x{pre.input_size[1]}, the input size "
            f"ibau assumes when nothing sets it (no --input-size, preset, config or model metadata); {example} is "
            f"{_image_size(Path(request.clean) / example)}: if the model takes the images' own size, set --input-size HxW (a --trigger-pos "
            "is in the model's input pixels)"
        )
    warnings += _duplicate_warnings(groups, clean.labels, clean.files, split)
    unheld = sorted(set(clean.labels.tolist()) - set(y_h.tolist()))
    if split and unheld:  # one image, or copies of one: nothing of the class is left to measure it on
        shown = ", ".join(map(str, unheld[:10])) + (f" and {len(unheld) - 10} more" if len(unheld) > 10 else "")
        warnings.append(
            f"{len(unheld)} class(es) have no held-out image ({shown}): one image, or copies of one, which the "
            "repair uses; no figure measures them. Give each class at least two distinct images"
        )
    if clean.hidden_with_images:
        warnings.append(
            f"hidden folder(s) at the top of the clean folder hold images and were not read "
            f"({', '.join(clean.hidden_with_images[:3])}): a class folder whose name starts with '.' is not a class; "
            "rename it if it is one"
        )
    if split and len(clean.labels) and len(y_h) / len(clean.labels) > settings.split.holdout + 0.05:
        warnings.append(
            f"{len(y_h)} of {len(clean.labels)} images held out ({len(y_h) / len(clean.labels):.0%}, not "
            f"split.holdout = {settings.split.holdout:.0%}): every class keeps at least one held-out image"
        )
    if settings.probes.enabled:
        from .probes.synthesised import steps_per_class

        per_class = steps_per_class(settings.probes.budget_steps, num_classes)
        if per_class * num_classes > 1.5 * settings.probes.budget_steps:
            warnings.append(
                f"the synthesised probes take {per_class} steps for each of {num_classes} classes: "
                f"{per_class * num_classes} per probe, past probes.budget_steps = {settings.probes.budget_steps} "
                "(at least 10 a class)"
            )

    trigger = None
    trigger_sha: dict[str, str | None] = {}
    if request.trigger is not None:
        t = request.trigger
        if not 0 <= t.target < num_classes:
            raise UsageError(f"--target {t.target} is not a class of this {num_classes}-class model")
        trigger = load_trigger(
            t.image, target=t.target, pre=pre, mask_path=t.mask, blend=t.blend, additive=t.additive, position=t.position
        )
        # hashed once read (and checked) there, not when the report is built at the end of the run
        trigger_sha = {"sha256": sha256_file(t.image), "mask_sha256": None if t.mask is None else sha256_file(t.mask)}
        if int((y_h != t.target).sum()) == 0:
            raise UsageError("every held-out image belongs to the --target class, so the ASR cannot be measured")

    eval_kw = {"device": device, "amp": amp, "batch_size": max(settings.unlearn.batch_size, 256)}
    parity = None
    if loaded.reference is not None:
        with timer.phase("parity"):
            parity = reference_parity(model, loaded.reference, x_h, eval_kw)
        if parity["argmax_agreement"] < 0.99 or parity["max_abs_logit_diff"] > PARITY_TOL * max(
            1.0, parity["max_abs_logit"]
        ):
            raise ModelMismatchError(
                f"{request.model}: ibau's execution of the graph differs from onnxruntime "
                f"(max logit difference {parity['max_abs_logit_diff']:.2e}, argmax agreement {parity['argmax_agreement']:.1%})",
                hint="report the model's exporter and opset; repairing it would not be trustworthy",
            )
    check_deterministic(model, clean.images, eval_kw, request.model)
    kind = model_output_kind(model, clean.images, eval_kw)
    if kind == "probabilities" and getattr(model.model, "softmax_input", None):
        # an ONNX graph ending in a Softmax: work on its input, the logits; the file keeps the Softmax
        model.model.output_logits = True
        kind = model_output_kind(model, clean.images, eval_kw)
        if kind != "logits":
            model.model.output_logits = False
        else:
            warnings.append(
                "the model outputs probabilities (its graph ends in a Softmax): ibau measures, probes and "
                "repairs on the Softmax's input, the logits; the written graph keeps the Softmax"
            )
    if kind != "logits":
        what = "probabilities (a softmax)" if kind == "probabilities" else "scores in [0, 1] (sigmoids)"
        if split:
            # measured: I-BAU's inner maximisation drives the true class's probability to exactly 0 in
            # float32, where the softmax passes no gradient at all, so the repair changes nothing
            raise ModelMismatchError(
                f"{request.model}: the model outputs {what}, not logits; I-BAU cannot repair it: its "
                "adversarial images push probabilities to exactly 0, where no gradient flows",
                hint="export the model without its final softmax/sigmoid and sanitize that (ibau scan reads it as it is)",
            )
        model.log_outputs = True  # after the ONNX parity check, which compares raw outputs
        warnings.append(f"the model outputs {what}, not logits: the probes optimise on their logarithm")
    with timer.phase("evaluate_before"):
        before = _figures(model, x_h, y_h, trigger, eval_kw)
    if (
        trigger is not None
        and before.asr is not None
        and before.asr.value is not None
        and before.asr.value < TRIGGER_WORKS
    ):
        warnings.append(
            f"the given trigger sends only {before.asr.value:.1%} of the held-out images (n={before.asr.n}) to class "
            f"{trigger.target} before the repair: if the model has a backdoor this is not its trigger (check "
            "--trigger-pos, --target, --trigger-blend), and the ASR gate measures this trigger only"
        )
    floor = settings.gate.resolved_min_clean_acc(num_classes)
    with timer.phase("preprocess_check"):
        better = better_preprocess(
            model.model, pre, x_h, y_h, torch.tensor(before.correct, dtype=torch.bool), **eval_kw
        )
    if before.accuracy.value is not None and before.accuracy.value < floor:
        msg = (
            f"held-out clean accuracy is {before.accuracy.value:.1%} (n={before.accuracy.n}), below "
            f"{floor:.1%} for {num_classes} classes: the class order or the preprocessing almost certainly "
            "does not match the model"
        )
        if better is not None:
            msg += f" ({_better_said(better)})"
        if not request.force:
            raise ModelMismatchError(
                msg, hint="check --classes, --preset/--config (mean, std, input size) or pass --force"
            )
        warnings.append(msg + " (continuing because of --force)")
    elif better is not None:
        msg = (
            f"held-out clean accuracy is {before.accuracy.value:.1%} with mean {_fmt(pre.mean)}, std "
            f"{_fmt(pre.std)}, pixels in {_fmt(pre.value_range)}, but {_better_said(better)}: the preprocessing "
            "almost certainly does not match the model"
        )
        if not request.force:
            raise ModelMismatchError(
                msg, hint="set the model's own statistics (--mean/--std, --preset, --config) or pass --force"
            )
        warnings.append(msg + " (continuing because of --force)")
    return _Prepared(
        loaded,
        settings,
        sources,
        model,
        num_classes,
        clean,
        x_u,
        y_u,
        x_h,
        y_h,
        trigger,
        device,
        amp,
        eval_kw,
        input_sha,
        parity,
        before,
        out_fmt,
        timer,
        warnings,
        holdout_files,
        trigger_sha,
    )


def sanitize(request: SanitizeRequest, progress: Progress | None = None) -> Report:
    """Run the whole sanitize pipeline and return its report (the caller applies the gate)."""
    progress = progress or NoProgress()
    out_path = output_path(request)
    if out_path is not None:  # inside --clean first: the writability test would touch the clean folder
        check_outside(out_path, Path(request.clean), "--out", "--clean", is_file=True)
        _check_output_path(Path(request.model), out_path)
    if request.artifacts is not None:
        check_outside(Path(request.artifacts), Path(request.clean), "--artifacts", "--clean")
        check_artifacts_folder(Path(request.artifacts))
    p = _prepare(request, split=True, out_path=out_path)
    loaded, settings, model, num_classes = p.loaded, p.settings, p.model, p.num_classes
    x_u, y_u, x_h, y_h, trigger = p.x_u, p.y_u, p.x_h, p.y_h, p.trigger
    device, amp, eval_kw, input_sha, before, timer, warnings = (
        p.device,
        p.amp,
        p.eval_kw,
        p.input_sha,
        p.before,
        p.timer,
        p.warnings,
    )
    pre = settings.preprocess
    figures = p.figures
    probes_before = None
    if settings.probes.enabled:
        with timer.phase("probes_before"):
            probes_before = _run_probes(model, x_h, y_h, num_classes, settings, device, amp, progress)

    known = known_trigger_to_unlearn(settings, trigger, p.before)
    guide_class = class_to_guide(settings, probes_before)
    guided_by = None if guide_class is None else "probes"
    if guide_class is None and known is not None and settings.unlearn.guide == "probes":
        guide_class, guided_by = known.target, "trigger"
    unlearn_config = replace(settings.unlearn, perturbations=perturbation_families(settings, probes_before))

    def on_round(r: int, m: torch.nn.Module) -> dict:
        f = figures()
        return {"accuracy": f.accuracy.value, "asr": None if f.asr is None else f.asr.value}

    if known is not None and guide_class == known.target:
        proxy = (GIVEN_TRIGGER, known.apply)  # the backdoor's own trigger: no stand-in needed
    else:
        proxy = guide_proxy(settings, probes_before, guide_class)
    monitor = proxy_monitor(settings, proxy, guide_class, x_u, y_u, device, amp)
    stop = monitor if monitor is not None and unlearn_config.resolved_early_stop(len(y_u)) else None
    step_back_to = monitor if monitor is not None and unlearn_config.resolved_step_back(len(y_u)) else None
    # the patch family searches for a trigger near a probe's patch; the given trigger needs no search
    # (on the GTSRB watermark at 500 images it cost 3 points of accuracy for no ASR: docs/algorithm.md)
    given = proxy is not None and proxy[0] == GIVEN_TRIGGER
    patch = None if given else patch_region_for(settings, proxy, tuple(x_u.shape[1:]))
    watch_extension = given or proxy_is_patch(proxy, tuple(x_u.shape[1:]))

    with timer.phase("unlearn"):
        model, log = unlearn(
            model,
            x_u,
            y_u,
            unlearn_config,
            device=device,
            seed=settings.seed,
            progress=progress,
            on_round=on_round,
            target_hint=guide_class,
            stop=stop,
            patch_region=None if patch is None else patch[1],
            extend=monitor if watch_extension else None,
            known_trigger=None if known is None else known.apply,
            step_back_to=step_back_to,
        )
    round_to_stored_dtypes(model.model, loaded.stored_dtypes)
    if not all(bool(torch.isfinite(t).all()) for t in model.parameters()):
        raise RuntimeFailure(
            "the repair diverged: the weights became NaN or infinite; nothing was written",
            hint="lower unlearn.lr or unlearn.max_grad_norm (or report the model: the defaults should not diverge)",
        )
    with timer.phase("evaluate_after"):
        after = figures()
    probes_after = None
    if settings.probes.enabled:
        with timer.phase("probes_after"):
            probes_after = _run_probes(model, x_h, y_h, num_classes, settings, device, amp, progress)
        from .probes import reconcile_after_repair

        probes_after = reconcile_after_repair(probes_before, probes_after)
    with timer.phase("images"):
        images = _images(x_h, probes_before, probes_after, before, after, p.warnings)
    if request.artifacts is not None:
        with timer.phase("artifacts"):
            write_artifacts(request.artifacts, images)

    output_info = None
    verification = None
    if out_path is not None:
        fmt = p.out_fmt
        extra = {k: v for k, v in loaded.metadata.items() if not k.startswith("ibau.")}
        extra.update({"ibau.source_sha256": input_sha, "ibau.sanitized": "i-bau"})
        with timer.phase("save"):
            save_model(
                model.model,
                out_path,
                fmt=fmt.name,
                arch=loaded.arch,
                num_classes=num_classes,
                preprocess=pre,
                extra_metadata=extra,
                stored_dtypes=loaded.stored_dtypes
                if fmt.name in ("safetensors", "checkpoint", "torchscript")
                else None,
            )
        with timer.phase("verify"):
            verification = verify_written(
                out_path, request.arch if fmt.name != "torchscript" else None, model, pre, x_h, eval_kw
            )
        output_info = {"path": str(out_path), "format": fmt.name, "sha256": sha256_file(out_path)}

    gates = gates_for(settings.gate, before, after, probes_before, probes_after)
    verdict = verdict_of(gates, settings.gate)
    warnings += unshown_passes(gates)
    accuracy_gate = next(g for g in gates if g.name == "accuracy_drop")
    # a repair nothing guided: no class suspected, or one named on weak evidence only (inconclusive)
    unguided = probes_before is not None and probes_before.verdict != "suspected" and guide_class is None
    trigger_works = before.asr is not None and (before.asr.value or 0.0) >= TRIGGER_WORKS
    if accuracy_gate.status == "fail" and unguided and not trigger_works:
        # a model with no confirmed sign of a backdoor repaired anyway: I-BAU's untargeted steps cost accuracy
        weak_class = probes_before.evidence.get("suspected_class")
        if weak_class is not None:
            seen = (
                f"only weak evidence of a backdoor before it (inconclusive, toward class {weak_class}; "
                "not enough to guide the repair)"
            )
        else:
            few = " (on too few held-out images to rule one out)" if probes_before.verdict == "inconclusive" else ""
            seen = f"no backdoor before it{few}"
        warnings.append(
            f"the repair cost {accuracy_gate.value:.1%} of held-out accuracy on a model in which the probes found "
            f"{seen}. The probes reproduce common triggers, not every one: a trigger they miss "
            "stays in the input model, and the repair may have removed one. Keep the input only if it is trusted "
            "otherwise (`ibau scan` gates a model without changing it); more clean images make the repair cheaper"
            + (", and --trigger with --target, when the trigger is known, guides it" if trigger is None else "")
        )
    if trigger is None and probes_after is None:
        warnings.append(
            "no --trigger and probes off: the attack success rate was not measured and its gate not applied"
        )
    elif trigger is None and any(g.name == "asr" and g.status == "not_evaluated" for g in gates):
        warnings.append(
            "the ASR gate was not applied: without --trigger the probes gave no estimate to gate on and did not "
            "rule a backdoor out (see gates: weak evidence before the repair, or too few held-out images)"
        )
    elif trigger is None:
        warnings.append("no --trigger given: the ASR gate uses the built-in probes (an estimate, not the true ASR)")
    if log.known_trigger_fraction is not None:
        warnings.append(
            "the repair was shown the given trigger (unlearn.known_trigger = auto): the ASR gate measures, on "
            "held-out images, a trigger the repair unlearned directly; a variant of it is looked for only by the "
            "probes. unlearn.known_trigger = off measures I-BAU alone"
        )
    return Report(
        **_report_common(p, request, "sanitize", probes_before, probes_after),
        images=images,
        output=output_info,
        before=before,
        after=after,
        rounds=[
            {
                "round": r.round,
                "delta_l2": r.delta_l2,
                "delta_fooling_rate": r.delta_fooling_rate,
                "outer_loss": r.outer_loss,
                "outer_steps": r.outer_steps,
                "neumann_terms_mean": r.neumann_terms_mean,
                "seconds": r.seconds,
                "holdout_accuracy": r.evaluation.get("accuracy"),
                "holdout_asr": r.evaluation.get("asr"),
            }
            for r in log.rounds
        ],
        unlearning={
            "radius": log.radius,
            "n_samples": log.n_samples,
            "amp": log.amp,
            "seconds": log.seconds,
            "inner_seconds": log.inner_seconds,
            "outer_seconds": log.outer_seconds,
            "guided_class": guide_class,
            "guided_by": guided_by,
            "known_trigger": None
            if log.known_trigger_fraction is None
            else {"fraction": log.known_trigger_fraction, "asr_before": p.before.asr.value},
            "perturbations": [
                {**f, "probe": patch[0]} if f["family"] == "patch" and patch is not None else f
                for f in log.perturbations
            ],
            "teacher_views": log.teacher_views,
            "small_set": log.small_set,
            "rounds_planned": log.rounds_planned,
            "early_stop": None if stop is None else stop.to_dict(),
            "extension": None if log.extension is None else {"proxy_trigger": monitor.name, **log.extension},
            "step_back": log.step_back,
        },
        verification=verification,
        gates=gates,
        verdict=verdict,
    )


def _images(x, probes_before, probes_after, before, after, warnings: list[str]) -> dict[str, bytes]:
    """The report's PNGs; a failure to draw them is a warning, never a lost run."""
    try:
        return render_images(x, probes_before, probes_after, before, after)
    except Exception as exc:  # PIL or numerics: the figures and the model matter more than pictures
        warnings.append(f"could not render the report images ({type(exc).__name__}: {exc})")
        return {}


def _report_common(p: _Prepared, request: SanitizeRequest, command: str, probes_before, probes_after) -> dict:
    """The report fields sanitize and scan share."""
    device = p.device
    return {
        "command": command,
        "invocation": None if request.argv is None else {"argv": [str(a) for a in request.argv]},
        "input": {"path": str(request.model), "format": p.loaded.fmt, "sha256": p.input_sha},
        "model": {"architecture": p.loaded.arch, "num_classes": p.num_classes, "notes": p.loaded.notes},
        "config": p.settings.to_dict(),
        "config_layers": p.sources.layers,
        "seed": p.settings.seed,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "data": {
            "clean_dir": str(request.clean),
            "n_images": len(p.clean.labels),
            "n_unlearn": len(p.y_u),
            "n_holdout": len(p.y_h),
            "holdout_fraction": p.settings.split.holdout if len(p.y_u) else 1.0,
            "classes_present": len(torch.unique(p.clean.labels)),
            "conversions": p.clean.conversions,
            "holdout_files": sorted(p.holdout_files),
        },
        "class_mapping": p.clean.mapping.to_dict(),
        "trigger": None
        if p.trigger is None
        else {
            "description": p.trigger.description,
            "target": p.trigger.target,
            "path": str(request.trigger.image),
            **p.trigger_sha,
        },
        "parity_before": p.parity,
        "probes": None
        if probes_before is None and probes_after is None
        else {
            "before": None if probes_before is None else probes_before.to_dict(),
            "after": None if probes_after is None else probes_after.to_dict(),
        },
        "timings": p.timer.phases,
        "warnings": p.warnings,
    }


def scan(request: SanitizeRequest, progress: Progress | None = None) -> Report:
    """Probes only, no repair: a verdict (suspected / no evidence / inconclusive) and gates."""
    progress = progress or NoProgress()
    if request.artifacts is not None:
        check_outside(Path(request.artifacts), Path(request.clean), "--artifacts", "--clean")
        check_artifacts_folder(Path(request.artifacts))
    p = _prepare(request, split=False, out_path=None)
    if not p.settings.probes.enabled:
        raise UsageError(
            "scan runs the probes and nothing else, so probes.enabled = false leaves it nothing to do",
            hint="drop that setting (sanitize --no-probes repairs without them)",
        )
    with p.timer.phase("probes"):
        suite = _run_probes(p.model, p.x_h, p.y_h, p.num_classes, p.settings, p.device, p.amp, progress)
    with p.timer.phase("images"):
        images = _images(p.x_h, suite, None, p.before, None, p.warnings)
    if request.artifacts is not None:
        with p.timer.phase("artifacts"):
            write_artifacts(request.artifacts, images)
    gates = [
        Gate(
            "probe_verdict",
            "fail" if suite.verdict == "suspected" else "pass",
            None,
            None,
            f"probes: {suite.verdict.replace('_', ' ')}"
            + (f" ({'; '.join(suite.evidence['reasons'])})" if suite.evidence["reasons"] else ""),
        )
    ]
    if p.before.asr is not None:
        gates.append(true_trigger_gate(p.settings.gate, p.before.asr, "in the scan"))
    else:
        gates.append(asr_probe_gate(p.settings.gate, None, suite, stage="in the scan"))
    p.warnings.extend(unshown_passes(gates))
    return Report(
        **_report_common(p, request, "scan", suite, None),
        images=images,
        output=None,
        before=p.before,
        after=None,
        rounds=[],
        unlearning=None,
        verification=None,
        gates=gates,
        verdict=verdict_of(gates, p.settings.gate),
    )


MIN_TESTED_UNLEARN = 78  # the smallest unlearning set of the benchmarks (100 GTSRB images, 43 classes)


def _run_probes(model, x, y, num_classes, settings, device, amp, progress):
    from .probes import run_probes

    radius = settings.resolved_probe_radius(tuple(x.shape[1:]))
    return run_probes(
        model,
        x,
        y,
        num_classes,
        device=device,
        amp=amp,
        seed=settings.seed,
        budget_steps=settings.probes.budget_steps,
        radius=radius,
        progress=progress,
        class_batch=settings.probes.class_batch,
    )


def _image_size(path: Path) -> str:
    """``HxW`` of an image file as stored, for a message; "of another size" when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return f"{img.height}x{img.width}"
    except Exception:
        return "of another size"


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"


def _better_said(better: BetterPreprocess) -> str:
    alt = better.preprocess
    return (
        f"with {better.name} (mean {_fmt(alt.mean)}, std {_fmt(alt.std)}, pixels in {_fmt(alt.value_range)}) it is "
        f"{better.accuracy_better:.1%} on the same {better.n} images"
    )


def _conversion_warnings(clean, pre) -> list[str]:
    """Reading changes that alter what the model sees, not only its size: grey images given to a
    colour model (the channel repeated), colour to a grey one, images squashed to another aspect
    ratio, and CMYK images converted to RGB (PIL's plain formula, no colour profile). Plain resizing is only counted (report ``data.conversions``)."""
    n = len(clean.labels)
    said = {
        "grey_to_rgb": "were grey-scale, given to a colour model by repeating the channel",
        "colour_to_grey": "were in colour, given to a grey-scale model as luminance",
        "resized_other_aspect": f"had another aspect ratio and were squashed to {pre.input_size[0]}x{pre.input_size[1]}",
        "cmyk_to_rgb": "were CMYK, converted to RGB without their colour profile",
        "enlarged_4x_or_more": f"were enlarged at least 4x on a side to {pre.input_size[0]}x{pre.input_size[1]} "
        "(check the clean folder and --input-size)",
    }
    return [
        f"{clean.conversions[kind]} of {n} clean images {text} (e.g. {clean.examples[kind]}): "
        "figures on them may not hold for the images the model really gets"
        for kind, text in said.items()
        if clean.conversions.get(kind)
    ]
