"""Warm workers between runs in one driver process (opsd_ray.run.pool): a run on the workers an earlier
run left equals a run on new ones, and a worker built from other settings is not reused."""

import json

import pytest

from opsd_ray.config.recipes import load_train_config
from opsd_ray.run.cluster import RoleRequest
from opsd_ray.run.pool import worker_key
from opsd_ray.workers.learner import Learner, learner_settings

ray = pytest.importorskip("ray")
TIMES = ("time/", "util/", "tokens_per_s")  # how long things took: the only numbers a run may change


def test_a_worker_key_is_its_settings_by_value():
    request = RoleRequest("learner", 1, 1.0, 0.0, {})

    def key(*overrides):
        cfg = load_train_config(["model=tiny", "data=gsm8k", *overrides])
        return worker_key("learner", Learner, request, -1, [(learner_settings(cfg), 2, 0, 1, 0)])

    assert key() == key("run.name=other", "train.steps=9", "train.batch_size=4", "checkpoint.every=5")  # not a learner's
    for changed in ("learner.lr=5e-3", "run.seed=1", "objective.mode=standard", "rollout.one_step_off=true",
                    "model.lora.r=4"):
        assert key(changed) != key(), changed
    assert worker_key("learner", Learner, RoleRequest("learner", 1, 2.0, 0.0, {}), -1, [()]) != \
        worker_key("learner", Learner, request, -1, [()])  # other resources


def numbers(folder) -> list[dict]:
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMES)} for r in records]


def pids(folder) -> dict[str, int]:
    return {w["role"]: w["pid"] for w in json.loads((folder / "logs" / "workers.json").read_text())}


@pytest.mark.slow
def test_a_run_on_warm_workers_equals_a_run_on_new_ones(local_ray, tmp_path, small_data, pool):
    from opsd_ray.run.driver import train

    def cfg(name, *extra):
        return load_train_config(["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}",
                                  f"run.name={name}", "rollout.engine=hf", "train.steps=2", *extra])

    pool.clear()
    new = train(cfg("new"), pool)
    assert len(pool) == 3  # the run's rollout, scoring and learner workers wait for the next run
    warm = train(cfg("warm", "checkpoint.every=1"), pool)  # settings no worker reads
    assert pids(warm) == pids(new)
    assert numbers(warm) == numbers(new)  # every loss, entropy, norm, sync check and marker, bit for bit
    other = train(cfg("other", "learner.lr=5e-3"), pool)
    assert pids(other)["learner"] != pids(new)["learner"]
    assert (pids(other)["rollout"], pids(other)["scoring"]) == (pids(new)["rollout"], pids(new)["scoring"])
