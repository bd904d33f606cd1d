"""Affine pre-alignment benchmark on the phantom's validation pairs (docs/affine.md).

``python bench/bench_affine.py ROOT [--pairs 5] [--moving mr --fixed ct] [--json OUT]``

For each validation pair (moving MR -> fixed CT by default; ``--moving``/``--fixed``) the alignment is run three times: on the pair
as it is, with the moving image's header moved by a random rigid transform ``P`` (rotation of
10-20 degrees about a random axis through the moving brain's centre, then a shift of 15-30 mm in
a random direction), and with the moving voxels resampled by ``P`` (header unchanged). Reported:
the Dice of the moving labels after affine-only alignment (the labels follow the image through
``P`` by header, never resampled twice), and for the moved pairs the error of the recovered
matrix against ``P @ A0`` (``A0``: the unmoved pair's result): rotation angle of the error's
polar part (degrees), mean and max distance over the fixed brain voxels (mm); the wall and CPU
time of each run.
Prints figures, never pass/fail. Only validation subjects are read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mambamorph.data.preprocess import resample_array
from mambamorph.io import Volume, read_labels, read_volume
from mambamorph.metrics import dice_per_roi
from mambamorph.optimize.affine import align_affine, compose_affine_displacement
from mambamorph.data.preprocess import foreground_centre
from mambamorph.space import warp_to_fixed


def random_rigid(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    """World rigid transform: rotation 10-20 deg about a random axis through ``centre``, shift."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(10.0, 20.0))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    shift = rng.normal(size=3)
    shift *= rng.uniform(15.0, 30.0) / np.linalg.norm(shift)
    p = np.eye(4)
    p[:3, :3] = rot
    p[:3, 3] = centre - rot @ centre + shift
    return p


def errors(found: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> dict:
    """Rotation (deg) of the polar part of ``inv(truth) @ found``; distances over ``brain``."""
    e = np.linalg.inv(truth) @ found
    u, _, vt = np.linalg.svd(e[:3, :3])
    r = u @ vt
    angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    d = brain @ (found - truth)[:3, :3].T + (found - truth)[:3, 3]
    dist = np.linalg.norm(d, axis=1)
    return {"rot_deg": float(angle), "mean_mm": float(dist.mean()), "max_mm": float(dist.max())}


def dice(seg: Volume, fixed_seg: Volume, matrix: np.ndarray) -> float:
    moved = warp_to_fixed(seg, compose_affine_displacement(matrix, fixed_seg), fixed_seg, order=0)
    return float(np.nanmean(dice_per_roi(moved, fixed_seg.data.numpy())) * 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--levels", default="4,2")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--sampling", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moving", default="mr", help="moving modality (mr, ct, t2)")
    ap.add_argument("--fixed", default="ct", help="fixed modality")
    ap.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = ap.parse_args()
    root = Path(args.root)
    val = json.loads((root / "split.json").read_text())["val"]
    pairs = [(val[i], val[(i + 1) % len(val)]) for i in range(len(val))][: args.pairs]
    levels = tuple(int(s) for s in args.levels.split(","))
    rng = np.random.default_rng(args.seed)
    rows = []
    for mid, fid in pairs:
        mov = read_volume(root / "vol" / f"{mid}_{args.moving}.nii.gz")
        fix = read_volume(root / "vol" / f"{fid}_{args.fixed}.nii.gz")
        mseg = read_labels(root / "seg" / f"{mid}.nii.gz", check_table=False)
        fseg = read_labels(root / "seg" / f"{fid}.nii.gz", check_table=False)
        brain = np.argwhere(fseg.data.numpy() > 0).astype(np.float64)
        brain = brain @ fix.affine[:3, :3].T + fix.affine[:3, 3]
        p = random_rigid(rng, foreground_centre(mov))
        stored = mov.to_stored(mov.data.numpy())
        moved_hdr = Volume.from_array(stored, p @ mov.orig_affine, path=mov.path)
        moved_seg = Volume.from_array(mseg.to_stored(mseg.data.numpy()), p @ mseg.orig_affine,
                                      header=mseg.header)
        vox = resample_array(mov.data.numpy(), mov.affine, np.linalg.inv(p) @ mov.affine,
                             mov.shape, order=1)
        moved_vox = Volume.from_array(vox, mov.affine, path=mov.path)
        init = dice(mseg, fseg, np.eye(4))
        opts = dict(levels=levels, iterations=args.iterations, sampling=args.sampling)
        c = time.process_time()
        r0 = align_affine(mov, fix, **opts)
        cpu = [time.process_time() - c]
        row = {"pair": f"{mid}->{fid}", "initial": init,
               "moved_initial": dice(moved_seg, fseg, np.eye(4)),
               "aligned": dice(mseg, fseg, r0.matrix), "seconds": [r0.seconds],
               "warnings": list(r0.warnings)}
        for kind, vol in (("header", moved_hdr), ("voxels", moved_vox)):
            t, c = time.perf_counter(), time.process_time()
            r = align_affine(vol, fix, **opts)
            row["seconds"].append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            row[kind] = dice(moved_seg, fseg, r.matrix)
            row[kind + "_err"] = errors(r.matrix, p @ r0.matrix, brain)
            row[kind + "_rigid_err"] = errors(r.rigid, p @ r0.rigid, brain)
            row["warnings"] += r.warnings
        row["cpu_seconds"] = cpu
        rows.append(row)
        print(json.dumps(row), flush=True)
    if rows:
        rs = rows
        print(f"{args.moving} -> {args.fixed}: initial {np.mean([r['initial'] for r in rs]):.2f}, moved initial "
              f"{np.mean([r['moved_initial'] for r in rs]):.2f}, aligned "
              f"{np.mean([r['aligned'] for r in rs]):.2f}, moved by header "
              f"{np.mean([r['header'] for r in rs]):.2f}, by voxels "
              f"{np.mean([r['voxels'] for r in rs]):.2f}; rotation error max "
              f"{max(r[k + '_err']['rot_deg'] for r in rs for k in ('header', 'voxels')):.2f} "
              f"deg, mean brain distance max "
              f"{max(r[k + '_err']['mean_mm'] for r in rs for k in ('header', 'voxels')):.2f} "
              f"mm, s/run {np.mean([s for r in rs for s in r['seconds']]):.2f} (CPU "
              f"{np.mean([s for r in rs for s in r['cpu_seconds']]):.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
