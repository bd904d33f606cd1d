"""Where and how work runs: device resolution, device description, synchronisation, a
device-synchronised wall-clock ``Timer`` and a ``PeakMemory`` probe.

Every command resolves its ``--device`` through :func:`resolve_device`, so an unknown or
unavailable device is one :class:`~mambamorph.errors.InputError` everywhere; every figure of time
or memory (bench, evaluate, register) is measured by :class:`Timer` and :class:`PeakMemory`, so
they are measured one way.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from mambamorph.errors import InputError

__all__ = ["resolve_device", "describe_device", "synchronize", "Timer", "timed", "PeakMemory"]


def resolve_device(name: str | torch.device) -> torch.device:
    """The ``torch.device`` for a device name.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or a
            ``torch.device``.

    Raises:
        InputError: an unknown device name, or a CUDA device on a machine without CUDA (or with
            fewer GPUs than the index asks for).
    """
    if isinstance(name, torch.device):
        dev = name
    else:
        text = str(name).strip()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise InputError(f"device {text!r}: unknown device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {str(name)!r} requested but CUDA is not available on this "
                             "machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {str(name)!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"device {str(name)!r}: only cpu and cuda are supported")
    return dev


def describe_device(device: torch.device | str) -> str:
    """A short description of the machine a figure was measured on, e.g.
    ``"NVIDIA H200 (CUDA)"`` or ``"CPU (x86_64, 2 threads)"``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"



def _device(device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def synchronize(device=None) -> None:
    """Wait for all queued work on ``device`` (a CUDA device; no-op on CPU)."""
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """Wall-clock timer that synchronises the device before reading the clock on both ends.

    Usage: ``with Timer(device) as t: model(x)`` then ``t.seconds``.

    Args:
        device: the device the timed work runs on (``None`` or CPU: no synchronisation).
    """

    def __init__(self, device=None) -> None:
        self.device = _device(device)
        self.seconds: float = float("nan")
        self._start = 0.0

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def timed(fn: Callable[..., Any], *args, device=None, **kwargs) -> tuple[Any, float]:
    """Call ``fn(*args, **kwargs)`` and return ``(result, seconds)``, device-synchronised.

    The caller excludes warm-up calls (the first pair) itself.
    """
    with Timer(device) as t:
        result = fn(*args, **kwargs)
    return result, t.seconds


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    """Current resident set size from /proc/self/statm, or None where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (not glibc)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_heap() -> bool:
    """Hand memory that the C allocator holds but no longer uses back to the OS (glibc's
    ``malloc_trim(0)``); True if that was done, False where it is unavailable (not glibc).

    Without it, the resident set does not grow while a measured block reuses memory that
    earlier, larger work freed, and a CPU peak of a small model run after a large one reads
    near 0 (seen: VoxelMorph evaluated after MambaMorph reported 4 KB instead of ~0.37 GB).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class PeakMemory:
    """Peak memory used while the ``with`` block runs, in bytes (``peak_bytes``).

    - CUDA: ``torch.cuda.reset_peak_memory_stats`` on entry, ``max_memory_allocated`` on exit
      (memory *allocated* by tensors, not the caching allocator's reserved pool), as an absolute
      figure that includes tensors alive before the block (weights, inputs); the allocation at
      entry is in ``start_bytes``.
    - CPU: the peak resident set size of the process *above* its size at entry, sampled from
      ``/proc/self/statm`` by a background thread every ``interval`` seconds (and once at exit).
      Allocations shorter than the interval can be missed. With ``release_free`` (default),
      memory the C allocator holds free is first returned to the OS
      (:func:`_release_free_heap`, glibc), so that reusing memory freed by earlier work still
      counts; the block then pays the page faults of a fresh process, so time it in another
      call when steady-state time matters. Without ``/proc`` (not Linux) the figure is the
      growth of ``getrusage``'s lifetime peak, a lower bound.

    Args:
        device: device the measured work runs on (``None``: CPU).
        interval: CPU sampling period in seconds.
        release_free: CPU only: return free heap memory to the OS on entry (see above).
    """

    def __init__(self, device=None, interval: float = 0.002, release_free: bool = True) -> None:
        self.device = _device(device)
        self.interval = float(interval)
        self.release_free = bool(release_free)
        self.peak_bytes: int = 0
        self.start_bytes: int = 0
        self._peak_rss = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._use_proc = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = _rss_bytes()
            if rss is not None and rss > self._peak_rss:
                self._peak_rss = rss

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        if self.release_free:
            _release_free_heap()
        rss = _rss_bytes()
        self._use_proc = rss is not None
        if self._use_proc:
            self.start_bytes = self._peak_rss = rss
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="PeakMemory", daemon=True)
            self._thread.start()
        else:
            self.start_bytes = self._peak_rss = _maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        if self._use_proc:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            rss = _rss_bytes()
            if rss is not None:
                self._peak_rss = max(self._peak_rss, rss)
        else:
            self._peak_rss = _maxrss_bytes()
        self.peak_bytes = max(self._peak_rss - self.start_bytes, 0)


def _maxrss_bytes() -> int:
    """Lifetime peak RSS of the process (getrusage), in bytes; 0 where unavailable."""
    try:
        import resource
        import sys
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except (ImportError, OSError):
        return 0
