"""The gates: what the measured figures and probes say against the user's limits, and the verdict."""

from __future__ import annotations

from .guidance import TRIGGER_WORKS
from .metrics import Rate, paired_difference_interval
from .probes import FIXED_FLIP_SUSPECT
from .report import Figures, Gate

EPS = 1e-9  # rates are ratios of counts: gates compare with a tolerance, not bit for bit


def asr_probe_gate(gate_cfg, probes_before, probes_after, stage: str = "after repair") -> Gate:
    """Without a known trigger: the strongest ASR-estimating probe toward the class the probes
    suspected (verdict 'suspected') before repair, measured after repair; and the after-repair
    verdict must not be 'suspected'. A class named on weak evidence only (an 'inconclusive' verdict
    before the repair) cannot be gated without the trigger: the gate is 'not_evaluated', not a pass."""
    if probes_after is None:
        return Gate("asr", "not_evaluated", gate_cfg.max_asr, None, "no trigger supplied and probes off")
    cls = None
    for suite in (probes_before, probes_after):
        if cls is None and suite is not None and suite.verdict == "suspected":
            cls = suite.evidence.get("suspected_class")
    weak = None  # a class the probes before the repair named on weak evidence only (inconclusive)
    if cls is None and probes_before is not None and probes_before.verdict == "inconclusive":
        weak = probes_before.evidence.get("suspected_class")
    if cls is None and weak is not None and probes_after.verdict != "suspected":
        # nothing bounded estimated an ASR toward it before; after the repair the same weak evidence
        # may fade whether or not the backdoor went (a qa model: 75 % true ASR, probes "no evidence")
        return Gate(
            "asr",
            "not_evaluated",
            gate_cfg.max_asr,
            None,
            f"no --trigger; the probes before the repair named class {weak} on weak evidence only (inconclusive), "
            f"and no probe estimates an attack success rate toward it: give --trigger and --target to gate on it",
        )
    if cls is None and probes_after.verdict == "inconclusive":
        # neither an estimate nor a ruling-out: with 20 held-out images (100 clean ones) the probes can
        # find nothing and still not rule a backdoor out (probes.MIN_IMAGES)
        why = "; ".join(probes_after.evidence.get("reasons") or []) or "inconclusive"
        return Gate(
            "asr",
            "not_evaluated",
            gate_cfg.max_asr,
            None,
            f"no --trigger; the probes {stage} were inconclusive ({why}): they neither estimate an attack success "
            "rate nor rule a backdoor out; give --trigger and --target, or more clean images",
        )
    if cls is None:
        ok = probes_after.verdict != "suspected"
        return Gate(
            "asr",
            "pass" if ok else "fail",
            gate_cfg.max_asr,
            None,
            f"no --trigger; probes {stage}: {probes_after.verdict.replace('_', ' ')}",
        )
    from .probes import MIN_IMAGES

    name, value, counts = probes_after.probe_asr(cls)
    if (
        probes_before is not None
        and probes_before.verdict == "suspected"
        and probes_after.verdict != "suspected"
        and value <= gate_cfg.max_asr + EPS  # an estimate past the limit still fails the gate below
        and not _fixed_probe_reproduces(probes_before, cls)
    ):
        # only synthesised triggers named the class: the repair unlearns that very object (a universal
        # perturbation toward the class, or a universal warp), so their fall after it is no evidence that
        # the real trigger stopped working (a QA model: 19.3 % estimated after the repair, 88.7 % true ASR)
        return Gate(
            "asr",
            "not_evaluated",
            gate_cfg.max_asr,
            None,
            f"no --trigger; the probes before the repair found class {cls} through synthesised triggers only (no "
            f"fixed pattern sent half of the images there), and the repair unlearns such triggers, so the probes "
            f"after it ({name}: {value:.1%}) cannot show that the backdoor's own trigger stopped working: give "
            "--trigger and --target to gate on it",
        )
    status = "pass" if value <= gate_cfg.max_asr + EPS and probes_after.verdict != "suspected" else "fail"
    n = counts.n if counts is not None else probes_after.n_images
    share = (
        f"{counts.hits} of the {counts.n} held-out images of other classes, not already called {cls}, go there"
        if counts is not None
        else f"the share of the held-out images of other classes, not already called {cls}, that it sends there; "
        f"{probes_after.n_images} held out, half of them for a synthesised probe"
    )
    short = ""
    if n < MIN_IMAGES:  # the probes' own floor for ruling a backdoor out
        status = "fail"
        short = (
            f"; {n} images are fewer than the {MIN_IMAGES} a probe estimate needs to pass: give --trigger and "
            "--target, or more clean images"
        )
    return Gate(
        "asr",
        status,
        gate_cfg.max_asr,
        value,
        f"no --trigger; strongest probe toward suspected class {cls} {stage} ({name}: {share}); "
        f"probe verdict {stage}: {probes_after.verdict.replace('_', ' ')}{short}",
    )


def verdict_of(gates: list[Gate], gate_cfg) -> str:
    """``fail`` when a gate failed, or with ``gate.strict`` when one could not be evaluated."""
    failing = ("fail", "not_evaluated") if gate_cfg.strict else ("fail",)
    return "fail" if any(g.status in failing for g in gates) else "pass"


