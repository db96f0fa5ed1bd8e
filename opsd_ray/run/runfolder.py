"""The run folder, owned by the driver: a local path or a URI that pyarrow's filesystems understand
(file://, s3://, gs://, hdfs://).

Every output reaches it from the driver: learners hand checkpoints and the final adapter over as
bytes through Ray's object store, evaluation records come back from the rollout workers, so no
node needs to see another's disk. On a local filesystem a folder appears through one rename (its
existence means it is complete); on object stores, where renames are copies, the files are written
in place with the completion marker (trainer_state.json) last.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from opsd_ray.common import ConfigError, RunStopped, jsonl_records


class WriteFailed(OSError):
    """A write to the run folder failed (a full disk, a storage error). What was complete before is
    intact: a folder being replaced stays until its new version is complete, a line is appended whole
    or not at all."""


class RunFolder:
    def __init__(self, location: str, filesystem=None):
        """`filesystem`: a pyarrow FileSystem to use with `location` as its path (tests)."""
        from pyarrow import fs

        self.location = str(location)
        if filesystem is not None:
            self.fs, self.root = filesystem, self.location
        elif "://" in self.location:
            self.fs, self.root = fs.FileSystem.from_uri(self.location)
        else:
            self.fs, self.root = fs.LocalFileSystem(), str(Path(self.location).expanduser().resolve())
        self.is_local = isinstance(self.fs, fs.LocalFileSystem)
        self.fs.create_dir(self.root, recursive=True)

    def __str__(self) -> str:
        return self.root if self.is_local else self.location

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> Path | None:
        """The same place as a local Path (None on remote filesystems)."""
        return Path(self.path(rel)) if self.is_local else None

    def uri(self, rel: str = "") -> str:
        """Where `rel` is, as a user would write it (a path when local)."""
        return self.path(rel) if self.is_local else posixpath.join(self.location, rel)

    # ---------------------------------------------------------------- files
    def exists(self, rel: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self.path(rel)).type != fs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        from pyarrow import fs

        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(fs.FileSelector(self.path(rel)))
        return sorted(posixpath.basename(i.path) for i in infos)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole-file write; atomic on a local filesystem (a temp file, then a rename)."""
        with self._writing(rel):
            self._write_bytes(rel, data)

    def _write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        tmp = _temp_beside(target)
        dest = tmp if self.is_local else target
        try:
            with self.fs.open_output_stream(dest) as f:
                f.write(data)
        except BaseException:  # a full disk: no temp file left behind, the old file stays as it was
            if self.is_local:
                _remove_quietly(self.fs, tmp, folder=False)
            raise
        if self.is_local:
            self.fs.move(tmp, target)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def append_text(self, rel: str, text: str) -> None:
        with self._writing(rel):
            self._append_text(rel, text)

    def _append_text(self, rel: str, text: str) -> None:
        """Append whole lines: locally in one O_APPEND write, synced, and cut back to the old end if the
        write fails (a full disk), so the file never holds half a line; read and rewrite where the
        filesystem has no append (object stores), so a failed write leaves the old file."""
        if self.is_local:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            data = text.encode()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                end = os.fstat(fd).st_size
                try:
                    done = 0
                    while done < len(data):
                        done += os.write(fd, data[done:])
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, end)
                    raise
            finally:
                os.close(fd)
            return
        old = self.read_text(rel) if self.exists(rel) else ""
        self._write_bytes(rel, (old + text).encode())

    def write_files(self, rel: str, files: dict[str, bytes], last: str | None = None) -> str:
        with self._writing(rel):
            return self._write_files(rel, files, last)

    @contextmanager
    def _writing(self, rel: str):
        try:
            yield
        except WriteFailed:
            raise
        except OSError as e:
            raise WriteFailed(f"writing {self.uri(rel)} failed: {type(e).__name__}: {e}") from e

    def _write_files(self, rel: str, files: dict[str, bytes], last: str | None = None) -> str:
        """A folder of files, replacing any folder there. Local: written to a temp folder and renamed,
        so it appears complete or not at all. Elsewhere: written in place, `last` (the completion
        marker) after every other file."""
        target = self.path(rel)
        order = sorted(files, key=lambda name: name == last)
        if self.is_local:
            tmp = _temp_beside(target)
            self.fs.create_dir(tmp, recursive=True)
            try:
                for name in order:
                    with self.fs.open_output_stream(posixpath.join(tmp, name)) as f:
                        f.write(files[name])
            except BaseException:  # a full disk: the half-written folder goes, what was there stays
                _remove_quietly(self.fs, tmp, folder=True)
                raise
            aside = f"{tmp}.old" if self.exists(rel) else None
            if aside:  # renames need no space: the old folder goes only once the new one is in place
                self.fs.move(target, aside)
            self.fs.move(tmp, target)
            if aside:
                _remove_quietly(self.fs, aside, folder=True)
        else:
            if self.exists(rel):
                self.fs.delete_dir(target)
            self.fs.create_dir(target, recursive=True)
            for name in order:
                with self.fs.open_output_stream(posixpath.join(target, name)) as f:
                    f.write(files[name])
        return self.uri(rel)

    def read_jsonl(self, rel: str) -> list[dict]:
        """The records of a jsonl file (see `jsonl_records`)."""
        return jsonl_records(self.read_text(rel)) if self.exists(rel) else []

    def read_files(self, rel: str) -> dict[str, bytes]:
        return {name: self.read_bytes(posixpath.join(rel, name)) for name in self.listdir(rel)
                if not name.startswith(".")}


