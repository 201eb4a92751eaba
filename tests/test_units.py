"""Unit tests for the small parts: metrics, config, data mapping and split, triggers, formats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ibau_cli.archs import ARCHS
from ibau_cli.config import Settings, apply_layer, load_preset, preset_names
from ibau_cli.data import load_clean_folder, map_classes, stratified_split
from ibau_cli.errors import ConfigError, InputError
from ibau_cli.formats import detect_format, load_model, save_model
from ibau_cli.metrics import Rate, paired_difference_interval, wilson_interval
from ibau_cli.preprocess import Normalized, Preprocess
from ibau_cli.settings_resolve import resolve_settings
from ibau_cli.triggers import load_trigger


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert math.isclose(lo, 0.4901624, abs_tol=1e-6) and math.isclose(hi, 0.9433178, abs_tol=1e-6)
    assert wilson_interval(0, 0) is None
    lo, hi = wilson_interval(0, 50)
    assert lo < 1e-12 and 0.06 < hi < 0.08
    assert Rate(3, 4).to_dict()["value"] == 0.75


def test_paired_difference_interval():
    """Newcombe's hybrid score interval for the accuracy drop on the same images: with uncorrelated
    pairs it is the independent-samples hybrid interval; it covers the true drop at least 95 % of the
    time on 20-image sets (simulated); its centre follows the discordant pairs only."""
    # 2 of 20 images lost, none gained: a 10-point drop, as a 100-image clean set's holdout shows it
    lo, hi = paired_difference_interval([True] * 20, [True] * 18 + [False] * 2)
    assert lo < 0 < 0.1 < hi and math.isclose(hi - 0.1, 0.2, abs_tol=0.02), (lo, hi)
    # phi = 0 (a*d == b*c): the independent formula, from the two Wilson intervals
    first, second = [1, 1, 0, 0] * 5, [1, 0, 1, 0] * 5
    l1, u1 = wilson_interval(10, 20)
    lo, hi = paired_difference_interval(first, second)
    assert math.isclose(lo, -math.hypot(0.5 - l1, u1 - 0.5)) and math.isclose(hi, math.hypot(u1 - 0.5, 0.5 - l1))
    assert paired_difference_interval([], []) is None
    gen = torch.Generator().manual_seed(0)
    covered, trials = 0, 2000
    for _ in range(trials):
        before = torch.rand(20, generator=gen) < 0.9
        after = before & (torch.rand(20, generator=gen) > 0.1)  # each right answer lost with p = 0.1
        lo, hi = paired_difference_interval(before.tolist(), after.tolist())
        covered += lo <= 0.09 <= hi
    assert covered / trials >= 0.95


@pytest.mark.parametrize("name", ["cifar10", "gtsrb", "mnist", "imagenet"])
def test_presets_load_and_validate(name):
    assert name in preset_names()
    s = apply_layer(Settings(), load_preset(name), name)
    s.check()
    assert len(s.preprocess.mean) == s.preprocess.channels


def test_config_rejects_unknown_and_mistyped():
    with pytest.raises(ConfigError, match="unknown key preprocess.scale"):
        apply_layer(Settings(), {"preprocess": {"scale": 2}}, "x")
    with pytest.raises(ConfigError, match="unknown configuration section"):
        apply_layer(Settings(), {"training": {}}, "x")
    with pytest.raises(ConfigError, match="must be a number"):
        apply_layer(Settings(), {"unlearn": {"lr": "fast"}}, "x")
    with pytest.raises(ConfigError, match="must be true or false"):
        apply_layer(Settings(), {"unlearn": {"hypergrad": 1}}, "x")
    s = apply_layer(Settings(), {"unlearn": {"lr": 1, "radius": 4}}, "x")
    assert s.unlearn.lr == 1.0 and isinstance(s.unlearn.lr, float) and s.unlearn.radius == 4.0
    with pytest.raises(ConfigError, match="perturb_fraction"):
        apply_layer(Settings(), {"unlearn": {"perturb_fraction": 0}}, "x").check()


def test_settings_layering_order(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[preprocess]\nmean = [0.1, 0.2, 0.3]\n[unlearn]\nrounds = 2\n")
    s, src = resolve_settings(
        arch="small-vgg", model_preprocess=None, preset="cifar10", config_file=cfg, overrides={"unlearn": {"rounds": 7}}
    )
    assert s.preprocess.mean == (0.1, 0.2, 0.3)  # config file beats preset
    assert s.preprocess.std == (0.2470, 0.2435, 0.2616)  # preset beats defaults
    assert s.unlearn.rounds == 7  # flags beat config file
    assert src.layers == ["defaults", "architecture small-vgg", "preset cifar10", f"config {cfg}", "command line"]


def test_radius_scales_with_input_size():
    s = Settings().unlearn
    assert math.isclose(s.resolved_radius((3, 32, 32)), 10.0)
    assert math.isclose(s.resolved_radius((3, 224, 224)), 70.0)


def _folder(tmp_path, names, per_class=5, size=8):
    for n in names:
        d = tmp_path / n
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), i * 10, np.uint8)).save(d / f"{i}.png")
    return tmp_path


def test_class_mapping_rules(tmp_path):
    folders = sorted(_folder(tmp_path / "a", ["00007", "00002"]).iterdir())
    m = map_classes(folders, 43, None)
    assert m.rule == "integer-folders" and m.folder_to_index == {"00002": 2, "00007": 7}
    folders = sorted(_folder(tmp_path / "b", ["dog", "cat"]).iterdir())
    assert map_classes(folders, 10, None).folder_to_index == {"cat": 0, "dog": 1}
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n")
    m = map_classes(folders, 10, classes)
    assert m.rule == "classes-file" and m.folder_to_index == {"dog": 0, "cat": 1}
    with pytest.raises(InputError, match="index >= the model's 5 classes"):
        map_classes(sorted(_folder(tmp_path / "c", ["1", "9"]).iterdir()), 5, None)
    # "-1" beside "0".."3": sorting names would silently shift every class by one
    with pytest.raises(InputError, match=r"mix class indices \(0, 1, 2, 3\) with other names \(-1\)"):
        map_classes(sorted(_folder(tmp_path / "d", ["0", "1", "2", "3", "-1"]).iterdir()), 10, None)


def test_clean_folder_resizes_and_scales(tmp_path):
    root = _folder(tmp_path / "d", ["0", "1"], per_class=3, size=10)
    cs = load_clean_folder(root, Preprocess(input_size=(16, 16)), 10)
    assert cs.images.shape == (6, 3, 16, 16) and cs.images.max() <= 1.0
    assert cs.labels.tolist() == [0, 0, 0, 1, 1, 1]
    grey = load_clean_folder(root, Preprocess(input_size=(10, 10), channels=1, mean=(0.0,), std=(1.0,)), 10)
    assert grey.images.shape == (6, 1, 10, 10)


def test_stratified_split_is_seeded_and_stratified():
    labels = torch.arange(10).repeat_interleave(10)  # 100 samples, 10 per class
    a = stratified_split(labels, 0.2, seed=3)
    b = stratified_split(labels, 0.2, seed=3)
    c = stratified_split(labels, 0.2, seed=4)
    assert torch.equal(a.holdout_idx, b.holdout_idx) and not torch.equal(a.holdout_idx, c.holdout_idx)
    assert len(a.holdout_idx) == 20 and len(a.unlearn_idx) == 80
    assert torch.bincount(labels[a.holdout_idx]).tolist() == [2] * 10
    assert not set(a.holdout_idx.tolist()) & set(a.unlearn_idx.tolist())


def test_trigger_patch_and_blend(tmp_path):
    pre = Preprocess(input_size=(8, 8))
    Image.fromarray(np.full((2, 2, 3), 255, np.uint8)).save(tmp_path / "p.png")
    t = load_trigger(tmp_path / "p.png", target=1, pre=pre, position="tl")
    x = torch.zeros(1, 3, 8, 8)
    y = t.apply(x)
    assert y[0, :, :2, :2].eq(1).all() and y[0, :, 2:, :].eq(0).all() and y[0, :, :, 2:].eq(0).all()
    Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(tmp_path / "full.png")
    t = load_trigger(tmp_path / "full.png", target=1, pre=pre, blend=0.25)
    assert torch.allclose(t.apply(x), torch.full_like(x, 0.25))
    from ibau_cli.errors import UsageError

    with pytest.raises(UsageError, match="how to apply it"):
        load_trigger(tmp_path / "full.png", target=1, pre=pre)


def test_normalized_wrapper_matches_manual_normalisation():
    base = ARCHS.get("small-cnn").build(10).eval()
    pre = Preprocess(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    x = torch.rand(4, 3, 32, 32)
    manual = base((x - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1))
    torch.testing.assert_close(Normalized(base, pre)(x), manual)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_every_builtin_arch_round_trips_through_safetensors(arch, tmp_path):
    spec = ARCHS.get(arch)
    model = spec.build(7).eval()
    path = tmp_path / f"{arch}.safetensors"
    save_model(
        model, path, fmt="safetensors", arch=arch, num_classes=7, preprocess=Preprocess(input_size=spec.input_size)
    )
    assert detect_format(path).name == "safetensors"
    loaded = load_model(path)  # no flags: architecture and classes from the file
    assert loaded.arch == arch and loaded.num_classes == 7
    assert loaded.preprocess.input_size == spec.input_size
    x = torch.rand(2, 3, *spec.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model(x))


def test_torchvision_style_names_load(tmp_path):
    # A state dict with torchvision's ResNet-18 names and shapes (fc for 1000 classes).
    from safetensors.torch import save_file

    sd = ARCHS.get("resnet18").build(1000).state_dict()
    assert "layer1.0.conv1.weight" in sd and "layer2.0.downsample.1.running_mean" in sd and "fc.weight" in sd
    path = tmp_path / "tv.safetensors"
    save_file({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(path))
    loaded = load_model(path, arch="resnet18")
    assert loaded.num_classes == 1000


def test_extension_content_disagreement(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(InputError, match="not a model format"):
        detect_format(path)


def test_metadata_preprocess_is_json(tmp_path):
    from safetensors import safe_open

    model = ARCHS.get("small-cnn").build(3)
    path = tmp_path / "m.safetensors"
    save_model(
        model, path, fmt="safetensors", arch="small-cnn", num_classes=3, preprocess=Preprocess(mean=(0.1, 0.2, 0.3))
    )
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["ibau.preprocess"])["mean"] == [0.1, 0.2, 0.3]
    assert meta["ibau.arch"] == "small-cnn" and meta["ibau.num_classes"] == "3"


def test_readme_config_block_is_valid_and_complete():
    import tomllib
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```toml") + len("```toml")
    block = tomllib.loads(text[start : text.index("```", start)])
    settings = apply_layer(Settings(), block, "README")
    settings.check()
    for section in ("preprocess", "unlearn", "split", "gate", "probes"):
        documented = set(block.get(section, {}))
        assert documented == set(getattr(Settings(), section).__dataclass_fields__), section


def test_every_subpackage_is_packaged():
    """A non-editable install ships only the packages pyproject lists: none may be forgotten."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "ibau_cli").rglob("__init__.py")} | {
        "ibau_cli.configs"
    }
    assert found == listed


