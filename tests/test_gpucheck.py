"""The GPU self-check and the doctor, on CPU: their comparison logic and what they catch. The whole
self-check runs in bf16 on the CPU inside the tiny GPU proof (tests/test_gpuproof.py)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from opsd_ray.tools import gpucheck
from opsd_ray.tools.doctor import Row, render, unmet
from opsd_ray.tools.gpucheck import Check, compare, report


# ----------------------------------------------------------------------------- gpucheck
def test_compare_is_a_relative_error_that_fails_above_its_tolerance():
    want = torch.tensor([[3.0, 4.0]])
    assert compare("x", want.clone(), want, 1e-3) == Check("x", 0.0, 1e-3)
    off = compare("x", want + torch.tensor([[0.05, 0.0]]), want, 1e-3)
    assert off.error == pytest.approx(0.01) and not off.ok
    assert compare("x", want + torch.tensor([[0.003, 0.0]]), want, 1e-3).ok
    assert not compare("x", torch.tensor([[float("nan"), 4.0]]), want, 1.0).ok
    with pytest.raises(ValueError, match="shape"):
        compare("x", want.T, want, 1.0)


def test_report_lists_each_check_and_what_failed():
    text = report([Check("scoring/a", 1e-3, 1e-2), Check("loss/value", 1.0, 1e-4)])
    assert "scoring/a" in text and "FAIL" in text and "1 of 2 checks pass; failed: loss/value" in text


def test_a_wrong_shared_prefix_mask_fails_the_check(monkeypatch):
    import opsd_ray.workers.scoring as scoring

    monkeypatch.setattr(scoring, "tree_mask", lambda width, where: torch.ones(width, width, dtype=torch.bool).tril())
    items = gpucheck.synthetic_items()
    want = scoring.score(gpucheck.tiny("cpu", torch.float32), items, layout="padded", micro_batch_size=4).tensors
    checks = {c.name: c for c in gpucheck.scoring_checks("cpu", torch.bfloat16, items, want)}
    assert checks["scoring/padded/sdpa/teacher"].ok
    assert not checks["scoring/shared_prefix/sdpa/base"].ok  # base attends to the reference: caught


def test_without_a_gpu_it_says_so_and_exits_0(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert gpucheck.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_it_needs_no_ray_and_no_vllm_and_its_tiny_models_folder_goes_when_it_ends():
    code = textwrap.dedent("""
        import sys, torch
        from opsd_ray.tools import gpucheck
        gpucheck.loss_check("cpu", torch.bfloat16, tokens=8)
        gpucheck.tiny("cpu", torch.float32)
        print(sorted({m.split(".")[0] for m in sys.modules} & {"ray", "vllm", "omegaconf", "pyarrow"}))
        print(gpucheck._TINY_DIR[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    modules, folder = out.stdout.strip().splitlines()[-2:]
    assert modules == "[]"  # a GPU node may have only torch, transformers and peft
    folder = Path(folder)
    assert folder.name.startswith("opsd_ray_gpucheck_") and not folder.exists()  # 75 MB per run, before


# ----------------------------------------------------------------------------- doctor
def test_unmet_requirements_follow_pep_440_and_skip_other_platforms_and_extras():
    versions = {"torch": "2.13.0+cu128", "transformers": "5.19.0", "peft": None}
    assert unmet(["torch==2.13.0", "transformers<5.20,>=5.16.1"], versions) == []  # a local label matches ==
    assert unmet(["torch==2.13.0+cpu"], versions) == ["torch==2.13.0+cpu (installed: 2.13.0+cu128)"]
    assert unmet(["transformers>=5.20"], versions) == ["transformers>=5.20 (installed: 5.19.0)"]
    assert unmet(["peft>=0.17"], versions) == ["peft>=0.17 (not installed)"]
    assert unmet(['torch==2.0; platform_system == "Darwin"', 'peft; extra == "test"', "numpy==1.0"], versions) == []


def test_render_aligns_rows():
    assert render([Row("a", "ok", "x"), Row("long name", "FAIL", "y")]).splitlines() == [
        "a          ok    x", "long name  FAIL  y"]


def test_doctor_on_this_machine():
    out = run_cli("doctor", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    for row in ("torch", "transformers", "peft", "ray", "opsd_ray needs", "vllm", "flash-attn"):
        assert any(line.startswith(row + " ") for line in out.stdout.splitlines()), row
    assert "no problems found" in out.stdout


def test_doctor_fails_a_flash_attn_that_does_not_import(tmp_path):
    """What a flash-attn built against another torch looks like: installed, but its extension fails."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    meta = tmp_path / "flash_attn-2.8.3.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.8.3\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "opsd_ray", "doctor"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 1
    line = next(x for x in out.stdout.splitlines() if x.startswith("flash-attn"))
    assert "FAIL" in line and "undefined symbol" in line and "--no-build-isolation" in line
