"""Where and how work runs: device resolution, device description, synchronisation, a
device-synchronised wall-clock ``Timer``, a ``PeakMemory`` probe and ``peak_memory``, the one
measure of a model's or a method's memory, and how the C allocator treats freed memory
(:func:`keep_freed_memory`).

Every command resolves its ``--device`` through :func:`resolve_device`, so an unknown or
unavailable device is one :class:`~mambamorph.errors.InputError` everywhere; every figure of time
(bench, evaluate, register) is measured by :class:`Timer`, and every memory figure of bench and
evaluate by :func:`peak_memory` (in GB, :data:`GB`), so they are measured one way.
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

__all__ = ["resolve_device", "describe_device", "synchronize", "Timer", "timed", "PeakMemory",
           "peak_memory", "warmup_crop", "GB", "PRECISIONS", "cpu_has_native_bf16",
           "resolve_precision", "keep_freed_memory", "should_keep_freed_memory",
           "KEEP_FREED_MEMORY_ENV"]

#: inference precisions: ``auto`` (bf16 on a CPU with native bfloat16, else fp32), ``fp32``,
#: ``bf16`` (bfloat16 autocast)
PRECISIONS = ("auto", "fp32", "bf16")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX), so oneDNN's bfloat16
    convolutions are faster than float32 ones; False otherwise or when torch cannot tell."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    for probe in probes:
        try:
            if probe is not None and probe():
                return True
        except RuntimeError:  # pragma: no cover - a build without the probe
            continue
    return False


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """The inference precision to use on ``device``: ``fp32`` or ``bf16``.

    ``auto`` (or ``None``) is ``bf16`` on a CPU with native bfloat16 (:func:`cpu_has_native_bf16`;
    its effect on accuracy is measured in docs/results.md) and ``fp32`` elsewhere (a GPU is fast
    enough in float32, and an older CPU would emulate bfloat16 slowly).

    Raises:
        InputError: an unknown precision.
    """
    p = "auto" if precision is None else str(precision).lower()
    if p not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if p == "auto":
        return "bf16" if _device(device).type == "cpu" and cpu_has_native_bf16() else "fp32"
    return p


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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep memory the process frees for reuse instead of handing it
    back to the OS: large blocks come from the heap, not one ``mmap`` each, and the heap's top
    is not trimmed. True if done, False where the C library is not glibc.

    Why: every tensor above 32 MB otherwise gets fresh pages from the kernel, and touching them
    faults 4 KB at a time (transparent huge pages are opt-in here): a 176x208x192 ``mambamorph``
    pass on 2 cores spent ~10 s of system time in page faults for ~15 s of wall time. The cost:
    freed blocks are reused first-fit, so the peak resident memory grows (3.0 -> 4.9-5.8 GB
    for that pass, docs/results.md). Process-wide and not undone; the ``mambamorph`` command calls
    it at start-up where :func:`should_keep_freed_memory` says so; a library user may call it.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


KEEP_FREED_MEMORY_ENV = "MAMBAMORPH_KEEP_FREED_MEMORY"
"""Environment variable: ``1`` / ``0`` forces :func:`should_keep_freed_memory`'s answer."""

KEEP_FREED_MEMORY_MIN_RAM = 16 * 2 ** 30
"""Physical memory from which the command keeps freed memory by default (bytes): the extra
resident memory it costs (2-3 GB for a 176x208x192 ``mambamorph`` pass) is then affordable."""


def should_keep_freed_memory(environ=None) -> bool:
    """Whether the ``mambamorph`` command calls :func:`keep_freed_memory` at start-up:
    :data:`KEEP_FREED_MEMORY_ENV` if set (``0``, ``false``, ``no``, ``off`` or empty: no;
    anything else: yes), else yes on a machine with at least
    :data:`KEEP_FREED_MEMORY_MIN_RAM` of physical memory. ``environ``: a mapping to read
    instead of ``os.environ``."""
    env = os.environ if environ is None else environ
    value = env.get(KEEP_FREED_MEMORY_ENV)
    if value is not None:
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return ram >= KEEP_FREED_MEMORY_MIN_RAM


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


