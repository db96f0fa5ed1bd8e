import pytest
from omegaconf import OmegaConf

from opsd_ray.config.recipes import ConfigError, known_presets, load_train_config


def test_defaults_compose_and_are_the_cpu_default():
    cfg = load_train_config([])
    assert cfg.model.name == "smollm2-135m" and cfg.data.name == "gsm8k"
    assert cfg.objective.mode == "pmi" and cfg.objective.beta == 1.0 and cfg.objective.clip == 10.0
    assert cfg.objective.center is True and cfg.objective.lam == 0.5


def test_presets_and_overrides_apply_in_order():
    cfg = load_train_config(["model=tiny", "data=gsm8k", "objective.beta=2", "objective.mode=standard",
                             "train.batch_size=8", "learner.micro_batch_size=2"])
    assert cfg.model.name == "tiny" and cfg.model.path == "builtin:tiny"
    assert cfg.objective.beta == 2.0 and cfg.objective.mode == "standard"
    assert cfg.train.batch_size == 8


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match="'bogus'"):
        load_train_config(["model=tiny", "bogus=1"])
    with pytest.raises(ConfigError, match="did you mean 'objective.beta'"):
        load_train_config(["objective.betta=1"])


def test_wrong_type_is_reported_with_its_key():
    with pytest.raises(ConfigError, match="objective.beta"):
        load_train_config(["objective.beta=abc"])
    with pytest.raises(ConfigError, match="train.steps"):
        load_train_config(["train.steps=1.5x"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("objective.beta=0", "objective.beta must be > 0"),
        ("objective.clip=-1", "objective.clip must be >= 0"),
        ("objective.lam=1.5", "objective.lam must be in [0, 1]"),
        ("learner.lr=0", "learner.lr must be > 0"),
        ("objective.mode=reverse", "objective.mode='reverse' is not one of"),
        ("train.batch_size=6", "divisible by learner.micro_batch_size"),
        ("rollout.engine=tgi", "rollout.engine"),
        ("checkpoint.resume=/nonexistent/step_5", "checkpoint.resume"),
    ],
)
def test_out_of_range_values_fail_clearly(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_train_config(["train.batch_size=8", "learner.micro_batch_size=4", override])
    assert fragment in str(e.value)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        load_train_config(["model=qwen9"])
    for name in known_presets("model"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="gsm8k"):
        load_train_config(["data=gsm9k"])


def test_missing_files_and_required_values():
    with pytest.raises(ConfigError, match="no such file"):
        load_train_config(["data.path=/does/not/exist.jsonl"])


def test_every_preset_composes():
    for model in known_presets("model"):
        cfg = load_train_config([f"model={model}"])
        assert cfg.model.name == model
        OmegaConf.to_yaml(cfg)
    for data in known_presets("data"):
        if data == "dasd-10k":
            continue
        assert load_train_config([f"data={data}"]).data.name == data


def test_learner_group_settings_are_validated():
    with pytest.raises(ConfigError, match="divide evenly among learner.num_workers=3"):
        load_train_config(["model=tiny", "train.batch_size=8", "learner.micro_batch_size=2", "learner.num_workers=3",
                           "learner.strategy=fsdp"])
    load_train_config(["model=tiny", "train.batch_size=8", "learner.micro_batch_size=2", "learner.num_workers=3"])  # ddp
    with pytest.raises(ConfigError, match="need a GPU each"):
        load_train_config(["model=tiny", "learner.num_workers=2", "learner.gpus_per_worker=0.5", "train.batch_size=4",
                           "learner.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="at least one micro-batch each"):
        load_train_config(["model=tiny", "train.batch_size=4", "learner.micro_batch_size=4", "learner.num_workers=2"])
    with pytest.raises(ConfigError, match="max_staleness \\(now rollout.one_step_off\\) must be 0"):
        load_train_config(["model=tiny", "rollout.max_staleness=2"])
    with pytest.raises(ConfigError, match="learner.strategy"):
        load_train_config(["model=tiny", "learner.strategy=zero3"])
    with pytest.raises(ConfigError, match="train.schedule"):
        load_train_config(["model=tiny", "train.schedule=async"])
    cfg = load_train_config(["model=tiny", "learner.resources.big_gpu=1"])
    assert cfg.learner.resources == {"big_gpu": 1.0}
    with pytest.raises(ConfigError, match="learner.resources.big_gpu must be >= 0"):
        load_train_config(["model=tiny", "learner.resources.big_gpu=-1"])


def test_old_keys_still_load_with_a_note_of_their_new_names(capsys):
    cfg = load_train_config(["model=tiny", "rollout.max_staleness=1", "learner.gpus=0", "learner.cpus=0.25"])
    assert cfg.rollout.one_step_off is True and cfg.learner.gpus_per_worker == 0 and cfg.learner.cpus_per_worker == 0.25
    err = capsys.readouterr().err
    assert "note: rollout.max_staleness is now rollout.one_step_off (the command line)" in err
    assert "note: learner.gpus is now learner.gpus_per_worker" in err and "learner.cpus is now" in err
