"""An architecture a user registers from a plugin file, with no input shape declared: the shape is
read from the model's first convolution and the clean images (ibau_cli/input_shape.py). The
end-to-end test trains a real backdoored MNIST model (needs ../shared/data)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SHARED_DATA, run_cli
from ibau_cli.input_shape import common_image_size, first_conv_channels, infer_input

PLUGIN = """
import torch
from torch import nn


class MnistNet(nn.Module):
    def __init__(self, n: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 64)
        self.head = nn.Linear(64, n)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(torch.relu(self.fc(x.flatten(1))))


def register() -> None:
    from ibau_cli.archs import ArchSpec, register_arch

    register_arch(ArchSpec(name="mnist-net", factory=MnistNet, classifier_key="head.weight"))
"""


def _plugin(tmp_path: Path):
    """The plugin file, and its module loaded here too (to train the model it registers)."""
    import importlib.util

    path = tmp_path / "mnist_plugin.py"
    path.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("mnist_plugin_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def test_the_first_convolution_gives_the_channels_in_every_torch_form(tmp_path):
    _, plugin = _plugin(tmp_path)
    net = plugin.MnistNet().eval()
    assert first_conv_channels(net) == (1, "conv1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, torch.rand(1, 1, 28, 28))
    assert first_conv_channels(scripted) == (1, "conv1")
    assert first_conv_channels(traced) == (1, "conv1")  # a traced module keeps only the weight
    # no convolution, or one taking neither 1 nor 3 channels: nothing is inferred
    assert first_conv_channels(nn.Sequential(nn.Flatten(), nn.Linear(784, 10))) is None
    assert first_conv_channels(nn.Sequential(nn.Conv2d(4, 8, 3))) is None


def test_the_clean_images_give_the_size_only_when_they_all_share_it(tmp_path):
    from PIL import Image

    root = tmp_path / "clean"
    for cls, size in (("0", (20, 12)), ("1", (20, 12))):
        (root / cls).mkdir(parents=True)
        Image.new("L", size).save(root / cls / "a.png")
    assert common_image_size(root) == ((12, 20), 2)  # (height, width)
    assert infer_input(nn.Conv2d(1, 4, 3), root).layer() == {"preprocess": {"channels": 1, "input_size": [12, 20]}}
    Image.new("L", (21, 12)).save(root / "1" / "b.png")
    assert common_image_size(root) is None
    assert infer_input(nn.Linear(3, 3), root) is None
    assert common_image_size(tmp_path / "missing") is None  # the loader reports it, in its own words
    # photos from one camera are not an input size: past 512 a side nothing is inferred from them
    big = tmp_path / "photos"
    for cls in ("0", "1"):
        (big / cls).mkdir(parents=True)
        Image.new("RGB", (640, 480)).save(big / cls / "a.jpg")
    assert common_image_size(big) == ((480, 640), 2) and infer_input(nn.Linear(3, 3), big) is None


def test_a_partly_declared_shape_is_noted_for_the_part_read(tmp_path):
    """An architecture declaring its size and not its channels (as the example plugin's LeNet-5 does):
    the note names the channels read from the model, not the images' size, which lost to the
    architecture's."""
    from PIL import Image

    from ibau_cli.archs import ARCHS, ArchSpec, register_arch
    from ibau_cli.formats import load_model
    from ibau_cli.pipeline import SanitizeRequest, settings_for

    _, plugin = _plugin(tmp_path)
    register_arch(ArchSpec("mnist-net-32", plugin.MnistNet, "head.weight", input_size=(32, 32)), origin="test")
    try:
        torch.save(plugin.MnistNet().state_dict(), tmp_path / "m.pt")
        for cls in ("0", "1"):
            (tmp_path / "clean" / cls).mkdir(parents=True)
            Image.new("L", (28, 28)).save(tmp_path / "clean" / cls / "a.png")
        loaded = load_model(tmp_path / "m.pt", arch="mnist-net-32")
        request = SanitizeRequest(model=tmp_path / "m.pt", clean=tmp_path / "clean", arch="mnist-net-32")
        settings, _ = settings_for(loaded, request, tmp_path / "clean")
        assert (settings.preprocess.channels, settings.preprocess.input_size) == (1, (32, 32))
        (note,) = [n for n in loaded.notes if n.startswith("input shape")]
        assert note.startswith("input shape 1x32x32") and "first convolution (conv1)" in note and "28x28" not in note
    finally:
        ARCHS.forget_origin("test")


def test_a_declared_shape_wins_over_what_the_model_and_images_say():
    from ibau_cli.settings_resolve import INFERRED_LAYER, resolve_settings

    inferred = {"preprocess": {"channels": 1, "input_size": [28, 28]}}
    settings, sources = resolve_settings(
        arch="small-cnn", model_preprocess=None, preset=None, inferred=inferred, config_file=None, overrides={}
    )
    assert (settings.preprocess.channels, settings.preprocess.input_size) == (3, (32, 32))
    settings, sources = resolve_settings(
        arch=None, model_preprocess=None, preset=None, inferred=inferred, config_file=None, overrides={}
    )
    assert (settings.preprocess.channels, settings.preprocess.input_size) == (1, (28, 28))
    assert sources.origins["preprocess.input_size"] == INFERRED_LAYER
    assert settings.preprocess.mean == (0.0,)  # one channel: one mean


def _white_square(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -5:-1, -5:-1] = 1.0
    return x


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / "mnist" / "test.npz").is_file(), reason="needs ../shared/data (IBAU_DATA)")
def test_a_plugin_mnist_model_with_no_declared_shape_is_scanned_and_repaired(tmp_path, monkeypatch):
    """A user's plugin registers an MNIST net and declares no input shape. 0.4.4 ran it on 3x32x32
    and stopped (exit 2, "set the input size and channels"). Now: 1x28x28 from its first convolution
    and the clean digits, the 4x4 white-square backdoor found and removed; figures recomputed here on
    2,700 digits ibau never saw. Trained here: 7,000 MNIST test digits, 10 % poisoned, target 0."""
    import torch.nn.functional as F

    sys_path, plugin = _plugin(tmp_path)
    data = np.load(SHARED_DATA / "mnist" / "test.npz", allow_pickle=False)
    perm = np.random.default_rng(0).permutation(len(data["labels"]))
    images, labels = data["images"][perm], data["labels"][perm]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = plugin.MnistNet()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(4):
        order = torch.randperm(7000)
        for i in range(0, 7000, 64):
            b = order[i : i + 64]
            xb, yb = x[b].clone(), y[b].clone()
            poison = torch.rand(len(b)) < 0.1
            xb[poison], yb[poison] = _white_square(xb[poison]), 0
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.eval().state_dict(), tmp_path / "model.pt")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zoo

    zoo.write_folder(images[7000:7300], labels[7000:7300], tmp_path / "clean")
    out = tmp_path / "fixed.pt"
    res = run_cli("--plugin", sys_path, "sanitize", tmp_path / "model.pt", "--arch", "mnist-net", "--clean",
                  tmp_path / "clean", "--out", out, "--json", "-q", "--set", "probes.budget_steps=100", probes=True)  # fmt: skip
    assert res.returncode in (0, 1), res.stderr
    report = json.loads(res.stdout)
    assert report["config"]["preprocess"]["channels"] == 1 and report["config"]["preprocess"]["input_size"] == [28, 28]
    assert any(
        n.startswith("input shape 1x28x28 read from the model and the clean images") for n in report["model"]["notes"]
    )
    said = "the model's input size, 28x28, is the size of every clean image"
    assert any(w.startswith(said) for w in report["warnings"]), report["warnings"]
    probes = report["probes"]
    assert probes["before"]["verdict"] == "suspected" and probes["before"]["evidence"]["suspected_class"] == 0
    assert probes["after"]["verdict"] != "suspected", probes["after"]["evidence"]
    (asr_gate,) = [g for g in report["gates"] if g["name"] == "asr"]
    assert asr_gate["status"] == "pass", asr_gate
    x_eval, y_eval = x[7300:], y[7300:]
    figures = []
    for path in (tmp_path / "model.pt", out):
        net = plugin.MnistNet()
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state.get("state_dict", state))  # ibau writes {state_dict, ibau_metadata}
        with torch.no_grad():
            acc = float((net.eval()(x_eval).argmax(1) == y_eval).float().mean())
            asr = float((net(_white_square(x_eval[y_eval != 0])).argmax(1) == 0).float().mean())
        figures.append((acc, asr))
    (acc0, asr0), (acc1, asr1) = figures
    assert asr0 > 0.9 and asr1 < 0.05, figures
    assert acc1 > acc0 - 0.03, figures


