import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _shared_cache(tmp_path_factory):
    """Models built from the offline assets are cached once per test session (or in $OPSD_RAY_CACHE)."""
    if "OPSD_RAY_CACHE" not in os.environ:
        os.environ["OPSD_RAY_CACHE"] = str(tmp_path_factory.mktemp("opsd_ray_cache"))
    yield


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opsd_ray", *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout
    )
