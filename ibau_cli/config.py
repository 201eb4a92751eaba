"""Typed settings, TOML presets and layering. Unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .preprocess import Preprocess

TEACHER_VIEWS = ("auto", "off", "shift", "shift-flip", "mix")
VIEWS_BELOW = 1000  # teacher_views = "auto": shift-flip views below this many unlearning images, none from it
PERTURBATIONS = ("auto", "additive", "additive+warp")
# small_set = "auto": a set this many times smaller than one round's outer images (batch_size x
# min_steps_per_round) is revisited so often that the full step costs accuracy; see docs/algorithm.md
SMALL_SET_PASSES = 4
SMALL_SET_CLIP = 0.3  # ... so the gradient clip is scaled by this
SMALL_SET_ROUNDS = 2  # ... and the rounds multiplied by this
# upper bounds: a value past these is a typo (10**9 rounds would run for years), not a setting
MOST = {
    "rounds": 1000,
    "min_steps_per_round": 100_000,
    "inner_steps": 10_000,
    "patch_inner_steps": 10_000,
    "neumann_terms": 1000,
    "batch_size": 65_536,
}
EARLY_STOP_PATIENCE = 2  # early_stop: rounds in a row the proxy trigger must have stopped working


@dataclass(frozen=True)
class UnlearnConfig:
    """I-BAU hyper-parameters. See docs/algorithm.md for each choice and its measurement."""

    rounds: int = 5
    batch_size: int = 64
    min_steps_per_round: int = 10
    inner_steps: int = 10
    radius: float | None = None  # L2 bound on delta in pixel space; None: 10 * sqrt(d / 3072)
    inner_penalty: float = 0.001
    perturb_fraction: float = 0.02
    hypergrad: bool = True
    hypergrad_projection: bool = True  # differentiate the inner solver's projection onto the ball
    perturbations: str = "auto"  # inner problem families: "additive" (I-BAU's), "additive+warp", or "auto"
    warp_pixels: float = 1.0  # warp family: RMS displacement bound of its control points, pixels per 32
    warp_fraction: float = 0.5  # warp family: share of an outer batch given the warp (at least one image)
    patch: str = "auto"  # "auto": also search the region of the fixed patch probe that named the guided class; "off"
    patch_fraction: float = 0.2  # patch family: share of an outer batch given the region's perturbation
    patch_inner_steps: int = 30  # patch family: its inner problem's steps (a pattern to find, not a direction)
    guide: str = "probes"  # "probes": also unlearn a perturbation toward the class the probes suspect; "off"
    known_trigger: str = "auto"  # "auto": a given trigger that works is also unlearned directly; "off"
    known_trigger_fraction: float = 0.1  # ... stamped on this share of each outer batch's clean images, true labels
    clean_loss: str = "teacher"  # "labels": cross-entropy; "teacher": KL to the input model's outputs
    teacher_views: str = "off"  # teacher term on fresh views of the clean images: off, shift, shift-flip, mix
    small_set: str = "auto"  # "auto": shorter steps and twice the rounds on tiny additive-only sets; "on"; "off"
    early_stop: str = "auto"  # "probes": stop once the fixed probe that named the guided class stops working; "auto": so on the small-set schedule only; "off"
    early_stop_flip: float = 0.02  # ... working: it sends more than this share of the unlearning images to the class
    extend: str = (
        "auto"  # "auto": a guided repair whose patch proxy trigger still works after the schedule runs it again; "off"
    )
    extend_flip: float = 0.1  # ... still works: it sends more than this share of the unlearning images to the class
    step_back: str = "auto"  # "on": after a guided repair, the weights go back toward the input's while the proxy trigger stays gone; "auto": so on the small-set schedule only; "off"
    neumann_terms: int = 5
    fixed_point_lr: float = 0.1
    optimizer: str = "sgd"
    lr: float = 0.03
    lr_schedule: str = "cosine"  # "constant" or "cosine" (decays to 0 over all outer steps)
    max_grad_norm: float | None = 1.0  # clip the total (direct + implicit) gradient norm
    amp: str = "auto"

    def resolved_radius(self, shape: tuple[int, ...]) -> float:
        if self.radius is not None:
            return float(self.radius)
        return 10.0 * math.sqrt(math.prod(shape) / 3072.0)

    def resolved_teacher_views(self, n_samples: int) -> str:
        if self.teacher_views != "auto":
            return self.teacher_views
        return "shift-flip" if n_samples < VIEWS_BELOW else "off"

    def resolved_small_set(self, n_samples: int, families: int) -> bool:
        """Whether the small-set schedule applies: ``"on"``, or ``"auto"`` with an additive-only inner
        problem (warp steps are augmentation-like and were measured to need the full step) and a
        set that one round would pass over at least SMALL_SET_PASSES times."""
        if self.small_set == "on":
            return True
        return (
            self.small_set == "auto"
            and families == 1
            and n_samples * SMALL_SET_PASSES <= self.batch_size * self.min_steps_per_round
        )

    def resolved_early_stop(self, n_samples: int) -> bool:
        """Whether a guided repair may stop early: ``"probes"``, or ``"auto"`` where the small-set
        schedule runs (on larger sets stopping after round 2-3 of 5 cost accuracy: docs/algorithm.md).
        ``perturbations`` is the resolved family choice ("additive+warp" is two families)."""
        if self.early_stop != "auto":
            return self.early_stop == "probes"
        return self.resolved_small_set(n_samples, 2 if self.perturbations == "additive+warp" else 1)

    def resolved_step_back(self, n_samples: int) -> bool:
        """Whether a guided repair's weights may step back toward the input model's (``step_back.py``):
        ``"on"``, or ``"auto"`` where the small-set schedule runs (at 2,500 images it gained 0.2-1.3
        points of accuracy and raised BadNets' ASR from 1.8 to 3.4 %: docs/algorithm.md)."""
        if self.step_back != "auto":
            return self.step_back == "on"
        return self.resolved_small_set(n_samples, 2 if self.perturbations == "additive+warp" else 1)

    def check(self) -> list[str]:
        p = []
        if self.small_set not in ("auto", "on", "off"):
            p.append(f"unlearn.small_set must be 'auto', 'on' or 'off', not {self.small_set!r}")
        for name in ("batch_size", "neumann_terms"):
            if getattr(self, name) < 1:
                p.append(f"unlearn.{name} must be >= 1")
        for name in ("rounds", "min_steps_per_round"):
            if getattr(self, name) < 0:
                p.append(f"unlearn.{name} must be >= 0")
        for name, most in MOST.items():
            if getattr(self, name) > most:
                p.append(f"unlearn.{name} = {getattr(self, name)} is past {most}, far beyond any measured use")
        if self.patch_inner_steps < 1:
            p.append("unlearn.patch_inner_steps must be >= 1")
        if self.inner_steps < 1:
            p.append("unlearn.inner_steps must be >= 1 (0 leaves the perturbation at zero: plain fine-tuning)")
        for name in ("perturb_fraction", "warp_fraction", "patch_fraction", "known_trigger_fraction"):
            if not 0 < getattr(self, name) <= 1:
                p.append(f"unlearn.{name} must be in (0, 1]")
        if self.radius is not None and self.radius <= 0:
            p.append("unlearn.radius must be > 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append("unlearn.max_grad_norm must be > 0 (or unset for no clipping)")
        if self.lr <= 0 or self.fixed_point_lr <= 0:
            p.append("unlearn.lr and unlearn.fixed_point_lr must be > 0")
        if self.lr_schedule not in ("constant", "cosine"):
            p.append(f"unlearn.lr_schedule must be 'constant' or 'cosine', not {self.lr_schedule!r}")
        if self.clean_loss not in ("labels", "teacher"):
            p.append(f"unlearn.clean_loss must be 'labels' or 'teacher', not {self.clean_loss!r}")
        if self.early_stop not in ("auto", "probes", "off"):
            p.append(f"unlearn.early_stop must be 'auto', 'probes' or 'off', not {self.early_stop!r}")
        if not 0 <= self.early_stop_flip < 1:
            p.append("unlearn.early_stop_flip must be in [0, 1)")
        if self.extend not in ("auto", "off"):
            p.append(f"unlearn.extend must be 'auto' or 'off', not {self.extend!r}")
        if not 0 <= self.extend_flip < 1:
            p.append("unlearn.extend_flip must be in [0, 1)")
        if self.step_back not in ("auto", "on", "off"):
            p.append(f"unlearn.step_back must be 'auto', 'on' or 'off', not {self.step_back!r}")
        if self.teacher_views not in TEACHER_VIEWS:
            p.append(f"unlearn.teacher_views must be one of {', '.join(TEACHER_VIEWS)}, not {self.teacher_views!r}")
        if self.perturbations not in PERTURBATIONS:
            p.append(f"unlearn.perturbations must be one of {', '.join(PERTURBATIONS)}, not {self.perturbations!r}")
        if self.warp_pixels <= 0:
            p.append("unlearn.warp_pixels must be > 0")
        if self.patch not in ("auto", "off"):
            p.append(f"unlearn.patch must be 'auto' or 'off', not {self.patch!r}")
        if self.known_trigger not in ("auto", "off"):
            p.append(f"unlearn.known_trigger must be 'auto' or 'off', not {self.known_trigger!r}")
        if self.guide not in ("probes", "off"):
            p.append(f"unlearn.guide must be 'probes' or 'off', not {self.guide!r}")
        if self.optimizer not in ("adam", "sgd"):
            p.append(f"unlearn.optimizer must be 'adam' or 'sgd', not {self.optimizer!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            p.append(f"unlearn.amp must be auto, off, bf16 or fp16, not {self.amp!r}")
        return p


@dataclass(frozen=True)
class SplitConfig:
    holdout: float = 0.2

    def check(self) -> list[str]:
        return [] if 0 < self.holdout < 1 else ["split.holdout must be in (0, 1)"]


GATE_BASES = ("estimate", "upper95")


@dataclass(frozen=True)
class GateConfig:
    max_asr: float = 0.2
    max_acc_drop: float = 0.05
    min_clean_acc: float | None = None  # None: chance + 25 % of the way to 1
    min_samples: int = 10  # a true-trigger ASR or accuracy gate measured on fewer held-out images fails
    strict: bool = False  # a gate that could not be evaluated (not_evaluated) fails the run too
    # what the accuracy-drop and true-trigger ASR gates compare with their limit: the measured figure
    # ("estimate") or its 95 % upper bound ("upper95": only what the held-out images show within the limit passes)
    basis: str = "estimate"

    def check(self) -> list[str]:
        p = []
        if self.min_samples < 0:
            p.append("gate.min_samples must be >= 0")
        if self.basis not in GATE_BASES:
            p.append(f"gate.basis must be one of {', '.join(GATE_BASES)}")
        for name in ("max_asr", "max_acc_drop"):
            if not 0 <= getattr(self, name) <= 1:
                p.append(f"gate.{name} must be a fraction in [0, 1]")
        if self.min_clean_acc is not None and not 0 <= self.min_clean_acc <= 1:
            p.append("gate.min_clean_acc must be a fraction in [0, 1]")
        return p

    def resolved_min_clean_acc(self, num_classes: int) -> float:
        if self.min_clean_acc is not None:
            return self.min_clean_acc
        chance = 1.0 / max(num_classes, 1)
        return chance + 0.25 * (1.0 - chance)


# probes.class_batch left unset: on CUDA as many classes per optimisation step as keep the step's batch
# at or under this many input values (1,024 32x32 RGB images: 16 classes of 64 images); on a CPU one
# class at a time (batching gave no gain there: 0.6x on 2 cores, benchmarks/probe_batch_speed.py).
PROBE_CLASS_BATCH_VALUES = 1024 * 3 * 32 * 32


def cuda_class_batch(image_shape: tuple[int, ...], per_class: int = 64) -> int:
    """Classes per synthesised-probe step on CUDA when ``probes.class_batch`` is unset."""
    return max(1, PROBE_CLASS_BATCH_VALUES // max(per_class * math.prod(image_shape), 1))


@dataclass(frozen=True)
class ProbesConfig:
    """Built-in trigger probes (docs/probes.md)."""

    enabled: bool = True
    budget_steps: int = 600  # optimisation steps per synthesised probe, split over the classes
    radius: float | None = None  # L2 bound of the synthesised universal perturbation; None: 0.3 x unlearn radius
    class_batch: int | None = None  # classes fitted in one batch; None: 1 on a CPU, ~1,024 32x32 images a step on CUDA

    def check(self) -> list[str]:
        p = []
        if self.budget_steps < 1:
            p.append("probes.budget_steps must be >= 1")
        elif self.budget_steps > 1_000_000:
            p.append(f"probes.budget_steps = {self.budget_steps} is past 1000000, far beyond any measured use")
        if self.class_batch is not None and self.class_batch < 1:
            p.append("probes.class_batch must be >= 1")
        if self.radius is not None and self.radius <= 0:
            p.append("probes.radius must be > 0")
        return p


@dataclass(frozen=True)
class Settings:
    preprocess: Preprocess = field(default_factory=Preprocess)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    seed: int = 0

    def image_shape(self) -> tuple[int, int, int]:
        return (self.preprocess.channels, *self.preprocess.input_size)

    def resolved_probe_radius(self, shape: tuple[int, ...]) -> float:
        """probes.radius, or 0.3 x the unlearning radius for images of ``shape``."""
        if self.probes.radius is not None:
            return float(self.probes.radius)
        return 0.3 * self.unlearn.resolved_radius(shape)

    def automatic_values(self, num_classes: int | None) -> dict[str, str]:
        """For each key left unset (automatic), what it resolves to for this preprocessing and class
        count, and the rule (``ibau config show`` prints these)."""
        shape = self.image_shape()
        size = "x".join(map(str, shape))
        floor = "chance + 25 % of the way to 1"
        return {
            "unlearn.radius": f"{self.unlearn.resolved_radius(shape):.4g} for {size} images: 10 x sqrt(pixels / 3072)",
            "probes.radius": f"{self.resolved_probe_radius(shape):.4g} for {size} images: 0.3 x unlearn.radius",
            "probes.class_batch": f"1 on a CPU; {cuda_class_batch(shape)} on CUDA for {size} images "
            "(~1,024 32x32 images a step)",
            "gate.min_clean_acc": f"{floor}: {self.gate.resolved_min_clean_acc(num_classes):.4g} for {num_classes} classes"
            if num_classes
            else f"{floor}, from the model's class count",
        }

    def to_dict(self) -> dict:
        return {
            "preprocess": self.preprocess.to_dict(),
            "unlearn": dataclasses.asdict(self.unlearn),
            "split": dataclasses.asdict(self.split),
            "gate": dataclasses.asdict(self.gate),
            "probes": dataclasses.asdict(self.probes),
            "seed": self.seed,
        }

    def check(self) -> None:
        problems = (
            self.preprocess.check()
            + self.unlearn.check()
            + self.split.check()
            + self.gate.check()
            + self.probes.check()
        )
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))


_SECTIONS = {
    "preprocess": Preprocess,
    "unlearn": UnlearnConfig,
    "split": SplitConfig,
    "gate": GateConfig,
    "probes": ProbesConfig,
}


def _coerce(section: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    key = f"{section}.{f.name}"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    type_text = str(f.type)
    if value is None or (
        "None" in type_text and isinstance(value, str) and value.strip().lower() in OPTIONAL_UNSET
    ):  # TOML has no null: an optional key goes back to automatic (or off) with "auto" or "none"
        if "None" in type_text:
            return None
        raise ConfigError(f"{source}: {key} cannot be empty")
    if isinstance(default, tuple) or "tuple" in type_text:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
        ):
            raise ConfigError(f"{source}: {key} must be a list of finite numbers, not {value!r}")
        if "int" in type_text and "float" not in type_text:
            if not all(float(v).is_integer() for v in value):
                raise ConfigError(f"{source}: {key} must be a list of integers, not {value!r}")
            return tuple(int(v) for v in value)
        return tuple(float(v) for v in value)
    if "bool" in type_text:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, not {value!r}")
        return value
    if "float" in type_text:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, not {value!r}")
        if not math.isfinite(value):  # nan slips through every `x <= 0` check; inf bounds nothing
            raise ConfigError(f"{source}: {key} must be a finite number, not {value!r}")
        return float(value)
    if "int" in type_text:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, not {value!r}")
        return value
    if "str" in type_text:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, not {value!r}")
        return value
    return value


# Keys whose unset value is not derived but means something of its own (config show says what).
UNSET_MEANS = {"unlearn.max_grad_norm": "no clipping"}
OPTIONAL_UNSET = ("auto", "none")  # the strings that unset a key whose default is automatic (None)
MAX_SEED = 2**32 - 1  # what every random generator ibau seeds (torch, numpy) accepts


def apply_layer(settings: Settings, layer: dict[str, Any], source: str) -> Settings:
    """Overlay one layer (a parsed TOML table or flag values) onto ``settings``."""
    updates: dict[str, Any] = {}
    for section, values in layer.items():
        if section == "seed":
            if isinstance(values, bool) or not isinstance(values, int):
                raise ConfigError(f"{source}: seed must be an integer, not {values!r}")
            if not 0 <= values <= MAX_SEED:
                raise ConfigError(f"{source}: seed must be between 0 and {MAX_SEED}, not {values}")
            updates["seed"] = values
            continue
        if section not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown configuration section or key {section!r}",
                hint=f"known: {', '.join(sorted([*_SECTIONS, 'seed']))}",
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        cls = _SECTIONS[section]
        known = {f.name: f for f in fields(cls)}
        changes = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}",
                    hint=f"known keys in [{section}]: {', '.join(sorted(known))}",
                )
            changes[key] = _coerce(section, known[key], value, source)
        updates[section] = replace(getattr(settings, section), **changes)
    return replace(settings, **updates)


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:  # TOML is UTF-8; a binary or Latin-1 file fails before parsing
        raise ConfigError(
            f"{path}: not a TOML file (not UTF-8 text: byte {exc.start} is 0x{exc.object[exc.start]:02x})",
            hint="save the config as UTF-8 text",
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc


def preset_names() -> list[str]:
    root = resources.files("ibau_cli.configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    root = resources.files("ibau_cli.configs")
    if name not in preset_names():  # a name, not a path: a file of one's own goes in with --config
        raise ConfigError(
            f"unknown preset {name!r}",
            hint=f"known presets: {', '.join(preset_names())}; load a file of your own with --config FILE",
        )
    return tomllib.loads((root / f"{name}.toml").read_text(encoding="utf-8"))
