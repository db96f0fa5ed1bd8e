"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): the learner forced onto the second node,
the run folder a file:// URI. The driver writes every output; nothing depends on where the learner is."""

import json

import pytest

from opsd_ray.cluster import runtime_env
from opsd_ray.config import load_train_config

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2, resources={"learner_node": 1})
    ray.init(address=cluster.address, runtime_env=runtime_env(), log_to_driver=False, configure_logging=False)
    yield second.node_id
    ray.shutdown()
    cluster.shutdown()


def test_a_learner_on_another_node_checkpoints_resumes_and_writes_final_into_the_drivers_folder(two_nodes, tmp_path,
                                                                                              capsys):
    from opsd_ray.data import ASSETS
    from opsd_ray.driver import Roles, train

    data = tmp_path / "gsm8k_small.jsonl"
    with open(ASSETS / "gsm8k_train.jsonl") as f:
        data.write_text("".join(next(f) for _ in range(12)))
    uri = f"file://{tmp_path / 'runs'}"

    def cfg(steps):
        return load_train_config(["model=tiny", "data=gsm8k", f"data.path={data}", f"run.output_dir={uri}",
                                  "run.name=r", "rollout.engine=hf", "train.batch_size=4", "learner.micro_batch_size=2",
                                  "rollout.max_new_tokens=8", f"train.steps={steps}", "checkpoint.every=1",
                                  "learner.resources.learner_node=1"])

    roles = Roles(cfg(2), "hf")
    try:
        (learner,) = [i for i in roles.info if i["role"] == "learner"]
        assert learner["node"] == two_nodes != ray.get_runtime_context().get_node_id()  # not the driver's node
    finally:
        roles.shutdown()

    folder = train(cfg(2))
    assert folder == tmp_path / "runs" / "r"
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_1", "step_2"]
    state = json.loads((folder / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"] == {"epoch": 0, "position": 8}
    capsys.readouterr()
    resumed = train(cfg(3))
    assert f"resumed from {folder}/checkpoints/step_2 (step 2)" in capsys.readouterr().out
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert resumed == folder and [r["step"] for r in records] == [1, 2, 3]
    assert (folder / "checkpoints" / "step_3" / "optimizer.pt").exists()
    assert {p.name for p in (folder / "final").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert not list(folder.rglob(".*tmp-*"))  # no half-written folder left
