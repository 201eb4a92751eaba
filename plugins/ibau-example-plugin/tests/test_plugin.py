"""The example plugin, installed as a package into a test folder and used from the ibau CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

PLUGIN = Path(__file__).resolve().parents[1]
SIZE = 6  # a 6x6 black/white checker patch at the bottom-right corner: the backdoor's trigger


COMMITTED_LENET = Path(__file__).parent / "data" / "lenet5-checker.safetensors"


def _checker() -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return ((ii + jj) % 2).float()


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -SIZE:, -SIZE:] = _checker()
    return x


def _ibau(*args, site: Path | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="120")
    env.pop("IBAU_PLUGINS", None)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "ibau_cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``pip install`` the plugin package into a folder of its own (a test environment)."""
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(PLUGIN)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-build-isolation")  # build with the setuptools already here
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert list(target.glob("ibau_example_plugin-*.dist-info/entry_points.txt"))
    return target


def test_installed_plugin_is_listed_with_its_origin(site):
    res = _ibau("plugins", "--json", site=site)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    archs = {a["name"]: a["origin"] for a in data["architectures"]}
    probes = {p["name"]: p["origin"] for p in data["probes"]}
    assert archs["lenet5"].startswith("entry point example (ibau-example-plugin 0.1.0)")
    assert probes["frame-yellow-1px"].startswith("entry point example")
    assert archs["small-cnn"] == "builtin"
    assert _ibau("plugins", "--json", "--no-plugins", site=site).returncode == 2  # --no-plugins is a group option
    quiet = json.loads(_ibau("--no-plugins", "plugins", "--json", site=site).stdout)
    assert "lenet5" not in {a["name"] for a in quiet["architectures"]}


@pytest.fixture(scope="module")
def lenet(tmp_path_factory) -> dict:
    """A LeNet-5 (the plugin's architecture) with a real checker-patch backdoor toward class 0.

    Committed, not trained here: ``train_backdoored(seed=0, arch="lenet5", epochs=8,
    trigger_fn=add_trigger)`` gives a different model with one torch thread than with two, and the
    one-thread model is not repaired (ASR 59-94 % after sanitize seeds 0-3, with 0.3.9 and 0.4.0
    alike: docs/algorithm.md); the file is the two-thread one, whose repair this suite asserts."""
    import shutil

    from PIL import Image

    from ibau_cli.demo import synthetic_images, write_image_folder
    from ibau_cli.formats import load_model
    from ibau_cli.plugins import load_plugin_file

    root = tmp_path_factory.mktemp("lenet")
    shutil.copy(COMMITTED_LENET, root / "lenet.safetensors")
    load_plugin_file(PLUGIN / "ibau_example_plugin" / "__init__.py")  # to measure the model in this process
    model = load_model(root / "lenet.safetensors").module.eval()
    x, y = synthetic_images(1000, seed=999)  # the images train_backdoored measures on
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
        asr = float((model(add_trigger(x[y != 0])).argmax(1) == 0).float().mean())
    assert accuracy > 0.9 and asr > 0.9, (accuracy, asr)
    x, y = synthetic_images(500, seed=4242)
    write_image_folder(x, y, root / "clean")
    patch = (_checker() * 255).to(torch.uint8).numpy()
    Image.fromarray(np.stack([patch] * 3, axis=-1)).save(root / "trigger.png")
    return {"root": root, "model": root / "lenet.safetensors", "clean": root / "clean", "trigger": root / "trigger.png"}


def test_scan_flags_the_backdoored_lenet_through_the_installed_plugin(site, lenet):
    args = ["scan", lenet["model"], "--clean", lenet["clean"], "--set", "probes.budget_steps=60", "--json"]
    missing = _ibau(*args, site=None)  # without the plugin the architecture is unknown: a clear error
    assert missing.returncode == 2 and "lenet5" in missing.stderr and "Traceback" not in missing.stderr
    res = _ibau(*args, site=site)
    assert res.returncode == 1, res.stderr  # exit 1: backdoor suspected
    probes = json.loads(res.stdout)["probes"]["before"]
    assert probes["verdict"] == "suspected" and probes["evidence"]["suspected_class"] == 0
    assert "frame-yellow-1px" in {p["name"] for p in probes["probes"]}


