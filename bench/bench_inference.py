"""CPU (or GPU) inference time of a model through ``predict``, by precision and size.

``python bench/bench_inference.py [--model mambamorph] [--sizes cpu full] [--precisions fp32 bf16]
[--threads 2] [--repeat 3] [--device cpu] [--profile N] [--allocator auto|keep|default]``

For each size (``cpu``: 96x112x96, ``full``: 176x208x192) and precision, one untimed warm-up pass
and then ``--repeat`` timed passes of :func:`mambamorph.models.predict` on random images (the
time does not depend on the content); prints the best and the median in seconds. With
``--profile N`` it also prints the N operators with the most self CPU time of one pass (torch
profiler), the table the figures in docs/results.md ("Faster CPU inference") were read from.
``--allocator``: ``keep`` calls :func:`mambamorph.runtime.keep_freed_memory` first, ``default``
leaves glibc's allocator as it is, ``auto`` does what the ``mambamorph`` command does. The
process's peak resident memory and its system CPU time are printed at the end.
Prints figures, never pass/fail.
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch

from mambamorph.models import build_model, predict
from mambamorph.runtime import (Timer, describe_device, keep_freed_memory, resolve_device,
                                should_keep_freed_memory)

SIZES = {"cpu": (96, 112, 96), "full": (176, 208, 192)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mambamorph")
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["full"])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N costliest operators of one pass")
    p.add_argument("--allocator", choices=["auto", "keep", "default"], default="auto",
                   help="glibc allocator: keep freed memory (keep), as is (default), or as the "
                        "mambamorph command does (auto)")
    a = p.parse_args(argv)
    keep = a.allocator == "keep" or (a.allocator == "auto" and should_keep_freed_memory())
    if keep:
        keep = keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    model = build_model(a.model).to(dev).eval()
    print(f"{a.model} on {describe_device(dev)}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, allocator: {'keep freed memory' if keep else 'default'}")
    for size in a.sizes:
        shape = SIZES[size]
        g = torch.Generator().manual_seed(0)
        mov = torch.rand(1, 1, *shape, generator=g).to(dev)
        fix = torch.rand(1, 1, *shape, generator=g).to(dev)
        for prec in a.precisions:
            predict(model, mov, fix, precision=prec)  # warm-up: kernels, allocator
            times = []
            for _ in range(a.repeat):
                with Timer(dev) as t:
                    predict(model, mov, fix, precision=prec)
                times.append(t.seconds)
            print(f"{size:5s} {'x'.join(map(str, shape)):12s} {prec}: best {min(times):.2f} s, "
                  f"median {statistics.median(times):.2f} s over {a.repeat}", flush=True)
            if a.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    predict(model, mov, fix, precision=prec)
                print(prof.key_averages().table(sort_by="self_cpu_time_total",
                                                row_limit=a.profile))
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(f"process: peak resident memory {use.ru_maxrss / 2 ** 20:.2f} GB, system CPU "
          f"{use.ru_stime:.1f} s, user CPU {use.ru_utime:.1f} s")


if __name__ == "__main__":
    main()
