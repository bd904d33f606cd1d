"""Distributed training (issue 13): torchrun with 2 processes on the CPU (gloo).

Two processes with 1 pair each must train as one process with 2 pairs per step (same pairs,
gradients averaged); only rank 0 writes; a 2-process run resumes; SIGTERM to one process stops
both with a saved state. The runs go through the real launcher (``python -m
torch.distributed.run``) and the real command line; the unit tests below need no second
process.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from safetensors.torch import load_file

import mambamorph
from mambamorph import distributed
from mambamorph.cli import main
from mambamorph.config import DataConfig, TrainConfig, dump_yaml, load_train_config
from mambamorph.distributed import Launch, Session, distributed_device, launch_from_env
from mambamorph.errors import InputError
from mambamorph.train import train
from conftest import last_logged_step

needs_gloo = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="finds the worker processes through /proc")

SMALL = {"enc_features": [4, 4, 4, 4], "dec_features": [4] * 6}  # a cheap voxelmorph


def _cfg(root, **kw) -> TrainConfig:
    base = dict(model="voxelmorph", model_args=SMALL, data=DataConfig(root=str(root)),
                lr=1e-3, epochs=2, steps_per_epoch=2, val_pairs=1, seed=5, device="cpu",
                log_every=1, threads=1, crop=[32, 32, 32], synthetic=0.3, synthetic_voxels=2.0)
    base.update(kw)
    return TrainConfig(**base)


def _env(tag: str = "") -> dict:
    src = str(Path(mambamorph.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MAMBAMORPH_TEST_TAG": tag}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"):
        env.pop(name, None)
    return env


def _torchrun(args: list[str], tag: str = "") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "mambamorph", "train", "--quiet", *args]
    return subprocess.Popen(cmd, env=_env(tag), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _run2(args: list[str]) -> subprocess.CompletedProcess:
    proc = _torchrun(args)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _rows(run: Path) -> list[list[str]]:
    """log.csv without the wall-clock column."""
    return [r.split(",")[:-1] for r in (run / "log.csv").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "last.safetensors"))


def _files(run: Path) -> list[str]:
    """The run folder's files, TensorBoard's host/pid-stamped file name reduced to its kind."""
    return sorted(re.sub(r"events\.out\.tfevents\..*", "events", p.relative_to(run).as_posix())
                  for p in run.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def two_ranks(tiny_phantom, tmp_path_factory):
    """A 2-process run of ``_cfg`` (4 steps of 1 pair per process) through torchrun."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg_file = tmp / "cfg.yaml"
    cfg_file.write_text(dump_yaml(_cfg(tiny_phantom)))
    res = _run2(["--config", str(cfg_file), "--out", str(tmp / "run")])
    return tmp / "run", res


# ------------------------------------------------------------------ 2 processes (torchrun)
@needs_gloo
def test_two_ranks_train_as_one_rank_with_twice_the_batch(tiny_phantom, tmp_path, two_ranks):
    run2, _ = two_ranks
    train(_cfg(tiny_phantom, batch_size=2), tmp_path / "b2", progress=False)
    train(_cfg(tiny_phantom), tmp_path / "b1", progress=False)
    w2, wb2, wb1 = _weights(run2), _weights(tmp_path / "b2"), _weights(tmp_path / "b1")
    assert w2.keys() == wb2.keys()
    for k in w2:
        torch.testing.assert_close(w2[k], wb2[k], rtol=0, atol=1e-5, msg=k)
    # not a vacuous match: one pair per step trains other weights
    assert max((wb1[k] - wb2[k]).abs().max().item() for k in wb1) > 1e-3
    # the logged losses are the means over the same pairs, validation scores the same weights
    rows2, rows1 = _rows(run2), _rows(tmp_path / "b2")
    assert rows2[0] == rows1[0] and len(rows2) == len(rows1) == 1 + 4 + 2
    for a, b in zip(rows2[1:], rows1[1:]):
        assert a[:2] == b[:2]  # step, epoch
        for x, y in zip(a[2:], b[2:]):  # rounded to 4-6 decimals in the file
            assert float(x) == pytest.approx(float(y), rel=1e-4, abs=2e-4, nan_ok=True) \
                if x else not y


