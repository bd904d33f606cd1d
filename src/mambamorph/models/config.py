"""The base of every model config: options from keyword overrides, typed values, range checks.

Each model file holds one dataclass config derived from :class:`ModelConfig`. The base gives
them all the same rules:

- :meth:`ModelConfig.from_overrides` is the only way user options reach a config
  (``build_model(name, **overrides)``): an unknown option is an :class:`InputError` that names it
  and lists the valid ones; a config with :attr:`ModelConfig.PRESETS` also accepts
  ``config=NAME`` to start from a named preset.
- Every value is checked against its field's annotation at construction (``int``, ``float``,
  ``bool``, ``str | None``, ``tuple[int, ...]``, ``tuple[int, int, int]``): JSON and YAML lists
  become tuples, an ``int`` is accepted where a ``float`` is expected, a string such as ``"1e-4"``
  (what PyYAML reads for that literal) is accepted as the float it spells; NaN, infinities and
  anything else are an :class:`InputError` naming the option.
- Then :meth:`ModelConfig.problems` (one per model) yields every inconsistent or out-of-range
  value; they are reported together as one :class:`InputError`. :func:`at_least` and
  :func:`token_stage_problems` (the checks the Swin-style models share) help write it.
"""

from __future__ import annotations

import math
import numbers
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, ClassVar

from mambamorph.errors import InputError

__all__ = ["ModelConfig", "at_least", "token_stage_problems"]


@dataclass
class ModelConfig:
    """Base class of the model configs (a dataclass; subclasses add the fields).

    Class attributes:
        NAME: model family named in error messages (``"mambamorph"``, ...).
        PRESETS: named sets of field values selectable with ``config=NAME`` in
            :meth:`from_overrides` (empty: no presets, and ``config`` is not an option).

    Raises:
        InputError: at construction, a value of the wrong type or any of :meth:`problems`.
    """

    NAME: ClassVar[str] = "model"
    PRESETS: ClassVar[Mapping[str, Mapping[str, Any]]] = {}

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(self.NAME, f.name, getattr(self, f.name), hints[f.name]))
        found = list(self.problems())
        if found:
            raise InputError(f"{self.NAME} config: {'; '.join(found)}")

    def problems(self) -> Iterator[str]:
        """Inconsistent or out-of-range values, one message each (the base checks none)."""
        return iter(())

    @classmethod
    def option_names(cls) -> list[str]:
        """Every option :meth:`from_overrides` accepts, sorted (``config`` if there are presets)."""
        names = {f.name for f in fields(cls)}
        if cls.PRESETS:
            names.add("config")
        return sorted(names)

    @classmethod
    def from_overrides(cls, **overrides: Any) -> "ModelConfig":
        """Build a config from keyword overrides of the defaults.

        ``config=NAME`` (only where :attr:`PRESETS` is not empty) starts from that preset; it
        cannot be combined with explicit values of the fields the preset sets. ``config=None``
        is the same as leaving it out.

        Raises:
            InputError: an unknown option (named, with the valid ones listed), an unknown preset,
                a preset clashing with explicit values, or a bad value.
        """
        unknown = sorted(set(overrides) - set(cls.option_names()))
        if unknown:
            raise InputError(f"{cls.NAME}: unknown option(s) {', '.join(unknown)}; valid "
                             f"options: {', '.join(cls.option_names())}")
        overrides = dict(overrides)
        preset = overrides.pop("config", None)  # None: no preset
        if preset is not None:
            if not isinstance(preset, str) or preset not in cls.PRESETS:
                raise InputError(f"{cls.NAME}: unknown config {preset!r}; known: "
                                 f"{', '.join(cls.PRESETS)}")
            clash = sorted(set(cls.PRESETS[preset]) & set(overrides))
            if clash:
                raise InputError(f"{cls.NAME}: give either config={preset!r} or "
                                 f"{', '.join(clash)}, not both")
            overrides = {**cls.PRESETS[preset], **overrides}
        return cls(**overrides)


def at_least(cfg: ModelConfig, minimum: int, *names: str) -> Iterator[str]:
    """Messages for the fields ``names`` of ``cfg`` whose value is below ``minimum``."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            yield f"{name} must be >= {minimum}, got {value}"


def token_stage_problems(cfg: ModelConfig) -> Iterator[str]:
    """Checks shared by the window-attention configs (TransMorph, XMorpher).

    Reads the fields ``embed_dim`` (even, >= 2; level ``i`` is ``embed_dim * 2**i`` wide),
    ``depths`` and ``num_heads`` (non-empty, of equal length, >= 1, every level width divisible by
    its heads), ``window_size`` (positive), ``patch_size`` (>= 1), ``mlp_ratio`` (> 0) and
    ``drop_path_rate`` (in ``[0, 1)``).
    """
    if cfg.embed_dim < 2 or cfg.embed_dim % 2:
        yield f"embed_dim must be even and >= 2, got {cfg.embed_dim}"
    if not cfg.depths or len(cfg.depths) != len(cfg.num_heads):
        yield (f"depths {cfg.depths} and num_heads {cfg.num_heads} must be non-empty and of "
               f"equal length")
    elif min(cfg.depths) < 1 or min(cfg.num_heads) < 1:
        yield "depths and num_heads must be >= 1"
    elif cfg.embed_dim >= 1 and any((cfg.embed_dim << i) % h
                                    for i, h in enumerate(cfg.num_heads)):
        widths = [cfg.embed_dim << i for i in range(len(cfg.depths))]
        yield f"level widths {widths} must divide by num_heads {cfg.num_heads}"
    if min(cfg.window_size) < 1:
        yield f"window_size must be positive, got {cfg.window_size}"
    if cfg.patch_size < 1:
        yield f"patch_size must be >= 1, got {cfg.patch_size}"
    if cfg.mlp_ratio <= 0:
        yield f"mlp_ratio must be > 0, got {cfg.mlp_ratio}"
    if not 0 <= cfg.drop_path_rate < 1:
        yield f"drop_path_rate must be in [0, 1), got {cfg.drop_path_rate}"


@lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    # the model files use ``from __future__ import annotations``: resolve the strings once
    return typing.get_type_hints(cls)


def _coerce(model: str, name: str, value: Any, tp: Any) -> Any:
    """``value`` as the annotation ``tp`` wants it, or :class:`InputError` naming the option."""
    try:
        return _as_type(value, tp)
    except (TypeError, ValueError) as e:
        raise InputError(f"{model} config: {name}: expected {e}, got {value!r}") from None


def _as_type(value: Any, tp: Any) -> Any:
    """Convert ``value`` to ``tp``; raises ``TypeError(description of tp)`` when it cannot."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _as_type(value, option)
            except (TypeError, ValueError):
                pass
        raise TypeError(" or ".join(_describe(a) for a in args))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(_describe(tp))
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(value) != len(items):
            raise TypeError(_describe(tp))
        try:
            return tuple(_as_type(v, a) for v, a in zip(value, items))
        except TypeError:
            raise TypeError(_describe(tp)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        number = math.nan
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # an annotation this base does not know: a programming error, not a user's
        raise RuntimeError(f"ModelConfig cannot check values of type {tp!r}")
    raise TypeError(_describe(tp))


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "a boolean", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null"}.get(tp, repr(tp))