def test_sanitize_writes_a_lenet_that_reloads_through_the_plugin(site, lenet, tmp_path):
    from ibau_cli.formats import load_model

    out = tmp_path / "fixed.safetensors"
    args = ["sanitize", lenet["model"], "--clean", lenet["clean"], "--out", out, "--no-probes"]
    res = _ibau(*args, "--trigger", lenet["trigger"], "--target", "0", "--json", site=site)
    report = json.loads(res.stdout)
    assert res.returncode == (0 if report["verdict"] == "pass" else 1), res.stderr
    assert report["model"]["architecture"] == "lenet5" and report["before"]["asr"]["value"] > 0.9
    fixed = load_model(out)  # the architecture comes from the file's metadata and the plugin's registry
    assert type(fixed.module).__name__ == "LeNet5" and fixed.arch == "lenet5"
    before = load_model(lenet["model"]).module.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in fixed.module.state_dict().items())


@pytest.mark.slow
def test_default_sanitize_repairs_the_lenet_through_the_patch_region(site, lenet, tmp_path):
    """A model without BatchNorm and a patch trigger: I-BAU's dense perturbation alone left this
    LeNet at 43 % ASR for sanitize seed 2 (0.3.7, guided toward 0; docs/algorithm.md). The fixed probe
    that named class 0 is a corner patch, so the inner problem also searches that corner. (This
    fixture's LeNet, another training run, keeps 100 % without the patch family.)"""
    from ibau_cli.demo import synthetic_images
    from ibau_cli.formats import load_model
    from ibau_cli.plugins import load_plugin_file

    out = tmp_path / "fixed.safetensors"
    # the synthesised probes on a small budget: the fixed corner probe is what guides and places the region;
    # the trigger only measures (with 0.4.1's default it would also be unlearned, and no region grown)
    res = _ibau("sanitize", lenet["model"], "--clean", lenet["clean"], "--out", out, "--seed", "2",
                "--trigger", lenet["trigger"], "--target", "0", "--json", "--set", "probes.budget_steps=100",
                "--set", "unlearn.known_trigger=off", site=site)  # fmt: skip
    report = json.loads(res.stdout)
    assert res.returncode == 0, (res.stderr, report["gates"])
    patch = [f for f in report["unlearning"]["perturbations"] if f["family"] == "patch"]
    assert report["unlearning"]["guided_class"] == 0 and patch and patch[0]["probe"].startswith("patch-"), report[
        "unlearning"
    ]
    load_plugin_file(PLUGIN / "ibau_example_plugin" / "__init__.py")
    fixed = load_model(out).module.eval()
    x, y = synthetic_images(1000, seed=9999)  # images neither the training nor the repair saw
    keep = y != 0
    with torch.no_grad():
        accuracy = float((fixed(x).argmax(1) == y).float().mean())
        asr = float((fixed(add_trigger(x[keep])).argmax(1) == 0).float().mean())
    # measured: 15.4 % here, 100 % with --set unlearn.patch=off (the same model and seed)
    assert asr < 0.3 and accuracy > 0.9, (asr, accuracy)


def test_plugin_file_flag_and_a_broken_plugin(tmp_path):
    res = _ibau("--plugin", PLUGIN / "ibau_example_plugin" / "__init__.py", "plugins", "--json", site=None)
    assert res.returncode == 0, res.stderr
    origin = {a["name"]: a["origin"] for a in json.loads(res.stdout)["architectures"]}["lenet5"]
    assert origin.startswith("file ") and origin.endswith("__init__.py")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    res = _ibau("--plugin", broken, "archs", site=None)
    assert res.returncode == 2 and "broken.py" in res.stderr and "no_such_module_anywhere" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
