"""`mambamorph register` on a dataset's fixed pairs, from files, scored like `evaluate`.

Runs the whole registration of files (:func:`mambamorph.register.register_files`: affine
pre-alignment, network, instance optimisation, outputs on the fixed grid) on the seeded pairs
that ``mambamorph evaluate`` draws (``test_pairs(split subjects, N, seed)``), and scores each
pair from what the command wrote:

- Dice (%) of ``warped_seg.nii.gz`` against the fixed subject's label map over the 16 ROIs
  (:func:`mambamorph.metrics.dice_per_roi`, the one Dice code);
- from ``jacobian.nii.gz`` (the deformable stage's determinant on the fixed grid): SDlogJ (std of
  log J over the grid less a 2-voxel border, J clipped at 1e-9 as :func:`metrics.sdlogj`), % of
  voxels with J <= 0, and % of the fixed brain (label > 0) with J < 0.2;
- seconds: in-process wall time of ``register_files`` per pair (model loaded each call) and, with
  ``--commands``, the wall time of the whole ``mambamorph register`` command per pair (a new
  Python process each time: start-up, imports, reading and writing included).

    python bench/register_pairs.py DATA --split test --pairs 10 --tag default
    python bench/register_pairs.py DATA --split val --pairs 10 --tag no-affine -- --no-affine

With ``--batch``, the pairs go instead through one ``mambamorph register --pairs`` command (a
new process; the network is loaded once): the row gives the pairs, pairs per minute (pairs / the
command's whole wall time, start-up included), that wall time, the mean seconds per pair from its
``summary.csv`` and the scores. Throughput with the shipped model, with and without IO:

    python bench/register_pairs.py DATA --pairs 10 --batch --tag "batch, defaults"
    python bench/register_pairs.py DATA --pairs 10 --batch --tag "batch, no IO" -- --no-io

Arguments after ``--`` are passed to ``mambamorph register`` (and mapped onto ``register_files``
for the in-process run). ``--io-config JSON`` sets :class:`IOConfig` fields of the in-process
runs (settings the command has no flag for; tune them on ``--split val`` only):

    python bench/register_pairs.py DATA --split val --pairs 6 --io-config '{"lam": 1.2}'

``--free-grid MM G0 G1 G2`` runs the training-free path (``-- --no-model``) on another grid than
2 mm 96x112x96, e.g. the 1 mm probe of docs/results.md ("The same table at 1 mm"):

    python bench/register_pairs.py phantom-1mm --split val --pairs 6 \
        --free-grid 1 192 224 192 --io-config \
        '{"levels": [16, 8], "sim_grids": [4, 2], "lr": 2.0, "mind_dilations": [2, 4]}' \
        -- --no-model

Prints one table row and appends a JSON line to ``--log``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _score(out: Path, fixed_seg: Path) -> dict:
    from mambamorph.io import read_labels, read_volume
    from mambamorph.metrics import dice_per_roi

    truth = read_labels(fixed_seg).data.numpy()
    got = read_labels(out / "warped_seg.nii.gz", check_table=False).data.numpy()
    jac = read_volume(out / "jacobian.nii.gz").data.numpy().astype(np.float64)
    core = jac[2:-2, 2:-2, 2:-2]
    brain = truth > 0
    return {"dice": float(100 * np.nanmean(dice_per_roi(got, truth))),
            "sdlogj": float(np.log(np.clip(core, 1e-9, None)).std()),
            "fold": float(100 * np.mean(jac <= 0)),
            "j02": float(100 * np.mean(jac[brain] < 0.2))}


def _moved(image: Path, seg: Path, folder: Path, deg: float, mm: float, seed: int):
    """Copies of ``image`` and ``seg`` whose headers are moved by one random rigid transform:
    rotation angle uniform in [deg / 2, deg] about a random axis through the image's foreground
    centre, then a shift of length uniform in [mm / 2, mm] in a random direction."""
    import nibabel as nib
    from scipy.spatial.transform import Rotation

    from mambamorph.data.preprocess import foreground_centre
    from mambamorph.io import read_volume

    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    rot = Rotation.from_rotvec(np.deg2rad(rng.uniform(deg / 2, deg)) * axis
                               / np.linalg.norm(axis)).as_matrix()
    shift = rng.normal(size=3)
    shift *= rng.uniform(mm / 2, mm) / np.linalg.norm(shift)
    c = foreground_centre(read_volume(image))
    move = np.eye(4)
    move[:3, :3] = rot
    move[:3, 3] = c - rot @ c + shift
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in (image, seg):
        img = nib.load(str(src))
        dst = folder / src.name
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), move @ img.affine, img.header), dst)
        out.append(dst)
    return tuple(out)


def _kwargs(extra: list[str]) -> dict:
    """``register_files`` keywords for the CLI flags of ``extra`` (the CLI's own mapping)."""
    from mambamorph.cli import build_parser, register_options

    return register_options(build_parser().parse_args(["register", "m", "f", "--out", "o",
                                                       *extra]))


def _batch(todo: list, tmp: Path, extra: list[str]) -> tuple[list[dict], dict]:
    """Every pair of ``todo`` through one ``mambamorph register --pairs`` command (a new Python
    process: start-up, imports and the one network load included): the scored rows (seconds:
    the pair's own time from summary.csv) and the throughput."""
    import csv

    lines = ["id,moving,fixed,moving_seg"] + [
        f"p{k},{mov},{fix},{mseg}" for k, (_, mov, fix, mseg, _) in enumerate(todo)]
    (tmp / "pairs.csv").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "mambamorph.cli", "register", "--pairs", str(tmp / "pairs.csv"),
           "--out", str(tmp / "batch"), "--quiet", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    with open(tmp / "batch" / "summary.csv", newline="") as fh:
        summary = {r["id"]: r for r in csv.DictReader(fh)}
    rows = []
    for k, (label, *_, fseg) in enumerate(todo):
        row = {"pair": label, "seconds": float(summary[f"p{k}"]["seconds"]),
               **_score(tmp / "batch" / f"p{k}", fseg)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, {"command_seconds_total": wall, "pairs_per_minute": 60.0 * len(todo) / wall}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="dataset folder (SR-Reg layout, e.g. a phantom)")
    p.add_argument("--split", default="test")
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--moving", default="mr")
    p.add_argument("--fixed", default="ct")
    p.add_argument("--tag", default="")
    p.add_argument("--commands", action="store_true",
                   help="also time the whole `mambamorph register` command per pair")
    p.add_argument("--batch", action="store_true",
                   help="instead: one `mambamorph register --pairs` command for all the pairs "
                        "(network loaded once); prints pairs per minute")
    p.add_argument("--log", default="register_pairs.jsonl")
    p.add_argument("--io-config", default=None, metavar="JSON",
                   help="IOConfig fields for the in-process runs, e.g. '{\"lam\": 1.2}' (not "
                        "with --commands or --batch, which run the command's own settings)")
    p.add_argument("--move", type=float, nargs=2, metavar=("DEG", "MM"), default=None,
                   help="move each moving image (and its labels) in world space by a random rigid "
                        "transform: a rotation of up to DEG degrees about a random axis through "
                        "its foreground centre and a shift of up to MM mm (new header, same "
                        "voxels; seeded per pair)")
    p.add_argument("--free-grid", type=float, nargs=4, metavar=("MM", "G0", "G1", "G2"),
                   default=None,
                   help="the grid the training-free path (-- --no-model) runs on in the "
                        "in-process runs, instead of 2 mm 96x112x96: spacing in mm and shape "
                        "(an experiment; scale --io-config's voxel lengths with it)")
    a = p.parse_args(argv)
    if (a.io_config or a.free_grid) and (a.commands or a.batch):
        p.error("--io-config and --free-grid apply to the in-process runs only, not --commands "
                "or --batch")
    if a.free_grid and "--no-model" not in extra:
        p.error("--free-grid sets the training-free path's grid: pass -- --no-model")

    import torch

    from mambamorph import register as register_module
    from mambamorph.data.datasets import SRRegDataset, test_pairs
    from mambamorph.register import register_files

    if a.free_grid:  # read by the training-free path when it builds its grid
        register_module.DEFAULT_SPACING = (a.free_grid[0],) * 3
        register_module.DEFAULT_GRID = tuple(int(g) for g in a.free_grid[1:])

    ds = SRRegDataset(a.data, split=a.split, moving=a.moving, fixed=a.fixed)
    pairs = test_pairs(ds.subjects, a.pairs, a.seed)
    rows, batch = [], {}
    with tempfile.TemporaryDirectory(prefix="mm-pairs-") as tmp:
        todo = []  # (label, moving, fixed, moving_seg, fixed_seg)
        for k, (m, f) in enumerate(pairs):
            mov, mseg = ds.image_path(m, a.moving), ds.seg_path(m)
            if a.move:
                mov, mseg = _moved(mov, mseg, Path(tmp) / f"moved{k}", *a.move, seed=k)
            todo.append((f"{m}->{f}", mov, ds.image_path(f, a.fixed), mseg, ds.seg_path(f)))
        if a.batch:
            rows, batch = _batch(todo, Path(tmp), extra)
        else:
            kw = _kwargs(extra)
            if a.io_config:
                from mambamorph.optimize.instance import IOConfig

                kw["io_config"] = IOConfig.from_json(a.io_config)
            for k, (label, mov, fix, mseg, fseg) in enumerate(todo):
                out = Path(tmp) / f"p{k}"
                t0 = time.perf_counter()
                register_files(mov, fix, out=out, moving_seg=mseg, **kw)
                row = {"pair": label, "seconds": time.perf_counter() - t0, **_score(out, fseg)}
                if a.commands:
                    cmd = [sys.executable, "-m", "mambamorph.cli", "register", str(mov),
                           str(fix), "--moving-seg", str(mseg), "--out",
                           str(Path(tmp) / f"c{k}"), *extra]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True)
                    row["command_seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)

    def ms(key):
        v = np.array([r[key] for r in rows if key in r], dtype=np.float64)
        return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

    summary = {"tag": a.tag, "split": a.split, "n": len(rows), "flags": extra,
               "io_config": json.loads(a.io_config) if a.io_config else None,
               "free_grid": a.free_grid,
               "threads": torch.get_num_threads(), **batch,
               **{k: ms(k) for k in ("dice", "sdlogj", "fold", "j02", "seconds",
                                     "command_seconds")}, "rows": rows}
    with open(a.log, "a") as fh:
        fh.write(json.dumps(summary) + "\n")
    d, s = summary["dice"], summary["sdlogj"]
    if a.batch:
        print(f"| {a.tag or ' '.join(extra) or 'defaults'} | {len(rows)} | "
              f"{batch['pairs_per_minute']:.2f} | {batch['command_seconds_total']:.1f} | "
              f"{summary['seconds'][0]:.1f} | {d[0]:.2f} +- {d[1]:.2f} | {s[0]:.3f} | "
              f"{summary['fold'][0]:.4f} |")
        return 0
    print(f"| {a.tag or ' '.join(extra) or 'defaults'} | {d[0]:.2f} +- {d[1]:.2f} | {s[0]:.3f} | "
          f"{summary['fold'][0]:.4f} | {summary['j02'][0]:.3f} | {summary['seconds'][0]:.1f} | "
          f"{summary['command_seconds'][0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