def test_remapping_counts_only_classes_whose_images_agree_on_the_new_label():
    from ibau_cli.probes.base import remap_rate

    y = torch.arange(10)  # one image per class, each moved to a label of its own
    moved = (y + 3) % 10
    hits, targets, sources, _ = remap_rate(moved, y, y.clone(), 10)
    assert (hits.hits, targets, sources) == (0, 0, 10)  # one image cannot show a class-dependent target
    y2 = torch.arange(10).repeat(2)  # two per class, both moved to label + 1: a real remapping
    hits, targets, sources, once = remap_rate((y2 + 1) % 10, y2, y2.clone(), 10)
    assert (hits.hits, hits.n, targets, sources, once) == (20, 20, 10, 10, 20)


def test_a_pattern_that_pushes_classes_into_one_sink_class_is_not_an_all_to_all_backdoor():
    """A clean CIFAR-10 model under a sinusoid (QA26 review): 40 % of the correctly classified images went
    to their class's most common new label, 4 targets from 7 classes, and the scan failed it as an
    all-to-all backdoor; most of them went to one class. Counted without that sink it is not a
    remapping; label -> label + 1 still is."""
    from ibau_cli.metrics import Rate
    from ibau_cli.probes import _looks_all_to_all
    from ibau_cli.probes.base import ProbeResult, remap_rate

    y = torch.arange(10).repeat_interleave(10)  # 10 images a class, all classified right

    def moved(plan: dict[int, tuple[int, int]]) -> torch.Tensor:
        pred = y.clone()
        for c, (to, k) in plan.items():
            pred[(y == c).nonzero().flatten()[:k]] = to
        return pred

    def result(pred) -> ProbeResult:
        r, t, s, once = remap_rate(pred, y, y.clone(), 10)
        details = {
            "remap_rate": r.to_dict(),
            "remap_targets": t,
            "remap_sources": s,
            "remap_hits_one_source_per_target": once,
        }
        return ProbeResult("p", "signal", 5, Rate(0, 90), details)

    # classes 0-3: 8 images each to class 5; classes 4, 6, 7: 3 each to a class of their own
    sink = moved({0: (5, 8), 1: (5, 8), 2: (5, 8), 3: (5, 8), 4: (7, 3), 6: (8, 3), 7: (9, 3)})
    rate, targets, sources, once = remap_rate(sink, y, y.clone(), 10)
    assert (rate.hits, rate.n, targets, sources, once) == (41, 100, 4, 7, 17)
    assert (rate.wilson() or (0, 0))[0] >= 0.25  # the 0.3.5 rule fired on this
    assert not _looks_all_to_all(result(sink))
    assert _looks_all_to_all(result((y + 1) % 10))  # every class to a label of its own


