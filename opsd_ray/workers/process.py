"""What every worker process does for itself: its compute threads, and where it runs (the driver prints it)."""

from __future__ import annotations

import ctypes
import gc
import os
import re
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
    """This process's peak memory since it started or was reset: on a GPU what torch allocated at most,
    on the CPU the peak RSS (Linux's VmHWM, which `reset_peak_memory` can start over)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"bytes": torch.cuda.max_memory_allocated(), "how": "torch.cuda.max_memory_allocated"}
    try:
        with open("/proc/self/status") as f:
            return {"bytes": int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024, "how": "peak RSS"}
    except (OSError, AttributeError):  # not Linux: the process's lifetime peak
        return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "how": "peak RSS"}


def free_memory() -> None:
    """Hand what was freed back: to the GPU's allocator pool, and (glibc) the heap's free pages to the OS,
    so that the resident set, and a peak measured from now, start from what is still in use."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_memory() -> None:
    """Start the peak over: a worker reused by a later run reports that run's peak, not an earlier one's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


class Reusable:
    """A worker that a later run in the same driver process can reuse (opsd_ray.run.pool): `reset(*args)`
    makes it what a new worker built with those arguments would be, in the same process, whose imports
    and tokenizer stay loaded (most of a worker's start on a CPU)."""

    def reset(self, *args) -> dict:
        self.release()
        vars(self).clear()  # the old model, optimizer and gradients go before the new ones load
        free_memory()
        reset_peak_memory()
        self.__init__(*args)
        return self.ready()

    def release(self) -> None:
        """What the worker holds outside its own objects (a process group, files on disk): let go of it."""
