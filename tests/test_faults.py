"""A run survives what goes wrong on a cluster, on real local Ray with the tiny model: bad numbers,
killed rollout / scoring / learner processes, a second driver, and writes that fail."""

import json
import math
import threading

import pytest
import torch
from conftest import POOL, own_ray

from opsd_ray.config.recipes import load_train_config
from opsd_ray.run.cluster import runtime_env

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
BOX_START = 151648  # <|box_start|>: a special token the student never sees


@pytest.fixture(scope="module")
def local_ray():
    """A Ray session of these tests' own: they kill worker processes."""
    own_ray(num_cpus=6, include_dashboard=False, configure_logging=False, log_to_driver=False,
            runtime_env=runtime_env())
    yield
    ray.shutdown()


def args_of(tmp_path, small_data, *extra):
    return ["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}", "run.name=r",
            "rollout.engine=hf", "train.batch_size=4", "learner.micro_batch_size=2", "rollout.max_new_tokens=8",
            "learner.lr=1e-2", "train.diagnostics_every=0", "checkpoint.every=0", *extra]


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- bad numbers
def test_a_model_that_gives_nan_targets_skips_updates_then_stops(local_ray, tmp_path, small_data, capsys, pool):
    """A corrupted embedding row (NaN) that only the teacher prompt uses: every step's target is NaN.

    Its workers stay in the pool, and the runs below take them (reset to their own settings). Ray restarts
    a killed worker with the arguments it was created with, these: the NaN model, another objective,
    another rollout temperature and scoring precision. A run that did not reset a restarted worker to its
    own settings (Workers.renew) would not equal its uninterrupted run."""
    from opsd_ray.cli import main
    from opsd_ray.models.loading import load_model, load_tokenizer, resolve_model_path

    model = load_model(resolve_model_path("builtin:tiny"))
    with torch.no_grad():
        model.model.embed_tokens.weight[BOX_START] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    load_tokenizer(resolve_model_path("builtin:tiny")).save_pretrained(tmp_path / "nan-model")

    rc = main(["train", *args_of(tmp_path, small_data, f"model.path={tmp_path / 'nan-model'}", "train.steps=6",
                                 "prompt.reference_begin=<|box_start|>", "fault.max_skipped_steps=3",
                                 "learner.num_workers=2", "objective.mode=standard", "rollout.temperature=0.5",
                                 "scoring.dtype=bfloat16")], pool)
    err = capsys.readouterr().err
    assert rc == 1 and "3 steps in a row (1, 2, 3) had a non-finite loss or gradient norm" in err
    assert "Likely causes: NaN or Inf in the model weights" in err and "Traceback" not in err
    records = read_metrics(tmp_path / "r")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped_steps"] for r in records] == [1, 2, 3] and all(r["skipped"] == 1 for r in records)
    assert all(r["adapter_version"] == 0 for r in records)  # no update was applied
    assert all(math.isfinite(r["response_length"]) for r in records)  # the student itself was fine


# ----------------------------------------------------------------------------- lost workers
def actor_pid(name: str) -> int:
    """The process of the running run's Ray actor of class `name` (Ray titles actor processes `ray::<Class>...`)
    in this process's Ray session (its raylet is our child: another test worker's session has one of its
    own), not one of the pool's spare workers."""
    import os

    import psutil
    from ray._private.state import actors

    spare = {actors(a._actor_id.hex())["Pid"] for group, _ in POOL.parked.values() for a in group}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if (cmd and cmd[0].startswith(f"ray::{name}") and proc.info["pid"] not in spare
                and os.getpid() in {p.pid for p in proc.parents()}):
            return proc.info["pid"]
    raise LookupError(name)


def logged(folder, step: int):
    """The run in `folder` has logged `step`."""

    def done() -> bool:
        path = folder / "metrics.jsonl"
        steps = [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []
        return bool(steps) and max(steps) >= step

    return done


def kill_when(folder, plan):
    """A thread that kill -9s actor processes when conditions hold: plan = [(step logged, or a callable, name)]."""
    import os
    import signal
    import threading
    import time

    killed = []

    def watch():
        for when, name in plan:
            ready = logged(folder, when) if isinstance(when, int) else when
            deadline = time.time() + 300
            while time.time() < deadline and not ready():
                time.sleep(0.05)
            os.kill(actor_pid(name), signal.SIGKILL)
            killed.append((when, name))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def same_run(a, b, keys=("loss", "jsd", "grad_norm", "num_tokens", "response_length", "kl_target_base")):
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for k in keys:
            assert y[k] == x[k], (x["step"], k, x[k], y[k])
    from safetensors.torch import load_file

    fa, fb = load_file(str(a / "final" / "adapter_model.safetensors")), load_file(str(b / "final" / "adapter_model.safetensors"))
    for k, v in fa.items():
        assert torch.equal(fb[k], v), k


# One uninterrupted run that the runs with killed workers must equal bit for bit: 3 steps, a checkpoint at
# step 2, a group of 2 learners (gloo), and the rollout's deterministic mode (each sequence decoded alone).
GROUP_RUN = ("train.steps=3", "checkpoint.every=2", "learner.num_workers=2", "rollout.deterministic=true")


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory, small_data, pool):
    from opsd_ray.run.driver import train

    return train(load_train_config(args_of(tmp_path_factory.mktemp("full"), small_data, "run.name=full", *GROUP_RUN)), pool)


