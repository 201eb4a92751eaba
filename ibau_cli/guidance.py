"""What steers the unlearning: the user's trigger, the class and proxy trigger the probes found, the perturbation families."""

from __future__ import annotations

import torch

from .config import EARLY_STOP_PATIENCE
from .probes import FIXED_FLIP_SUSPECT
from .report import Figures
from .unlearn import ProxyTriggerStop

TRIGGER_WORKS = 0.5  # a given trigger sending fewer held-out images to its class before the repair does not work


GIVEN_TRIGGER = "given trigger"  # the proxy trigger's name when it is the user's --trigger


def known_trigger_to_unlearn(settings, trigger, before: Figures):
    """The user's ``--trigger`` when the repair should also unlearn it directly (``unlearn.known_trigger
    = "auto"``): it sends at least TRIGGER_WORKS of the held-out images to its class before the repair,
    so it is the backdoor's trigger. None otherwise (a trigger that does not work only measures)."""
    if trigger is None or settings.unlearn.known_trigger != "auto" or before.asr is None:
        return None
    return trigger if (before.asr.value or 0.0) >= TRIGGER_WORKS else None


def class_to_guide(settings, probes_before) -> int | None:
    """The class the probes suspect before the repair, when guidance is on and the verdict is
    "suspected": the unlearning then also removes the easiest perturbation toward it."""
    if settings.unlearn.guide != "probes" or probes_before is None or probes_before.verdict != "suspected":
        return None
    cls = probes_before.evidence.get("suspected_class")
    return None if cls is None else int(cls)


def guide_proxy(settings, probes_before, guide_class):
    """The fixed probe pattern that sent the most held-out images to the guided class (its name and
    the trigger, ``probes.proxy_trigger``), which both the early stop and the patch family use; None
    on an unguided repair or when no fixed pattern named the class."""
    from .probes import proxy_trigger

    if guide_class is None or probes_before is None:
        return None
    return proxy_trigger(probes_before, guide_class, settings.seed)


def proxy_monitor(settings, proxy, guide_class, x_u, y_u, device, amp):
    """On a guided repair, the fixed probe pattern that sent the most held-out images to the guided
    class (``proxy``, from ``guide_proxy``), measured on the unlearning images: ``unlearn.early_stop``
    stops the repair once it no longer sends them there, ``unlearn.extend`` runs the schedule once more
    while it still does (docs/algorithm.md). None when no fixed pattern named the class."""
    if proxy is None:
        return None
    name, apply = proxy
    return ProxyTriggerStop(
        name=name,
        apply=apply,
        images=x_u,
        labels=y_u,
        target=guide_class,
        threshold=settings.unlearn.early_stop_flip,
        patience=EARLY_STOP_PATIENCE,
        device=device,
        amp=amp,
    )


def patch_region_for(settings, proxy, image_shape) -> tuple[str, torch.Tensor] | None:
    """``unlearn.patch = "auto"`` on a guided repair: when the fixed probe that sent the most held-out
    images to the guided class (``proxy``, from ``guide_proxy``) is a patch, the region around it
    (``probes.patch_region``), with that probe's name; the inner problem then also searches
    patterns there (docs/algorithm.md)."""
    from .probes import patch_region

    if settings.unlearn.patch != "auto" or proxy is None:
        return None
    name, apply = proxy
    region = patch_region(apply, image_shape)
    return None if region is None else (name, region)


def proxy_is_patch(proxy, image_shape) -> bool:
    """Whether the proxy trigger is a fixed patch probe: ``unlearn.extend`` watches only those. A
    blend that a WaNet model's class also answers (the proxy of 4 of its 9 zoo runs) kept sending a
    third of the images there after every repair, and running the schedule again for it cost 5-8
    points of accuracy at 100 images and raised the ASR (docs/algorithm.md)."""
    from .probes import patch_region

    return proxy is not None and patch_region(proxy[1], image_shape) is not None


def perturbation_families(settings, probes_before) -> str:
    """``unlearn.perturbations = "auto"``: I-BAU's additive perturbation, plus the warp family when,
    before the repair, a warp (a fixed warp probe or the synthesised universal warp) flipped at
    least half of the held-out images (95 % lower bound) to one class: the probes' own threshold."""
    chosen = settings.unlearn.perturbations
    if chosen != "auto":
        return chosen
    if probes_before is not None and any(
        (r.family == "warp" or r.name == "synth-warp")
        and r.flip.n
        and (r.flip.wilson() or (0, 0))[0] >= FIXED_FLIP_SUSPECT
        for r in probes_before.results
    ):
        return "additive+warp"
    return "additive"
