"""NIfTI in and out (nibabel): canonical orientation, spacing, validation, ITK field export.

Every volume is read into the canonical RAS+ orientation (array axis 0 towards the subject's
Right, axis 1 Anterior, axis 2 Superior: the result of ``nibabel.as_closest_canonical``), done
with :mod:`nibabel.orientations` so that :func:`write_volume` can undo it and write outputs with
the input's own orientation, affine and header. A :class:`Volume` keeps both geometries.

Bad files fail early with an :class:`~mambamorph.errors.InputError` naming the file and the
problem: missing file, not a NIfTI, truncated or corrupt data, wrong dimensionality, NaN/Inf
voxels, an empty (constant) volume, non-integer or unknown labels. Writes are atomic (temporary
file in the destination folder, then ``os.replace``), ``.nii.gz`` files are gzipped with mtime 0
(same data, same bytes; stored without deflate when deflate would save little, see
:func:`gzip_bytes`), and an existing file is replaced only when ``overwrite=True``.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as nio

from mambamorph import labels as _labels
from mambamorph.errors import InputError, OutputExistsError, WriteError

__all__ = ["Volume", "read_volume", "read_labels", "write_volume", "write_itk_displacement",
           "write_nifti", "atomic_write_bytes", "atomic_write_text", "prepare_output_dir",
           "require_file"]

_RAS = nio.axcodes2ornt(("R", "A", "S"))
_NIFTI_EXT = (".nii.gz", ".nii")


@dataclass
class Volume:
    """A 3D volume in canonical RAS+ orientation plus what is needed to write it back.

    Attributes:
        data: ``(D0, D1, D2)`` tensor in canonical orientation: ``float32`` for images,
            ``int64`` for label maps.
        affine: ``(4, 4)`` float64 voxel -> RAS world (mm) affine of ``data``.
        spacing: ``(3,)`` float64 voxel size in mm along the canonical array axes.
        path: the file it was read from (``None`` when built in memory).
        orig_affine: ``(4, 4)`` affine of the array as stored in the file.
        orig_shape: ``(3,)`` shape of the array as stored in the file.
        ornt: ``(3, 2)`` nibabel orientation transform, stored array -> canonical array.
        header: the file's NIfTI header (a copy; outputs are written with it).
    """

    data: torch.Tensor
    affine: np.ndarray
    spacing: np.ndarray
    path: Path | None
    orig_affine: np.ndarray
    orig_shape: tuple[int, int, int]
    ornt: np.ndarray
    header: nib.Nifti1Header

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical array shape ``(D0, D1, D2)``."""
        return tuple(self.data.shape)

    @classmethod
    def from_array(cls, data: np.ndarray, affine: np.ndarray, header=None,
                   path: str | os.PathLike | None = None) -> "Volume":
        """Build a :class:`Volume` from a stored-orientation array and its affine.

        Args:
            data: ``(X, Y, Z)`` array in the orientation ``affine`` describes (as in a file).
                Floating arrays become ``float32``; integer and bool arrays ``int64``.
            affine: ``(4, 4)`` voxel -> RAS mm affine of ``data``.
            header: NIfTI header to write outputs with (default: a fresh one for ``affine``).
            path: where it came from, for messages.
        Raises:
            InputError: ``data`` is not 3D or ``affine`` is not an invertible ``(4, 4)`` matrix.
        """
        data = np.asanyarray(data)
        affine = np.asarray(affine, dtype=np.float64)
        src = str(path) if path is not None else "volume"
        if data.ndim != 3:
            raise InputError(f"{src}: expected a 3D array, got shape {data.shape}")
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) \
                or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError(f"{src}: the voxel-to-world affine is not an invertible 4x4 matrix")
        ornt = nio.ornt_transform(nio.io_orientation(affine), _RAS)
        canon = np.ascontiguousarray(nio.apply_orientation(data, ornt))
        can_aff = affine @ nio.inv_ornt_aff(ornt, data.shape)
        if header is None:
            header = nib.Nifti1Image(data[:1, :1, :1], affine).header
        hdr = header.copy()
        dtype = np.float32 if np.issubdtype(canon.dtype, np.floating) else np.int64
        return cls(data=torch.from_numpy(canon.astype(dtype, copy=False)), affine=can_aff,
                   spacing=np.sqrt((can_aff[:3, :3] ** 2).sum(axis=0)),
                   path=Path(path) if path is not None else None,
                   orig_affine=affine.copy(), orig_shape=tuple(int(s) for s in data.shape),
                   ornt=ornt, header=hdr)

    def to_stored(self, data: np.ndarray) -> np.ndarray:
        """Reorient a canonical ``(D0, D1, D2, ...)`` array back to the stored orientation."""
        return nio.apply_orientation(data, nio.ornt_transform(_RAS, nio.io_orientation(
            self.orig_affine)))