@needs_gloo
def test_only_rank_0_writes_and_prints(tiny_phantom, tmp_path, two_ranks):
    run2, res = two_ranks
    train(_cfg(tiny_phantom, batch_size=2), tmp_path / "one", progress=False)
    assert _files(run2) == _files(tmp_path / "one")
    assert len(list((run2 / "tb").iterdir())) == 1
    assert res.stdout.count("trained voxelmorph: 4 steps") == 1
    # the checkpoints hold the plain model's weights ("register"/"evaluate" load them)
    assert not [k for k in _weights(run2) if k.startswith("module.")]
    from mambamorph import checkpoint as ckpt

    ckpt.load_model(run2 / "checkpoints" / "best.json")
    state = json.loads((run2 / "checkpoints" / "last_state.json").read_text())
    assert state["state"]["processes"] == 2


@needs_gloo
def test_a_two_rank_run_resumes_exactly(tiny_phantom, tmp_path, two_ranks):
    run2, _ = two_ranks
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(dump_yaml(_cfg(tiny_phantom, epochs=1)))
    run = tmp_path / "run"
    _run2(["--config", str(cfg_file), "--out", str(run)])
    _run2(["--out", str(run), "--resume", "--epochs", "2"])
    assert _rows(run) == _rows(run2)
    wa, wb = _weights(run), _weights(run2)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _worker_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` started with MAMBAMORPH_TEST_TAG=tag."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in
                       (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if env.get("MAMBAMORPH_TEST_TAG") == tag and env.get("RANK") == str(rank):
            return int(proc.name)
    return None


@needs_gloo
@needs_proc
def test_sigterm_to_one_rank_stops_both_with_a_saved_state(tiny_phantom, tmp_path):
    cfg_file, run = tmp_path / "cfg.yaml", tmp_path / "run"
    cfg_file.write_text(dump_yaml(_cfg(tiny_phantom, epochs=500, val_pairs=0)))
    tag = uuid.uuid4().hex
    proc = _torchrun(["--config", str(cfg_file), "--out", str(run)], tag)
    t_end = time.time() + 120
    while last_logged_step(run) < 3 and proc.poll() is None and time.time() < t_end:
        time.sleep(0.05)
    pid = _worker_pid(tag, rank=1)
    assert pid is not None and proc.poll() is None, proc.communicate()[1][-3000:]
    os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert _worker_pid(tag, 0) is None and _worker_pid(tag, 1) is None
    state = json.loads((run / "checkpoints" / "last_state.json").read_text())
    stopped = state["step"]
    assert 3 <= stopped < 1000 and stopped == last_logged_step(run)  # saved after its last step
    assert f"stopping after step {stopped}: a process of the run received SIGINT or " \
           "SIGTERM" in err and "interrupted (training saved its last checkpoint)" in err
    # and the saved state resumes (two more steps)
    _run2(["--out", str(run), "--resume", "--epochs", str(stopped // 2 + 2)])
    assert last_logged_step(run) == 2 * (stopped // 2 + 2)


def _agreement_worker(rank: int, port: int, out: str) -> None:
    """One of 2 gloo processes (torch.multiprocessing.spawn): what they agree on."""
    from mambamorph.errors import PeerError, WriteError

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    res = {}
    with distributed.session("cpu") as s:
        loss, terms, stop, late = s.reduce_step(
            torch.tensor(float(rank)), {"dice": torch.tensor(2.0 + rank)},
            stop=rank == 1, main_stop=rank == 1)  # only rank 0's clock counts
        res["reduced"] = [loss, terms, stop, late]
        res["value"] = s.on_main(lambda: 40 + rank + 2)

        def fail():
            raise WriteError("run/log.csv: cannot write: No space left on device")

        try:
            s.on_main(fail)
        except (WriteError, PeerError) as e:
            res["error"] = [type(e).__name__, str(e)]
    Path(out, f"{rank}.json").write_text(json.dumps(res))


@needs_gloo
def test_ranks_agree_on_step_results_and_on_rank_0s_errors(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_agreement_worker, args=(port, str(tmp_path)), nprocs=2)
    res = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["reduced"] == [0.5, {"dice": 2.5}, True, False]
        assert r["value"] == 42  # rank 0's result
    assert res[0]["error"] == ["WriteError", "run/log.csv: cannot write: No space left on device"]
    assert res[1]["error"] == ["PeerError", "rank 0 stopped: run/log.csv: cannot write: No space "
                                            "left on device"]


# --------------------------------------------------------------- in one process (no group)
def test_plain_environment_is_one_process():
    assert launch_from_env({}) == Launch()
    assert not launch_from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}).distributed
    launch = launch_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                              "LOCAL_WORLD_SIZE": "2"})
    assert launch == Launch(4, 3, 1, 2) and launch.distributed


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK and LOCAL_RANK not: start the processes "
                          "with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK=2, LOCAL_RANK=0 do not fit "
                                                          "WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': expected an integer"),
])
def test_bad_launch_environment_is_one_line(env, message):
    with pytest.raises(InputError, match=re.escape(message)):
        launch_from_env(env)


def test_device_errors_under_torchrun(monkeypatch):
    launch = Launch(world_size=2, rank=1, local_rank=1, local_world_size=2)
    assert distributed_device("cpu", launch) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed_device("auto", launch) == torch.device("cpu")
    with pytest.raises(InputError, match=r"^device 'cuda' under torchrun \(2 processes\), but "
                                         "CUDA is not available on this machine; train on the "
                                         "CPU with --device cpu$"):
        distributed_device("cuda", launch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InputError, match=r"^2 processes on this machine but 1 CUDA device\(s\): "
                                         r"start at most 1 per machine \(--nproc-per-node 1\)"):
        distributed_device("auto", launch)
    with pytest.raises(InputError, match="LOCAL_RANK=1 needs cuda:1, but this machine has 1"):
        distributed_device("cuda", Launch(world_size=4, rank=3, local_rank=1))
    with pytest.raises(InputError, match="each process trains on cuda:LOCAL_RANK; give "
                                         "--device cuda"):
        distributed_device("cuda:0", launch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed_device("cuda", launch) == torch.device("cuda", 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_cli_under_torchrun_without_gpus_is_one_line(tiny_phantom, tmp_path, capsys, monkeypatch,
                                                     rank):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", str(rank)), ("LOCAL_RANK", str(rank)),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    rc = main(["train", "--data", str(tiny_phantom), "--device", "cuda", "--out",
               str(tmp_path / "run"), "--quiet"])
    where = "rank 1: " if rank else ""
    assert rc == 2 and capsys.readouterr().err == (
        f"mambamorph train: error: {where}device 'cuda' under torchrun (2 processes), but CUDA "
        "is not available on this machine; train on the CPU with --device cpu\n")
    assert not (tmp_path / "run").exists()


def test_local_pairs_are_the_ranks_block_of_one_stream():
    def draws(session, batch):
        it = iter(range(100))
        return [session.local_pairs(lambda: next(it), batch) for _ in range(2)]

    cpu = torch.device("cpu")
    one = Session(Launch(), cpu)
    assert draws(one, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    ranks = [Session(Launch(2, r, r), cpu) for r in range(2)]
    assert [draws(s, 2) for s in ranks] == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_signal_handlers(tiny_phantom):
    cpu = torch.device("cpu")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    one = Session(Launch(), cpu)
    with pytest.raises(KeyboardInterrupt):
        with one.stop_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    two = Session(Launch(2, 1, 1), cpu)  # no group needed to set handlers
    with two.stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert two.stop_requested  # a flag, no exception: all ranks stop after the same step
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigterm_stops_a_one_process_run_with_a_state_that_resumes(tiny_phantom, tmp_path):
    run = tmp_path / "run"

    def sigterm(stats):
        if stats["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_phantom, epochs=3), run, progress=False, on_epoch=sigterm)
    assert json.loads((run / "checkpoints/last_state.json").read_text())["step"] == 2
    train(_cfg(tiny_phantom, epochs=3), run, resume=True, progress=False)
    train(_cfg(tiny_phantom, epochs=3), tmp_path / "straight", progress=False)
    assert _rows(run) == _rows(tmp_path / "straight")


def test_batch_size_option(tiny_phantom, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("batch_size: 3\n")
    assert load_train_config(cfg_file).batch_size == 3
    assert load_train_config(cfg_file, {"batch_size": 2}).batch_size == 2
    assert TrainConfig().batch_size == 1
    with pytest.raises(InputError, match="batch_size: expected an integer >= 1, got 0"):
        TrainConfig(batch_size=0)
    rc = main(["train", "--data", str(tiny_phantom), "--model", "voxelmorph", "--model-arg",
               "enc_features=[4,4,4,4]", "--model-arg", "dec_features=[4,4,4,4,4,4]",
               "--epochs", "1", "--steps", "1", "--batch-size", "2", "--val-pairs", "0",
               "--device", "cpu", "--threads", "1", "--out", str(tmp_path / "run"), "--quiet"])
    assert rc == 0
    assert load_train_config(tmp_path / "run" / "config.yaml").batch_size == 2


def test_stop_is_a_keyboard_interrupt():
    assert issubclass(distributed.Stop, KeyboardInterrupt)
