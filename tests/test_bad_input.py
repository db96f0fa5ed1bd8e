"""A corpus of bad inputs: each ends in exit code 2 with one message that says what to fix, or in a
counted skip; never in a traceback. Configs, recipe files, data files, model folders, evaluation
and command-line misuse, through the real `opsd-ray` entry point (in-process)."""

import json
import os
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NEEDS_VLLM

from opsd_ray.cli import main

GOOD = {"question": "What is 2+3?", "answer": "2+3=5. #### 5"}


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_file(path, text):
    path.write_text(text)
    return str(path)


def bytes_file(path, data):
    path.write_bytes(data)
    return str(path)


def good_rows(n=4):
    return [{"question": f"What is {i}+3?", "answer": f"{i}+3={i + 3}. #### {i + 3}"} for i in range(n)]


# Each case: (name, setup(tmp) -> argv, a fragment the one-line message must contain).
# setup returns the argv after `opsd-ray`; files it needs go into tmp.
def data_case(writer, fragment, *extra):
    def setup(tmp):
        return ["prepare-data", "model=tiny", "data=gsm8k", f"data.path={writer(tmp)}", f"out={tmp / 'clean.parquet'}",
                *extra]

    return setup, fragment


def recipe_case(text, fragment, kind="model", name="broken"):
    def setup(tmp):
        (tmp / "recipes" / kind).mkdir(parents=True)
        for k in ("model", "data", "experiment"):
            (tmp / "recipes" / k).mkdir(parents=True, exist_ok=True)
        from opsd_ray.config.recipes import recipes_dir

        for sub in ("model", "data"):  # the real presets, so only the broken file is broken
            for f in (recipes_dir() / sub).glob("*.yaml"):
                (tmp / "recipes" / sub / f.name).write_text(f.read_text())
        (tmp / "recipes" / kind / f"{name}.yaml").write_text(text)
        os.environ["OPSD_RAY_RECIPES"] = str(tmp / "recipes")
        return ["train", f"{kind}={name}" if kind != "data" else "model=tiny", *(["data=broken"] if kind == "data" else []),
                "--show-config"]

    return setup, fragment


def train_case(*argv, fragment):
    return (lambda tmp: ["train", "model=tiny", "data=gsm8k", *argv]), fragment


def model_folder(tmp, files=("config.json",), tokenizer=False):
    from opsd_ray.models.loading import resolve_model_path

    folder = tmp / "model"
    folder.mkdir()
    src = resolve_model_path("builtin:tiny")
    for name in os.listdir(src):
        keep = name in files or (tokenizer and name.startswith(("tokenizer", "vocab", "merges", "special_tokens")))
        if keep:
            (folder / name).write_bytes(open(os.path.join(src, name), "rb").read())
    return folder


def model_case(make, fragment, *extra):
    def setup(tmp):
        return ["train", "model=tiny", "data=gsm8k", f"model.path={make(tmp)}", *extra]

    return setup, fragment


def truncated_parquet(tmp):
    path = tmp / "d.parquet"
    pq.write_table(pa.Table.from_pylist(good_rows()), path)
    path.write_bytes(path.read_bytes()[:-40])
    return str(path)


def parquet_of(rows):
    def write(tmp):
        path = tmp / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)

    return write