# ------------------------------------------------------------------------------------ reading
def require_file(path: str | os.PathLike, what: str = "file", expected: str = "") -> Path:
    """``path`` as a Path if it is an existing regular file, else InputError naming it:
    ``"{path}: {what} not found"`` or ``"{path}: not a file"`` (+ `` (expected ...)``)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: {what} not found")
    if not p.is_file():
        raise InputError(f"{p}: not a file" + (f" (expected {expected})" if expected else ""))
    return p


def _load(path: str | os.PathLike) -> tuple[np.ndarray, nib.Nifti1Image, Path]:
    """Load a NIfTI's array (scaling applied, 3D) and image, or raise InputError naming it."""
    p = require_file(path)
    try:
        # whole-file read: gzip.decompress checks the CRC and length, which nibabel's partial
        # reads skip, so a corrupt .nii.gz fails here instead of giving garbage voxels
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        sizes = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
        klass = nib.Nifti1Image if 348 in sizes else nib.Nifti2Image if 540 in sizes else None
        if klass is None or len(raw) < 352:
            raise InputError(f"{p}: not a NIfTI file (no NIfTI-1/2 header)")
        img = klass.from_bytes(raw)
        arr = np.asanyarray(img.dataobj)
    except InputError:
        raise
    except nib.filebasedimages.ImageFileError as e:
        raise InputError(f"{p}: not a NIfTI file ({e})") from None
    except (OSError, EOFError, zlib.error, ValueError, MemoryError, nib.spatialimages.
            HeaderDataError) as e:
        raise InputError(f"{p}: unreadable, truncated or corrupt NIfTI ({type(e).__name__}: "
                         f"{e})") from None
    if arr.ndim > 3 and all(s == 1 for s in arr.shape[3:]):
        arr = arr.reshape(arr.shape[:3])
    if arr.ndim != 3:
        raise InputError(f"{p}: expected a 3D volume, got shape {arr.shape} "
                         f"({arr.ndim}D)")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{p}: unsupported voxel type {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(f"{p}: {bad} NaN or Inf voxels")
    return arr, img, p


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D image as ``float32`` in canonical RAS+ orientation.

    Args:
        path: a ``.nii`` / ``.nii.gz`` file; a 4D file with a trailing singleton is accepted.
    Returns:
        :class:`Volume` with ``data`` ``(D0, D1, D2)`` float32 (scl_slope/inter applied).
    Raises:
        InputError: file missing, not a NIfTI, truncated/corrupt, not 3D, NaN/Inf voxels,
            constant (e.g. all-zero) volume.
    """
    arr, img, p = _load(path)
    arr = arr.astype(np.float32, copy=False)
    if arr.size == 0 or arr.min() == arr.max():
        raise InputError(f"{p}: empty volume (every voxel is "
                         f"{arr.flat[0] if arr.size else 'absent'})")
    return Volume.from_array(arr, img.affine, img.header, p)


def read_labels(path: str | os.PathLike, check_table: bool = True,
                merge_hemispheres: bool = False) -> Volume:
    """Read a label map as ``int64`` in canonical RAS+ orientation.

    Args:
        path: a ``.nii`` / ``.nii.gz`` label map (integer ids, or floats holding integers).
        check_table: check the ids against the 16-ROI table
            (:func:`mambamorph.labels.check_label_ids`), after merging the hemispheres,
            so FreeSurfer right-hemisphere ids (41, 42, ...) are accepted.
        merge_hemispheres: return the merged ids (41 -> 2, 42 -> 3, ...; see
            :func:`mambamorph.labels.merge_hemispheres`) instead of the ids as stored.
    Returns:
        :class:`Volume` with ``data`` ``(D0, D1, D2)`` int64.
    Raises:
        InputError: the errors of :func:`read_volume`, non-integer values, labels outside the
            table (with ``check_table``), no non-zero label.
    """
    arr, img, p = _load(path)
    if arr.dtype.kind == "f":
        frac = arr != np.round(arr)
        if frac.any():
            raise InputError(f"{p}: label map holds {int(frac.sum())} non-integer values "
                             f"(e.g. {arr[frac].flat[0]:g})")
    arr = arr.astype(np.int64)
    if not arr.any():
        raise InputError(f"{p}: empty label map (every voxel is 0)")
    merged = _labels.merge_hemispheres(arr) if (merge_hemispheres or check_table) else arr
    if check_table:
        _labels.check_label_ids(merged, str(p))
    return Volume.from_array(merged if merge_hemispheres else arr, img.affine, img.header, p)


# ------------------------------------------------------------------------------------ writing
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    The one writer of the package: every output (volumes, checkpoints, tables, figures) goes
    through it, so a reader never sees a half-written file and a failed write leaves the previous
    file (if any) as it was.

    Args:
        path: destination; its folder is created if missing.
        data: the bytes to write.
        overwrite: replace an existing file.
    Returns:
        The destination path.
    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        InputError: ``path`` is a folder.
        WriteError: the operating system refused the write (full disk, vanished or read-only
            folder); the message names the file. No temporary file is left behind.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a folder, expected a file name")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p}: file exists")
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"{p}: cannot write: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return p


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def prepare_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                       owned: Callable[[Path], bool] | None = None,
                       what: str = "output folder", create: bool = True) -> Path:
    """The one output-folder rule: create ``out_dir``, refusing a non-empty one unless asked.

    A missing or empty folder is created. A non-empty one is refused unless ``overwrite``; with
    ``overwrite``, only the files that ``owned`` recognises (what an earlier run of the same job
    wrote, by path) are deleted, so nothing else of the user's is lost; ``owned=None`` deletes
    nothing (files are then replaced one by one as they are written).

    Args:
        out_dir: the folder.
        overwrite: allow a non-empty folder.
        owned: ``owned(path) -> bool`` for each file under ``out_dir`` (recursively): True for
            files this job wrote earlier and may delete.
        what: how messages name the folder (``"run folder"``, ``"output folder"``).
        create: create the folder (``False``: only check, delete and create nothing, to fail
            early before the real work).
    Returns:
        ``out_dir`` as a ``Path``.
    Raises:
        InputError: ``out_dir`` exists and is not a folder.
        OutputExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        WriteError: the folder cannot be created.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out}: {what} exists and is not empty; choose another "
                                    "folder")
        if owned is not None and create:
            for f in sorted(out.rglob("*")):
                if f.is_file() and owned(f):
                    f.unlink()
    if not create:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{out}: cannot create the {what}: {e.strerror or e}") from e
    return out