def test_three_probe_families_agreeing_on_a_class_make_the_scan_inconclusive_not_silent():
    """QA25: a CIFAR-10 model with a 4x4 checker trigger, scanned on 100 images, came out "no evidence"
    although the synthesised mask trigger, the universal perturbation and several checker patches (44 %)
    all pointed to its target. The real probe results of the committed zoo scans
    (benchmarks/results/probes-detail.jsonl, 100 images, 3 seeds) judged again: a watermark model the
    old rule passed as "no evidence" is inconclusive, naming its target; no clean model's scan is
    flagged or named by the agreement."""
    import json
    from pathlib import Path

    from ibau_cli.metrics import Rate
    from ibau_cli.probes import judge
    from ibau_cli.probes.base import ProbeResult

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "probes-detail.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) >= 57
    judged = {}
    for row in rows:
        results = [
            ProbeResult(
                p["name"],
                p["family"],
                p["worst_class"],
                Rate(p["flip_rate"]["hits"], p["flip_rate"]["n"]),
                p.get("details", {}),
            )
            for p in row["probe_results"]
        ]
        judged[(row["model"], row["seed"])] = judge(results, row["n_scanned"])
    verdict, evidence = judged[("gtsrb-smallcnn-watermark-t3", 0)]
    assert (verdict, evidence["suspected_class"]) == ("inconclusive", 3)
    assert "three probe families point to class 3" in evidence["reasons"][-1]
    clean = [(k, v) for k, v in judged.items() if "clean" in k[0]]
    assert len(clean) == 15
    for key, (verdict, evidence) in clean:
        assert verdict != "suspected", key
        assert not any("three probe families" in r for r in evidence["reasons"]), key


def test_all_to_all_evidence_that_appears_only_after_the_repair_is_not_a_backdoor():
    from ibau_cli.probes import ProbeSuite, reconcile_after_repair

    def suite(verdict, cls=None, a2a=None):
        ev = {"suspected_class": cls, "all_to_all_probe": a2a, "reasons": ["r"]}
        return ProbeSuite([], verdict, ev, 0.0, 200)

    after = suite("suspected", None, "patch-white-cc-20%")
    fixed = reconcile_after_repair(suite("suspected", 17, None), after)
    assert fixed.verdict == "inconclusive" and fixed.evidence["appeared_after_repair"]
    assert "appeared only after the repair" in fixed.evidence["reasons"][-1]
    # a genuine all-to-all model keeps its verdict, and so does any single-target evidence
    assert reconcile_after_repair(suite("suspected", None, "patch-white-cc-20%"), after).verdict == "suspected"
    assert reconcile_after_repair(suite("no_evidence"), suite("suspected", 3, None)).verdict == "suspected"
    assert reconcile_after_repair(None, after).verdict == "suspected"


def test_a_class_a_fixed_pattern_names_only_after_the_repair_is_not_a_backdoor():
    """A QA-style MNIST case (tests/test_plugin_archs.py runs it for real): a 2-pixel white frame sent
    7 % of the held-out digits to 1 in the backdoored input (its trigger pulled them to 0) and 69 %
    after the repair removed that backdoor; clean MNIST models send about half there. The repair saw
    clean images only, so it cannot have planted a class-1 backdoor: inconclusive, with the reason.
    What the input model already showed stays suspected."""
    from ibau_cli.metrics import Rate
    from ibau_cli.probes import ProbeResult, ProbeSuite, reconcile_after_repair

    def frame(worst: int, hits: int, toward_1: float, family: str = "frame") -> ProbeResult:
        per_class = [0.0] * 10
        per_class[worst], per_class[1] = hits / 55, toward_1 if worst != 1 else hits / 55
        return ProbeResult("frame-white-2px", family, worst, Rate(hits, 55), per_class=per_class)

    def suite(verdict: str, cls: int | None, result: ProbeResult) -> ProbeSuite:
        return ProbeSuite([result], verdict, {"suspected_class": cls, "reasons": ["r"]}, 0.0, 110)

    after = suite("suspected", 1, frame(1, 38, 38 / 55))
    fixed = reconcile_after_repair(suite("suspected", 0, frame(0, 38, 0.07)), after)
    assert fixed.verdict == "inconclusive" and fixed.evidence["appeared_after_repair"], fixed.evidence
    assert "class 1 is named only after the repair: frame-white-2px sends 69%" in fixed.evidence["reasons"][-1]
    assert "sent 7% in the input model" in fixed.evidence["reasons"][-1]
    # the input model already leaned there (40 % of the images): kept
    assert reconcile_after_repair(suite("no_evidence", None, frame(0, 5, 0.40)), after).verdict == "suspected"
    # the input's probes named that very class: kept
    assert reconcile_after_repair(suite("inconclusive", 1, frame(0, 5, 0.07)), after).verdict == "suspected"
    # a second pattern the input already leaned on (40 % toward 0, under the suspect bound then) now
    # passes it: judged without the new frame evidence the repaired model is still suspected, so kept
    patch_before = ProbeResult("patch-white-br-20%", "patch", 0, Rate(22, 55), per_class=[0.4] + [0.0] * 9)
    patch_after = ProbeResult("patch-white-br-20%", "patch", 0, Rate(36, 55), per_class=[36 / 55] + [0.0] * 9)
    before = ProbeSuite([frame(0, 3, 0.07), patch_before], "no_evidence", {"suspected_class": None}, 0.0, 110)
    both = ProbeSuite(
        [frame(1, 41, 41 / 55), patch_after], "suspected", {"suspected_class": 1, "reasons": []}, 0.0, 110
    )
    assert reconcile_after_repair(before, both).verdict == "suspected"
    # synthesised evidence only, after the repair: not compared, kept
    synth_after = suite("suspected", 1, frame(1, 38, 38 / 55, family="synthesised"))
    assert reconcile_after_repair(suite("suspected", 0, frame(0, 38, 0.07)), synth_after).verdict == "suspected"


