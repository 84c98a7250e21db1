"""Run options, by example: one RunConfig behind the flags, the Flower run config and the presets
(Flower run-config files in config/, read by `flwr run . --run-config` and the scripts alike)."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib

import pytest

from fedmergenet.config import (
    PROJECT_ROOT,
    RunConfig,
    add_run_options,
    apply_preset,
    config_from_args,
    key_of,
    preset_names,
    read_preset,
    resolve_milestones,
    validate,
)
from fedmergenet.errors import ConfigError


def parse(*argv: str, base: RunConfig | None = None) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return config_from_args(parser.parse_args(list(argv)), base)


def test_run_config_round_trips_through_flowers_run_config():
    """to_run_config gives kebab-case keys; from_run_config reads them back to the same RunConfig."""
    cfg = RunConfig(dataset="cifar100", rounds=7, alpha=0.5, fusion=False, lr_milestones="3,5", adapter_lr=0.01,
                    teacher_checkpoint="t.pt", resume=True)
    run_config = cfg.to_run_config()
    assert run_config["fusion-start-round"] == cfg.fusion_start_round
    assert RunConfig.from_run_config(run_config) == cfg
    assert RunConfig.from_run_config(RunConfig().to_run_config()) == RunConfig()


def test_from_run_config_coerces_scalars_and_keeps_defaults_for_missing_keys():
    """Values that arrive as strings or ints become the field's type; absent keys keep defaults."""
    cfg = RunConfig.from_run_config({"rounds": "4", "alpha": 1, "fusion": "false", "random-teacher": "true"})
    assert (cfg.rounds, cfg.alpha, cfg.fusion, cfg.random_teacher) == (4, 1.0, False, True)
    assert isinstance(cfg.alpha, float)
    assert cfg.replace(rounds=RunConfig().rounds, alpha=0.0, fusion=True, random_teacher=False) == RunConfig()


def app_defaults() -> dict:
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_pyproject_run_config_is_the_quick_preset():
    """[tool.flwr.app.config] lists exactly RunConfig's fields, valued as RunConfig's defaults with
    config/quick.toml on top (same types too): plain `flwr run .` is the quick experiment."""
    app_config = app_defaults()
    expected = apply_preset("quick").to_run_config()
    assert sorted(app_config) == sorted(expected)
    assert app_config == expected
    assert {k: type(v) for k, v in app_config.items()} == {k: type(v) for k, v in expected.items()}
    assert RunConfig.from_run_config(app_config).dataset == "fashion-mnist"


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_means_the_same_to_flwr_run_and_to_the_scripts(preset):
    """A preset file on top of the app's defaults (what `flwr run . --run-config config/X.toml`
    gets) equals it on top of RunConfig's (what `--preset X` gets), and is a valid run."""
    with open(PROJECT_ROOT / "config" / f"{preset}.toml", "rb") as fh:
        overrides = tomllib.load(fh)
    assert set(overrides) <= set(app_defaults()), "Flower refuses keys the app does not define"
    as_flwr_run = RunConfig.from_run_config(app_defaults() | overrides)
    assert as_flwr_run == apply_preset(preset)
    validate(as_flwr_run)


def test_a_preset_can_be_any_run_config_file(tmp_path):
    """--preset takes a path to a run-config TOML file too; an unknown key or a broken file is one line."""
    mine = tmp_path / "mine.toml"
    mine.write_text('rounds = 2\nalpha = 1\nlr-milestones = "1"\n')
    cfg = apply_preset(str(mine))
    assert (cfg.rounds, cfg.alpha, cfg.lr_milestones) == (2, 1.0, "1")
    assert isinstance(cfg.alpha, float)
    mine.write_text("rounds = 2\nepochs = 3\n")
    with pytest.raises(ConfigError, match="unknown option.*epochs"):
        read_preset(str(mine))
    mine.write_text("rounds = = 2\n")
    with pytest.raises(ConfigError, match="not a readable TOML") as info:
        read_preset(str(mine))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        read_preset(str(tmp_path / "missing.toml"))


