"""Dataset readers (SR-Reg layout, CSV manifest), seeded splits and registration pairs.

Splits are JSON files ``{"seed": s, "train": [...], "val": [...], "test": [...]}`` made by
:func:`make_split` from the sorted subject ids with ``numpy.random.default_rng(seed)``, so the
same ids and seed give the same split on every machine. A dataset opened without a split file
creates its default one (``<root>/split.json``) on first use and reads it afterwards, so the
training, validation and test subjects stay disjoint whatever seed later commands pass.

A dataset gives, per subject, images as ``float32`` tensors ``(1, D0, D1, D2)`` min-max
normalised to [0, 1] and label maps as ``uint8`` tensors ``(1, D0, D1, D2)`` of compact ROI
indices (0 = background or ignored, k = ROI ``ROI_IDS[k - 1]``; see
:func:`mambamorph.labels.to_roi_index`), both in canonical RAS+ orientation and, when a
``grid`` is given, centre-cropped / zero-padded to it. A registration pair is a dict with keys
``moving``, ``fixed``, ``moving_seg``, ``fixed_seg`` (those tensors) and ``moving_id``,
``fixed_id``; pairs are inter-subject (moving id != fixed id).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from mambamorph import labels as _labels
from mambamorph.data.preprocess import crop_or_pad, ct_window, minmax
from mambamorph.errors import InputError
from mambamorph.io import atomic_write_bytes, read_labels, read_volume

__all__ = ["SPLITS", "make_split", "default_split_sizes", "write_split", "read_split",
           "test_pairs", "SRRegDataset", "ManifestDataset", "PairDataset"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


# -------------------------------------------------------------------------------------- splits
def default_split_sizes(n: int) -> tuple[int, int]:
    """``(n_val, n_test)`` for ``n`` subjects: SR-Reg's 150/10/20 of 180, scaled.

    ``n_val = round(n * 10 / 180)`` and ``n_test = round(n * 20 / 180)``, each at least 2 (an
    inter-subject pair needs two subjects), leaving at least 2 training subjects.

    Raises:
        InputError: fewer than 6 subjects.
    """
    if n < 6:
        raise InputError(f"{n} subjects are too few for a train/val/test split (need >= 6: "
                         "2 each, as a pair needs two subjects)")
    return max(2, round(n * 10 / 180)), max(2, round(n * 20 / 180))


def make_split(ids: Iterable[str], n_val: int, n_test: int, seed: int = 0) -> dict:
    """Seeded train/val/test split of subject ids.

    The ids are sorted, ordered by ``numpy.random.default_rng(seed).random(n)`` keys (a stable
    argsort), and the first ``n_val`` go to ``val``, the next ``n_test`` to ``test``, the rest to
    ``train``; each list is returned sorted. The result depends only on the set of ids and the
    seed.

    Args:
        ids: subject ids (strings, no duplicates).
        n_val, n_test: sizes of the validation and test sets (>= 0).
        seed: integer seed.
    Returns:
        ``{"seed": seed, "train": [...], "val": [...], "test": [...]}``.
    Raises:
        InputError: duplicate ids, negative sizes, or no subject left for training.
    """
    ids = sorted(str(i) for i in ids)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"duplicate subject ids: {dup[:10]}")
    n_val, n_test, seed = int(n_val), int(n_test), int(seed)
    if n_val < 0 or n_test < 0 or n_val + n_test >= len(ids):
        raise InputError(f"cannot split {len(ids)} subjects into {n_val} validation, {n_test} "
                         f"test and at least 1 training subject")
    order = np.argsort(np.random.default_rng(seed).random(len(ids)), kind="stable")
    pick = [ids[k] for k in order]
    return {"seed": seed, "train": sorted(pick[n_val + n_test:]), "val": sorted(pick[:n_val]),
            "test": sorted(pick[n_val:n_val + n_test])}


def _check_split(split, source: str) -> dict:
    """Validate a split mapping and return it as a plain dict (seed, train, val, test)."""
    if not isinstance(split, Mapping):
        raise InputError(f"{source}: a split must be a JSON object with train/val/test lists")
    out = {"seed": split.get("seed")}
    if out["seed"] is not None and (not isinstance(out["seed"], int) or isinstance(out["seed"],
                                                                                    bool)):
        raise InputError(f"{source}: 'seed' must be an integer or null, got {out['seed']!r}")
    seen: dict[str, str] = {}
    for name in SPLITS:
        ids = split.get(name)
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise InputError(f"{source}: '{name}' must be a list of non-empty subject id strings")
        for i in ids:
            if i in seen:
                raise InputError(f"{source}: subject {i!r} is in both '{seen[i]}' and '{name}'")
            seen[i] = name
        out[name] = list(ids)
    return out


def write_split(path: str | os.PathLike, split: Mapping, overwrite: bool = False) -> Path:
    """Write a split as JSON, atomically.

    Writing the same split again is a no-op; a different existing file is kept unless
    ``overwrite``.

    Args:
        path: destination ``.json``.
        split: ``{"seed", "train", "val", "test"}`` as made by :func:`make_split`.
        overwrite: replace an existing file that holds a different split.
    Returns:
        The path.
    Raises:
        InputError: malformed ``split``, or a different split exists at ``path``.
    """
    p = Path(path)
    split = _check_split(split, str(p))
    text = json.dumps(split, indent=1) + "\n"
    if p.exists() and not overwrite:
        try:
            same = read_split(p) == split
        except InputError:
            same = False
        if same:
            return p
        raise InputError(f"{p}: a different split file exists; pass overwrite=True to replace "
                         f"it (this changes which subjects are held out)")
    return atomic_write_bytes(p, text.encode(), overwrite=True)


def read_split(path: str | os.PathLike) -> dict:
    """Read a split JSON written by :func:`write_split` (or by hand).

    Returns:
        ``{"seed": int | None, "train": [...], "val": [...], "test": [...]}``.
    Raises:
        InputError: missing or unreadable file, invalid JSON, missing/ill-typed lists, a subject
            in two lists.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: split file not found")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a readable JSON split file ({e})") from None
    return _check_split(obj, str(p))


