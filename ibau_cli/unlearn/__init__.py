"""I-BAU unlearning as a library: no CLI, no terminal, no files."""

from .hypergrad import HypergradInfo, fixed_point_hypergradient
from .ibau import RoundLog, UnlearnLog, unlearn

__all__ = ["HypergradInfo", "RoundLog", "UnlearnLog", "fixed_point_hypergradient", "unlearn"]
