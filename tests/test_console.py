"""The console is for people: Ray's worker lines and the driver's Ray log records go to logs/engines.log."""

import logging
import sys
import time

import pytest
from conftest import own_ray

from opsd_ray.run.console import engine_logs
from opsd_ray.run.runfolder import RunFolder

ray = pytest.importorskip("ray")


def lines_from_an_actor(text):
    return {"lines": [text], "pid": 4521, "ip": "10.0.0.2", "actor_name": "RolloutWorker", "is_err": False}


@pytest.mark.parametrize("verbose", [False, True])
def test_worker_lines_go_to_the_log_file_and_with_verbose_to_the_console_too(tmp_path, capsys, verbose):
    from ray._private import worker as ray_worker

    original = ray_worker.print_worker_logs
    run = RunFolder(tmp_path / "r")
    with engine_logs(run, verbose) as where:
        ray_worker.print_worker_logs(lines_from_an_actor("INFO [core.py:133] Initializing a V1 LLM engine"), sys.stderr)
        logging.getLogger("ray.some.module").warning("Token authentication is enabled for this Ray cluster")
        logging.getLogger("ray.some.module").error("the GCS is unreachable")
    assert ray_worker.print_worker_logs is original  # put back after the run
    text = (tmp_path / "r" / "logs" / "engines.log").read_text()
    assert where == str(tmp_path / "r" / "logs" / "engines.log")
    assert "(RolloutWorker pid=4521, ip=10.0.0.2) INFO [core.py:133] Initializing a V1 LLM engine" in text
    assert "Token authentication" in text and "the GCS is unreachable" in text
    out = capsys.readouterr()
    console = out.out + out.err
    assert ("Initializing a V1 LLM engine" in console) == verbose
    assert ("Token authentication" in console) == verbose
    assert "the GCS is unreachable" in console  # errors stay on the console
    assert ("--verbose shows them here too" in console) != verbose


def test_a_real_actors_output_reaches_the_file_not_the_console(tmp_path, capfd):
    """Real local Ray with log_to_driver, as the driver starts it: an actor's print goes to the file."""
    run = RunFolder(tmp_path / "r")
    with engine_logs(run, verbose=False):
        own_ray(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=True)
        try:
            @ray.remote
            class Chatty:
                def speak(self):
                    print("vLLM engine dump from an actor", flush=True)
                    return 1

            a = Chatty.remote()
            assert ray.get(a.speak.remote()) == 1
            log = tmp_path / "r" / "logs" / "engines.log"
            deadline = time.time() + 30
            while "vLLM engine dump" not in log.read_text() and time.time() < deadline:
                time.sleep(0.2)
        finally:
            ray.shutdown()
    assert "(Chatty pid=" in log.read_text() and "vLLM engine dump from an actor" in log.read_text()
    out = capfd.readouterr()
    assert "vLLM engine dump" not in out.out + out.err
    assert "Token authentication" not in out.out + out.err
