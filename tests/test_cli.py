"""The command line end to end on tiny data: exit codes, messages, files."""

import json

import pytest
import torch

from mambamorph.cli import main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "train", "evaluate", "register", "bench", "demo"):
        assert cmd in out


def test_data_phantom_prints_initial_dice(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "phantom", "--out", str(out), "--grid", "32x48x32", "-n", "6",
                 "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "initial Dice" in text
    assert (out / "split.json").exists() and (out / "vol" / "ph000_ct.nii.gz").exists()
    # a second build into the same folder is refused, and nothing is lost
    before = sorted(p.name for p in (out / "vol").iterdir())
    assert main(["data", "phantom", "--out", str(out), "--grid", "32x48x32", "-n", "6",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "vol").iterdir()) == before


def test_bad_grid_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "phantom", "--out", "x", "--grid", "30x30x30"])
    assert e.value.code == 2
    assert "divisible by 16" in capsys.readouterr().err


def test_evaluate_cli(tiny_phantom, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_phantom), "--model", "voxelmorph", "--epochs", "1",
                 "--steps", "1", "--val-pairs", "1", "--out", str(run), "--quiet"]) == 0
    out = tmp_path / "eval"
    assert main(["evaluate", str(run / "checkpoints" / "last.json"), "--data", str(tiny_phantom),
                 "--pairs", "2", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "| Initial |" in text and "VoxelMorph" in text
    res = json.loads((out / "results.json").read_text())
    assert res  # parsed
    assert (out / "results.md").exists() and (out / "per_roi_dice.png").exists()
    # missing checkpoint: one line on stderr, exit code 2, no traceback
    assert main(["evaluate", str(tmp_path / "nope.json"), "--data", str(tiny_phantom),
                 "--out", str(tmp_path / "e2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "| Initial |" in text and "| MambaMorph |" in text and "| VoxelMorph |" in text
    assert text.count("from the shipped phantom weights") == 2
    for f in ("eval/results.md", "eval/results.json", "eval/per_roi_dice.png",
              "runs/mambamorph/checkpoints/last.json", "runs/voxelmorph/log.csv"):
        assert (out / f).exists(), f
    # the run folder is not silently replaced
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 2


def test_shipped_weights_load_and_say_where_they_came_from():
    from mambamorph.checkpoint import load_model
    from mambamorph.checkpoint import shipped_weights
    from mambamorph.demo import DEMO_MODELS

    for name in DEMO_MODELS:
        stem = shipped_weights(name)
        assert stem is not None, name
        model, info = load_model(stem)
        assert info["model"] == name and model.registry_name == name
        meta = info["meta"]
        assert meta["grid"] == [96, 112, 96] and meta["moving"] == "mr" and meta["fixed"] == "ct"
        assert "validation" in meta["provenance"] and meta["val_dice"] > 70
        assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 file, fp32 model
    assert shipped_weights("transmorph") is None


def test_bench_quick_prints_tables(capsys, tmp_path):
    out = tmp_path / "bench.md"
    assert main(["bench", "--quick", "--models", "voxelmorph", "--device", "cpu",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| voxelmorph | 64x64x64 | 92,179 |" in text
    assert "| reference | 2,001 |" in text and "| cpu | 2,001 |" in text
    assert "voxelmorph" in out.read_text()


_BAD_DEVICES = ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", _BAD_DEVICES)
def test_bad_device_is_one_line_before_any_work(device, tiny_phantom, tmp_path, capsys):
    """``--device bogus`` (or ``cuda`` without CUDA) on every command that takes it: one line
    on stderr naming the device, exit code 2, no traceback, nothing written."""
    from mambamorph.checkpoint import shipped_weights

    vol = tiny_phantom / "vol"
    ckpt = str(shipped_weights("voxelmorph")) + ".json"
    commands = {
        "train": ["train", "--data", str(tiny_phantom), "--model", "voxelmorph", "--epochs", "1",
                  "--steps", "1", "--val-pairs", "1", "--out", str(tmp_path / "run"), "--quiet"],
        "evaluate": ["evaluate", ckpt, "--data", str(tiny_phantom), "--pairs", "2",
                     "--out", str(tmp_path / "eval"), "--quiet"],
        "bench": ["bench", "--quick", "--models", "voxelmorph", "--out",
                  str(tmp_path / "bench.md")],
        "register": ["register", str(vol / "ph000_mr.nii.gz"), str(vol / "ph001_ct.nii.gz"),
                     "--model", ckpt, "--out", str(tmp_path / "reg")],
    }
    for name, argv in commands.items():
        assert main([*argv, "--device", device]) == 2, name
        out, err = capsys.readouterr()
        assert err.startswith(f"mambamorph {name}: error: device {device!r}"), (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert out == "", (name, out)
    assert list(tmp_path.iterdir()) == []  # no run folder, output folder or table written


def test_refusals_name_no_flag_but_the_cli_says_how(tiny_phantom, tmp_path, capsys):
    """register and evaluate refuse to replace outputs with an OutputExistsError whose message
    names the folder and no command-line flag; the CLI appends how to ask (--overwrite)."""
    from mambamorph.checkpoint import shipped_weights

    vol = tiny_phantom / "vol"
    ckpt = str(shipped_weights("voxelmorph")) + ".json"
    reg, ev = tmp_path / "reg", tmp_path / "eval"
    reg.mkdir()
    ev.mkdir()
    (reg / "warped.nii.gz").write_bytes(b"earlier result")
    (ev / "notes.txt").write_text("mine")
    for argv, folder in (
            (["register", str(vol / "ph000_mr.nii.gz"), str(vol / "ph001_ct.nii.gz"),
              "--model", ckpt, "--out", str(reg), "--device", "cpu"], reg),
            (["evaluate", ckpt, "--data", str(tiny_phantom), "--pairs", "2", "--out", str(ev),
              "--device", "cpu", "--quiet"], ev)):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and err.endswith(" (--overwrite replaces it)\n"), err
        assert err.count("--") == 1 and "Traceback" not in err, err
    assert (reg / "warped.nii.gz").read_bytes() == b"earlier result"
    assert sorted(p.name for p in ev.iterdir()) == ["notes.txt"]


def test_evaluate_parses_the_method_options():
    from mambamorph.cli import build_parser

    a = build_parser().parse_args(["evaluate", "a.json", "b.json+io", "--io", "--methods", "io",
                                   "convexadam", "greedy", "ants-syn", "--ants", "--out", "x"])
    assert a.checkpoints == ["a.json", "b.json+io"] and a.io and a.ants
    assert a.methods == ["io", "convexadam", "greedy", "ants-syn"]
    a = build_parser().parse_args(["evaluate", "a.json", "--out", "x"])
    assert not a.io and not a.ants and a.methods is None


def test_evaluate_cli_io_rows(tiny_phantom, tmp_path, capsys, monkeypatch, one_thread):
    """--io adds '<model> + IO' after each checkpoint, --methods io the training-free row; a
    missing peer is one line naming its pip command."""
    import sys

    from mambamorph.checkpoint import save_model
    from mambamorph.models import build_model

    # memory is measured in a fresh process per method (tested in test_evaluate.py); not here
    monkeypatch.setattr("mambamorph.evaluation.run.peak_memory", lambda *a, **k: (1, "CPU RSS"))
    ckpt = tmp_path / "vm"
    save_model(ckpt, build_model("voxelmorph"))
    out = tmp_path / "eval"
    assert main(["evaluate", str(ckpt) + ".json", "--io", "--methods", "io", "--data",
                 str(tiny_phantom), "--pairs", "2", "--out", str(out), "--quiet",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    names = [s["name"] for s in json.loads((out / "results.json").read_text())["summary"]]
    assert names == ["Initial", "VoxelMorph", "VoxelMorph + IO", "IO (training-free)"]
    assert "| IO (training-free) |" in text and "J < 0.2 (%)" in text
    monkeypatch.setitem(sys.modules, "picsl_greedy", None)
    assert main(["evaluate", "--methods", "greedy", "--data", str(tiny_phantom), "--out",
                 str(tmp_path / "e2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install picsl-greedy" in err and "Traceback" not in err
    assert not (tmp_path / "e2").exists()
