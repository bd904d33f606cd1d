"""Training losses beyond the paper's: the --loss spec, image terms, label-free (unsupervised)
training, validation plausibility and the checkpoint-selection gate."""

import csv
import math

import numpy as np
import pytest
import torch

from mambamorph import similarity as sim
from mambamorph.cli import main
from mambamorph.config import DataConfig, TrainConfig, load_train_config
from mambamorph.errors import InputError
from mambamorph.losses import LossSpec, image_term, parse_loss
from mambamorph.train import RunLog, selection_score, train, validate


@pytest.mark.parametrize("spec, moving, fixed, expect", [
    ("image+dice", "mr", "ct", LossSpec("mind", True)),
    ("image", "t1", "T1", LossSpec("lncc", False)),
    ("dice", "mr", "ct", LossSpec(None, True)),
    ("Dice + MI", "mr", "ct", LossSpec("mi", True)),
    ("lncc", "mr", "ct", LossSpec("lncc", False)),
])
def test_parse_loss(spec, moving, fixed, expect):
    assert parse_loss(spec, moving, fixed) == expect


@pytest.mark.parametrize("bad", ["", "ssd", "mind+lncc", "dice+"])
def test_parse_loss_refuses(bad):
    if bad == "dice+":  # a trailing '+' is tolerated: the term list is still 'dice'
        assert parse_loss(bad) == LossSpec(None, True)
        return
    with pytest.raises(InputError, match="loss"):
        parse_loss(bad)


def test_config_checks_the_loss(tmp_path):
    with pytest.raises(InputError, match="loss"):
        TrainConfig(loss="mind+lncc")
    f = tmp_path / "c.yaml"
    f.write_text("loss: ssd\n")
    with pytest.raises(InputError, match=f"{f}.*loss"):
        load_train_config(f)


def test_image_term_matches_the_similarity_functions():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 12, 14, 10, generator=g)
    b = torch.rand(1, 1, 12, 14, 10, generator=g)
    assert image_term("mind", a, b).item() == pytest.approx(
        sim.mind_ssd_loss(sim.mind_ssc(a), sim.mind_ssc(b)).item(), rel=1e-6)
    assert image_term("mind", a, b, fixed_features=sim.mind_ssc(b)).item() == pytest.approx(
        image_term("mind", a, b).item(), rel=1e-6)
    assert image_term("lncc", a, b).item() == pytest.approx(sim.lncc_loss(a, b).item(), rel=1e-6)
    assert image_term("mi", a, b).item() == pytest.approx(sim.mi_loss(a, b).item(), rel=1e-6)
    # the image term of an image with itself is the minimum: 0 for MIND-SSD
    assert image_term("mind", a, a).item() == pytest.approx(0.0, abs=1e-7)


def test_selection_score_gate():
    ok = {"dice": 70.0, "sdlogj": 0.1, "compressed": 0.2, "image": 0.3}
    assert selection_score(ok, 0.5) == 70.0
    assert selection_score({**ok, "compressed": 3.0}, 0.5) == -math.inf
    assert selection_score({**ok, "compressed": 3.0}, 100.0) == 70.0
    assert selection_score({**ok, "sdlogj": 0.25}, 0.5, 0.2) == -math.inf
    assert selection_score({**ok, "sdlogj": 0.2}, 0.5, 0.2) == 70.0
    assert selection_score({**ok, "sdlogj": float("nan")}, 0.5, 0.2) == -math.inf
    # without labels, the lower image term is the better score
    assert selection_score({**ok, "dice": float("nan")}, 0.5) == -0.3


def _cfg(root, **kw):
    base = dict(model="voxelmorph", data=DataConfig(root=str(root)), lr=1e-3, epochs=1,
                steps_per_epoch=2, val_pairs=2, seed=3, device="cpu", log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _rows(run):
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_image_and_dice_terms_are_logged(tiny_phantom, tmp_path):
    train(_cfg(tiny_phantom, loss="image+dice", image_weight=0.5), tmp_path / "r",
          progress=False)
    rows = _rows(tmp_path / "r")
    steps = [r for r in rows if r["loss"]]
    for r in steps:
        total = (float(r["dice_loss"]) + 0.5 * float(r["image_loss"])
                 + 0.2 * float(r["smooth_loss"]))
        assert float(r["loss"]) == pytest.approx(total, abs=2e-5)
    val = [r for r in rows if r["val_dice"]]
    assert len(val) == 1 and 0 < float(val[0]["val_image"]) < 12
    assert float(val[0]["val_sdlogj"]) >= 0 and 0 <= float(val[0]["val_compressed"]) <= 100


def _label_free_manifest(root, tmp_path):
    """A manifest of the tiny phantom with no seg column (the phantom's split kept)."""
    import json

    split = json.loads((root / "split.json").read_text())
    path = tmp_path / "nolabels.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject", "mr", "ct", "split"])
        for name in ("train", "val", "test"):
            for s in split[name]:
                w.writerow([s, root / "vol" / f"{s}_mr.nii.gz", root / "vol" / f"{s}_ct.nii.gz",
                            name])
    return path