def test_teacher_views_are_seeded_shifted_flipped_and_mixed_copies_of_the_batch():
    from ibau_cli.unlearn.augment import clean_views

    x = torch.rand(16, 3, 12, 10)
    assert clean_views(x, "off", torch.Generator().manual_seed(0)) is x
    a = clean_views(x, "shift", torch.Generator().manual_seed(3))
    b = clean_views(x, "shift", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, x)
    # a shift moves the image: the centre of each view is a window of the original's centre region
    for i in range(len(x)):
        found = any(
            torch.equal(a[i, :, 4:8, 4:6], x[i, :, 4 + dy : 8 + dy, 4 + dx : 6 + dx])
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
        assert found, f"view {i} is not a translation of its image"
    flipped = clean_views(x, "shift-flip", torch.Generator().manual_seed(1))
    assert flipped.shape == x.shape and flipped.min() >= 0 and flipped.max() <= 1
    mixed = clean_views(x, "mix", torch.Generator().manual_seed(1))
    assert mixed.min() >= 0 and mixed.max() <= 1 and not torch.equal(mixed, flipped)
    with pytest.raises(ValueError, match="unknown augmentation"):
        clean_views(x, "rotate", torch.Generator())


def test_bad_teacher_views_value_is_a_config_error():
    with pytest.raises(ConfigError, match="teacher_views"):
        resolve_settings(
            arch=None,
            model_preprocess=None,
            preset=None,
            config_file=None,
            overrides={"unlearn.teacher_views": "rotate"},
            environment={},
        )


def test_small_set_schedule_applies_to_tiny_additive_sets_only():
    """Twice the rounds and a 0.3x gradient clip on at most 160 images (batch 64, 10 steps a round),
    additive-only; a config error for a bad value; "off" keeps the plain schedule."""
    import dataclasses

    from ibau_cli.config import UnlearnConfig
    from ibau_cli.demo import NUM_CLASSES, synthetic_images
    from ibau_cli.unlearn import unlearn

    cfg = UnlearnConfig(rounds=2, min_steps_per_round=2, batch_size=16, inner_steps=2)
    assert cfg.resolved_small_set(8, 1) and not cfg.resolved_small_set(9, 1) and not cfg.resolved_small_set(8, 2)
    assert not UnlearnConfig(small_set="off").resolved_small_set(8, 1)
    assert UnlearnConfig().resolved_small_set(160, 1) and not UnlearnConfig().resolved_small_set(161, 1)
    assert UnlearnConfig(small_set="on").resolved_small_set(10_000, 2) and not UnlearnConfig(small_set="on").check()
    assert "small_set" in UnlearnConfig(small_set="always").check()[0]
    x, y = synthetic_images(8, seed=1)
    _, log = unlearn(ARCHS.get("small-cnn").build(NUM_CLASSES), x, y, cfg)
    assert log.small_set and len(log.rounds) == 4
    _, log = unlearn(ARCHS.get("small-cnn").build(NUM_CLASSES), x, y, dataclasses.replace(cfg, small_set="off"))
    assert not log.small_set and len(log.rounds) == 2


def test_the_synthesised_warp_names_the_class_when_it_moves_more_images_than_a_patch():
    from ibau_cli.metrics import Rate
    from ibau_cli.probes import judge
    from ibau_cli.probes.base import ProbeResult

    def warp(hits, n=220, cls=25):
        return ProbeResult(
            "synth-warp", "synthesised", cls, Rate(hits, n), {"rms_pixels": 0.5, "median_other_flip_rate": 0.0}
        )

    patch = ProbeResult("patch-checker-cc-20%", "patch", 5, Rate(310, 480))  # 65 % to class 5
    verdict, ev = judge([patch, warp(213)], 500)  # the warp: 97 % to class 25
    assert verdict == "suspected" and ev["suspected_class"] == 25
    assert any("sub-pixel warp" in r for r in ev["reasons"])
    verdict, ev = judge([patch, warp(100)], 500)  # 45 %: below the threshold, the patch names it
    assert verdict == "suspected" and ev["suspected_class"] == 5
    verdict, ev = judge([warp(213)], 500)
    assert verdict == "suspected" and ev["suspected_class"] == 25
    verdict, ev = judge([warp(10)], 500)
    assert verdict == "no_evidence" and ev["suspected_class"] is None


def test_torch_threads_follow_a_cgroup_cpu_quota(tmp_path, monkeypatch):
    """A container limited to 1.5 CPUs gets one torch thread; no quota, or OMP_NUM_THREADS, no change."""
    from ibau_cli.device import cgroup_cpu_limit, fit_threads_to_cpu_quota

    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    none.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v2) == 1.5 and cgroup_cpu_limit(v1) == 2.0 and cgroup_cpu_limit(none) is None
    (none / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(none) is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")
        assert fit_threads_to_cpu_quota(v2) is None and torch.get_num_threads() == 4
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert fit_threads_to_cpu_quota(none) is None and torch.get_num_threads() == 4
        assert fit_threads_to_cpu_quota(v2) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bf16_on_a_cpu_only_when_asked_and_the_repair_runs_under_it():
    """On a CPU "auto" and "fp16" stay in full precision; "bf16" autocasts the inner problem, and the
    repair then still trains finite weights and logs the precision it used."""
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.device import amp_dtype
    from ibau_cli.unlearn import unlearn

    cpu = torch.device("cpu")
    assert [amp_dtype(cpu, a) for a in ("auto", "off", "fp16", "bf16")] == [None, None, None, torch.bfloat16]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(24, 3, 8, 8), torch.arange(24) % 3
    cfg = UnlearnConfig(rounds=1, inner_steps=3, min_steps_per_round=2, amp="bf16")
    _, log = unlearn(model, x, y, cfg, device="cpu")
    assert log.amp == "bfloat16"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_unlearn_stops_when_asked_and_logs_the_rounds_that_ran():
    """``stop(r, model)`` is asked after every round but the last two; True ends the repair after one
    more (cool-down) round."""
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.unlearn import unlearn

    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 8, 8), torch.arange(24) % 3
    cfg = UnlearnConfig(rounds=4, inner_steps=2, min_steps_per_round=2, small_set="off")

    def small_model() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3)
        )

    asked = []
    _, log = unlearn(small_model(), x, y, cfg, stop=lambda r, m: asked.append(r) or r == 2)
    assert asked == [1, 2] and len(log.rounds) == 3
    assert log.stopped_after == 2 and log.rounds_planned == 4

    asked.clear()
    _, log = unlearn(small_model(), x, y, cfg, stop=lambda r, m: asked.append(r) or False)
    assert asked == [1, 2] and len(log.rounds) == 4  # not asked when stopping would save nothing
    assert log.stopped_after is None


