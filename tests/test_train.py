import json

import pytest
import torch
from safetensors.torch import load_file

from mambamorph import checkpoint as ckpt
from mambamorph.cli import main
from mambamorph.config import DataConfig, TrainConfig
from mambamorph.errors import InputError
from mambamorph.train import RunLog, train


def _cfg(root, **kw):
    base = dict(model="voxelmorph", data=DataConfig(root=str(root)), lr=1e-3, epochs=2,
                steps_per_epoch=2, val_pairs=2, seed=3, device="cpu", log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def test_run_folder_contents(tiny_phantom, tmp_path):
    res = train(_cfg(tiny_phantom), tmp_path / "run", progress=False)
    assert res.steps == 4 and not res.stopped_early
    run = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "checkpoints/best.json", "checkpoints/best.safetensors",
                 "checkpoints/last.json", "checkpoints/last_state.json"):
        assert (run / name).exists(), name
    assert any((run / "tb").iterdir())
    info = json.loads((run / "checkpoints/last.json").read_text())
    assert info["model"] == "voxelmorph"
    assert info["meta"]["grid"] == [32, 48, 32] and info["meta"]["spacing"] == [5.0, 5.0, 5.0]
    rows = (run / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss")
    assert rows[0].split(",") == list(RunLog.COLUMNS)
    val = RunLog.COLUMNS.index("val_dice")
    assert len([r for r in rows[1:] if r.split(",")[val]]) == 2  # one validation row per epoch
    model, _ = ckpt.load_model(run / "checkpoints/best.json")
    assert sum(p.numel() for p in model.parameters()) == 92_179


def test_refuses_existing_run_folder(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        train(_cfg(tiny_phantom), run, progress=False)
    assert (run / "mine.txt").read_text() == "keep me"


def test_resume_continues_exactly(tiny_phantom, tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for the second epoch (same weights, bitwise)."""
    train(_cfg(tiny_phantom), tmp_path / "a", progress=False)
    train(_cfg(tiny_phantom, epochs=1), tmp_path / "b", progress=False)
    res = train(_cfg(tiny_phantom), tmp_path / "b", resume=True, progress=False)
    assert res.steps == 4
    wa = load_file(str(tmp_path / "a/checkpoints/last.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/last.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_same_seed_same_weights(tiny_phantom, tmp_path):
    train(_cfg(tiny_phantom, epochs=1), tmp_path / "a", progress=False)
    train(_cfg(tiny_phantom, epochs=1), tmp_path / "b", progress=False)
    wa = load_file(str(tmp_path / "a/checkpoints/last.safetensors"))
    wb = load_file(str(tmp_path / "b/checkpoints/last.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_from_checkpoint_must_match_model(tiny_phantom, tmp_path):
    train(_cfg(tiny_phantom, epochs=1), tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="holds model 'voxelmorph'"):
        train(_cfg(tiny_phantom, model="voxelmorph-feat",
                   init=str(tmp_path / "a/checkpoints/last.json")), tmp_path / "b", progress=False)


def test_init_scores_the_starting_weights_first(tiny_phantom, tmp_path):
    """Fine-tuning validates the starting weights at step 0: best is never worse than them."""
    from mambamorph.data.datasets import SRRegDataset, test_pairs
    from mambamorph.train import validate

    train(_cfg(tiny_phantom, epochs=1), tmp_path / "a", progress=False)
    start = tmp_path / "a/checkpoints/last.json"
    res = train(_cfg(tiny_phantom, epochs=1, init=str(start)), tmp_path / "b", progress=False)
    rows = [r.split(",") for r in (tmp_path / "b/log.csv").read_text().splitlines()[1:]]
    col = RunLog.COLUMNS.index("val_dice")
    val_rows = [r for r in rows if r[col]]
    assert val_rows[0][0] == "0" and len(val_rows) == 2
    ds = SRRegDataset(tiny_phantom, split="val")
    model, _ = ckpt.load_model(start)
    expect = validate(model, ds, test_pairs(ds.subjects, 2, 3), torch.device("cpu"))["dice"]
    assert float(val_rows[0][col]) == pytest.approx(expect, abs=1e-3)
    assert res.best_score >= expect - 1e-3


def test_cli_train_and_errors(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--data", str(tiny_phantom), "--model", "voxelmorph", "--epochs", "1",
               "--steps", "2", "--val-pairs", "1", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    assert "best validation score" in capsys.readouterr().out
    rc = main(["train", "--data", str(tiny_phantom), "--epochs", "1", "--out", str(out), "--quiet"])
    assert rc == 2 and "not empty" in capsys.readouterr().err
    rc = main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"),
               "--quiet"])
    assert rc == 2 and "missing" in capsys.readouterr().err


def test_train_with_crops_and_synthetic_pairs(tiny_phantom, tmp_path):
    res = train(_cfg(tiny_phantom, epochs=1, crop=[32, 32, 32], synthetic=0.5,
                     dice_scales=[1, 2]), tmp_path / "run", progress=False)
    assert res.steps == 2
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(rows) >= 3


def test_crop_larger_than_volume_is_refused(tiny_phantom, tmp_path):
    with pytest.raises(InputError, match="larger than the volumes"):
        train(_cfg(tiny_phantom, epochs=1, crop=[64, 64, 64]), tmp_path / "run", progress=False)


def test_more_validation_pairs_than_subjects_allow_is_capped(tiny_phantom, tmp_path):
    res = train(_cfg(tiny_phantom, epochs=1, val_pairs=50), tmp_path / "run", progress=False)
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    col = RunLog.COLUMNS.index("val_dice")
    assert res.steps == 2 and any(r.split(",")[col] for r in rows[1:])


def test_bad_data_leaves_an_existing_run_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    with pytest.raises(InputError):
        train(_cfg(tmp_path / "no-such-data"), run, overwrite=True, progress=False)
    assert (run / "keep.txt").read_text() == "mine"


def test_cli_resume_extends_a_finished_run(tiny_phantom, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_phantom), "--model", "voxelmorph", "--steps", "2",
            "--val-pairs", "1", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args + ["--epochs", "1"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert "4 steps" in capsys.readouterr().out
    steps = [int(r.split(",")[0]) for r in (out / "log.csv").read_text().splitlines()[1:]]
    assert max(steps) == 4
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--quiet"]) == 2


def test_overwrite_deletes_only_what_a_run_wrote(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_phantom, epochs=1), run, progress=False)
    (run / "notes.txt").write_text("mine")
    stale = run / "checkpoints" / "last_state-00000099.safetensors"
    stale.write_bytes(b"old")
    (run / "checkpoints" / ".last.json.abc.tmp").write_bytes(b"half")
    train(_cfg(tiny_phantom, epochs=1), run, overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "mine"
    assert not stale.exists() and not list(run.rglob("*.tmp"))
    assert len(list((run / "tb").iterdir())) == 1  # the earlier run's events are gone
    rows = (run / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "2"]  # two steps, one validation
