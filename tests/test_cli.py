"""The command line: `python -m opsd_ray` itself (presets), and its main in this process for the rest (a
subprocess would import everything again for each)."""

from conftest import run_cli

from opsd_ray.cli import main


def test_bogus_key_exits_2_and_names_it(capsys):
    assert main(["train", "model=tiny", "data=gsm8k", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "Traceback" not in err


def test_unknown_preset_exits_2_listing_known_ones(capsys):
    assert main(["train", "model=nope"]) == 2
    err = capsys.readouterr().err
    assert "qwen3-8b" in err and "tiny" in err


def test_show_config_prints_resolved_yaml(capsys):
    assert main(["train", "model=tiny", "objective.beta=3", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "beta: 3.0" in out and "name: tiny" in out


def test_presets_subcommand():
    r = run_cli("presets")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "math-cot-20k" in r.stdout


def test_prepare_data_writes_clean_parquet_and_a_report(tmp_path, capsys):
    import json

    import pyarrow.parquet as pq

    src = tmp_path / "raw.jsonl"
    rows = [{"q": "What is 1+1?", "s": "1+1=2 \\boxed{2}"}, {"q": "What is 1+1?", "s": "dup"}, {"q": "x"},
            {"q": "What is 2+2?", "s": "4 \\boxed{4}"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "clean.parquet"
    rc = main(["prepare-data", "model=tiny", "data=openthoughts-math-30k", f"data.path={src}", "data.question_key=q",
               "data.reference_key=s", f"out={out}"])
    r = capsys.readouterr()
    assert rc == 0, r.err[-2000:]
    table = pq.read_table(out).to_pylist()
    assert sorted((t["question"], t["answer"]) for t in table) == [("What is 1+1?", "2"), ("What is 2+2?", "4")]
    report = json.loads((tmp_path / "clean.report.json").read_text())
    assert report["skipped"] == {"duplicate_question": 1, "missing_s": 1} and report["valid"] == 2
    assert "skipped" in r.out
