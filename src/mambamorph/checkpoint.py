"""One self-describing checkpoint format for every model: safetensors weights + a JSON config.

A checkpoint is a pair of files sharing a stem::

    best.safetensors   weights only (no grids, no pickles), optionally float16
    best.json          {"format": 1, "model": NAME, "config": {...}, "meta": {...}}

``load_model(path)`` rebuilds the model through the registry with ``build_model(NAME, **config)``
and loads the weights. Loading never unpickles. Writes are atomic (temporary file + rename).

The training state for ``--resume`` (weights, optimizer moments, RNG states, counters) is saved
without pickle too, as one tensor file written by one rename plus a JSON record naming it
(:func:`save_train_state` / :func:`load_train_state`), so a run killed at any moment leaves a
complete state behind.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from mambamorph.errors import InputError
from mambamorph.io import atomic_write_bytes

FORMAT_VERSION = 1
TRAIN_STATE_FORMAT = 2

log = logging.getLogger(__name__)


def checkpoint_stem(path: str | os.PathLike) -> Path:
    """The stem shared by a checkpoint's two files: ``run/checkpoints/best`` for
    ``best.safetensors``, ``best.json`` or ``best`` itself (any other suffix is kept)."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(),
                       overwrite=True)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor],
                         metadata: dict[str, str] | None = None) -> None:
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)
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
        meta: JSON-serialisable extra information (training step, validation Dice, ...);
            ``meta["step"]``, when given, is also recorded in the weights file's metadata.
        half: store floating weights as float16 (they are cast back to float32 on load).
    Returns:
        The path of the ``.safetensors`` file.
    """
    stem = checkpoint_stem(path)
    name, cfg = model_name_and_config(model)
    state = {}
    for k, v in model.state_dict().items():
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v
    weights = stem.with_suffix(".safetensors")
    step = (meta or {}).get("step")
    _atomic_save_tensors(weights, state, None if step is None else {"step": str(step)})
    atomic_write_json(stem.with_suffix(".json"), {
        "format": FORMAT_VERSION, "model": name, "config": cfg, "meta": meta or {}})
    return weights


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """Read the JSON side of a checkpoint. Raises InputError naming the file if unusable."""
    stem = checkpoint_stem(path)
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
    stem = checkpoint_stem(path)
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
def _train_state_tensors(stem: Path, step: int) -> Path:
    return stem.with_name(f"{stem.name}-{int(step):08d}.safetensors")


def save_train_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                     state: dict) -> Path:
    """Save everything ``--resume`` needs so that a kill at any moment leaves a complete state.

    Two atomic writes: first ``<stem>-<step>.safetensors`` (the model weights as ``model.<key>``,
    the optimizer tensors as ``opt.<index>.<key>``, the tensor values of ``state`` as
    ``state.<key>``; the step in the file's metadata), then ``<stem>.json``, the record that names
    that file and holds the rest (step, optimizer hyper-parameters, JSON-able ``state``). The
    record is the commit point: until it is replaced, it names the previous tensor file, which
    is deleted only afterwards.

    Args:
        path: stem, e.g. ``run/checkpoints/last_state``.
        model: the model being trained.
        optimizer: its optimizer.
        state: ``{"step": int, ...}``: JSON-serialisable values (counters, numpy RNG state) and
            tensors (torch RNG states).
    Returns:
        The path of the JSON record.
    Raises:
        WriteError: a file could not be written (full disk, vanished folder); the previous
            state is then still complete.
    """
    stem = checkpoint_stem(path)
    step = int(state["step"])
    sd = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
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
    tpath = _train_state_tensors(stem, step)
    _atomic_save_tensors(tpath, tensors, {"step": str(step)})
    record = stem.with_suffix(".json")
    atomic_write_json(record, {
        "format": TRAIN_STATE_FORMAT, "step": step, "tensors": tpath.name,
        "param_groups": sd["param_groups"], "scalars": scalars,
        "state": {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}})
    # superseded tensor files (and the optimizer file of the first format)
    for old in [*stem.parent.glob(f"{stem.name}-*.safetensors"), stem.with_suffix(".safetensors")]:
        if old.name != tpath.name and old.exists():
            try:
                old.unlink()
            except OSError as e:  # only a stale copy: the record names the new file
                log.warning("%s: cannot delete a superseded training state (%s)", old, e)
    return record


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises several types for missing or corrupt files
        raise InputError(f"{path}: cannot read the training state to resume from ({e})") from None


def load_train_state(path: str | os.PathLike, model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> dict:
    """Restore the weights and optimizer saved by :func:`save_train_state`; return the state.

    The step recorded in the JSON record and in the tensor file it names must agree. A state
    saved by the first format (weights in the sibling ``last`` checkpoint, optimizer tensors in
    ``<stem>.safetensors``, written by separate renames) is accepted when the steps of its
    files agree.

    Args:
        path: stem, e.g. ``run/checkpoints/last_state``.
        model, optimizer: built as for the saved run; loaded in place.
    Returns:
        The ``state`` dict given to :func:`save_train_state` (tensors included).
    Raises:
        InputError: missing or unreadable files, files whose steps disagree (a state written
            half by an interrupted save), weights that do not fit ``model``.
    """
    stem = checkpoint_stem(path)
    record = stem.with_suffix(".json")
    try:
        info = json.loads(record.read_text())
        state: dict[str, Any] = dict(info["state"])
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{record}: cannot read the training state to resume from "
                         f"({type(e).__name__}: {e})") from None
    if info.get("format") == TRAIN_STATE_FORMAT:
        tpath = stem.parent / str(info.get("tensors"))
        tensors, meta = _read_tensors(tpath)
        steps = {tpath: meta.get("step")}
    else:  # format 1: weights in the `last` checkpoint, written by a separate rename
        tpath = stem.with_suffix(".safetensors")
        tensors, _ = _read_tensors(tpath)
        weights = stem.parent / "last.safetensors"
        steps = {stem.parent / "last.json": read_checkpoint_info(weights).get("meta", {})
                 .get("step")}
        tensors.update({f"model.{k}": v for k, v in _read_tensors(weights)[0].items()})
    for p, s in steps.items():
        if s is None or int(s) != step:
            raise InputError(f"{p}: holds step {s}, but {record} records step {step}; the "
                             "training state was only partly saved and cannot be resumed "
                             "exactly")
    weights_sd: dict[str, torch.Tensor] = {}
    opt_state: dict[int, dict] = {}
    for key, val in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "model":
            weights_sd[rest] = val
        elif kind == "opt":
            idx, name = rest.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = val
        else:
            state[rest] = val
    for idx, sc in info.get("scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(sc)
    ref = model.state_dict()
    weights_sd = {k: v.to(ref[k].dtype) if k in ref else v for k, v in weights_sd.items()}
    try:
        model.load_state_dict(weights_sd, strict=True)
        optimizer.load_state_dict({"state": opt_state, "param_groups": info["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"{tpath}: the saved training state does not fit this model: "
                         f"{str(e).splitlines()[0]}") from None
    return state


def shipped_weights(model: str, preset: str = "cpu") -> Path | None:
    """The checkpoint of ``model`` shipped inside the package (trained on the phantom at the
    ``preset`` grid; docs/weights.md says how), as a stem path, or None if none is shipped."""
    root = resources.files("mambamorph") / "weights"
    stem = f"phantom-{preset}-{model}"
    p = Path(str(root / f"{stem}.safetensors"))
    return checkpoint_stem(p) if p.exists() and p.with_suffix(".json").exists() else None
