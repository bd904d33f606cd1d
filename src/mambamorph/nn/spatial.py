"""Spatial transforms of volumes and displacement fields: warp, integrate, resize, compose.

A functional core with two thin modules (:class:`SpatialTransformer`, :class:`VecInt`) that hold
no state. Conventions (see the package docstring for the axis legend):

- A displacement (or velocity) field ``u`` is ``(B, 3, D0, D1, D2)`` in **voxels**; channel ``i``
  is the displacement along array axis ``i``. The transform it describes is ``x -> x + u(x)``:
  warping an image ``I`` by ``u`` gives ``(I o (id + u))(x) = I(x + u(x))``.
- Sampling uses ``torch.nn.functional.grid_sample`` with ``align_corners=True``: voxel centre
  ``0`` and ``D - 1`` of an axis are the normalised coordinates ``-1`` and ``+1``.
- :func:`voxel_to_grid` is the ONLY place that converts voxel coordinates to ``grid_sample``'s
  normalised, axis-reversed convention. Nothing else in the package flips axes.
- Identity grids are computed from the input shape and cached per ``(shape, device, dtype)``;
  they are never module buffers, so checkpoints hold weights only and one model runs at any size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from mambamorph.errors import InputError

__all__ = [
    "identity_grid",
    "voxel_to_grid",
    "warp",
    "integrate_velocity",
    "resize_flow",
    "compose",
    "SpatialTransformer",
    "VecInt",
    "no_autocast", "in_work_dtype",
]

_MODES = ("bilinear", "nearest")
_PADDING_MODES = ("zeros", "border", "reflection")


@lru_cache(maxsize=8)
def _identity_grid_cached(shape: tuple[int, int, int], device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    # A cached tensor must be a normal tensor even when first requested inside
    # ``torch.inference_mode()`` (an inference tensor could not be used by autograd later).
    with torch.inference_mode(False), torch.no_grad():
        axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (3, D0, D1, D2)
    return grid


def identity_grid(shape: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel of a 3D grid.

    ``grid[i, x0, x1, x2] == x_i``. The result is cached per ``(shape, device, dtype)`` and shared
    between callers: treat it as read-only (every function here builds new tensors from it).

    Args:
        shape: ``(D0, D1, D2)``, positive integers.
        device: device of the grid (default: CPU).
        dtype: floating dtype of the grid.
    Returns:
        ``(3, D0, D1, D2)`` tensor of voxel coordinates (not requiring grad).
    Raises:
        ValueError: ``shape`` is not three positive integers or ``dtype`` is not floating.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"identity_grid: expected 3 positive sizes, got {shape}")
    if not dtype.is_floating_point:
        raise InputError(f"identity_grid: expected a floating dtype, got {dtype}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _identity_grid_cached(shape, dev, dtype)


@lru_cache(maxsize=8)
def _normalisation(sizes: tuple[int, ...], device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis ``(scale, offset)`` of :func:`voxel_to_grid`, each ``(1, 3, 1, 1, 1)``."""
    with torch.inference_mode(False), torch.no_grad():
        scale = torch.tensor([2.0 / max(n - 1, 1) for n in sizes], dtype=dtype, device=device)
        offset = torch.tensor([-1.0 if n > 1 else 0.0 for n in sizes], dtype=dtype,
                              device=device)
    return scale.view(1, 3, 1, 1, 1), offset.view(1, 3, 1, 1, 1)


