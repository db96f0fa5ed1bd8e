"""The console of a run is for people: what runs where, progress, evaluations, warnings, where things are.

The engines' chatter (vLLM's config dump, model-loading bars, Ray's worker output and the raylet's
messages) goes to runs/<name>/logs/engines.log instead; `opsd-ray train --verbose`
(logging.verbose=true) keeps it on the console as well.

Ray forwards every actor's stdout and stderr to the driver and prints them with
`ray._private.worker.print_worker_logs`, also the raylet's error messages; `engine_logs` swaps that
printer for one that writes to the log file while the run lasts. It is Ray's private API (checked
against Ray 2.60): if it is missing, the console says so once and the logs stay on the console.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import threading
from pathlib import Path


def say(message: str) -> None:
    """A line for the user, printed above the progress bar (tqdm keeps the bar at the bottom)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


class EngineLog:
    """An append-only text file the engines' lines go to, prefixed like Ray's console lines."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.lock = path, threading.Lock()
        self.file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed by close())

    def write(self, lines: list[str]) -> None:
        """Whole lines, from any thread (Ray's log thread, the driver's loggers)."""
        with self.lock:
            for line in lines:
                self.file.write(line + "\n")

    def write_ray_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{', ip=' + data['ip'] if data.get('ip') else ''}) "
        self.write([prefix + line for line in data.get("lines", [])])

    def close(self) -> None:
        with self.lock:
            self.file.close()


@contextlib.contextmanager
def engine_logs(run, verbose: bool):
    """While the run lasts, Ray's worker and raylet output and the driver's Ray log records go to
    <run>/logs/engines.log; with `verbose` to the console as well (Ray's errors always). Yields the
    log's location."""
    local = run.local_path("logs")
    path = (local or Path(tempfile.mkdtemp(prefix="opsd_ray_logs_"))) / "engines.log"
    log = EngineLog(path)
    restore = _route_ray(log, verbose)
    # Log records no handler takes reach logging.lastResort, which prints warnings to stderr: here
    # they go to the file, errors to both. Ray's logger gets no handler of its own meanwhile (init_ray's
    # ray.init(configure_logging=False) also clears them), so its records take that path.
    last_resort, logging.lastResort = logging.lastResort, ToFile(log, verbose)
    ray_logger = logging.getLogger("ray")
    ray_handlers, ray_logger.handlers = ray_logger.handlers, []
    where = run.uri("logs/engines.log")
    if restore is None:
        say(f"engine logs: this Ray version has no print_worker_logs to redirect; they stay on the console "
            f"(Ray's own log records go to {where})")
    elif not verbose:
        say(f"engine and worker logs: {where} (--verbose shows them here too)")
    try:
        yield where
    finally:
        if restore is not None:
            restore()
        logging.lastResort = last_resort
        ray_logger.handlers = ray_handlers
        log.close()
        if local is None:  # a remote run folder: the log goes there at the end
            run.write_bytes("logs/engines.log", path.read_bytes())


class ToFile(logging.Handler):
    """Records to the engine log; errors (every record when verbose) to stderr as well."""

    def __init__(self, log: EngineLog, verbose: bool):
        super().__init__(logging.WARNING)
        self.log, self.verbose = log, verbose
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.log.write([line])
        if self.verbose or record.levelno >= logging.ERROR:
            print(line, file=sys.stderr)


def _route_ray(log: EngineLog, verbose: bool):
    """Swap Ray's driver-side printer of worker lines; returns the function that puts it back."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return None
    original = getattr(ray_worker, "print_worker_logs", None)
    if original is None:
        return None

    def print_worker_logs(data, print_file, ignore_prefix=False):
        log.write_ray_lines(data)
        if verbose:
            original(data, print_file, ignore_prefix)

    ray_worker.print_worker_logs = print_worker_logs

    def restore():
        ray_worker.print_worker_logs = original

    return restore
