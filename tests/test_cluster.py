"""Running where users run: the resource check, `make submit` against a real Ray head, cluster manifests."""

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import own_ray

from opsd_ray.config.recipes import ConfigError, load_train_config
from opsd_ray.run.cluster import RoleRequest, check_fits, role_requests

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
VENV_BIN = Path(sys.executable).parent


def small_gsm8k(folder: Path, n: int = 40) -> str:
    """The first n GSM8K problems, through the real gsm8k preset."""
    from opsd_ray.data.sources import ASSETS

    path = folder / "gsm8k_small.jsonl"
    with open(ASSETS / "gsm8k_train.jsonl") as f:
        path.write_text("".join(next(f) for _ in range(n)))
    return str(path)


def clean_env(**extra) -> dict[str, str]:
    """This environment without a Ray address (a stray one would send local runs elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- resource check
def test_check_fits_accepts_what_fits():
    roles = [RoleRequest("rollout", 2, 4, 1), RoleRequest("scoring", 5, 4, 1), RoleRequest("learner", 1, 4, 1)]
    check_fits(roles, {"CPU": 64.0, "GPU": 8.0})
    check_fits(roles, {"CPU": 32.0, "GPU": 8.0})  # exactly enough


def test_check_fits_refuses_with_what_was_asked_what_exists_what_to_change():
    roles = [RoleRequest("rollout", 2, 4, 1), RoleRequest("scoring", 5, 4, 1), RoleRequest("learner", 1, 4, 1)]
    with pytest.raises(ConfigError) as e:
        check_fits(roles, {"CPU": 64.0, "GPU": 4.0})
    msg = str(e.value)
    assert "need 32 CPUs and 8 GPUs" in msg  # asked
    assert "rollout: 2 x (4 CPU, 1 GPU)" in msg and "learner: 1 x (4 CPU, 1 GPU)" in msg
    assert "has 64 CPUs and 4 GPUs" in msg  # exists
    assert "scoring.num_workers" in msg and "learner.gpus_per_worker" in msg and "opsd-ray plan" in msg  # what to change
    with pytest.raises(ConfigError, match="need 1.5 CPUs and 1 GPUs"):  # GPU-less machine
        check_fits(role_requests(load_train_config(["model=tiny", "learner.gpus_per_worker=1"])), {"CPU": 2.0})


# ----------------------------------------------------------------------------- submit script
def submit(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLUSTER / "submit.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env or clean_env())


def test_submit_dry_run_builds_the_ray_job_command():
    res = submit("--address", "http://head:8265", "--dry-run", "--env", "OPSD_RAY_CACHE=/c", "--env", "HF_HOME=/h",
                 "model=tiny", "data=gsm8k", "train.steps=2", "run.output_dir=/shared/runs")
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout.split("+ ", 1)[1].splitlines()[0])
    assert cmd[1:3] == ["job", "submit"] and cmd[cmd.index("--address") + 1] == "http://head:8265"
    assert "--no-wait" in cmd

    renv = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert renv["working_dir"] == str(ROOT)
    for excluded in ("runs/", ".venv/", ".git/", "**/__pycache__/"):
        assert excluded in renv["excludes"]
    # variables the driver forwards itself go on the entrypoint (Ray refuses to merge duplicates)
    assert renv["env_vars"] == {"HF_HOME": "/h"}
    entry = cmd[cmd.index("--") + 1:]
    # the run gets its name here, so that the same command with that name continues it after a failure
    name = re.fullmatch(r"run.name=(tiny-gsm8k-pmi-\d{8}-\d{6})", entry[-1]).group(1)
    assert entry[:-1] == ["env", "OPSD_RAY_CACHE=/c", "python", "-m", "opsd_ray", "train", "model=tiny",
                          "data=gsm8k", "train.steps=2", "run.output_dir=/shared/runs"]
    assert cmd[cmd.index("--submission-id") + 1] == f"opsd-{name}"
    assert f"after a failure, submit the same again with run.name={name}" in res.stdout
    assert "note: run.output_dir" not in res.stdout
    # a name of the user's is kept, and each submission of it gets its own job id
    res = submit("--address", "http://head:8265", "--dry-run", "model=tiny", "run.name=mine")
    cmd = shlex.split(res.stdout.split("+ ", 1)[1].splitlines()[0])
    assert cmd[-1] == "run.name=mine" and [c for c in cmd if c.startswith("run.name=")] == ["run.name=mine"]
    assert re.fullmatch(r"opsd-mine-\d{8}-\d{6}", cmd[cmd.index("--submission-id") + 1])


def test_submit_checks_keys_before_sending_and_needs_an_address():
    res = submit("--address", "http://head:8265", "--dry-run", "model=tiny", "trian.steps=2")
    assert res.returncode == 2 and "did you mean 'train.steps'" in res.stderr
    res = submit("--address", "http://head:8265", "--dry-run", "model=qwen3-9b")
    assert res.returncode == 2 and "unknown model preset 'qwen3-9b'" in res.stderr
    res = submit("--dry-run", "model=tiny")
    assert res.returncode == 2 and "RAY_ADDRESS=http://<head>:8265" in res.stderr
    res = submit("--address", "http://head:8265", "--dry-run", "model=tiny")
    assert res.returncode == 0 and "note: run.output_dir is not set" in res.stdout


def test_make_submit_maps_the_variables():
    res = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "submit", "MODEL=qwen3-8b", "DATA=math-cot-20k",
                          "STEPS=5", "RUN=r", "RAY_ADDRESS=http://h:8265", "OUTPUT_DIR=/s/runs", "WAIT=1",
                          "JOB_ENV=A=1 B=2", "ARGS=objective.mode=standard"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert shlex.split(line)[1:] == [
        "cluster/submit.py", "--address", "http://h:8265", "--python", "python", "--wait", "--env", "A=1",
        "--env", "B=2", "model=qwen3-8b", "data=math-cot-20k", "train.steps=5", "run.name=r",
        "run.output_dir=/s/runs", "objective.mode=standard"]


# ----------------------------------------------------------------------------- a real Ray head
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(folder: str) -> list[int]:
    """Pids whose command line names our head's temp dir: ours only, never another Ray instance."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines() if folder in line]


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop this head and everything it started, and nothing else (no `ray stop`: it stops every
    Ray instance of the user on the machine, other tests' included)."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(head.pid, sig)  # `ray start --block` leads its own session: all its processes
        except ProcessLookupError:
            pass
        deadline = time.time() + wait
        while time.time() < deadline and processes_under(temp_dir):
            time.sleep(0.5)
    for pid in processes_under(temp_dir):  # stragglers that left the process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real head on 127.0.0.1 with the dashboard on (the job API needs it), token authentication
    with a token of our own (the path a Ray 2.60 cluster takes); stopped whatever happens."""
    temp_dir = tempfile.mkdtemp(prefix="opsdrj", dir="/tmp")  # short: Ray's unix socket paths
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    env = clean_env(PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    log_path = tmp_path_factory.mktemp("head") / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             "--num-cpus=4", f"--temp-dir={temp_dir}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", "--object-store-memory=300000000", "--disable-usage-stats"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None, log_path.read_text()
            assert time.time() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(2)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        stop_head(head, temp_dir)
    assert not processes_under(temp_dir)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_make_submit_runs_a_job_through_the_job_api(ray_head, tmp_path):
    """`make submit WAIT=1` with the tiny model: the job succeeds, the console follows its logs to the end,
    and the printed commands follow and stop it by its id. (A resubmitted job with the same run name
    resumes as any run does: checkpoint.resume=auto, tested with a killed driver in test_train_e2e.)"""
    env, address = ray_head["env"], ray_head["address"]
    job_env = f"OPSD_RAY_CACHE={os.environ['OPSD_RAY_CACHE']} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false"
    res = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "submit", "MODEL=tiny", "DATA=gsm8k", "STEPS=2", "RUN=job",
         f"RAY_ADDRESS={address}", f"OUTPUT_DIR={tmp_path / 'runs'}", f"JOB_ENV={job_env}", "WAIT=1",
         f"ARGS=rollout.engine=hf data.path={small_gsm8k(tmp_path)}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1/2" in res.stdout and "2/2" in res.stdout and "done: 2 steps" in res.stdout, res.stdout
    job_id = re.search(r"^job (\S+) on ", res.stdout, re.M).group(1)
    follow = re.search(r"follow the logs:\s+(.+)$", res.stdout, re.M).group(1)
    assert re.search(r"stop it:\s+.+ job stop --address \S+ " + re.escape(job_id), res.stdout)

    assert f"Job '{job_id}' succeeded" in res.stdout  # Ray's submit waited for the job (WAIT=1)
    logs = subprocess.run(shlex.split(follow), env=env, capture_output=True, text=True, timeout=300).stdout
    assert "done: 2 steps" in logs, logs  # the printed command reads the job's logs
    assert len((tmp_path / "runs" / "job" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_train_refuses_a_gpu_request_on_a_gpu_less_cluster_before_loading_models(ray_head, tmp_path):
    """`opsd-ray train learner.gpus_per_worker=1` against the local head (no GPUs): exit 2, the message, no actor."""
    args = ["model=tiny", "data=gsm8k", f"data.path={small_gsm8k(tmp_path)}", f"run.output_dir={tmp_path}",
            "run.name=nogpu", "rollout.engine=hf", "learner.gpus_per_worker=1", f"ray.address={ray_head['gcs']}"]
    res = subprocess.run([sys.executable, "-m", "opsd_ray", "train", *args], cwd=ROOT, env=ray_head["env"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "opsd-ray train: error: the roles need 1.5 CPUs and 1 GPUs" in res.stderr
    assert "the Ray cluster has 4 CPUs and 0 GPUs" in res.stderr and "learner.gpus_per_worker" in res.stderr
    assert "Traceback" not in res.stderr
    assert "engine=" not in res.stdout  # the run line comes after the actors: none was created
    assert not (tmp_path / "nogpu" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- manifests
def recipe_gpus(model: str, data: str) -> tuple[float, float]:
    data_path = [f"data.path={ROOT / 'opsd_ray/assets/data/gsm8k_train.jsonl'}"] if data == "dasd-10k" else []
    cfg = load_train_config([f"model={model}", f"data={data}", *data_path])
    return tuple(sum(r.total()[i] for r in role_requests(cfg)) for i in (0, 1))


def test_rayjob_manifest():
    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:4] == ["python", "-m", "opsd_ray", "train"]
    args = dict(a.split("=", 1) for a in entry[4:])
    assert spec["shutdownAfterJobFinishes"] is True
    # retried on a new cluster after a failure, and the retry continues the same run
    assert spec["backoffLimit"] >= 1 and args["run.name"] and "checkpoint.resume" not in args
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0" and head["rayStartParams"]["num-gpus"] == "0"
    (worker,) = cluster["workerGroupSpecs"]
    head_c = head["template"]["spec"]["containers"][0]
    worker_c = worker["template"]["spec"]["containers"][0]
    assert head_c["image"] == worker_c["image"]
    gpus = int(worker_c["resources"]["limits"]["nvidia.com/gpu"]) * worker["replicas"]
    cpus = int(worker_c["resources"]["limits"]["cpu"]) * worker["replicas"]
    need_cpu, need_gpu = recipe_gpus(args["model"], args["data"])
    assert need_gpu == gpus and need_cpu <= cpus  # the workers hold what the recipe asks for
    # outputs go to the volume every pod mounts
    for spec_ in (head["template"]["spec"], worker["template"]["spec"]):
        mounts = {m["mountPath"]: m["name"] for m in spec_["containers"][0]["volumeMounts"]}
        assert any(args["run.output_dir"].startswith(path) for path in mounts)
        assert set(mounts.values()) <= {v["name"] for v in spec_["volumes"]}
    # env goes on the containers, never in the job's runtime env (it would clash with the driver's)
    assert "runtimeEnvYAML" not in spec
    assert {e["name"] for e in head_c["env"]} >= {"OPSD_RAY_CACHE", "HF_HOME"}


def test_ray_up_cluster_file():
    doc = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    assert doc["cluster_name"] and doc["provider"]["type"]
    head = doc["available_node_types"][doc["head_node_type"]]
    assert head["resources"]["GPU"] == recipe_gpus("qwen3-8b", "math-cot-20k")[1] == 8
    assert head["resources"]["CPU"] >= max(recipe_gpus(m, d)[0] for m in ("qwen3-8b", "olmo-3-7b-think")
                                           for d in ("math-cot-20k", "dasd-10k"))
    assert "." in doc["file_mounts"].values()
    assert any("make install-gpu" in c for c in doc["setup_commands"])
    start = " ".join(doc["head_start_ray_commands"])
    assert "ray start --head" in start and "--dashboard-port=8265" in start
    assert {"runs", ".venv"} <= set(doc["rsync_exclude"])


def test_slurm_script():
    path = CLUSTER / "slurm.sbatch"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # a requeued job keeps its job id, hence its run.name, and continues the run
    text = path.read_text()
    assert "#SBATCH --requeue" in text and "RUN=${RUN:-$MODEL-$DATA-$SLURM_JOB_ID}" in text
    text = path.read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, re.M))
    assert sbatch["nodes"] and sbatch["gpus-per-node"] == "8" and "exclusive" in sbatch
    assert "ray start --head" in text and 'ray start --block --address="$head_ip:$PORT"' in text
    assert "scontrol show hostnames" in text
    assert "python cluster/submit.py" in text and "--wait" in text and "run.output_dir=" in text
    assert "RAY_AUTH_MODE=token" in text


def test_actors_get_passive_openmp_threads_unless_the_user_chose(monkeypatch):
    from opsd_ray.run.cluster import FORWARDED_ENV, runtime_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OPSD_RAY_CACHE", "/c")
    env = runtime_env()["env_vars"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OPSD_RAY_CACHE"] == "/c"
    assert set(env) <= set(FORWARDED_ENV)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert runtime_env()["env_vars"]["OMP_WAIT_POLICY"] == "ACTIVE"


def test_submit_puts_the_forwarded_variables_on_the_entrypoint():
    res = submit("--address", "http://head:8265", "--dry-run", "--env", "OMP_WAIT_POLICY=ACTIVE", "model=tiny")
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout.split("+ ", 1)[1].splitlines()[0])
    assert "OMP_WAIT_POLICY" not in json.loads(cmd[cmd.index("--runtime-env-json") + 1]).get("env_vars", {})
    assert "OMP_WAIT_POLICY=ACTIVE" in cmd[cmd.index("--"):]


# ----------------------------------------------------------------------------- GPU install, manifests checked deeper
def make_dry_run(*args: str, outdated: bool = True) -> list[str]:
    """`make -n`'s commands; `outdated` leaves out `make install`'s own (as if it had run)."""
    res = subprocess.run(["make", "--no-print-directory", "-n", *(["-o", ".venv/.installed"] if outdated else []), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()


def test_make_install_gpu_installs_vllm_then_flash_attn_without_build_isolation():
    lines = make_dry_run("install-gpu")
    vllm = next(i for i, x in enumerate(lines) if "install -q vllm==0.32.0" in x)
    flash = next(i for i, x in enumerate(lines) if "install flash-attn==" in x)
    assert vllm < flash and "--no-build-isolation" in lines[flash] and "MAX_JOBS=" in lines[flash]
    assert any("install -q packaging ninja" in x for x in lines[vllm:flash])  # flash-attn's build needs them
    assert lines[-1].endswith("-m opsd_ray doctor")
    assert not any("flash-attn" in x for x in make_dry_run("install-gpu", "FLASH_ATTN=0"))  # sdpa fallback
    extra = re.search(r'^gpu = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert "flash-attn" not in extra and "vllm==0.32.0" in extra  # an extra cannot install flash-attn


def test_every_recipe_reads_its_data_in_an_environment_made_by_make_install():
    """The suite runs in the environment `make install` makes: each experiment recipe's data reader (a Hub id
    needs `datasets`) imports here; what only GPU nodes get (vllm, flash-attn) is the next test's."""
    import importlib.util

    from opsd_ray.tools.doctor import recipe_needs, shipped_recipes

    recipes = shipped_recipes()
    assert len(recipes) >= 10
    for name, cfg in recipes.items():
        for module in recipe_needs(cfg) - {"vllm", "flash_attn"}:
            assert importlib.util.find_spec(module) is not None, (name, module)
    assert "datasets" in recipe_needs(recipes["qwen3-8b__math-cot-20k"])