def test_pairs(ids: Sequence[str], n_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """A fixed, seeded list of inter-subject ``(moving_id, fixed_id)`` pairs.

    The unordered pairs ``{a, b}`` of ``ids`` (in the given order, ``a`` before ``b``) are
    permuted by ``default_rng(SeedSequence(seed, spawn_key=(2**31,)))`` (a stream independent
    of :func:`make_split`'s), and each drawn pair is flipped with probability 1/2. Beyond the
    ``n (n - 1) / 2`` unordered pairs, the reversed pairs follow in the same order.

    Args:
        ids: subject ids (at least 2, no duplicates), e.g. ``dataset.subjects``.
        n_pairs: number of pairs (``<= n (n - 1)``).
        seed: integer seed.
    Returns:
        ``n_pairs`` distinct ``(moving_id, fixed_id)`` tuples with ``moving_id != fixed_id``.
    Raises:
        InputError: fewer than 2 ids, duplicates, or more pairs than ordered pairs exist.
    """
    ids = [str(i) for i in ids]
    n, n_pairs = len(ids), int(n_pairs)
    if n < 2 or len(set(ids)) != n:
        raise InputError(f"test pairs need at least 2 distinct subjects, got {ids[:10]}")
    if n_pairs < 0 or n_pairs > n * (n - 1):
        raise InputError(f"{n_pairs} pairs requested; {n} subjects give at most {n * (n - 1)}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(2**31,)))
    unordered = [(a, b) for k, a in enumerate(ids) for b in ids[k + 1:]]
    order = rng.permutation(len(unordered))[:n_pairs]
    flips = rng.random(len(order)) < 0.5
    drawn = [(unordered[k][1], unordered[k][0]) if f else unordered[k]
             for k, f in zip(order, flips)]
    return (drawn + [(b, a) for a, b in drawn])[:n_pairs]


def _split_ids(split: dict, name: str, source: str) -> list[str]:
    if name not in SPLITS:
        raise InputError(f"{source}: unknown split {name!r}; choose one of {SPLITS}")
    return list(split[name])


def _open_or_create_split(path: Path, ids: Sequence[str], seed: int) -> dict:
    """Read ``path``; if it is missing, make the default split of ``ids`` and write it there."""
    if path.exists():
        return read_split(path)
    split = make_split(ids, *default_split_sizes(len(ids)), seed)
    write_split(path, split)
    logger.info("%s: wrote a new split (seed %d): %d/%d/%d train/val/test subjects", path, seed,
                len(split["train"]), len(split["val"]), len(split["test"]))
    return split


def _check_grid(grid) -> tuple[int, int, int] | None:
    if grid is None:
        return None
    g = tuple(int(v) for v in grid)
    if len(g) != 3 or min(g) < 1:
        raise InputError(f"grid must be three positive integers, got {grid}")
    return g


class _PairSource:
    """Shared reading, preprocessing, caching and pair drawing of the dataset classes.

    Subclasses set ``self.subjects`` and implement ``image_path(subject, modality)`` and
    ``seg_path(subject)``.
    """

    subjects: list[str]
    #: False for a manifest without a ``seg`` column: pairs then carry no label maps
    has_labels: bool = True

    def __init__(self, moving: str, fixed: str, grid, cache: bool,
                 windows: Mapping[str, tuple[float, float]] | None) -> None:
        self.moving, self.fixed = str(moving), str(fixed)
        self.grid = _check_grid(grid)
        self.windows = dict(windows or {})
        self.cache = bool(cache)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._shape: dict[str, tuple[tuple[int, ...], Path]] = {}
        self._spacing: np.ndarray | None = None
        self._spacing_src: Path | None = None

    def image_path(self, subject: str, modality: str) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def seg_path(self, subject: str) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_files(self) -> None:
        """Fail early, naming the path, if a subject of the split lacks a needed file."""
        missing = [p for s in self.subjects
                   for p in (self.image_path(s, self.moving), self.image_path(s, self.fixed),
                             *((self.seg_path(s),) if self.has_labels else ()))
                   if not p.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"{missing[0]}: file not found{more}")

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``(D0, D1, D2)``, shared by every volume of the dataset."""
        if self._spacing is None:
            if not self.subjects:
                raise InputError("empty split: no subject to read the spacing from")
            self.load(self.subjects[0], self.fixed)
        return tuple(float(s) for s in self._spacing)

    def _check_geometry(self, subject: str, vol) -> None:
        if self._spacing is None:
            self._spacing, self._spacing_src = vol.spacing, vol.path
        elif not np.allclose(vol.spacing, self._spacing, atol=1e-3):
            raise InputError(f"{vol.path}: voxel spacing {np.round(vol.spacing, 4).tolist()} mm "
                             f"differs from {np.round(self._spacing, 4).tolist()} mm of "
                             f"{self._spacing_src}; resample the dataset to one spacing")
        first = self._shape.setdefault(subject, (vol.shape, vol.path))
        if first[0] != vol.shape:
            raise InputError(f"{vol.path}: shape {vol.shape} differs from {first[0]} of "
                             f"{first[1]} (same subject)")

    def _finish(self, x: torch.Tensor, key: tuple[str, str]) -> torch.Tensor:
        x = x[None]  # (D0, D1, D2) -> (1, D0, D1, D2)
        if self.grid is not None:
            x = crop_or_pad(x, self.grid)[0].contiguous()
        if self.cache:
            self._cache[key] = x
        return x

    def load(self, subject: str, modality: str) -> torch.Tensor:
        """One image, preprocessed.

        Reads ``image_path(subject, modality)`` (canonical RAS+), applies the modality's CT
        window when ``windows`` names it, min-max normalises to [0, 1], and crop/pads to
        ``grid``. Cached tensors are shared: do not modify them in place.

        Returns:
            ``float32`` tensor ``(1, D0, D1, D2)``.
        Raises:
            InputError: missing or bad file (see :func:`mambamorph.io.read_volume`), spacing or
                shape that differs from the rest of the dataset / subject.
        """
        key = (str(subject), str(modality))
        if key in self._cache:
            return self._cache[key]
        vol = read_volume(self.image_path(*key))
        self._check_geometry(key[0], vol)
        x = vol.data
        if key[1] in self.windows:
            x = ct_window(x, *self.windows[key[1]])
        return self._finish(minmax(x), key)

    def load_seg(self, subject: str) -> torch.Tensor:
        """The subject's label map as compact ROI indices (hemispheres merged, table checked).

        Returns:
            ``uint8`` tensor ``(1, D0, D1, D2)`` of values 0..16 (see
            :func:`mambamorph.labels.to_roi_index`), crop/padded to ``grid``.
        Raises:
            InputError: missing or bad file (see :func:`mambamorph.io.read_labels`), ids outside
                the 16-ROI table, shape that differs from the subject's images.
        """
        key = (str(subject), "seg")
        if key in self._cache:
            return self._cache[key]
        vol = read_labels(self.seg_path(key[0]), check_table=True, merge_hemispheres=True)
        self._check_geometry(key[0], vol)
        return self._finish(_labels.to_roi_index(vol.data), key)

    def pair(self, moving_id: str, fixed_id: str) -> dict:
        """The pair ``moving`` modality of ``moving_id`` -> ``fixed`` modality of ``fixed_id``.

        Returns:
            dict with ``moving``, ``fixed`` (float32 ``(1, D0, D1, D2)``), ``moving_seg``,
            ``fixed_seg`` (uint8 ``(1, D0, D1, D2)`` ROI indices; absent when the dataset
            has no labels, :attr:`has_labels`), ``moving_id``, ``fixed_id``.
        Raises:
            InputError: bad files, or the two subjects differ in shape (give a ``grid``).
        """
        out = {"moving": self.load(moving_id, self.moving),
               "fixed": self.load(fixed_id, self.fixed),
               "moving_id": str(moving_id), "fixed_id": str(fixed_id)}
        if self.has_labels:
            out["moving_seg"] = self.load_seg(moving_id)
            out["fixed_seg"] = self.load_seg(fixed_id)
        if out["moving"].shape != out["fixed"].shape:
            raise InputError(f"subjects {moving_id} and {fixed_id}: shapes "
                             f"{tuple(out['moving'].shape[1:])} and "
                             f"{tuple(out['fixed'].shape[1:])} differ; give a common grid")
        return out

    def random_pair_ids(self, rng: np.random.Generator) -> tuple[str, str]:
        """Draw ``(moving_id, fixed_id)``, two different subjects of the split, uniformly."""
        n = len(self.subjects)
        if n < 2:
            raise InputError(f"inter-subject pairs need at least 2 subjects, the split has {n}")
        i = int(rng.integers(n))
        j = int(rng.integers(n - 1))
        return self.subjects[i], self.subjects[j + (j >= i)]

    def random_pair(self, rng: np.random.Generator) -> dict:
        """A random inter-subject pair (see :meth:`pair`), drawn with ``rng``."""
        return self.pair(*self.random_pair_ids(rng))

    def pairs(self, pairs: Iterable[tuple[str, str]]) -> Iterator[dict]:
        """Yield :meth:`pair` for each ``(moving_id, fixed_id)`` (e.g. :func:`test_pairs`)."""
        for m, f in pairs:
            yield self.pair(m, f)


class SRRegDataset(_PairSource):
    """A folder in the SR-Reg layout (SR-Reg itself or the phantom).

    Layout: ``vol/{id}_{modality}.nii.gz`` (``mr``, ``ct``, optional ``t2``; ``.nii`` also
    accepted) and ``seg/{id}.nii.gz`` (one label map per subject, shared by its modalities).

    Args:
        root: the dataset folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        split_file: split JSON; default ``root/split.json``, created with
            :func:`default_split_sizes` (150/10/20 for 180 subjects) and ``seed`` when absent.
        seed: seed of a newly created split (an existing file is used as it is).
        moving, fixed: modality names.
        grid: crop/pad every volume to this ``(S0, S1, S2)``; ``None`` keeps the stored shape.
        cache: keep loaded tensors in memory (4 bytes per voxel per image, 1 per label map:
            28 MB per image at 176x208x192, about 63 MB per subject with two modalities).
        windows: ``{modality: (level, width)}`` CT windows (HU) applied before min-max, e.g.
            ``{"ct": (40, 80)}`` for CTs stored in Hounsfield units.
    Raises:
        InputError: missing folder, split file or file of a subject of the split (named),
            malformed split, bad ``grid``.
    """

    _VOL = re.compile(r"^(?P<id>.+)_(?P<mod>[A-Za-z0-9]+)\.nii(\.gz)?$")

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 split_file: str | os.PathLike | None = None, seed: int = 0, moving: str = "mr",
                 fixed: str = "ct", grid: Sequence[int] | None = None, cache: bool = True,
                 windows: Mapping[str, tuple[float, float]] | None = None) -> None:
        super().__init__(moving, fixed, grid, cache, windows)
        self.root = Path(root)
        for d in (self.root, self.root / "vol", self.root / "seg"):
            if not d.is_dir():
                raise InputError(f"{d}: folder not found (expected the SR-Reg layout "
                                 f"vol/{{id}}_{{mr,ct}}.nii.gz, seg/{{id}}.nii.gz)")
        if split_file is not None:
            self.split = read_split(split_file)
            source = str(split_file)
        else:
            source = str(self.root / "split.json")
            ids = sorted({m["id"] for f in (self.root / "vol").iterdir()
                          if (m := self._VOL.match(f.name))})
            if not (self.root / "split.json").exists():
                for s in ids:
                    if not self.seg_path(s).is_file():
                        raise InputError(f"{self.seg_path(s)}: file not found (subject {s} has "
                                         "images but no label map)")
            self.split = _open_or_create_split(self.root / "split.json", ids, seed)
        self.split_name = split
        self.subjects = _split_ids(self.split, split, source)
        self._check_files()

    def _find(self, base: Path) -> Path:
        gz = base.with_name(base.name + ".nii.gz")
        plain = base.with_name(base.name + ".nii")
        return plain if (not gz.is_file() and plain.is_file()) else gz

    def image_path(self, subject: str, modality: str) -> Path:
        """``vol/{subject}_{modality}.nii.gz`` (or ``.nii`` when only that exists)."""
        return self._find(self.root / "vol" / f"{subject}_{modality}")

    def seg_path(self, subject: str) -> Path:
        """``seg/{subject}.nii.gz`` (or ``.nii`` when only that exists)."""
        return self._find(self.root / "seg" / str(subject))


class ManifestDataset(_PairSource):
    """Subjects listed in a CSV: a ``subject`` column, one column per modality, and ``seg``.

    The ``seg`` column is optional: without it the dataset has no labels
    (:attr:`has_labels` is False), which unsupervised training (an image-similarity loss)
    accepts and label-based losses and evaluation refuse.

    Cells hold file paths, absolute or relative to the CSV's folder; any two modality columns
    form the moving/fixed pair (IXI T1 -> T2: ``moving="t1", fixed="t2"``). An optional
    ``split`` column (``train``/``val``/``test``) defines the split; otherwise ``split_file`` or
    the default ``<csv folder>/<csv stem>_split.json`` (created when absent, as in
    :class:`SRRegDataset`) does.

    Args:
        csv_path: the manifest.
        split, split_file, seed, moving, fixed, grid, cache, windows: as :class:`SRRegDataset`.
    Raises:
        InputError: missing/unreadable CSV, missing ``subject``/``seg``/modality column,
            duplicate or unknown subjects, empty cells or missing files for the split.
    """

    def __init__(self, csv_path: str | os.PathLike, split: str = "train",
                 split_file: str | os.PathLike | None = None, seed: int = 0, moving: str = "mr",
                 fixed: str = "ct", grid: Sequence[int] | None = None, cache: bool = True,
                 windows: Mapping[str, tuple[float, float]] | None = None) -> None:
        super().__init__(moving, fixed, grid, cache, windows)
        self.csv_path = p = Path(csv_path)
        if not p.is_file():
            raise InputError(f"{p}: manifest not found")
        try:
            with open(p, newline="", encoding="utf-8-sig") as fh:
                rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()}
                        for r in csv.DictReader(fh)]
                fh.seek(0)
                header = [c.strip() for c in next(csv.reader(fh), [])]
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"{p}: unreadable CSV ({e})") from None
        self.has_labels = "seg" in header
        for col in ("subject", self.moving, self.fixed):
            if col not in header:
                raise InputError(f"{p}: no column {col!r} (columns: {header})")
        self.rows = {}
        for r in rows:
            sid = r["subject"]
            if not sid:
                raise InputError(f"{p}: a row has an empty 'subject'")
            if sid in self.rows:
                raise InputError(f"{p}: subject {sid!r} is listed twice")
            self.rows[sid] = r
        if not self.rows:
            raise InputError(f"{p}: no subjects")
        if split_file is not None:
            self.split, source = read_split(split_file), str(split_file)
        elif "split" in header:
            bad = sorted({r["split"] for r in self.rows.values()} - set(SPLITS))
            if bad:
                raise InputError(f"{p}: 'split' column values must be {SPLITS}, got {bad}")
            self.split = {"seed": None, **{s: sorted(i for i, r in self.rows.items()
                                                     if r["split"] == s) for s in SPLITS}}
            source = str(p)
        else:
            sp = p.with_name(p.stem + "_split.json")
            self.split, source = _open_or_create_split(sp, sorted(self.rows), seed), str(sp)
        self.split_name = split
        self.subjects = _split_ids(self.split, split, source)
        unknown = [s for s in self.subjects if s not in self.rows]
        if unknown:
            raise InputError(f"{source}: subjects not in the manifest {p}: {unknown[:10]}")
        for s in self.subjects:
            for col in (self.moving, self.fixed) + (("seg",) if self.has_labels else ()):
                if not self.rows[s].get(col):
                    raise InputError(f"{p}: subject {s!r} has no {col!r} file")
        self._check_files()

    def _cell(self, subject: str, column: str) -> Path:
        row = self.rows.get(str(subject))
        if row is None:
            raise InputError(f"{self.csv_path}: no subject {subject!r}")
        if not row.get(column):
            raise InputError(f"{self.csv_path}: subject {subject!r} has no {column!r} file")
        f = Path(row[column]).expanduser()
        return f if f.is_absolute() else self.csv_path.parent / f

    def image_path(self, subject: str, modality: str) -> Path:
        """The manifest's ``modality`` cell of ``subject`` (relative to the CSV's folder)."""
        return self._cell(subject, modality)

    def seg_path(self, subject: str) -> Path:
        """The manifest's ``seg`` cell of ``subject``."""
        return self._cell(subject, "seg")


class PairDataset(torch.utils.data.IterableDataset):
    """Random inter-subject training pairs as a torch ``IterableDataset``.

    Iterating yields :meth:`SRRegDataset.pair` dicts drawn with
    ``numpy.random.default_rng([seed, epoch])``: a given seed and epoch give the same sequence,
    with or without ``DataLoader`` workers (worker ``w`` of ``W`` loads draws ``w, w + W, ...``
    of the one sequence, which the loader interleaves back in order). Use ``batch_size=None``
    or a collate that stacks the ``(1, D0, D1, D2)`` tensors.

    Args:
        source: an :class:`SRRegDataset` or :class:`ManifestDataset` (usually the train split).
        length: pairs per pass (epoch); ``None`` = endless.
        seed: integer seed.
    """

    def __init__(self, source: _PairSource, length: int | None = None, seed: int = 0) -> None:
        super().__init__()
        if length is not None and int(length) < 0:
            raise InputError(f"length must be >= 0, got {length}")
        self.source, self.length, self.seed, self.epoch = source, length, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the pair sequence of ``epoch`` (call before each pass for new pairs)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("endless PairDataset has no length")
        return int(self.length)

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch])
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k = 0
        while self.length is None or k < self.length:
            ids = self.source.random_pair_ids(rng)
            if k % n_workers == w:
                yield self.source.pair(*ids)
            k += 1


def open_dataset(data, split: str, seed: int = 0):
    """The dataset of one split (``"train"``, ``"val"`` or ``"test"``) for a
    :class:`mambamorph.config.DataConfig` (an SR-Reg layout folder or a CSV manifest)."""
    grid = tuple(data.grid) if data.grid else None
    if data.manifest:
        return ManifestDataset(data.manifest, split=split, moving=data.moving,
                                        fixed=data.fixed, grid=grid, seed=seed,
                                        split_file=data.split_file)
    if not data.root:
        raise InputError("no data: give a dataset folder (SR-Reg layout) or a CSV manifest; "
                         "`mambamorph data phantom` builds a phantom dataset folder")
    return SRRegDataset(data.root, split=split, split_file=data.split_file, seed=seed,
                                 moving=data.moving, fixed=data.fixed, grid=grid)
