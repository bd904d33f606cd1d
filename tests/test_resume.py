"""Resume after interruptions: a kill between (or during) checkpoint writes, SIGKILL at random
moments, a full disk, a vanished run folder. Each interrupted run, resumed to the end, must log
exactly the losses of an uninterrupted run (CPU, same threads)."""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mambamorph
from mambamorph import checkpoint as ckpt
from mambamorph.cli import main
from mambamorph.config import DataConfig, TrainConfig, dump_yaml
from mambamorph.errors import InputError, WriteError
from mambamorph.train import train
from conftest import last_logged_step

EPOCHS, STEPS = 8, 2  # 16 steps, a checkpoint every 2
SMALL = {"enc_features": [4, 4, 4, 4], "dec_features": [4] * 6}  # a cheap voxelmorph


def _cfg(root, **kw):
    base = dict(model="voxelmorph", model_args=SMALL, data=DataConfig(root=str(root)),
                lr=1e-3, epochs=EPOCHS,
                steps_per_epoch=STEPS, val_pairs=1, seed=5, device="cpu", log_every=1,
                threads=1, crop=[32, 32, 32], synthetic=0.3, synthetic_voxels=2.0)
    base.update(kw)
    return TrainConfig(**base)


def _rows(run: Path) -> list[str]:
    """log.csv without the wall-clock column."""
    return [r.rsplit(",", 1)[0] for r in (run / "log.csv").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "last.safetensors"))


def _assert_same_run(run: Path, ref: Path) -> None:
    assert _rows(run) == _rows(ref)
    wa, wb = _weights(run), _weights(ref)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    cdir = run / "checkpoints"
    assert len(list(cdir.glob("last_state-*.safetensors"))) == 1
    assert not list(run.rglob("*.tmp"))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tiny_phantom, tmp_path_factory):
    """An uninterrupted run of ``_cfg``."""
    n = torch.get_num_threads()
    run = tmp_path_factory.mktemp("reference") / "run"
    train(_cfg(tiny_phantom), run, progress=False)
    torch.set_num_threads(n)
    assert len(_rows(run)) == 1 + EPOCHS * STEPS + EPOCHS  # header, steps, validations
    return run


class Killed(BaseException):
    """Stands for the process dying: nothing in train() handles it."""


def _kill_on(monkeypatch, target, name: str, call: int):
    """Make ``target`` (a writer taking the path first) die on its ``call``-th write of ``name``."""
    module, attr = target
    real = getattr(module, attr)
    seen = []

    def writer(path, *args, **kwargs):
        if Path(path).name == name:
            seen.append(path)
            if len(seen) == call:
                raise Killed(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, attr, writer)


# ------------------------------------------------------------- a kill between the writes
@pytest.mark.parametrize("name,call", [
    ("last.safetensors", 3),   # resume state of step 6 complete, `last` weights still step 4
    ("last_state.json", 3),    # tensors of step 6 written, the record still names step 4's
])
def test_kill_between_checkpoint_writes_resumes_from_a_consistent_state(
        tiny_phantom, tmp_path, reference, monkeypatch, name, call):
    run = tmp_path / "run"
    _kill_on(monkeypatch, (ckpt, "atomic_write_bytes"), name, call)
    with pytest.raises(Killed):
        train(_cfg(tiny_phantom), run, progress=False)
    monkeypatch.undo()
    record = json.loads((run / "checkpoints/last_state.json").read_text())
    assert record["step"] == (6 if name == "last.safetensors" else 4)
    if name == "last_state.json":  # the newer tensors exist, but nothing names them yet
        assert (run / "checkpoints/last_state-00000006.safetensors").exists()
    train(_cfg(tiny_phantom), run, resume=True, progress=False)
    _assert_same_run(run, reference)


def test_a_state_whose_files_disagree_is_refused(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_phantom, epochs=2), run, progress=False)
    cdir = run / "checkpoints"
    record = json.loads((cdir / "last_state.json").read_text())
    # a record that names a tensor file of another step (as a mixed, half-written set would)
    named = record["tensors"]
    record["state"]["step"] = record["step"] = 6
    (cdir / "last_state.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match=f"{named}: holds step 4, but .*last_state.json records "
                                         "step 6; the training state was only partly saved"):
        train(_cfg(tiny_phantom), run, resume=True, progress=False)
    (cdir / named).unlink()
    with pytest.raises(InputError, match=f"{named}: cannot read the training state"):
        train(_cfg(tiny_phantom), run, resume=True, progress=False)


