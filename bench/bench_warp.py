"""Warp of a constant multi-channel image on the CPU: the numba kernel against grid_sample, and
the MIND-SSD of the warped descriptors: fused kernel against warp + torch arithmetic.

The case instance optimisation runs every iteration: 24 MIND channels at 48x56x48 (the similarity
grid of a 96x112x96 pair at its coarse level; ``--grid 96 112 96`` for a similarity on the image
grid), border padding, gradient with respect to the field only. Prints the forward and backward
time of each path (ms), ``--repeat`` times after one warm-up call.

    python bench/bench_warp.py --threads 2 [--grid 96 112 96]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from mambamorph.nn.spatial import identity_grid, voxel_to_grid
from mambamorph.nn.warp_cpu import warp_cpu
from mambamorph.similarity import mind_ssd_loss, warped_mind_ssd_loss


def _grid_sample(image, flow):
    points = identity_grid(flow.shape[2:], dtype=flow.dtype).unsqueeze(0) + flow
    return F.grid_sample(image, voxel_to_grid(points), mode="bilinear", padding_mode="border",
                         align_corners=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channels", type=int, default=24)
    ap.add_argument("--grid", type=int, nargs=3, default=(48, 56, 48))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    # channels-last, as instance optimisation keeps its descriptors
    image = torch.rand(1, a.channels, *a.grid, generator=g).contiguous(
        memory_format=torch.channels_last_3d)
    reference = torch.rand(1, a.channels, *a.grid, generator=g).contiguous(
        memory_format=torch.channels_last_3d)
    flow = (torch.randn(1, 3, *a.grid, generator=g) * 2).requires_grad_()
    paths = {"numba kernel": lambda: warp_cpu(image, flow, "border"),
             "grid_sample": lambda: _grid_sample(image, flow),
             "SSD, kernel + torch": lambda: mind_ssd_loss(warp_cpu(image, flow, "border"), reference),
             "SSD, fused kernel": lambda: warped_mind_ssd_loss(image, reference, flow, "border")}
    for name, fn in paths.items():
        out = fn()
        torch.autograd.grad(out, flow, torch.ones_like(out))  # warm-up (kernel loading)
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            torch.autograd.grad(out, flow, torch.ones_like(out))
            t2 = time.perf_counter()
            print(f"{name:19s} forward {1e3 * (t1 - t0):7.1f} ms  backward {1e3 * (t2 - t1):7.1f} ms")


if __name__ == "__main__":
    main()
