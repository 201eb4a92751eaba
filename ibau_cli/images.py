"""Decoding one image file into 8-bit pixels, with the errors a user can act on."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .errors import InputError

# PIL modes holding more than 8 bits per pixel, scaled to 8 bits before any conversion (PIL's own
# convert() clips them at 255, which turns a 16-bit grey image white).
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_image(path: Path, mode: str, what: str = "image"):
    """``path`` decoded and converted to the PIL ``mode`` (``L``, ``RGB``, ``LA``, ``RGBA``), fully
    loaded. 16-bit images are scaled to 8 bits. Unreadable, truncated or oversized files raise
    InputError naming the file."""
    return read_image(path, mode, what)[0]


def read_image(path: Path, mode: str, what: str = "image"):
    """``open_image``, with the file's own PIL mode and size (what the conversion started from)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # a very large image is resized to the model's input anyway; PIL's warning would only be
            # printed raw in the middle of the progress display
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                source = (img.mode, img.size)
                # a camera's JPEG stores pixels unrotated and an EXIF tag saying how to show them: the
                # image a viewer (and a person labelling it) sees is the rotated one
                img = ImageOps.exif_transpose(img)
                if img.mode in _WIDE_INT_MODES:
                    img = _to_8bit(img)
                return img.convert(mode), *source
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"{what} {path} is too large to decode safely ({exc})",
            hint="resize it to the model's input size, or remove it",
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        if path.is_file() and path.stat().st_size == 0:
            raise InputError(f"{what} {path} is empty (0 bytes)", hint="remove or replace the file") from exc
        raise InputError(
            f"cannot read {what} {path} ({type(exc).__name__}: {exc})",
            hint="remove or replace the file",
        ) from exc


def _to_8bit(img):
    from PIL import Image

    arr = np.asarray(img).astype(np.float64)
    # 16-bit modes and 32-bit integer images holding 16-bit values (how PIL opens some 16-bit PNGs)
    if img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
