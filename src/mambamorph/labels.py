"""The fixed 16-ROI label table of SPEC.md section 5 (FreeSurfer / SynthSeg ids, L+R merged).

Every dataset is mapped to these ids; one-hot encodings always use this table, never
``unique()`` of one subject, so channel ``k`` means the same structure everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

from mambamorph.errors import InputError

#: (FreeSurfer id, name) of the 16 evaluated ROIs, in channel order.
ROIS: tuple[tuple[int, str], ...] = (
    (2, "cerebral white matter"),
    (3, "cerebral cortex"),
    (4, "lateral ventricle"),
    (7, "cerebellum white matter"),
    (8, "cerebellum cortex"),
    (10, "thalamus"),
    (11, "caudate"),
    (12, "putamen"),
    (13, "pallidum"),
    (14, "third ventricle"),
    (15, "fourth ventricle"),
    (16, "brain stem"),
    (17, "hippocampus"),
    (18, "amygdala"),
    (26, "accumbens"),
    (28, "ventral DC"),
)
ROI_IDS: tuple[int, ...] = tuple(i for i, _ in ROIS)
ROI_NAMES: tuple[str, ...] = tuple(n for _, n in ROIS)
#: ids that may appear in a label map but are not evaluated (background, inferior lateral
#: ventricle, CSF).
IGNORED_IDS: tuple[int, ...] = (0, 5, 24)
ALLOWED_IDS: frozenset[int] = frozenset(ROI_IDS) | frozenset(IGNORED_IDS)
NUM_ROIS = len(ROIS)

# FreeSurfer left-hemisphere ids -> merged id (right hemisphere ids are already merged ids).
_LEFT_TO_MERGED = {41: 2, 42: 3, 43: 4, 44: 5, 46: 7, 47: 8, 49: 10, 50: 11, 51: 12, 52: 13,
                   53: 17, 54: 18, 58: 26, 60: 28}


def merge_hemispheres(labels: np.ndarray) -> np.ndarray:
    """Map right-hemisphere FreeSurfer ids (41, 42, ...) onto their left twins (2, 3, ...).

    Args:
        labels: integer label map of any shape.
    Returns:
        A new integer array of the same shape with hemispheres merged.
    """
    out = labels.copy()
    for src, dst in _LEFT_TO_MERGED.items():
        out[labels == src] = dst
    return out


def check_label_ids(labels: np.ndarray, source: str = "label map") -> None:
    """Raise :class:`InputError` naming ``source`` if ``labels`` holds ids outside the table.

    Allowed ids are the 16 ROIs plus the ignored ids 0, 5 and 24 (after hemisphere merging).
    """
    present = np.unique(labels)
    bad = sorted(int(v) for v in present if int(v) not in ALLOWED_IDS)
    if bad:
        shown = ", ".join(str(b) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise InputError(
            f"{source}: labels outside the 16-ROI table (allowed {sorted(ALLOWED_IDS)}): {shown}")


def to_roi_index(labels: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Map FreeSurfer ids to compact ROI indices: 0 = background/ignored, k = ROI k (1..16).

    Args:
        labels: integer label map (numpy or torch), any shape.
    Returns:
        ``uint8`` array (numpy in, numpy out) or ``torch.uint8`` tensor of the same shape.
    """
    lut = np.zeros(max(ALLOWED_IDS | {60}) + 1, dtype=np.uint8)
    for k, rid in enumerate(ROI_IDS, start=1):
        lut[rid] = k
    if isinstance(labels, torch.Tensor):
        lut_t = torch.from_numpy(lut).to(labels.device)
        return lut_t[labels.long().clamp(0, len(lut) - 1)]
    return lut[np.clip(labels.astype(np.int64), 0, len(lut) - 1)]


def one_hot(roi_index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot of compact ROI indices over the 16 ROIs (background dropped).

    Args:
        roi_index: ``(B, 1, D0, D1, D2)`` or ``(B, D0, D1, D2)`` integer tensor of values 0..16
            (see :func:`to_roi_index`).
        dtype: output dtype (float32 by default; float16 halves the memory).
    Returns:
        ``(B, 16, D0, D1, D2)`` tensor, channel ``k`` = ROI ``ROI_IDS[k]``.
    """
    if roi_index.dim() == 5:
        if roi_index.shape[1] != 1:
            raise ValueError(f"expected (B, 1, D0, D1, D2), got {tuple(roi_index.shape)}")
        roi_index = roi_index[:, 0]
    if roi_index.dim() != 4:
        raise ValueError(f"expected (B, D0, D1, D2) or (B, 1, D0, D1, D2), got {tuple(roi_index.shape)}")
    idx = roi_index.long()
    oh = torch.zeros((idx.shape[0], NUM_ROIS + 1, *idx.shape[1:]), dtype=dtype, device=idx.device)
    oh.scatter_(1, idx.unsqueeze(1), 1)
    return oh[:, 1:]