CASES = {
    # ---------------------------------------------------------------- configs
    "wrong type int": train_case("train.steps=abc", fragment="train.steps"),
    "wrong type float": train_case("objective.beta=high", fragment="objective.beta"),
    "wrong type bool": train_case("objective.center=maybe", fragment="objective.center"),
    "wrong type list": train_case("learner.adam_betas=0.9", fragment="learner.adam_betas"),
    "unknown top-level key": train_case("bogus=1", fragment="unknown config key 'bogus'"),
    "unknown key in a section": train_case("objective.betta=2", fragment="did you mean 'objective.beta'"),
    "unknown key two levels down": train_case("model.lora.rank=8", fragment="model.lora.rank"),
    "unknown key in rollout": train_case("rollout.enigne=hf", fragment="did you mean 'rollout.engine'"),
    "jsd weight out of range": train_case("objective.lam=2", fragment="objective.lam must be in [0, 1]"),
    "negative lr": train_case("learner.lr=-1", fragment="learner.lr must be > 0"),
    "batch not divisible": train_case("train.batch_size=5", "learner.micro_batch_size=2", fragment="divisible"),
    "no completions": train_case("rollout.n=0", fragment="rollout.n (completions per prompt) must be >= 1"),
    "no rows per batch": train_case("rollout.hf_max_batch=0", fragment="rollout.hf_max_batch must be >= 1"),
    "completions not divisible": train_case("train.batch_size=3", "rollout.n=3", "learner.micro_batch_size=2",
                                            fragment="train.batch_size x rollout.n (3 x 3 = 9 trajectories)"),
    "negative gpus": train_case("learner.gpus_per_worker=-1", fragment="learner.gpus_per_worker must be >= 0"),
    "no rollout workers": train_case("rollout.num_workers=0", fragment="rollout.num_workers must be >= 1"),
    "staleness 3 (an old key)": train_case("rollout.max_staleness=3", fragment="rollout.max_staleness (now rollout.one_step_off) must be 0"),
    "one-step-off not a bool": train_case("rollout.one_step_off=maybe", fragment="rollout.one_step_off"),
    "unknown model preset": ((lambda tmp: ["train", "model=qwen9"]), "unknown model preset 'qwen9'"),
    "unknown data preset": ((lambda tmp: ["train", "model=tiny", "data=nope"]), "unknown data preset 'nope'"),
    "override without =": train_case("train.steps", fragment="expected key=value"),
    "resume from a missing folder": train_case("checkpoint.resume=/no/such/step_5", fragment="checkpoint.resume"),
    "eval without benchmarks": train_case("eval.every=1", fragment="eval.every > 0 needs eval.benchmarks"),
    "eval with an unknown benchmark": train_case("eval.every=1", "eval.benchmarks=[nope]", fragment="unknown benchmark"),
    "lora rank 0": train_case("model.lora.r=0", fragment="model.lora.r must be >= 1"),
    "unknown dtype": train_case("model.dtype=fp8", fragment="model.dtype"),
    "fsdp uneven split": train_case("learner.strategy=fsdp", "learner.num_workers=3", "train.batch_size=8",
                                    "learner.micro_batch_size=2", fragment="divide evenly"),
    "two learners on half a GPU": train_case("learner.num_workers=2", "learner.gpus_per_worker=0.5", "train.batch_size=4",
                                             "learner.micro_batch_size=2", fragment="need a GPU each"),
    "shared_prefix with flash": ((lambda tmp: ["train", "model=qwen3-8b", "data=gsm8k", "scoring.layout=shared_prefix"]),
                                 "flash-attention"),
    "unknown custom resource value": train_case("learner.resources.big=-1", fragment="learner.resources.big"),
    "negative fault budget": train_case("fault.max_restarts=-1", fragment="fault.max_restarts"),
    "unknown marker rule": train_case("markers.match=words", fragment="markers.match='words' is not one of: substring, word"),
    "unknown logging key": train_case("logging.wandb_project=x", fragment="unknown config key 'logging.wandb_project'"),
    "run name that is a path": train_case("run.name=a/b", fragment="run.name='a/b' must be a plain folder name"),
    "run name that climbs out": train_case("run.name=../../somewhere", fragment="must be a plain folder name"),
    "run name that is ..": train_case("run.name=..", fragment="must be a plain folder name"),
    "run name with a backslash": train_case("run.name=a\\b", fragment="must be a plain folder name"),
    "run name that is blank": train_case("run.name=' '", fragment="must be a plain folder name"),
    "data limit 0": train_case("data.limit=0", fragment="data.limit must be >= 1 or null"),
    "data limit negative": train_case("data.limit=-3", fragment="data.limit must be >= 1 or null"),
    "output dir that is a file": ((lambda tmp: ["train", "model=tiny", "data=gsm8k",
                                                f"run.output_dir={text_file(tmp / 'f.txt', 'x')}"]), "is a file, not a folder"),
    "output dir under a file": ((lambda tmp: ["train", "model=tiny", "data=gsm8k",
                                              f"run.output_dir={text_file(tmp / 'f.txt', 'x')}/runs"]), "is a file, not a folder"),
    # ---------------------------------------------------------------- recipe files
    "recipe that is not YAML": recipe_case("model: [unclosed\n", "not valid YAML"),
    "recipe with an unknown key": recipe_case("model:\n  name: x\n  pathh: y\n", "unknown config key 'model.pathh'"),
    "recipe with a wrong type": recipe_case("model:\n  name: x\n  path: builtin:tiny\n  enable_thinking: [1]\n",
                                            "model.enable_thinking"),
    "recipe that is a list": recipe_case("- a\n- b\n", "recipes/model/broken.yaml"),
    "data recipe without a path": recipe_case("data:\n  name: broken\n", "data.path", kind="data"),
    # ---------------------------------------------------------------- data
    "binary data file": data_case(lambda t: bytes_file(t / "d.jsonl", os.urandom(4096)), "no valid rows"),
    "latin-1 data file": data_case(lambda t: bytes_file(
        t / "d.jsonl", '{"question": "caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1")), "not_utf8"),
    "truncated parquet": data_case(truncated_parquet, "not a readable parquet file"),
    "empty file": data_case(lambda t: text_file(t / "d.jsonl", ""), "no valid rows"),
    "only blank lines": data_case(lambda t: text_file(t / "d.jsonl", "\n\n  \n"), "no valid rows"),
    "every line broken json": data_case(lambda t: text_file(t / "d.jsonl", "{\n{a}\n"), "invalid_json=2"),
    "wrong columns": data_case(lambda t: jsonl(t / "d.jsonl", [{"q": "x", "a": "y"}] * 3), "columns: a, q"),
    "wrong column types in parquet": data_case(parquet_of([{"question": 1, "answer": 2}] * 3), "non_text_question"),
    "rows that are lists": data_case(lambda t: jsonl(t / "d.jsonl", [[1, 2], [3]]), "not_an_object"),
    "a folder where a file is expected": data_case(lambda t: (t / "dir").mkdir() or str(t / "dir"),
                                                   "not a saved Hugging Face dataset"),
    "missing file": data_case(lambda t: str(t / "nope.jsonl"), "no such file"),
    "unknown extension": data_case(lambda t: text_file(t / "d.csv", "a,b\n"), "cannot tell the format"),
    "garbage arrow file": data_case(lambda t: ((t / "ds").mkdir(), (t / "ds" / "data-00000.arrow").write_bytes(
        b"not arrow"))[0] or str(t / "ds"), "not a readable saved dataset"),
    "prepare-data without out": ((lambda tmp: ["prepare-data", "model=tiny", "data=gsm8k"]), "needs out="),
    # ---------------------------------------------------------------- models
    "a folder with no model": model_case(lambda t: (t / "empty").mkdir() or t / "empty", "no config.json"),
    "a model without weights": model_case(lambda t: model_folder(t, ("config.json",), tokenizer=True),
                                          "no weights"),
    "a model without a tokenizer": model_case(lambda t: model_folder(t, ("config.json", "model.safetensors")),
                                              "tokenizer"),
    "a missing model folder": model_case(lambda t: t / "no" / "such", "no such file or folder"),
    "a tokenizer folder that is empty": train_case("model.tokenizer=/", fragment="model.tokenizer"),
    "a lora rank vllm cannot serve": train_case("rollout.engine=vllm", "model.lora.r=1024",
                                                fragment="vLLM serves LoRA ranks up to 512"),
    # ---------------------------------------------------------------- evaluation
    "eval: unknown benchmark": ((lambda tmp: ["eval", "model=tiny", "benchmarks=[nope]"]), "unknown benchmark"),
    "eval: no samples": ((lambda tmp: ["eval", "model=tiny", "n_samples=0"]), "n_samples must be >= 1"),
    "eval: no rows per batch": ((lambda tmp: ["eval", "model=tiny", "rollout.hf_max_batch=0"]),
                                "rollout.hf_max_batch must be >= 1"),
    "eval: unknown key": ((lambda tmp: ["eval", "model=tiny", "samples=3"]), "unknown eval key 'samples'"),
    "eval: missing adapter": ((lambda tmp: ["eval", "model=tiny", "adapter=/no/adapter"]), "adapter="),
    "eval: benchmark file without valid rows": ((lambda tmp: ["eval", "model=tiny", "engine=hf",
                                                              f"benchmarks=[{jsonl(tmp / 'b.jsonl', [{'x': 1}, {'problem': ''}])}]"]),
                                                "no valid problems"),
    # ---------------------------------------------------------------- command line
    "no command": ((lambda tmp: []), "the following arguments are required"),
    "unknown command": ((lambda tmp: ["trian"]), "invalid choice: 'trian'"),
    "unknown flag": ((lambda tmp: ["train", "--fast"]), "unrecognized arguments: --fast"),
    "doctor with arguments": ((lambda tmp: ["doctor", "now"]), "takes no arguments"),
    "report of a folder that is no run": ((lambda tmp: ["report", str(tmp)]), "no metrics.jsonl"),
    "report option unknown": ((lambda tmp: ["report", str(tmp), "fmt=png"]), "unknown report option"),
    "plan without gpus": ((lambda tmp: ["plan", "model=qwen3-8b"]), "plan needs gpus"),
}


@pytest.fixture(autouse=True)
def _no_recipe_leak(monkeypatch):
    monkeypatch.delenv("OPSD_RAY_RECIPES", raising=False)
    yield
    os.environ.pop("OPSD_RAY_RECIPES", None)


@pytest.fixture(autouse=True)
def _never_start_ray(monkeypatch):
    """A bad input must be refused before any Ray work starts."""
    import opsd_ray.run.driver

    def refuse(*a, **k):
        raise AssertionError("reached Ray: the input was not refused up front")

    monkeypatch.setattr(opsd_ray.run.driver, "init_ray", refuse)


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 50


NEEDS_VLLM_CASES = {"a lora rank vllm cannot serve"}  # refused by vLLM's own rule, after the engine is known


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS_VLLM) if n in NEEDS_VLLM_CASES else n for n in CASES])
def test_bad_input_ends_in_one_message(name, tmp_path, capsys):
    setup, fragment = CASES[name]
    argv = setup(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err[-2000:])
    assert fragment in err, err[-2000:]
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


