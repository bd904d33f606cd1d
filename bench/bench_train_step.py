"""One training step (forward, backward, Adam) of a model on the CPU, repeated: seconds per step.

Random ``(1, 1, D0, D1, D2)`` moving and fixed images (default 96x112x96, the CPU preset), the
loss ``mean(flow**2)`` (the step's cost lies in the network and its integration, not in the
loss), Adam 1e-4, seed 0. Prints each step's wall time; the first includes one-off loading.
Compare code versions by running it with ``PYTHONPATH=<checkout>/src``.

    python bench/bench_train_step.py voxelmorph [--steps 4] [--threads 2] [--grid 96 112 96]
"""

from __future__ import annotations

import argparse
import time

import torch

from mambamorph.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", type=int, nargs=3, default=(96, 112, 96))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = build_model(a.model).train()
    x = torch.rand(1, 1, *a.grid)
    y = torch.rand(1, 1, *a.grid)
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = net(x, y).flow.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    print(f"{a.model} {'x'.join(map(str, a.grid))}, {a.threads} threads: seconds per step "
          + " ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
