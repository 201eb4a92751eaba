"""Loading a state dict into a module strictly, with an error that lists every mismatch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..archs import ARCHS
from ..archs.resolve import build_user_model, builtin_spec, is_user_code
from ..errors import InputError
from .base import LoadedModel
from .metadata import META_ARCH, num_classes_from_metadata, preprocess_from_metadata

_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


# Prefixes that wrappers put before every key: DataParallel / DistributedDataParallel and
# AveragedModel ("module."), torch.compile ("_orig_mod."), a Lightning module's attribute ("model.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
_WRAPPER_BOOKKEEPING = ("n_averaged",)  # AveragedModel's counter, beside its "module." weights


def _unwrapped(tensors: dict[str, torch.Tensor], fits: Callable[[set[str]], bool]) -> dict[str, torch.Tensor]:
    """``tensors`` with wrapper prefixes removed when that, and only that, makes the keys ``fit``
    the architecture (a model whose own submodule is called ``model`` keeps its keys)."""
    if fits(set(tensors)):
        return tensors
    current = {k: v for k, v in tensors.items() if k not in _WRAPPER_BOOKKEEPING}
    for _ in range(len(_WRAPPER_PREFIXES)):
        prefix = next((p for p in _WRAPPER_PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if prefix is None:
            break
        current = {k[len(prefix) :]: v for k, v in current.items()}
        if fits(set(current)):
            return current
    return tensors


def _fits_module(module: nn.Module) -> Callable[[set[str]], bool]:
    expected = set(module.state_dict())
    return lambda keys: bool(keys) and keys <= expected


def _tied(expected: dict, present: set[str]) -> set[str]:
    """Keys of the architecture whose tensor is another present key's (tied weights): safetensors'
    save_model stores a shared tensor under one name only."""
    by_storage: dict[int, list[str]] = {}
    for k, v in expected.items():
        if v.numel():
            by_storage.setdefault(v.untyped_storage().data_ptr(), []).append(k)
    return {k for names in by_storage.values() if len(names) > 1 and present & set(names) for k in names}


def _misfit(
    module: nn.Module, tensors: dict[str, torch.Tensor], any_rows: frozenset[str] = frozenset()
) -> tuple[list[str], list[str], list[str]]:
    """The keys the file lacks, the keys the architecture lacks, and the mis-shaped ones (``any_rows``:
    keys whose first dimension may differ, the classifier's, when ``module`` was built for 1 class)."""
    expected = module.state_dict(keep_vars=True)
    tensors = _unwrapped(tensors, _fits_module(module))
    tied = _tied(expected, set(tensors))
    missing = [k for k in expected if k not in tensors and not k.endswith(_OPTIONAL_SUFFIXES) and k not in tied]
    unexpected = [k for k in tensors if k not in expected]

    def same(k: str, want: tuple[int, ...]) -> bool:
        have = tuple(tensors[k].shape)
        return have == want or (k in any_rows and len(have) == len(want) >= 1 and have[1:] == want[1:])

    misshaped = [
        f"{k} file {list(tensors[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in tensors and not same(k, tuple(v.shape))
    ]
    return missing, unexpected, misshaped


def registered_matches(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The registered architectures (built in or from a loaded plugin) whose every weight the file
    holds under the same name and shape, and nothing else, built for the class count of their own
    classifier tensor in the file."""
    matches = []
    for name in ARCHS.names():
        spec = ARCHS.get(name)
        fitted = _unwrapped(tensors, lambda keys, key=spec.classifier_key: key in keys)
        weight = fitted.get(spec.classifier_key)
        if weight is None or weight.ndim < 1:
            continue
        # built for 1 class, the classifier's rows left free: a file's class count (even a huge,
        # malformed one) never sizes a model that may not match
        try:
            module = spec.build(1)
        except (Exception, SystemExit):  # noqa: BLE001 - a plugin's factory that fails does not match
            continue
        head = spec.classifier_key
        free = frozenset({head, head.removesuffix("weight") + "bias"} if head.endswith("weight") else {head})
        if not any(_misfit(module, tensors, free)):
            matches.append(name)
    return matches


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict(keep_vars=True)
    tensors = _unwrapped(tensors, _fits_module(module))
    missing, unexpected, misshaped = _misfit(module, tensors)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {_short(misshaped, 3)}")
        raise InputError(
            f"{path}: weights do not fit the architecture ({'; '.join(parts)})",
            hint="check --arch, or pass your own model code with --arch file.py:Class",
        )
    present = {k: v for k, v in tensors.items() if k in expected}
    module.load_state_dict(present, strict=False)


def _classifier_rows(module: nn.Module, tensors: dict[str, torch.Tensor]) -> int | None:
    """The row count of the file's tensor for the module's last 2-D weight (its classifier, in the
    module's own definition order) when it differs from the module's: the file's class count."""
    last = None
    for k, v in module.state_dict().items():
        if v.dim() == 2 and v.is_floating_point():
            last = (k, v)
    if last is None or last[0] not in tensors or tensors[last[0]].dim() != 2:
        return None
    rows = int(tensors[last[0]].shape[0])
    return rows if rows != int(last[1].shape[0]) else None


def loaded_from_state_dict(
    tensors: dict[str, torch.Tensor], arch: str | None, meta: dict[str, str], path: Path, *, fmt: str, device: str
) -> LoadedModel:
    """Build the architecture (from ``--arch`` or the file's metadata), load the tensors and
    return the model with what the file says of it. The number of classes is 0 when only a
    forward pass can tell. With neither, the one registered architecture whose every weight the file
    holds under the same name and shape, and nothing else (several: an error naming them); never a
    guess from names alone, never user code.
    """
    source = "--arch"
    if arch is None:
        arch = meta.get(META_ARCH)
        source = "file metadata"
        if arch is None:
            matches = registered_matches(tensors)
            if len(matches) > 1:
                raise InputError(
                    f"{path}: the file names no architecture and its weights fit {len(matches)} registered ones "
                    f"({', '.join(matches)})",
                    hint=f"pass --arch with the one it is (e.g. --arch {matches[0]})",
                )
            if not matches:
                raise InputError(
                    f"{path}: the architecture is unknown (the file holds only tensors, and they fit no registered "
                    "architecture)",
                    hint="pass --arch NAME (see `ibau archs`), load the plugin that registers it, or --arch "
                    "path/to/file.py:ClassOrFactory",
                )
            arch = matches[0]
            source = "the registry: the only registered architecture whose every tensor name and shape the file matches"
        if is_user_code(arch):
            raise InputError(
                f"{path}: its metadata names user code {arch!r}, which ibau never runs on a file's say-so",
                hint=f"pass --arch {arch} to allow it",
            )
    num_classes_from_metadata(meta, path)  # a malformed value is an error, not silently ignored
    notes = [f"architecture {arch!r} from {source}"]
    if is_user_code(arch):
        wanted = num_classes_from_metadata(meta, path)
        module = build_user_model(arch, wanted)
        tensors = _unwrapped(tensors, _fits_module(module))
        if wanted is None:  # the file's own classifier says how many classes: rebuild for it if needed
            found = _classifier_rows(module, tensors)
            if found is not None:
                module = build_user_model(arch, found)
        num_classes = 0
    else:
        if arch not in ARCHS:  # name the file and where the name came from, then builtin_spec's advice
            try:
                builtin_spec(arch)
            except InputError as exc:
                raise InputError(f"{path}: {exc.message} (from {source})", hint=exc.hint) from None
        spec = builtin_spec(arch)
        tensors = _unwrapped(tensors, lambda keys: spec.classifier_key in keys)
        weight = tensors.get(spec.classifier_key)
        if weight is None or weight.ndim < 1:
            raise InputError(
                f"{path}: no tensor {spec.classifier_key!r}, which architecture {arch!r} needs for its final layer",
                hint="check --arch; `ibau inspect` lists the file's tensors",
            )
        num_classes = int(weight.shape[0])
        module = spec.build(num_classes)
    load_strict(module, tensors, path)
    computed = module.state_dict()
    stored = {
        k: v.dtype
        for k, v in tensors.items()
        if k in computed and v.is_floating_point() and v.dtype != computed[k].dtype
    }
    if stored:
        kinds = ", ".join(sorted({str(d).replace("torch.", "") for d in stored.values()}))
        notes.append(f"{len(stored)} tensors stored as {kinds}: computed in float32, written back as {kinds}")
    return LoadedModel(
        module=module.to(device).eval(),
        fmt=fmt,
        num_classes=num_classes,
        arch=arch,
        preprocess=preprocess_from_metadata(meta, path),
        metadata=meta,
        notes=notes,
        stored_dtypes=stored,
    )