class DriverLock:
    """One driver per run: `driver.lock` in the run folder names the driver training it, with a heartbeat
    a thread refreshes every `beat_s`. A resubmitted job (a KubeRay retry, `make submit` again) with the
    same run.name takes the run over once the old driver is gone: at once when its process has exited on
    this host, else when its heartbeat is `stale_s` old (it may have run on a node that is gone; hosts'
    clocks are taken to agree, as NTP keeps them). While the old driver lives, the new one is refused.
    A driver whose lock another driver has taken over (its storage was away for longer than stale_s)
    learns it at its next beat, and `check` stops it."""

    NAME = "driver.lock"

    def __init__(self, run: RunFolder, stale_s: float = 90.0, beat_s: float = 15.0, settle_s: float | None = None):
        import socket

        self.run, self.stale_s, self.beat_s = run, stale_s, beat_s
        # how long a write may take to show: a local file at once, an object store's in about a second
        self.settle_s = settle_s if settle_s is not None else (0.1 if run.is_local else 1.0)
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = self._thread = self.taken_by = None

    def holder(self) -> dict | None:
        """The live driver holding the run, if any (not this process). A missing or half-written lock
        holds nothing: its writer did not get far."""
        info = self._other()
        if info is None:
            return None
        if info.get("host") == self.me["host"] and not _alive(int(info.get("pid", -1))):
            return None
        if time.time() - float(info.get("heartbeat", 0)) > self.stale_s:
            return None
        return info

    def acquire(self) -> None:
        """Take the run; waits up to stale_s for a driver on another host to stop beating (a retried
        job starts while the lost driver's last heartbeat is still fresh), then refuses."""

        other, told = self.holder(), False
        deadline = time.time() + self.stale_s + self.beat_s
        while other is not None and other.get("host") != self.me["host"] and time.time() < deadline:
            if not told:
                print(f"run {self.run}: waiting for the driver on {other['host']} (pid {other['pid']}) to stop; "
                      f"its heartbeat counts as stale after {self.stale_s:.0f} s", flush=True)
                told = True
            time.sleep(min(5.0, self.beat_s))
            other = self.holder()
        if other is not None:
            age = time.time() - float(other["heartbeat"])
            raise ConfigError(
                f"run {self.run} is being trained by another driver ({other['host']} pid {other['pid']}, heartbeat "
                f"{age:.0f} s ago): stop it first, or pick another run.name"
            )
        self._beat()
        time.sleep(self.settle_s)  # two drivers that start together: the last to write keeps it
        other = self._other()
        if other is not None:
            raise ConfigError(f"run {self.run}: another driver ({other.get('host')} pid {other.get('pid')}) "
                              "started on it at the same moment: stop it first, or pick another run.name")
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="driver-lock-heartbeat")
        self._thread.start()

    def _other(self) -> dict | None:
        """The driver the lock file names, when it is not this one."""
        try:
            info = json.loads(self.run.read_text(self.NAME)) if self.run.exists(self.NAME) else {}
        except (ValueError, OSError):
            return None
        if not isinstance(info, dict) or not info:
            return None
        return None if {k: info.get(k) for k in self.me} == self.me else info

    def _beat(self) -> None:
        self.run.write_text(self.NAME, json.dumps({**self.me, "heartbeat": time.time()}))

    def _loop(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self.taken_by = self._other()
                if self.taken_by is not None:
                    return  # another driver has the run now: check() stops this one
                self._beat()
            except OSError:  # a storage hiccup: the next beat tries again
                pass

    def check(self) -> None:
        """RunStopped when another driver has taken the run over."""

        if self.taken_by is not None:
            raise RunStopped(
                f"run {self.run} was taken over by another driver ({self.taken_by.get('host')} pid "
                f"{self.taken_by.get('pid')}): this driver's heartbeat did not reach the run folder for more "
                f"than {self.stale_s:.0f} s. This one stops; the other continues the run")

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()  # a beat in progress would write the lock again
        try:
            if self.run.exists(self.NAME) and self._other() is None:
                self.run.fs.delete_file(self.run.path(self.NAME))
            local = self.run.local_path()
            if local is not None and local.is_dir() and not any(local.iterdir()):
                local.rmdir()  # a run refused before it wrote anything leaves no folder
        except OSError:  # left behind, it is taken over: its pid is gone
            pass





def _temp_beside(target: str) -> str:
    """A hidden, unique name next to `target`: readers skip it, a rename makes it the target."""
    return posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}.tmp-{uuid.uuid4().hex[:8]}")


def _remove_quietly(fs, path: str, folder: bool) -> None:
    try:
        fs.delete_dir(path) if folder else fs.delete_file(path)
    except OSError:  # it may not exist yet
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
