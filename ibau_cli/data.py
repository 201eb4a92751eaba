"""Clean data: an ImageFolder-layout folder -> pixel tensors, a class mapping, a seeded split."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .images import read_image
from .preprocess import Preprocess

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}


@dataclass(frozen=True)
class ClassMapping:
    rule: str  # "integer-folders", "classes-file" or "sorted-folders"
    folder_to_index: dict[str, int]

    def to_dict(self) -> dict:
        return {"rule": self.rule, "folders": dict(sorted(self.folder_to_index.items(), key=lambda kv: kv[1]))}


@dataclass(frozen=True)
class CleanSet:
    images: Tensor  # float [N, C, H, W] in [0, 1]
    labels: Tensor  # int64 [N]
    mapping: ClassMapping
    files: list[str]
    conversions: dict[str, int] = field(default_factory=dict)  # what reading changed: kind -> image count
    examples: dict[str, str] = field(default_factory=dict)  # kind -> one such file
    hidden_with_images: list[str] = field(default_factory=list)  # hidden top-level folders holding images, not read


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _conversions(source_mode: str, source_size: tuple[int, int], pre: Preprocess) -> list[str]:
    """What reading one image changed to fit the model's input (the kinds CleanSet counts)."""
    h, w = pre.input_size
    kinds = []
    if source_size != (w, h):
        kinds.append("resized")
        sw, sh = source_size
        if abs(sw / sh - w / h) > 0.01 * (w / h):
            kinds.append("resized_other_aspect")
        if sw >= 2 * w and sh >= 2 * h:
            kinds.append("shrunk_2x_or_more")
        if 4 * sw <= w or 4 * sh <= h:
            kinds.append("enlarged_4x_or_more")
    grey = source_mode in GREY_MODES
    if pre.channels == 3 and grey:
        kinds.append("grey_to_rgb")
    if pre.channels == 1 and not grey:
        kinds.append("colour_to_grey")
    if "A" in source_mode or source_mode == "P":
        kinds.append("alpha_or_palette_flattened")
    if source_mode == "CMYK" and pre.channels == 3:
        kinds.append("cmyk_to_rgb")
    return kinds


@dataclass(frozen=True)
class Split:
    unlearn_idx: Tensor
    holdout_idx: Tensor


def _listed(items: list, limit: int = 5) -> str:
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _entries(folder: Path) -> list[Path]:
    """A folder's entries, sorted; a folder that cannot be listed is an input error, not a crash."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise InputError(
            f"cannot list folder {folder} ({type(exc).__name__}: {exc.strerror or exc})",
            hint="make it readable by this user (e.g. chmod a+rx), or remove it",
        ) from None


def _check_utf8_name(path: Path) -> None:
    """A file name that is not UTF-8 (bytes Python keeps as surrogates) cannot go into the report:
    0.3.8 read the image, repaired the model and then failed writing the reports (exit 3)."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path.name)
        raise InputError(
            f"file name {shown!r} in {path.parent} is not valid UTF-8",
            hint="rename the file (and its class folder, if that is not UTF-8 either)",
        ) from None


def _class_folders(root: Path) -> list[Path]:
    if not root.exists():
        raise InputError(f"clean data folder not found: {root}", hint="pass --clean DIR with one sub-folder per class")
    if not root.is_dir():
        raise InputError(f"--clean {root} is not a folder", hint="pass a folder laid out as DIR/<class>/<image>")
    entries = _entries(root)
    for entry in entries:
        if not entry.name.startswith("."):
            _check_utf8_name(entry)
    broken = [p.name for p in entries if not p.name.startswith(".") and not p.is_dir() and not p.is_file()]
    if broken:  # a link to nothing (or a device, a pipe): a class folder that is not there
        raise InputError(
            f"{len(broken)} entr{'y' if len(broken) == 1 else 'ies'} at the top of {root} "
            f"{'is' if len(broken) == 1 else 'are'} neither a folder nor a file ({_listed(broken, 3)}; a link "
            "whose target is gone?)",
            hint="fix or remove them: the clean folder holds only DIR/<class>/<image> sub-folders",
        )
    folders = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    other = [p.name for p in entries if p.is_file() and not p.name.startswith(".") and p.name not in loose]
    if other:  # as a non-image inside a class folder is: nothing in --clean is skipped unsaid
        raise InputError(
            f"{len(other)} file(s) at the top of {root} are not class folders ({_listed(other, 3)})",
            hint="the clean folder holds only DIR/<class>/<image> sub-folders; move other files elsewhere",
        )
    if loose:
        raise InputError(
            f"{len(loose)} image(s) at the top of {root} belong to no class folder ({_listed(loose, 3)})",
            hint="move each image into DIR/<class>/ (ImageFolder layout)",
        )
    if not folders:
        raise InputError(
            f"clean data folder {root} has no class sub-folders",
            hint="lay it out as DIR/<class>/<image>.png (ImageFolder layout)",
        )
    return folders


