"""The committed zoo models (benchmarks/zoo-models, trained by benchmarks/zoo_plan.py on real GTSRB
and CIFAR-10) through the CLI, on real test images. Skipped when ../shared/data is absent."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, SHARED_DATA, run_cli

ZOO = REPO / "benchmarks" / "zoo-models"
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_DATA / "gtsrb" / "test.npz").is_file(), reason="needs ../shared/data (IBAU_DATA)"),
]


def _split(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The benchmarks' split of the test set: clean sets from the first half, evaluation on the second."""
    import zoo

    x, y, _, _ = zoo.load_split(SHARED_DATA, dataset, "test")
    perm = np.random.default_rng(1000).permutation(len(y))
    half = len(perm) // 2
    return x[perm[:half]], y[perm[:half]], x[perm[half:]], y[perm[half:]]


def _clean_folder(tmp_path: Path, dataset: str, n: int) -> Path:
    """The images benchmarks/probe_eval.py scans (seed 0), so a test reproduces a PROBES.md row."""
    import zoo
    from probe_eval import scan_indices

    x, y, _, _ = zoo.load_split(SHARED_DATA, dataset, "test")
    pick = scan_indices(len(y), n, 0)
    zoo.write_folder(x[pick], y[pick], tmp_path / "clean")
    return tmp_path / "clean"


def _true_figures(dataset: str, attack: str, target: int, *paths: Path) -> list[tuple[float, float]]:
    """(accuracy, ASR) of each model file on the first 1,000 evaluation-half test images, the ASR
    with the attack's true trigger on those whose label is not the target."""
    import zoo

    from ibau_cli.formats import load_model
    from ibau_cli.preprocess import Normalized

    _, _, x_eval, y_eval = _split(dataset)
    x_eval, y_eval = x_eval[:1000], y_eval[:1000]
    x_trig = zoo.triggered_uint8(attack, x_eval[y_eval != target], 0)
    figures = []
    for path in paths:
        loaded = load_model(path)
        model = Normalized(loaded.module, loaded.preprocess).eval()
        with torch.no_grad():
            acc = float((model(zoo.to_float(x_eval)).argmax(1).numpy() == y_eval).mean())
            asr = float((model(zoo.to_float(x_trig)).argmax(1) == target).float().mean())
        figures.append((acc, asr))
    return figures


@pytest.mark.parametrize(
    "name",
    [
        "gtsrb-smallcnn-trojan-square",  # magenta/green squares: no fixed probe flips it, the synthesised one does
        "gtsrb-smallcnn-all2all",  # all-to-all (label -> label + 1)
        # the clean GTSRB model (PROBES.md: inconclusive at 500 images, never suspected) was scanned here
        # too until 0.4.5, 62 s of the suite; test_units re-judges every committed 100-image zoo scan,
        # 15 of them clean, with the current rules, and the 100-image test below sanitizes it
        # the clean small VGG (no evidence) is left to benchmarks/probe_eval.py (PROBES.md): its scan took
        # 154 s of the suite's 823, the synthesised probes spending their whole budget on every class.
        # Blend and WaNet scans (a minute each) are left to PROBES.md too: the sanitize tests below
        # assert that the probes name their targets (blend with 100 images, WaNet and SIG with 500).
    ],
)
def test_scan_flags_the_backdoored_zoo_models(name, tmp_path):
    manifest = json.loads((ZOO / name / "manifest.json").read_text())
    clean = _clean_folder(tmp_path, manifest["dataset"], 500)  # PROBES.md's N = 500 rows, seed 0
    res = run_cli("scan", ZOO / name / "model.safetensors", "--clean", clean, "--json", "-q")
    assert res.returncode in (0, 1), res.stderr
    probes = json.loads(res.stdout)["probes"]["before"]
    assert probes["verdict"] == "suspected" and res.returncode == 1, probes["evidence"]
    if manifest["attack"] != "all2all":
        assert probes["evidence"]["suspected_class"] == manifest["target"]


