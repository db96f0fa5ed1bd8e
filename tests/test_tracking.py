"""metrics.jsonl, TensorBoard and W&B (offline, as a test can run it) get the same records."""

import json

import pytest
from conftest import wandb_config, wandb_history

from opsd_ray.config.recipes import ConfigError, load_train_config
from opsd_ray.run.runfolder import RunFolder
from opsd_ray.run.tracking import MetricsLog

pytest.importorskip("wandb")


def record(step):
    return {"step": step, "loss": 1.0 / step, "eval/gsm8k/avg@2": 0.25, "markers/wait/per_response": 2.0,
            "note": "text is not a metric"}


@pytest.fixture
def offline(monkeypatch):
    import wandb

    wandb.teardown()  # W&B keeps the settings of this process's earlier runs until then
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_holds_every_metric_and_a_resumed_run_continues_it(tmp_path, offline):
    cfg = load_train_config(["model=tiny", f"run.output_dir={tmp_path}", "run.name=w", "logging.wandb=true",
                             "logging.tags=[a,b]"])
    run = RunFolder(tmp_path / "w")
    log = MetricsLog(run, 0, cfg)
    for step in (1, 2, 3):
        log.log(record(step))
    log.close()
    history = wandb_history(run.local_path())
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert history[1] == {"_step": 2, "loss": 0.5, "eval/gsm8k/avg@2": 0.25, "markers/wait/per_response": 2.0}
    config = wandb_config(run.local_path())
    assert config["objective"]["mode"] == "pmi" and config["logging"]["tags"] == ["a", "b"]
    run_id = run.read_text("wandb_id.txt").strip()

    # resumed from a checkpoint at step 1: metrics.jsonl takes the redone steps 2 and 3 again; W&B, which
    # keeps a run's steps increasing, gets only the new step 4, in the same run
    log = MetricsLog(run, 1, cfg)
    for step in (2, 3, 4):
        log.log(record(step))
    log.close()
    assert [r["step"] for r in run.read_jsonl("metrics.jsonl")] == [1, 2, 3, 4]
    assert [h["_step"] for h in wandb_history(run.local_path())] == [1, 2, 3, 4]
    assert run.read_text("wandb_id.txt").strip() == run_id
    folders = list((tmp_path / "w" / "wandb").glob("offline-run-*"))  # W&B adds "-1" to a second one in the same second
    assert folders and all(run_id in p.name for p in folders)


def test_wandb_that_cannot_log_in_is_a_config_error(tmp_path, monkeypatch):
    import wandb

    wandb.teardown()  # W&B keeps the settings of this process's earlier runs (offline) until then
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no saved login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    cfg = load_train_config(["model=tiny", f"run.output_dir={tmp_path}", "run.name=w", "logging.wandb=true"])
    with pytest.raises(ConfigError, match="wandb login.*WANDB_MODE=offline"):
        MetricsLog(RunFolder(tmp_path / "w"), 0, cfg)


def test_without_wandb_nothing_is_sent(tmp_path):
    cfg = load_train_config(["model=tiny", f"run.output_dir={tmp_path}", "run.name=w"])
    log = MetricsLog(RunFolder(tmp_path / "w"), 0, cfg)
    log.log(record(1))
    log.close()
    assert not (tmp_path / "w" / "wandb").exists()
    assert json.loads((tmp_path / "w" / "metrics.jsonl").read_text())["note"] == "text is not a metric"


def test_evaluations_after_training_reach_wandb_on_their_own_axis(tmp_path, offline):
    """eval.schedule=end logs step 0's and step 2's evaluations after step 2: W&B keeps its steps
    increasing, so they go against eval/step; metrics.jsonl keeps them at their steps."""
    cfg = load_train_config(["model=tiny", f"run.output_dir={tmp_path}", "run.name=e", "logging.wandb=true"])
    run = RunFolder(tmp_path / "e")
    log = MetricsLog(run, 0, cfg)
    for step in (1, 2):
        log.log({"step": step, "loss": 1.0 / step})
    for step in (0, 2):
        log.log({"step": step, "eval/mean/avg": 0.1 * (step + 1)}, after_training=True)
    log.close()
    history = wandb_history(run.local_path())
    late = [h for h in history if "eval/mean/avg" in h]
    assert [(h["eval/step"], h["eval/mean/avg"]) for h in late] == [(0, 0.1), (2, pytest.approx(0.3))]
    assert [r["step"] for r in run.read_jsonl("metrics.jsonl")] == [1, 2, 0, 2]
