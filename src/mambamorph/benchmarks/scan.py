"""Benchmark of the selective-scan implementations at the lengths of MambaMorph's stage 0.

Stage 0 of the registration module is a sequence of (D0/4)(D1/4)(D2/4) tokens of inner width
E = 192 and state N = 16: L = 16,128 at the CPU preset (96 x 112 x 96) and L = 109,824 at full
size (176 x 208 x 192). For every path and length this prints the time of a forward pass
(no autograd) and of a forward + backward pass, and the speed-up over the reference
(reference time / path time).

The reference is a Python loop over tokens, so it is timed once per length, not ``repeat``
times; and its forward + backward (whose autograd graph grows with every token) is only
run up to ``reference_grad_max_length`` tokens and extrapolated linearly beyond (the table says
which figures are extrapolated). It runs with one PyTorch thread: its per-step tensors
(B x E x N values) are too small to gain from more, and on a machine shared with other jobs more
threads made it much slower (threads spinning at barriers), which would flatter the other
paths. The time of the first call of the numba path (compilation, or loading the compiled
kernels from numba's cache) is reported separately.

Usage::

    python bench/bench_scan.py [--lengths 16128 109824] [--repeat 3] [--paths reference cpu torch]
    (or python -m mambamorph.benchmarks.scan ...; `mambamorph bench` prints it after the models)

or, from Python, ``run(lengths, channels=192, state=16, repeat=3)`` -> list of row dicts.
Times are wall-clock seconds on whatever else the machine is doing: on a shared machine they
are upper bounds. Measured figures: docs/results.md.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

STAGE0_CPU_PRESET = 24 * 28 * 24  # 96 x 112 x 96 volume, tokens of 4^3 voxels
STAGE0_FULL = 44 * 52 * 48  # 176 x 208 x 192


def _inputs(length, channels, state, batch, device, seed=0):
    """Inputs shaped like a Mamba block's at initialisation (steps 1e-3..1e-1, A = -(1..N))."""
    g = torch.Generator().manual_seed(seed)
    step = torch.exp(torch.empty(channels).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    args = {
        "u": torch.randn(batch, channels, length, generator=g),
        "delta": 0.1 * torch.randn(batch, channels, length, generator=g),
        "A": -torch.arange(1, state + 1, dtype=torch.float32).repeat(channels, 1),
        "B": torch.randn(batch, state, length, generator=g),
        "C": torch.randn(batch, state, length, generator=g),
        "D": torch.ones(channels),
        "z": torch.randn(batch, channels, length, generator=g),
        "delta_bias": step + torch.log(-torch.expm1(-step)),  # softplus^-1(step)
    }
    return {k: v.to(device) for k, v in args.items()}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _torch_threads:
    """Context manager: run with ``n`` PyTorch intra-op threads, then restore the setting."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _time_forward(fn, args, device):
    with torch.no_grad():
        _sync(device)
        t = time.perf_counter()
        fn(**args)
        _sync(device)
        return time.perf_counter() - t


def _time_forward_backward(fn, args, device):
    leaves = {k: v.clone().requires_grad_(True) for k, v in args.items()}
    _sync(device)
    t = time.perf_counter()
    y = fn(**leaves)
    y.backward(torch.ones_like(y))
    _sync(device)
    return time.perf_counter() - t


def _best_of(timed, repeat, long_s=10.0):
    """(minimum time, runs) of up to ``repeat`` runs; a run longer than ``long_s`` is not
    repeated."""
    times = [timed()]
    while len(times) < repeat and times[0] < long_s:
        times.append(timed())
    return min(times), len(times)


def _path_fn(path):
    from mambamorph.nn.ssm import selective_scan

    def fn(**kw):
        return selective_scan(**kw, delta_softplus=True, impl=path)

    return fn


def _first_call_seconds(device):
    """Seconds of the numba path's first call in this process (compile or cache load)."""
    import mambamorph.nn.ssm.cpu as cpu_scan

    t = time.perf_counter()
    cpu_scan.warm_up((torch.float32,))
    return time.perf_counter() - t


def run(lengths=(STAGE0_CPU_PRESET, STAGE0_FULL), channels=192, state=16, repeat=3, batch=1,
        paths=None, device="cpu", reference_grad_max_length=STAGE0_CPU_PRESET, threads=None,
        progress=None):
    """Time each scan path at each length.

    Args:
        lengths: sequence lengths L (tokens).
        channels, state, batch: E, N and B of the scan.
        repeat: timed runs per fast path and length (the minimum is kept; one warm-up run is
            done first; a run over 10 s is not repeated). The reference runs once per length.
        paths: implementations to time (default: reference, cpu, torch on the CPU; reference,
            torch and, if ``mamba_ssm`` imports, cuda on a GPU).
        device: where the tensors live.
        reference_grad_max_length: longest L at which the reference's forward + backward is
            run; longer ones are extrapolated linearly from it.
        threads: if given, the number of PyTorch and numba threads for the fast paths (the
            setting is restored afterwards); default: leave both as they are.
        progress: optional callable taking one status string (e.g. ``print``).

    Returns:
        One dict per (path, length): ``path, length, channels, state, batch, device, threads,
        forward_s, forward_backward_s, forward_speedup, forward_backward_speedup`` (speed-up =
        reference time / path time), ``reference_note`` (how the reference figures were
        obtained) and, for the cpu path, ``first_call_s``.

    Raises:
        mambamorph.errors.InputError: an unknown path name.
        RuntimeError: ``"cuda"`` requested without ``mamba_ssm``.
    """
    from mambamorph.nn.ssm.cuda import mamba_ssm_scan_fn

    say = progress or (lambda msg: None)
    if threads is not None:
        import numba

        saved = (torch.get_num_threads(), numba.get_num_threads())
        torch.set_num_threads(threads)
        numba.set_num_threads(threads)
        try:
            return run(lengths, channels, state, repeat, batch, paths, device,
                       reference_grad_max_length, None, progress)
        finally:
            torch.set_num_threads(saved[0])
            numba.set_num_threads(saved[1])
    dev = torch.device(device)
    if paths is None:
        paths = ["reference", "cpu", "torch"] if dev.type == "cpu" else ["reference", "torch"]
        if dev.type == "cuda" and mamba_ssm_scan_fn() is not None:
            paths.append("cuda")
    first_call = _first_call_seconds(dev) if "cpu" in paths else None
    threads = f"torch {torch.get_num_threads()}"
    if "cpu" in paths:
        import numba

        threads += f", numba {numba.get_num_threads()}"
    rows = []
    ref_grad_cache = {}
    for length in lengths:
        args = _inputs(length, channels, state, batch, dev)
        results = {}
        for path in paths:
            fn = _path_fn(path)
            if path == "reference":
                small = _inputs(8, channels, state, batch, dev)  # warm autograd up, untimed
                _time_forward_backward(fn, small, dev)
                say(f"reference, L={length}: forward (timed once)")
                with _torch_threads(1):
                    fwd = _time_forward(fn, args, dev)
                base = min(length, reference_grad_max_length)
                if base not in ref_grad_cache:
                    say(f"reference, L={base}: forward + backward (timed once)")
                    base_args = args if base == length else _inputs(base, channels, state,
                                                                     batch, dev)
                    with _torch_threads(1):
                        ref_grad_cache[base] = _time_forward_backward(fn, base_args, dev)
                fb = ref_grad_cache[base] * length / base
                note = "timed once, 1 torch thread" if base == length else (
                    f"1 torch thread; forward timed once; forward+backward extrapolated "
                    f"linearly from L={base:,}")
                results[path] = (fwd, fb, note)
                continue
            say(f"{path}, L={length}: warm-up + {repeat} runs")
            _time_forward(fn, args, dev)  # warm-up (allocations, thread pools, caches)
            _time_forward_backward(fn, _inputs(min(length, 4096), channels, state, batch, dev),
                                   dev)
            fwd = _best_of(lambda: _time_forward(fn, args, dev), repeat)
            fb = _best_of(lambda: _time_forward_backward(fn, args, dev), repeat)
            note = (f"best of {fwd[1]}" if fwd[1] == fb[1]
                    else f"best of {fwd[1]} (forward), {fb[1]} (forward+backward)")
            results[path] = (fwd[0], fb[0], note)
        ref = results.get("reference")
        for path, (fwd, fb, note) in results.items():
            row = {
                "path": path, "length": length, "channels": channels, "state": state,
                "batch": batch, "device": str(dev), "threads": threads,
                "forward_s": fwd, "forward_backward_s": fb,
                "forward_speedup": ref[0] / fwd if ref else float("nan"),
                "forward_backward_speedup": ref[1] / fb if ref else float("nan"),
                "note": note,
            }
            if path == "cpu":
                row["first_call_s"] = first_call
            rows.append(row)
    return rows


def format_table(rows):
    """The rows of :func:`run` as a Markdown table (one string)."""
    lines = ["| path | L | forward s | speed-up | fwd+bwd s | speed-up | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['length']:,} | {r['forward_s']:.3f} | "
                     f"{r['forward_speedup']:.1f}x | {r['forward_backward_s']:.3f} | "
                     f"{r['forward_backward_speedup']:.1f}x | {r['note']} |")
    first = [r["first_call_s"] for r in rows if r.get("first_call_s") is not None]
    if rows:
        r = rows[0]
        lines.append("")
        lines.append(f"E = {r['channels']}, N = {r['state']}, B = {r['batch']}, device "
                     f"{r['device']}, threads: {r['threads']}, CPUs visible: "
                     f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}"
                     "; speed-up = reference time / path time.")
    if first:
        lines.append(f"First call of the numba path in this process (compile, or load from "
                     f"numba's cache): {first[0]:.2f} s.")
    return "\n".join(lines)


