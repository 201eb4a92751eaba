"""PNG images for a person to look at: synthesised triggers and a before/after chart.

``render_images`` makes them in memory (the HTML report embeds them); ``write_artifacts`` writes
them as files (``--artifacts DIR``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def _to_png(img: Tensor, scale: int | None = None) -> bytes:
    from PIL import Image

    arr = img.detach().float().clamp(0, 1).cpu()
    if arr.dim() == 4:
        arr = arr[0]
    arr = (arr.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    im = Image.fromarray(arr)
    if scale is None:  # enlarge small inputs to be seen (32 px -> 128 px), leave large ones as they are
        scale = max(1, min(4, 128 // max(1, min(im.height, im.width))))
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _grid(images: Tensor) -> Tensor:
    """[N, C, H, W] -> one [C, H, N*W] strip with 1-px gaps."""
    pad = torch.ones(images.shape[1], images.shape[2], 1)
    parts = []
    for img in images:
        parts += [img, pad]
    return torch.cat(parts[:-1], dim=2)


def _chart(rows: list[tuple[str, float | None, float | None]]) -> bytes:
    """Horizontal bars, before (grey) and after (green), for each figure in [0, 1]."""
    from PIL import Image, ImageDraw

    width, bar_w, row_h = 640, 360, 34
    im = Image.new("RGB", (width, 20 + row_h * len(rows) + 24), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 4), "before (grey) / after (green)", fill="black")
    for i, (label, b, a) in enumerate(rows):
        y = 24 + i * row_h
        d.text((10, y + 8), label[:36], fill="black")
        for j, (v, colour) in enumerate(((b, (150, 150, 150)), (a, (40, 160, 60)))):
            if v is None:
                continue
            top = y + j * 13
            d.rectangle([250, top, 250 + int(bar_w * v), top + 11], fill=colour)
            d.text((255 + int(bar_w * v), top), f"{v:.0%}", fill="black")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def render_images(x: Tensor, probes_before, probes_after, before, after) -> dict[str, bytes]:
    """PNG bytes by file name: synthesised triggers (mask, pattern, applied to clean images) and a chart."""
    images: dict[str, bytes] = {}
    sample = x[:8]
    for stage, suite in (("before", probes_before), ("after", probes_after)):
        if suite is None:
            continue
        mp = suite.artifacts.get("synth-mask-pattern")
        if mp and mp.get("mask") is not None:
            m, p = mp["mask"], mp["pattern"]
            for name, img in (
                ("mask", m.expand(-1, x.shape[1], -1, -1)),
                ("pattern", p),
                ("applied", _grid((1 - m) * sample + m * p)),
            ):
                images[f"{stage}-mask-pattern-{name}.png"] = _to_png(img)
        up = suite.artifacts.get("synth-universal-perturbation")
        if up and up.get("delta") is not None:
            delta = up["delta"]
            vis = (delta - delta.min()) / (delta.max() - delta.min() + 1e-12)
            for name, img in (("delta", vis), ("applied", _grid((sample + delta).clamp(0, 1)))):
                images[f"{stage}-universal-perturbation-{name}.png"] = _to_png(img)
    rows = [("clean accuracy", before.accuracy.value, after.accuracy.value if after else None)]
    if before.asr is not None:
        rows.append(("true-trigger ASR", before.asr.value, after.asr.value if after else None))
    if probes_before is not None:
        after_by_name = {r.name: r for r in probes_after.results} if probes_after else {}
        top = sorted(probes_before.results, key=lambda r: -(r.flip.value or 0))[:6]
        for r in top:
            a = after_by_name.get(r.name)
            rows.append((f"probe {r.name}", r.flip.value, a.flip.value if a else None))
    images["before-after.png"] = _chart(rows)
    return images


def write_artifacts(root: Path, images: dict[str, bytes]) -> list[Path]:
    """Write the rendered images into ``root`` (each file atomically)."""
    from .formats.base import write_atomically

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in images.items():
        path = root / name
        write_atomically(path, lambda tmp, data=data: tmp.write_bytes(data))
        written.append(path)
    return written