def voxel_to_grid(points: torch.Tensor, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Convert voxel coordinates to ``grid_sample``'s normalised, axis-reversed coordinates.

    This is the single place where the package meets ``grid_sample``'s convention:

    - normalisation (``align_corners=True``): ``g = 2 * p / (D - 1) - 1``, so voxel ``0`` maps to
      ``-1`` and voxel ``D - 1`` to ``+1``. An axis of size 1 maps to ``0`` (its only voxel);
    - axis order: ``grid_sample`` reads the last dimension of its grid as ``(x, y, z)`` where ``x``
      indexes the LAST array axis (``D2``), ``y`` indexes ``D1`` and ``z`` indexes ``D0``. The
      channels are therefore reversed here: output ``[..., 0]`` is axis 2, ``[..., 2]`` is axis 0.

    Args:
        points: ``(B, 3, D0, D1, D2)`` absolute voxel coordinates (channel ``i`` along array axis
            ``i``) of the positions to sample, on a grid of shape ``(D0, D1, D2)``.
        shape: the spatial sizes of the image to be sampled, used for normalisation; default:
            those of ``points`` itself (the image and the points share one grid).
    Returns:
        ``(B, D0, D1, D2, 3)`` normalised coordinates in ``points``' dtype.
    Raises:
        ValueError: ``points`` is not ``(B, 3, D0, D1, D2)``.
    """
    if points.dim() != 5 or points.shape[1] != 3:
        raise InputError(f"voxel_to_grid: expected points (B, 3, D0, D1, D2), got "
                         f"{tuple(points.shape)}")
    sizes = tuple(points.shape[2:]) if shape is None else tuple(int(n) for n in shape)
    scale, offset = _normalisation(sizes, points.device, points.dtype)
    norm = points * scale + offset  # (B, 3, D0, D1, D2), channel i along axis i
    # (B, 3, D0, D1, D2) -> (B, D0, D1, D2, 3), then reverse to (x=D2, y=D1, z=D0)
    return norm.permute(0, 2, 3, 4, 1).flip(-1)


def no_autocast(device: torch.device):
    """A context that disables autocast on ``device`` (a no-op where autocast does not apply).

    Used around sums and grids over whole volumes, which float16 / bfloat16 would overflow or
    round away. Shared by this module and the losses.
    """
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def in_work_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors cast to their working precision (:func:`_work_dtype`): float64 if any is
    float64, else float32. Shared by the losses and the similarity measures."""
    dt = _work_dtype(*tensors)
    return [t.to(dt) for t in tensors]


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "zeros") -> torch.Tensor:
    """Warp an image by a displacement field: ``out(x) = image(x + flow(x))``.

    Sampling is ``grid_sample`` (trilinear for ``"bilinear"``) with ``align_corners=True``;
    points outside the volume read ``padding_mode`` (default zeros). On the CPU, an image that
    needs no gradient is sampled trilinearly with zero or border padding by the numba kernels
    of :mod:`mambamorph.nn.warp_cpu` instead (the same numbers to float rounding, gradient with
    respect to ``flow``; the result is then in channels-last memory). The grid is always computed
    in float32 (float64 if an input is float64) with autocast disabled, so the function is safe
    under float16 / bfloat16 autocast; gradients flow to both ``image`` and ``flow``.

    Args:
        image: ``(B, C, D0, D1, D2)``. Floating images come back in float32 (float64 if ``image``
            or ``flow`` is float64), the type autocast's promotion would give. Integer or bool
            images (label maps) are allowed with ``mode="nearest"`` only and keep their dtype.
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels on the same grid as ``image``. A batch
            of 1 on either side is broadcast against the other.
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
    Returns:
        Warped image ``(B, C, D0, D1, D2)``.
    Raises:
        ValueError: bad shapes (including a flow on a different grid than the image: resize it
            first with :func:`resize_flow`), an unknown mode, or a non-floating image with
            ``mode="bilinear"``.
    """
    if mode not in _MODES:
        raise InputError(f"warp: expected mode in {_MODES}, got {mode!r}")
    if padding_mode not in _PADDING_MODES:
        raise InputError(f"warp: expected padding_mode in {_PADDING_MODES}, got {padding_mode!r}")
    if image.dim() != 5:
        raise InputError(f"warp: expected image (B, C, D0, D1, D2), got {tuple(image.shape)}")
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise InputError(f"warp: expected flow (B, 3, D0, D1, D2), got {tuple(flow.shape)}")
    if image.shape[2:] != flow.shape[2:]:
        raise InputError(
            f"warp: expected the flow on the image grid {tuple(image.shape[2:])}, got "
            f"{tuple(flow.shape[2:])} (resize it with resize_flow first)")
    if not flow.dtype.is_floating_point:
        raise InputError(f"warp: expected a floating flow, got {flow.dtype}")
    nb_img, nb_flow = image.shape[0], flow.shape[0]
    if nb_img != nb_flow and 1 not in (nb_img, nb_flow):
        raise InputError(f"warp: batch sizes {nb_img} (image) and {nb_flow} (flow) differ")

    integer_image = not image.dtype.is_floating_point
    if integer_image and mode != "nearest":
        raise InputError(f"warp: a {image.dtype} image (labels) needs mode='nearest'; warp a "
                         f"one-hot float encoding to interpolate labels")
    wdt = _work_dtype(flow) if integer_image else _work_dtype(image, flow)
    batch = max(nb_img, nb_flow)
    src, fl = image.to(wdt), flow.to(wdt)  # (an integer image becomes float for sampling)
    if not integer_image:
        from mambamorph.nn import warp_cpu  # imports numba on first use

        if warp_cpu.supports(src, fl, mode, padding_mode):  # a constant image on the CPU
            return warp_cpu.warp_cpu(src, fl, padding_mode)
    with no_autocast(flow.device):
        grid0 = identity_grid(flow.shape[2:], device=flow.device, dtype=wdt)
        points = grid0.unsqueeze(0) + fl  # (B, 3, D0, D1, D2), voxels
        grid = voxel_to_grid(points).expand(batch, -1, -1, -1, -1)
        out = F.grid_sample(src.expand(batch, -1, -1, -1, -1), grid, mode=mode,
                            padding_mode=padding_mode, align_corners=True)
    if integer_image:
        # nearest sampling returns stored values exactly; round only guards the cast
        out = out.round().to(image.dtype)
    return out


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Integrate a stationary velocity field by scaling and squaring.

    ``u = v / 2**steps``, then ``steps`` times ``u <- u + warp(u, u)`` (self-composition of the
    map ``x -> x + u(x)``), giving an approximation of the displacement of ``exp(v)``.
    The computation is in float32 (float64 for a float64 input) with trilinear sampling and zero
    padding, as voxelmorph. ``steps == 0`` returns the velocity itself. On the CPU the
    squarings run in the numba kernels of :mod:`mambamorph.nn.squaring_cpu` (the same numbers
    and, with a gradient, the same gradients to float rounding; about 4x faster than
    ``grid_sample``; the result is then in channels-last memory).

    Args:
        velocity: ``(B, 3, D0, D1, D2)`` velocity in voxels.
        steps: number of squarings, >= 0.
    Returns:
        Displacement ``(B, 3, D0, D1, D2)`` in voxels, float32 (float64 for a float64 input).
    Raises:
        ValueError: bad shape or negative ``steps``.
    """
    if velocity.dim() != 5 or velocity.shape[1] != 3:
        raise InputError(f"integrate_velocity: expected velocity (B, 3, D0, D1, D2), got "
                         f"{tuple(velocity.shape)}")
    if int(steps) != steps or steps < 0:
        raise InputError(f"integrate_velocity: expected steps >= 0, got {steps}")
    disp = velocity.to(_work_dtype(velocity)) / (2.0 ** int(steps))
    if steps == 0:
        return disp
    if disp.device.type == "cpu":
        from mambamorph.nn.squaring_cpu import SquareSteps, square_cpu  # imports numba

        if torch.is_grad_enabled() and disp.requires_grad:
            return SquareSteps.apply(disp, int(steps))
        return square_cpu(disp, int(steps))
    with no_autocast(disp.device):
        # The squarings run in grid_sample's own convention (normalised units, channels
        # reversed, channels-last memory), where the sampling grid is one addition: the same
        # transform as ``disp + warp(disp, disp)`` (sampling is linear in the field), without a
        # normalisation, a flip and two layout copies per step.
        scale, _ = _normalisation(tuple(disp.shape[2:]), disp.device, disp.dtype)
        cl = torch.channels_last_3d
        g = (disp * scale).flip(1).contiguous(memory_format=cl)  # memory (B, D0, D1, D2, 3)
        base = _normalised_identity(tuple(disp.shape[2:]), disp.device, disp.dtype)
        for _ in range(int(steps)):
            grid = base + g.permute(0, 2, 3, 4, 1)  # (B, D0, D1, D2, 3), (x=D2, y=D1, z=D0)
            sampled = F.grid_sample(g, grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=True)
            g = (g + sampled).contiguous(memory_format=cl)
        return g.flip(1) / scale


@lru_cache(maxsize=8)
def _normalised_identity(sizes: tuple[int, int, int], device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """:func:`voxel_to_grid` of the identity grid: ``(1, D0, D1, D2, 3)``, cached (read-only)."""
    with torch.inference_mode(False), torch.no_grad():
        return voxel_to_grid(identity_grid(sizes, device, dtype).unsqueeze(0)).contiguous()


def resize_flow(flow: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize a displacement field to another grid covering the same extent.

    Convention (``align_corners=True``, the same as :func:`warp`): the first and last voxel
    centres of each axis coincide before and after, so old voxel ``p`` sits at new coordinate
    ``p * r_i`` with ``r_i = (S_i - 1) / (D_i - 1)``. The components are resampled trilinearly
    and component ``i`` is multiplied by ``r_i``, so the result describes the same transform
    in the new grid's voxels: ``new(y) = r * old(y / r)`` (exact for a field linear in x).
    Note: with this convention a x2 upsampling of ``D`` voxels to ``2D`` multiplies by
    ``(2D - 1) / (D - 1)``, slightly more than 2.

    Args:
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels of its own grid.
        size: target ``(S0, S1, S2)`` (or one int for all axes).
    Returns:
        ``(B, 3, S0, S1, S2)`` displacement in voxels of the new grid, same dtype as ``flow``.
    Raises:
        ValueError: bad shape or size, or an axis of size 1 resized to more than 1 voxel (its
            scale factor is undefined).
    """
    if flow.dim() != 5 or flow.shape[1] != 3:
        raise InputError(f"resize_flow: expected flow (B, 3, D0, D1, D2), got "
                         f"{tuple(flow.shape)}")
    size = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise InputError(f"resize_flow: expected 3 positive sizes, got {size}")
    old = tuple(flow.shape[2:])
    if size == old:
        return flow
    ratios = []
    for d, s in zip(old, size):
        if d == 1 and s != 1:
            raise InputError(f"resize_flow: cannot resize an axis of size 1 to {s} voxels")
        ratios.append((s - 1) / (d - 1) if d > 1 else 1.0)
    out = F.interpolate(flow, size=size, mode="trilinear", align_corners=True)
    scale = torch.tensor(ratios, dtype=out.dtype, device=out.device).view(1, 3, 1, 1, 1)
    return out * scale


