"""A self-contained backdoored model for ``ibau demo`` and the tests, built in seconds on a CPU.

Data: 10 classes of synthetic 32x32 colour images (each class a random low-frequency texture,
randomly shifted, rescaled in brightness, mixed with a distractor texture and noised).
Attack: BadNets, a 3x3 white patch in the bottom-right corner relabelled to class 0, on 10 % of
the training images. Model: the ``small-cnn`` architecture, trained with SGD.
Nothing here is downloaded; everything is generated from a seed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .archs import ARCHS

NUM_CLASSES = 10
SIZE = 32
TARGET = 0
PATCH = 3


def synthetic_images(n: int, seed: int, *, num_classes: int = NUM_CLASSES) -> tuple[Tensor, Tensor]:
    """``n`` images as float [N, 3, 32, 32] in [0, 1] and their labels; the textures depend only
    on a fixed generator so every split shares the same classes."""
    proto_gen = torch.Generator().manual_seed(1234)
    protos = torch.rand(num_classes, 3, 4, 4, generator=proto_gen)
    protos = F.interpolate(protos, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=gen)]
    distract = torch.randint(0, num_classes, (n,), generator=gen)
    x = 0.75 * protos[labels] + 0.25 * protos[distract]
    shifts = torch.randint(-4, 5, (n, 2), generator=gen)
    x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts, strict=True)])
    x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=gen))
    x = x + 0.06 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1), labels


def add_badnets_trigger(x: Tensor) -> Tensor:
    """Paste the 3x3 white patch into the bottom-right corner."""
    x = x.clone()
    x[:, :, -PATCH:, -PATCH:] = 1.0
    return x


def trigger_patch() -> Tensor:
    return torch.ones(3, PATCH, PATCH)


@dataclass
class TrainedDemo:
    model: nn.Module
    clean_acc: float
    asr: float


def train_backdoored(
    seed: int = 0,
    *,
    n_train: int = 4000,
    epochs: int = 6,
    poison_ratio: float = 0.1,
    poison: bool = True,
    trigger_fn=add_badnets_trigger,
    arch: str = "small-cnn",
) -> TrainedDemo:
    """Train ``arch`` (a registered 32x32 RGB architecture) on synthetic data, poisoned with
    ``trigger_fn`` (BadNets by default) toward class 0 unless ``poison`` is False."""
    torch.manual_seed(seed)
    x, y = synthetic_images(n_train, seed=seed + 100)
    if poison:
        gen = torch.Generator().manual_seed(seed + 7)
        candidates = torch.nonzero(y != TARGET).flatten()
        k = int(poison_ratio * n_train)
        chosen = candidates[torch.randperm(len(candidates), generator=gen)[:k]]
        x[chosen] = trigger_fn(x[chosen])
        y = y.clone()
        y[chosen] = TARGET
    model = ARCHS.get(arch).build(NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((n_train + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n_train, generator=gen)
        for s in range(0, n_train, 64):
            idx = perm[s : s + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = synthetic_images(1000, seed=seed + 999)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
        keep = yt != TARGET
        asr = float((model(trigger_fn(xt[keep])).argmax(1) == TARGET).float().mean())
    return TrainedDemo(model=model, clean_acc=acc, asr=asr)


def write_image_folder(x: Tensor, y: Tensor, root: Path) -> None:
    """Write images as PNG in the ImageFolder layout ``root/<label>/<i>.png``."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:05d}.png")


def write_trigger(path: Path) -> None:
    from PIL import Image

    arr = (trigger_patch().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def build_demo(root: Path, *, n_clean: int = 500, seed: int = 0) -> dict[str, Path]:
    """Train the demo model and write ``model.safetensors``, ``clean/`` and ``trigger.png``."""
    from .formats import save_model

    root.mkdir(parents=True, exist_ok=True)
    trained = train_backdoored(seed)
    model_path = root / "model.safetensors"
    from .preprocess import Preprocess

    save_model(
        trained.model,
        model_path,
        fmt="safetensors",
        arch="small-cnn",
        num_classes=NUM_CLASSES,
        preprocess=Preprocess(),
        extra_metadata={"ibau.demo": "badnets 3x3 white patch bottom-right, target 0"},
    )
    x, y = synthetic_images(n_clean, seed=seed + 5000)
    clean = root / "clean"
    if not clean.exists():
        tmp = root / f".clean.tmp{os.getpid()}"
        try:
            write_image_folder(x, y, tmp)
            tmp.rename(clean)
        finally:  # Ctrl-C or a full disk mid-way: no half-written folder left behind
            shutil.rmtree(tmp, ignore_errors=True)
    write_trigger(root / "trigger.png")
    return {"model": model_path, "clean": clean, "trigger": root / "trigger.png"}
