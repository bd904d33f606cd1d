"""Data-parallel training over several processes with PyTorch's own engine
(``torch.distributed`` and ``DistributedDataParallel``), as started by ``torchrun``.

``torchrun --standalone --nproc-per-node N -m mambamorph train ...`` starts N processes, each
with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address (``MASTER_ADDR``,
``MASTER_PORT``) in its environment. :func:`session` reads them and joins the process group:
gloo on the CPU, NCCL on CUDA, where process ``r`` of a machine trains on ``cuda:LOCAL_RANK``.
Without those variables (or with ``WORLD_SIZE=1``) the run is a plain single process and every
:class:`Session` helper is a direct call, so a plain ``mambamorph train`` runs as before, bit
for bit.

How a distributed run shares the work (the :class:`Session` methods):

- pairs (:meth:`Session.local_pairs`): every process holds the same seeded pair stream and
  draws the whole step's ``WORLD_SIZE x batch_size`` pairs; process ``r`` trains on the r-th
  ``batch_size`` of them. The shares are disjoint, their union is what one process with batch
  ``WORLD_SIZE x batch_size`` draws, and the stream's state (saved by rank 0) is every
  process's, so ``--resume`` continues it;
- gradients: DDP averages them over the processes during ``backward``;
- rank 0 alone logs, validates, writes checkpoints and shows the progress bar
  (:meth:`Session.on_main`); the others wait and receive what it returned, or stop with a
  :class:`~mambamorph.errors.PeerError` when it raised;
- stopping (:meth:`Session.reduce_step`): each step ends with one all-reduce of the loss terms,
  of a stop flag (SIGINT or SIGTERM received by any process, :meth:`Session.stop_signals`) and
  of rank 0's time-budget decision, so every process stops after the same step; a signal then
  raises :class:`Stop` everywhere once rank 0 has saved the resume state.

Untested here: NCCL and several GPUs or machines (no GPU on the development machine); gloo on
the CPU with 2 processes is what ``tests/test_distributed.py`` runs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from mambamorph.errors import InputError, MambaMorphError, PeerError
from mambamorph.runtime import resolve_device

__all__ = ["Launch", "launch_from_env", "distributed_device", "Session", "session", "Stop"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stop(KeyboardInterrupt):
    """Raised on every process of a distributed run after the same step when any of them
    received SIGINT or SIGTERM (a ``KeyboardInterrupt``, so the CLI exits 130 as for Ctrl-C)."""


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a launch: ``world_size`` processes in all, this one of
    global rank ``rank`` and rank ``local_rank`` among the ``local_world_size`` processes of
    its machine (``None`` when the launcher did not say)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r}: expected an integer") from None


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The :class:`Launch` that ``torchrun``'s variables describe (``os.environ`` by default);
    a single process when ``WORLD_SIZE`` is unset.

    Raises:
        InputError: ``WORLD_SIZE`` > 1 without ``RANK`` or ``LOCAL_RANK``, or values out of range.
    """
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE")
    if world is None:
        return Launch()
    if world < 1:
        raise InputError(f"environment variable WORLD_SIZE={world}: expected an integer >= 1")
    rank, local = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    if world > 1:
        missing = [n for n, v in (("RANK", rank), ("LOCAL_RANK", local)) if v is None]
        if missing:
            raise InputError(f"WORLD_SIZE={world} is set but {' and '.join(missing)} not: start "
                             "the processes with torchrun (see the README)")
    rank, local = rank or 0, local or 0
    if not 0 <= rank < world or local < 0:
        raise InputError(f"RANK={rank}, LOCAL_RANK={local} do not fit WORLD_SIZE={world}")
    return Launch(world, rank, local, _env_int(env, "LOCAL_WORLD_SIZE"))