#: :func:`gzip_bytes` deflates only when a sample of the data shrinks below this fraction.
GZIP_WORTH_IT = 0.75
_GZIP_SAMPLE = 4, 1 << 17  # chunks, bytes per chunk


def gzip_bytes(raw: bytes) -> bytes:
    """A gzip member (mtime 0) holding ``raw``: deflated (level 6) when that pays, else stored.

    Four 128 kB chunks spread over ``raw`` are deflated at level 1; when together they shrink
    below :data:`GZIP_WORTH_IT` of their size the whole is deflated at level 6, otherwise it is
    written with level 0 (stored blocks: a valid ``.gz`` any reader opens, a few bytes larger
    than ``raw``). Float32 fields (the ITK displacement, the Jacobian map) deflate by only
    8-18 % at 1.5 s and 0.5-0.8 s per 96x112x96 volume on this project's CPU; label maps and
    images with a background shrink to a quarter or less and stay deflated. Deterministic: the
    same bytes give the same file.
    """
    n_chunks, size = _GZIP_SAMPLE
    level = 6
    if len(raw) > 2 * n_chunks * size:
        step = (len(raw) - size) // (n_chunks - 1)
        sample = b"".join(raw[i * step:i * step + size] for i in range(n_chunks))
        if len(zlib.compress(sample, 1)) > GZIP_WORTH_IT * len(sample):
            level = 0
    return gzip.compress(raw, compresslevel=level, mtime=0)


