"""What every worker process does for itself: its compute threads, and where it runs (the driver prints it)."""

from __future__ import annotations

import os
import resource
import socket
import time

import torch


def use_cores(threads: int | list[int] | None) -> None:
    """An actor's compute threads: a count, or a list of cores it is pinned to (benchmarks pin each role
    to its own cores, as separate GPUs would be)."""
    if isinstance(threads, list | tuple):
        os.sched_setaffinity(0, threads)
        torch.set_num_threads(len(threads))
    elif threads:
        torch.set_num_threads(threads)


def worker_info(role: str, started: float) -> dict:
    """Where an actor runs and when it was constructed (the driver prints it and orders start-up by it)."""
    import ray

    # The GPU ids Ray gave the actor, not torch.cuda.get_device_name(): that would create a CUDA
    # context (hundreds of MiB) in a vLLM actor whose engine runs in other processes.
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {
        "role": role,
        "host": socket.gethostname(),
        "node": node,
        "pid": os.getpid(),
        "device": f"gpu {gpus}" if gpus and torch.cuda.is_available() else "cpu",
        "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "started": started,
        "ready": time.time(),
    }


def peak_memory() -> dict:
    """This process's peak memory: on a GPU what torch allocated at most, on the CPU the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"bytes": torch.cuda.max_memory_allocated(), "how": "torch.cuda.max_memory_allocated"}
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "how": "peak RSS"}