def distributed_device(name: str | torch.device, launch: Launch) -> torch.device:
    """The device of this process of a distributed ``launch`` for ``--device name``: ``cpu``,
    or ``cuda:LOCAL_RANK`` for ``cuda`` (``auto``: CUDA when available).

    Raises:
        InputError: CUDA asked for (``cuda``) where there is none, an explicit ``cuda:i``
            (each process's GPU is set by its LOCAL_RANK), or more processes on this machine
            than it has GPUs.
    """
    text = str(name).strip()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if not text.startswith("cuda"):
        return resolve_device(text)  # cpu, or the one-line error of an unknown device
    if not torch.cuda.is_available():
        raise InputError(f"device {text!r} under torchrun ({launch.world_size} processes), but "
                         "CUDA is not available on this machine; train on the CPU with "
                         "--device cpu")
    if resolve_device(text).index is not None:
        raise InputError(f"device {text!r} under torchrun: each process trains on "
                         "cuda:LOCAL_RANK; give --device cuda (or auto)")
    n = torch.cuda.device_count()
    if launch.local_world_size is not None and launch.local_world_size > n:
        raise InputError(f"{launch.local_world_size} processes on this machine but {n} CUDA "
                         f"device(s): start at most {n} per machine (--nproc-per-node {n}), or "
                         "train on the CPU with --device cpu")
    if launch.local_rank >= n:
        raise InputError(f"LOCAL_RANK={launch.local_rank} needs cuda:{launch.local_rank}, but "
                         f"this machine has {n} CUDA device(s): start at most {n} processes "
                         "per machine")
    return torch.device("cuda", launch.local_rank)


