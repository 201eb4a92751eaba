"""The I-BAU minimax loop (Zeng et al., ICLR 2022) over a universal pixel-space perturbation.

    min_theta  max_{||delta||_2 <= C}  mean_i CE(f_theta(clip(x_i + delta)), y_i)

Each round: (1) inner maximisation, L2 projected gradient ascent on one universal delta from
zero; (2) outer minimisation, one or more passes of optimiser steps on theta whose gradient is
the direct gradient of the outer loss plus the implicit hypergradient through delta*(theta)
(see ``hypergrad.py``). With a ``target_hint`` (a class the probes suspect), step (1) also finds
the easiest universal delta toward that class (and, given a ``patch_region``, the easiest one
confined to that region) and step (2) alternates between them. Every
departure from the authors' script is listed in docs/algorithm.md.

The model is expected to take pixel inputs in [0, 1] (wrap it with ``preprocess.Normalized``) and
is kept in eval mode throughout: BatchNorm statistics frozen, dropout off; all parameters that
require grad (BatchNorm affine ones included) are trained.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SMALL_SET_CLIP, SMALL_SET_ROUNDS, UnlearnConfig
from ..device import amp_dtype, autocast
from ..frozen import frozen_parameters
from ..progress import NoProgress, Progress
from .attention import with_math_attention
from .augment import clean_views
from .early_stop import ProxyTriggerStop
from .hypergrad import fixed_point_hypergradient
from .perturbations import Additive, Masked, Perturbation, Warp
from .step_back import step_back


@dataclass
class RoundLog:
    round: int
    delta_l2: float
    delta_fooling_rate: float  # fraction of unlearning samples misclassified under delta
    inner_loss: float
    outer_loss: float
    outer_steps: int
    neumann_terms_mean: float
    seconds: float
    evaluation: dict = field(default_factory=dict)


@dataclass
class UnlearnLog:
    rounds: list[RoundLog]
    radius: float
    n_samples: int
    device: str
    amp: str | None
    seconds: float
    inner_seconds: float
    outer_seconds: float
    perturbations: list[dict] = field(default_factory=list)  # the inner problem's families and their bounds
    teacher_views: str = "off"  # the views the teacher term used (teacher_views resolved for this set)
    small_set: bool = False  # whether the small-set schedule ran (config.small_set resolved for this set)
    rounds_planned: int = 0  # the schedule's rounds (config.rounds, doubled on the small-set schedule)
    stopped_after: int | None = (
        None  # the round after which ``stop`` ended the repair (one cool-down round followed); None: it did not
    )
    extension: dict | None = None  # ``extend``'s check after the schedule and what followed; None: no check
    known_trigger_fraction: float | None = None  # share of each batch's clean images stamped; None: none were
    step_back: dict | None = None  # ``step_back``'s measurements and the fraction of the way kept; None: not run


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless stream of index batches: shuffled passes over range(n)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def _share(fraction: float, batch: int) -> int:
    """How many images of a batch a perturbation takes: ``fraction`` of it, at least one."""
    return min(batch, max(1, round(fraction * batch)))


def _project(delta: Tensor, radius: float) -> Tensor:
    norm = delta.norm()
    return delta * (radius / norm) if norm > radius else delta


def _fooling_rate(
    model: nn.Module, family: Perturbation, x: Tensor, y: Tensor, delta: Tensor, bs: int, dev, dtype
) -> float:
    wrong = 0
    with torch.no_grad(), autocast(dev, dtype):
        for s in range(0, len(x), bs):
            xb = x[s : s + bs].to(dev, non_blocking=True)
            pred = model(family.apply(xb, delta)).argmax(1).cpu()
            wrong += int((pred != y[s : s + bs]).sum())
    return wrong / max(len(x), 1)


def _inner_fit(logits: Tensor, y: Tensor, target: int | None) -> Tensor:
    """The inner problem's loss, to be minimised over delta: -CE with the labels (untargeted,
    I-BAU's) or, with ``target``, CE toward that class."""
    if target is None:
        return -F.cross_entropy(logits, y)
    return F.cross_entropy(logits, torch.full_like(y, target))