def test_killed_rollout_and_scoring_workers_are_restarted_and_the_run_is_unchanged(uninterrupted, tmp_path, small_data,
                                                                                capsys, pool):
    from opsd_ray.run.driver import train

    thread, killed = kill_when(tmp_path / "hit", [(1, "RolloutWorker"), (2, "ScoringWorker")])
    hit = train(load_train_config(args_of(tmp_path, small_data, "run.name=hit", *GROUP_RUN)), pool)  # on warm workers
    thread.join(timeout=10)
    out = capsys.readouterr().out
    assert killed == [(1, "RolloutWorker"), (2, "ScoringWorker")]
    assert "rollout worker 0 was lost" in out and "scoring worker 0 was lost" in out
    # each loss counts once, however many calls were queued on the worker when it died
    assert out.count(" was lost (") == 2 and "restart 2 of" not in out, out
    same_run(uninterrupted, hit)  # every trajectory has its seed, every part is scored as one unit
    assert len(pool) == 2  # the pool kept the 2 learners; the restarted rollout and scoring workers ended


# The default batched mode's uninterrupted run: 3 steps, a checkpoint after each
BATCHED_RUN = ("train.steps=3", "checkpoint.every=1")


@pytest.fixture(scope="module")
def batched(local_ray, tmp_path_factory, small_data, pool):
    from opsd_ray.run.driver import train

    return train(load_train_config(args_of(tmp_path_factory.mktemp("batched"), small_data, "run.name=full",
                                           *BATCHED_RUN)), pool)


def test_in_the_default_batched_mode_a_killed_rollout_worker_leaves_a_finished_run_with_close_metrics(
        batched, tmp_path, small_data, capsys, pool):
    """The batched HF engine (the default) promises the same samples up to the kernels' rounding: a run
    whose rollout worker is killed finishes, its metrics finite and close to an uninterrupted run's."""
    from opsd_ray.run.driver import train

    thread, killed = kill_when(tmp_path / "hit", [(1, "RolloutWorker")])
    hit = train(load_train_config(args_of(tmp_path, small_data, "run.name=hit", *BATCHED_RUN)), pool)
    thread.join(timeout=10)
    assert killed == [(1, "RolloutWorker")] and "rollout worker 0 was lost" in capsys.readouterr().out
    ra, rb = read_metrics(batched), read_metrics(hit)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb, strict=True):
        for k in ("loss", "jsd", "grad_norm", "response_length"):
            assert math.isfinite(y[k]) and y[k] == pytest.approx(x[k], rel=1e-2), (x["step"], k, x[k], y[k])


def test_a_killed_learner_restarts_the_group_from_the_last_checkpoint(uninterrupted, tmp_path, small_data, capsys, pool):
    """Any member of the group (here one of 2): the survivor's collective fails too."""
    import shutil

    from opsd_ray.run.driver import train

    # A checkpoint of an earlier run under the same name, which checkpoint.resume=never leaves alone:
    # the restart must not take it.
    shutil.copytree(uninterrupted / "checkpoints" / "step_3", tmp_path / "hit" / "checkpoints" / "step_40")
    # killed while step 3 runs, once step 2's checkpoint is complete (its trainer_state.json goes last)
    saved = (tmp_path / "hit" / "checkpoints" / "step_2" / "trainer_state.json").exists
    thread, killed = kill_when(tmp_path / "hit", [(saved, "Learner")])
    hit = train(load_train_config(args_of(tmp_path, small_data, "run.name=hit", "checkpoint.resume=never", *GROUP_RUN)), pool)
    thread.join(timeout=10)
    out = capsys.readouterr().out
    assert killed == [(saved, "Learner")] and "a learner of the group was lost" in out
    assert "the learner group restarted from step 2 (its newest checkpoint); redoing from step 3" in out
    assert out.count(" was lost (") == 1, out
    same_run(uninterrupted, hit)


def test_a_learner_error_is_that_error_and_a_lost_learner_restarts_the_group(local_ray, tmp_path, small_data, pool):
    """An error inside a learner call (a bug, an OOM) reaches the user as it is; only a lost learner
    (dead, or restarted by Ray) turns into a group restart."""
    from opsd_ray.run.faults import LearnersLost
    from opsd_ray.run.groups import Groups

    groups = Groups.start(load_train_config(args_of(tmp_path, small_data)), "hf", pool=pool)
    learner = groups.learner
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="KeyError"):
            learner.load_checkpoint({})
        assert not learner.a_member_was_lost(grace_s=0)
        ray.kill(learner.workers[0], no_restart=False)
        with pytest.raises(LearnersLost):  # a call the dying learner had taken
            learner.load_checkpoint({})
        assert learner.a_member_was_lost()
        learner.restart(RuntimeError("test"))
        assert not learner.a_member_was_lost(grace_s=0)
    finally:
        groups.shutdown(pool)  # the rollout and scoring workers stay warm; the restarted learner ends