def test_anchored_paths_are_absolute_and_absolute_paths_stay():
    """What the apps do with a run's paths: relative ones resolve against the app's folder."""
    cfg = RunConfig(dataset="fashion-mnist", data_dir="data", output_dir="/elsewhere/out").anchored(PROJECT_ROOT)
    assert cfg.data_dir == str(PROJECT_ROOT / "data")
    assert cfg.teacher_checkpoint == str(PROJECT_ROOT / "checkpoints" / "teacher_resnet50_fashion-mnist.pt")
    assert cfg.output_dir == "/elsewhere/out"
    assert cfg.anchored(PROJECT_ROOT / "other") == cfg


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"dataset": "mnist"}, "unknown dataset"),
        ({"alpha": -0.1}, "--alpha"),
        ({"num_clients": 3, "clients_per_round": 4}, "--clients-per-round"),
        ({"rounds": 0}, "--rounds"),
        ({"device": "tpu"}, "unknown device"),
        ({"fusion_arms": "plain best"}, "--fusion-arms"),
        ({"fusion_arms": "plain", "resume": True}, "--fusion-arms"),
        ({"lr": -1.0}, "--lr must be positive"),
        ({"lr": float("nan")}, "--lr must be a finite"),
        ({"round_timeout": float("inf")}, "--round-timeout must be a finite"),
        ({"momentum": 1.0}, "--momentum"),
        ({"weight_decay": -5e-4}, "--weight-decay"),
        ({"lr_gamma": 0.0}, "--lr-gamma"),
        ({"teacher_lr": 0.0}, "--teacher-lr"),
        ({"adapter_heads": 0}, "--adapter-heads"),
        ({"adapter_layers": 0}, "--adapter-layers"),
        ({"adapter_clip": 0.0}, "--adapter-clip"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_validate_rejects_options_out_of_range(changes, words):
    """Each bad option is a ConfigError whose one-line message names the option."""
    with pytest.raises(ConfigError, match=words) as info:
        validate(RunConfig(**changes))
    assert "\n" not in str(info.value)


def test_every_option_is_defined_once_with_its_help_and_reaches_every_form():
    """RunConfig is the one definition: each field carries its help, and is a flag, a run-config
    key (pyproject, checked above) and a preset key."""
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name
        assert ({f"--{key_of(f.name)}", f"--no-{key_of(f.name)}"} & flags) or f.name == "resume", f.name
    assert "--resume" in flags


def test_validate_accepts_the_defaults():
    """RunConfig's defaults (the write-up's setting) are valid as they stand."""
    assert validate(RunConfig()) == RunConfig()


def test_paper_preset_is_the_cifar100_setting():
    """--preset paper: CIFAR-100, 50 rounds of 5 local epochs, the write-up's milestones 60/120/160."""
    cfg = apply_preset("paper")
    assert (cfg.dataset, cfg.rounds, cfg.local_epochs) == ("cifar100", 50, 5)
    assert cfg.lr == RunConfig().lr
    assert cfg.milestones() == [60, 120, 160]
    validate(cfg)


@pytest.mark.parametrize(("spec", "epochs", "expected"), [
    ("0.3,0.6,0.8", 200, [60, 120, 160]),  # the write-up's schedule, as fractions
    ("0.3,0.6,0.8", 3, [1, 2, 3]),  # a 3-epoch run: 0.1, 0.02, 0.004 -- it ends annealed
    ("0.3,0.6,0.8", 10, [3, 6, 8]),
    ("60,120,160", 3, [60, 120, 160]),  # whole epochs stay possible, whatever the run's length
    ("", 5, []),  # constant learning rate
])
def test_milestones_are_fractions_of_the_run_or_whole_epochs(spec, epochs, expected):
    assert resolve_milestones(spec, epochs) == expected


def test_every_run_ends_annealed_by_default():
    """With the default milestones the last epoch of any run of 3 or more epochs trains at most at
    lr * gamma^2 (it has passed at least two milestones)."""
    for rounds, local_epochs in ((1, 3), (3, 1), (5, 2), (7, 1), (50, 5)):
        cfg = RunConfig(rounds=rounds, local_epochs=local_epochs)
        last_epoch = cfg.total_epochs - 1
        assert sum(m <= last_epoch for m in cfg.milestones()) >= 2, (rounds, local_epochs)


@pytest.mark.parametrize("spec", ["0.3,1.5", "0,0.5", "a,b", "0.5,3", "-2"])
def test_bad_milestones_are_one_line_errors(spec):
    with pytest.raises(ConfigError, match="--lr-milestones") as info:
        validate(RunConfig(lr_milestones=spec))
    assert "\n" not in str(info.value)


def test_unknown_preset_is_a_config_error():
    """A misspelt preset names the ones that exist."""
    with pytest.raises(ConfigError, match="paper"):
        apply_preset("papr")


def test_explicit_flags_override_a_preset():
    """Flags given on the command line win over the preset; unset flags keep the preset's values."""
    cfg = parse("--rounds", "2", "--dataset", "fashion-mnist", base=apply_preset("paper"))
    assert (cfg.rounds, cfg.dataset) == (2, "fashion-mnist")
    assert cfg.local_epochs == 5  # from the preset


def test_original_flag_spellings_still_work():
    """--num_clients (the original scripts' spelling) and --no-fusion map onto RunConfig."""
    cfg = parse("--num_clients", "5", "--no-fusion")
    assert cfg.num_clients == 5
    assert cfg.fusion is False and cfg.arm == "fedavg"
    assert parse().fusion is True


def test_options_on_by_default_have_a_no_flag_and_arms_follow_the_teacher():
    """--no-recalibrate-bn turns BatchNorm recalibration off (plain FedAvg); --placebo-teacher makes
    the placebo arms, and needs fusion."""
    assert parse().recalibrate_bn is True and parse("--no-recalibrate-bn").recalibrate_bn is False
    placebo = parse("--placebo-teacher")
    assert (placebo.arm, placebo.central_arm) == ("fedavg_placebo", "central_placebo")
    with pytest.raises(ConfigError, match="--placebo-teacher"):
        parse("--placebo-teacher", "--no-fusion")


def test_alpha_zero_on_the_command_line_is_rejected():
    """--alpha 0 is not 'IID': it is refused with a hint to leave it unset."""
    with pytest.raises(ConfigError, match="alpha"):
        parse("--alpha", "0")


def test_fusion_arms_stand_for_one_run_per_arm_in_its_own_folder():
    """The suite's federated arms as one config: each arm is the same run with its fusion setting,
    in output-dir/<arm>; without --fusion-arms a config is its own single run."""
    cfg = parse("--fusion-arms", "plain mergenet placebo", "--output-dir", "out/seed0", "--strategy", "fedavg")
    runs = cfg.arm_runs()
    assert [run.arm for run in runs] == ["fedavg", "fedavg_mergenet", "fedavg_placebo"]
    assert [run.output_dir for run in runs] == [f"out/seed0/{run.arm}" for run in runs]
    assert [(run.fusion, run.placebo_teacher) for run in runs] == [(False, False), (True, False), (True, True)]
    assert all(run.replace(fusion=cfg.fusion, placebo_teacher=False, output_dir=cfg.output_dir, fusion_arms=cfg.fusion_arms)
               == cfg for run in runs)  # nothing else differs
    single = parse("--output-dir", "out/one")
    assert single.arm_runs() == [single]
    assert cfg.fuses and not parse("--no-fusion").fuses and parse("--no-fusion", "--fusion-arms", "plain placebo").fuses
