"""Trigger probes behind a registry that plugins extend, and the verdict drawn from them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import RuntimeFailure, out_of_memory
from ..frozen import frozen_parameters
from ..metrics import Rate
from ..progress import NoProgress, Progress
from ..registry import Registry
from .base import Probe, ProbeContext, ProbeResult, predict
from .patterns import PatternProbe, builtin_patterns
from .synthesised import MaskPatternProbe, UniversalPerturbationProbe, WarpPerturbationProbe

PROBES: Registry[Probe] = Registry("probe")


def register_probe(probe: Probe, *, origin: str | None = None) -> Probe:
    return PROBES.register(probe.name, probe, origin=origin)


for _p in [*builtin_patterns(), MaskPatternProbe(), UniversalPerturbationProbe(), WarpPerturbationProbe()]:
    register_probe(_p)

# Thresholds of the verdict (see docs/probes.md for how they were chosen).
FIXED_FLIP_SUSPECT = 0.5  # a fixed pattern flipping half the images to one class
EDGE_PROXY_MARGIN = 0.1  # a mid-edge patch is the proxy trigger over a corner or centre one only this much stronger
ANOMALY_SUSPECT = 2.0  # Neural Cleanse's threshold on the mask-norm anomaly index
SYNTH_FLIP_MIN = 0.5  # ... for a synthesised trigger that really works on unseen images
# Families whose flips alone are weak evidence: on GTSRB a clean small CNN sends 61 % of images to one
# class under a 0.2 colour shift (traffic-sign classes are told apart by colour).
WEAK_FAMILIES = ("colour",)
# All-to-all: a fixed pattern sends at least a quarter of the correctly classified images (lower Wilson
# bound) to their class's most common new label, and those labels differ between classes (at least
# half as many targets as classes moved). Measured on GTSRB: the all-to-all model 0.41 with 21 targets
# from 28 classes; two clean models at most 0.36 with 10 targets from 38 classes.
ALL_TO_ALL_REMAP = 0.25
ALL_TO_ALL_SPREAD = 0.5
MIN_IMAGES = 40  # fewer held-out images than this: inconclusive
# Three families agreeing on one class, none strong enough alone: the synthesised mask trigger and the
# universal perturbation both find it the easiest class to reach, and a fixed pattern sends at least this
# share of the images there. Inconclusive, naming the class. Measured at 100 images (3 seeds each,
# docs/probes.md): 0 of 18 scans of clean models; a CIFAR-10 checker-patch model that every probe missed
# alone in 3 of 3, a GTSRB watermark model in 1 of 3.
FAMILIES_AGREE_FIXED = 0.3


@dataclass
class ProbeSuite:
    results: list[ProbeResult]
    verdict: str  # "suspected", "no_evidence", "inconclusive"
    evidence: dict
    seconds: float
    n_images: int
    artifacts: dict = field(default_factory=dict)

    def _estimators(self) -> list[ProbeResult]:
        """The probes whose flip rate estimates an ASR: bounded triggers (not the mask-pattern one, whose
        area is not bounded, so it flips most images of any model; it counts through its anomaly index)
        and not the weak families (a global colour change flips colour-coded classes of clean models)."""
        return [r for r in self.results if r.name != "synth-mask-pattern" and r.family not in WEAK_FAMILIES]

    def worst(self) -> ProbeResult:
        """The strongest probe that estimates an ASR."""
        return max(self._estimators() or self.results, key=lambda r: r.flip.value or 0.0)

    def probe_asr(self, target: int) -> tuple[str, float, Rate | None]:
        """The strongest ASR-estimating probe toward ``target``: its name, its rate, and that rate as
        hits of n where the probe counted them (None for a plugin's probe that gives rates only)."""
        candidates = [r for r in self._estimators() if len(r.per_class) > target]
        best = max(candidates, key=lambda r: r.per_class[target])
        counts = best.per_class_counts[target] if len(best.per_class_counts) > target else None
        return best.name, best.per_class[target], counts

    def to_dict(self) -> dict:
        worst = self.worst()
        return {
            "verdict": self.verdict,
            "evidence": self.evidence,
            "worst_probe": worst.name,
            "worst_flip_rate": worst.flip.to_dict(),
            "worst_class": worst.worst_class,
            "n_images": self.n_images,
            "seconds": self.seconds,
            "probes": [r.to_dict() for r in self.results],
        }


def counts_as_fixed(r: ProbeResult) -> bool:
    """A fixed pattern whose flips count as evidence of a trigger: not a synthesised probe (fitted to
    the model, so it reaches some class on any model) and not a weak family (a global colour change
    moves colour-coded classes of clean models)."""
    return r.family != "synthesised" and r.family not in WEAK_FAMILIES


def _remapped(r: ProbeResult) -> Rate:
    """The images a pattern sends to their class's new label, one source class counted per target."""
    remap = r.details["remap_rate"]
    return Rate(r.details.get("remap_hits_one_source_per_target", remap["hits"]), remap["n"])


def _remapped_share(r: ProbeResult) -> float:
    return _remapped(r).value or 0.0


def _looks_all_to_all(r: ProbeResult) -> bool:
    """A trigger that moves many images, each class to its own new label (label -> label + 1 style).
    A target that several classes go to counts the images of one of them only, so a pattern pushing
    several classes into one sink class (a clean CIFAR-10 model under a sinusoid) is not a remapping.
    Reports written before 0.4.4 lack that count; their plain rate is used."""
    remap = r.details.get("remap_rate")
    if not remap or not remap["n"]:
        return False
    lo = (_remapped(r).wilson() or (0.0, 0.0))[0]
    targets, sources = r.details["remap_targets"], r.details["remap_sources"]
    return lo >= ALL_TO_ALL_REMAP and targets >= 3 and targets >= ALL_TO_ALL_SPREAD * sources


def _stands_out(r: ProbeResult | None) -> float | None:
    """For a synthesised probe: the other classes' median flip rate when ``r`` sends at least half of
    the unseen images (95 % lower bound) to its worst class and 3 times that median; else None."""
    if r is None or not r.flip.n:
        return None
    median_other = r.details.get("median_other_flip_rate") or 0.0
    if (r.flip.wilson() or (0, 0))[0] >= SYNTH_FLIP_MIN and r.flip.value >= 3 * max(median_other, 0.05):
        return median_other
    return None


def _families_agree(results: list[ProbeResult]) -> tuple[int, str] | None:
    """The class that the synthesised mask trigger, the universal perturbation and a fixed pattern
    (FAMILIES_AGREE_FIXED of the images or more) all point to, with the reason; None when they differ."""
    by_name = {r.name: r for r in results}
    mask, uap = by_name.get("synth-mask-pattern"), by_name.get("synth-universal-perturbation")
    if mask is None or uap is None or not mask.flip.n or not uap.flip.n or mask.worst_class != uap.worst_class:
        return None
    cls = mask.worst_class
    fixed = [
        r
        for r in results
        if counts_as_fixed(r) and r.flip.n and r.worst_class == cls and (r.flip.value or 0.0) >= FAMILIES_AGREE_FIXED
    ]
    if not fixed:
        return None
    top = max(fixed, key=lambda r: r.flip.value)
    return cls, (
        f"three probe families point to class {cls}, none strongly enough alone: fixed pattern {top.name} sends "
        f"{top.flip.value:.0%} of images there ({len(fixed)} fixed pattern{'s' if len(fixed) > 1 else ''} "
        f"{FAMILIES_AGREE_FIXED:.0%} or more), and it is the easiest class for the synthesised mask trigger and "
        f"for the universal perturbation ({uap.flip.value:.0%}); more clean images, or --trigger, can settle it"
    )


def judge(results: list[ProbeResult], n_images: int) -> tuple[str, dict]:
    """Backdoor suspected / no evidence / inconclusive, with the evidence behind it."""
    fixed = [r for r in results if r.family != "synthesised"]
    mask = next((r for r in results if r.name == "synth-mask-pattern"), None)
    reasons = []
    suspected_class, class_rate = None, 0.0
    all_to_all_probe = None
    flipping = [r for r in fixed if r.flip.n and (r.flip.wilson() or (0, 0))[0] >= FIXED_FLIP_SUSPECT]
    strong_fixed = [r for r in flipping if counts_as_fixed(r)]
    if strong_fixed:
        top = max(strong_fixed, key=lambda r: r.flip.value)
        reasons.append(f"fixed pattern {top.name} flips {top.flip.value:.0%} of images to class {top.worst_class}")
        suspected_class, class_rate = top.worst_class, top.flip.value
    all_to_all = [r for r in fixed if counts_as_fixed(r) and _looks_all_to_all(r)]
    if all_to_all and not strong_fixed:
        top = max(all_to_all, key=_remapped_share)
        d = top.details
        all_to_all_probe = top.name
        reasons.append(
            f"fixed pattern {top.name} sends {_remapped_share(top):.0%} of correctly classified images to a "
            f"class-dependent new label ({d['remap_targets']} different targets from {d['remap_sources']} classes, "
            f"one source class counted per target): an all-to-all backdoor"
        )
    weak = []
    weak_fixed = [r for r in flipping if r.family in WEAK_FAMILIES]
    if weak_fixed:
        top = max(weak_fixed, key=lambda r: r.flip.value)
        weak.append(
            f"{top.name} flips {top.flip.value:.0%} of images to class {top.worst_class} (a global colour change can "
            f"turn colour-coded classes into each other: supporting evidence only)"
        )
        weak_class = top.worst_class
    else:
        weak_class = None
    if mask is not None and mask.flip.n:
        ai = mask.details.get("anomaly_index", 0.0)
        if ai >= ANOMALY_SUSPECT and (mask.flip.value or 0) >= SYNTH_FLIP_MIN:
            weak.append(
                f"synthesised mask trigger for class {mask.worst_class} is {ai:.1f} robust SDs smaller than the other "
                f"classes' and flips {mask.flip.value:.0%} of unseen images"
            )
    # synthesised evidence: the universal perturbation names a class only when nothing else did; the
    # universal warp also when it moves more images than the evidence that did
    for name, describe, prefer_stronger in (
        (
            "synth-universal-perturbation",
            lambda r: f"a small universal perturbation (L2 {r.details['radius']:.1f})",
            False,
        ),
        ("synth-warp", lambda r: f"a universal sub-pixel warp (RMS {r.details['rms_pixels']} px)", True),
    ):
        r = next((p for p in results if p.name == name), None)
        median_other = _stands_out(r)
        if r is None or median_other is None:
            continue
        reasons.append(
            f"{describe(r)} sends {r.flip.value:.0%} of unseen images to class {r.worst_class} "
            f"(median for other classes {median_other:.0%})"
        )
        if suspected_class is None or (prefer_stronger and r.flip.value > class_rate):
            suspected_class, class_rate = r.worst_class, r.flip.value
    evidence = {
        "suspected_class": suspected_class,
        "all_to_all_probe": all_to_all_probe,
        "reasons": reasons,
        "anomaly_index": None if mask is None else mask.details.get("anomaly_index"),
        "synthesised_mask_l1_fraction": None if mask is None else mask.details.get("mask_l1_fraction"),
        "median_mask_l1_fraction": None if mask is None else mask.details.get("median_mask_l1_fraction"),
    }
    if reasons:
        evidence["reasons"] = reasons + weak
        return "suspected", evidence
    few = [f"only {n_images} held-out images; at least {MIN_IMAGES} are needed to rule out a backdoor"]
    few = few if n_images < MIN_IMAGES else []
    agreed = _families_agree(results)
    if agreed is not None:
        cls, why = agreed
        evidence["reasons"] = [*weak, why, *few]
        evidence["suspected_class"] = cls
        return "inconclusive", evidence
    if weak:
        # alone, a small synthesised mask is weak evidence (its optimisation is noisy on a budget)
        evidence["reasons"] = [*weak, "no fixed pattern or universal perturbation confirms it", *few]
        evidence["suspected_class"] = weak_class if weak_class is not None else mask.worst_class
        return "inconclusive", evidence
    if few:
        evidence["reasons"] = few
        return "inconclusive", evidence
    return "no_evidence", evidence


APPEARED_BEFORE_MAX = FIXED_FLIP_SUSPECT / 2  # the input's share below which a pattern's pull "appeared" after


def reconcile_after_repair(before: ProbeSuite | None, after: ProbeSuite) -> ProbeSuite:
    """Judge the repaired model against what the input model showed. The repair sees clean images
    only, so it cannot give the model a backdoor the input did not carry; evidence that appears only
    after it is a side effect of unlearning. It stays in the report as a reason, and the verdict
    becomes inconclusive instead of suspected, in two cases:

    - all-to-all evidence when the input model gave none (typically a large occluding patch now
      scattering predictions);
    - a fixed pattern naming a class the input model's probes did not name, when that very pattern
      sent under APPEARED_BEFORE_MAX of the images there in the input model, and the probes judged
      again without such patterns suspect nothing. A user's MNIST net: a 2-pixel white frame sends
      about half the digits to 1 in clean nets, 7 % of the held-out digits in the backdoored input
      (its trigger pulled them to 0) and 69 % after the repair removed that backdoor.

    Evidence the input model already showed, or that synthesised triggers give, is unchanged.
    """
    ev = after.evidence
    if before is None or after.verdict != "suspected":
        return after
    cls = ev.get("suspected_class")
    if cls is None:
        if not ev.get("all_to_all_probe") or before.evidence.get("all_to_all_probe"):
            return after
        note = (
            f"the all-to-all evidence ({ev['all_to_all_probe']}) appeared only after the repair and the input model "
            "showed none: a side effect of unlearning, not counted as a backdoor"
        )
    else:
        named_before = {before.evidence.get("suspected_class")} - {None} if before.verdict != "no_evidence" else set()
        earlier = {r.name: r for r in before.results}

        def appeared(r: ProbeResult) -> bool:
            """A fixed pattern at the suspect bound toward a class now, under APPEARED_BEFORE_MAX there in the
            input model, a class the input's probes did not name."""
            c, then = r.worst_class, earlier.get(r.name)
            return (
                counts_as_fixed(r)
                and (r.flip.wilson() or (0, 0))[0] >= FIXED_FLIP_SUSPECT
                and c not in named_before
                and then is not None
                and len(then.per_class) > c
                and then.per_class[c] < APPEARED_BEFORE_MAX
            )

        new = [r for r in after.results if appeared(r)]
        if not any(r.worst_class == cls for r in new):
            return after
        # judged again without them: any other evidence (a pattern the input already leaned on, a
        # synthesised trigger standing out) keeps the verdict suspected
        rest, _ = judge([r for r in after.results if r not in new], after.n_images)
        if rest == "suspected":
            return after
        top = max((r for r in new if r.worst_class == cls), key=lambda r: r.flip.value or 0.0)
        note = (
            f"class {cls} is named only after the repair: {top.name} sends {top.flip.value:.0%} of images there now "
            f"and sent {earlier[top.name].per_class[cls]:.0%} in the input model, whose probes did not name class "
            f"{cls}; the repair saw clean images only, so this is a side effect of unlearning, not counted as a "
            "backdoor, and nothing else after the repair suggests one"
        )
    evidence = {**ev, "reasons": [*ev.get("reasons", []), note], "appeared_after_repair": True}
    return ProbeSuite(after.results, "inconclusive", evidence, after.seconds, after.n_images, after.artifacts)


def run_probes(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    seed: int = 0,
    budget_steps: int = 600,
    radius: float = 3.0,
    names: list[str] | None = None,
    progress: Progress | None = None,
    class_batch: int | None = None,
) -> ProbeSuite:
    """Run the registered probes (or ``names``) on held-out clean pixels ``x`` in [0, 1]."""
    progress = progress or NoProgress()
    t0 = time.perf_counter()
    model.eval()
    selected = [PROBES.get(n) for n in (names or PROBES.names())]
    ctx = ProbeContext(
        x=x,
        y=y,
        num_classes=num_classes,
        device=device,
        amp=amp,
        seed=seed,
        clean_pred=torch.empty(0, dtype=torch.long),
        budget_steps=budget_steps,
        radius=radius,
        class_batch=class_batch,
    )
    ctx.clean_pred = predict(model, x, ctx)
    results = []
    # progress in work units: a fixed pattern is one; a synthesised probe declares its optimisation
    # steps (``units``) and reports them as it goes (``ctx.tick``), so the estimate of the time left
    # holds on a model where those steps are most of the work
    units = [max(1, int(probe.units(ctx))) if hasattr(probe, "units") else 1 for probe in selected]
    progress.start("probes", sum(units))
    for probe, share in zip(selected, units, strict=True):
        ticked = 0

        def tick(n: int, share: int = share) -> None:
            nonlocal ticked
            n = min(n, share - ticked)
            if n > 0:
                ticked += n
                progress.advance(n)

        ctx.tick = tick
        t_probe = time.perf_counter()
        try:
            with frozen_parameters(model):  # probes need gradients for their triggers only
                result = probe.run(model, ctx)
        except Exception as exc:  # a plugin's probe, most likely: say which one
            if out_of_memory(exc):
                raise  # the command line says so in its own words
            raise RuntimeFailure(
                f"probe {probe.name} (from {PROBES.origin(probe.name)}) failed: {type(exc).__name__}: {exc}",
                hint="fix or remove the plugin that registers it (ibau --no-plugins skips installed plugins)",
            ) from exc
        result.seconds = time.perf_counter() - t_probe
        results.append(result)
        progress.advance(share - ticked)
    progress.finish()
    verdict, evidence = judge(results, len(y))
    artifacts = {r.name: getattr(r, "artifacts", None) for r in results if getattr(r, "artifacts", None)}
    return ProbeSuite(results, verdict, evidence, time.perf_counter() - t0, len(y), artifacts)


def proxy_trigger(suite: ProbeSuite, target: int, seed: int) -> tuple[str, Callable[[Tensor], Tensor]] | None:
    """The fixed pattern that sent the largest share of held-out images to ``target`` in ``suite``,
    as its name and the trigger itself (drawn with the probes' ``seed``, so the very pattern
    measured), when that share is at least FIXED_FLIP_SUSPECT; None otherwise. Synthesised probes
    and the weak families do not count: the first were fitted to the model, the second move clean
    models too. A probe at the middle of an edge or a frame (``preferred`` False) is chosen over the
    corner and centre ones only when it sends EDGE_PROXY_MARGIN more of the images there, or none of them
    reaches FIXED_FLIP_SUSPECT: the example plugin's LeNet, whose checkerboard detector answers along
    the bottom edge as well as in its corner, lost its repair (ASR 84 %) when a bottom-centre probe
    took the proxy's place and the patch family searched there."""
    best: dict[bool, tuple[float, str, PatternProbe]] = {}  # the preferred probes' best and the others'
    for r in suite.results:
        probe = PROBES.get(r.name)
        if not isinstance(probe, PatternProbe) or not counts_as_fixed(r) or len(r.per_class) <= target:
            continue
        share = r.per_class[target]
        kind = probe.preferred
        if share >= FIXED_FLIP_SUSPECT and (kind not in best or share > best[kind][0]):
            best[kind] = (share, r.name, probe)
    if not best:
        return None
    chosen = best.get(True)
    if chosen is None or (False in best and best[False][0] >= chosen[0] + EDGE_PROXY_MARGIN):
        chosen = best[False]
    _, name, probe = chosen
    return name, lambda x: probe.transform(x, torch.Generator().manual_seed(seed))


PATCH_REGION_MAX = 0.25  # a proxy trigger changing more of the image than this is not a patch


def patch_region(apply: Callable[[Tensor], Tensor], image_shape: tuple[int, ...]) -> Tensor | None:
    """Where a fixed patch probe's trigger sits, grown by its own size on every side (a real
    trigger near it, not on it, still falls inside): [1, 1, H, W], 1 inside. None when the trigger
    changes more than PATCH_REGION_MAX of the image (a blend, a frame, a signal: not a patch)."""
    c, h, w = image_shape
    x = torch.rand((4, c, h, w), generator=torch.Generator().manual_seed(0))
    changed = (apply(x) != x).any(dim=1).any(dim=0).float()[None, None]
    area = float(changed.sum())
    if area == 0 or area > PATCH_REGION_MAX * h * w:
        return None
    grow = max(1, math.ceil(math.sqrt(area)))
    region = torch.nn.functional.max_pool2d(changed, 2 * grow + 1, stride=1, padding=grow)
    return region if float(region.sum()) <= PATCH_REGION_MAX * h * w else changed


__all__ = [
    "PROBES",
    "ProbeResult",
    "ProbeSuite",
    "judge",
    "patch_region",
    "proxy_trigger",
    "reconcile_after_repair",
    "register_probe",
    "run_probes",
]