def test_proxy_trigger_stop_measures_the_trigger_and_waits_for_its_patience(backdoored):
    """On the real backdoored demo model the true patch sends nearly every other image to the target:
    no stop. With a threshold every rate meets, it stops only after ``patience`` rounds in a row."""
    from ibau_cli.demo import TARGET, add_badnets_trigger
    from ibau_cli.unlearn import ProxyTriggerStop

    model = backdoored["module"].eval()
    x, y = backdoored["x_eval"][:300], backdoored["y_eval"][:300]

    def make(threshold: float) -> ProxyTriggerStop:
        return ProxyTriggerStop(
            "badnets", add_badnets_trigger, x, y, TARGET, threshold, patience=2, device=torch.device("cpu")
        )

    strict = make(0.02)
    assert strict(1, model) is False and strict(2, model) is False
    assert strict.rates[0] > 0.9 and strict.rates == [strict.rates[0]] * 2  # same trigger, same model
    assert strict.to_dict()["n_images"] == int((y != TARGET).sum()) and strict.stopped_after is None

    lenient = make(1.0)
    assert lenient(1, model) is False  # one round at or under the threshold is not enough
    assert lenient(2, model) is True and lenient.stopped_after == 2


def test_proxy_trigger_is_the_fixed_pattern_that_names_the_class(backdoored):
    """``proxy_trigger`` picks, among the fixed patterns, the one sending the most held-out images to
    the class, and none when no pattern sends half of them there."""
    from ibau_cli.demo import NUM_CLASSES, TARGET
    from ibau_cli.probes import PROBES, proxy_trigger, run_probes

    model = backdoored["module"].eval()
    names = [n for n in PROBES.names() if n.startswith(("patch-", "colour-"))]
    x, y = backdoored["x_eval"][:200], backdoored["y_eval"][:200]
    suite = run_probes(model, x, y, NUM_CLASSES, device=torch.device("cpu"), names=names)
    name, apply = proxy_trigger(suite, TARGET, seed=0)
    best = max((r for r in suite.results if r.family == "patch"), key=lambda r: r.per_class[TARGET])
    assert name == best.name and best.per_class[TARGET] >= 0.5
    assert apply(x[:4]).shape == x[:4].shape and not torch.equal(apply(x[:4]), x[:4])
    other = next(c for c in range(NUM_CLASSES) if c != TARGET and all(r.per_class[c] < 0.5 for r in suite.results))
    assert proxy_trigger(suite, other, seed=0) is None


def test_early_stop_applies_on_the_small_set_schedule_by_default():
    from ibau_cli.config import UnlearnConfig

    auto = UnlearnConfig()
    assert auto.resolved_early_stop(80) and not auto.resolved_early_stop(400)
    assert not UnlearnConfig(perturbations="additive+warp").resolved_early_stop(80)  # no small-set schedule there
    assert UnlearnConfig(early_stop="probes").resolved_early_stop(4000)
    assert not UnlearnConfig(early_stop="off").resolved_early_stop(80)


def test_an_output_folder_that_vanished_during_the_run_is_a_runtime_failure(tmp_path):
    """Destinations are checked before any work; a folder gone at write time is exit 3, not 2."""
    from ibau_cli.errors import EXIT_RUNTIME, RuntimeFailure
    from ibau_cli.formats.base import write_atomically

    gone = tmp_path / "gone"
    with pytest.raises(RuntimeFailure, match="no longer exists") as exc:
        write_atomically(gone / "fixed.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    assert exc.value.exit_code == EXIT_RUNTIME
    assert not gone.exists()


def test_probes_and_the_inner_problem_leave_the_weights_untouched():
    """The synthesised probes and I-BAU's inner maximisation need gradients for their triggers only:
    they run with every parameter's requires_grad off (autograd then skips the weights' gradients,
    a quarter of a probe step's time) and restore each parameter's own flag afterwards; the mask
    probe's backward left gradients in the model's .grad before."""
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.demo import synthetic_images
    from ibau_cli.probes import run_probes
    from ibau_cli.unlearn import unlearn

    torch.manual_seed(0)
    model = ARCHS.get("small-cnn").build(10).eval()
    fixed = next(model.parameters())
    fixed.requires_grad_(False)  # a layer its owner froze stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    x, y = synthetic_images(40, seed=3)
    run_probes(model, x, y, 10, device=torch.device("cpu"), budget_steps=100, radius=3.0,
               names=["synth-mask-pattern", "synth-universal-perturbation"])  # fmt: skip
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    repaired, _ = unlearn(model, x, y, UnlearnConfig(rounds=1, min_steps_per_round=2), device="cpu")
    assert [p.requires_grad for p in repaired.parameters()] == flags  # the outer steps trained the rest
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, repaired.parameters(), strict=True)]
    assert not changed[0] and any(changed[1:])


def test_a_class_named_on_weak_evidence_leaves_the_probe_gate_not_evaluated_not_passed():
    """A QA model (6x6 yellow patch, 64x64 input): the synthesised mask alone named class 9 before the
    repair (inconclusive), so the repair was not guided and kept a 75 % true ASR; after it the probes
    saw nothing, and 0.3.7's ASR gate passed with no value. Without the trigger nothing measures an
    ASR toward a weakly named class: the gate says so instead of passing."""
    from ibau_cli.config import GateConfig
    from ibau_cli.gates import asr_probe_gate
    from ibau_cli.probes import ProbeSuite

    def suite(verdict: str, cls: int | None) -> ProbeSuite:
        return ProbeSuite([], verdict, {"suspected_class": cls}, 0.0, 100, {})

    gate = asr_probe_gate(GateConfig(), suite("inconclusive", 9), suite("no_evidence", None))
    assert gate.status == "not_evaluated" and gate.value is None
    assert "named class 9 on weak evidence" in gate.detail and "--trigger" in gate.detail
    assert asr_probe_gate(GateConfig(), suite("no_evidence", None), suite("no_evidence", None)).status == "pass"


def _suite(verdict: str, cls: int | None, hits: int = 0, n: int = 0, reasons: list[str] | None = None):
    """A probe suite as the probes report it: one fixed patch sending ``hits`` of ``n`` images to ``cls``."""
    from ibau_cli.metrics import Rate
    from ibau_cli.probes import ProbeResult, ProbeSuite

    results = []
    if cls is not None:
        counts = [Rate(0, n)] * 10
        counts[cls] = Rate(hits, n)
        rates = [c.hits / c.n if c.n else 0.0 for c in counts]
        results.append(ProbeResult("patch-white-br-20%", "patch", cls, Rate(hits, n), {}, rates, counts))
    evidence = {"suspected_class": cls, "reasons": reasons or []}
    return ProbeSuite(results, verdict, evidence, 0.0, 20 if n < 40 else 100, {})


