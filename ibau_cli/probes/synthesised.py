"""Triggers synthesised per candidate target class, on one half of the held-out images and
measured on the other half.

- ``mask-pattern`` (Neural Cleanse-style): a mask m and a pattern p, x' = (1 - m) x + m p,
  optimised for the target with an L1 penalty on m. A backdoor target needs a much smaller mask
  than the other classes: the median-absolute-deviation anomaly index of the mask norms says so.
- ``universal-perturbation``: the object I-BAU's inner problem optimises, made targeted: an
  L2-bounded delta maximising the target's probability.
- ``warp``: a universal sub-pixel warp optimised (untargeted) to change the answers; a warp
  backdoor sends nearly every image to its target under it (20 steps, whatever the class count).

Cost: ``budget_steps`` optimisation steps per probe, split evenly over the classes (at least 10
each), each step one forward and backward pass over a batch of at most 64 images. It grows
linearly with the number of classes only through that floor. The forward passes run under the
configured autocast (``unlearn.amp``: bf16 on CUDA by default, on a CPU when asked); the losses and
the optimised triggers stay in fp32.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import autocast
from ..metrics import Rate
from ..unlearn.perturbations import Warp
from .base import ProbeContext, ProbeResult, class_rates, predict, resolved_class_batch, worst_class

BATCH = 64
MIN_STEPS_PER_CLASS = 10  # below this a class's trigger is not fitted at all, whatever the budget


def steps_per_class(budget_steps: int, num_classes: int) -> int:
    """Optimisation steps per class of a class-wise synthesised probe: the budget split over the
    classes, at least MIN_STEPS_PER_CLASS (so past budget / 10 classes the cost grows with them)."""
    return max(MIN_STEPS_PER_CLASS, budget_steps // max(num_classes, 1))


_R = TypeVar("_R")


def _halves(ctx: ProbeContext) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(ctx.seed + 17)
    perm = torch.randperm(len(ctx.y), generator=gen)
    return perm[: len(perm) // 2], perm[len(perm) // 2 :]


def _eligible(ctx: ProbeContext, idx: Tensor, t: int) -> Tensor:
    keep = (ctx.y[idx] != t) & (ctx.clean_pred[idx] != t)
    return idx[keep]


def anomaly_index(values: list[float], k: int) -> float:
    """How far below the others value k is, in robust standard deviations (MAD x 1.4826)."""
    med = statistics.median(values)
    mad = statistics.median([abs(v - med) for v in values]) * 1.4826
    return (med - values[k]) / mad if mad > 0 else 0.0


def _logits(model: nn.Module, x: Tensor, ctx: ProbeContext) -> Tensor:
    """The model's outputs under the configured autocast, as fp32 (for the losses)."""
    with autocast(ctx.device, ctx.amp):
        return model(x).float()


@torch.no_grad()
def _flip(model: nn.Module, x: Tensor, t: int, ctx: ProbeContext) -> Rate:
    hits = 0
    for s in range(0, len(x), ctx.batch_size):
        hits += int((_logits(model, x[s : s + ctx.batch_size].to(ctx.device), ctx).argmax(1) == t).sum())
    return Rate(hits, len(x))


def _class_chunks(
    ctx: ProbeContext, classes: list[int], fit: Callable[[list[int]], list[_R]], per_class: int
) -> tuple[dict[int, _R], int]:
    """``fit`` over ``classes`` a chunk at a time (``probes.class_batch``; on CUDA several classes in
    one batch), and the chunk size it ended with: a chunk that runs out of GPU memory is retried in
    halves, down to one class."""
    size = resolved_class_batch(ctx.class_batch, ctx.device, tuple(ctx.x.shape[1:]), per_class)
    out: dict[int, _R] = {}
    i = 0
    while i < len(classes):
        chunk = classes[i : i + size]
        try:
            fitted = fit(chunk)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        out.update(zip(chunk, fitted, strict=True))
        i += len(chunk)
    return out, size


