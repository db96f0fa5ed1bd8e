"""A run survives what goes wrong on a cluster, on real local Ray with the tiny model: bad numbers,
killed rollout / scoring / learner processes, a second driver, and writes that fail."""

import json
import math

import pytest
import torch

from opsd_ray.cluster import runtime_env
from opsd_ray.config import load_train_config

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
BOX_START = 151648  # <|box_start|>: a special token the student never sees


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=6, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env=runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from opsd_ray.data import ASSETS

    path = tmp_path_factory.mktemp("data") / "gsm8k_small.jsonl"
    with open(ASSETS / "gsm8k_train.jsonl") as f:
        path.write_text("".join(next(f) for _ in range(24)))
    return str(path)


def args_of(tmp_path, small_data, *extra):
    return ["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}", "run.name=r",
            "rollout.engine=hf", "train.batch_size=4", "learner.micro_batch_size=2", "rollout.max_new_tokens=8",
            "learner.lr=1e-2", "train.diagnostics_every=0", "checkpoint.every=0", *extra]


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- bad numbers
def test_a_model_that_gives_nan_targets_skips_updates_then_stops(local_ray, tmp_path, small_data, capsys):
    """A corrupted embedding row (NaN) that only the teacher prompt uses: every step's target is NaN."""
    from opsd_ray.cli import main
    from opsd_ray.models import load_model, load_tokenizer, resolve_model_path

    model = load_model(resolve_model_path("builtin:tiny"))
    with torch.no_grad():
        model.model.embed_tokens.weight[BOX_START] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    load_tokenizer(resolve_model_path("builtin:tiny")).save_pretrained(tmp_path / "nan-model")

    rc = main(["train", *args_of(tmp_path, small_data, f"model.path={tmp_path / 'nan-model'}", "train.steps=6",
                                 "prompt.reference_begin=<|box_start|>", "fault.max_skipped_steps=3")])
    err = capsys.readouterr().err
    assert rc == 1 and "3 steps in a row (1, 2, 3) had a non-finite loss or gradient norm" in err
    assert "Likely causes: NaN or Inf in the model weights" in err and "Traceback" not in err
    records = read_metrics(tmp_path / "r")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped_steps"] for r in records] == [1, 2, 3] and all(r["skipped"] == 1 for r in records)
    assert all(r["adapter_version"] == 0 for r in records)  # no update was applied
    assert all(math.isfinite(r["response_length"]) for r in records)  # the student itself was fine