def _fixed_probe_reproduces(suite, cls: int) -> bool:
    """Whether a fixed (not synthesised, not weak) probe in ``suite`` sent at least FIXED_FLIP_SUSPECT
    of the images to ``cls``: a trigger-like pattern the repair never saw, measurable again after it."""
    from .probes import counts_as_fixed

    return any(
        counts_as_fixed(r) and len(r.per_class) > cls and r.per_class[cls] >= FIXED_FLIP_SUSPECT for r in suite.results
    )


def gates_for(gate_cfg, before: Figures, after: Figures | None, probes_before=None, probes_after=None) -> list[Gate]:
    gates = []
    drop = None
    if before.accuracy.value is not None and after.accuracy.value is not None:
        drop = before.accuracy.value - after.accuracy.value
    interval = None
    if drop is not None and before.correct is not None and after.correct is not None:
        interval = paired_difference_interval(before.correct, after.correct)
    status, basis = _against_limit(drop, interval, gate_cfg.max_acc_drop, gate_cfg)
    status, short = _enough(status, after.accuracy.n, gate_cfg)
    said = "" if interval is None else f"; paired 95% interval {interval[0]:.1%} to {interval[1]:.1%}"
    gates.append(
        Gate(
            name="accuracy_drop",
            status=status,
            limit=gate_cfg.max_acc_drop,
            value=drop,
            detail=f"held-out clean accuracy drop (n={after.accuracy.n}{said}){basis}{short}",
            ci95=None if interval is None else list(interval),
        )
    )
    if after.asr is None:
        gates.append(asr_probe_gate(gate_cfg, probes_before, probes_after))
        return gates
    gate = true_trigger_gate(gate_cfg, after.asr, "after repair")
    v0 = None if before.asr is None else before.asr.value
    if v0 is not None and v0 < TRIGGER_WORKS and probes_before is not None and probes_before.verdict == "suspected":
        # the given trigger did not work on the input model, yet the probes found a backdoor: it is not
        # that backdoor's trigger (a wrong --trigger-pos, say), and its ASR after the repair says nothing
        probe = asr_probe_gate(gate_cfg, probes_before, probes_after)
        if probe.status == "fail":
            gate = Gate(
                "asr",
                "fail",
                gate_cfg.max_asr,
                probe.value,
                f"the given trigger sent only {v0:.1%} of the held-out images to its class before the repair (so it "
                f"is not the trigger of the backdoor the probes found), {after.asr.value:.1%} after; "
                + probe.detail.removeprefix("no --trigger; "),
            )
    gates.append(gate)
    return gates


def true_trigger_gate(gate_cfg, asr: Rate, stage: str) -> Gate:
    """The ASR gate on the user's trigger, measured on held-out images ``stage`` (after repair, or in the scan)."""
    interval = asr.wilson()
    status, basis = _against_limit(asr.value, interval, gate_cfg.max_asr, gate_cfg)
    if asr.value is None:  # no triggered image measured: as before 0.4.4, the gate fails rather than skips
        status = "fail"
    status, short = _enough(status, asr.n, gate_cfg)
    return Gate(
        "asr",
        status,
        gate_cfg.max_asr,
        asr.value,
        f"true-trigger attack success rate {stage} (n={asr.n}){basis}{short}",
        None if interval is None else list(interval),
    )


def _against_limit(value, interval, limit: float, gate_cfg) -> tuple[str, str]:
    """pass / fail / not_evaluated of a measured figure against its limit, on the figure itself or (gate.basis
    = "upper95") on its 95 % upper bound; and what to add to the detail."""
    if value is None:
        return "not_evaluated", ""
    if gate_cfg.basis == "upper95" and interval is not None:
        return ("pass" if interval[1] <= limit + EPS else "fail"), f"; gate.basis = upper95: {interval[1]:.1%} gated"
    return ("pass" if value <= limit + EPS else "fail"), ""


def unshown_passes(gates: list[Gate]) -> list[str]:
    """A warning for each gate that passed on its measured figure although its 95 % upper bound is past
    the limit: the held-out images do not show the figure within the limit (0 of 19 images lost is a
    0.0 % drop whose interval reaches 13.3 points)."""
    said = {"accuracy_drop": "accuracy drop", "asr": "true-trigger ASR"}
    return [
        f"the {said.get(g.name, g.name)} gate passed on the measured {g.value:.1%}, but its 95% upper bound "
        f"{g.ci95[1]:.1%} is past the limit {g.limit:.1%}: the held-out images are too few to show it within "
        'the limit; give more clean images (sanitize: or a larger --holdout), or set gate.basis = "upper95" to '
        "fail such runs"
        for g in gates
        if g.status == "pass"
        and g.value is not None
        and g.ci95 is not None
        and g.limit is not None
        and g.ci95[1] > g.limit + EPS
    ]


def _enough(status: str, n: int, gate_cfg) -> tuple[str, str]:
    """A gate cannot pass on fewer than ``gate.min_samples`` images: 1 of 6 triggered images is a
    17 % ASR whose 95 % interval reaches 56 %. Returns the status and what to add to the detail."""
    if status != "pass" or n >= gate_cfg.min_samples:
        return status, ""
    return "fail", (
        f": fewer than gate.min_samples = {gate_cfg.min_samples} images, too few to pass; "
        "give more clean images (or lower gate.min_samples)"
    )
