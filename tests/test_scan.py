"""Probes and `ibau scan`: backdoored models flagged with their target, clean ones not; a trigger
outside the fixed-pattern list caught by the synthesised probes; probes fall after sanitize."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_cli_errors import invoke

from conftest import independent_figures, mid_right_patch, run_cli, sanitize_with_trigger
from ibau_cli.demo import NUM_CLASSES, synthetic_images
from ibau_cli.probes import PROBES, run_probes

FAST = ["--set", "probes.budget_steps=300"]


def test_probe_registry_has_every_family():
    families = {PROBES.get(n).family for n in PROBES.names()}
    assert families == {"patch", "frame", "blend", "signal", "warp", "colour", "synthesised"}


def _white_frame(x: torch.Tensor) -> torch.Tensor:
    """A white border one pixel wide, flush with the edges (a QA MNIST model's trigger)."""
    x = x.clone()
    x[:, :, 0, :] = x[:, :, -1, :] = 1.0
    x[:, :, :, 0] = x[:, :, :, -1] = 1.0
    return x


def test_a_one_pixel_frame_is_found_by_the_frame_probes_alone():
    """0.4.1's probes rated a QA MNIST model with a 1-pixel white frame trigger (100 % ASR) "no
    evidence": no patch reaches a frame. 0.4.2's frame probes name its class; its patch probes do not."""
    from ibau_cli.demo import train_backdoored

    trained = train_backdoored(seed=3, n_train=2000, trigger_fn=_white_frame)
    assert trained.asr > 0.9
    x, y = synthetic_images(200, seed=31)
    names = [n for n in PROBES.names() if PROBES.get(n).family in ("patch", "frame")]
    suite = run_probes(trained.model, x, y, NUM_CLASSES, device=torch.device("cpu"), names=names)
    assert suite.verdict == "suspected" and suite.evidence["suspected_class"] == 0, suite.evidence
    assert "frame-white-1px" in suite.evidence["reasons"][0], suite.evidence
    assert max(r.flip.value for r in suite.results if r.family == "patch") < 0.5


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


@pytest.mark.slow
def test_unlisted_trigger_is_caught_by_synthesised_probes(demo_zoo, backdoored, tmp_path):
    path, trained = demo_zoo["plus"]
    art = tmp_path / "art"
    code, stdout, err = invoke(
        "scan", path, "--clean", backdoored["clean100"], "--quiet", "--json", "--artifacts", art, *FAST
    )
    assert code == 1, err
    suite = json.loads(stdout)["probes"]["before"]
    assert suite["verdict"] == "suspected" and suite["evidence"]["suspected_class"] == 0, suite["evidence"]
    synth = [r for r in suite["probes"] if r["family"] == "synthesised" and r["worst_class"] == 0]
    assert synth and max(r["flip_rate"]["value"] for r in synth) >= 0.5
    fixed_best = max(r["flip_rate"]["value"] for r in suite["probes"] if r["family"] != "synthesised")
    assert fixed_best < 0.5  # the fixed patterns alone would have missed it
    assert (art / "before-mask-pattern-applied.png").stat().st_size > 0
    assert (art / "before-after.png").exists()
    # under bf16 autocast (unlearn.amp = "bf16", also on a CPU) the synthesised universal perturbation
    # finds it too (CPU bf16 is slow: 64 images and 100 steps keep this to seconds)
    x, y = synthetic_images(200, seed=31)
    half = run_probes(
        trained.model, x[:64], y[:64], NUM_CLASSES, device=torch.device("cpu"), amp=torch.bfloat16,
        budget_steps=100, radius=3.0, names=["synth-universal-perturbation"],
    )  # fmt: skip
    assert max(r.flip.value for r in half.results if r.worst_class == 0) >= 0.5


def test_synthesised_triggers_do_not_depend_on_how_the_classes_are_batched(demo_zoo):
    """probes.class_batch (several classes per step on CUDA) fits the same triggers as one class at
    a time: the images each class sees are drawn up front in the same order, and each class's loss
    is its own mean."""
    _, trained = demo_zoo["plus"]
    x, y = synthetic_images(64, seed=32)
    names = ["synth-mask-pattern", "synth-universal-perturbation"]
    suites = [
        run_probes(
            trained.model,
            x,
            y,
            NUM_CLASSES,
            device=torch.device("cpu"),
            budget_steps=100,
            radius=3.0,
            names=names,
            class_batch=k,
        )  # fmt: skip
        for k in (1, 4)  # 4: chunks of 4, 4 and 2 classes
    ]
    one = suites[0]
    assert [s.results[0].details["class_batch"] for s in suites] == [1, 4]
    for other in suites[1:]:
        for a, b in zip(one.results, other.results, strict=True):
            assert a.worst_class == b.worst_class and a.flip.hits == b.flip.hits and a.flip.n == b.flip.n
            assert a.per_class == pytest.approx(b.per_class, abs=0.02)
        masks = [c["mask_l1_fraction"] for c in one.results[0].details["per_class"]]
        assert masks == pytest.approx([c["mask_l1_fraction"] for c in other.results[0].details["per_class"]], rel=1e-3)
        assert torch.allclose(
            one.artifacts["synth-universal-perturbation"]["delta"],
            other.artifacts["synth-universal-perturbation"]["delta"],
            atol=1e-4,
        )


def test_a_class_batch_that_runs_out_of_gpu_memory_is_split():
    from ibau_cli.probes.base import ProbeContext, resolved_class_batch

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolved_class_batch(None, cuda, (3, 32, 32), 64) == 16  # 1,024 images of 32x32 a step
    assert resolved_class_batch(None, cuda, (3, 224, 224), 64) == 1
    assert resolved_class_batch(None, cpu, (3, 32, 32), 64) == 1
    assert resolved_class_batch(5, cpu, (3, 32, 32), 64) == 5
    from ibau_cli.probes.synthesised import _class_chunks

    ctx = ProbeContext(
        x=torch.zeros(4, 3, 8, 8), y=torch.zeros(4, dtype=torch.long), num_classes=10, device=torch.device("cpu"),
        amp=None, seed=0, clean_pred=torch.zeros(4, dtype=torch.long), budget_steps=10, radius=1.0, class_batch=8,
    )  # fmt: skip
    tried = []

    def fit(chunk):
        tried.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [t * 10 for t in chunk]

    assert _class_chunks(ctx, list(range(10)), fit, 64) == ({t: t * 10 for t in range(10)}, 2)
    assert tried == [8, 4, 2, 2, 2, 2, 2]

    def always(chunk):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        _class_chunks(ctx, [0, 1, 2], always, 64)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_patch_halfway_down_an_edge_is_found_and_repaired(demo_zoo, backdoored, tmp_path):
    """0.3.9's fixed patches sat in the corners and the centre: a QA model's mid-right patch moved
    none of them. 0.4.0 adds the middle of each edge; sanitize, with no trigger given, is then guided
    toward the backdoor's class and the patch family searches around the probe that found it."""
    from ibau_cli.formats import load_model

    path, trained = demo_zoo["edge"]
    x, y = synthetic_images(200, seed=31)
    names = [n for n in PROBES.names() if PROBES.get(n).family == "patch"]
    suite = run_probes(trained.model, x, y, NUM_CLASSES, device=torch.device("cpu"), names=names)
    assert suite.verdict == "suspected" and suite.evidence["suspected_class"] == 0, suite.evidence
    corner_or_centre = [r for r in suite.results if r.name.split("-")[2] in ("br", "bl", "tr", "tl", "cc")]
    assert max(r.flip.value for r in corner_or_centre) < 0.5  # the 0.3.9 places alone miss it
    out = tmp_path / "fixed.safetensors"
    code, stdout, err = invoke(
        "sanitize", path, "--clean", backdoored["clean500"], "--out", out, "--json", "--quiet", *FAST, probes=True
    )
    report = json.loads(stdout)
    assert report["unlearning"]["guided_class"] == 0, report["probes"]["before"]["evidence"]
    patch = [f for f in report["unlearning"]["perturbations"] if f["family"] == "patch"]
    assert patch and "-cr-" in patch[0]["probe"], report["unlearning"]["perturbations"]
    # measured here, on 1,000 images ibau never saw, with the true trigger it was never given
    x_eval, y_eval = backdoored["x_eval"], backdoored["y_eval"]
    keep = y_eval != 0
    with torch.no_grad():
        asr_before = float((trained.model(mid_right_patch(x_eval[keep])).argmax(1) == 0).float().mean())
        fixed = load_model(out).module.eval()
        asr_after = float((fixed(mid_right_patch(x_eval[keep])).argmax(1) == 0).float().mean())
    acc_after, _ = independent_figures(fixed, x_eval, y_eval)
    assert asr_before > 0.9 and asr_after < 0.1 and acc_after > 0.9, (asr_before, asr_after, acc_after)
    assert code == 0, err


@pytest.mark.slow
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


def test_probe_progress_counts_optimisation_steps_not_probes(demo_zoo):
    """A synthesised probe is most of the probes' time (on a ResNet-18 at 224x224 on a CPU, one held
    the bar at 40 of 56 probes for over 20 minutes): it declares its steps and reports them as it
    goes, so the bar and its estimate of the time left advance with the work."""
    _, trained = demo_zoo["plus"]
    x, y = synthetic_images(64, seed=33)

    class Recorder:
        def __init__(self) -> None:
            self.total, self.done, self.calls = 0, 0, 0

        def start(self, phase: str, total: int) -> None:
            self.total = total

        def advance(self, steps: int = 1) -> None:
            self.done += steps
            self.calls += 1

        def finish(self) -> None:
            pass

    names = ["patch-white-br-10%", "synth-mask-pattern", "synth-warp"]
    rec = Recorder()
    run_probes(trained.model, x, y, NUM_CLASSES, device=torch.device("cpu"), budget_steps=100, radius=3.0,
               names=names, progress=rec)  # fmt: skip
    assert rec.total == 1 + 10 * NUM_CLASSES + 20  # a pattern, 10 steps for each class, the warp's 20 steps
    assert rec.done == rec.total and rec.calls > 20