def _to_first_format(cdir: Path) -> None:
    """Rewrite a saved state in the first format (weights in `last`, optimizer beside the JSON)."""
    record = json.loads((cdir / "last_state.json").read_text())
    tensors = load_file(str(cdir / record["tensors"]))
    (cdir / record["tensors"]).unlink()
    ckpt._atomic_save_tensors(cdir / "last_state.safetensors",
                              {k: v for k, v in tensors.items() if not k.startswith("model.")})
    (cdir / "last_state.json").write_text(json.dumps({
        "format": 1, "param_groups": record["param_groups"], "scalars": record["scalars"],
        "state": {k: v for k, v in record["state"].items() if k not in ("device", "threads")}}))


def test_states_of_the_first_format_resume_when_their_steps_agree(tiny_phantom, tmp_path,
                                                                   reference):
    run = tmp_path / "run"
    train(_cfg(tiny_phantom, epochs=3), run, progress=False)
    _to_first_format(run / "checkpoints")
    info = json.loads((run / "checkpoints/last.json").read_text())
    info["meta"]["step"] = 4  # `last` written by a save that a kill cut short
    (run / "checkpoints/last.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="last.json: holds step 4, but .* records step 6"):
        train(_cfg(tiny_phantom), run, resume=True, progress=False)
    info["meta"]["step"] = 6
    (run / "checkpoints/last.json").write_text(json.dumps(info))
    train(_cfg(tiny_phantom), run, resume=True, progress=False)
    _assert_same_run(run, reference)


def test_resume_warns_when_threads_differ(tiny_phantom, tmp_path, caplog):
    run = tmp_path / "run"
    short = dict(steps_per_epoch=1, val_pairs=0)
    train(_cfg(tiny_phantom, epochs=1, **short), run, progress=False)
    with caplog.at_level("WARNING", logger="mambamorph.train"):
        train(_cfg(tiny_phantom, epochs=2, threads=2, **short), run, resume=True, progress=False)
    assert "CPU threads 1 -> 2" in caplog.text and "bitwise" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mambamorph.train"):
        train(_cfg(tiny_phantom, epochs=3, threads=2, **short), run, resume=True, progress=False)
    assert "bitwise" not in caplog.text


# -------------------------------------------------------------------------- real SIGKILL
def _env() -> dict:
    src = str(Path(mambamorph.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _sigkill_and_resume(cfg: TrainConfig, tmp_path: Path, kills: int, rnd: random.Random) -> Path:
    """Run ``cfg`` through the CLI in subprocesses, SIGKILL it ``kills`` times at random
    moments, and resume it to the end; return the run folder."""
    run, cfg_file = tmp_path / "run", tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_yaml(cfg))
    total = cfg.epochs * cfg.steps_per_epoch
    cmd = [sys.executable, "-m", "mambamorph.cli", "train", "--quiet", "--out", str(run)]
    first = cmd + ["--config", str(cfg_file)]
    done = 0
    for k in range(kills):
        # a moment after the first checkpoint (step 2) and well before the end, later each time
        lo = max(3, done + 1)
        if lo > total - 4:
            break
        target = rnd.randint(lo, lo + (total - 4 - lo) // (kills - k))
        proc = subprocess.Popen(first if done == 0 else cmd + ["--resume"], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t_end = time.time() + 120
        while last_logged_step(run) < target and proc.poll() is None and time.time() < t_end:
            time.sleep(0.01)
        time.sleep(rnd.uniform(0.0, 0.4))  # anywhere in the step: forward, update, writes
        proc.kill()
        err = proc.communicate()[1].decode()
        assert proc.returncode == -9, f"run ended before the kill (rc {proc.returncode}): {err}"
        done = last_logged_step(run)
    res = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return run


def test_sigkill_at_random_moments_then_resume_logs_the_same_losses(tiny_phantom, tmp_path,
                                                                    reference):
    seed = random.randrange(2**32)
    run = _sigkill_and_resume(_cfg(tiny_phantom), tmp_path, kills=2, rnd=random.Random(seed))
    _assert_same_run(run, reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(5))
def test_sigkill_many_times(tiny_phantom, tmp_path, reference, trial):
    run = _sigkill_and_resume(_cfg(tiny_phantom), tmp_path, kills=4,
                              rnd=random.Random(1000 + trial))
    _assert_same_run(run, reference)


# ------------------------------------------------------------ full disk, vanished folder
def _enospc_on(monkeypatch, name: str, call: int) -> None:
    """``os.replace`` onto ``name`` fails with ENOSPC from its ``call``-th time on."""
    real, seen = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            seen.append(dst)
            if len(seen) >= call:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_full_disk_stops_with_one_error_and_resume_works_once_space_is_freed(
        tiny_phantom, tmp_path, reference, monkeypatch):
    run = tmp_path / "run"
    _enospc_on(monkeypatch, "last_state.json", 4)
    with pytest.raises(WriteError, match="last_state.json: cannot write: No space left"):
        train(_cfg(tiny_phantom), run, progress=False)
    monkeypatch.undo()
    assert json.loads((run / "checkpoints/last_state.json").read_text())["step"] == 6
    assert not list(run.rglob("*.tmp"))
    train(_cfg(tiny_phantom), run, resume=True, progress=False)
    _assert_same_run(run, reference)


def test_cli_prints_one_line_for_a_full_disk(tiny_phantom, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _enospc_on(monkeypatch, "last.safetensors", 1)
    args = ["train", "--data", str(tiny_phantom), "--model", "voxelmorph", "--epochs", "2",
            "--steps", "2", "--val-pairs", "0", "--threads", "1", "--device", "cpu",
            "--out", str(run), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"mambamorph train: error: {run / 'checkpoints' / 'last.safetensors'}: "
                   "cannot write: No space left on device\n")
    monkeypatch.undo()
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0


def test_full_disk_in_the_log_and_tensorboard_become_write_errors(tiny_phantom, tmp_path,
                                                                  monkeypatch):
    import mambamorph.train as tr

    calls = []

    def full_open(path, mode="r", *args, **kwargs):
        if Path(path).name == "log.csv" and "a" in mode:
            calls.append(path)
            if len(calls) > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(tr, "open", full_open, raising=False)
    with pytest.raises(WriteError, match="log.csv: cannot write: No space left"):
        train(_cfg(tiny_phantom, epochs=2, val_pairs=0), tmp_path / "a", progress=False)
    monkeypatch.undo()

    from torch.utils.tensorboard import SummaryWriter

    def full_tb(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_tb)
    with pytest.raises(WriteError, match="tb: cannot write TensorBoard events: No space left"):
        train(_cfg(tiny_phantom, epochs=1, val_pairs=0), tmp_path / "b", progress=False)


def test_vanished_run_folder_stops_with_a_write_error(tiny_phantom, tmp_path):
    run = tmp_path / "run"

    def remove_run(stats):
        shutil.rmtree(run)

    with pytest.raises(WriteError, match="log.csv: cannot write: No such file"):
        train(_cfg(tiny_phantom, val_pairs=0), run, progress=False, on_epoch=remove_run)


def test_ctrl_c_mid_step_saves_a_state_that_resumes_exactly(tiny_phantom, tmp_path, reference,
                                                            monkeypatch):
    """Ctrl-C after the pair of step 5 was drawn (the RNG has moved on) saves step 4's state."""
    import mambamorph.train as tr

    real, calls = tr.pair_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "pair_loss", interrupted)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_phantom), run, progress=False)
    monkeypatch.undo()
    assert json.loads((run / "checkpoints/last_state.json").read_text())["step"] == 4
    train(_cfg(tiny_phantom), run, resume=True, progress=False)
    _assert_same_run(run, reference)


@pytest.mark.gpu
def test_cuda_rng_is_saved_and_restored(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_phantom, device="cuda", epochs=1, val_pairs=0), run, progress=False)
    cdir = run / "checkpoints"
    record = json.loads((cdir / "last_state.json").read_text())
    saved = load_file(str(cdir / record["tensors"]))["state.cuda_rng"]
    assert torch.equal(saved, torch.cuda.get_rng_state())  # nothing drew after the save
    torch.cuda.manual_seed(123)
    assert not torch.equal(saved, torch.cuda.get_rng_state())
    train(_cfg(tiny_phantom, device="cuda", epochs=1, val_pairs=0), run, resume=True,
          progress=False)  # a finished run: loads the state, trains no step
    assert torch.equal(saved, torch.cuda.get_rng_state())
