"""``mambamorph register --pairs``: many pairs, one network load, a summary, resuming, failures."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from mambamorph import checkpoint, metrics
from mambamorph import register as reg
from mambamorph.cli import main
from mambamorph.errors import InputError
from mambamorph.models import build_model
from mambamorph.models.registry import RegistrationOutput
from mambamorph.register_batch import SUMMARY_COLUMNS, read_pairs

CENTRE = np.array([4.0, -6.0, 10.0])  # world centre (RAS mm) of the textured ellipsoid
# quick settings: the small checkpoint's 32^3 grid, no affine stage, two IO iterations per level
QUICK = ["--no-affine", "--io-iterations", "2,2", "--quiet"]


def _volume(shift, spacing, shape=(36, 40, 32)):
    """A textured ellipsoid (background 0) shifted by ``shift`` mm, and its label map."""
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = CENTRE - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    p = idx @ aff[:3, :3].T + aff[:3, 3] - np.asarray(shift)
    r = np.sqrt((((p - CENTRE) / [38.0, 42.0, 34.0]) ** 2).sum(-1))
    tex = 100 + 40 * np.sin(p[..., 0] / 7) * np.cos(p[..., 1] / 9) + 30 * np.sin(p[..., 2] / 6)
    img = tex / (1 + np.exp((r - 1) / 0.06))
    seg = np.where(r < 1, 2, 0) + np.where(r < 0.5, 15, 0)
    return nib.Nifti1Image(img.astype(np.float32), aff), nib.Nifti1Image(seg.astype(np.int16), aff)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three moving (with label maps) and two fixed volumes, slightly shifted from each other,
    and a small voxelmorph checkpoint (32^3 model grid at 4 mm)."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    for k, shift in enumerate([(0, 0, 0), (3, -2, 1), (-2, 2, -3)]):
        img, seg = _volume(shift, (3.0, 3.0, 3.5))
        nib.save(img, str(root / "img" / f"m{k}.nii.gz"))
        nib.save(seg, str(root / "img" / f"m{k}_seg.nii.gz"))
    for k, shift in enumerate([(1, 1, 0), (-1, 0, 2)]):
        nib.save(_volume(shift, (3.5, 3.0, 3.0), (32, 40, 36))[0],
                 str(root / "img" / f"f{k}.nii.gz"))
    torch.manual_seed(0)
    ck = checkpoint.save_model(root / "vm", build_model("voxelmorph"),
                               meta={"spacing": [4, 4, 4], "grid": [32, 32, 32]})
    return {"root": root, "ckpt": ck}


def _csv(path, rows, header=("moving", "fixed", "moving_seg")):
    path.write_text("\n".join([",".join(header)] + [",".join(r) for r in rows]) + "\n")
    return path


def _three(tmp_path):
    """A pairs file next to the images (relative paths) with three pairs, one without an id."""
    return _csv(tmp_path / "pairs.csv", [
        ("img/m0.nii.gz", "img/f0.nii.gz", "img/m0_seg.nii.gz", "a"),
        ("img/m1.nii.gz", "img/f1.nii.gz", "", "b"),
        ("img/m2.nii.gz", "img/f0.nii.gz", "img/m2_seg.nii.gz", "")],
        header=("moving", "fixed", "moving_seg", "id"))


def _summary(out):
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    return {r[0]: dict(zip(SUMMARY_COLUMNS, r)) for r in rows[1:]}


@pytest.fixture
def pairs_dir(images, tmp_path):
    """A folder holding the images (a symlink) and room for pairs files and outputs."""
    (tmp_path / "img").symlink_to(images["root"] / "img")
    return tmp_path


@pytest.fixture
def counts(monkeypatch):
    """How often the checkpoint is loaded and a pair is registered (real calls, counted)."""
    n = {"load": 0, "register": 0}
    real_load, real_register = reg.load_model, reg.Registrar.register

    def load(*args, **kwargs):
        n["load"] += 1
        return real_load(*args, **kwargs)

    def register(self, *args, **kwargs):
        n["register"] += 1
        return real_register(self, *args, **kwargs)

    monkeypatch.setattr(reg, "load_model", load)
    monkeypatch.setattr(reg.Registrar, "register", register)
    return n


# ------------------------------------------------------------------------------------- tests
def test_three_pairs_one_model_load(images, pairs_dir, counts, capsys, one_thread):
    csv_path, out = _three(pairs_dir), pairs_dir / "out"
    rc = main(["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]),
               "--out", str(out), *QUICK])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert counts == {"load": 1, "register": 3}
    rows = _summary(out)
    assert list(rows) == ["a", "b", "m2__f0"]  # the third id: moving stem __ fixed stem
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "m2__f0", "summary.csv"]
    for pid, row in rows.items():
        assert row["status"] == "ok" and row["error"] == "", row
        assert float(row["seconds"]) > 0 and 0 <= float(row["folding_percent"]) < 1
        assert float(row["sdlogj"]) > 0  # IO moved the field away from the identity
        rec = json.loads((out / pid / "register.json").read_text())
        assert rec["model"] == "voxelmorph" and rec["instance_optimisation"]["iterations"] == [2, 2]
        assert rec["folding_percent"] == pytest.approx(float(row["folding_percent"]), rel=1e-5)
        assert (out / pid / "warped.nii.gz").exists() and (out / pid / "qc.png").exists()
    assert rows["a"]["moving"] == str(pairs_dir / "img" / "m0.nii.gz")  # relative to the CSV
    assert (out / "a" / "warped_seg.nii.gz").exists()
    assert not (out / "b" / "warped_seg.nii.gz").exists()  # no label map given for b
    assert "3 pairs" in text and "3 ok" in text and "0 failed" in text


def test_batch_outputs_equal_the_single_pair_command(images, pairs_dir, one_thread):
    """The one-pair command and the batch write the same files for the same pair."""
    csv_path, out = _three(pairs_dir), pairs_dir / "out"
    assert main(["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]),
                 "--out", str(out), *QUICK]) == 0
    img = pairs_dir / "img"
    assert main(["register", str(img / "m0.nii.gz"), str(img / "f0.nii.gz"), "--moving-seg",
                 str(img / "m0_seg.nii.gz"), "--model", str(images["ckpt"]), "--out",
                 str(pairs_dir / "one"), *QUICK]) == 0
    for name in ("warped.nii.gz", "warped_seg.nii.gz", "displacement_itk.nii.gz",
                 "jacobian.nii.gz"):
        batch, one = (np.asanyarray(nib.load(str(d / name)).dataobj)
                      for d in (out / "a", pairs_dir / "one"))
        np.testing.assert_array_equal(batch, one)
    a, b = (json.loads((d / "register.json").read_text()) for d in (out / "a", pairs_dir / "one"))
    assert {k for k in a if a[k] != b[k]} <= {"seconds_total", "seconds_predict", "seconds_stages"}


class _SineModel(nn.Module):
    """A network whose displacement is a known smooth field (model voxels)."""

    size_multiple = 16

    @staticmethod
    def field(shape):
        y = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
        w = [2 * np.pi / n for n in shape]
        return np.stack([1.5 * np.sin(w[i] * y[i] + i) for i in range(3)])  # |du_i/dx_i| < 0.3

    def forward(self, moving, fixed):
        flow = torch.as_tensor(self.field(moving.shape[2:]), dtype=torch.float32)
        return RegistrationOutput(flow=flow[None].to(moving.device))


def test_summary_sdlogj_is_that_of_the_deformable_field(images, pairs_dir, monkeypatch):
    """Network alone, no affine: the summary's SDlogJ and folding are metrics.sdlogj /
    folding_percent of the network's field on the model grid."""
    monkeypatch.setattr(reg, "load_model", lambda path, device="cpu", **kw: (
        _SineModel(), {"model": "sine", "meta": {"spacing": [4, 4, 4], "grid": [32, 32, 32]}}))
    csv_path = _csv(pairs_dir / "p.csv", [("img/m0.nii.gz", "img/f0.nii.gz", "")])
    out = pairs_dir / "out"
    assert main(["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]), "--out",
                 str(out), "--no-io", "--no-affine", "--quiet"]) == 0
    row = _summary(out)["m0__f0"]
    u = _SineModel.field((32, 32, 32))
    assert float(row["sdlogj"]) == pytest.approx(metrics.sdlogj(u), rel=1e-5)
    assert float(row["sdlogj"]) > 0.1
    assert float(row["folding_percent"]) == pytest.approx(metrics.folding_percent(u), abs=1e-6)


