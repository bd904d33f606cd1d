"""Typed settings for data and training, loadable from YAML (``yaml.safe_load`` only).

Precedence when the CLI resolves a run: dataclass defaults < YAML file (``--config``) < flags.
The resolved config is written into the run folder as ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
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


@dataclass
class TrainConfig:
    """The paper's recipe by default (SPEC.md section 4); every field can be overridden.

    Attributes:
        model: registry name (``mambamorph``, ``voxelmorph``, ...).
        model_args: overrides passed to ``build_model`` (e.g. ``{"residual": True}``).
        lr: Adam learning rate (paper: 1e-4).
        epochs: number of epochs (paper: 100).
        steps_per_epoch: random pairs per epoch; ``None`` = number of training subjects (150 on
            SR-Reg, as the paper).
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
        val_pairs: number of fixed validation pairs scored (Dice) after each epoch.
        seed: seeds the pair sampler, torch and numpy; CPU runs are repeatable.
        device: ``auto`` (CUDA if present), ``cpu`` or ``cuda[:i]``.
        amp: mixed precision (bfloat16/float16 autocast) on CUDA; ignored on CPU.
        init: checkpoint to start from (warm start / fine-tuning); the model name must match.
        max_minutes: stop (and save) once this wall-clock budget is spent; ``None`` = no limit.
        threads: torch CPU threads (``None`` = torch's default).
        log_every: steps between CSV/TensorBoard rows.
    """

    model: str = "mambamorph"
    model_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    lr: float = 1e-4
    epochs: int = 100
    steps_per_epoch: int | None = None
    dice_weight: float = 1.0
    dice_scales: list[int] = field(default_factory=lambda: [1])
    smooth_weight: float = 0.2
    synthetic: float = 0.0
    synthetic_voxels: float = 5.0
    flow_weight: float = 1.0
    crop: list[int] | None = None
    val_pairs: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    init: str | None = None
    max_minutes: float | None = None
    threads: int | None = None
    log_every: int = 10


def _from_dict(cls, d: dict, source: str):
    if not isinstance(d, dict):
        raise InputError(f"{source}: expected a mapping for {cls.__name__}, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise InputError(f"{source}: unknown setting(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    kw = {}
    for k, v in d.items():
        if k == "data" and cls is TrainConfig:
            v = _from_dict(DataConfig, v or {}, source)
        kw[k] = v
    return cls(**kw)


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``None`` skipped).

    ``overrides`` may use dotted keys for data fields (``{"data.root": "..."}``).

    Raises:
        InputError: unreadable/invalid YAML or unknown keys, naming the file.
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
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping for data, got {type(data).__name__}")
    data = dict(data)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k.startswith("data."):
            data[k[5:]] = v
        else:
            raw[k] = v
    raw["data"] = data
    return _from_dict(TrainConfig, raw, source)


def dump_yaml(cfg) -> str:
    """YAML text of a (nested) dataclass config."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
