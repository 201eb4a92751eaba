"""I-BAU unlearning as a library: no CLI, no terminal, no files."""

from .early_stop import ProxyTriggerStop
from .hypergrad import HypergradInfo, fixed_point_hypergradient
from .ibau import RoundLog, UnlearnLog, unlearn

__all__ = ["HypergradInfo", "ProxyTriggerStop", "RoundLog", "UnlearnLog", "fixed_point_hypergradient", "unlearn"]