# ------------------------------------------------------------------ one figure of peak memory
#: bytes per GB: the one memory unit of bench and evaluate (decimal, as the paper's tables).
GB = 1e9

#: grid of the small warm-up call that bench and evaluate make before a measured one on a CPU.
WARMUP_GRID = (32, 32, 32)


def warmup_crop(x: torch.Tensor, grid: tuple[int, int, int] = WARMUP_GRID) -> torch.Tensor:
    """The centre crop of a ``(B, C, D0, D1, D2)`` volume to ``grid`` (each dim at most the
    volume's): the input of a cheap warm-up call before a measured one."""
    starts = [(n - min(n, g)) // 2 for n, g in zip(x.shape[2:], grid)]
    return x[(..., *(slice(s, s + min(n, g)) for s, n, g in zip(starts, x.shape[2:], grid)))]


def peak_memory(make_fn: Callable[[torch.device], Callable[..., Any]], args: tuple,
                device=None, warmup_args: tuple | None = None) -> tuple[int, str]:
    """Peak memory of one call ``fn(*args)`` with ``fn = make_fn(device)``: the one way bench and
    evaluate measure the memory of a model or a registration method.

    The call is made once untimed, after one warm-up call ``fn(*warmup_args)`` (default: ``args``)
    that pays one-time costs (kernel loading, thread pools, cuDNN autotuning):

    - CUDA, in this process: :class:`PeakMemory`'s ``max_memory_allocated`` during the call, an
      absolute figure (weights, inputs and activations); the allocator's peak statistics make it
      independent of earlier work.
    - CPU, in a fresh Python interpreter (same ``sys.path``, environment and torch threads,
      glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set):
      the kernel's peak resident set (``VmHWM``, reset just before the call) above the resident
      set at the call's start (weights, inputs and the warm-up already there), i.e. the peak of
      the memory the call itself allocates. In a long-lived process the same
      figure depends on what ran before (the C allocator's state after earlier, larger work
      changes how much of a call's memory is fresh pages; docs/results.md has the figures), so
      it is not measured there. This needs ``make_fn`` and the arguments to pickle
      (module-level functions of an importable module, a ``functools.partial`` of one, CPU
      tensors); otherwise the call is measured in this process after releasing free heap
      memory, with a warning that the figure may depend on earlier work.

    Args:
        make_fn: ``make_fn(device) -> fn`` prepares the work (loads weights) on ``device``.
        args: arguments of the measured call (tensors on ``device``; CPU tensors for the CPU).
        device: where it runs (``None``: CPU).
        warmup_args: arguments of the warm-up call (e.g. a small crop); default ``args``.
    Returns:
        ``(bytes, kind)``: the peak in bytes and ``"GPU allocated"`` or ``"CPU RSS"``.
    """
    dev = _device(device)
    warm = args if warmup_args is None else warmup_args
    kind = "GPU allocated" if dev.type == "cuda" else "CPU RSS"
    if dev.type == "cpu":
        peak = _peak_in_fresh_process(make_fn, args, warm)
        if peak is not None:
            return peak, kind
    return _peak_of_call(make_fn(dev), args, warm, dev), kind


def _peak_of_call(fn, args: tuple, warmup_args: tuple, device: torch.device) -> int:
    """Warm-up call, then :class:`PeakMemory` of one call (see :func:`peak_memory`)."""
    import gc

    fn(*warmup_args)
    gc.collect()
    with PeakMemory(device, release_free=True) as mem:
        result = fn(*args)
        synchronize(device)
    del result
    return int(mem.peak_bytes)


#: glibc settings of the measuring process: a fixed mmap threshold (no dynamic raising), so every
#: allocation of 64 KiB or more is its own mapping, returned to the OS when freed, and the
#: resident set follows the live memory (repeat measurements then agree to about 0.1 %;
#: with glibc's dynamic threshold they spread by about 15 %). Ignored by other C libraries.
_CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}

