"""Rollout: the student pi_theta writes its own solutions (one Ray actor per worker, around one engine).

Every trajectory carries its token ids, finish reason and the adapter version that produced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from opsd_ray.eval.run import run_jobs
from opsd_ray.workers.engines import make_engine
from opsd_ray.workers.process import Reusable, peak_memory, use_cores, worker_info


@dataclass
class Trajectory:
    example_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" (ended with an end-of-sequence token) | "length" (truncated)
    adapter_version: int


@dataclass
class RolloutDone:
    """The last item of RolloutWorker.generate_stream: when the worker started and stopped (time.time())."""

    start: float
    end: float


class RolloutWorker(Reusable):
    """Ray actor shell around one engine."""

    def __init__(
        self,
        model_cfg,
        rollout_cfg,
        engine,
        seed: int = 0,
        num_threads: int | list[int] | None = None,
        max_model_len: int = 4096,
    ):
        started = time.time()
        use_cores(num_threads)
        self.cfg = rollout_cfg
        self.model_cfg = model_cfg
        # an engine's name ("hf", "vllm"), or an engine built elsewhere (tests)
        self.engine = make_engine(engine, model_cfg, rollout_cfg, seed, max_model_len) if isinstance(engine, str) else engine
        self.engine_name = engine if isinstance(engine, str) else type(engine).__name__
        self.info = worker_info("rollout", started)  # after the engine: vLLM has taken its memory

    def ready(self) -> dict:
        return self.info

    def peak_memory(self) -> dict:
        """vLLM on a GPU holds its budget (gpu_memory_utilization of the GPU) in its own process; else this
        process's peak."""
        if self.engine_name == "vllm" and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            return {"bytes": int(self.cfg.gpu_memory_utilization * total), "how": "vLLM's budget"}
        return peak_memory()

    def close(self) -> None:
        """Remove what the engine wrote to disk (the driver calls it before ending the actor)."""
        if hasattr(self.engine, "close"):
            self.engine.close()

    def release(self) -> None:
        self.close()

    def load_adapter(self, version: int, state: dict, adapter_config: dict) -> int:
        self.engine.load_adapter(version, state, adapter_config)
        return version

    def generate(self, requests: list[tuple[int, list[int], int]]) -> list[Trajectory]:
        """requests: (example_id, prompt_ids, seed); the trajectories in request order."""
        return [t for _, t in sorted(self._trajectories(requests), key=lambda it: it[0])]

    def generate_stream(self, requests: list[tuple[int, list[int], int]]):
        """A Ray streaming generator: (index in `requests`, Trajectory) as each one finishes, then
        RolloutDone with the interval this worker spent generating."""
        t0 = time.time()
        yield from self._trajectories(requests)
        yield RolloutDone(t0, time.time())

    def _trajectories(self, requests):
        finished = self.engine.generate_iter(
            [r[1] for r in requests], [r[2] for r in requests], self.cfg.max_new_tokens, self.cfg.temperature,
            self.cfg.top_p, self.cfg.ignore_eos,
        )
        for index, ids, finish in finished:
            eid, prompt, _ = requests[index]
            yield index, Trajectory(eid, prompt, ids, finish, self.engine.version)

    def probe_logprobs(self, prompt: list[int], response: list[int]) -> dict:
        """The sync check's probe: log-probabilities with the adapter the engine serves and with none."""
        return {"adapter": self.engine.sequence_logprobs(prompt, response),
                "base": self.engine.sequence_logprobs(prompt, response, adapter=False), "version": self.engine.version}

    def evaluate(self, jobs: list, **generation) -> list[dict]:
        """This worker's share of an evaluation, graded, with the adapter it generates with now."""

        records = run_jobs(self.engine, self.engine.tokenizer, self.model_cfg, jobs, **generation)
        return [dict(r, adapter_version=self.engine.version) for r in records]