def test_make_install_gpu_installs_every_package_the_gpu_recipes_import():
    import tomllib

    from opsd_ray.tools.doctor import DISTRIBUTION, recipe_needs, shipped_recipes

    lines = "\n".join(make_dry_run("install-gpu", "VENV=/nonexistent/venv", outdated=False))
    assert "-e '.[test,peers]'" in lines  # the project, with its dependencies
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = {re.split(r"[<>=\[ ]", d)[0] for d in project}
    gpu = [cfg for name, cfg in shipped_recipes().items() if cfg.rollout.gpus_per_worker > 0]
    assert gpu
    for cfg in gpu:
        for module in recipe_needs(cfg):
            dist = DISTRIBUTION[module]
            assert dist in deps or re.search(rf"install .*\b{dist}==", lines), (cfg.model.name, module)


def test_cluster_files_install_with_make_install_gpu():
    assert "make install-gpu" in (CLUSTER / "Dockerfile").read_text()
    assert "cluster/Dockerfile" in (CLUSTER / "rayjob.yaml").read_text()
    assert "make install-gpu" in (CLUSTER / "slurm.sbatch").read_text()
    for name in ("rayjob.yaml", "ray-up.yaml", "slurm.sbatch", "Dockerfile"):
        assert re.search(r"^# (Checked here|Not built here)", (CLUSTER / name).read_text(), re.M), name


