"""Submit `opsd-ray train` to a running Ray cluster as a Ray job (what `make submit` runs).

    python cluster/submit.py --address http://head:8265 model=qwen3-8b data=math-cot-20k \
        run.output_dir=/shared/runs [--wait] [--env KEY=VALUE ...] [key=value ...]

The job runs `python -m opsd_ray train <overrides>` on the head node with this repository as its
working directory (uploaded by Ray, without runs/, .venv/ and caches), so the cluster gets the code
and recipes of this checkout. The cluster's Python must already have opsd_ray's dependencies (an
image or environment built with `make install-gpu`, or add `--pip` to install them per job, slower).
Keys and presets are checked here before anything is sent; values and data paths on the cluster.
Every job gets a fixed run.name (yours, or <model>-<data>-<mode>-<time> chosen here), so that the same
command with that run.name, submitted again after a failure, continues the run (checkpoint.resume=auto).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # opsd_ray of this checkout, installed or not

from opsd_ray.config.recipes import Config, ConfigError, compose, parse_overrides  # noqa: E402
from opsd_ray.run.cluster import FORWARDED_ENV  # noqa: E402

# Left out of the upload: outputs, environments, caches (the upload is bounded by the gRPC message size).
EXCLUDES = ["runs/", ".venv/", "**/__pycache__/", ".git/", ".pytest_cache/", ".ruff_cache/", ".hypothesis/",
            "*.egg-info/", "bench/results/", ".cache/", "build/", "*.whl"]
# The driver's init_ray forwards FORWARDED_ENV to every actor with its own ray.init(runtime_env=...), and
# Ray refuses to merge a job's env_vars with ray.init's when both set a key: those go on the entrypoint.


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="the cluster's dashboard address, e.g. http://head:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable)")
    p.add_argument("--python", default="python", help="the cluster's Python (default: python)")
    p.add_argument("--pip", action="store_true", help="install opsd_ray's dependencies per job (runtime_env pip)")
    p.add_argument("--submission-id", default=None, help="job id (default: opsd-<run name>[-<time>])")
    p.add_argument("--wait", action="store_true", help="follow the logs and exit with the job's status")
    p.add_argument("--dry-run", action="store_true", help="print the command, submit nothing")
    p.add_argument("overrides", nargs="*", help="model=<preset> data=<preset> section.key=value ...")
    return p.parse_args(argv)


def check_overrides(overrides: list[str]) -> tuple[dict[str, str], str]:
    """Fail here, not on the cluster, on unknown keys and presets (paths are the cluster's). Returns the
    overrides and the run name: the user's, or the one the driver would choose, fixed now."""
    parsed = parse_overrides(overrides)
    rest = dict(parsed)
    presets = {"model": rest.pop("model", "smollm2-135m"), "data": rest.pop("data", "gsm8k")}
    cfg = compose(Config, presets, rest)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return parsed, cfg.run.name or f"{cfg.model.name}-{cfg.data.name}-{cfg.objective.mode}-{stamp}"


def runtime_env(env: dict[str, str], pip: bool) -> dict:
    renv: dict = {"working_dir": str(ROOT), "excludes": EXCLUDES}
    job_env = {k: v for k, v in env.items() if k not in FORWARDED_ENV}
    if job_env:
        renv["env_vars"] = job_env
    if pip:
        import tomllib  # Python 3.11+, on the submitting machine only

        renv["pip"] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return renv


def entrypoint(python: str, overrides: list[str], env: dict[str, str]) -> list[str]:
    driver_env = [f"{k}={v}" for k, v in env.items() if k in FORWARDED_ENV]
    return (["env", *driver_env] if driver_env else []) + [python, "-m", "opsd_ray", "train", *overrides]


def cli_env() -> dict[str, str]:
    """The job CLI sends the cluster's token only in token mode: turn it on when a token is at hand."""
    env = dict(os.environ)
    has_token = env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray/auth_token").exists()
    if "RAY_AUTH_MODE" not in env and has_token:
        env["RAY_AUTH_MODE"] = "token"
    return env


def ray_cli() -> str:
    beside = Path(sys.executable).parent / "ray"  # the ray of this Python's environment first
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if not a.address:
        print("submit: error: no cluster address: pass RAY_ADDRESS=http://<head>:8265 (the dashboard port)",
              file=sys.stderr)
        return 2
    try:
        parsed, name = check_overrides(a.overrides)
        env = dict(parse_overrides(a.env))
    except ConfigError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    named = bool(parsed.get("run.name"))
    overrides = a.overrides if named else [*a.overrides, f"run.name={name}"]
    # unique per submission (Ray refuses a job id twice): a name chosen here has the time in it already
    job_id = a.submission_id or (f"opsd-{name}-{time.strftime('%Y%m%d-%H%M%S')}" if named else f"opsd-{name}")
    cmd = [ray_cli(), "job", "submit", "--address", a.address, "--submission-id", job_id,
           "--runtime-env-json", json.dumps(runtime_env(env, a.pip))]
    cmd += ([] if a.wait else ["--no-wait"]) + ["--", *entrypoint(a.python, overrides, env)]
    if "run.output_dir" not in parsed:
        print("note: run.output_dir is not set: outputs go to runs/ inside the job's temporary working directory "
              "on the head node; pass OUTPUT_DIR=/shared/storage (make) or run.output_dir=... to keep them")
    print(f"run {name}: after a failure, submit the same again with run.name={name} (it continues from its "
          "newest checkpoint)")
    print("+ " + shlex.join(cmd), flush=True)
    if a.dry_run:
        return 0
    rc = subprocess.call(cmd, env=cli_env())
    ray = shlex.quote(ray_cli())
    print(f"\njob {job_id} on {a.address}\n"
          f"  follow the logs:  {ray} job logs --address {a.address} --follow {job_id}\n"
          f"  status:           {ray} job status --address {a.address} {job_id}\n"
          f"  stop it:          {ray} job stop --address {a.address} {job_id}\n"
          f"  dashboard:        {a.address}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
