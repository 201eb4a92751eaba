"""The I-BAU minimax loop (Zeng et al., ICLR 2022) over a universal pixel-space perturbation.

    min_theta  max_{||delta||_2 <= C}  mean_i CE(f_theta(clip(x_i + delta)), y_i)

Each round: (1) inner maximisation, L2 projected gradient ascent on one universal delta from
zero; (2) outer minimisation, one or more passes of optimiser steps on theta whose gradient is
the direct gradient of the outer loss plus the implicit hypergradient through delta*(theta)
(see ``hypergrad.py``). With a ``target_hint`` (a class the probes suspect), step (1) also finds
the easiest universal delta toward that class and step (2) alternates between the two. Every
departure from the authors' script is listed in docs/algorithm.md.

The model is expected to take pixel inputs in [0, 1] (wrap it with ``preprocess.Normalized``) and
is kept in eval mode throughout: BatchNorm statistics frozen, dropout off; all parameters that
require grad (BatchNorm affine ones included) are trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import UnlearnConfig
from ..device import amp_dtype, autocast
from ..progress import NoProgress, Progress
from .hypergrad import fixed_point_hypergradient


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


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless stream of index batches: shuffled passes over range(n)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def _project(delta: Tensor, radius: float) -> Tensor:
    norm = delta.norm()
    return delta * (radius / norm) if norm > radius else delta


def _fooling_rate(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor, bs: int, dev, dtype) -> float:
    wrong = 0
    with torch.no_grad(), autocast(dev, dtype):
        for s in range(0, len(x), bs):
            xb = x[s : s + bs].to(dev, non_blocking=True)
            pred = model((xb + delta).clamp(0, 1)).argmax(1).cpu()
            wrong += int((pred != y[s : s + bs]).sum())
    return wrong / max(len(x), 1)


def _inner_fit(logits: Tensor, y: Tensor, target: int | None) -> Tensor:
    """The inner problem's loss, to be minimised over delta: -CE with the labels (untargeted,
    I-BAU's) or, with ``target``, CE toward that class."""
    if target is None:
        return -F.cross_entropy(logits, y)
    return F.cross_entropy(logits, torch.full_like(y, target))


