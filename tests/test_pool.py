"""Warm workers between runs in one driver process (opsd_ray.run.pool): a run takes the workers with its
resources whatever settings built them, and equals a run on new ones."""

import json

import pytest

from opsd_ray.config.recipes import load_train_config
from opsd_ray.run.cluster import RoleRequest
from opsd_ray.run.pool import worker_key
from opsd_ray.workers.learner import Learner
from opsd_ray.workers.scoring import ScoringWorker

ray = pytest.importorskip("ray")
TIMES = ("time/", "util/", "tokens_per_s")  # how long things took: the only numbers a run may change


def test_a_worker_key_is_its_resources_restart_budget_and_threads():
    request = RoleRequest("learner", 1, 1.0, 0.0, {})
    key = worker_key("learner", Learner, request, -1, 2)
    assert key == worker_key("learner", Learner, RoleRequest("learner", 1, 1.0, 0.0, {}), -1, 2)
    others = {
        "group size": worker_key("learner", Learner, RoleRequest("learner", 2, 1.0, 0.0, {}), -1, 2),
        "resources": worker_key("learner", Learner, RoleRequest("learner", 1, 2.0, 0.0, {"node": 1.0}), -1, 2),
        "restart budget": worker_key("learner", Learner, request, 3, 2),
        "threads": worker_key("learner", Learner, request, -1, [0, 1]),
        "class": worker_key("learner", ScoringWorker, request, -1, 2),
    }
    for what, other in others.items():
        assert other != key, what


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
    # every role's settings differ: each worker is built again from them, in the same process
    other = train(cfg("other", "learner.lr=5e-3", "objective.mode=standard", "model.lora.r=4",
                      "rollout.temperature=0.5", "scoring.dtype=bfloat16"), pool)
    assert pids(other) == pids(new)
    assert numbers(other)[0]["loss"] != numbers(new)[0]["loss"]
    back = train(cfg("back"), pool)
    assert pids(back) == pids(new)
    assert numbers(back) == numbers(new)  # every loss, entropy, norm, sync check and marker, bit for bit


@ray.remote(num_cpus=0)
class Idle:
    def sleep(self, seconds: float) -> None:
        import time

        time.sleep(seconds)


def ended(actor) -> bool:
    """The actor is dead in the GCS (a kill takes effect a moment later)."""
    from test_faults import wait_for

    from opsd_ray.run.faults import actor_state

    return wait_for(lambda: actor_state(actor)[0] == "DEAD", timeout_s=30)


def test_spare_groups_stay_while_they_fit_beside_the_run_and_the_oldest_end_first(local_ray):
    """Each parked group holds a 2-CPU placement group. A run that takes one keeps the two others as spares
    while everything fits in 8 CPUs; a run that needs 5 CPUs ends the oldest spare, not the newest."""
    from ray.util.placement_group import placement_group

    from opsd_ray.run.faults import actor_state
    from opsd_ray.run.pool import WorkerPool

    pool = WorkerPool(spare=2)
    groups = {}
    for key in "abc":
        pg = placement_group([{"CPU": 2}])
        ray.get(pg.ready())
        groups[key] = [Idle.remote()]
        ray.get(groups[key][0].__ray_ready__.remote())
        assert pool.park(key, groups[key], pg)
    assert pool.held() == {"CPU": 6}
    claimed = pool.claim({"scoring": "b"}, {"CPU": 2}, {"CPU": 8})
    assert claimed["scoring"][0] == groups["b"] and list(pool.parked) == ["a", "c"]  # 4 + 2 of 8: both stay
    assert pool.claim({}, {"CPU": 5}, {"CPU": 8}) == {} and list(pool.parked) == ["c"]  # 2 + 5 fit; 4 + 5 did not
    assert ended(groups["a"][0]) and actor_state(groups["c"][0]) == ("ALIVE", 0)
    pool.spare = 0
    pool.claim({}, {}, {"CPU": 8})
    assert not pool.parked and ended(groups["c"][0])
    ray.util.remove_placement_group(claimed["scoring"][1])
    busy = groups["b"][0]
    busy.sleep.remote(60)  # a call its run left running (a run that stopped)
    assert not pool.park("b", [busy], None) and not pool.parked  # a busy worker is not kept
    ray.kill(busy)