def test_skipped_rows_are_counted_and_the_rest_kept(tmp_path, capsys):
    """Broken, non-UTF-8, wrong-typed and oversized rows beside good ones: a counted skip each."""
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r).encode() for r in good_rows(4)]
    lines += [b"{not json", '{"question": "caf\xe9", "answer": "1"}'.encode("latin-1"), json.dumps([1]).encode(),
              json.dumps({"question": 5, "answer": "x"}).encode(),
              json.dumps({"question": "long " * 3000, "answer": "#### 1"}).encode(), struct.pack("8d", *range(8))]
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "clean.parquet"
    assert main(["prepare-data", "model=tiny", "data=gsm8k", f"data.path={path}", f"out={out}"]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["valid"] == 4
    assert report["skipped"]["invalid_json"] >= 1 and report["skipped"]["not_utf8"] >= 1
    assert report["skipped"]["not_an_object"] == 1 and report["skipped"]["non_text_question"] == 1
    assert report["skipped"]["question_over_token_budget"] == 1
    assert "skipped:" in capsys.readouterr().out


class RunsCode:
    """A pickle that runs a shell command when it is loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("file", ["optimizer.pt", "rng.pt"])
def test_a_checkpoint_whose_pickle_would_run_code_is_refused(file, tmp_path, capsys):
    import torch

    folder, marker = tmp_path / "step_3", tmp_path / "ran"
    folder.mkdir()
    for name in ("optimizer.pt", "rng.pt"):
        torch.save({"state": torch.zeros(2)}, folder / name)
    torch.save({"optimizer": RunsCode(marker)}, folder / file)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "trainer_state.json").write_text('{"step": 3}')
    rc = main(["train", "model=tiny", "data=gsm8k", f"run.output_dir={tmp_path / 'runs'}",
               f"checkpoint.resume={folder}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{file} is not a file of tensors and plain values" in err and "Traceback" not in err
    assert not marker.exists()  # nothing ran


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path, capsys):
    rc = main(["train", "model=tiny", "data=gsm8k", f"run.output_dir={tmp_path / 'runs'}", f"checkpoint.resume={tmp_path}"])
    assert rc == 2 and "not a complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("answer", [42, 7.5, -3])
def test_numeric_answers_are_taken_as_their_text(answer, tmp_path):
    """Public sets often store the final answer as a number: the rows are kept, with the number as text."""
    from omegaconf import OmegaConf

    from opsd_ray.data.sources import load_examples

    rows = [{"question": f"What is {i}?", "solution": answer, "final": answer} for i in range(3)]
    rows.append({"question": "A flag?", "solution": True, "final": True})  # a bool is no number here
    cfg = OmegaConf.create({"path": jsonl(tmp_path / "d.jsonl", rows), "format": "auto", "split": "train",
                            "question_key": "question", "reference_key": "solution", "answer_key": "final",
                            "answer_pattern": None, "strip_calculator_notes": False, "max_reference_tokens": 10,
                            "max_question_tokens": 10, "limit": None})
    examples, report = load_examples(cfg)
    assert sorted(e.reference for e in examples) == [str(answer)] * 3
    assert {e.answer for e in examples} == {str(answer)}
    assert report.skipped == {"non_text_solution": 1}


def test_eval_skips_bad_rows_of_a_benchmark_file_and_counts_them(tmp_path, capsys):
    from opsd_ray.eval.benchmarks import load_benchmark

    path = jsonl(tmp_path / "mine.jsonl", [{"problem": "1+1?", "answer": "2"}, {"problem": ""}, {"x": 1},
                                           {"problem": "2+2?", "answer": 4}])
    problems = load_benchmark(path)
    assert [p.answer for p in problems] == ["2", "4"]
    assert "skipped 2 of 4 rows" in capsys.readouterr().out
