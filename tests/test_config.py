import pytest

from mambamorph.config import TrainConfig, dump_yaml, load_train_config
from mambamorph.errors import InputError


def test_defaults_are_the_paper_recipe():
    cfg = load_train_config()
    assert cfg.model == "mambamorph"
    assert cfg.lr == 1e-4 and cfg.epochs == 100 and cfg.smooth_weight == pytest.approx(0.2)
    assert cfg.data.moving == "mr" and cfg.data.fixed == "ct"


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