def gib(quantity: str) -> float:
    """A Kubernetes memory quantity (64Gi, 400Gi, 512Mi) or a byte count, in GiB."""
    units = {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}
    for unit, scale in units.items():
        if quantity.endswith(unit):
            return float(quantity[: -len(unit)]) * scale
    return int(quantity) / 2**30


def test_rayjob_pods_hold_the_object_store_in_a_large_enough_dev_shm():
    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    cluster = doc["spec"]["rayClusterSpec"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        store = gib(group["rayStartParams"]["object-store-memory"])  # Ray's default would be 30% of memory
        (shm,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        volume = next(v for v in pod["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        size = gib(volume["emptyDir"]["sizeLimit"])
        assert store < size < gib(pod["containers"][0]["resources"]["limits"]["memory"])
    # the GPU workers' store holds a step of full-vocabulary logits (scoring.wire_format=logits)
    assert gib(cluster["workerGroupSpecs"][0]["rayStartParams"]["object-store-memory"]) >= 2 * 28


def test_ray_up_file_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    doc = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    validate_config(prepare_config(doc))  # what `ray up` does before it starts anything
    bad = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    bad["setup_comands"] = ["x"]
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(prepare_config(bad))


STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$CALLS"
case "$(basename "$0") $*" in
  *"hostname --ip-address"*) echo 10.0.0.1 ;;
  "scontrol show hostnames"*) printf 'n1\\nn2\\n' ;;
  "python -"*) echo 16 ;;
esac
exit 0
"""


def test_slurm_script_gives_every_srun_step_its_cpus(tmp_path):
    """Run the script with stand-ins for srun, scontrol, sleep and python that record what it asks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sleep", "python"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(bin_dir / "python")
    (venv / "bin" / "activate").write_text("")
    calls = tmp_path / "calls"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls), VENV=str(venv), SLURM_JOB_ID="7",
                    SLURM_JOB_NODELIST="n[1-2]", SLURM_GPUS_ON_NODE="8", SLURM_CPUS_PER_TASK="48",
                    SLURM_SUBMIT_DIR=str(ROOT), OUTPUT_DIR=str(tmp_path / "runs"))
    res = subprocess.run(["bash", str(CLUSTER / "slurm.sbatch")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = calls.read_text().splitlines()
    sruns = [x for x in lines if x.startswith("srun ")]
    assert len(sruns) == 3 and all("--cpus-per-task=" in x for x in sruns)  # hostname, head, one worker
    starts = [x for x in sruns if "ray start" in x]
    assert len(starts) == 2 and all("--cpus-per-task=48" in x and "--num-cpus=48" in x for x in starts)
    (job,) = [x for x in lines if x.startswith("python cluster/submit.py")]
    assert "--address http://10.0.0.1:8265" in job and "--wait" in job and "run.name=qwen3-8b-math-cot-20k-7" in job
    missing = subprocess.run(["bash", str(CLUSTER / "slurm.sbatch")], env={**env, "VENV": str(tmp_path / "none")},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "make install-gpu" in missing.stderr


def test_custom_resources_go_into_bundles_and_the_fit_check():
    from opsd_ray.run.cluster import role_bundle

    cfg = load_train_config(["model=tiny", "learner.resources.big_gpu=1", "learner.num_workers=2",
                             "train.batch_size=4", "learner.micro_batch_size=2"])
    learner = next(r for r in role_requests(cfg) if r.role == "learner")
    assert learner.count == 2 and role_bundle(learner)["big_gpu"] == 1
    check_fits(role_requests(cfg), {"CPU": 8.0, "big_gpu": 2.0})
    with pytest.raises(ConfigError, match="need 2 of the custom resource 'big_gpu'.*has 1"):
        check_fits(role_requests(cfg), {"CPU": 8.0, "big_gpu": 1.0})


@pytest.mark.slow
def test_actors_without_gpus_see_no_gpu_on_a_node_that_has_some(monkeypatch):
    """Ray (>= 2.48) leaves CUDA_VISIBLE_DEVICES alone for an actor with num_gpus=0: a CPU role on a GPU
    node would load onto GPU 0. Every role's actors are placed by cluster.placed, which hides the GPUs
    from zero-GPU actors; the job's other variables still reach them (the runtime_envs merge)."""
    import ray

    from opsd_ray.run.cluster import placed, role_placement_group, runtime_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the driver's (and so the raylet's) environment
    cfg = load_train_config(["model=tiny", "data=gsm8k", "learner.num_workers=2", "train.batch_size=8",
                             "learner.micro_batch_size=2", "scoring.num_workers=2"])

    class Probe:
        def env(self):
            return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_WAIT_POLICY")

    own_ray(num_cpus=8, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env=runtime_env())
    try:
        seen = {}
        for request in role_requests(cfg):
            assert request.gpus == 0
            pg = role_placement_group(request)
            actors = [placed(ray.remote(Probe), request, i, pg).remote() for i in range(request.count)]
            seen[request.role] = ray.get([a.env.remote() for a in actors])
        assert seen == {"rollout": [("", "PASSIVE")], "scoring": [("", "PASSIVE")] * 2,
                        "learner": [("", "PASSIVE")] * 2}
        unplaced = ray.remote(num_cpus=0)(Probe).remote()
        assert ray.get(unplaced.env.remote())[0] == "0,1"  # the premise: Ray itself leaves them visible
    finally:
        ray.shutdown()
