"""The run folder on a local disk, a file:// URI and a filesystem without renames (pyarrow's mock), and
one driver per run."""

import pytest

from opsd_ray.run.runfolder import RunFolder


@pytest.fixture(params=["path", "file-uri", "object-store"])
def run(request, tmp_path):
    if request.param == "path":
        return RunFolder(str(tmp_path / "r"))
    if request.param == "file-uri":
        return RunFolder(f"file://{tmp_path / 'r'}")
    from pyarrow import fs

    return RunFolder("bucket/r", filesystem=fs._MockFileSystem())  # no atomic rename: written in place


def test_files_round_trip(run):
    run.write_text("config.yaml", "a: 1\n")
    assert run.read_text("config.yaml") == "a: 1\n" and run.exists("config.yaml")
    run.append_text("metrics.jsonl", '{"step": 1}\n')
    run.append_text("metrics.jsonl", '{"step": 2}\n')
    assert run.read_text("metrics.jsonl").splitlines() == ['{"step": 1}', '{"step": 2}']
    files = {"adapter_model.safetensors": b"\0\1", "trainer_state.json": b"{}", "rng.pt": b"r"}
    run.write_files("checkpoints/step_2", files, last="trainer_state.json")
    run.write_files("checkpoints/step_2", {**files, "rng.pt": b"new"}, last="trainer_state.json")  # replaces
    assert run.read_files("checkpoints/step_2") == {**files, "rng.pt": b"new"}
    assert run.listdir("checkpoints") == ["step_2"] and run.listdir("nothing") == []
    assert run.is_local == (run.local_path() is not None)


class Spy:
    """A pyarrow filesystem whose open_output_stream calls `hook(path)` first."""

    def __init__(self, fs, hook):
        self.fs, self.hook = fs, hook

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_output_stream(self, path):
        self.hook(path)
        return self.fs.open_output_stream(path)


