"""sanitize(): load -> check -> evaluate -> unlearn -> evaluate -> save -> verify -> Report.

No terminal, no click: progress goes through a callback and problems are IbauErrors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import load_clean_folder, stratified_split
from .device import amp_dtype, resolve_device
from .errors import ModelMismatchError, RuntimeFailure, UsageError
from .evaluate import accuracy, attack_success, logits
from .formats import format_for_output, load_model, save_model, sha256_file
from .preprocess import Normalized
from .progress import NoProgress, Progress
from .report import Figures, Gate, Report
from .settings_resolve import resolve_settings
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
    return model.with_name(f"{model.stem}.sanitized{model.suffix}")


def _check_output_path(model: Path, out: Path) -> None:
    if out.resolve() == model.resolve() or (out.exists() and os.path.samefile(out, model)):
        raise UsageError(
            f"--out {out} is the input model; ibau never modifies its input",
            hint="choose another output path",
        )
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file path")


def sanitize(request: SanitizeRequest, progress: Progress | None = None) -> Report:
    """Run the whole sanitize pipeline and return its report (the caller applies the gate)."""
    progress = progress or NoProgress()
    timer = _Timer()
    warnings: list[str] = []
    device = resolve_device(request.device)
    out_path = None
    if request.save:
        out_path = Path(request.out) if request.out else default_output_path(Path(request.model))
        _check_output_path(Path(request.model), out_path)

    with timer.phase("load"):
        loaded = load_model(Path(request.model), arch=request.arch, device="cpu")
        input_sha = sha256_file(Path(request.model))
    out_fmt = None
    if out_path is not None:
        out_fmt = format_for_output(out_path, loaded.fmt)
        if not out_fmt.can_save_from(loaded.fmt):
            raise UsageError(
                f"--out {out_path}: cannot write {out_fmt.name} from a {loaded.fmt} model",
                hint=f"use a {loaded.fmt} output path (writing ONNX is supported for ONNX input only)",
            )
    settings, sources = resolve_settings(
        arch=loaded.arch if request.arch is None or ":" not in (request.arch or "") else None,
        model_preprocess=loaded.preprocess,
        model_input=loaded.input_hint,
        preset=request.preset,
        config_file=request.config_file,
        overrides=request.overrides,
    )
    pre = settings.preprocess
    model = Normalized(loaded.module, pre).to(device).eval()
    amp = amp_dtype(device, settings.unlearn.amp)
    num_classes = loaded.num_classes
    if not num_classes:
        with torch.no_grad():
            probe = torch.zeros(1, pre.channels, *pre.input_size, device=device)
            try:
                num_classes = int(model(probe).shape[-1])
            except Exception as exc:
                raise ModelMismatchError(
                    f"{request.model}: the model does not run on a {pre.channels}x{pre.input_size[0]}x{pre.input_size[1]} input ({exc})",
                    hint="set the input size with --preset, --config or --set preprocess.input_size=[H,W]",
                ) from exc

    with timer.phase("data"):
        clean = load_clean_folder(Path(request.clean), pre, num_classes, classes_file=request.classes_file)
        split = stratified_split(clean.labels, settings.split.holdout, settings.seed)
    x_u, y_u = clean.images[split.unlearn_idx], clean.labels[split.unlearn_idx]
    x_h, y_h = clean.images[split.holdout_idx], clean.labels[split.holdout_idx]
    if len(y_u) < 50:
        warnings.append(f"only {len(y_u)} images for unlearning; I-BAU is tested down to 80")
    if len(y_h) < 100:
        warnings.append(f"only {len(y_h)} held-out images: the rates below have wide confidence intervals")

    trigger = None
    if request.trigger is not None:
        t = request.trigger
        if not 0 <= t.target < num_classes:
            raise UsageError(f"--target {t.target} is not a class of this {num_classes}-class model")
        trigger = load_trigger(
            t.image, target=t.target, pre=pre, mask_path=t.mask, blend=t.blend, additive=t.additive, position=t.position
        )
        if int((y_h != t.target).sum()) == 0:
            raise UsageError("every held-out image belongs to the --target class, so the ASR cannot be measured")

    eval_kw = {"device": device, "amp": amp, "batch_size": max(settings.unlearn.batch_size, 256)}

    def figures() -> Figures:
        acc = accuracy(model, x_h, y_h, **eval_kw)
        asr = attack_success(model, x_h, y_h, trigger, **eval_kw) if trigger else None
        return Figures(acc, asr)

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
    with timer.phase("evaluate_before"):
        before = figures()
    floor = settings.gate.resolved_min_clean_acc(num_classes)
    if before.accuracy.value is not None and before.accuracy.value < floor:
        msg = (
            f"held-out clean accuracy is {before.accuracy.value:.1%} (n={before.accuracy.n}), below "
            f"{floor:.1%} for {num_classes} classes: the class order or the preprocessing almost certainly "
            "does not match the model"
        )
        if not request.force:
            raise ModelMismatchError(
                msg, hint="check --classes, --preset/--config (mean, std, input size) or pass --force"
            )
        warnings.append(msg + " (continuing because of --force)")

    def on_round(r: int, m: torch.nn.Module) -> dict:
        f = figures()
        return {"accuracy": f.accuracy.value, "asr": None if f.asr is None else f.asr.value}

    with timer.phase("unlearn"):
        model, log = unlearn(
            model,
            x_u,
            y_u,
            settings.unlearn,
            device=device,
            seed=settings.seed,
            progress=progress,
            on_round=on_round,
        )
    with timer.phase("evaluate_after"):
        after = figures()

    output_info = None
    verification = None
    if out_path is not None:
        fmt = out_fmt
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
            )
        with timer.phase("verify"):
            verification = _verify(
                out_path, request.arch if fmt.name != "torchscript" else None, model, pre, x_h, eval_kw
            )
        output_info = {"path": str(out_path), "format": fmt.name, "sha256": sha256_file(out_path)}

    gates = _gates(settings.gate, before, after)
    verdict = "fail" if any(g.status == "fail" for g in gates) else "pass"
    if trigger is None:
        warnings.append("no --trigger given: the attack success rate was not measured and its gate not applied")
    return Report(
        command="sanitize",
        input={"path": str(request.model), "format": loaded.fmt, "sha256": input_sha},
        output=output_info,
        model={"architecture": loaded.arch, "num_classes": num_classes, "notes": loaded.notes},
        config=settings.to_dict(),
        config_layers=sources.layers,
        seed=settings.seed,
        device=str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        data={
            "clean_dir": str(request.clean),
            "n_images": len(clean.labels),
            "n_unlearn": len(y_u),
            "n_holdout": len(y_h),
            "holdout_fraction": settings.split.holdout,
            "classes_present": len(torch.unique(clean.labels)),
        },
        class_mapping=clean.mapping.to_dict(),
        trigger=None
        if trigger is None
        else {"description": trigger.description, "target": trigger.target, "path": str(request.trigger.image)},
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
        },
        verification=verification,
        parity_before=parity,
        timings=timer.phases,
        gates=gates,
        verdict=verdict,
        warnings=warnings,
    )


PARITY_TOL = 1e-3


def reference_parity(model: Normalized, reference, x: torch.Tensor, eval_kw) -> dict:
    """Compare the torch module with an independent runtime on the same (normalised) inputs."""
    a = logits(model, x, **dict(eval_kw, amp=None))
    b = torch.from_numpy(reference(model.normalize(x.to(model.scale.device)).cpu().numpy())).float()
    return {
        "runtime": "onnxruntime",
        "max_abs_logit_diff": float((a - b).abs().max()) if len(a) else 0.0,
        "max_abs_logit": float(a.abs().max()) if len(a) else 0.0,
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()) if len(a) else 1.0,
        "n": len(a),
    }


def _verify(out_path: Path, arch_flag: str | None, model, pre, x_h, eval_kw) -> dict:
    """Reload the written file (in an independent runtime where there is one) and compare its
    predictions with the in-memory repaired model."""
    try:
        reloaded = load_model(out_path, arch=arch_flag if arch_flag and ":" in arch_flag else None, device="cpu")
        kw = dict(eval_kw, amp=None)
        a = logits(model, x_h, **kw)
        if reloaded.reference is not None:
            b = torch.from_numpy(reloaded.reference(model.normalize(x_h.to(model.scale.device)).cpu().numpy())).float()
        else:
            wrapped = Normalized(reloaded.module, pre).to(eval_kw["device"]).eval()
            b = logits(wrapped, x_h, **kw)
    except Exception as exc:
        out_path.unlink(missing_ok=True)
        raise RuntimeFailure(f"the written model {out_path} could not be reloaded ({exc}); it was removed") from exc
    max_diff = float((a - b).abs().max()) if len(a) else 0.0
    agree = float((a.argmax(1) == b.argmax(1)).float().mean()) if len(a) else 1.0
    scale = max(1.0, float(a.abs().max())) if len(a) else 1.0
    need = 0.99 if reloaded.reference is not None else 1.0
    if agree < need or max_diff > PARITY_TOL * scale:
        out_path.unlink(missing_ok=True)
        raise RuntimeFailure(
            f"the written model {out_path} does not reproduce the repaired model "
            f"(max logit difference {max_diff:.2e}, argmax agreement {agree:.1%}); it was removed"
        )
    runtime = "onnxruntime" if reloaded.reference is not None else reloaded.fmt
    return {
        "reloaded": True,
        "runtime": runtime,
        "max_abs_logit_diff": max_diff,
        "argmax_agreement": agree,
        "n": len(a),
    }


def _gates(gate_cfg, before: Figures, after: Figures) -> list[Gate]:
    gates = []
    drop = None
    if before.accuracy.value is not None and after.accuracy.value is not None:
        drop = before.accuracy.value - after.accuracy.value
    gates.append(
        Gate(
            name="accuracy_drop",
            status="not_evaluated" if drop is None else ("pass" if drop <= gate_cfg.max_acc_drop else "fail"),
            limit=gate_cfg.max_acc_drop,
            value=drop,
            detail=f"held-out clean accuracy drop (n={after.accuracy.n})",
        )
    )
    if after.asr is None:
        gates.append(Gate("asr", "not_evaluated", gate_cfg.max_asr, None, "no trigger supplied"))
    else:
        v = after.asr.value
        gates.append(
            Gate(
                name="asr",
                status="pass" if v is not None and v <= gate_cfg.max_asr else "fail",
                limit=gate_cfg.max_asr,
                value=v,
                detail=f"true-trigger attack success rate after repair (n={after.asr.n})",
            )
        )
    return gates
