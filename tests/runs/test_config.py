"""Issue #16, config layer: every setting validated once, by type and range, naming the flag and
the YAML key; numeric strings from YAML accepted; HopSupSup defaults; evaluation settings resumable."""
import dataclasses

import pytest
import yaml

from supsup_fast.cli import build_parser
from supsup_fast.runs.config import FIELDS, HOPFIELD_DEFAULTS, RunConfig, load_yaml, make_config

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("overrides,needle", [
    (dict(lr=float("inf")), r"--lr \(YAML key lr\) must be a finite number"),
    (dict(lr=float("nan")), r"--lr \(YAML key lr\) must be a finite number"),
    (dict(lr=0.0), r"--lr \(YAML key lr\) must be a finite number > 0"),
    (dict(weight_decay=float("nan")), r"--weight-decay \(YAML key weight_decay\) must be a finite"),
    (dict(weight_decay=-1e-4), r"--weight-decay .* >= 0"),
    (dict(train_subset=0), r"--train-subset \(YAML key train_subset\) must be a positive int"),
    (dict(train_subset=-5), r"--train-subset .* positive int"),
    (dict(tasks=True), r"--tasks \(YAML key tasks\) must be an int, got True \(bool\)"),
    (dict(iters=2.5), r"--iters .* must be an int, got 2.5 \(float\)"),
    (dict(log_base=1.0), r"--log-base \(YAML key log_base\) must be a finite number > 1"),
    (dict(log_base=float("nan")), r"--log-base .* finite"),
    (dict(hop_recovery_lr=-5.0), r"--hop-recovery-lr \(YAML key hop_recovery_lr\) must be a finite number > 0"),
    (dict(hop_recovery_lr=0.0), r"--hop-recovery-lr"),
    (dict(hop_gamma=float("inf")), r"--hop-gamma"),
    (dict(nns_epsilon=float("nan")), r"--nns-epsilon"),
    (dict(density=0.5), r"--density \(YAML key density\) applies to the top-k mask function only"),
    (dict(density=0.5, mask_fn="threshold"), r"--density .* top-k"),
    (dict(er_multiplier=1.0), r"--er-multiplier .* top-k"),
    (dict(density=1.5, mask_fn="topk"), r"--density .* fraction in \(0, 1\]"),
    (dict(density=0.5, er_multiplier=1.0, mask_fn="topk"), r"exclude each other"),
    (dict(eval_at=[0]), r"--eval-at \(YAML key eval_at\) points must lie in \[1, 10\]"),
    (dict(eval_at=[2, 11]), r"--eval-at .* got \[11\]"),
    (dict(infer_images=200), r"--infer-images .* 200 exceeds --test-batch-size .* 128"),
    (dict(seed=-1), r"--seed .* int >= 0"),
    (dict(lr="fast"), r"--lr \(YAML key lr\) must be a number, got the string 'fast'"),
    (dict(lr=[1]), r"--lr .* must be a number"),
    (dict(download="yes"), r"--download .* true or false"),
    (dict(mask_fn="random"), r"--mask-fn .* one of"),
    (dict(init="zeros"), r"--init .* one of"),
    (dict(backend="gpu"), r"--backend .* one of"),
    (dict(device="tpu:x"), r"--device .* torch device"),
    (dict(data_root=3), r"--data-root .* string"),
    (dict(epochs=0), r"--epochs"),
    (dict(test_batch_size=0), r"--test-batch-size"),
])
def test_bad_settings_are_refused_naming_flag_and_key(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        make_config(overrides=overrides)


def test_good_edge_values_pass_and_are_normalised():
    cfg = make_config(overrides=dict(lr="1e-4", weight_decay="0", tasks="3", eval_at=[3], train_subset=1,
                                     infer_images=128, density=1.0, mask_fn="topk", log_base=1.5))
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 0.0 and cfg.tasks == 3 and isinstance(cfg.tasks, int)
    assert make_config(overrides=dict(lr=1)).lr == 1.0  # an int is a number


def test_yaml_numeric_strings_and_bool_ints(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-4\nweight_decay: 5e-5\ntasks: 4\n")  # PyYAML reads 1e-4 as a str
    assert isinstance(yaml.safe_load(p.read_text())["lr"], str)
    cfg = make_config(load_yaml(p))
    assert cfg.lr == 1e-4 and cfg.weight_decay == 5e-5 and cfg.tasks == 4
    p.write_text("tasks: true\n")
    with pytest.raises(ValueError, match=r"\(YAML key tasks\) must be an int, got True"):
        make_config(load_yaml(p))
    p.write_text("lr: [1, 2]\n")
    with pytest.raises(ValueError, match=r"YAML key lr"):
        make_config(load_yaml(p))


def test_every_shipped_preset_validates():
    for path in sorted(CONFIGS.glob("*.yaml")):
        make_config(load_yaml(path))


def test_cli_flags_validated_before_any_work(tmp_path, capsys):
    from supsup_fast.cli import main
    for argv, needle in [(["--lr", "inf"], "--lr"), (["--train-subset", "0"], "--train-subset"),
                         (["--log-base", "1"], "--log-base"), (["--hop-recovery-lr", "-5"], "--hop-recovery-lr"),
                         (["--eval-at", "99"], "--eval-at"), (["--density", "0.3"], "--density")]:
        out = tmp_path / "never"
        assert main(["run", "--out", str(out), "--no-progress", *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_hopfield_without_preset_gets_the_preset_training_settings():
    preset = load_yaml(CONFIGS / "hopsupsup_split_mnist.yaml")
    for key, value in HOPFIELD_DEFAULTS.items():
        assert preset[key] == value, key
    cfg = make_config(overrides=dict(model="bnnet", inference="hopfield", benchmark="split-mnist-10"))
    for key, value in HOPFIELD_DEFAULTS.items():
        assert getattr(cfg, key) == value, key
    # A flag or a preset value still wins; other inference methods keep the generic defaults.
    cfg = make_config(overrides=dict(model="bnnet", inference="hopfield", benchmark="split-mnist-10", lr=0.05))
    assert cfg.lr == 0.05 and cfg.optimizer == "sgd"
    # Settings HopSupSup never reads are refused, not recorded as if used.
    for preset in (dict(iters=7), dict(optimizer="adam"), dict(eval_at=[1]), dict(objective="superfluous"), dict(infer_images=4)):
        with pytest.raises(ValueError, match=rf"--inference hopfield \(HopSupSup\) does not use --{next(iter(preset)).replace('_', '-')} "):
            make_config(preset, dict(model="bnnet", inference="hopfield", benchmark="split-mnist-10", tasks=2))
    assert make_config().lr == RunConfig().lr == 1e-4
    help_text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    assert "hopsupsup_split_mnist.yaml" in " ".join(help_text.split())


def test_evaluation_settings_are_resumable_and_mask_shaping_ones_are_not():
    for key in ("inference", "objective", "infer_images", "log_base", "test_batch_size", "hop_gamma",
                "hop_recovery_lr", "hop_recovery_trials"):
        assert key in RunConfig.RESUMABLE_CHANGES, key
    for key in ("lr", "iters", "epochs", "batch_size", "optimizer", "weight_decay", "scheduler", "seed", "model",
                "output_size", "mask_fn", "density", "er_multiplier", "init", "scenario", "benchmark", "tasks",
                "train_subset", "transfer", "mask_budget", "nns_epsilon", "nns_check_every", "image_size"):
        assert key not in RunConfig.RESUMABLE_CHANGES, key
    assert set(RunConfig.RESUMABLE_CHANGES) <= FIELDS


def test_every_field_is_declared_once_for_validation_and_flags():
    from supsup_fast.cli import build_parser
    from supsup_fast.runs.config import SETTINGS
    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(RunConfig)]
    # the run command's flags are derived from the same table: one flag per setting, same choices
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions if a.dest == "scenario")
    assert run.choices == next(s for s in SETTINGS if s.name == "scenario").choices
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions}
    assert {s.name for s in SETTINGS} <= flags


@pytest.mark.parametrize("text,message", [
    ("tasks: 3\ntasks: 4\n", "setting 'tasks' is given twice"),
    ("1: 2\n", r"setting names must be text, got \[1\]"),
    ("~: 2\n", r"setting names must be text, got \[None\]"),
    ("true: 2\n", r"setting names must be text, got \[True\]"),
])
def test_yaml_keys_given_twice_or_not_text_are_refused(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_yaml(path)


def test_a_yaml_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("lr: 0.1 # café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"config file .*latin1.yaml is not UTF-8 text"):
        load_yaml(path)


def test_a_smaller_tasks_flag_drops_the_presets_later_evaluation_points():
    preset = load_yaml(CONFIGS / "gnu_permuted_lenet_250_h.yaml")
    assert max(preset["eval_at"]) > 2
    with pytest.warns(UserWarning, match=r"--tasks 2 drops the preset's --eval-at points past it: \[10, 50, 100, 150, 200\]"):
        config = make_config(preset, {"tasks": 2, "iters": 3})
    assert all(p <= 2 for p in config.eval_at)
    assert make_config(preset, {"tasks": 2, "eval_at": [1]}).eval_at == [1]  # given with the flag: as given
    with pytest.raises(ValueError, match="points must lie in"):
        make_config({"tasks": 2, "eval_at": [5]})  # a preset's own inconsistency is still refused


def test_training_steps_are_capped_by_epochs():
    from supsup_fast.runs.loop import training_steps

    class Split:
        def num_batches(self, batch_size):
            return -(-10000 // batch_size)
    demo = make_config({"iters": 1000, "epochs": 3, "batch_size": 128})
    assert training_steps(demo, Split()) == 3 * 79  # the demo on the embedded subset: 237 steps, not 1000
    assert training_steps(make_config({"iters": 50}), Split()) == 50
    assert training_steps(make_config({"iters": None, "epochs": 2, "batch_size": 100}), Split()) == 200


def test_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert make_config({"data_root": "mnist"}).data_root == str(tmp_path / "mnist")
    assert make_config({"data_root": None}).data_root is None


def test_yaml_merge_keys_work_and_dash_spellings_count_as_one_setting(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text("<<: {lr: 0.1, tasks: 3}\ntasks: 4\n")
    assert load_yaml(merged) == {"lr": 0.1, "tasks": 4}  # explicit keys override merged ones, as YAML says
    twice = tmp_path / "twice.yaml"
    twice.write_text("batch-size: 16\nbatch_size: 32\n")
    with pytest.raises(ValueError, match="setting 'batch_size' is given twice"):
        load_yaml(twice)


def test_hopsupsup_recovery_takes_the_runs_weight_decay():
    # The official code's recovery SGD uses args.wd, the training's weight decay.
    cfg = make_config(overrides=dict(model="bnnet", inference="hopfield", benchmark="split-mnist-10", weight_decay=5e-4))
    hop = cfg.hop_settings()
    assert hop.weight_decay == hop.recovery_weight_decay == 5e-4
    assert make_config(overrides=dict(model="bnnet", inference="hopfield",
                                      benchmark="split-mnist-10")).hop_settings().recovery_weight_decay == 1e-4


def test_task_inference_settings_given_for_a_gg_run_are_named_as_ignored():
    with pytest.warns(UserWarning, match=r"--scenario GG .*: --objective does not apply and is ignored"):
        make_config(overrides=dict(scenario="GG", objective="superfluous"))
    with pytest.warns(UserWarning, match=r"--log-base, --calibration do not apply"):
        make_config({"scenario": "GG"}, dict(log_base=3.0, calibration="none"))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_config({"scenario": "GG", "inference": "binary"})  # a preset's (or a resumed run's) own: not warned
        make_config(overrides=dict(scenario="GNu", objective="superfluous", infer_images=4))
    with pytest.warns(UserWarning, match=r"--image-size is the crop size of split-imagenet; --benchmark permuted-mnist"):
        make_config(overrides=dict(benchmark="permuted-mnist", image_size=64))
    with warnings.catch_warnings():  # refused, so not also called ignored
        warnings.simplefilter("error")
        with pytest.raises(ValueError):
            make_config(overrides=dict(scenario="GG", inference="hopfield"))
