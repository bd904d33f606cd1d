"""Typed settings for data and training, loadable from YAML (``yaml.safe_load`` only).

Precedence when the CLI resolves a run: dataclass defaults < YAML file (``--config``) < flags.
The resolved config is written into the run folder as ``config.yaml``.

Every value is checked against its option's type, from a file and in Python alike: a number
written as a string (PyYAML reads ``lr: 1e-4`` as the string ``"1e-4"``) becomes the number
meant; anything else that does not fit (``epochs: ten``, ``amp: 1``, ``grid: 96``) is refused
with an :class:`~mambamorph.errors.InputError` naming the file and the option.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mambamorph.errors import InputError


@dataclass
class DataConfig:
    """Where the training pairs come from.

    Attributes:
        root: an SR-Reg-layout folder (``vol/``, ``seg/``, ``split.json``): SR-Reg itself or a
            phantom built by ``mambamorph data phantom``.
        manifest: a CSV manifest (subject, one column per modality, seg) instead of ``root``.
        moving, fixed: modality names (``mr``/``ct``/``t2`` for SR-Reg layouts; CSV column
            names for a manifest).
        grid: crop/pad every volume to this array shape (dims divisible by 16); ``None`` keeps the
            stored shape (which must then divide by 16).
        split_file: explicit split JSON; default ``<root>/split.json``.
    """

    root: str | None = None
    manifest: str | None = None
    moving: str = "mr"
    fixed: str = "ct"
    grid: list[int] | None = None
    split_file: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self, type(self).__name__)


@dataclass
class TrainConfig:
    """Training settings; the defaults are the ``default`` recipe (see docs/weights.md):
    MIND-SSD image similarity + label Dice at label scales 1, 2, 4, smoothness 1.0 on the
    velocity, Adam 1e-4, and no checkpoint kept as best whose validation fields compress more
    than 0.5 % of the brain below J = 0.2. ``recipe="paper"`` (through
    :func:`load_train_config`) gives the paper's (SPEC.md section 4). Every field can be
    overridden.

    Attributes:
        recipe: the named recipe whose values :func:`load_train_config` starts from
            (:data:`RECIPES`): ``default`` (these dataclass defaults) or ``paper`` (the paper's
            loss and settings, used by the reproduction rows).
        model: registry name (``mambamorph``, ``voxelmorph``, ...).
        model_args: overrides passed to ``build_model`` (e.g. ``{"residual": True}``).
        lr: Adam learning rate (paper: 1e-4).
        epochs: number of epochs (paper: 100).
        steps_per_epoch: steps (optimizer updates, each on ``batch_size`` random pairs) per
            epoch; ``None`` = number of training subjects (150 on SR-Reg, as the paper).
        batch_size: pairs per step and per process; the loss is the mean of the pairs' losses
            (their gradients are averaged). Under ``torchrun`` with N processes a step sees
            N x batch_size pairs (DDP averages the gradients over the processes too), so the
            effective batch is N x batch_size; the learning rate is not scaled.
        loss: the training loss's data terms, joined by ``+`` (see
            :func:`mambamorph.losses.parse_loss`): ``image`` (MIND-SSD across modalities,
            LNCC within one), ``mind``, ``lncc``, ``mi`` and ``dice`` (label Dice); e.g.
            ``image+dice``, or ``image`` alone for data without label maps. The smoothness term
            is always added.
        image_weight: weight of the image term.
        image_scales: image pyramid of the image term (``[1]``: full resolution only; e.g.
            ``[1, 2, 4]`` also compares average-pooled images, a wider capture range; see
            :func:`mambamorph.losses.multiscale_image_loss`).
        dice_weight: weight of the soft Dice loss of the warped one-hot ROIs.
        dice_scales: label pyramid of that Dice term (``[1]`` = the paper's loss; e.g.
            ``[1, 2, 4]`` also scores average-pooled labels, a wider capture range; see
            :func:`mambamorph.losses.multiscale_label_dice_loss`).
        smooth_weight: weight of the l2 gradient of the velocity (paper: 0.1 x 2 = 0.2).
        synthetic: fraction of steps that train on an intra-subject pair with a known random
            smooth deformation (moving modality -> the same subject's fixed modality warped),
            adding ``flow_weight`` x the squared error to the known field; 0 = the paper.
        synthetic_voxels: largest velocity component of those fields, in voxels (each pair draws
            its own in ``[synthetic_voxels / 4, synthetic_voxels]``).
        flow_weight: weight of that squared error.
        crop: train on random crops of this size (dims divisible by 16) instead of whole
            volumes: cheaper steps; validation and inference use whole volumes.
        val_pairs: number of fixed validation pairs scored after each epoch (Dice where
            labels exist, SDlogJ, % of the brain compressed below J = 0.2, the image term).
        max_compressed: a checkpoint whose validation fields compress more than this % of the
            brain below J = 0.2 is never kept as ``best``, whatever its Dice (100 = no gate).
        max_sdlogj: likewise for the validation SDlogJ (``None`` = no gate; the shipped
            ``mambamorph`` weights were chosen with 0.2, docs/weights.md).
        seed: seeds the pair sampler, torch and numpy; CPU runs are repeatable.
        device: ``auto`` (CUDA if present), ``cpu`` or ``cuda[:i]``.
        amp: mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU.
        init: checkpoint to start from (warm start / fine-tuning); the model name must match.
        max_minutes: stop (and save) once this wall-clock budget is spent; ``None`` = no limit.
        threads: torch CPU threads (``None`` = torch's default).
        log_every: steps between CSV/TensorBoard rows.
    """

    recipe: str = "default"
    model: str = "mambamorph"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    lr: float = 1e-4
    epochs: int = 100
    steps_per_epoch: int | None = None
    batch_size: int = 1
    loss: str = "image+dice"
    image_weight: float = 1.0
    image_scales: list[int] = field(default_factory=lambda: [1])
    dice_weight: float = 1.0
    dice_scales: list[int] = field(default_factory=lambda: [1, 2, 4])
    smooth_weight: float = 1.0
    synthetic: float = 0.0
    synthetic_voxels: float = 5.0
    flow_weight: float = 1.0
    crop: list[int] | None = None
    val_pairs: int = 10
    max_compressed: float = 0.5
    max_sdlogj: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    init: str | None = None
    max_minutes: float | None = None
    threads: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        _check_fields(self, type(self).__name__)


#: Named recipes: values laid over the dataclass defaults before a YAML file and flags.
#: ``default`` is the dataclass defaults themselves; ``paper`` is the paper's weakly supervised
#: recipe (label Dice + 0.2 x smoothness of the velocity, Adam 1e-4, 100 epochs; SPEC.md section 4).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"loss": "dice", "lr": 1e-4, "epochs": 100, "dice_weight": 1.0,
              "dice_scales": [1], "image_scales": [1], "smooth_weight": 0.2, "synthetic": 0.0,
              "max_compressed": 100.0},
}


# --------------------------------------------------------------------------- type checking
# limits beyond the type (checked after it), as (test, what the value must be)
_LIMITS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "a positive number"),
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "steps_per_epoch": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "log_every": (lambda v: v >= 1, "an integer >= 1"),
    "threads": (lambda v: v >= 1, "an integer >= 1"),
    "val_pairs": (lambda v: v >= 0, "an integer >= 0"),
    "max_compressed": (lambda v: 0 <= v <= 100, "a percentage between 0 and 100"),
    "max_sdlogj": (lambda v: v > 0, "a positive number"),
    "seed": (lambda v: v >= 0, "an integer >= 0"),
    "synthetic": (lambda v: 0 <= v <= 1, "a fraction between 0 and 1"),
    "synthetic_voxels": (lambda v: v >= 0, "a number >= 0"),
    "max_minutes": (lambda v: v >= 0, "a number >= 0"),
    "dice_weight": (lambda v: v >= 0, "a number >= 0"),
    "image_weight": (lambda v: v >= 0, "a number >= 0"),
    "recipe": (lambda v: v in RECIPES, f"one of {', '.join(RECIPES)}"),
    "loss": (lambda v: _valid_loss(v), "terms joined by '+' from image, mind, lncc, mi and "
             "dice, at most one image term (e.g. image+dice)"),
    "smooth_weight": (lambda v: v >= 0, "a number >= 0"),
    "flow_weight": (lambda v: v >= 0, "a number >= 0"),
    "dice_scales": (lambda v: len(v) >= 1 and min(v) >= 1, "a list of integers >= 1"),
    "image_scales": (lambda v: len(v) >= 1 and min(v) >= 1, "a list of integers >= 1"),
    "crop": (lambda v: len(v) == 3 and min(v) >= 1, "three positive integers"),
    "grid": (lambda v: len(v) == 3 and min(v) >= 1, "three positive integers"),
}


def _valid_loss(spec: str) -> bool:
    from mambamorph.losses import parse_loss

    try:
        parse_loss(spec)
    except InputError:
        return False
    return True


def _number(value) -> float | None:
    """``value`` as a finite float (a numeric string too); None when it is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _coerce(value, tp, key: str, source: str):
    """``value`` as option ``key`` of type ``tp`` wants it, or InputError naming ``source``."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = len(args) < len(typing.get_args(tp)), args[0]
        if value is None and optional:
            return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    out, what = None, ""
    if tp is float:
        out, what = _number(value), "a number"
    elif tp is int:
        num, what = _number(value), "an integer"
        if isinstance(value, int) and not isinstance(value, bool):
            out = value
        elif num is not None and num.is_integer():
            out = int(num)
    elif tp is bool:
        out, what = (value if isinstance(value, bool) else None), "true or false"
    elif tp is str:
        out, what = (os.fspath(value) if isinstance(value, (str, os.PathLike)) else None), \
            "a string"
    elif origin is list:
        what = "a list of integers" if args == (int,) else "a list"
        if isinstance(value, (list, tuple)):
            out = [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict or tp is dict:
        what = "a mapping of names to values"
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            out = dict(value)
    elif dataclasses.is_dataclass(tp):
        what = f"a mapping of {key} settings"
        if isinstance(value, tp):
            out = value
        elif isinstance(value, dict):
            out = tp(**_checked(tp, value, source, prefix=f"{key}."))
    else:  # pragma: no cover - a field type this checker does not know yet
        raise TypeError(f"config option {key}: unsupported type {tp}")
    if out is None:
        raise InputError(f"{source}: {key}: expected {what}{' or null' if optional else ''}, "
                         f"got {value!r}")
    rule = _LIMITS.get(key.rsplit(".", 1)[-1])
    if rule and not rule[0](out):
        raise InputError(f"{source}: {key}: expected {rule[1]}, got {value!r}")
    return out


def _checked(cls, d, source: str, prefix: str = "") -> dict:
    """The entries of mapping ``d`` checked (and numeric strings converted) against the fields
    of dataclass ``cls``; unknown names are refused."""
    if not isinstance(d, dict):
        raise InputError(f"{source}: expected a mapping for {prefix.rstrip('.') or cls.__name__},"
                         f" got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names, key=str)
    if unknown:
        raise InputError(f"{source}: unknown setting(s) "
                         f"{', '.join(prefix + str(k) for k in unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    return {k: _coerce(v, hints[k], prefix + k, source) for k, v in d.items()}


def _check_fields(obj, source: str) -> None:
    """Check (and convert in place) every field of a config dataclass instance."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for k, v in _checked(type(obj), values, source).items():
        setattr(obj, k, v)


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the recipe's values (``recipe`` of the overrides or the file, see
    :data:`RECIPES`), then the YAML file at ``path`` (if any), then ``overrides`` (``None``
    skipped).

    ``overrides`` may use dotted keys for data fields (``{"data.root": "..."}``). Every value is
    checked against its option's type (see the module docstring).

    Raises:
        InputError: unreadable/invalid YAML, unknown keys or values that do not fit their
            option, naming the file and the option.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise InputError(f"{p}: cannot read config ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise InputError(f"{p}: invalid YAML ({e})") from None
    source = str(path) if path is not None else "config"
    if not isinstance(raw, dict):
        raise InputError(f"{source}: expected a mapping of settings, got {type(raw).__name__}")
    raw = dict(raw)
    data = raw.pop("data", None) or {}
    file_data = _checked(DataConfig, data, source, prefix="data.")
    file_main = _checked(TrainConfig, raw, source)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    given_data = {k[5:]: given.pop(k) for k in list(given) if k.startswith("data.")}
    given_data = _checked(DataConfig, given_data, "given settings", prefix="data.")
    given = _checked(TrainConfig, given, "given settings")
    recipe = given.get("recipe", file_main.get("recipe", "default"))
    return TrainConfig(**{**RECIPES[recipe], **file_main, **given},
                       data=DataConfig(**{**file_data, **given_data}))


def dump_yaml(cfg) -> str:
    """YAML text of a (nested) dataclass config."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