class _Draws:
    """Each class's images for every step, drawn up front in the order the one-class-at-a-time loop
    draws them, so that the fitted triggers do not depend on how the classes are batched."""

    def __init__(self, picks: dict[int, list[Tensor]]) -> None:
        self.picks = picks

    def batch(self, ctx: ProbeContext, chunk: list[int], step: int) -> Tensor:
        idx = torch.cat([self.picks[t][step] for t in chunk])
        return ctx.x[idx].to(ctx.device, non_blocking=True)

    def owners(self, chunk: list[int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """For the rows of a chunk's batch: the index of their class within the chunk, the class
        itself, and 1 / (its class's row count), which makes the summed loss each class's mean."""
        sizes = torch.tensor([len(self.picks[t][0]) for t in chunk])
        owner = torch.repeat_interleave(torch.arange(len(chunk)), sizes)
        target = torch.tensor(chunk)[owner]
        weight = (1.0 / sizes.float())[owner]
        return owner.to(device), target.to(device), weight.to(device)


def _draw(fit: Tensor, steps: int, gen: torch.Generator) -> list[Tensor]:
    return [fit[torch.randint(len(fit), (min(BATCH, len(fit)),), generator=gen)] for _ in range(steps)]


def class_wise_units(ctx: ProbeContext) -> int:
    """A class-wise synthesised probe's progress units: one optimisation step for one class."""
    return steps_per_class(ctx.budget_steps, ctx.num_classes) * ctx.num_classes


class MaskPatternProbe:
    name = "synth-mask-pattern"
    family = "synthesised"
    units = staticmethod(class_wise_units)

    def __init__(self, l1_weight: float = 0.05) -> None:
        self.l1_weight = l1_weight

    def run(self, model: nn.Module, ctx: ProbeContext) -> ProbeResult:
        fit_idx, test_idx = _halves(ctx)
        _, c, h, w = ctx.x.shape
        steps = steps_per_class(ctx.budget_steps, ctx.num_classes)
        gen = torch.Generator().manual_seed(ctx.seed)
        tests, starts, picks = {}, {}, {}
        for t in range(ctx.num_classes):
            fit = _eligible(ctx, fit_idx, t)
            test = _eligible(ctx, test_idx, t)
            if len(fit) and len(test):
                tests[t] = test
                starts[t] = torch.randn((1, c, h, w), generator=gen)
                picks[t] = _draw(fit, steps, gen)
        draws = _Draws(picks)

        def fit_chunk(chunk: list[int]) -> list[tuple[Tensor, Tensor]]:
            m_logit = torch.full((len(chunk), 1, h, w), -3.0, device=ctx.device, requires_grad=True)
            p_logit = torch.cat([starts[t] for t in chunk]).to(ctx.device).requires_grad_(True)
            opt = torch.optim.Adam([m_logit, p_logit], lr=0.1)
            owner, target, weight = draws.owners(chunk, ctx.device)
            for step in range(steps):
                xb = draws.batch(ctx, chunk, step)
                m, p = torch.sigmoid(m_logit), torch.sigmoid(p_logit)
                out = _logits(model, (1 - m[owner]) * xb + m[owner] * p[owner], ctx)
                # the classes' losses summed: each class's trigger gets its own loss's gradient
                ce = (F.cross_entropy(out, target, reduction="none") * weight).sum()
                loss = ce + self.l1_weight * m.sum() / (h * w) * 100
                opt.zero_grad()
                loss.backward()
                opt.step()
                ctx.tick(len(chunk))
            with torch.no_grad():
                m, p = torch.sigmoid(m_logit).cpu(), torch.sigmoid(p_logit).cpu()
            return [(m[k : k + 1], p[k : k + 1]) for k in range(len(chunk))]

        fitted, class_batch = _class_chunks(ctx, list(picks), fit_chunk, min(BATCH, len(fit_idx)))
        norms, flips, masks, patterns = [], [], [], []
        for t in range(ctx.num_classes):
            if t not in fitted:
                norms.append(float("inf"))
                flips.append(Rate(0, 0))
                masks.append(None)
                patterns.append(None)
                continue
            m, p = fitted[t]
            flips.append(_flip(model, (1 - m) * ctx.x[tests[t]] + m * p, t, ctx))
            norms.append(float(m.sum()) / (h * w))
            masks.append(m)
            patterns.append(p)
        finite = [v for v in norms if v != float("inf")]
        indices = [anomaly_index(finite, finite.index(v)) if v != float("inf") else 0.0 for v in norms]
        # the class whose working trigger is smallest relative to the others' triggers
        working = [k for k in range(ctx.num_classes) if (flips[k].value or 0) >= 0.5]
        if working:
            worst = max(working, key=lambda k: indices[k])
        else:
            worst = max(range(ctx.num_classes), key=lambda k: flips[k].value or 0)
        result = ProbeResult(
            self.name,
            self.family,
            worst,
            flips[worst],
            {
                "anomaly_index": indices[worst],
                "mask_l1_fraction": norms[worst],
                "median_mask_l1_fraction": statistics.median(finite) if finite else None,
                "steps_per_class": steps,
                "class_batch": class_batch,
                "per_class": [
                    {
                        "class": k,
                        "mask_l1_fraction": None if norms[k] == float("inf") else norms[k],
                        "anomaly_index": indices[k],
                        "flip_rate": flips[k].value,
                    }
                    for k in range(ctx.num_classes)
                ],
            },
            per_class=[f.value or 0.0 for f in flips],
            per_class_counts=list(flips),
        )
        result.artifacts = {"mask": masks[worst], "pattern": patterns[worst]}  # type: ignore[attr-defined]
        return result


UAP_SCALES = (1.0, 0.5, 0.25)  # each fitted perturbation is also measured at these fractions of its norm


class UniversalPerturbationProbe:
    name = "synth-universal-perturbation"
    family = "synthesised"
    units = staticmethod(class_wise_units)

    def run(self, model: nn.Module, ctx: ProbeContext) -> ProbeResult:
        fit_idx, test_idx = _halves(ctx)
        steps = steps_per_class(ctx.budget_steps, ctx.num_classes)
        gen = torch.Generator().manual_seed(ctx.seed + 1)
        alpha = 2.5 * ctx.radius / steps
        tests, picks = {}, {}
        for t in range(ctx.num_classes):
            fit = _eligible(ctx, fit_idx, t)
            test = _eligible(ctx, test_idx, t)
            if len(fit) and len(test):
                tests[t] = test
                picks[t] = _draw(fit, steps, gen)
        draws = _Draws(picks)

        def fit_chunk(chunk: list[int]) -> list[Tensor]:
            delta = torch.zeros((len(chunk), *ctx.x.shape[1:]), device=ctx.device)
            owner, target, weight = draws.owners(chunk, ctx.device)
            for step in range(steps):
                xb = draws.batch(ctx, chunk, step)
                delta.requires_grad_(True)
                out = _logits(model, (xb + delta[owner]).clamp(0, 1), ctx)
                loss = (F.cross_entropy(out, target, reduction="none") * weight).sum()
                (g,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():  # each class's step and L2 projection on its own delta
                    g_norm = g.flatten(1).norm(dim=1).view(-1, *([1] * (g.dim() - 1)))
                    delta = delta.detach() - alpha * g / (g_norm + 1e-12)
                    n = delta.flatten(1).norm(dim=1).view_as(g_norm)
                    delta = torch.where(n > ctx.radius, delta * (ctx.radius / n), delta)
                ctx.tick(len(chunk))
            delta = delta.cpu()
            return [delta[k : k + 1] for k in range(len(chunk))]

        fitted, class_batch = _class_chunks(ctx, list(picks), fit_chunk, min(BATCH, len(fit_idx)))
        flips, deltas = [], []
        for t in range(ctx.num_classes):
            if t not in fitted:
                flips.append([])
                deltas.append(None)
                continue
            delta = fitted[t]
            flips.append([_flip(model, (ctx.x[tests[t]] + s * delta).clamp(0, 1), t, ctx) for s in UAP_SCALES])
            deltas.append(delta)
        # A model that any small perturbation pushes anywhere (common for small, non-robust models)
        # makes every class reachable at the full radius; the same perturbations scaled down show
        # whether one class stands out. Report the scale where it stands out most.
        by_scale = []
        for i, scale in enumerate(UAP_SCALES):
            rates = [(f[i].value or 0.0) if f else 0.0 for f in flips]
            worst = max(range(ctx.num_classes), key=lambda k: rates[k])
            others = [r for k, r in enumerate(rates) if k != worst]
            median_other = statistics.median(others) if others else 0.0
            by_scale.append((rates[worst] / max(median_other, 0.05), -i, scale, worst, median_other, rates))
        best = max(by_scale)  # the largest separation; on a tie, the larger scale
        _, _, scale, worst, median_other, rates = best
        i = UAP_SCALES.index(scale)
        result = ProbeResult(
            self.name,
            self.family,
            worst,
            flips[worst][i] if flips[worst] else Rate(0, 0),
            {
                "radius": ctx.radius * scale,
                "fitted_radius": ctx.radius,
                "scale": scale,
                "steps_per_class": steps,
                "class_batch": class_batch,
                "median_other_flip_rate": median_other,
                "by_scale": [
                    {"scale": sc, "worst_class": w, "flip_rate": r[w], "median_other_flip_rate": m}
                    for _, _, sc, w, m, r in by_scale
                ],
            },
            per_class=rates,
            per_class_counts=[f[i] if f else Rate(0, 0) for f in flips],
        )
        result.artifacts = {"delta": None if deltas[worst] is None else scale * deltas[worst]}  # type: ignore[attr-defined]
        return result


class WarpPerturbationProbe:
    """A universal warp (the unlearning's warp family, ``unlearn/perturbations.py``) optimised to
    change the model's answers, untargeted, on one half of the held-out images; measured on the
    other half. A warp-triggered backdoor (WaNet) answers a sub-pixel universal warp by sending
    almost every image to its target; a clean model's answers scatter."""

    name = "synth-warp"
    family = "synthesised"
    rms_pixels = 0.5  # bound on the control points' RMS displacement, pixels of a 32-pixel image
    steps = 20

    def units(self, ctx: ProbeContext) -> int:
        return self.steps

    def run(self, model: nn.Module, ctx: ProbeContext) -> ProbeResult:
        fit_idx, test_idx = _halves(ctx)
        warp = Warp.with_rms_pixels(self.rms_pixels, tuple(ctx.x.shape[1:]))
        gen = torch.Generator().manual_seed(ctx.seed + 3)
        alpha = 2.5 * warp.radius / self.steps
        p = warp.zeros(tuple(ctx.x.shape[1:]), ctx.device)
        for _ in range(self.steps):
            pick = fit_idx[torch.randint(len(fit_idx), (min(BATCH, len(fit_idx)),), generator=gen)]
            xb, yb = ctx.x[pick].to(ctx.device), ctx.y[pick].to(ctx.device)
            p.requires_grad_(True)
            loss = F.cross_entropy(_logits(model, warp.apply(xb, p), ctx), yb)
            (g,) = torch.autograd.grad(loss, p)
            with torch.no_grad():
                p = p.detach() + alpha * g / (g.norm() + 1e-12)
                n = p.norm()
                if n > warp.radius:
                    p = p * (warp.radius / n)
            ctx.tick(1)
        with torch.no_grad():
            x_test = torch.cat(
                [
                    warp.apply(ctx.x[test_idx[s : s + BATCH]].to(ctx.device), p).cpu()
                    for s in range(0, len(test_idx), BATCH)
                ]
            )
        pred = predict(model, x_test, ctx)
        counts = class_rates(pred, ctx.y[test_idx], ctx.clean_pred[test_idx], ctx.num_classes)
        worst, rate, rates = worst_class(counts)
        others = [r for k, r in enumerate(rates) if k != worst]
        return ProbeResult(
            self.name,
            self.family,
            worst,
            rate,
            {
                "rms_pixels": self.rms_pixels,
                "radius": warp.radius,
                "steps": self.steps,
                "median_other_flip_rate": statistics.median(others) if others else 0.0,
            },
            per_class=rates,
            per_class_counts=counts,
        )