def test_unsupervised_training_on_a_manifest_without_labels(tiny_phantom, tmp_path):
    manifest = _label_free_manifest(tiny_phantom, tmp_path)
    data = DataConfig(manifest=str(manifest))
    with pytest.raises(InputError, match="no 'seg' column.*image"):
        train(_cfg(tiny_phantom, data=data, loss="image+dice"), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # refused before the run folder is touched
    res = train(_cfg(tiny_phantom, data=data, loss="image", synthetic=0.5), tmp_path / "b",
                progress=False)
    assert res.steps == 2
    val = [r for r in _rows(tmp_path / "b") if r["val_image"]]
    assert len(val) == 1 and val[0]["val_dice"] == "nan"  # no labels: no Dice ...
    assert float(val[0]["val_image"]) > 0                 # ... but the image term
    assert res.best_score == pytest.approx(-float(val[0]["val_image"]), abs=1e-5)
    assert (tmp_path / "b/checkpoints/best.json").exists()
    # evaluation needs labels and says so
    rc = main(["evaluate", str(tmp_path / "b/checkpoints/last.json"), "--manifest",
               str(manifest), "--out", str(tmp_path / "ev"), "--quiet", "--device", "cpu"])
    assert rc == 2


def test_validation_plausibility_matches_the_metrics(tiny_phantom):
    """validate()'s SDlogJ and compressed share are the metrics' values on the same fields."""
    from mambamorph.data.datasets import SRRegDataset, test_pairs
    from mambamorph.metrics import compressed_percent, sdlogj
    from mambamorph.models import build_model

    torch.manual_seed(0)
    model = build_model("voxelmorph")
    with torch.no_grad():  # a visibly non-zero field
        model.head.weight.normal_(0, 0.05)
    ds = SRRegDataset(tiny_phantom, split="val")
    pairs = test_pairs(ds.subjects, 2, 0)
    val = validate(model, ds, pairs, torch.device("cpu"), image="mind")
    s, c = [], []
    for b in ds.pairs(pairs):
        flow = model(b["moving"][None], b["fixed"][None]).flow.detach()[0].numpy()
        s.append(sdlogj(flow, crop=2))
        c.append(compressed_percent(flow, b["fixed_seg"][0].numpy() > 0))
    assert val["sdlogj"] == pytest.approx(np.mean(s), rel=1e-6) and val["sdlogj"] > 0.01
    assert val["compressed"] == pytest.approx(np.mean(c), abs=1e-9)


def test_gate_keeps_no_flattening_checkpoint(tiny_phantom, tmp_path, caplog):
    """max_compressed 0: any compressed voxel disqualifies; a field squeezing voxels is never
    kept as best, and the run says so."""
    from mambamorph.models import build_model
    from mambamorph import checkpoint as ckpt

    torch.manual_seed(0)
    model = build_model("voxelmorph")
    with torch.no_grad():
        model.head.weight.normal_(0, 2.0)  # a wild, folding field
    ckpt.save_model(tmp_path / "wild", model)
    res = train(_cfg(tiny_phantom, init=str(tmp_path / "wild.json"), lr=1e-6,
                     max_compressed=0.0), tmp_path / "r", progress=False)
    val = [r for r in _rows(tmp_path / "r") if r["val_dice"]]
    assert all(float(r["val_compressed"]) > 0 for r in val)
    assert res.best_score == -math.inf
    assert not (tmp_path / "r/checkpoints/best.json").exists()
    assert "plausibility gate" in caplog.text


def test_multiscale_image_loss():
    import torch.nn.functional as F

    from mambamorph.losses import multiscale_image_loss
    from mambamorph.nn.spatial import warp

    g = torch.Generator().manual_seed(1)
    m = torch.rand(1, 1, 16, 12, 8, generator=g)
    f = torch.rand(1, 1, 16, 12, 8, generator=g)
    flow = torch.randn(1, 3, 16, 12, 8, generator=g)
    assert multiscale_image_loss("mind", m, f, flow, (1,)).item() == pytest.approx(
        image_term("mind", warp(m, flow), f).item(), rel=1e-6)
    zero = torch.zeros_like(flow)
    expect = (image_term("lncc", m, f) + image_term("lncc", F.avg_pool3d(m, 2),
                                                     F.avg_pool3d(f, 2))) / 2
    assert multiscale_image_loss("lncc", m, f, zero, (1, 2)).item() == pytest.approx(
        expect.item(), rel=1e-5)  # the identity warp rounds in float32
    with pytest.raises(InputError, match="does not divide"):
        multiscale_image_loss("mind", m, f, flow, (3,))


def test_recipes(tmp_path):
    from mambamorph.config import RECIPES

    assert load_train_config().recipe == "default"
    paper = load_train_config(overrides={"recipe": "paper"})
    for key, value in RECIPES["paper"].items():
        assert getattr(paper, key) == value
    # a file and flags still override the recipe's values
    f = tmp_path / "c.yaml"
    f.write_text("recipe: paper\nlr: 0.001\n")
    cfg = load_train_config(f, {"smooth_weight": 0.5})
    assert (cfg.loss, cfg.lr, cfg.smooth_weight) == ("dice", 0.001, 0.5)
    with pytest.raises(InputError, match="recipe"):
        load_train_config(overrides={"recipe": "fast"})
