from conftest import run_cli


def test_bogus_key_exits_2_and_names_it():
    r = run_cli("train", "model=tiny", "data=gsm8k", "bogus=1")
    assert r.returncode == 2, r.stderr
    assert "bogus" in r.stderr and "Traceback" not in r.stderr


def test_unknown_preset_exits_2_listing_known_ones():
    r = run_cli("train", "model=nope")
    assert r.returncode == 2
    assert "qwen3-8b" in r.stderr and "tiny" in r.stderr


def test_show_config_prints_resolved_yaml():
    r = run_cli("train", "model=tiny", "objective.beta=3", "--show-config")
    assert r.returncode == 0, r.stderr
    assert "beta: 3.0" in r.stdout and "name: tiny" in r.stdout


def test_presets_subcommand():
    r = run_cli("presets")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "math-cot-20k" in r.stdout