def _is_index(name: str) -> bool:
    """A class-index folder name: ASCII digits only (str.isdigit also accepts '²' and '٣')."""
    return name.isascii() and name.isdigit()


def map_classes(folders: list[Path], num_classes: int, classes_file: Path | None) -> ClassMapping:
    names = [f.name for f in folders]
    if classes_file is not None:
        try:
            # utf-8-sig: a byte-order mark (Windows editors) is not part of the first class name
            lines = [ln.strip() for ln in classes_file.read_text(encoding="utf-8-sig").splitlines()]
        except OSError as exc:
            raise InputError(f"cannot read --classes file {classes_file} ({exc.strerror})") from exc
        except UnicodeDecodeError:
            raise InputError(
                f"--classes file {classes_file} is not UTF-8 text",
                hint="save it as UTF-8, one class name per line in the model's output order",
            ) from None
        while lines and not lines[-1]:
            lines.pop()  # blank lines at the end are the editor's, not a class
        if "" in lines:  # a blank line inside would drop a class and shift every later index
            raise InputError(
                f"--classes file {classes_file} has a blank line (line {lines.index('') + 1}) among the class names",
                hint="one class name per line, in the model's output order, no blank lines between them",
            )
        order = lines
        if len(set(order)) != len(order):
            twice = next(name for k, name in enumerate(order) if name in order[:k])
            first, again = order.index(twice) + 1, order.index(twice, order.index(twice) + 1) + 1
            raise InputError(
                f"--classes file {classes_file} lists the class name {twice!r} twice (lines {first} and {again})",
                hint="one line per class, in the model's output order",
            )
        if len(order) > num_classes:
            raise InputError(
                f"--classes file {classes_file} lists {len(order)} class names but the model has {num_classes} outputs",
                hint="list the model's classes only, one per line, in its output order",
            )
        index = {name: i for i, name in enumerate(order)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise InputError(
                f"class folder(s) {_listed(unknown)} are not listed in {classes_file}",
                hint="list every folder name, one per line, in the model's output order",
            )
        mapping = ClassMapping("classes-file", {n: index[n] for n in names})
    elif all(_is_index(n) for n in names):
        mapping = ClassMapping("integer-folders", {n: int(n) for n in names})
        by_index: dict[int, list[str]] = {}
        for name, idx in mapping.folder_to_index.items():
            by_index.setdefault(idx, []).append(name)
        clashes = [sorted(group) for group in by_index.values() if len(group) > 1]
        if clashes:
            shown = ", ".join(" and ".join(repr(n) for n in group) for group in clashes[:3])
            raise InputError(
                f"class folders {shown} in {folders[0].parent} name the same class index",
                hint="keep one folder per class index (merge or rename the others)",
            )
    elif any(_is_index(n) for n in names):
        others = [n for n in names if not _is_index(n)]
        raise InputError(
            f"class folders mix class indices ({', '.join(n for n in names if _is_index(n))[:40]}) with other "
            f"names ({', '.join(others[:5])}): ibau cannot tell which index each folder is",
            hint="name every folder by its class index (0, 1, ...) or pass --classes FILE in the model's output order",
        )
    else:
        mapping = ClassMapping("sorted-folders", {n: i for i, n in enumerate(names)})
    too_big = [n for n, i in mapping.folder_to_index.items() if i >= num_classes]
    if too_big:
        raise InputError(
            f"class folder(s) {_listed(too_big)} map to an index >= the model's {num_classes} classes",
            hint="check the folder names or pass --classes FILE in the model's output order",
        )
    return mapping


def _load_image(path: Path, pre: Preprocess) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    img, source_mode, source_size = read_image(path, "L" if pre.channels == 1 else "RGB")
    h, w = pre.input_size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[:, :, None] if arr.ndim == 2 else arr), _conversions(source_mode, source_size, pre)