def compose(flow_a: torch.Tensor, flow_b: torch.Tensor) -> torch.Tensor:
    """Displacement of the composed map "first ``b``, then ``a``".

    With ``phi_a(x) = x + a(x)`` and ``phi_b(x) = x + b(x)``, returns ``c`` such that
    ``x + c(x) = phi_a(phi_b(x))``, i.e. ``c(x) = b(x) + a(x + b(x))`` (``a`` sampled
    trilinearly, zero outside the volume). Warping by ``c`` equals warping by ``a`` and then
    warping the result by ``b``: ``warp(warp(I, a), b) ~= warp(I, c)``.

    Args:
        flow_a: ``(B, 3, D0, D1, D2)`` displacement applied second, in voxels.
        flow_b: ``(B, 3, D0, D1, D2)`` displacement applied first, in voxels.
    Returns:
        ``(B, 3, D0, D1, D2)`` displacement in voxels (float32, or float64 for float64 input).
    Raises:
        ValueError: shapes differ or are not fields.
    """
    if flow_a.dim() != 5 or flow_a.shape[1] != 3 or flow_a.shape[2:] != flow_b.shape[2:]:
        raise InputError(f"compose: expected two fields (B, 3, D0, D1, D2) on one grid, got "
                         f"{tuple(flow_a.shape)} and {tuple(flow_b.shape)}")
    return flow_b.to(_work_dtype(flow_a, flow_b)) + warp(flow_a, flow_b)


