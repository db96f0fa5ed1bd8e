"""What a step logs: the learners' metrics, lengths, markers, times, the sync and the throughput."""

from __future__ import annotations

from opsd_ray.data.contexts import model_positions
from opsd_ray.data.prompts import PROMPT_OF
from opsd_ray.eval.markers import marker_record
from opsd_ray.run.groups import Generation
from opsd_ray.run.schedule import StepResult


def step_record(cfg, tok, gen: Generation, result: StepResult, version: int, t0: float, variants: tuple[str, ...]) -> dict:
    """A step's record, before the sync: the learners' metrics, lengths, markers, times (`variants`: the
    frozen variants the step scored)."""
    trajectories = result.trajectories
    lengths = [len(t.response_ids) for t in trajectories]
    texts = tok.batch_decode([t.response_ids for t in trajectories], skip_special_tokens=True)
    limit = model_positions(cfg.model) or 10**9
    contexts = [len(getattr(p, PROMPT_OF[v])) + n for p, n in zip(gen.prompts, lengths) for v in variants]
    return {
        "step": gen.step,
        "adapter_version_used": min(t.adapter_version for t in trajectories),
        "staleness": version - min(t.adapter_version for t in trajectories),
        **result.metrics,
        "response_length": sum(lengths) / len(lengths),
        "truncation_rate": sum(t.finish_reason == "length" for t in trajectories) / len(trajectories),
        # contexts over the scorer's window (rows that cannot fit are skipped at start; the scorer refuses one)
        "scoring/truncated_frac": sum(c > limit for c in contexts) / len(contexts),
        "time/rollout": result.rollout_done - t0,
        "time/scoring": result.scoring_done - result.rollout_done,
        "time/learning": result.learning_done - result.scoring_done,
        "time/step": result.learning_done - t0,
        **marker_record(texts, lengths, match=cfg.markers.match),
    }


def sync_record(record: dict, sync_seconds: float, sync_bytes: int) -> dict:
    """What a step's record gets after the sync: the sync, the step's time and its throughput."""
    step_time = record["time/step"] + sync_seconds
    return {"time/sync": sync_seconds, "time/step": step_time, "sync_bytes": sync_bytes,
            "tokens_per_s": record["num_tokens"] / step_time}