class Session:
    """This process's part of a run; every method is a direct call in a single process.

    Attributes:
        launch: the :class:`Launch`.
        device: the device this process trains on.
        stop_requested: set by :meth:`stop_signals`' handler when this process got a signal.
    """

    def __init__(self, launch: Launch, device: torch.device) -> None:
        self.launch = launch
        self.device = device
        self.stop_requested = False

    @property
    def distributed(self) -> bool:
        return self.launch.distributed

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, validates and writes."""
        return self.launch.rank == 0

    # ------------------------------------------------------------------------- model, pairs
    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` (which averages gradients over the
        processes and, here, starts them all from rank 0's weights), or ``model`` itself in a
        single process. Save and validate the plain ``model``, never the wrapper."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, net: nn.Module, sync: bool):
        """A context for one ``backward``: gradients are averaged over the processes only when
        ``sync`` (the last pair of a step); before that they accumulate locally."""
        if sync or not self.distributed:
            return nullcontext()
        return net.no_sync()

    def local_pairs(self, draw: Callable[[], T], batch_size: int) -> list[T]:
        """This process's ``batch_size`` pairs of the step: calls ``draw`` ``world_size x
        batch_size`` times (the whole step's pairs, in the order one process with that batch
        would draw them) and keeps the ``rank``-th block of ``batch_size``."""
        pairs = [draw() for _ in range(self.world_size * batch_size)]
        return pairs[self.rank * batch_size:(self.rank + 1) * batch_size]

    # -------------------------------------------------------------------- agreement, rank 0
    def reduce_step(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor],
                    stop: bool = False, main_stop: bool = False
                    ) -> tuple[float, dict[str, float], bool, bool]:
        """What every process agrees on after a step: ``(loss, terms, stop, main_stop)`` with
        the loss and the terms (scalar tensors, same keys in the same order on every process)
        averaged over the processes, ``stop`` true when any process passed ``stop`` and
        ``main_stop`` rank 0's value. One all-reduce (float64) in a distributed run."""
        if not self.distributed:
            return loss.item(), {k: v.item() for k, v in terms.items()}, stop, main_stop
        import torch.distributed as dist

        values = [loss.detach().reshape(()), *(t.detach().reshape(()) for t in terms.values())]
        buf = torch.stack([v.to(self.device, torch.float64) for v in values])
        flags = torch.tensor([float(stop), float(main_stop and self.is_main)],
                             dtype=torch.float64, device=self.device)
        buf = torch.cat([buf, flags])
        dist.all_reduce(buf)
        out = buf.cpu().tolist()
        mean = [v / self.world_size for v in out[:-2]]
        return mean[0], dict(zip(terms, mean[1:])), out[-2] > 0, out[-1] > 0

    def on_main(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` run by rank 0 alone; every process returns its result.

        In a distributed run the others wait for rank 0 (this is a collective: every process
        calls it at the same point) and receive the result (picklable) or, when ``fn`` raised,
        a :class:`~mambamorph.errors.PeerError` with rank 0's message, while rank 0 raises its
        own error, so all stop together.
        """
        if not self.distributed:
            return fn(*args, **kwargs)
        import torch.distributed as dist

        box: list[Any] = [None]
        error: Exception | None = None
        if self.is_main:
            try:
                box[0] = (True, fn(*args, **kwargs))
            except Exception as e:  # every process must learn of it, whatever it is
                error = e
                box[0] = (False, str(e) if isinstance(e, MambaMorphError)
                          else f"{type(e).__name__}: {e}")
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        ok, value = box[0]
        if not ok:
            raise PeerError(f"rank 0 stopped: {value}")
        return value

    def barrier(self) -> None:
        """Wait until every process reaches this point (no-op in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    @contextmanager
    def stop_signals(self) -> Iterator[None]:
        """Within it, SIGTERM stops training as Ctrl-C does. A single process raises
        ``KeyboardInterrupt`` on SIGTERM (SIGINT already does). A distributed process only
        sets :attr:`stop_requested` on SIGINT or SIGTERM, so that all of them stop after the
        same step (:meth:`reduce_step`) instead of one leaving the others in a collective.
        Handlers can be set only in the main thread; elsewhere this does nothing."""
        self.stop_requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum, frame):
            if not self.stop_requested:
                log.warning("rank %d: %s received; stopping after this step", self.rank,
                            signal.Signals(signum).name)
            self.stop_requested = True

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        if self.distributed:
            handlers = {signal.SIGINT: request, signal.SIGTERM: request}
        else:
            handlers = {signal.SIGTERM: interrupt}
        previous = {sig: signal.signal(sig, fn) for sig, fn in handlers.items()}
        try:
            yield
        finally:
            for sig, fn in previous.items():
                signal.signal(sig, fn)


@contextmanager
def session(device: str | torch.device = "auto",
            environ: Mapping[str, str] | None = None) -> Iterator[Session]:
    """This process's :class:`Session` for ``--device device``; in a distributed launch (see
    :func:`launch_from_env`) it joins the process group first (gloo for the CPU, NCCL for
    CUDA) unless the caller already did, and leaves a group it created on the way out. When
    an error or a :class:`Stop` leaves it on rank 0 of a distributed run, that process ignores
    SIGINT and SIGTERM from then on (see :func:`_outlive_peers`): it is about to exit.

    Raises:
        InputError: an unusable device (:func:`distributed_device`), a missing backend or
            rendezvous address, or a process group of another size than ``WORLD_SIZE``.
    """
    launch = launch_from_env(environ)
    if not launch.distributed:
        yield Session(launch, resolve_device(device))
        return
    import torch.distributed as dist

    env = os.environ if environ is None else environ
    dev = distributed_device(device, launch)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_available() or not getattr(dist, f"is_{backend}_available")():
        raise InputError(f"this PyTorch build has no {backend} backend for distributed "
                         f"training on {dev.type.upper()}")
    owns = not dist.is_initialized()
    if owns:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if missing:
            raise InputError(f"WORLD_SIZE={launch.world_size} is set but {' and '.join(missing)} "
                             "not: start the processes with torchrun (see the README)")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                device_id=dev if dev.type == "cuda" else None)
    elif (dist.get_world_size(), dist.get_rank()) != (launch.world_size, launch.rank):
        raise InputError(f"the process group (rank {dist.get_rank()} of "
                         f"{dist.get_world_size()}) does not match RANK={launch.rank}, "
                         f"WORLD_SIZE={launch.world_size}")
    clean = False
    try:
        yield Session(launch, dev)
        clean = True
    except BaseException as e:
        clean = isinstance(e, Stop)  # every process stopped after the same step
        if launch.rank == 0:
            _outlive_peers()
        raise
    finally:
        if owns and clean:
            dist.destroy_process_group()


def _outlive_peers() -> None:
    """Rank 0 leaving with an error or a stop: the other processes, which report nothing,
    may exit first, and torchrun then sends SIGTERM to the ones still running; rank 0 ignores
    SIGINT and SIGTERM from here on so that it finishes its report (torchrun's SIGKILL after
    ``--shutdown-timeout`` seconds still ends a process that hangs)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