def test_failing_pairs_are_reported_and_the_rest_run(images, pairs_dir, counts, capsys):
    img = pairs_dir / "img"
    corrupt = pairs_dir / "corrupt.nii.gz"
    raw = (img / "m1.nii.gz").read_bytes()
    corrupt.write_bytes(raw[:len(raw) // 2])  # a truncated download
    missing = pairs_dir / "nowhere" / "m9.nii.gz"
    csv_path = _csv(pairs_dir / "p.csv", [
        ("img/m0.nii.gz", "img/f0.nii.gz", "", "ok1"),
        (str(missing), "img/f0.nii.gz", "", "missing"),
        ("img/m1.nii.gz", str(corrupt), "", "corrupt"),
        ("img/m2.nii.gz", "img/f1.nii.gz", "", "ok2")],
        header=("moving", "fixed", "moving_seg", "id"))
    out = pairs_dir / "out"
    rc = main(["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]),
               "--out", str(out), "--no-io", "--no-affine", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    assert counts["load"] == 1 and counts["register"] == 4
    rows = _summary(out)
    assert [rows[k]["status"] for k in ("ok1", "missing", "corrupt", "ok2")] == [
        "ok", "failed", "failed", "ok"]
    assert str(missing) in rows["missing"]["error"] and "not found" in rows["missing"]["error"]
    assert str(corrupt) in rows["corrupt"]["error"] and "corrupt" in rows["corrupt"]["error"]
    err = captured.err.splitlines()
    assert len(err) == 2 and "Traceback" not in captured.err
    prefix = "mambamorph register: pair {} failed: "
    assert err[0].startswith(prefix.format("missing")) and str(missing) in err[0]
    assert err[1].startswith(prefix.format("corrupt")) and str(corrupt) in err[1]
    assert "2 ok" in captured.out and "2 failed" in captured.out
    assert not (out / "missing").exists()  # nothing written for a pair that failed on reading


def test_unexpected_errors_propagate(images, pairs_dir, monkeypatch):
    """A bug in one pair is not swallowed as a failed pair."""
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(reg, "align_affine", boom)
    csv_path = _csv(pairs_dir / "p.csv", [("img/m0.nii.gz", "img/f0.nii.gz", "")])
    with pytest.raises(RuntimeError, match="a bug"):
        main(["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]),
              "--out", str(pairs_dir / "out"), "--no-io", "--quiet"])


def test_rerun_skips_finished_pairs_and_overwrite_recomputes(images, pairs_dir, counts, capsys):
    csv_path, out = _three(pairs_dir), pairs_dir / "out"
    argv = ["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]), "--out",
            str(out), "--no-io", "--no-affine", "--quiet"]
    assert main(argv) == 0 and counts == {"load": 1, "register": 3}
    first = _summary(out)
    stamps = {p: (out / p / "register.json").stat().st_mtime_ns for p in first}
    capsys.readouterr()

    assert main(argv) == 0
    assert counts["register"] == 3  # nothing recomputed
    again = _summary(out)
    for pid in first:
        assert again[pid]["status"] == "skipped"
        assert (out / pid / "register.json").stat().st_mtime_ns == stamps[pid]
        for key in ("folding_percent", "sdlogj"):  # the figures of the run that computed it
            assert again[pid][key] == first[pid][key] != ""
    assert "3 skipped" in capsys.readouterr().out

    # a run killed while pair b ran: b's register.json missing, its summary row 'running'
    (out / "b" / "register.json").unlink()
    text = (out / "summary.csv").read_text().replace(",skipped,", ",running,", 2)
    (out / "summary.csv").write_text(text)
    assert main(argv) == 0
    assert counts["register"] == 4  # only b, redone in place
    assert [r["status"] for r in _summary(out).values()] == ["skipped", "ok", "skipped"]

    assert main([*argv, "--overwrite"]) == 0
    assert counts["register"] == 7
    assert [r["status"] for r in _summary(out).values()] == ["ok"] * 3
    assert all((out / p / "register.json").stat().st_mtime_ns > stamps[p] for p in first)

    # other settings: the earlier results are not taken for these; --overwrite replaces them
    capsys.readouterr()
    assert main([*argv[:-2], "--quiet"]) == 1  # with the affine stage now
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "affine stage" in err and "(--overwrite replaces it)" in err
    assert counts["register"] == 7


def test_interrupted_run_keeps_finished_pairs_and_resumes(images, pairs_dir, monkeypatch,
                                                         capsys):
    """Ctrl-C during the second pair: the summary holds the first (ok) and the second as
    running; the same command then runs the second and third only."""
    real, n = reg.Registrar.register, {"calls": 0}

    def register(self, *args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(reg.Registrar, "register", register)
    csv_path, out = _three(pairs_dir), pairs_dir / "out"
    argv = ["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]), "--out",
            str(out), "--no-io", "--no-affine", "--quiet"]
    assert main(argv) == 130
    assert "summary.csv lists every finished pair" in capsys.readouterr().err
    assert {k: r["status"] for k, r in _summary(out).items()} == {"a": "ok", "b": "running"}
    assert main(argv) == 0 and n["calls"] == 4  # b and m2__f0
    assert [r["status"] for r in _summary(out).values()] == ["skipped", "ok", "ok"]


def test_files_not_left_by_the_command_are_not_replaced(images, pairs_dir, capsys):
    """A pair folder holding someone's files (no register.json, not a killed pair of this
    command) fails with the --overwrite hint and is left as it was."""
    out = pairs_dir / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "warped.nii.gz").write_bytes(b"mine")
    csv_path = _three(pairs_dir)
    assert main(["register", "--pairs", str(csv_path), "--model", str(images["ckpt"]),
                 "--out", str(out), "--no-io", "--no-affine", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pair a failed" in err and "would overwrite warped.nii.gz" in err
    assert err.rstrip().endswith("(--overwrite replaces it)")
    assert (out / "a" / "warped.nii.gz").read_bytes() == b"mine"
    assert [r["status"] for r in _summary(out).values()] == ["failed", "ok", "ok"]


@pytest.mark.parametrize("case", ["missing csv", "missing column", "duplicate id", "empty",
                                  "no rows", "unsafe id", "empty path"])
def test_bad_pairs_file_is_one_line_exit_2(images, pairs_dir, counts, capsys, case):
    p = pairs_dir / "p.csv"
    if case == "missing csv":
        p, msg = pairs_dir / "none.csv", "pairs file not found"
    elif case == "missing column":
        _csv(p, [("img/m0.nii.gz",)], header=("moving",))
        msg = "missing column 'fixed'"
    elif case == "duplicate id":
        _csv(p, [("img/m0.nii.gz", "img/f0.nii.gz", "x"), ("img/m1.nii.gz", "img/f0.nii.gz", "x")],
             header=("moving", "fixed", "id"))
        msg = "line 3: id 'x' already used on line 2"
    elif case == "empty":
        p.write_text("")
        msg = "empty"
    elif case == "no rows":
        p.write_text("moving,fixed\n\n")
        msg = "no pairs"
    elif case == "unsafe id":
        _csv(p, [("img/m0.nii.gz", "img/f0.nii.gz", "../up")], header=("moving", "fixed", "id"))
        msg = "id '../up' is not a safe folder name"
    else:
        _csv(p, [("img/m0.nii.gz", "")], header=("moving", "fixed"))
        msg = "line 2: no fixed path"
    out = pairs_dir / "out"
    rc = main(["register", "--pairs", str(p), "--model", str(images["ckpt"]), "--out", str(out),
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"mambamorph register: error: {p}") and msg in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and counts["load"] == 0  # stopped before the network or any output


def test_pairs_and_positional_arguments_exclude_each_other(images, pairs_dir, capsys):
    csv_path, out = _three(pairs_dir), pairs_dir / "out"
    img = pairs_dir / "img"
    for argv, msg in (
            ([str(img / "m0.nii.gz"), str(img / "f0.nii.gz"), "--pairs", str(csv_path)],
             "either MOVING FIXED or --pairs CSV, not both"),
            ([str(img / "m0.nii.gz"), "--pairs", str(csv_path)], "not both"),
            (["--pairs", str(csv_path), "--moving-seg", str(img / "m0_seg.nii.gz")],
             "moving_seg column"),
            ([], "give MOVING and FIXED"),
            ([str(img / "m0.nii.gz")], "give MOVING and FIXED")):
        assert main(["register", *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("mambamorph register: error: ") and msg in err, (argv, err)
    assert not out.exists()


def test_read_pairs_paths_and_ids(tmp_path):
    """Paths relative to the CSV's folder or absolute; derived ids folder-safe and unique."""
    sub = tmp_path / "lists"
    sub.mkdir()
    p = _csv(sub / "p.csv", [
        ("../a/sub 1 (mr).nii.gz", "/data/ct.nii", "", ""),
        ("../b/sub 1 (mr).nii.gz", "/data/ct.nii", "", " "),
        ("x.nii.gz", "y.nii.gz", "s.nii.gz", "x__y"),
        ("x.nii.gz", "y.nii.gz", "", "")], header=("Moving", "fixed", "moving_seg", "id"))
    pairs = read_pairs(p)
    assert [q.id for q in pairs] == ["sub_1_mr___ct", "sub_1_mr___ct-2", "x__y", "x__y-2"]
    assert pairs[0].moving == tmp_path / "a" / "sub 1 (mr).nii.gz" and pairs[0].moving_seg is None
    assert str(pairs[0].fixed) == "/data/ct.nii" and pairs[2].moving_seg == sub / "s.nii.gz"
    with pytest.raises(InputError, match="not a safe folder name"):
        read_pairs(_csv(tmp_path / "q.csv", [("a", "b", "summary.csv")],
                        header=("moving", "fixed", "id")))
