#!/usr/bin/env python
"""The benchmark zoo's recipes, trained one after another with ``zoo.py train`` (resumable).

    python benchmarks/zoo_plan.py --list
    python benchmarks/zoo_plan.py [--only SUBSTRING] [--threads 1]

A model whose ``manifest.json`` exists is skipped; a killed run resumes from its checkpoint when the
same command is run again. Models go to ``$IBAU_ZOO_DIR`` (default ``~/.cache/ibau-zoo``).

The CPU recipe: the small CNN (``small-cnn``, 0.1 M parameters) on GTSRB (25,087 training images,
about 8 s an epoch on one core) and CIFAR-10, plus the paper's small VGG on CIFAR-10 (35 min on one
core). Targets differ between models so that a probe naming the right class is not luck.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    name: str
    dataset: str
    arch: str
    attack: str
    target: int = 0
    poison_ratio: float = 0.1
    epochs: int = 30
    seed: int = 0
    train_subset: int | None = None
    amp: str = "off"

    def argv(self) -> list[str]:
        extra = (["--train-subset", str(self.train_subset)] if self.train_subset else []) + (
            ["--amp", self.amp] if self.amp != "off" else []
        )
        return [
            "train",
            "--name", self.name,
            "--dataset", self.dataset,
            "--arch", self.arch,
            "--attack", self.attack,
            "--target", str(self.target),
            "--poison-ratio", str(self.poison_ratio),
            "--epochs", str(self.epochs),
            "--seed", str(self.seed),
            "--log-every", "0",
            *extra,
        ]  # fmt: skip


def _gtsrb(
    attack: str, target: int = 0, *, poison: float = 0.1, epochs: int = 30, seed: int = 0, tag: str = ""
) -> Recipe:
    name = f"gtsrb-smallcnn-{attack}{tag}" + (f"-s{seed}" if attack == "clean" else "")
    return Recipe(name, "gtsrb", "small-cnn", attack, target, poison if attack != "clean" else 0.0, epochs, seed)


def _cifar(attack: str, target: int = 0, *, poison: float = 0.1, epochs: int = 30, seed: int = 0) -> Recipe:
    name = f"cifar10-smallcnn-{attack}" + (f"-s{seed}" if attack == "clean" else "")
    return Recipe(name, "cifar10", "small-cnn", attack, target, poison if attack != "clean" else 0.0, epochs, seed)


RECIPES: tuple[Recipe, ...] = (
    Recipe("cifar10-smallvgg-badnets", "cifar10", "small-vgg", "badnets", 0, 0.1, 14, 0),
    Recipe("cifar10-smallvgg-clean-s0", "cifar10", "small-vgg", "clean", 0, 0.0, 14, 0),
    Recipe("cifar10-smallvgg-blend", "cifar10", "small-vgg", "blend", 6, 0.1, 14, 0),
    _gtsrb("badnets", 2),
    _gtsrb("blend", 5),
    _gtsrb("trojan-square", 8),
    _gtsrb("watermark", 12),
    _gtsrb("invisible", 14),
    _gtsrb("sig", 17, poison=0.2),
    _gtsrb("wanet", 25, poison=0.2, epochs=40),
    _gtsrb("all2all"),
    _gtsrb("badnets", 33, poison=0.2, tag="-p20"),
    # the same watermark toward a class that is not yellow (12, priority road, is: a colour shift alone
    # sends clean GTSRB models' images there)
    _gtsrb("watermark", 3, tag="-t3"),
    # BadNets' patch halfway down the right edge (0.4.0 added fixed probes there)
    _gtsrb("badnets-edge", 38),
    _gtsrb("clean", seed=0),
    _gtsrb("clean", seed=1),
    _gtsrb("clean", seed=2),
    _cifar("badnets", 3),
    _cifar("blend", 6),
    _cifar("watermark", 9),
    _cifar("wanet", 4, poison=0.2, epochs=40),
    _cifar("all2all"),
    _cifar("clean", seed=0),
    _cifar("clean", seed=1),
)

# The paper's PreAct-ResNet-18 (11 M parameters, 43 MB: cached, never committed). About 30 minutes an
# epoch on this 2-core CPU, so these train only with --gpu-recipes (on a GPU, under bf16 autocast: a few
# seconds an epoch).
GPU_RECIPES: tuple[Recipe, ...] = tuple(
    Recipe(
        f"cifar10-preactresnet18-{attack}" + ("-s0" if attack == "clean" else ""),
        "cifar10",
        "preact-resnet18",
        attack,
        target,
        0.0 if attack == "clean" else poison,
        60,
        0,
        amp="bf16",
    )  # fmt: skip
    for attack, target, poison in (
        ("badnets", 0, 0.1),
        ("blend", 0, 0.1),
        ("trojan-square", 0, 0.1),
        ("sig", 0, 0.2),
        ("wanet", 0, 0.2),
        ("all2all", 0, 0.1),
        ("clean", 0, 0.0),
    )
) + (
    # GTSRB at full size (all 25,087 training images): 20 epochs, about 2.5 s each on one H100
    Recipe("gtsrb-preactresnet18-badnets", "gtsrb", "preact-resnet18", "badnets", 2, 0.1, 20, 0, amp="bf16"),
    Recipe("gtsrb-preactresnet18-blend", "gtsrb", "preact-resnet18", "blend", 5, 0.1, 20, 0, amp="bf16"),
)

# The same architecture on a CPU budget (--resnet-cpu): 20,000 training images, 12 epochs, bf16
# autocast (2x faster than fp32 on this AVX-512 BF16 CPU): about 40 minutes a model on 2 threads.
CPU_RESNET_RECIPES: tuple[Recipe, ...] = (
    Recipe("cifar10-preactresnet18-badnets-cpu", "cifar10", "preact-resnet18", "badnets", 7, 0.1, 12, 0, 20000, "bf16"),
    Recipe("cifar10-preactresnet18-blend-cpu", "cifar10", "preact-resnet18", "blend", 2, 0.1, 12, 0, 20000, "bf16"),
)

SMALL_BYTES = 2 * 2**20
COPIED = ("model.safetensors", "manifest.json", "trigger.png", "mask.png")


def copy_small(src: Path, dest: Path, only: str = "") -> int:
    """Copy the finished small models, so tests and benchmarks can use them without training."""
    import shutil

    for r in RECIPES:
        run = src / r.name
        if only not in r.name or not (run / "manifest.json").is_file():
            continue
        if (run / "model.safetensors").stat().st_size > SMALL_BYTES:
            print(f"skip  {r.name} (model larger than 2 MB)")
            continue
        (dest / r.name).mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (run / name).is_file():
                shutil.copy2(run / name, dest / r.name / name)
        print(f"copy  {r.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the recipes and their state, train nothing")
    ap.add_argument("--only", default="", help="train only recipes whose name contains this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--gpu-recipes",
        action="store_true",
        help="also the PreAct-ResNet-18 recipes (meant for a GPU; see GPU_RECIPES)",
    )
    ap.add_argument(
        "--resnet-cpu",
        action="store_true",
        help="also the PreAct-ResNet-18 CPU recipes (20,000 images, 12 epochs, bf16; see CPU_RESNET_RECIPES)",
    )
    ap.add_argument("--out-dir", default=None, help="default: $IBAU_ZOO_DIR or ~/.cache/ibau-zoo")
    ap.add_argument(
        "--copy-small",
        metavar="DIR",
        help="copy finished models of at most 2 MB (model, manifest, trigger files) into DIR, train nothing",
    )
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import zoo  # noqa: PLC0415  (benchmarks/zoo.py)

    out = Path(args.out_dir).expanduser() if args.out_dir else zoo.default_out_dir()
    if args.copy_small:
        return copy_small(out, Path(args.copy_small), args.only)
    failed = []
    recipes = (
        RECIPES
        + (GPU_RECIPES if args.gpu_recipes or args.list else ())
        + (CPU_RESNET_RECIPES if args.resnet_cpu or args.list else ())
    )
    for r in recipes:
        if args.only not in r.name:
            continue
        done = (out / r.name / "manifest.json").is_file()
        if args.list:
            gpu = " (--gpu-recipes)" if r in GPU_RECIPES else " (--resnet-cpu)" if r in CPU_RESNET_RECIPES else ""
            print(f"{'done' if done else 'todo':4}  {r.name:34} {' '.join(r.argv()[1:])}{gpu}")
            continue
        if done:
            continue
        cmd = [sys.executable, str(HERE / "zoo.py"), *r.argv(), "--threads", str(args.threads), "--out-dir", str(out)]
        print("+", " ".join(cmd), flush=True)
        if subprocess.call(cmd) != 0:
            failed.append(r.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