def _save(path: Path, img: nib.Nifti1Image, overwrite: bool) -> Path:
    """The one NIfTI file writer: ``.nii.gz`` gzipped (:func:`gzip_bytes`) with mtime 0, atomic,
    see module doc."""
    if not str(path).endswith(_NIFTI_EXT):
        raise InputError(f"{path}: output name must end with .nii or .nii.gz")
    raw = img.to_bytes()
    if str(path).endswith(".gz"):
        raw = gzip_bytes(raw)
    return atomic_write_bytes(path, raw, overwrite)


def _to_numpy(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu()
        if data.dtype in (torch.float16, torch.bfloat16):
            data = data.float()
        return data.numpy()
    return np.asarray(data)


def _output_dtype(arr: np.ndarray) -> np.dtype:
    """float16 -> float32, bool -> uint8, 64-bit ints -> the smallest integer type that fits."""
    if arr.dtype == np.bool_:
        return np.dtype(np.uint8)
    if arr.dtype.kind == "f":
        return np.dtype(np.float32) if arr.dtype.itemsize < 4 else arr.dtype
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for t in (np.uint8, np.int16, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return np.dtype(t)
    return arr.dtype


def write_nifti(path: str | os.PathLike, data, affine: np.ndarray, header=None, dtype=None,
                overwrite: bool = False) -> Path:
    """Write an array as a NIfTI-1 file: atomic, and a ``.nii.gz`` holds the same bytes for the
    same array (gzip mtime 0).

    Args:
        path: destination ``.nii`` / ``.nii.gz``.
        data: ``(X, Y, Z, ...)`` numpy array or torch tensor in the voxel order ``affine``
            describes (as stored in the file; no reorientation).
        affine: ``(4, 4)`` voxel -> RAS world (mm) affine.
        header: NIfTI header to start from (copied; data type set to the stored one, scaling
            reset to slope 1, intercept 0). Default: a fresh header with units mm and
            qform = sform = ``affine`` (code 1, scanner).
        dtype: stored voxel type; default ``data``'s own.
        overwrite: replace an existing file.
    Returns:
        The path written.
    Raises:
        InputError: the name does not end in ``.nii`` / ``.nii.gz``, or a folder.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        WriteError: the operating system refused the write; names the file.
    """
    arr = _to_numpy(data)
    if dtype is not None:
        arr = arr.astype(np.dtype(dtype), copy=False)
    affine = np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(arr, affine, header=header)
    if header is None:
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    else:
        img.header.set_data_dtype(arr.dtype)
        img.header.set_slope_inter(1.0, 0.0)
    return _save(Path(path), img, overwrite)


def write_volume(path: str | os.PathLike, data, like: Volume, dtype=None,
                 overwrite: bool = False) -> Path:
    """Write a canonical-orientation array in the orientation and header geometry of ``like``.

    Args:
        path: destination ``.nii`` / ``.nii.gz``.
        data: ``(D0, D1, D2)`` or ``(D0, D1, D2, ...)`` torch tensor or numpy array on
            ``like``'s canonical grid (``like.shape``).
        like: the :class:`Volume` whose stored orientation, affine and header are used.
        dtype: stored voxel type; default: ``data``'s own (float16 -> float32, bool -> uint8,
            64-bit integers -> the smallest of uint8/int16/int32 that holds the values).
    Returns:
        The path written.
    Raises:
        InputError: wrong shape, bad file name, or ``path`` exists and ``overwrite`` is false.
    """
    arr = _to_numpy(data)
    if arr.ndim < 3 or tuple(arr.shape[:3]) != like.shape:
        raise InputError(f"{path}: data of shape {tuple(arr.shape)} does not fit the reference "
                         f"grid {like.shape} (+ optional trailing axes)")
    out = np.ascontiguousarray(like.to_stored(arr))
    dt = np.dtype(dtype) if dtype is not None else _output_dtype(arr)
    return write_nifti(path, out, like.orig_affine, header=like.header, dtype=dt,
                       overwrite=overwrite)


def write_itk_displacement(path: str | os.PathLike, disp_mm: np.ndarray, like: Volume,
                           overwrite: bool = False) -> Path:
    """Write a displacement field that ITK / SimpleITK / ANTs read as a transform.

    ``disp_mm`` holds displacement vectors in RAS world millimetres at the voxels of ``like``'s
    canonical grid: the transform maps the world point ``p`` of voxel ``x`` to ``p + disp(x)``
    (fixed -> moving, the direction resampling needs: the moved image at ``p`` is the moving
    image at ``p + disp``). Resampling the *moving* image with it, e.g.
    ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(sitk.Cast(field,
    sitk.sitkVectorFloat64)), sitk.sitkLinear)`` or ``antsApplyTransforms -i moving -r fixed
    -t field.nii.gz``, reproduces the warp.

    The file is a 5D NIfTI ``(X, Y, Z, 1, 3)`` float32 with intent code 1007 (vector), in
    ``like``'s stored orientation and affine, and the vectors in ITK's LPS convention (the
    first two components negated), as ITK and ANTs write such fields themselves.
    Measured with SimpleITK 2.5 (ITK 5.4): the NIfTI reader returns the components of an
    intent-1007 (vector) image unchanged, but negates the first two of an intent-1006
    (DISPVECT) image (it takes DISPVECT files to hold RAS vectors); ``sitk.WriteImage`` of a
    vector image writes intent 1007 with LPS components. So a 1007 file must hold LPS vectors.

    Args:
        path: destination ``.nii`` / ``.nii.gz``.
        disp_mm: ``(D0, D1, D2, 3)`` array (numpy or torch), RAS mm, on ``like``'s canonical grid.
        like: the fixed image's :class:`Volume`.
        overwrite: replace an existing file.
    Returns:
        The path written.
    Raises:
        InputError: wrong shape, non-finite vectors, bad file name, existing file.
    """
    d = _to_numpy(disp_mm).astype(np.float64)
    if d.shape != (*like.shape, 3):
        raise InputError(f"{path}: displacement of shape {d.shape}, expected "
                         f"{(*like.shape, 3)} (D0, D1, D2, 3) on the reference grid")
    if not np.all(np.isfinite(d)):
        raise InputError(f"{path}: displacement holds NaN or Inf")
    stored = like.to_stored(d) * np.array([-1.0, -1.0, 1.0])  # world vectors: RAS -> LPS
    out = np.ascontiguousarray(stored[:, :, :, None, :].astype(np.float32))
    img = nib.Nifti1Image(out, like.orig_affine, header=like.header)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.header.set_intent("vector", (), "")
    return _save(Path(path), img, overwrite)


def write_itk_affine(path: str | os.PathLike, matrix_ras: np.ndarray,
                     overwrite: bool = False) -> Path:
    """Write a world affine transform as an ITK transform file (``.tfm`` / ``.txt``).

    ``matrix_ras`` maps a fixed-world point to the moving-world point where the moving image is
    sampled (RAS mm, fixed -> moving: the direction ITK resampling expects). The file holds an
    ``AffineTransform_double_3_3`` in ITK's LPS convention (``F @ matrix_ras @ F`` with
    ``F = diag(-1, -1, 1, 1)``), centre 0, so ``sitk.Resample(moving, fixed,
    sitk.ReadTransform(path))`` reproduces the alignment (tested); ANTs reads the same ITK
    text format (``antsApplyTransforms -i MOVING -r FIXED -t path``; not tested here).

    Args:
        path: destination (``.tfm`` or ``.txt``, ITK's text transform format).
        matrix_ras: ``(4, 4)`` affine in RAS mm, last row ``(0, 0, 0, 1)``.
        overwrite: replace an existing file.
    Returns:
        The path written.
    Raises:
        InputError: not a finite ``(4, 4)`` affine, or a name not ending in ``.tfm`` / ``.txt``.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    m = _to_numpy(matrix_ras).astype(np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.allclose(m[3], (0, 0, 0, 1)):
        raise InputError(f"{path}: expected a finite (4, 4) affine with last row 0 0 0 1, got "
                         f"shape {m.shape}")
    if not str(path).endswith((".tfm", ".txt")):
        raise InputError(f"{path}: an ITK transform file name must end with .tfm or .txt")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ m @ flip
    params = " ".join(repr(float(v)) for v in (*lps[:3, :3].ravel(), *lps[:3, 3]))
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            "Transform: AffineTransform_double_3_3\n"
            f"Parameters: {params}\nFixedParameters: 0 0 0\n")
    return atomic_write_text(path, text, overwrite=overwrite)