def test_sanitize_removes_the_cifar10_badnets_backdoor_on_real_images(tmp_path):
    """The paper's small VGG with a real BadNets backdoor, 500 clean CIFAR-10 test images; figures
    recomputed here on 1,000 other test images with the true trigger."""
    run = ZOO / "cifar10-smallvgg-badnets"
    clean = _clean_folder(tmp_path, "cifar10", 500)
    out = tmp_path / "fixed.safetensors"
    res = run_cli("sanitize", run / "model.safetensors", "--clean", clean, "--out", out, "--trigger",
                  run / "trigger.png", "--target", "0", "--max-acc-drop", "0.1", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    (acc0, asr0), (acc1, asr1) = _true_figures("cifar10", "badnets", 0, run / "model.safetensors", out)
    assert asr0 > 0.85 and asr1 < 0.1, (asr0, asr1)
    assert acc1 > acc0 - 0.06, (acc0, acc1)


def _sanitize_without_trigger(tmp_path: Path, name: str, n_clean: int) -> tuple[dict, Path, Path, int]:
    """``ibau sanitize`` on a committed zoo model as a user runs it (probes on, no --trigger):
    (report, input model, repaired model, the backdoor's target)."""
    run = ZOO / name
    target = json.loads((run / "manifest.json").read_text())["target"]
    clean = _clean_folder(tmp_path, "gtsrb", n_clean)
    out = tmp_path / "fixed.safetensors"
    res = run_cli("sanitize", run / "model.safetensors", "--clean", clean, "--out", out, "--json", "-q", probes=True)
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout), run / "model.safetensors", out, target


def test_probe_guided_sanitize_removes_the_gtsrb_sig_backdoor(tmp_path):
    """The SIG (sinusoidal-signal) GTSRB model, sanitized the way a user would, with no --trigger:
    the probes suspect class 17 and guide the unlearning toward it; figures recomputed here on 1,000
    other test images with the true trigger, after a repair on 500 clean images (400 unlearned; 0.4.4
    used 1,000: the test took 100 s on one worker). (Plain I-BAU left 96 % ASR on this model in one seed of
    three at 2,500 images: docs/algorithm.md.)"""
    report, model, out, target = _sanitize_without_trigger(tmp_path, "gtsrb-smallcnn-sig", 500)
    assert report["probes"]["before"]["verdict"] == "suspected"
    assert report["unlearning"]["guided_class"] == target
    # the probes fire on a signal, not a warp: the inner problem stays I-BAU's additive one
    assert [p["family"] for p in report["unlearning"]["perturbations"]] == ["additive"]
    (acc0, asr0), (acc1, asr1) = _true_figures("gtsrb", "sig", target, model, out)
    assert asr0 > 0.9 and asr1 < 0.1, (asr0, asr1)
    assert acc1 > acc0 - 0.04, (acc0, acc1)


def test_warp_probe_adds_the_warp_family_and_removes_the_gtsrb_wanet_backdoor(tmp_path):
    """The WaNet GTSRB model (a fixed sub-pixel warp), sanitized with no --trigger: a warp probe flips
    most images to class 25 before the repair, so the inner problem also searches universal warps
    (unlearn.perturbations = "auto"). With the additive perturbation alone the true ASR stayed at
    28-44 % on 2,500 images (benchmarks/RESULTS.md, 0.2.0); figures here on 1,000 other test images, after a repair on 500 clean images (400 unlearned)."""
    report, model, out, target = _sanitize_without_trigger(tmp_path, "gtsrb-smallcnn-wanet", 500)
    assert report["probes"]["before"]["evidence"]["suspected_class"] == target
    assert [p["family"] for p in report["unlearning"]["perturbations"]] == ["additive", "warp"]
    (acc0, asr0), (acc1, asr1) = _true_figures("gtsrb", "wanet", target, model, out)
    assert asr0 > 0.8 and asr1 < 0.25, (asr0, asr1)
    assert acc1 > acc0 - 0.03, (acc0, acc1)


