"""One self-describing checkpoint format for every model: safetensors weights + a JSON config.

A checkpoint is a pair of files sharing a stem::

    best.safetensors   weights only (no grids, no pickles), optionally float16
    best.json          {"format": 1, "model": NAME, "config": {...}, "meta": {...}}

``load_model(path)`` rebuilds the model through the registry with ``build_model(NAME, **config)``
and loads the weights. Loading never unpickles. Writes are atomic (temporary file + rename).

Training state for ``--resume`` (optimizer moments, step, RNG states) is saved the same way
(:func:`save_train_state` / :func:`load_train_state`), again without pickle.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from mambamorph.errors import InputError
from mambamorph.io import atomic_write_bytes

FORMAT_VERSION = 1


def _stem(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(),
                       overwrite=True)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(path, data, overwrite=True)


def model_name_and_config(model: nn.Module) -> tuple[str, dict]:
    """The registry name and config dict of a model built by :func:`build_model`."""
    name = getattr(model, "registry_name", None)
    cfg = getattr(model, "config", None)
    if name is None or cfg is None or not dataclasses.is_dataclass(cfg):
        raise TypeError("model must be built by mambamorph.models.build_model "
                        "(it needs .registry_name and a dataclass .config)")
    return name, dataclasses.asdict(cfg)


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict | None = None,
               half: bool = False) -> Path:
    """Save ``model`` as ``<stem>.safetensors`` + ``<stem>.json`` atomically.

    Args:
        path: the stem, or either file name.
        model: a model built by ``build_model``.
        meta: JSON-serialisable extra information (training step, validation Dice, ...).
        half: store floating weights as float16 (they are cast back to float32 on load).
    Returns:
        The path of the ``.safetensors`` file.
    """
    stem = _stem(path)
    name, cfg = model_name_and_config(model)
    state = {}
    for k, v in model.state_dict().items():
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    weights = stem.with_suffix(".safetensors")
    _atomic_save_tensors(weights, state)
    atomic_write_json(stem.with_suffix(".json"), {
        "format": FORMAT_VERSION, "model": name, "config": cfg, "meta": meta or {}})
    return weights


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """Read the JSON side of a checkpoint. Raises InputError naming the file if unusable."""
    stem = _stem(path)
    jpath = stem.with_suffix(".json")
    wpath = stem.with_suffix(".safetensors")
    for p in (jpath, wpath):
        if not p.exists():
            raise InputError(f"{p}: checkpoint file not found (a checkpoint is a "
                             f".safetensors + .json pair)")
    try:
        info = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{jpath}: not a readable checkpoint description ({e})") from None
    if not isinstance(info, dict) or "model" not in info or "config" not in info:
        raise InputError(f"{jpath}: not a MambaMorph checkpoint description "
                         "(needs 'model' and 'config')")
    return info


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               **overrides) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint and load its weights (float32), in eval mode.

    Args:
        path: the stem or either file of a checkpoint pair.
        device: where to put the model.
        overrides: config fields to change at load (e.g. ``scan_impl``); must not change shapes.
    Returns:
        ``(model, info)`` where ``info`` is the JSON description (``meta`` included).
    Raises:
        InputError: missing/corrupt files, unknown model, or weights that do not fit the config.
    """
    from mambamorph.models import build_model

    info = read_checkpoint_info(path)
    stem = _stem(path)
    cfg = dict(info["config"])
    cfg.update(overrides)
    model = build_model(info["model"], **cfg)
    try:
        state = load_file(str(stem.with_suffix(".safetensors")))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise InputError(f"{stem.with_suffix('.safetensors')}: cannot read weights ({e})") from None
    ref = model.state_dict()
    state = {k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{stem.with_suffix('.safetensors')}: weights do not match model "
                         f"{info['model']!r}: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, info


# ----------------------------------------------------------------------------- training state
def save_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                     state: dict) -> None:
    """Save optimizer tensors (safetensors) and JSON-able training state atomically.

    Args:
        path: stem; writes ``<stem>.safetensors`` and ``<stem>.json``.
        optimizer: its per-parameter tensors are stored as ``opt.<index>.<key>``.
        state: JSON-serialisable dict (step, epoch, best metric, RNG states as lists, ...).
    """
    stem = _stem(path)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    for key, val in state.items():
        if isinstance(val, torch.Tensor):
            tensors[f"state.{key}"] = val
    _atomic_save_tensors(stem.with_suffix(".safetensors"), tensors)
    json_state = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    atomic_write_json(stem.with_suffix(".json"), {
        "format": FORMAT_VERSION, "param_groups": sd["param_groups"], "scalars": scalars,
        "state": json_state})


def load_train_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> dict:
    """Restore optimizer state saved by :func:`save_train_state`; return the training state."""
    stem = _stem(path)
    try:
        info = json.loads(stem.with_suffix(".json").read_text())
        tensors = load_file(str(stem.with_suffix(".safetensors")))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{stem}: cannot read the training state to resume from ({e})") from None
    opt_state: dict[int, dict] = {}
    state: dict[str, Any] = dict(info["state"])
    for key, val in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "opt":
            idx, name = rest.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = val
        else:
            state[rest] = val
    for idx, sc in info.get("scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(sc)
    optimizer.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
    return state