def test_a_worker_lost_again_while_it_is_reset_is_one_more_loss_and_is_reset_once_back(local_ray, tmp_path):
    """Ray restarts a lost worker with the arguments it was created with, and a run resets a worker it took
    from a pool to its own (Workers.renew). A worker that dies during that reset is lost once more: the loss
    counts, and the worker is reset when Ray has restarted it again."""
    import os

    from opsd_ray.run.calls import RayCalls
    from opsd_ray.run.faults import Faults
    from opsd_ray.run.groups import Workers

    class Flaky:
        """Built with a setting; dies during a reset while `marker` exists (and removes it)."""

        def __init__(self, setting, marker):
            self.setting, self.marker = setting, marker

        def ready(self):
            return {"setting": self.setting}

        def reset(self, setting, marker):
            if os.path.exists(marker):
                os.remove(marker)
                os._exit(1)
            self.__init__(setting, marker)
            return self.ready()

        def die(self):
            os._exit(1)

    marker = tmp_path / "dies-in-reset"
    worker = ray.remote(Flaky).options(num_cpus=0, max_restarts=5).remote("the pool's", str(marker))
    group = Workers("scoring", [worker], RayCalls(), Faults(3))
    group.reused = [("the run's", str(marker))]  # taken from a pool by a run with other settings
    marker.touch()
    with pytest.raises(ray.exceptions.RayActorError) as lost:
        ray.get(worker.die.remote())
    group.lost(0, lost.value, sent_at=0)
    assert group.faults.counts == {"scoring": 2} and group.incarnation(0) == 1 and not marker.exists()
    assert ray.get(worker.ready.remote()) == {"setting": "the run's"}
    ray.kill(worker)


def test_a_role_that_keeps_losing_workers_stops_the_run(local_ray, tmp_path, small_data, capsys, pool):
    from opsd_ray.cli import main

    thread, killed = kill_when(tmp_path / "r", [(1, "ScoringWorker"), (2, "ScoringWorker")])
    rc = main(["train", *args_of(tmp_path, small_data, "train.steps=8", "fault.max_restarts=1", "checkpoint.every=1")],
              pool)
    thread.join(timeout=10)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err[-2000:]
    assert "the scoring role lost workers 2 times (fault.max_restarts=1)" in err, err[-2000:]
    assert "checkpoint.resume=auto" in err


# ----------------------------------------------------------------------------- nothing lost
@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs to fill (needs the right to mount, as root in a container)."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, most: int = 64 << 20):
    """Write until the small disk is full: only while it is mounted, and never more than `most` bytes (a
    thread that outlives its test must not fill the disk under it)."""
    import os

    if not os.path.ismount(disk):
        return
    with open(disk / "filler", "wb") as f:
        try:
            for _ in range(most >> 20):
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


def test_a_full_disk_stops_the_run_with_its_checkpoint_intact_and_resume_finishes_it(batched, small_disk, small_data,
                                                                                      capsys, pool):
    """The disk fills once step 1's checkpoint is written: step 2's metrics line or checkpoint cannot be
    written. The run stops (exit 1) naming the checkpoint; nothing is half-written; once space is freed
    the same command continues and ends where an uninterrupted run ends."""
    from opsd_ray.cli import main
    from opsd_ray.run.checkpoints import latest_checkpoint
    from opsd_ray.run.runfolder import RunFolder

    args = ["train", *args_of(small_disk, small_data, *BATCHED_RUN)]
    folder = small_disk / "r"
    saved = (folder / "checkpoints" / "step_1" / "trainer_state.json").exists
    thread = threading.Thread(target=lambda: wait_for(saved) and fill(small_disk), daemon=True)
    thread.start()
    rc = main(args, pool)  # on warm workers
    thread.join(timeout=10)
    pids = worker_pids(folder)
    err = capsys.readouterr().err
    assert rc == 1 and "No space left on device" in err and "Traceback" not in err, err[-2000:]
    assert f"The last complete checkpoint is {folder}/checkpoints/step_1" in err
    assert [r["step"] for r in read_metrics(folder)] in ([1], [1, 2])  # whole lines only
    assert (folder / "metrics.jsonl").read_text().endswith("\n")
    assert latest_checkpoint(RunFolder(str(folder))) == "checkpoints/step_1"
    assert not [p for p in folder.rglob("*") if ".tmp-" in p.name]  # no half-written file or folder

    (small_disk / "filler").unlink()
    assert main(args, pool) == 0
    assert "resumed from" in capsys.readouterr().out
    same_run(batched, folder)
    assert worker_pids(folder) == pids  # a run that stopped left its workers warm


def worker_pids(folder) -> list[tuple[str, int]]:
    return [(w["role"], w["pid"]) for w in json.loads((folder / "logs" / "workers.json").read_text())]


def wait_for(condition, timeout_s: float = 300) -> bool:
    """Whether `condition` held within `timeout_s`."""
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and not condition():
        time.sleep(0.02)
    return condition()
