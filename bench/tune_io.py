"""Score instance-optimisation settings on the demo phantom's VALIDATION pairs (never test pairs).

For every ordered validation pair (``test_pairs(val_ids, n, seed=0)``) and every method asked
for, prints and appends to a JSON-lines log: Dice over the 16 ROIs of the moving labels warped
(nearest) by the field vs the fixed labels, SDlogJ (2-voxel border crop), folding % (det <= 0),
% of the fixed brain voxels (ROI index > 0) with det < 0.2, and seconds per pair.

Methods (``--method``, repeatable):
  net                the shipped network alone (mambamorph, phantom-cpu weights)
  net+io:JSON        network start + instance_optimise with IOConfig(**JSON)
  zero+io:JSON       identity start + instance_optimise with IOConfig(**JSON)
  convexadam         the convexAdam package's defaults (float32, CPU)

Example:
  PYTHONPATH=src python bench/tune_io.py --pairs 20 --method net \\
      --method 'net+io:{"lam": 1.0}' --method convexadam --log /work/notes/sim/tune.jsonl

The network's velocities are cached (``--cache``) so that IO variants do not rerun it; the
network's time is measured when it runs. ``s`` is wall clock in one process with ``--threads``
torch threads; ``cpu`` is the process CPU time of the method's call (all threads summed), the
figure that survives a machine shared with other jobs (with ``--threads 1`` it is the wall time
the call would take on one idle core). Every pair counts (no warm-up pair).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mambamorph.data.datasets import SRRegDataset, test_pairs
from mambamorph.metrics import compressed_percent, dice_per_roi, folding_percent, sdlogj
from mambamorph.nn.spatial import integrate_velocity, warp
from mambamorph.optimize.instance import IOConfig, instance_optimise

ROOT = "/work/data/phantom-cpu"
WEIGHTS = Path(__file__).resolve().parents[1] / "src/mambamorph/weights/phantom-cpu-mambamorph"


def score(pair: dict, flow: torch.Tensor) -> dict:
    """Dice (0..100, mean over the 16 ROIs), SDlogJ, folding %, J<0.2 % of the fixed brain."""
    seg_m = pair["moving_seg"][None]  # (1, 1, D0, D1, D2) uint8 ROI indices
    seg_f = pair["fixed_seg"][0].numpy()
    warped = warp(seg_m, flow.float(), mode="nearest")[0, 0].numpy()
    f = flow[0].double().numpy()
    return {"dice": float(100 * np.nanmean(dice_per_roi(warped, seg_f, tuple(range(1, 17))))),
            "sdlogj": float(sdlogj(f, crop=2)), "fold": float(folding_percent(f)),
            "j02": float(compressed_percent(f, seg_f > 0, 0.2))}


def network_velocities(ds, pairs, cache: Path) -> tuple[dict, dict]:
    """Velocity of the shipped network for every pair (cached on disk) and the time per pair."""
    store = torch.load(cache) if cache.exists() else {"v": {}, "s": {}}
    todo = [p for p in pairs if f"{p[0]}->{p[1]}" not in store["v"]]
    if todo:
        from mambamorph.checkpoint import load_model
        from mambamorph.models import predict

        model, _ = load_model(WEIGHTS, "cpu")
        for m, f in todo:
            pair = ds.pair(m, f)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = predict(model, pair["moving"][None], pair["fixed"][None])
            store["s"][f"{m}->{f}"] = time.perf_counter() - t0
            store["v"][f"{m}->{f}"] = out.velocity.float().contiguous().clone()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(store, cache)
    return store["v"], store["s"]


def run_convexadam(pair: dict) -> torch.Tensor:
    from convexAdam.convex_adam_MIND import convex_adam_pt

    disp = convex_adam_pt(img_fixed=pair["fixed"][0], img_moving=pair["moving"][0],
                          dtype=torch.float32, device=torch.device("cpu"))  # (D0, D1, D2, 3)
    return torch.from_numpy(np.ascontiguousarray(disp)).float().permute(3, 0, 1, 2)[None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", action="append", required=True)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--first", type=int, default=0, help="skip this many pairs of the list")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/work/notes/sim/net_velocity.pt"))
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    ds = SRRegDataset(ROOT, split="val")
    pairs = test_pairs(ds.subjects, 20, seed=0)[args.first:args.first + args.pairs]
    need_net = any(m == "net" or m.startswith("net+io") for m in args.method)
    vel, net_s = network_velocities(ds, pairs, args.cache) if need_net else ({}, {})

    for method in args.method:
        kind, _, spec = method.partition(":")
        cfg = IOConfig.from_json(spec)
        rows = []
        for m, f in pairs:
            pair = ds.pair(m, f)
            key = f"{m}->{f}"
            c0 = time.process_time()
            if kind == "net":
                flow = integrate_velocity(vel[key], 7)
                sec = net_s[key]
            elif kind in ("net+io", "zero+io"):
                init = vel[key] if kind == "net+io" else None
                res = instance_optimise(pair["moving"][None], pair["fixed"][None],
                                        init_velocity=init, cfg=cfg)
                flow, sec = res.flow, res.seconds
            elif kind == "convexadam":
                t0 = time.perf_counter()
                flow = run_convexadam(pair)
                sec = time.perf_counter() - t0
            else:
                sys.exit(f"unknown method {method!r}")
            cpu = time.process_time() - c0 if kind != "net" else float("nan")
            rows.append(dict(score(pair, flow), s=sec, cpu=cpu))
            print(f"  {key}: " + " ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()),
                  file=sys.stderr, flush=True)
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        std_dice = float(np.std([r["dice"] for r in rows]))
        line = (f"{method:60s} n={len(rows)} dice {mean['dice']:.2f} +- {std_dice:.2f} "
                f"sdlogj {mean['sdlogj']:.3f} fold {mean['fold']:.4f} j02 {mean['j02']:.3f} "
                f"s/pair {mean['s']:.2f} cpu-s/pair {mean['cpu']:.2f}")
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as fh:
                fh.write(json.dumps({"method": method, "tag": args.tag, "n": len(rows),
                                     "first": args.first, "threads": args.threads, **mean,
                                     "dice_std": std_dice, "per_pair": rows}) + "\n")


if __name__ == "__main__":
    main()