def test_inconclusive_probes_after_the_repair_leave_the_probe_gate_not_evaluated():
    """A QA GTSRB model at 100 clean images: 20 held out, fewer than the 40 the probes need to rule a
    backdoor out, so they were inconclusive before and after, and 0.3.8's gate passed with no value
    (exit 0 on a model keeping a 16 % ASR). Inconclusive probes neither estimate nor rule out."""
    from ibau_cli.config import GateConfig
    from ibau_cli.gates import asr_probe_gate

    few = ["only 20 held-out images; at least 40 are needed to rule out a backdoor"]
    gate = asr_probe_gate(
        GateConfig(), _suite("inconclusive", None, reasons=few), _suite("inconclusive", None, reasons=few)
    )
    assert gate.status == "not_evaluated" and gate.value is None, gate
    assert "inconclusive (only 20 held-out images" in gate.detail and "more clean images" in gate.detail
    gate = asr_probe_gate(GateConfig(), _suite("no_evidence", None), _suite("suspected", None, reasons=["all-to-all"]))
    assert gate.status == "fail"


def test_a_probe_estimate_on_fewer_than_40_images_cannot_pass():
    """A QA MLP (MNIST) at 100 clean images: the strongest probe toward the suspected class sent 3 of
    17 held-out images there after the repair, 17.6 % under the 20 % limit, and the gate passed a
    model keeping a 34 % true ASR. The probes' own floor for ruling a backdoor out (40) applies."""
    from ibau_cli.config import GateConfig
    from ibau_cli.gates import asr_probe_gate

    gate = asr_probe_gate(GateConfig(), _suite("suspected", 0, 17, 17), _suite("inconclusive", 0, 3, 17))
    assert gate.status == "fail" and gate.value == pytest.approx(3 / 17), gate
    assert "3 of the 17 held-out images" in gate.detail and "fewer than the 40" in gate.detail
    gate = asr_probe_gate(GateConfig(), _suite("suspected", 0, 60, 60), _suite("no_evidence", 0, 3, 60))
    assert gate.status == "pass" and "fewer than" not in gate.detail, gate


def test_a_given_trigger_that_did_not_work_does_not_pass_a_backdoor_the_probes_found():
    """A QA run with a wrong --trigger-pos: the trigger sent 2 % of the images to its class before the
    repair, the probes found the real backdoor, and the true-trigger gate passed (2 % -> 0 %) a model
    keeping 91 %. The gate then also asks the probes; a trigger that worked is gated on its own."""
    from ibau_cli.config import GateConfig
    from ibau_cli.gates import gates_for
    from ibau_cli.metrics import Rate
    from ibau_cli.report import Figures

    acc = Rate(95, 100)
    before_probes, after_probes = _suite("suspected", 0, 60, 60), _suite("suspected", 0, 54, 60)
    wrong = gates_for(GateConfig(), Figures(acc, Rate(2, 90)), Figures(acc, Rate(0, 90)), before_probes, after_probes)
    (asr,) = [g for g in wrong if g.name == "asr"]
    assert asr.status == "fail" and asr.value == pytest.approx(0.9), asr
    assert "sent only 2.2%" in asr.detail and "not the trigger of the backdoor" in asr.detail
    right = gates_for(GateConfig(), Figures(acc, Rate(88, 90)), Figures(acc, Rate(0, 90)), before_probes, after_probes)
    (asr,) = [g for g in right if g.name == "asr"]
    assert asr.status == "pass" and asr.value == 0.0 and asr.detail.startswith("true-trigger"), asr


def test_a_drop_the_held_out_images_cannot_bound_is_said_and_can_be_gated_on_its_bound():
    """QA25: 19 held-out images, the same 17 right before and after: a 0.0 % drop passed the 5 % gate
    silently while the model really lost 5.5 points. The pass now comes with a warning naming the
    upper bound; gate.basis = "upper95" fails it. 400 images with the same drop and no warning pass."""
    import dataclasses

    from ibau_cli.config import GateConfig
    from ibau_cli.gates import gates_for, unshown_passes
    from ibau_cli.metrics import Rate
    from ibau_cli.report import Figures

    def figures(n_right: int, n: int, asr_hits: int) -> Figures:
        correct = [True] * n_right + [False] * (n - n_right)
        return Figures(Rate(n_right, n), Rate(asr_hits, n), correct)

    small = gates_for(GateConfig(), figures(17, 19, 19), figures(17, 19, 0))
    acc = next(g for g in small if g.name == "accuracy_drop")
    assert acc.status == "pass" and acc.value == 0.0 and acc.ci95[1] > 0.05
    (warning,) = [w for w in unshown_passes(small) if "accuracy drop" in w]
    assert f"upper bound {acc.ci95[1]:.1%} is past the limit 5.0%" in warning and "gate.basis" in warning
    strict = gates_for(dataclasses.replace(GateConfig(), basis="upper95"), figures(17, 19, 19), figures(17, 19, 0))
    assert next(g for g in strict if g.name == "accuracy_drop").status == "fail"
    # the true-trigger ASR: 0 of 19 has a Wilson upper bound of 16.8 %, within 20 %, so it passes either way
    assert next(g for g in strict if g.name == "asr").status == "pass"
    large = gates_for(GateConfig(basis="upper95"), figures(380, 400, 400), figures(379, 400, 2))
    assert [g.status for g in large] == ["pass", "pass"] and unshown_passes(large) == []
    assert GateConfig(basis="upper").check() == ["gate.basis must be one of estimate, upper95"]


def test_a_repair_whose_proxy_trigger_still_works_runs_its_schedule_once_more(backdoored):
    """``unlearn.extend``: one round at a tenth of the learning rate leaves the demo backdoor in place
    (the true patch, the proxy here, still sends most unlearning images to the target), so the
    schedule runs once more, learning rate restarted; the ASR on images the repair never saw ends
    lower than without the extension. With ``extend = "off"`` the same seed runs the one round."""
    import copy
    import dataclasses

    from ibau_cli.config import UnlearnConfig
    from ibau_cli.demo import TARGET, add_badnets_trigger, synthetic_images
    from ibau_cli.unlearn import ProxyTriggerStop, unlearn

    x_u, y_u = synthetic_images(300, seed=4242)
    x_e, y_e = backdoored["x_eval"], backdoored["y_eval"]
    keep = y_e != TARGET

    def asr(model) -> float:
        with torch.no_grad():
            return float((model(add_badnets_trigger(x_e[keep])).argmax(1) == TARGET).float().mean())

    def repair(extend: str):
        monitor = ProxyTriggerStop(
            "badnets", add_badnets_trigger, x_u, y_u, TARGET, 0.02, patience=2, device=torch.device("cpu")
        )
        config = dataclasses.replace(UnlearnConfig(), rounds=1, lr=0.003, extend=extend)
        model, log = unlearn(
            copy.deepcopy(backdoored["module"]), x_u, y_u, config, target_hint=TARGET, seed=0, extend=monitor
        )
        return model, log, monitor

    kept, log_off, _ = repair("off")
    assert log_off.extension is None and len(log_off.rounds) == 1
    fixed, log, monitor = repair("auto")
    ext = log.extension
    assert ext["extended"] and ext["rate_after_schedule"] > ext["threshold"] == 0.1, ext
    assert ext["extra_rounds_planned"] == log.rounds_planned == 1 and len(log.rounds) == 2
    assert monitor.measured_after == [1] and monitor.rates[0] == ext["rate_after_schedule"]
    assert asr(fixed) < asr(kept), (asr(fixed), asr(kept))