_CHILD = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
          "from mambamorph.runtime import _fresh_process_main; _fresh_process_main(sys.argv[2])")


def _peak_in_fresh_process(make_fn, args: tuple, warmup_args: tuple) -> int | None:
    """:func:`_peak_of_call` in a new Python interpreter (same ``sys.path``, environment and
    torch threads); the work travels pickled through a temporary file. Returns None (after a
    warning) when the work cannot be rebuilt there (it does not pickle, or its function lives
    in a script's ``__main__``); re-raises the child's exception otherwise."""
    import json
    import logging
    import pickle
    import subprocess
    import sys
    import tempfile

    try:
        payload = pickle.dumps((make_fn, args, warmup_args, torch.get_num_threads()))
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        reason = f"it does not pickle: {e}"
    else:
        with tempfile.TemporaryDirectory(prefix="mambamorph-peak-") as tmp:
            job = os.path.join(tmp, "job.pkl")
            with open(job, "wb") as fh:
                fh.write(payload)
            del payload
            proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sys.path), job],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env={**os.environ, **_CHILD_MALLOC})
            try:
                with open(job + ".out", "rb") as fh:
                    status, value = pickle.load(fh)
            except (OSError, EOFError, pickle.UnpicklingError):
                tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"peak-memory process ended with code {proc.returncode} "
                                   f"without a result: {' | '.join(tail)}") from None
        if status == "ok":
            return int(value)
        if status == "error":
            raise value
        reason = f"it cannot be rebuilt in a new process: {value}"
    logging.getLogger(__name__).warning(
        "peak memory measured in this process (%s); the figure may depend on what ran before",
        reason)
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) of this process to its current RSS (Linux
    4.0+: ``/proc/self/clear_refs``); True if done. Only the measuring process does this (it
    also resets what ``getrusage`` reports as the process's peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    """The kernel's peak-RSS mark (``VmHWM`` of ``/proc/self/status``) in bytes, or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_of_call_exact(fn, args: tuple, warmup_args: tuple) -> int:
    """:func:`_peak_of_call` on a CPU from the kernel's peak-RSS mark (exact, no sampling) where
    it can be reset; the sampling :class:`PeakMemory` otherwise."""
    import gc

    fn(*warmup_args)
    gc.collect()
    _release_free_heap()
    start = _rss_bytes()
    if start is None or not _reset_peak_rss():
        with PeakMemory("cpu", release_free=False) as mem:
            result = fn(*args)
        return int(mem.peak_bytes)
    result = fn(*args)
    peak = _peak_rss_bytes()
    del result
    return max((peak or 0) - start, 0)


def _fresh_process_main(job: str) -> None:
    """Entry of the process that :func:`_peak_in_fresh_process` starts."""
    import pickle

    with open(job, "rb") as fh:
        raw = fh.read()
    try:
        make_fn, args, warmup_args, threads = pickle.loads(raw)
    except Exception as e:  # noqa: BLE001 (e.g. a function defined in the parent's __main__)
        result = ("unpicklable", f"{type(e).__name__}: {e}")
    else:
        del raw
        torch.set_num_threads(threads)
        cpu = torch.device("cpu")
        try:
            result = ("ok", _peak_of_call_exact(make_fn(cpu), args, warmup_args))
        except Exception as e:  # noqa: BLE001 (handed to the parent, which re-raises it)
            result = ("error", e)
    try:
        data = pickle.dumps(result)
    except Exception:  # noqa: BLE001 (an exception that does not pickle: keep its text)
        data = pickle.dumps(("error", RuntimeError(f"{type(result[1]).__name__}: {result[1]}")))
    with open(job + ".out", "wb") as fh:
        fh.write(data)
