"""The adapter the engine serves is the adapter the learner trained (`rollout.verify_sync_every`).

LoRA sync can fail silently: an engine that never loads the new adapter keeps sampling from the base
model, and training goes on, on-policy in name only. At step 1 and every `rollout.verify_sync_every`
steps after a sync, rollout worker 0 and the learner score one fixed probe sequence, each with its
adapter and with none:

- `sync/max_abs_logprob_diff`: the largest gap between the engine's and the learner's log-probabilities
  under the adapter (numerics alone, when the sync works);
- `sync/max_abs_base_diff`: the same gap without adapters: the numerical noise between the two stacks;
- `sync/max_abs_adapter_effect`: how far the learner's adapter moves the probe from the base.

When the adapter moves the probe clearly beyond the noise (more than 4x it) and the engine is closer to
the base than to the learner, the run stops (exit 1): the engine is not serving the adapter. While the
adapter's effect is within the noise (early steps at a small learning rate), the gaps are logged and
nothing is judged.
"""

from __future__ import annotations

from opsd_ray.common import RunStopped
from opsd_ray.data.prompts import build_prompt_ids

PROBE_TOKENS = 48  # response tokens of the probe: the reference's first tokens


def probe_sequence(tok, example, cfg) -> tuple[list[int], list[int]]:
    """A fixed probe: the student prompt of the data's first example, and its reference's first tokens."""
    prompt = build_prompt_ids(tok, example.question, example.reference, cfg.model, cfg.prompt).student
    response = tok(example.reference, add_special_tokens=False)["input_ids"][:PROBE_TOKENS]
    return prompt, response


def max_gap(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def judge(engine: dict, learner: dict) -> dict[str, float]:
    """The sync metrics of one probe (each side: {"adapter": logprobs, "base": logprobs}); RunStopped when
    the engine plainly serves the base model instead of the learner's adapter."""
    gap, noise = max_gap(engine["adapter"], learner["adapter"]), max_gap(engine["base"], learner["base"])
    effect = max_gap(learner["adapter"], learner["base"])
    to_base = max_gap(engine["adapter"], learner["base"])
    metrics = {"sync/max_abs_logprob_diff": gap, "sync/max_abs_base_diff": noise, "sync/max_abs_adapter_effect": effect}
    if effect > 4 * noise and to_base < gap:
        raise RunStopped(
            f"the rollout engine is not serving the trained adapter (version {learner['version']}; the engine says "
            f"{engine['version']}): on the sync check's probe its log-probabilities are {to_base:.4g} from the base "
            f"model's but {gap:.4g} from the learner's, whose adapter moves them {effect:.4g}. The rollouts were "
            "sampled from the base model. Check the rollout engine's LoRA support for this model "
            "(rollout.engine=hf avoids vLLM's), and its log in logs/engines.log"
        )
    return metrics


class SyncCheck:
    """When to probe, and the probe's calls (started after a sync, finished when its results are needed)."""

    def __init__(self, every: int, probe: tuple[list[int], list[int]]):
        self.every, self.probe = every, probe

    def due(self, step: int) -> bool:
        return self.every > 0 and (step == 1 or step % self.every == 0)

    def start(self, groups) -> tuple:
        """Rollout worker 0 probes after the loads queued on it (an actor runs its calls in order); the
        learners probe at once (they wait for the next step)."""
        engine = groups.rollout.probe(*self.probe)
        learner = groups.learner.whole("probe_logprobs", *self.probe)
        return groups.rollout.calls, engine, learner

    def finish(self, pending: tuple) -> dict[str, float]:
        calls, engine, learner = pending
        return judge(calls.get(engine), learner)