def test_the_extension_watches_patch_proxies_only():
    """A blend proxy on the zoo's WaNet model kept firing after every repair and the extra schedule
    cost accuracy (docs/algorithm.md): ``unlearn.extend`` is wired to fixed patch probes only."""
    from ibau_cli.guidance import proxy_is_patch
    from ibau_cli.probes import PROBES

    def proxy(name: str):
        probe = PROBES.get(name)
        return name, lambda x: probe.transform(x, torch.Generator().manual_seed(0))

    assert proxy_is_patch(proxy("patch-white-br-20%"), (3, 32, 32))
    assert proxy_is_patch(proxy("patch-checker-cc-10%"), (1, 28, 28))
    assert not proxy_is_patch(proxy("blend-smooth-0.2"), (3, 32, 32))
    assert not proxy_is_patch(proxy("warp-k4-s1.0"), (3, 32, 32))
    assert not proxy_is_patch(None, (3, 32, 32))


def test_a_class_only_synthesised_triggers_named_cannot_pass_the_probe_gate():
    """0.3.9 passed a QA ResNet (low-frequency additive trigger toward 8, named by the synthesised
    probes only) on a 19.3 % probe estimate after the repair; the true ASR was 88.7 %. The repair
    unlearns synthesised-like triggers, so only a fixed pattern that reproduced the backdoor before
    can be measured again after it."""
    from ibau_cli.config import GateConfig
    from ibau_cli.gates import asr_probe_gate, verdict_of
    from ibau_cli.probes import ProbeSuite
    from ibau_cli.probes.base import ProbeResult

    def result(name, family, cls, hits, n=100):
        per_class = [0.0] * 10
        per_class[cls] = hits / n
        return ProbeResult(name, family, cls, Rate(hits, n), per_class=per_class)

    evidence = {"suspected_class": 8, "all_to_all_probe": None, "reasons": ["r"]}
    synthesised_only = ProbeSuite(
        [result("synth-universal-perturbation", "synthesised", 8, 81), result("blend-smooth-0.2", "blend", 8, 30)],
        "suspected", evidence, 0.0, 200,
    )  # fmt: skip
    after = ProbeSuite(
        [result("synth-universal-perturbation", "synthesised", 8, 5), result("blend-smooth-0.2", "blend", 8, 19)],
        "no_evidence", {"suspected_class": None, "reasons": []}, 0.0, 200,
    )  # fmt: skip
    gate = asr_probe_gate(GateConfig(), synthesised_only, after)
    assert gate.status == "not_evaluated" and "synthesised triggers only" in gate.detail, gate
    assert verdict_of([gate], GateConfig()) == "pass" and verdict_of([gate], GateConfig(strict=True)) == "fail"
    # a fixed pattern that sent half of the images to the class before: its figure after is a measurement
    reproduced = ProbeSuite(
        [*synthesised_only.results, result("patch-white-br-10%", "patch", 8, 90)], "suspected", evidence, 0.0, 200
    )
    gate = asr_probe_gate(GateConfig(), reproduced, after)
    assert gate.status == "pass" and gate.value == 0.19, gate
    # an estimate past the limit still fails, whoever named the class
    still = ProbeSuite([result("blend-smooth-0.2", "blend", 8, 40)], "no_evidence", after.evidence, 0.0, 200)
    assert asr_probe_gate(GateConfig(), synthesised_only, still).status == "fail"


def test_a_mid_edge_patch_is_the_proxy_trigger_only_when_clearly_stronger():
    """0.4.0's mid-edge probes: a LeNet whose corner trigger also answers along the bottom edge lost
    its repair when a bottom-centre probe took the proxy's place; the corner stays unless beaten by 0.1."""
    from ibau_cli.probes import ProbeSuite, proxy_trigger
    from ibau_cli.probes.base import ProbeResult

    def suite(corner: float, edge: float) -> ProbeSuite:
        results = []
        for name, share in (("patch-checker-br-20%", corner), ("patch-checker-bc-20%", edge)):
            per_class = [0.0] * 10
            per_class[0] = share
            results.append(ProbeResult(name, "patch", 0, Rate(int(share * 100), 100), per_class=per_class))
        return ProbeSuite(results, "suspected", {"suspected_class": 0}, 0.0, 100)

    assert proxy_trigger(suite(0.95, 1.0), 0, 0)[0] == "patch-checker-br-20%"
    assert proxy_trigger(suite(0.6, 1.0), 0, 0)[0] == "patch-checker-bc-20%"
    assert proxy_trigger(suite(0.3, 0.9), 0, 0)[0] == "patch-checker-bc-20%"
    assert proxy_trigger(suite(0.3, 0.4), 0, 0) is None


def test_a_known_trigger_is_unlearned_by_the_stamping_itself(backdoored):
    """unlearn(known_trigger=...) with the perturbations switched off (radius 1e-9: plain fine-tuning,
    which leaves a backdoor in place): the stamped images alone take the ASR down, and the log says
    how much of each batch they were; with every image of a batch perturbed, none is stamped."""
    import copy
    import dataclasses

    from conftest import independent_figures
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.demo import add_badnets_trigger, synthetic_images
    from ibau_cli.unlearn import unlearn

    x, y = synthetic_images(200, seed=77)
    config = dataclasses.replace(UnlearnConfig(), radius=1e-9, hypergrad=False, rounds=3)
    asr = {}
    for known in (None, add_badnets_trigger):
        model, log = unlearn(copy.deepcopy(backdoored["module"]), x, y, config, known_trigger=known)
        asr[known is not None] = independent_figures(model, backdoored["x_eval"], backdoored["y_eval"])[1]
        assert log.known_trigger_fraction == (0.1 if known else None)
    assert asr[False] > 0.8 and asr[True] < 0.1, asr
    _, log = unlearn(copy.deepcopy(backdoored["module"]), x[:1], y[:1], config, known_trigger=add_badnets_trigger)
    assert log.known_trigger_fraction is None  # a batch of one image is all perturbed: nothing stamped