def test_config_show_says_what_a_run_reads_from_the_clean_images(tmp_path):
    from PIL import Image

    path, plugin = _plugin(tmp_path)
    torch.save(plugin.MnistNet().state_dict(), tmp_path / "m.pt")
    for cls in ("0", "1"):
        (tmp_path / "clean" / cls).mkdir(parents=True)
        Image.new("L", (28, 28)).save(tmp_path / "clean" / cls / "a.png")
    show = ["--plugin", path, "config", "show", tmp_path / "m.pt", "--arch", "mnist-net", "--json"]
    res = run_cli(*show, "--clean", tmp_path / "clean")
    assert res.returncode == 0, res.stderr
    shown = json.loads(res.stdout)
    assert shown["config"]["preprocess"]["input_size"] == [28, 28] and shown["config"]["preprocess"]["channels"] == 1
    res = run_cli(*show)  # without the images: the channels only
    assert json.loads(res.stdout)["config"]["preprocess"]["input_size"] == [32, 32]
    res = run_cli(*show, "--clean", tmp_path / "nope")
    assert res.returncode == 2 and res.stderr.strip().startswith("error: --clean") and "not a folder" in res.stderr
    res = run_cli("config", "show", "--clean", tmp_path / "clean")
    assert res.returncode == 2 and "with MODEL only" in res.stderr, res.stderr


def test_matching_a_file_to_the_registry_builds_each_candidate_for_one_class():
    """A file with no --arch and no metadata is matched against every registered architecture built
    for 1 class (its classifier's rows left free), so a malformed class count never sizes a model,
    and a plugin factory that fails, even with sys.exit, only fails to match."""
    from ibau_cli.archs import ARCHS, ArchSpec, register_arch
    from ibau_cli.archs.small_cnn import SmallCNN
    from ibau_cli.formats.state_dict import registered_matches

    calls = []

    def exits(num_classes: int) -> nn.Module:
        calls.append(num_classes)
        raise SystemExit(3)

    register_arch(ArchSpec("exits-on-build", exits, "classifier.weight"), origin="test")
    try:
        tensors = SmallCNN(1000).state_dict()
        assert registered_matches(tensors) == ["small-cnn"] and calls == [1]
    finally:
        ARCHS.forget_origin("test")