def scan_table(lengths=(STAGE0_CPU_PRESET, STAGE0_FULL), device="cpu", quick=False,
               **kwargs):
    """Lines of text (a heading and the Markdown table of :func:`run`) for a report.

    ``quick`` times each fast path once (a smoke run); other keyword arguments go to
    :func:`run`. Raises what :func:`run` raises."""
    if quick:
        kwargs.setdefault("repeat", 1)
    rows = run(lengths, device=device, **kwargs)
    yield ""
    yield "# selective scan at stage-0 length (reference = sequential recurrence)"
    yield from format_table(rows).splitlines()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[STAGE0_CPU_PRESET, STAGE0_FULL])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--channels", type=int, default=192)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--paths", nargs="+", default=None,
                   help="implementations to time (default: all that apply to the device)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference-grad-max-length", type=int, default=STAGE0_CPU_PRESET)
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch and numba threads for the fast paths (default: unchanged)")
    a = p.parse_args(argv)
    rows = run(a.lengths, channels=a.channels, state=a.state, repeat=a.repeat, batch=a.batch,
               paths=a.paths, device=a.device,
               reference_grad_max_length=a.reference_grad_max_length, threads=a.threads,
               progress=lambda m: print(m, flush=True))
    print()
    print(format_table(rows))


if __name__ == "__main__":
    main()
