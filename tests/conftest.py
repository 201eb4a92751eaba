"""Shared fixtures: a real small CNN with a real BadNets backdoor, trained once per session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from ibau_cli.demo import (
    NUM_CLASSES,
    TARGET,
    TrainedDemo,
    add_badnets_trigger,
    synthetic_images,
    train_backdoored,
    write_image_folder,
    write_trigger,
)
from ibau_cli.formats import save_model
from ibau_cli.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IBAU_DATA", REPO.parent / "shared" / "data"))


@contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder shared by this run's xdist workers, and whether it still has to be built: the first
    worker to get here builds it while holding a lock, the others wait and then read it. A session
    fixture that trains models would otherwise train them once per worker."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / f"built-{name}"
    done = root / ".built"
    with FileLock(str(root) + ".lock"):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed part-way is redone
            root.mkdir()
        yield root, not done.exists()
        done.touch()


def _load_module(path: Path) -> torch.nn.Module:
    from ibau_cli.formats import load_model

    return load_model(path).module


@pytest.fixture(scope="session")
def backdoored(tmp_path_factory) -> dict:
    """A backdoored small-cnn saved as safetensors (with ibau metadata), a clean folder of 500
    images, one of 100, the trigger patch, and an independent evaluation set."""
    with built_once(tmp_path_factory, "backdoored") as (root, build):
        if build:
            trained = train_backdoored(seed=0)
            assert trained.clean_acc > 0.9 and trained.asr > 0.9, (trained.clean_acc, trained.asr)
            save_model(trained.model, root / "model.safetensors", fmt="safetensors", arch="small-cnn",
                       num_classes=NUM_CLASSES, preprocess=Preprocess())  # fmt: skip
            x, y = synthetic_images(500, seed=4242)
            write_image_folder(x, y, root / "clean500")
            x100, y100 = synthetic_images(100, seed=4343)
            write_image_folder(x100, y100, root / "clean100")
            write_trigger(root / "trigger.png")
    x_eval, y_eval = synthetic_images(1000, seed=9999)  # never seen by ibau
    return {
        "root": root,
        "model": root / "model.safetensors",
        "module": _load_module(root / "model.safetensors"),
        "clean500": root / "clean500",
        "clean100": root / "clean100",
        "trigger": root / "trigger.png",
        "x_eval": x_eval,
        "y_eval": y_eval,
    }


def _plus_sign(x: torch.Tensor) -> torch.Tensor:
    """A magenta plus sign, 5x5, off-centre at rows 5-9 / columns 20-24: no fixed probe is like it."""
    x = x.clone()
    x[:, :, 7, 20:25] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1)
    x[:, :, 5:10, 22] = torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1)
    return x


def mid_right_patch(x: torch.Tensor) -> torch.Tensor:
    """A white 3x3 patch halfway down the right edge, touching it: no corner, not the centre."""
    x = x.clone()
    top = (x.shape[-2] - 3) // 2
    x[:, :, top : top + 3, -3:] = 1.0
    return x


@pytest.fixture(scope="session")
def demo_zoo(tmp_path_factory) -> dict:
    """Four more real small CNNs on the synthetic data, trained once per run (2,000 images each,
    half the demo's, to keep CI short): two clean ones, one with a trigger no fixed probe draws and
    one with a patch halfway down an edge, each as (safetensors path, TrainedDemo)."""
    recipes = {
        "clean0": {"seed": 0, "poison": False},
        "clean1": {"seed": 1, "poison": False},
        "plus": {"seed": 2, "trigger_fn": _plus_sign},
        "edge": {"seed": 2, "trigger_fn": mid_right_patch},
    }
    with built_once(tmp_path_factory, "demo-zoo") as (root, build):
        if build:
            figures = {}
            for name, kwargs in recipes.items():
                trained = train_backdoored(n_train=2000, **kwargs)
                save_model(trained.model, root / f"{name}.safetensors", fmt="safetensors", arch="small-cnn",
                           num_classes=NUM_CLASSES, preprocess=Preprocess())  # fmt: skip
                figures[name] = {"clean_acc": trained.clean_acc, "asr": trained.asr}
            (root / "figures.json").write_text(json.dumps(figures))
    figures = json.loads((root / "figures.json").read_text())
    models = {
        name: (root / f"{name}.safetensors", TrainedDemo(_load_module(root / f"{name}.safetensors"), **figures[name]))
        for name in recipes
    }
    assert models["plus"][1].asr > 0.9 and models["edge"][1].asr > 0.9 and models["clean0"][1].clean_acc > 0.9
    return models


def independent_figures(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Clean accuracy and BadNets ASR (non-target images), computed without ibau's evaluator."""
    module.eval()
    with torch.no_grad():
        acc = float((module(x).argmax(1) == y).float().mean())
        keep = y != TARGET
        asr = float((module(add_badnets_trigger(x[keep])).argmax(1) == TARGET).float().mean())
    return acc, asr


def sanitize_with_trigger(backdoored: dict, model: Path, clean: str, out: Path, *extra) -> list:
    """`sanitize MODEL --clean <clean set> --out OUT` given the backdoor's true trigger (3x3 patch,
    target 0), then ``extra`` flags: the command most tests run."""
    args = ["sanitize", model, "--clean", backdoored[clean], "--out", out]
    return [*args, "--trigger", backdoored["trigger"], "--target", "0", *extra]


KNOWN_TRIGGER_ON = "unlearn.known_trigger=auto"  # a test of the known-trigger repair passes --set with this


def without_probes(args: tuple, probes: bool) -> list[str]:
    """The probes take a while; tests about something else switch them off.

    On the 100-image clean sets ibau holds out 20 images, so one image is 5 accuracy points:
    those runs get a coarse accuracy gate, and the tests assert the accuracy drop themselves on
    1,000 independent images instead.

    A sanitize given ``--trigger`` also gets ``unlearn.known_trigger = "off"`` unless the test sets
    it: the trigger then only measures, so these tests check that I-BAU itself removed the backdoor
    (with the default, the repair would also be shown the trigger it is measured with).
    """
    args = [str(a) for a in args]
    if args and args[0] == "sanitize":
        if not probes and "--no-probes" not in args:
            args.append("--no-probes")
        if "--trigger" in args and not any(a.startswith("unlearn.known_trigger") for a in args):
            args += ["--set", "unlearn.known_trigger=off"]
        if any(a.endswith("clean100") for a in args) and "--max-acc-drop" not in args:
            args += ["--max-acc-drop", "0.2"]
    return args


def run_cli(*args: str, cwd: Path | None = None, probes: bool = False) -> subprocess.CompletedProcess:
    """Run the real command line in a subprocess, as a user would."""
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run(
        [sys.executable, "-m", "ibau_cli", *without_probes(args, probes)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=900,
    )
