"""Checks on the model file: parity with a reference, determinism, output kind, and the written file read back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .device import full_precision
from .errors import ModelMismatchError, RuntimeFailure, out_of_memory
from .evaluate import logits
from .formats import detect_format, load_model
from .preprocess import Normalized, output_kind

PARITY_TOL = 1e-3


def reference_parity(model: Normalized, reference, x: torch.Tensor, eval_kw) -> dict:
    """Compare the torch module with an independent runtime on the same (normalised) inputs."""
    with full_precision():
        a = logits(model, x, **dict(eval_kw, amp=None))
    b = torch.from_numpy(reference(model.normalize(x.to(model.scale.device)).cpu().numpy())).float()
    return {
        "runtime": "onnxruntime",
        "max_abs_logit_diff": float((a - b).abs().max()) if len(a) else 0.0,
        "max_abs_logit": float(a.abs().max()) if len(a) else 0.0,
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).float().mean()) if len(a) else 1.0,
        "n": len(a),
    }


def class_count(out: object, model_path: object) -> int:
    """The class count from the model's output on one image; anything but one [batch, classes]
    tensor of logits is an error saying what the model returns."""
    if isinstance(out, dict):
        what = f"a dict (keys {', '.join(map(str, list(out)[:5]))})"
    elif isinstance(out, tuple | list):
        what = f"a {type(out).__name__} of {len(out)} values"
    elif not isinstance(out, torch.Tensor):
        what = f"a {type(out).__name__}"
    elif out.dim() != 2 or out.shape[0] != 1:
        what = f"a tensor of shape {list(out.shape)} for one image"
    else:
        return int(out.shape[-1])
    raise ModelMismatchError(
        f"{model_path}: the model returns {what}; ibau needs one logits tensor of shape [batch, classes]",
        hint="wrap or re-export the model so that forward returns only the class logits",
    )


@torch.no_grad()
def round_to_stored_dtypes(module: torch.nn.Module, stored: dict[str, torch.dtype]) -> None:
    """Round the repaired weights to the dtypes the input stored them in (an fp16 file stays fp16),
    so every figure after the repair is measured on the weights that are written."""
    if not stored:
        return
    for k, v in module.state_dict(keep_vars=True).items():
        if k in stored and v.is_floating_point():
            v.copy_(v.to(stored[k]).to(v.dtype))


def check_deterministic(model: Normalized, images: torch.Tensor, eval_kw: dict, model_path: object) -> None:
    """An image's logits must not depend on the rest of its batch nor change between calls: a graph
    exported in training mode (batch statistics, dropout) would make every figure noise and fail
    the write-back check only after the whole repair."""
    x = images[:16]
    if len(x) < 4:
        return
    kw = dict(eval_kw, amp=None)
    with full_precision():
        whole = logits(model, x, **kw)
        half = logits(model, x[: len(x) // 2], **kw)
    if not bool(torch.isfinite(whole).all()):
        bad = int((~torch.isfinite(whole)).any(1).sum())
        raise ModelMismatchError(
            f"{model_path}: the model's outputs are NaN or infinite for {bad} of {len(whole)} clean images "
            "although its weights are finite (a negative BatchNorm running variance, or weights that overflow)",
            hint="check the checkpoint: it computes nothing ibau could measure or repair",
        )
    diff = float((whole[: len(half)] - half).abs().max())
    if not diff <= 1e-3 * max(1.0, float(whole.abs().max())):
        raise ModelMismatchError(
            f"{model_path}: the model's output for an image changes with the rest of its batch or between calls "
            f"(logits differ by up to {diff:.3g}): batch norm or dropout in training mode was baked into it",
            hint="re-export the model after model.eval()",
        )


def model_output_kind(model: Normalized, images: torch.Tensor, eval_kw: dict) -> str:
    """What the model's outputs are (logits, probabilities or [0, 1] scores), from up to 256 clean images."""
    with full_precision():
        out = logits(model, images[:256], **dict(eval_kw, amp=None))
    return output_kind(out)


@contextmanager
def _file_outputs(module: torch.nn.Module) -> Iterator[None]:
    """The module as the file computes it: an ONNX graph's final Softmax back on for the duration."""
    stripped = getattr(module, "output_logits", False)
    if stripped:
        module.output_logits = False
    try:
        yield
    finally:
        if stripped:
            module.output_logits = True


def verify_written(out_path: Path, arch_flag: str | None, model, pre, x_h, eval_kw) -> dict:
    """Reload the written file (in an independent runtime where there is one) and compare its
    predictions with the in-memory repaired model."""
    try:
        # a user's own architecture file rebuilds a state-dict output; a graph format carries its own
        user_arch = arch_flag if arch_flag and ":" in arch_flag and not detect_format(out_path).carries_graph else None
        reloaded = load_model(out_path, arch=user_arch, device="cpu")
        kw = dict(eval_kw, amp=None)
        raw = Normalized(model.model, pre).to(eval_kw["device"]).eval()  # what the file outputs, no log
        with full_precision(), _file_outputs(model.model):
            a = logits(raw, x_h, **kw)
            if reloaded.reference is not None:
                b = torch.from_numpy(reloaded.reference(model.normalize(x_h.to(model.scale.device)).cpu().numpy()))
                b = b.float()
            else:
                wrapped = Normalized(reloaded.module, pre).to(eval_kw["device"]).eval()
                b = logits(wrapped, x_h, **kw)
    except Exception as exc:
        out_path.unlink(missing_ok=True)
        if out_of_memory(exc):
            raise
        raise RuntimeFailure(f"the written model {out_path} could not be reloaded ({exc}); it was removed") from exc
    max_diff = float((a - b).abs().max()) if len(a) else 0.0
    agree = float((a.argmax(1) == b.argmax(1)).float().mean()) if len(a) else 1.0
    scale = max(1.0, float(a.abs().max())) if len(a) else 1.0
    need = 0.99 if reloaded.reference is not None else 1.0
    if agree < need or not max_diff <= PARITY_TOL * scale:  # "not <=": a NaN difference fails too
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
