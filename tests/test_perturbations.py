"""The inner problem's perturbation families: what they do to an image, their bounds, and that the
implicit hypergradient can differentiate through them twice."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ibau_cli.unlearn import fixed_point_hypergradient
from ibau_cli.unlearn.perturbations import Additive, Warp, bilinear_border_sample


def _images(n: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_zero_warp_is_the_identity_and_a_one_pixel_flow_shifts_the_image():
    x = _images()
    warp = Warp(radius=1.0)
    p = warp.zeros(tuple(x.shape[1:]), torch.device("cpu"))
    assert p.shape == (1, 2, 4, 4)
    torch.testing.assert_close(warp.apply(x, p), x, atol=1e-5, rtol=0)
    right = p.clone()
    right[:, 0] = 1.0  # sample one pixel to the right everywhere
    shifted = warp.apply(x, right)
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted[..., -1], x[..., -1], atol=1e-5, rtol=0)  # border replicated
    down = p.clone()
    down[:, 1] = 2.0
    torch.testing.assert_close(warp.apply(x, down)[..., :-2, :], x[..., 2:, :], atol=1e-5, rtol=0)


def test_warp_bound_is_a_root_mean_square_displacement_scaled_with_the_image():
    assert math.isclose(Warp.with_rms_pixels(1.0, (3, 32, 32)).radius, math.sqrt(32))
    assert math.isclose(Warp.with_rms_pixels(1.0, (3, 224, 224)).radius, 7 * math.sqrt(32))
    p = torch.full((1, 2, 4, 4), 0.5)  # every control point moves 0.5 px each way
    assert math.isclose(float(p.norm()), Warp.with_rms_pixels(0.5, (3, 32, 32)).radius, rel_tol=1e-6)


def test_additive_family_clips_to_the_pixel_range():
    x = _images()
    fam = Additive(radius=10.0)
    p = fam.zeros(tuple(x.shape[1:]), torch.device("cpu")) + 0.7
    out = fam.apply(x, p)
    assert out.max() <= 1 and torch.equal(out, (x + 0.7).clamp(0, 1))


def test_warp_is_twice_differentiable_for_the_hypergradient():
    x = _images(2, 8, 8).double()
    p = (0.3 * torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))).double().requires_grad_()
    warp = Warp(radius=5.0)
    assert torch.autograd.gradgradcheck(lambda q: warp.apply(x, q).pow(2).sum(), (p,))
    # the fixed-point hypergradient through a warp-parameterised inner problem: finite, non-zero
    conv = torch.nn.Conv2d(3, 4, 3).double()
    params = list(conv.parameters())
    loss_in = -conv(warp.apply(x, p)).tanh().pow(2).mean()
    (inner_grad,) = torch.autograd.grad(loss_in, p, create_graph=True)
    outer_grad = torch.ones_like(p)
    implicit, info = fixed_point_hypergradient(inner_grad, p, params, outer_grad, eta=0.1, terms=5, radius=5.0)
    assert info.terms_used >= 1
    assert all(g is not None and torch.isfinite(g).all() for g in implicit)
    assert sum(float(g.abs().sum()) for g in implicit) > 0


def _warp_trigger(x: torch.Tensor) -> torch.Tensor:
    """A fixed smooth warp (4 x 4 control grid, 1.5 px RMS): a WaNet-style trigger for the
    synthetic textures, which are smoother than photographs and need a larger warp to be learnt."""
    field = torch.rand(1, 2, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    field = field * (1.5 / field.pow(2).mean().sqrt())
    return Warp(radius=100.0).apply(x, field).clamp(0, 1)


@pytest.mark.slow
def test_a_warp_backdoor_is_flagged_by_the_synthesised_warp_and_repaired_with_the_warp_family(tmp_path):
    """A real small CNN trained with a warp trigger on the synthetic data; ``ibau sanitize`` with no
    --trigger: the synthesised universal warp names class 0, the inner problem adds the warp family,
    and the true trigger's ASR on 1,000 images ibau never saw falls."""
    from conftest import run_cli
    from ibau_cli.demo import TARGET, synthetic_images, train_backdoored, write_image_folder
    from ibau_cli.formats import save_model
    from ibau_cli.preprocess import Preprocess

    trained = train_backdoored(seed=3, trigger_fn=_warp_trigger, poison_ratio=0.2, n_train=2000)
    assert trained.clean_acc > 0.9 and trained.asr > 0.9, (trained.clean_acc, trained.asr)
    model = tmp_path / "warp.safetensors"
    save_model(trained.model, model, fmt="safetensors", arch="small-cnn", num_classes=10, preprocess=Preprocess())
    x, y = synthetic_images(300, seed=777)
    write_image_folder(x, y, tmp_path / "clean")
    out = tmp_path / "fixed.safetensors"
    budget = ["--set", "probes.budget_steps=120"]  # the warp probe's own steps are not part of this budget
    res = run_cli("sanitize", model, "--clean", tmp_path / "clean", "--out", out, "--json", "-q", *budget, probes=True)
    assert res.returncode in (0, 1), res.stderr
    report = json.loads(res.stdout)
    warp_probe = next(p for p in report["probes"]["before"]["probes"] if p["name"] == "synth-warp")
    assert warp_probe["worst_class"] == TARGET and warp_probe["flip_rate"]["value"] > 0.5, warp_probe
    # every probe reports its own wall time, and they add up to no more than the suite's
    suite = report["probes"]["before"]
    assert (
        all(p["seconds"] >= 0 for p in suite["probes"])
        and sum(p["seconds"] for p in suite["probes"]) <= suite["seconds"]
    )
    assert [p["family"] for p in report["unlearning"]["perturbations"]] == ["additive", "warp"]
    from ibau_cli.formats import load_model

    fixed = load_model(out).module.eval()
    x_eval, y_eval = synthetic_images(1000, seed=31337)
    keep = y_eval != TARGET
    with torch.no_grad():
        acc = float((fixed(x_eval).argmax(1) == y_eval).float().mean())
        asr = float((fixed(_warp_trigger(x_eval[keep])).argmax(1) == TARGET).float().mean())
    assert asr < 0.2 and acc > trained.clean_acc - 0.05, (trained.asr, asr, trained.clean_acc, acc)