class SpatialTransformer(nn.Module):
    """Module form of :func:`warp`: ``forward(image, flow) -> image(x + flow(x))``.

    Holds no buffers or parameters; works at any input size.

    Args:
        mode: ``"bilinear"`` (trilinear) or ``"nearest"``.
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"``.
    Raises:
        ValueError: unknown mode.
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        if mode not in _MODES:
            raise InputError(f"SpatialTransformer: expected mode in {_MODES}, got {mode!r}")
        if padding_mode not in _PADDING_MODES:
            raise InputError(f"SpatialTransformer: expected padding_mode in {_PADDING_MODES}, "
                             f"got {padding_mode!r}")
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Warp ``image`` ``(B, C, D0, D1, D2)`` by ``flow`` ``(B, 3, D0, D1, D2)`` (voxels)."""
        return warp(image, flow, mode=self.mode, padding_mode=self.padding_mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, padding_mode={self.padding_mode!r}"


class VecInt(nn.Module):
    """Module form of :func:`integrate_velocity` (scaling and squaring, no buffers).

    Args:
        steps: number of squarings, >= 0 (the paper uses 7).
    Raises:
        ValueError: negative ``steps``.
    """

    def __init__(self, steps: int = 7) -> None:
        super().__init__()
        if int(steps) != steps or steps < 0:
            raise InputError(f"VecInt: expected steps >= 0, got {steps}")
        self.steps = int(steps)

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        """``(B, 3, D0, D1, D2)`` velocity (voxels) -> displacement, same shape (voxels)."""
        return integrate_velocity(velocity, self.steps)

    def extra_repr(self) -> str:
        return f"steps={self.steps}"