def _outer_loss(
    logits_adv: Tensor,
    xb: Tensor,
    yb: Tensor,
    idx: Tensor,
    n_adv: int,
    model: nn.Module,
    teacher: Tensor | None,
    teacher_model: nn.Module | None,
    views: str,
    views_gen: torch.Generator,
    dev: torch.device,
    dtype,
) -> Tensor:
    """Cross-entropy with the labels on the first ``n_adv`` (perturbed) images of the batch, plus the
    clean part on the rest: KL to the input model (``teacher``: its outputs on the images, computed
    once; ``teacher_model``: the frozen input model on fresh views) or cross-entropy with labels."""
    if n_adv == len(idx):
        return F.cross_entropy(logits_adv, yb)
    if teacher_model is not None:
        x_clean = clean_views(xb[n_adv:], views, views_gen)
        with torch.no_grad(), autocast(dev, dtype):
            target_clean = teacher_model(x_clean).float().log_softmax(1)
    elif teacher is not None:
        x_clean, target_clean = xb[n_adv:], teacher[idx[n_adv:]].to(dev)
    else:
        x_clean, target_clean = xb[n_adv:], None
    logits_clean = model(x_clean)
    if target_clean is None:
        return F.cross_entropy(torch.cat([logits_adv, logits_clean]), yb)
    kl = F.kl_div(logits_clean.log_softmax(1), target_clean, log_target=True, reduction="sum")
    return (F.cross_entropy(logits_adv, yb[:n_adv], reduction="sum") + kl) / len(idx)


def _inner_max(
    model: nn.Module,
    family: Perturbation,
    x_all: Tensor,
    y_all: Tensor,
    batch_stream: Iterator[Tensor],
    steps: int,
    dev: torch.device,
    dtype,
    progress: Progress,
    target: int | None = None,
) -> tuple[Tensor, float]:
    """Universal perturbation of ``family`` by L2 projected gradient steps from zero: ascent on the
    cross-entropy (untargeted, I-BAU's inner problem) or, with ``target``, descent on the
    cross-entropy toward ``target`` over the images of the other classes."""
    radius = family.radius
    alpha = 2.5 * radius / max(steps, 1)
    delta = family.zeros(tuple(x_all.shape[1:]), dev)
    loss_value = 0.0
    for _ in range(steps):
        idx = next(batch_stream)
        if target is not None:
            idx = idx[y_all[idx] != target]
            if len(idx) == 0:
                continue
        xb, yb = x_all[idx].to(dev), y_all[idx].to(dev)
        delta.requires_grad_(True)
        with autocast(dev, dtype):
            loss = -_inner_fit(model(family.apply(xb, delta)), yb, target)
        (grad,) = torch.autograd.grad(loss, delta)
        loss_value = float(loss.detach())
        with torch.no_grad():
            g = grad.float()
            gnorm = g.norm()
            delta = delta.detach()
            if gnorm > 0:
                delta = _project(delta + alpha * g / gnorm, radius)
        progress.advance()
    return delta.detach(), loss_value


