"""Ray plumbing: start or join Ray, check that the roles fit, place actors in placement groups."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field

from opsd_ray.common import ConfigError


@dataclass
class RoleRequest:
    role: str
    count: int
    cpus: float
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker

    def total(self) -> tuple[float, float]:
        return self.count * self.cpus, self.count * self.gpus


def role_requests(cfg) -> list[RoleRequest]:
    ro, sc, le = cfg.rollout, cfg.scoring, cfg.learner
    return [
        RoleRequest(
            "rollout", ro.num_workers, ro.cpus_per_worker, ro.gpus_per_worker * ro.tensor_parallel_size,
            dict(ro.resources),
        ),
        RoleRequest("scoring", sc.num_workers, sc.cpus_per_worker, sc.gpus_per_worker, dict(sc.resources)),
        RoleRequest("learner", le.num_workers, le.cpus_per_worker, le.gpus_per_worker, dict(le.resources)),
    ]


def check_fits(requests: list[RoleRequest], available: dict[str, float]) -> None:
    """Fail before anything loads: what was asked, what exists, what to change."""
    custom = resources_of(requests)  # what the placement groups will hold
    need_cpu, need_gpu = custom.pop("CPU", 0.0), custom.pop("GPU", 0.0)
    have_cpu, have_gpu = available.get("CPU", 0.0), available.get("GPU", 0.0)
    for name, need in custom.items():
        if need > available.get(name, 0.0) + 1e-9:
            raise ConfigError(
                f"the roles need {need:g} of the custom resource '{name}' (<role>.resources) but the Ray cluster "
                f"has {available.get(name, 0.0):g}: start the nodes meant for them with "
                f"`ray start --resources='{{\"{name}\": <n>}}'`, or drop the setting"
            )
    if need_cpu <= have_cpu + 1e-9 and need_gpu <= have_gpu + 1e-9:
        return
    asked = "; ".join(f"{r.role}: {r.count} x ({r.cpus:g} CPU, {r.gpus:g} GPU)" for r in requests)
    raise ConfigError(
        f"the roles need {need_cpu:g} CPUs and {need_gpu:g} GPUs ({asked}) but the Ray cluster has "
        f"{have_cpu:g} CPUs and {have_gpu:g} GPUs. Lower rollout.num_workers / scoring.num_workers or the "
        "per-worker cpus_per_worker / gpus_per_worker / learner.gpus_per_worker, or add nodes to the cluster "
        "(`opsd-ray plan model=<m> data=<d> gpus=<n>` suggests a split of n GPUs)."
    )


# What runtime_env() sets for every actor (cluster/submit.py puts these on the job's entrypoint).
FORWARDED_ENV = ("TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "OMP_WAIT_POLICY", "OPSD_RAY_CACHE", "OPSD_RAY_RECIPES")


def runtime_env() -> dict:
    """Environment every actor gets: offline flags, our cache and recipes, quiet OpenMP threads."""
    env_vars = {
        "TOKENIZERS_PARALLELISM": "false",
        # Roles take turns on the same cores; OpenMP threads that spin while idle steal them from
        # the role that is working (5-7x slower 2-thread matmuls measured on a shared CPU node).
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    # Only what the driver has: an unset HF_HUB_OFFLINE must not override an offline node's own setting.
    for key in ("HF_HUB_OFFLINE", "OPSD_RAY_CACHE", "OPSD_RAY_RECIPES"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    return {"env_vars": env_vars}


def init_ray(cfg) -> bool:
    """Join $RAY_ADDRESS / ray.address when given, else start local Ray (dashboard off, loopback only).
    False when this process was already connected to Ray (the caller's to stop)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    env = runtime_env()
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True, configure_logging=False)
        return True
    # Local: logical CPUs may exceed the physical ones so fractional roles always fit on one machine.
    need = sum(r.total()[0] for r in role_requests(cfg))
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, int(need + 0.999))
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        runtime_env=env,
        log_to_driver=True,
        configure_logging=False,
    )
    return True


def placed(actor_cls, request: RoleRequest, index: int, pg, max_restarts: int = 0):
    """Actor options for bundle `index` of the role's placement group. With max_restarts, Ray restarts
    a lost actor in the same bundle (its calls in flight fail; the driver redoes them)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = {"num_cpus": request.cpus, "num_gpus": request.gpus, "resources": dict(request.resources),
            "max_restarts": max_restarts}
    if request.gpus == 0:
        # Ray (>= 2.48) leaves CUDA_VISIBLE_DEVICES as the node has it for actors without GPUs, so a CPU
        # role would see, and load onto, GPU 0. Its env_vars merge with the job's runtime_env.
        opts["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
    return actor_cls.options(**opts)


def start_actors(request: RoleRequest, cls, max_restarts: int, args: list[tuple], claimed=None) -> tuple:
    """A role's actors, their placement group and handles of their info: `claimed` ones (actors and their
    group, from a pool) reset to what new ones built from `args` would be, or new ones, placed."""
    import ray

    if claimed is not None:
        actors, pg = claimed
        return actors, pg, [a.reset.remote(*a_args) for a, a_args in zip(actors, args)]
    pg = role_placement_group(request)
    actors = [placed(ray.remote(cls), request, i, pg, max_restarts).remote(*a_args) for i, a_args in enumerate(args)]
    return actors, pg, [a.ready.remote() for a in actors]


def role_bundle(request: RoleRequest) -> dict[str, float]:
    """One worker's bundle. A tensor-parallel rollout worker asks for all its GPUs in one bundle: its
    actor holds them and vLLM's "mp" executor runs one process per GPU (rollout.vllm_engine_args)."""
    bundle = {k: v for k, v in (("CPU", request.cpus), ("GPU", request.gpus)) if v > 0}
    return {**bundle, **{k: v for k, v in request.resources.items() if v > 0}}


def resources_of(requests) -> Counter:
    """What the roles' placement groups hold together, by resource name."""
    total = Counter()
    for r in requests:
        total.update({k: v * r.count for k, v in role_bundle(r).items()})
    return total


_PLACEMENT_GROUPS = itertools.count()  # this process's placement groups, numbered


def role_placement_group(request: RoleRequest, timeout_s: float = 600):
    """One bundle per worker, packed; None when a worker asks for no resources at all."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = role_bundle(request)
    if not bundle:
        return None
    pg = placement_group(
        [dict(bundle) for _ in range(request.count)],
        strategy="PACK",
        name=f"opsd_ray_{request.role}_{os.getpid()}_{next(_PLACEMENT_GROUPS)}",  # a driver may hold several (a pool)
    )
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)  # granted later, it would hold resources no run owns
        raise ConfigError(
            f"placement group for {request.role} ({request.count} x {bundle}) not ready after "
            f"{timeout_s:.0f}s: the cluster cannot place it"
        ) from None
    return pg
