import pytest

from mambamorph.config import DataConfig, TrainConfig, dump_yaml, load_train_config
from mambamorph.errors import InputError


def test_defaults_and_the_paper_recipe():
    cfg = load_train_config()
    assert cfg.model == "mambamorph" and cfg.recipe == "default"
    assert cfg.loss == "image+dice" and cfg.dice_scales == [1, 2, 4]
    assert cfg.lr == 1e-4 and cfg.epochs == 100 and cfg.smooth_weight == pytest.approx(1.0)
    assert cfg.max_compressed == 0.5
    assert cfg.data.moving == "mr" and cfg.data.fixed == "ct"
    paper = load_train_config(overrides={"recipe": "paper"})
    assert paper.loss == "dice" and paper.dice_scales == [1] and paper.lr == 1e-4
    assert paper.smooth_weight == pytest.approx(0.2) and paper.max_compressed == 100.0


def test_yaml_then_flags_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: voxelmorph\nlr: 0.001\ndata:\n  root: /x\n  grid: [32, 32, 32]\n")
    cfg = load_train_config(p, {"lr": 0.01, "data.fixed": "t2", "epochs": None})
    assert cfg.model == "voxelmorph" and cfg.lr == 0.01 and cfg.epochs == 100
    assert cfg.data.root == "/x" and cfg.data.fixed == "t2" and cfg.data.grid == [32, 32, 32]


def test_round_trip_through_yaml(tmp_path):
    cfg = TrainConfig(model="transmorph", model_args={"drop_path": 0.1})
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_train_config(p) == cfg


@pytest.mark.parametrize("text,msg", [("lr: [1\n", "invalid YAML"), ("learning_rate: 1\n", "unknown"),
                                      ("data: 3\n", "expected a mapping")])
def test_bad_yaml_names_the_file(tmp_path, text, msg):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(InputError, match=msg) as e:
        load_train_config(p)
    assert "bad.yaml" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.yaml"):
        load_train_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- every value checked by type
def _load(tmp_path, text, **overrides):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return load_train_config(p, overrides)


def test_numbers_written_as_yaml_strings_become_the_numbers_meant(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; the optimiser must get the float
    cfg = _load(tmp_path, "lr: 1e-4\nepochs: 1e2\nmax_minutes: '2.5'\nthreads: '4'\n"
                          "smooth_weight: 2e-1\n")
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.epochs == 100 and isinstance(cfg.epochs, int)
    assert cfg.max_minutes == 2.5 and cfg.threads == 4 and cfg.smooth_weight == 0.2
    assert _load(tmp_path, "lr: 1\n").lr == 1.0 and isinstance(_load(tmp_path, "lr: 1\n").lr,
                                                                float)


@pytest.mark.parametrize("text,msg", [
    ("lr: abc\n", "lr: expected a number, got 'abc'"),
    ("lr: .nan\n", "lr: expected a number, got nan"),
    ("lr: true\n", "lr: expected a number, got True"),
    ("lr: 0\n", "lr: expected a positive number"),
    ("epochs: 2.5\n", "epochs: expected an integer, got 2.5"),
    ("epochs: ten\n", "epochs: expected an integer, got 'ten'"),
    ("epochs: yes\n", "epochs: expected an integer, got True"),
    ("log_every: 0\n", "log_every: expected an integer >= 1"),
    ("steps_per_epoch: [3]\n", "steps_per_epoch: expected an integer or null"),
    ("amp: 1\n", "amp: expected true or false, got 1"),
    ("amp: 'no'\n", "amp: expected true or false, got 'no'"),
    ("model: 3\n", "model: expected a string, got 3"),
    ("init: [a]\n", "init: expected a string or null"),
    ("dice_scales: 1\n", "dice_scales: expected a list of integers, got 1"),
    ("dice_scales: [1, 0.5]\n", r"dice_scales\[1\]: expected an integer, got 0.5"),
    ("dice_scales: []\n", "dice_scales: expected a list of integers >= 1"),
    ("crop: [64, 64]\n", "crop: expected three positive integers"),
    ("synthetic: 1.5\n", "synthetic: expected a fraction between 0 and 1"),
    ("seed: -1\n", "seed: expected an integer >= 0"),
    ("model_args: [residual]\n", "model_args: expected a mapping"),
    ("data:\n  grid: 96x112x96\n", "data.grid: expected a list of integers or null"),
    ("data:\n  grid: [96, 112, x]\n", r"data.grid\[2\]: expected an integer, got 'x'"),
    ("data:\n  grid: [96, 0, 96]\n", "data.grid: expected three positive integers"),
    ("data:\n  root: [a, b]\n", "data.root: expected a string or null"),
    ("data:\n  moving: null\n", "data.moving: expected a string, got None"),
    ("data:\n  gird: [1, 2, 3]\n", "unknown setting.*data.gird"),
])
def test_values_that_do_not_fit_their_option_are_refused_naming_file_and_key(tmp_path, text,
                                                                            msg):
    with pytest.raises(InputError, match=msg) as e:
        _load(tmp_path, text)
    assert str(e.value).startswith(str(tmp_path / "run.yaml") + ": ")


def test_optional_fields_take_null_and_lists_take_sequences(tmp_path):
    cfg = _load(tmp_path, "crop: null\nthreads: null\nsteps_per_epoch: ~\ndata:\n"
                          "  grid: [96, 112, 96]\n  split_file: null\n")
    assert cfg.crop is None and cfg.threads is None and cfg.steps_per_epoch is None
    assert cfg.data.grid == [96, 112, 96] and cfg.data.split_file is None
    assert _load(tmp_path, "data:\n").data == TrainConfig().data  # an empty section


def test_overrides_are_checked_too_without_naming_the_file(tmp_path):
    with pytest.raises(InputError, match="^given settings: lr: expected a positive number"):
        _load(tmp_path, "lr: 1e-4\n", lr=-1.0)
    with pytest.raises(InputError, match=r"^given settings: data.grid: expected three"):
        _load(tmp_path, "", **{"data.grid": [32, 32]})


def test_configs_built_in_python_are_checked_and_converted():
    cfg = TrainConfig(lr="1e-3", crop=(32, 32, 32), data={"root": "/x", "grid": (32, 32, 32)})
    assert cfg.lr == 1e-3 and cfg.crop == [32, 32, 32]
    assert cfg.data == DataConfig(root="/x", grid=[32, 32, 32])
    with pytest.raises(InputError, match="TrainConfig: epochs: expected an integer"):
        TrainConfig(epochs="many")
    with pytest.raises(InputError, match="DataConfig: grid: expected three positive integers"):
        DataConfig(grid=[1, 2])


def test_cli_reports_a_bad_config_value_in_one_line(tmp_path, capsys):
    from mambamorph.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text("model: voxelmorph\nlr: fast\n")
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.yaml: lr: expected a number, got 'fast'" in err
    assert not (tmp_path / "run").exists()
