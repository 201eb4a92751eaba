"""The report: every figure the run computed, with provenance. Versioned JSON is its contract."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from . import __version__
from .metrics import Rate

SCHEMA_VERSION = "1.0"


@dataclass
class Figures:
    accuracy: Rate
    asr: Rate | None = None
    correct: list[bool] | None = field(default=None, repr=False)  # per held-out image, to pair before with after

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy.to_dict(), "asr": None if self.asr is None else self.asr.to_dict()}


@dataclass
class Gate:
    name: str
    status: str  # "pass", "fail" or "not_evaluated"
    limit: float | None
    value: float | None
    detail: str
    ci95: list[float] | None = (
        None  # 95 % interval of value: paired (Newcombe) for the accuracy drop, Wilson for a rate
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Report:
    command: str
    input: dict[str, Any]
    output: dict[str, Any] | None
    model: dict[str, Any]
    config: dict[str, Any]
    config_layers: list[str]
    seed: int
    device: str
    data: dict[str, Any]
    class_mapping: dict[str, Any]
    trigger: dict[str, Any] | None
    before: Figures
    after: Figures | None
    rounds: list[dict[str, Any]]
    unlearning: dict[str, Any] | None
    verification: dict[str, Any] | None
    parity_before: dict[str, Any] | None
    probes: dict[str, Any] | None
    timings: dict[str, float]
    gates: list[Gate]
    verdict: str
    warnings: list[str] = field(default_factory=list)
    invocation: dict[str, Any] | None = None  # {"argv": [...]}: the command line, when the CLI ran it
    images: dict[str, bytes] = field(default_factory=dict, repr=False)  # PNGs for the HTML report; not in JSON

    @property
    def exit_code(self) -> int:
        """The CLI's exit code for this report: 0 when every gate passed, 1 otherwise."""
        return 0 if self.verdict == "pass" else 1

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "ibau", "version": __version__},
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
            },
            "command": self.command,
            "invocation": self.invocation,
            "input": self.input,
            "output": self.output,
            "model": self.model,
            "config": self.config,
            "config_layers": self.config_layers,
            "seed": self.seed,
            "device": self.device,
            "data": self.data,
            "class_mapping": self.class_mapping,
            "trigger": self.trigger,
            "before": self.before.to_dict(),
            "after": None if self.after is None else self.after.to_dict(),
            "rounds": self.rounds,
            "unlearning": self.unlearning,
            "parity_before": self.parity_before,
            "verification": self.verification,
            "probes": self.probes,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "gates": [g.to_dict() for g in self.gates],
            "verdict": self.verdict,
            "warnings": self.warnings,
        }
