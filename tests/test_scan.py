"""Probes and `ibau scan`: backdoored models flagged with their target, clean ones not; a trigger
outside the fixed-pattern list caught by the synthesised probes; probes fall after sanitize."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_cli_errors import invoke

from conftest import run_cli, sanitize_with_trigger
from ibau_cli.demo import NUM_CLASSES, synthetic_images
from ibau_cli.probes import PROBES, run_probes

FAST = ["--set", "probes.budget_steps=300"]


def test_probe_registry_has_every_family():
    families = {PROBES.get(n).family for n in PROBES.names()}
    assert families == {"patch", "blend", "signal", "warp", "colour", "synthesised"}


def test_scan_flags_backdoor_with_its_target(backdoored):
    code, stdout, err = invoke(
        "scan", backdoored["model"], "--clean", backdoored["clean100"], "--json", "--quiet", *FAST
    )
    assert code == 1, err
    report = json.loads(stdout)
    suite = report["probes"]["before"]
    assert suite["verdict"] == "suspected" and suite["evidence"]["suspected_class"] == 0
    assert report["verdict"] == "fail"


@pytest.mark.parametrize("name", ["clean0", "clean1"])
def test_scan_does_not_flag_clean_models(demo_zoo, backdoored, name):
    path, _ = demo_zoo[name]
    code, stdout, err = invoke("scan", path, "--clean", backdoored["clean100"], "--json", "--quiet", *FAST)
    report = json.loads(stdout)
    assert code == 0, report["probes"]["before"]["evidence"]
    assert report["probes"]["before"]["verdict"] in ("no_evidence", "inconclusive")


def test_unlisted_trigger_is_caught_by_synthesised_probes(demo_zoo, backdoored, tmp_path):
    path, trained = demo_zoo["plus"]
    x, y = synthetic_images(200, seed=31)
    suite = run_probes(trained.model, x, y, NUM_CLASSES, device=torch.device("cpu"), budget_steps=300, radius=3.0)
    assert suite.verdict == "suspected" and suite.evidence["suspected_class"] == 0
    synth = [r for r in suite.results if r.family == "synthesised" and r.worst_class == 0]
    assert synth and max(r.flip.value for r in synth) >= 0.5
    fixed_best = max((r for r in suite.results if r.family != "synthesised"), key=lambda r: r.flip.value)
    assert fixed_best.flip.value < 0.5  # the fixed patterns alone would have missed it
    # under bf16 autocast (unlearn.amp = "bf16", also on a CPU) the synthesised universal perturbation
    # finds it too (CPU bf16 is slow: 64 images and 100 steps keep this to seconds)
    half = run_probes(
        trained.model, x[:64], y[:64], NUM_CLASSES, device=torch.device("cpu"), amp=torch.bfloat16,
        budget_steps=100, radius=3.0, names=["synth-universal-perturbation"],
    )  # fmt: skip
    assert max(r.flip.value for r in half.results if r.worst_class == 0) >= 0.5
    art = tmp_path / "art"
    code, _, err = invoke("scan", path, "--clean", backdoored["clean100"], "--quiet", "--artifacts", art, *FAST)
    assert code == 1, err
    assert (art / "before-mask-pattern-applied.png").stat().st_size > 0
    assert (art / "before-after.png").exists()


def test_probe_figures_fall_with_the_true_asr_after_sanitize(backdoored, tmp_path):
    res = run_cli(
        *sanitize_with_trigger(
            backdoored, backdoored["model"], "clean500", tmp_path / "f.safetensors", "--json", "--quiet", *FAST
        ),
        probes=True,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    before, after = report["probes"]["before"], report["probes"]["after"]
    assert before["verdict"] == "suspected" and before["evidence"]["suspected_class"] == 0
    assert report["unlearning"]["guided_class"] == 0  # the suspected class guided the unlearning
    assert after["verdict"] != "suspected", after["evidence"]
    # the probe figures fall with the true ASR, side by side in the report
    uap_b = next(p for p in before["probes"] if p["name"] == "synth-universal-perturbation")
    uap_a = next(p for p in after["probes"] if p["name"] == "synth-universal-perturbation")
    assert uap_b["flip_rate"]["value"] > 0.9 and uap_a["flip_rate"]["value"] < 0.5
    assert report["after"]["asr"]["value"] < 0.2


def test_probe_gate_without_a_trigger_gives_its_sample_count(backdoored, tmp_path):
    # no --trigger, a repair too weak to change anything: the ASR gate falls back on the probes, and
    # its figure says how many held-out images it counted (hits of n), as every other figure does
    res = run_cli("sanitize", backdoored["model"], "--clean", backdoored["clean500"], "--out",
                  tmp_path / "o.safetensors", "--rounds", "1", "--set", "unlearn.lr=1e-12", "--json", "--quiet",
                  *FAST, probes=True)  # fmt: skip
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    gate = next(g for g in report["gates"] if g["name"] == "asr")
    assert gate["status"] == "fail" and "suspected class 0" in gate["detail"]
    hits, n = (int(v) for v in re.search(r"(\d+) of the (\d+) held-out images", gate["detail"]).groups())
    assert 0 < n <= report["data"]["n_holdout"] and gate["value"] == pytest.approx(hits / n)