def test_step_back_keeps_the_first_fraction_at_which_the_proxy_stayed_gone():
    """``unlearn(step_back_to=...)``, the same seeded repair with and without it, and a proxy whose
    rates are given in the order the step back asks for them (the repaired weights, the input's, then
    25, 50, 75 % of the way): gone at 25 % and 50 % keeps exactly half way; never gone two points in a
    row keeps the repaired weights exactly; so does a proxy the repaired weights fail (only they are
    measured), and one the input weights already pass (no signal to follow)."""
    import copy
    from dataclasses import dataclass, field

    from ibau_cli.config import UnlearnConfig
    from ibau_cli.unlearn import ProxyTriggerStop, unlearn

    @dataclass
    class Scripted(ProxyTriggerStop):
        script: list[float] = field(default_factory=list)

        def rate(self, model: torch.nn.Module) -> float:
            return self.script.pop(0)

    torch.manual_seed(0)
    x, y = torch.rand(24, 3, 8, 8), torch.arange(24) % 3
    cfg = UnlearnConfig(rounds=2, inner_steps=2, min_steps_per_round=2, small_set="off")
    start = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))

    def run(*rates: float):
        proxy = Scripted("scripted", lambda z: z, x, y, 0, 0.02, 2, torch.device("cpu"), script=list(rates))
        model, log = unlearn(copy.deepcopy(start), x, y, cfg, seed=3, step_back_to=proxy)
        assert proxy.script == [], "asked for fewer rates than expected"
        return model, log.step_back

    def weights(m) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    repaired, log = unlearn(copy.deepcopy(start), x, y, cfg, seed=3)
    assert log.step_back is None
    w0, w1 = weights(start), weights(repaired)

    half, back = run(0.0, 0.9, 0.0, 0.01)
    assert back["kept_fraction"] == 0.5 and back["fractions"] == [0.0, 0.25, 0.5, 1.0]
    assert back["rates"] == [0.9, 0.0, 0.01, 0.0]
    assert torch.allclose(weights(half), w0 + 0.5 * (w1 - w0), atol=1e-6)

    whole, back = run(0.0, 0.9, 0.5, 0.0, 0.5)
    assert back["kept_fraction"] == 1.0 and back["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert torch.equal(weights(whole), w1)

    failing, back = run(0.3)
    assert back == {**back, "fractions": [1.0], "rates": [0.3], "kept_fraction": 1.0}
    assert torch.equal(weights(failing), w1)

    no_signal, back = run(0.0, 0.01)
    assert back["fractions"] == [0.0, 1.0] and back["kept_fraction"] == 1.0
    assert torch.equal(weights(no_signal), w1)


def test_step_back_applies_on_the_small_set_schedule_by_default():
    from ibau_cli.config import UnlearnConfig

    auto = UnlearnConfig()
    assert auto.resolved_step_back(80) and not auto.resolved_step_back(400)
    assert not UnlearnConfig(perturbations="additive+warp").resolved_step_back(80)
    assert UnlearnConfig(step_back="on").resolved_step_back(4000)
    assert not UnlearnConfig(step_back="off").resolved_step_back(80)
    assert UnlearnConfig(step_back="maybe").check() == ["unlearn.step_back must be 'auto', 'on' or 'off', not 'maybe'"]


class _TinyAttention(torch.nn.Module):
    """4x4 patches of an 8x8 image as 4 tokens, one ``nn.MultiheadAttention`` (fused kernel when
    weights are not asked for), mean-pooled into 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 4, 4)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head((t + self.attn(t, t, t, need_weights=False)[0]).mean(1))


def test_a_model_built_on_attention_is_repaired_with_the_implicit_hypergradient():
    """The hypergradient differentiates twice; PyTorch's fused attention kernels cannot, and a QA
    ViT (``nn.MultiheadAttention``) failed every repair with exit 3. ``unlearn`` runs attention on
    its plain kernel: the same tiny model fails without that switch and is repaired with it."""
    from ibau_cli.config import UnlearnConfig
    from ibau_cli.unlearn import unlearn

    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.arange(16) % 3
    cfg = UnlearnConfig(rounds=1, inner_steps=2, min_steps_per_round=2, small_set="off")
    with pytest.raises(RuntimeError, match="not implemented"):
        unlearn.__wrapped__(_TinyAttention().eval(), x, y, cfg)
    model = _TinyAttention().eval()
    before = [p.detach().clone() for p in model.parameters()]
    _, log = unlearn(model, x, y, cfg)
    assert log.rounds[0].neumann_terms_mean > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_copies_of_an_image_stay_on_one_side_of_the_split():
    """A QA clean folder held every image three times: 0.4.5 put all 90 held-out images' copies in the
    unlearning part. Copies now split together; with none, the split is 0.4.5's, image for image."""
    from ibau_cli.data import duplicate_groups, stratified_split

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 4, 4, generator=gen)
    labels = torch.arange(40) % 4
    plain = stratified_split(labels, 0.2, 3)
    grouped = stratified_split(labels, 0.2, 3, duplicate_groups(images))
    assert torch.equal(plain.holdout_idx, grouped.holdout_idx)
    assert torch.equal(plain.unlearn_idx, grouped.unlearn_idx)
    tripled, labels3 = torch.cat([images] * 3), torch.cat([labels] * 3)
    groups = duplicate_groups(tripled)
    assert groups.tolist() == list(range(40)) * 3
    parts = stratified_split(labels3, 0.2, 3, groups)
    held, kept = set(groups[parts.holdout_idx].tolist()), set(groups[parts.unlearn_idx].tolist())
    assert held and kept and not held & kept
    assert len(parts.holdout_idx) == 24  # 20 % of 30 images a class, in whole groups of 3
    # a group of ten copies among 40 single images: held out only if that brings the part nearer its
    # 10 images, so it misses them by at most half the group (it overshot to 18 in a review's draw)
    mixed = torch.rand(50, 3, 4, 4, generator=gen)
    mixed[:10] = mixed[0]
    one_class = torch.zeros(50, dtype=torch.long)
    sizes = [len(stratified_split(one_class, 0.2, seed, duplicate_groups(mixed)).holdout_idx) for seed in range(8)]
    assert all(abs(n - 10) <= 5 for n in sizes), sizes


def test_the_default_output_of_a_pickled_checkpoint_is_a_pt_file():
    """`.pkl` is read (weights_only) but no format writes it: 0.4.5's default --out, ck.sanitized.pkl,
    was refused (a QA pass)."""
    from pathlib import Path

    from ibau_cli.formats import format_for_output
    from ibau_cli.pipeline import default_output_path

    out = default_output_path(Path("models/ck.pkl"))
    assert out == Path("models/ck.sanitized.pt") and format_for_output(out, "checkpoint").name == "checkpoint"
    assert default_output_path(Path("m.safetensors")) == Path("m.sanitized.safetensors")