@with_math_attention  # the hypergradient's double backward needs attention's plain kernel
def unlearn(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    config: UnlearnConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
    on_round: Callable[[int, nn.Module], dict] | None = None,
    target_hint: int | None = None,
    stop: Callable[[int, nn.Module], bool] | None = None,
    patch_region: Tensor | None = None,
    extend: ProxyTriggerStop | None = None,
    known_trigger: Callable[[Tensor], Tensor] | None = None,
    step_back_to: ProxyTriggerStop | None = None,
) -> tuple[nn.Module, UnlearnLog]:
    """Run I-BAU on ``model`` in place and return it with a per-round log.

    ``images``: float tensor [N, C, H, W] in [0, 1]; ``labels``: int64 [N]. ``on_round(r, model)``
    may return figures (for instance held-out accuracy) to store in that round's log.
    ``target_hint``: a class suspected to be a backdoor's target (the pipeline passes the probes'
    suspected class); each round then also finds the easiest universal delta toward it, and the
    outer steps alternate between the untargeted and the targeted delta (docs/algorithm.md).
    ``stop(r, model)``: asked after every round but the last two; True ends the repair after one
    more round whose learning rate falls linearly to zero (for instance ``ProxyTriggerStop``, once a
    trigger that worked before no longer does).
    ``config.perturbations``: "additive+warp" adds a universal warp to the inner problem; "auto" is
    "additive" here (the pipeline resolves it from the probes before calling).
    ``patch_region``: [1, 1, H, W] (1 where a patch trigger may sit, 0 elsewhere); with a target
    hint, each round also finds the easiest perturbation toward the hinted class inside that region
    (``Masked``), and ``config.patch_fraction`` of the images of its outer steps get it.
    ``extend``: a trigger that worked before the repair (``ProxyTriggerStop``); with
    ``config.extend = "auto"``, when it still sends more than ``config.extend_flip`` of the images
    to its class once the schedule has run (not stopped early), the schedule runs once more, its
    learning rate restarted, and ``extend`` may stop that second run as ``stop`` stops the first.
    ``known_trigger``: a trigger known to work on the model (pixel space, [0, 1] in and out); every
    outer step also stamps it on ``config.known_trigger_fraction`` of the batch's clean images (at
    least one) and adds their cross-entropy with the true labels: the backdoor's own trigger,
    unlearned directly beside the universal perturbations.
    ``step_back_to``: a trigger that worked before the repair (``ProxyTriggerStop``); once the repair
    is done, the weights go back toward the input model's to the nearest fraction of the way at
    which it stays gone (``step_back.py``). The pipeline passes it where ``config.resolved_step_back``
    says so.
    """
    problems = config.check()
    if problems:
        raise ValueError("invalid UnlearnConfig: " + "; ".join(problems))
    if target_hint is not None and target_hint < 0:
        raise ValueError(f"target_hint must be a class index >= 0, not {target_hint}")
    if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise ValueError("images must be a non-empty [N, C, H, W] tensor with one label each")
    dev = torch.device(device)
    progress = progress or NoProgress()
    dtype = amp_dtype(dev, config.amp)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    model.to(dev)
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    # the input weights, for the step back: on the CPU, not beside the model on the device
    start = None if step_back_to is None else [p.detach().to("cpu", copy=True) for p in params]
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9)

    x_all = images.float()
    y_all = labels.long()
    n = len(x_all)
    bs = min(config.batch_size, n)
    radius = config.resolved_radius(tuple(x_all.shape[1:]))
    families: list[Perturbation] = [Additive(radius)]
    if config.perturbations == "additive+warp":
        families.append(Warp.with_rms_pixels(config.warp_pixels, tuple(x_all.shape[1:])))
    guided = target_hint is not None and bool((y_all != target_hint).any())
    # (family, the targets of its inner problems, steps for each); a patch region is searched toward
    # the hint only, with its own step count (a pattern to find, not a direction)
    inner_problems: list[tuple[Perturbation, list[int | None], int]] = [
        (f, [None, target_hint] if guided else [None], config.inner_steps) for f in families
    ]
    if guided and patch_region is not None:
        region = patch_region.float().to(dev)  # moved once, not at every step that applies it
        inner_problems.append((Masked.covering(region, x_all.shape[1]), [target_hint], config.patch_inner_steps))
    steps_per_round = max(math.ceil(n / bs), config.min_steps_per_round)
    batch_stream = _batches(n, bs, gen)
    # small-set schedule: on a set each round revisits many times, shorter steps over more rounds
    small_set = config.resolved_small_set(n, len(families))
    n_rounds = config.rounds * SMALL_SET_ROUNDS if small_set else config.rounds
    max_grad_norm = config.max_grad_norm
    if small_set and max_grad_norm is not None:
        max_grad_norm *= SMALL_SET_CLIP
    total_steps = steps_per_round * n_rounds
    scheduler = None
    if config.lr_schedule == "cosine" and total_steps > 0:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    teacher = teacher_model = None
    views_gen = torch.Generator().manual_seed(seed + 1)
    views = config.resolved_teacher_views(n) if config.clean_loss == "teacher" else "off"
    if views != "off":
        # a copy of the input model, run without gradients, answers for each fresh view of the clean
        # images (no requires_grad_ on it: TorchScript modules do not support that call)
        teacher_model = copy.deepcopy(model)
    elif config.clean_loss == "teacher":
        with torch.no_grad():
            teacher = torch.cat(
                [model(x_all[s : s + bs].to(dev)).float().log_softmax(1).cpu() for s in range(0, n, bs)]
            )

    rounds: list[RoundLog] = []
    stopped_after = None  # the round after which ``stop`` said the repair is done
    cooldown_lrs: list[float] | None = None  # set for the one round after that: its lr falls to zero
    last_round = n_rounds
    active_stop = stop  # what may end the repair early: ``stop``, then ``extend`` in an extension
    extension: dict | None = None
    t_start = time.perf_counter()
    inner_total = outer_total = 0.0
    n_stamped = 0  # images the known trigger was stamped on (none: a batch all perturbed, or no rounds)
    r = 0
    while r < last_round:
        r += 1
        t_round = time.perf_counter()
        # (1) inner maximisation: universal delta by L2 projected gradient ascent, from zero; with a
        # target hint, also the easiest universal delta toward that class.
        progress.start(f"round {r}/{last_round}: inner", sum(steps * len(t) for _, t, steps in inner_problems))
        deltas, inner_losses = [], []  # (family, perturbation, target): the outer steps cycle through them
        with frozen_parameters(model):  # the inner problem differentiates with respect to delta only
            for family, targets, steps in inner_problems:
                for target in targets:
                    d_k, loss_k = _inner_max(
                        model, family, x_all, y_all, batch_stream, steps, dev, dtype, progress, target
                    )
                    deltas.append((family, d_k, target))
                    inner_losses.append(loss_k)
        delta, inner_loss = deltas[0][1], inner_losses[0]  # the log follows I-BAU's own (untargeted additive)
        fooling = _fooling_rate(model, families[0], x_all, y_all, delta, bs, dev, dtype)
        t_inner = time.perf_counter()
        inner_total += t_inner - t_round

        # (2) outer minimisation with the implicit hypergradient.
        progress.start(f"round {r}/{last_round}: outer", steps_per_round)
        outer_losses, terms = [], []
        for step in range(steps_per_round):
            idx = next(batch_stream)
            xb, yb = x_all[idx].to(dev), y_all[idx].to(dev)
            family_k, delta_k, target_k = deltas[step % len(deltas)]  # the round's perturbations take turns
            fraction = {"warp": config.warp_fraction, "patch": config.patch_fraction}.get(
                family_k.name, config.perturb_fraction
            )
            m = _share(fraction, len(idx))
            d = delta_k.clone().requires_grad_(config.hypergrad)
            logits_adv = model(family_k.apply(xb[:m], d))
            loss_out = _outer_loss(
                logits_adv, xb, yb, idx, m, model, teacher, teacher_model, views, views_gen, dev, dtype
            )
            if known_trigger is not None and m < len(idx):
                # the known trigger on some of the clean images, answered with their true labels (no
                # inner problem: the implicit term has nothing to differentiate through)
                k = m + _share(config.known_trigger_fraction, len(idx) - m)
                stamped = model(known_trigger(xb[m:k]))
                loss_out = loss_out + F.cross_entropy(stamped, yb[m:k], reduction="sum") / len(idx)
                n_stamped += k - m
            if config.hypergrad:
                *direct, g_delta = torch.autograd.grad(loss_out, params + [d], retain_graph=True, allow_unused=True)
                # the implicit term is estimated on as many images as an additive step perturbs: a warp
                # step's larger share then costs one more small forward pass, not 16x the Neumann series
                k = min(m, _share(config.perturb_fraction, len(idx)))
                logits_in = logits_adv if k == m else model(family_k.apply(xb[:k], d))
                loss_in = _inner_fit(logits_in, yb[:k], target_k) + config.inner_penalty * d.pow(2).sum()
                (inner_grad,) = torch.autograd.grad(loss_in, d, create_graph=True)
                implicit, info = fixed_point_hypergradient(
                    inner_grad,
                    d,
                    params,
                    g_delta,
                    eta=config.fixed_point_lr,
                    terms=config.neumann_terms,
                    radius=family_k.radius if config.hypergrad_projection else None,
                )
                terms.append(info.terms_used)
                total = [
                    dg if ig is None else (ig if dg is None else dg + ig)
                    for dg, ig in zip(direct, implicit, strict=True)
                ]
            else:
                total = list(torch.autograd.grad(loss_out, params, allow_unused=True))
            if max_grad_norm is not None:
                norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in total if g is not None))
                if norm > max_grad_norm:
                    total = [None if g is None else g * (max_grad_norm / norm) for g in total]
            for p, g in zip(params, total, strict=True):
                p.grad = None if g is None else g.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cooldown_lrs is not None:
                for group, lr0 in zip(opt.param_groups, cooldown_lrs, strict=True):
                    group["lr"] = lr0 * (1 - (step + 1) / steps_per_round)
            elif scheduler is not None:
                scheduler.step()
            outer_losses.append(float(loss_out.detach()))
            progress.advance()
        t_end = time.perf_counter()
        outer_total += t_end - t_inner
        log = RoundLog(
            round=r,
            delta_l2=float(delta.norm()),
            delta_fooling_rate=fooling,
            inner_loss=inner_loss,
            outer_loss=sum(outer_losses) / len(outer_losses),
            outer_steps=steps_per_round,
            neumann_terms_mean=(sum(terms) / len(terms)) if terms else 0.0,
            seconds=t_end - t_round,
        )
        if on_round is not None:
            log.evaluation = on_round(r, model)
        rounds.append(log)
        if r == last_round:
            if extend is not None and extension is None and stopped_after is None and config.extend == "auto":
                rate = extend.record(r, model)
                extension = {"rate_after_schedule": rate, "threshold": config.extend_flip, "extended": False}
                if rate > config.extend_flip and n_rounds > 0:
                    # the trigger that worked before still works: the schedule once more, from its lr
                    extension.update(extended=True, extra_rounds_planned=n_rounds)
                    last_round, active_stop = r + n_rounds, extend
                    for group in opt.param_groups:
                        group["lr"] = config.lr
                    if config.lr_schedule == "cosine":
                        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
            continue
        if active_stop is not None and stopped_after is None and r < last_round - 1 and active_stop(r, model):
            # one cool-down round still runs, its lr falling linearly to zero as the cosine schedule's
            # tail would: the round where the signal came may sit in a high-lr dip of accuracy
            stopped_after, last_round = r, r + 1
            cooldown_lrs = [group["lr"] for group in opt.param_groups]
    stepped = None
    if start is not None and step_back_to is not None:
        stepped = step_back(model, params, start, step_back_to)
    progress.finish()
    return model, UnlearnLog(
        rounds=rounds,
        radius=radius,
        n_samples=n,
        device=str(dev),
        amp=None if dtype is None else str(dtype).replace("torch.", ""),
        seconds=time.perf_counter() - t_start,
        inner_seconds=inner_total,
        outer_seconds=outer_total,
        perturbations=[
            {"family": f.name, "radius": f.radius, **({"pixels": int(f.region.sum())} if isinstance(f, Masked) else {})}
            for f, _, _ in inner_problems
        ],
        teacher_views=views,
        small_set=small_set,
        rounds_planned=n_rounds,
        stopped_after=stopped_after,
        extension=extension,
        known_trigger_fraction=config.known_trigger_fraction if n_stamped else None,
        step_back=stepped,
    )
