"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): the learner forced onto the second node,
the run folder a file:// URI. The driver writes every output; nothing depends on where the learner is."""

import json

import pytest

from opsd_ray.config.recipes import load_train_config
from opsd_ray.run.cluster import runtime_env

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    # A lost node is noticed within a few seconds (Ray's defaults take ~30 s)
    fast = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    ray.shutdown()  # the shared session: this test needs a cluster of two nodes
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 3, "include_dashboard": False, "_system_config": fast})
    second = cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    ray.init(address=cluster.address, runtime_env=runtime_env(), log_to_driver=False, configure_logging=False)
    yield second.node_id, cluster
    ray.shutdown()
    cluster.shutdown()


def test_a_learner_on_another_node_checkpoints_resumes_and_writes_final_into_the_drivers_folder(two_nodes, tmp_path,
                                                                                              capsys, pool):
    from opsd_ray.data.sources import ASSETS
    from opsd_ray.run.driver import train

    data = tmp_path / "gsm8k_small.jsonl"
    with open(ASSETS / "gsm8k_train.jsonl") as f:
        data.write_text("".join(next(f) for _ in range(12)))
    uri = f"file://{tmp_path / 'runs'}"

    def cfg(steps):
        return load_train_config(["model=tiny", "data=gsm8k", f"data.path={data}", f"run.output_dir={uri}",
                                  "run.name=r", "rollout.engine=hf", "train.batch_size=4", "learner.micro_batch_size=2",
                                  "rollout.max_new_tokens=8", f"train.steps={steps}", "checkpoint.every=1",
                                  "learner.resources.learner_node=1"])

    folder = train(cfg(2), pool)
    assert folder == tmp_path / "runs" / "r"
    (learner,) = [i for i in json.loads((folder / "logs" / "workers.json").read_text()) if i["role"] == "learner"]
    assert learner["node"] == two_nodes[0] != ray.get_runtime_context().get_node_id()  # not the driver's node
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_1", "step_2"]
    state = json.loads((folder / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"] == {"epoch": 0, "position": 8}
    capsys.readouterr()
    resumed = train(cfg(3), pool)  # on the same (warm) workers
    assert f"resumed from {folder}/checkpoints/step_2 (step 2)" in capsys.readouterr().out
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert resumed == folder and [r["step"] for r in records] == [1, 2, 3]
    assert (folder / "checkpoints" / "step_3" / "optimizer.pt").exists()
    assert {p.name for p in (folder / "final").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not list(folder.rglob(".*tmp-*"))  # no half-written folder left


def test_a_lost_node_takes_its_rollout_worker_along_and_the_run_is_unchanged(two_nodes, tmp_path, capsys, pool):
    """The rollout worker's node is removed after step 1 (raylet and workers gone, as a preempted VM): Ray
    moves its placement-group bundle to a spare node, restarts the actor there, and the driver redoes the
    lost work; the metrics and the adapter equal those of a run on healthy nodes."""
    import threading
    import time

    from test_faults import same_run

    from opsd_ray.data.sources import ASSETS
    from opsd_ray.run.driver import train

    _, cluster = two_nodes
    nodes = [cluster.add_node(num_cpus=1, resources={"rollout_node": 1}) for _ in range(2)]  # one is spare
    cluster.wait_for_nodes()
    data = tmp_path / "gsm8k_small.jsonl"
    with open(ASSETS / "gsm8k_train.jsonl") as f:
        data.write_text("".join(next(f) for _ in range(12)))

    def cfg(name):
        return load_train_config(["model=tiny", "data=gsm8k", f"data.path={data}", f"run.output_dir={tmp_path}",
                                  f"run.name={name}", "rollout.engine=hf", "train.batch_size=4",
                                  "learner.micro_batch_size=2", "rollout.max_new_tokens=8", "train.steps=3",
                                  "checkpoint.every=0", "train.diagnostics_every=0", "learner.lr=1e-2",
                                  "rollout.resources.rollout_node=1", "rollout.cpus_per_worker=1",
                                  "rollout.deterministic=true",
                                  "learner.resources.learner_node=1"])  # where the test above left a warm learner

    full = train(cfg("full"), pool)
    lost = []

    def remove_the_rollout_node_after_step_1():
        path = tmp_path / "hit" / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (path.exists() and path.read_text().strip()):
            time.sleep(0.05)
        (pg,) = [p for p in ray.util.placement_group_table().values()  # (a pool may hold an earlier run's)
                 if p["name"].startswith("opsd_ray_rollout") and p["state"] == "CREATED"
                 and "rollout_node" in p["bundles"][0]]
        (node,) = [n for n in nodes if n.node_id == pg["bundles_to_node_id"][0]]
        cluster.remove_node(node)
        lost.append(node.node_id)

    thread = threading.Thread(target=remove_the_rollout_node_after_step_1, daemon=True)
    thread.start()
    hit = train(cfg("hit"), pool)
    thread.join(timeout=10)
    out = capsys.readouterr().out
    assert lost and "rollout worker 0 was lost" in out, out[-3000:]
    same_run(full, hit)