def test_local_folders_appear_in_one_rename(tmp_path):
    """A write that fails mid-folder (a full disk) leaves the previous checkpoint as it was and no temp
    folder; one a killed writer left (hidden) is never taken for a checkpoint."""
    from opsd_ray.run.checkpoints import latest_checkpoint
    from opsd_ray.run.runfolder import WriteFailed

    run = RunFolder(str(tmp_path / "r"))
    run.write_files("checkpoints/step_1", {"a": b"1", "trainer_state.json": b"{}"}, last="trainer_state.json")
    calls = []

    def fail_second(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    real, run.fs = run.fs, Spy(run.fs, fail_second)
    with pytest.raises(WriteFailed, match="checkpoints/step_2 failed: OSError: .Errno 28. No space left"):
        run.write_files("checkpoints/step_2", {"a": b"2", "trainer_state.json": b"{}"}, last="trainer_state.json")
    run.fs = real
    assert run.listdir("checkpoints") == ["step_1"] and run.read_bytes("checkpoints/step_1/a") == b"1"
    (tmp_path / "r" / "checkpoints" / ".step_3.tmp-12345678").mkdir()  # a writer killed mid-folder
    (tmp_path / "r" / "checkpoints" / ".step_3.tmp-12345678" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(run) == "checkpoints/step_1"


def test_the_completion_marker_is_written_last_where_there_is_no_rename():
    from pyarrow import fs

    written = []
    run = RunFolder("b/r", filesystem=fs._MockFileSystem())
    run.fs = Spy(run.fs, written.append)
    run.write_files("checkpoints/step_3", {"trainer_state.json": b"{}", "optimizer.pt": b"o", "a.json": b"a"},
                    last="trainer_state.json")
    assert len(written) == 3 and written[-1].endswith("trainer_state.json")


# ----------------------------------------------------------------------------- one driver per run
def test_a_live_driver_keeps_the_run_and_a_dead_or_silent_one_is_taken_over(tmp_path, capsys):
    import json
    import socket
    import subprocess
    import time

    from opsd_ray.config.recipes import ConfigError
    from opsd_ray.run.runfolder import DriverLock

    run = RunFolder(str(tmp_path))
    here = socket.gethostname()
    other = subprocess.Popen(["sleep", "60"])  # a live driver on this host
    try:
        run.write_text("driver.lock", json.dumps({"host": here, "pid": other.pid, "heartbeat": time.time()}))
        with pytest.raises(ConfigError, match=f"being trained by another driver .{here} pid {other.pid}"):
            DriverLock(run).acquire()
    finally:
        other.kill()
        other.wait()
    lock = DriverLock(run, beat_s=0.05)  # its process has exited: taken over at once, even with a fresh heartbeat
    lock.acquire()
    first = json.loads(run.read_text("driver.lock"))
    assert (first["host"], first["pid"]) == (here, lock.me["pid"])
    time.sleep(0.3)
    assert json.loads(run.read_text("driver.lock"))["heartbeat"] > first["heartbeat"]  # the thread beats
    lock.release()
    assert not run.exists("driver.lock")

    # another host: a fresh heartbeat is waited on until it is stale_s old; one that keeps beating is refused
    run.write_text("driver.lock", json.dumps({"host": "node-gone", "pid": 1, "heartbeat": time.time() - 0.5}))
    lock = DriverLock(run, stale_s=1.0, beat_s=0.1)
    lock.acquire()
    assert "waiting for the driver on node-gone (pid 1) to stop" in capsys.readouterr().out
    lock.release()
    run.write_text("driver.lock", json.dumps({"host": "node-b", "pid": 1, "heartbeat": time.time() + 60}))
    with pytest.raises(ConfigError, match="node-b pid 1"):
        DriverLock(run, stale_s=0.5, beat_s=0.1).acquire()
    run.write_text("driver.lock", "{half a lo")  # a lock its writer never finished: no holder
    lock = DriverLock(run)
    lock.acquire()
    lock.release()


def test_of_two_drivers_starting_together_one_keeps_the_run_and_a_driver_taken_over_stops(tmp_path):
    import json
    import threading
    import time

    from opsd_ray.config.recipes import ConfigError, RunStopped
    from opsd_ray.run.runfolder import DriverLock

    run = RunFolder(str(tmp_path))
    # b starts while a waits after writing; stale_s=0 lets b pass its first look as if a had not written yet
    a, b = DriverLock(run, beat_s=0.5, settle_s=0.5), DriverLock(run, stale_s=0, beat_s=0.5, settle_s=0.5)
    b.me = {"host": "node-b", "pid": 2}
    outcome = {}

    def start(name, lock, delay):
        time.sleep(delay)
        try:
            lock.acquire()
            outcome[name] = "runs"
        except ConfigError as e:
            outcome[name] = str(e)

    threads = [threading.Thread(target=start, args=("a", a, 0)), threading.Thread(target=start, args=("b", b, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome["b"] == "runs" and "node-b pid 2) started on it at the same moment" in outcome["a"]

    # b's storage was away: a third driver took the run over. b learns it at its next beat and stops.
    run.write_text("driver.lock", json.dumps({"host": "node-c", "pid": 3, "heartbeat": time.time()}))
    deadline = time.time() + 5
    while b.taken_by is None and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(RunStopped, match="taken over by another driver .node-c pid 3"):
        b.check()
    b.release()
    assert json.loads(run.read_text("driver.lock"))["host"] == "node-c"  # the new holder's lock stays


APPEND_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from opsd_ray.run.runfolder import RunFolder, WriteFailed
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
run = RunFolder(sys.argv[1])
run.append_text("metrics.jsonl", '{"step": 1}\\n')
resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))  # 8 more bytes may be written
try:
    run.append_text("metrics.jsonl", '{"step": 2, "loss": 0.25}\\n')
except WriteFailed as e:
    print("failed:", e)
"""


def test_a_line_that_does_not_fit_is_not_half_written(tmp_path):
    """A real write that stops mid-line (the file-size limit lets 8 of 27 bytes through, then EFBIG):
    the file is cut back to its last whole line."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", APPEND_UNDER_A_FILE_SIZE_LIMIT, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert "failed: writing" in out and "metrics.jsonl failed: OSError: [Errno 27] File too large" in out, out
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_line_a_killed_writer_left_unfinished_is_dropped_and_other_bad_lines_are_errors():
    from opsd_ray.common import jsonl_records

    assert jsonl_records('{"step": 1}\n{"step": 2}\n{"step": 3, "lo') == [{"step": 1}, {"step": 2}]
    assert jsonl_records('{"step": 1}\n\n{"step": 2}\n') == [{"step": 1}, {"step": 2}]
    with pytest.raises(ValueError):
        jsonl_records('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