def test_probe_guided_sanitize_of_a_small_set_stops_when_the_backdoor_is_gone(tmp_path):
    """The GTSRB blend model with 100 clean images (80 for unlearning), as a user runs it: the blend
    probe names class 5, the repair is guided toward it and stops, after a cool-down round, once that
    probe no longer sends the unlearning images there; the full schedule would go on losing accuracy
    with nothing left to remove (docs/algorithm.md). Figures recomputed on 1,000 other test images
    with the true trigger."""
    report, model, out, target = _sanitize_without_trigger(tmp_path, "gtsrb-smallcnn-blend", 100)
    unlearning = report["unlearning"]
    stop = unlearning["early_stop"]
    assert unlearning["guided_class"] == target == stop["target"], report["probes"]["before"]["evidence"]
    assert stop["proxy_trigger"].startswith("blend-") and len(stop["rates"]) == stop["stopped_after_round"]
    assert stop["stopped_after_round"] is not None, stop
    assert len(report["rounds"]) == stop["stopped_after_round"] + 1 < unlearning["rounds_planned"]
    assert all(r <= stop["threshold"] for r in stop["rates"][-stop["patience"] :])
    # then the weights step back toward the input's while the same probe stays gone (0.4.3)
    back = unlearning["step_back"]
    assert back["proxy_trigger"] == stop["proxy_trigger"] and back["kept_fraction"] < 1, back
    kept = back["fractions"].index(back["kept_fraction"])
    assert kept >= 1 and all(r <= back["threshold"] for r in back["rates"][kept - 1 : kept + 1]), back
    (acc0, asr0), (acc1, asr1) = _true_figures("gtsrb", "blend", target, model, out)
    assert asr0 > 0.9 and asr1 < 0.05, (asr0, asr1)
    # 96.2 -> 91.0 % in 0.4.2, where the repaired weights were written as they were
    assert acc1 > acc0 - 0.04, (acc0, acc1)


def test_a_clean_model_sanitized_with_100_images_is_not_called_backdoored(tmp_path):
    """100 clean GTSRB images of 43 classes leave 23 held out, under one per class: every changed
    image was then its class's "most common" new label, and a black patch moving half of them read as
    an all-to-all backdoor (0.3.4 failed this gate on these very images). A class now counts only when
    two of its images agree on the new label."""
    import zoo

    x, y, _, _ = zoo.load_split(SHARED_DATA, "gtsrb", "test")
    pick = np.random.default_rng(0).permutation(len(y))[:100]  # zoo.py export-clean --n 100 --seed 0
    zoo.write_folder(x[pick], y[pick], tmp_path / "clean")
    res = run_cli("sanitize", ZOO / "gtsrb-smallcnn-clean-s0" / "model.safetensors", "--clean", tmp_path / "clean",
                  "--out", tmp_path / "fixed.safetensors", "--json", "-q", probes=True)  # fmt: skip
    report = json.loads(res.stdout)
    probes = report["probes"]
    assert probes["before"]["verdict"] != "suspected", probes["before"]["evidence"]
    assert probes["after"]["verdict"] != "suspected", probes["after"]["evidence"]
    # the ASR gate is this test's subject; the accuracy gate on these 23 held-out images moves 4.3
    # points an image, and GPU arithmetic (not bit-repeatable) lost 2 of them on an H200 (exit 1)
    (asr_gate,) = [g for g in report["gates"] if g["name"] == "asr"]
    # 23 held-out images are fewer than the probes need to rule a backdoor out (40): no evidence is then
    # inconclusive, and the gate neither passes nor fails (0.3.9)
    inconclusive = probes["after"]["verdict"] == "inconclusive"
    assert asr_gate["status"] == ("not_evaluated" if inconclusive else "pass"), asr_gate
    assert res.returncode == (1 if any(g["status"] == "fail" for g in report["gates"]) else 0)
    # an accuracy gate that fails on a model with no sign of a backdoor says so, and what to do
    (accuracy_gate,) = [g for g in report["gates"] if g["name"] == "accuracy_drop"]
    said = [w for w in report["warnings"] if "held-out accuracy on a model in which the probes found" in w]
    assert bool(said) == (accuracy_gate["status"] == "fail" and report["unlearning"]["guided_by"] is None), said
    weak_class = probes["before"]["evidence"].get("suspected_class")
    assert all(("weak evidence" in w) == (weak_class is not None) for w in said), (weak_class, said)