def load_clean_folder(root: Path, pre: Preprocess, num_classes: int, *, classes_file: Path | None = None) -> CleanSet:
    """Read every image under ``root/<class>/``; unreadable files are errors, never skipped."""
    folders = _class_folders(root)
    mapping = map_classes(folders, num_classes, classes_file)
    arrays, labels, files = [], [], []
    conversions: dict[str, int] = {}
    examples: dict[str, str] = {}
    ignored = []
    for folder in folders:
        for path in _entries(folder):
            if path.name.startswith("."):
                continue
            _check_utf8_name(path)
            if path.is_dir():
                raise InputError(
                    f"class folder {folder} holds a sub-folder, {path.name}: ibau reads the images directly in each "
                    "class folder and would skip it",
                    hint="move its images up into the class folder, or remove it",
                )
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append(path)
                continue
            array, kinds = _load_image(path, pre)
            arrays.append(array)
            for kind in kinds:
                conversions[kind] = conversions.get(kind, 0) + 1
                examples.setdefault(kind, str(path.relative_to(root)))
            labels.append(mapping.folder_to_index[folder.name])
            files.append(str(path.relative_to(root)))
    if ignored:
        raise InputError(
            f"{len(ignored)} file(s) in {root} are not images ibau reads, e.g. {ignored[0]}",
            hint=f"remove them; readable suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}",
        )
    if not arrays:
        raise InputError(f"clean data folder {root} holds no images", hint="put images in DIR/<class>/")
    present = sorted(set(labels))
    if len(present) < 2:
        raise InputError(
            f"clean data folder {root} has images of only one class",
            hint="unlearning and accuracy checks need images of at least two classes",
        )
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    hidden = [p.name for p in _entries(root) if p.name.startswith(".") and p.is_dir() and _holds_images(p)]
    return CleanSet(
        hidden_with_images=hidden,
        images=x,
        labels=torch.tensor(labels, dtype=torch.long),
        mapping=mapping,
        files=files,
        conversions=conversions,
        examples=examples,
    )


def duplicate_groups(images: Tensor) -> Tensor:
    """A group id per image: images with the same pixels (after decoding and resizing, at 8 bits)
    share one, the id of the first of them; an image with no copy is its own group."""
    import hashlib

    first: dict[bytes, int] = {}
    ids = []
    for start in range(0, len(images), 256):  # quantised a chunk at a time: per-image tensor ops cost 0.6 ms
        chunk = (images[start : start + 256] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        for k, img in enumerate(chunk):
            ids.append(first.setdefault(hashlib.blake2b(img.tobytes()).digest(), start + k))
    return torch.tensor(ids, dtype=torch.long)


def stratified_split(labels: Tensor, holdout: float, seed: int, groups: Tensor | None = None) -> Split:
    """Per class, a seeded shuffle; ``round(holdout * n_c)`` images (at least one when the class
    has two or more) go to the held-out part, the rest to unlearning. With ``groups``
    (``duplicate_groups``), copies of an image stay on one side: the groups are shuffled and whole
    groups are held out until the class's share is reached (with no copies, the same split)."""
    gen = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        members = _groups_of(idx, groups)
        order = torch.randperm(len(members), generator=gen).tolist()
        n = len(idx)
        k = int(round(holdout * n))
        if len(members) >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        held: list[int] = []
        rest: list[int] = []
        for pos, g in enumerate(order):
            # a whole group goes to the held-out part when that brings the part nearer k (a single
            # image does exactly while the part is short of k: with no copies the split is 0.4.5's; a
            # group of ten copies does not overshoot k = 10 to 18); the last group never, if nothing
            # would be left for unlearning
            last = pos == len(order) - 1
            nearer = len(held) + len(members[g]) - k <= k - len(held)
            (held if nearer and not (last and not rest) else rest).extend(members[g])
        hold.append(torch.tensor(held, dtype=torch.long))
        keep.append(torch.tensor(rest, dtype=torch.long))
    unlearn_idx = torch.cat(keep).sort().values
    holdout_idx = torch.cat(hold).sort().values
    if len(unlearn_idx) == 0 or len(holdout_idx) == 0:
        raise InputError(
            f"the clean set ({len(labels)} images) is too small to split into unlearning and held-out parts",
            hint="provide more images per class",
        )
    return Split(unlearn_idx=unlearn_idx, holdout_idx=holdout_idx)


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` lists an image file; a folder that cannot be listed (.Trashes, another user's
    .Trash-1000) holds none that ibau could read."""
    try:
        return any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir())
    except OSError:
        return False


def _groups_of(idx: Tensor, groups: Tensor | None) -> list[list[int]]:
    """The images ``idx`` (one class) as lists of copies, in the order of their first image."""
    if groups is None:
        return [[i] for i in idx.tolist()]
    by_id: dict[int, list[int]] = {}
    for i in idx.tolist():
        by_id.setdefault(int(groups[i]), []).append(i)
    return list(by_id.values())