@pytest.mark.parametrize("size", [(32, 32), (28, 28), (5, 9), (1, 6)])
def test_warp_sampler_matches_grid_sample(size: tuple[int, int]) -> None:
    h, w = size
    gen = torch.Generator().manual_seed(h * 100 + w)
    x = torch.rand(3, 3, h, w, generator=gen, requires_grad=True)
    grid = (torch.rand(1, h, w, 2, generator=gen) * 2.4 - 1.2).requires_grad_(True)  # past the border too
    ours = bilinear_border_sample(x, grid)
    ref = F.grid_sample(x, grid.expand(3, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True)
    assert torch.allclose(ours, ref, atol=1e-6)
    g_ours = torch.autograd.grad(ours.pow(2).sum(), [x, grid])
    g_ref = torch.autograd.grad(ref.pow(2).sum(), [x, grid])
    assert torch.allclose(g_ours[0], g_ref[0], atol=1e-5)
    assert torch.allclose(g_ours[1], g_ref[1], atol=1e-4)


def _graph_ops(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions]
    return names


def test_warp_is_twice_differentiable_without_grid_sampler() -> None:
    # the implicit hypergradient differentiates d(loss)/d(flow) again; CUDA's grid_sampler has no
    # derivative for its backward (found on an H100), so the warp must not go through it
    warp = Warp.with_rms_pixels(0.5, (3, 32, 32))
    x = torch.rand(4, 3, 32, 32)
    p = (torch.randn(1, 2, warp.k, warp.k) * 0.3).requires_grad_(True)
    out = warp.apply(x, p)
    (g,) = torch.autograd.grad(out.pow(2).sum(), p, create_graph=True)
    assert not any("GridSampler" in name for name in _graph_ops(g))
    (h,) = torch.autograd.grad(g.pow(2).sum(), p)
    assert torch.isfinite(h).all() and h.abs().sum() > 0


def test_full_precision_turns_tf32_off_and_restores_it() -> None:
    from ibau_cli.device import full_precision

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_precision():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_the_patch_family_moves_only_its_region_and_the_region_follows_a_patch_probe():
    """The patch family (0.3.8): a perturbation confined to the region around the fixed patch probe
    that named the class, large enough for every pixel there to take any value; a probe that paints
    the whole image (a blend) gives no region."""
    from ibau_cli.probes import PROBES, patch_region
    from ibau_cli.unlearn.perturbations import Masked

    def region_of(name: str):
        probe = PROBES.get(name)
        return patch_region(lambda v: probe.transform(v, torch.Generator().manual_seed(0)), (3, 32, 32))

    region = region_of("patch-checker-br-10%")  # a 3x3 patch 1 px from the corner, grown by 3 px
    assert region is not None and region.shape == (1, 1, 32, 32)
    assert region[0, 0, -1, -1] == 1 and region[0, 0, 0, 0] == 0 and region[0, 0, 16, 16] == 0
    assert 9 < int(region.sum()) <= 0.25 * 32 * 32
    assert region_of("blend-noise-0.1") is None
    family = Masked.covering(region, channels=3)
    assert family.radius == pytest.approx((3 * float(region.sum())) ** 0.5)
    x = torch.full((2, 3, 32, 32), 0.5)
    p = torch.ones((1, 3, 32, 32))
    out = family.apply(x, p)
    inside = region.bool().expand_as(out)
    assert torch.equal(out[~inside], x[~inside]) and torch.all(out[inside] == 1.0)
