"""The objectives (`objective.mode`). One entry each says which frozen variants its steps score and how
its target is built from their log-probabilities; the loss, the driver, the plan, the config's choices,
the model card and the report ask this registry. The paper's two are below. Another objective is one
more `register(Objective(...))`: in this module, or in a module of this package that the list at the end
imports, so that every process (Ray workers too) knows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from opsd_ray.objective.numerics import pmi_from_logprobs

VARIANTS = ("teacher", "ref", "base")  # pi_T (q, r), pi_ref (r), P_0 (q): the order they travel in


@dataclass(frozen=True)
class Objective:
    mode: str  # objective.mode
    method: str  # its name in reports, Table 1 and model cards
    variants: tuple[str, ...]  # the frozen variants every step scores
    # (log pi_T, log pi_ref, log P_0, the objective config, padded, stats) -> log target rows, in float32 under
    # no_grad; a variant the objective does not need is None; per-row metrics go into `stats` by name
    target: Callable[..., Tensor]
    about: Callable[[object], str]  # the objective config -> the target in words (model card)

    def step_variants(self, diagnostics: bool) -> tuple[str, ...]:
        """The variants a step scores; the decomposition diagnostics also need pi_T and pi_ref."""
        need = set(self.variants) | ({"teacher", "ref"} if diagnostics else set())
        return tuple(v for v in VARIANTS if v in need)


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    OBJECTIVES[objective.mode] = objective
    return objective


def objective_of(mode: str) -> Objective:
    if mode not in OBJECTIVES:
        raise ValueError(f"objective.mode={mode!r} is not one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[mode]


def _pmi(log_T, log_ref, log_P0, o, padded: bool, stats: dict) -> Tensor:
    """Eq. 13-17: log P_target = log_softmax(log P_0 + c tanh(centred delta_it / c) / beta)."""
    rows: dict[str, Tensor] = {}
    out = pmi_from_logprobs(log_T, log_ref, log_P0, beta=o.beta, clip=o.clip or None, center=o.center,
                            padded=padded, stats=rows)
    if "clip_active" in rows:
        stats["clip_active_frac"] = rows["clip_active"]
    return out


register(Objective(
    "pmi", "OPSD-PMI", VARIANTS, _pmi,
    lambda o: f"the purified PMI target (β={o.beta:g}, tanh clip c={o.clip:g}, "
              f"{'centered' if o.center else 'not centered'})"))
register(Objective(
    "standard", "OPSD-Standard", ("teacher",), lambda log_T, *rest: log_T, lambda o: "the raw teacher distribution"))
