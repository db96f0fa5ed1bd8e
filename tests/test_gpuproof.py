"""`make gpu-proof` on this CPU: the tiny shape runs the GPU proof's whole path (model, the three roles
through the driver's own step, forced lengths, the sync check every step, the numerics check, the
table and the JSON); a paper shape says that there is no GPU and what it would run."""

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from opsd_ray.tools.gpuproof import SHAPES, role_numbers  # noqa: F401  (imports on a machine without CUDA)
from opsd_ray.tools.timemodel import device_gpu

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_tiny_proof_runs_the_whole_path_on_the_cpu_and_passes(local_ray, tmp_path, pool, capsys):
    """In this process, on the suite's Ray and warm workers (`make gpu-proof` itself: the test below)."""
    from opsd_ray.tools.gpuproof import main

    out = tmp_path / "gpu-proof.json"
    earlier = set(Path(tempfile.gettempdir()).glob("gpuproof_*"))
    args = f"--shape tiny --engine hf --prompt-tokens 64 --reference-tokens 64 --new-tokens 16 --steps 2 --out {out}"
    assert main(args.split(), pool) == 0
    res = capsys.readouterr()
    assert "passed: every check" in res.out and "gpu-proof: tiny on cpu (hf rollout" in res.out
    result = json.loads(out.read_text())
    assert result["passed"] and all(result["checks"].values()) and result["steps"] == 2
    assert set(result["roles"]) == {"rollout", "scoring", "learner"}
    for n in result["roles"].values():
        assert n["time_s"] > 0 and n["tokens_per_s"] > 0 and n["peak_gib"] > 0 and n["plan_gib"] > 0
        assert n["mfu"] is None  # a CPU: no peak in the table
    assert all(r["response_length"] == 16 for r in result["records"])  # forced lengths
    assert result["sync"]["bytes"] > 0 and result["sync"]["max_abs_adapter_effect"] > 0
    # the whole GPU self-check (opsd_ray.tools.gpucheck), in bf16 on the CPU: the same code a GPU runs
    assert {c["name"].split("/")[0] for c in result["numerics"]} == {"scoring", "loss", "learner"}
    assert len(result["numerics"]) == 11 and all(c["ok"] for c in result["numerics"]), result["numerics"]
    assert set(Path(tempfile.gettempdir()).glob("gpuproof_*")) <= earlier  # its synthetic data is removed


def test_a_paper_shape_without_a_gpu_says_what_it_would_run_and_exits_0():
    res = subprocess.run(["make", "--no-print-directory", "-s", "-o", ".venv/.installed", "gpu-proof", "SHAPE=qwen3-8b"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no GPU here" in res.stdout and "it would build qwen3-8b with random bf16 weights" in res.stdout


@pytest.mark.parametrize("shape,hub_id", [("qwen3-8b", "Qwen/Qwen3-8B"), ("qwen3-4b", "Qwen/Qwen3-4B")])
def test_the_proofs_models_have_the_papers_shapes(shape, hub_id):
    """Built on the meta device (no memory): as many parameters as the real model, by the plan's table."""
    import torch
    from transformers import AutoModelForCausalLM

    from opsd_ray.models.shapes import TABLE
    from opsd_ray.tools.gpuproof import qwen3_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(qwen3_config(shape))
    assert sum(p.numel() for p in model.parameters()) == TABLE[hub_id].params()


def test_devices_are_known_by_the_names_torch_gives_them():
    assert device_gpu("NVIDIA H100 80GB HBM3").tflops == 989
    assert device_gpu("NVIDIA H100 PCIe").tflops == 756
    assert device_gpu("NVIDIA H200").hbm_tbs == 4.8
    assert device_gpu("NVIDIA A100-SXM4-80GB").tflops == 312
    assert device_gpu("Some Future Accelerator") is None  # reported without MFU
    assert set(SHAPES) == {"qwen3-8b", "qwen3-4b"}