def _inner_max(
    model: nn.Module,
    x_all: Tensor,
    y_all: Tensor,
    batch_stream: Iterator[Tensor],
    config: UnlearnConfig,
    radius: float,
    alpha: float,
    dev: torch.device,
    dtype,
    progress: Progress,
    target: int | None = None,
) -> tuple[Tensor, float]:
    """Universal delta by L2 projected gradient steps from zero: ascent on the cross-entropy
    (untargeted, I-BAU's inner problem) or, with ``target``, descent on the cross-entropy toward
    ``target`` over the images of the other classes."""
    delta = torch.zeros((1, *x_all.shape[1:]), device=dev)
    loss_value = 0.0
    for _ in range(config.inner_steps):
        idx = next(batch_stream)
        if target is not None:
            idx = idx[y_all[idx] != target]
            if len(idx) == 0:
                continue
        xb, yb = x_all[idx].to(dev), y_all[idx].to(dev)
        delta.requires_grad_(True)
        with autocast(dev, dtype):
            loss = -_inner_fit(model((xb + delta).clamp(0, 1)), yb, target)
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
) -> tuple[nn.Module, UnlearnLog]:
    """Run I-BAU on ``model`` in place and return it with a per-round log.

    ``images``: float tensor [N, C, H, W] in [0, 1]; ``labels``: int64 [N]. ``on_round(r, model)``
    may return figures (for instance held-out accuracy) to store in that round's log.
    ``target_hint``: a class suspected to be a backdoor's target (the pipeline passes the probes'
    suspected class); each round then also finds the easiest universal delta toward it, and the
    outer steps alternate between the untargeted and the targeted delta (docs/algorithm.md).
    """
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
    if config.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr)
    else:
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9)

    x_all = images.float()
    y_all = labels.long()
    n = len(x_all)
    bs = min(config.batch_size, n)
    radius = config.resolved_radius(tuple(x_all.shape[1:]))
    alpha = 2.5 * radius / max(config.inner_steps, 1)
    steps_per_round = max(math.ceil(n / bs), config.min_steps_per_round)
    batch_stream = _batches(n, bs, gen)
    total_steps = steps_per_round * config.rounds
    scheduler = None
    if config.lr_schedule == "cosine" and total_steps > 0:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    teacher = None
    if config.clean_loss == "teacher":
        with torch.no_grad():
            teacher = torch.cat(
                [model(x_all[s : s + bs].to(dev)).float().log_softmax(1).cpu() for s in range(0, n, bs)]
            )

    rounds: list[RoundLog] = []
    t_start = time.perf_counter()
    inner_total = outer_total = 0.0
    for r in range(1, config.rounds + 1):
        t_round = time.perf_counter()
        # (1) inner maximisation: universal delta by L2 projected gradient ascent, from zero; with a
        # target hint, also the easiest universal delta toward that class.
        progress.start(f"round {r}/{config.rounds}: inner", config.inner_steps * (1 if target_hint is None else 2))
        delta, inner_loss = _inner_max(model, x_all, y_all, batch_stream, config, radius, alpha, dev, dtype, progress)
        deltas = [(delta, None)]
        if target_hint is not None and bool((y_all != target_hint).any()):
            d_t, _ = _inner_max(
                model, x_all, y_all, batch_stream, config, radius, alpha, dev, dtype, progress, target=target_hint
            )
            deltas.append((d_t, target_hint))
        fooling = _fooling_rate(model, x_all, y_all, delta, bs, dev, dtype)
        t_inner = time.perf_counter()
        inner_total += t_inner - t_round

        # (2) outer minimisation with the implicit hypergradient.
        progress.start(f"round {r}/{config.rounds}: outer", steps_per_round)
        outer_losses, terms = [], []
        for step in range(steps_per_round):
            idx = next(batch_stream)
            xb, yb = x_all[idx].to(dev), y_all[idx].to(dev)
            m = max(1, round(config.perturb_fraction * len(idx)))
            delta_k, target_k = deltas[step % len(deltas)]
            d = delta_k.clone().requires_grad_(config.hypergrad)
            logits_adv = model((xb[:m] + d).clamp(0, 1))
            if m == len(idx):
                loss_out = F.cross_entropy(logits_adv, yb)
            else:
                logits_clean = model(xb[m:])
                if teacher is None:
                    loss_out = F.cross_entropy(torch.cat([logits_adv, logits_clean]), yb)
                else:
                    kl = F.kl_div(
                        logits_clean.log_softmax(1), teacher[idx[m:]].to(dev), log_target=True, reduction="sum"
                    )
                    loss_out = (F.cross_entropy(logits_adv, yb[:m], reduction="sum") + kl) / len(idx)
            if config.hypergrad:
                *direct, g_delta = torch.autograd.grad(loss_out, params + [d], retain_graph=True, allow_unused=True)
                loss_in = _inner_fit(logits_adv, yb[:m], target_k) + config.inner_penalty * d.pow(2).sum()
                (inner_grad,) = torch.autograd.grad(loss_in, d, create_graph=True)
                implicit, info = fixed_point_hypergradient(
                    inner_grad,
                    d,
                    params,
                    g_delta,
                    eta=config.fixed_point_lr,
                    terms=config.neumann_terms,
                    radius=radius if config.hypergrad_projection else None,
                )
                terms.append(info.terms_used)
                total = [
                    dg if ig is None else (ig if dg is None else dg + ig)
                    for dg, ig in zip(direct, implicit, strict=True)
                ]
            else:
                total = list(torch.autograd.grad(loss_out, params, allow_unused=True))
            if config.max_grad_norm is not None:
                norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in total if g is not None))
                if norm > config.max_grad_norm:
                    total = [None if g is None else g * (config.max_grad_norm / norm) for g in total]
            for p, g in zip(params, total, strict=True):
                p.grad = None if g is None else g.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if scheduler is not None:
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
    )
