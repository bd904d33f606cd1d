"""Image similarity for registration: MIND-SSC features, MIND-SSD, local NCC, mutual information.

All functions are pure and differentiable with respect to their image arguments; they compute in
float32 (float64 for float64 input) with autocast disabled. Images are ``(B, C, D0, D1, D2)``
tensors; the MIND descriptor takes single-channel images ``(B, 1, D0, D1, D2)``.

- :func:`mind_ssc` - the modality independent neighbourhood descriptor with self-similarity
  context (Heinrich et al., MICCAI 2013), 12 channels.
- :func:`mind_ssd_loss` - mean squared difference of two MIND descriptors (the image term of
  ConvexAdam and of :mod:`mambamorph.optimize.instance`); :func:`warped_mind_ssd_loss` - the
  same of the moving descriptors warped by a displacement, :func:`sampled_mind_ssd_loss` - at
  chosen points (both fused on the CPU).
- :func:`lncc_loss` - negative squared local normalised cross-correlation (monomodal).
- :func:`mutual_information` / :func:`mi_loss` - Parzen-window (Gaussian soft histogram) mutual
  information, multimodal.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from mambamorph.errors import InputError
from mambamorph.nn.spatial import in_work_dtype, no_autocast, voxel_to_grid, warp

__all__ = ["MIND_OFFSET_PAIRS", "mind_ssc", "mind_ssd_loss", "warped_mind_ssd_loss",
           "sampled_mind_ssd_loss", "lncc_loss", "mutual_information", "mi_loss"]

#: The 12 MIND-SSC comparisons: for each channel, the two six-neighbourhood unit offsets (along
#: array axes 0, 1, 2) whose patches are compared. They are the 12 pairs of six-neighbourhood
#: offsets at distance sqrt(2) (orthogonal, not opposite), in the channel order of Heinrich's C++
#: code (also the order of the ``convexAdam`` package).
MIND_OFFSET_PAIRS: tuple[tuple[tuple[int, int, int], tuple[int, int, int]], ...] = (
    ((1, 0, 0), (0, -1, 0)), ((0, 1, 0), (-1, 0, 0)), ((0, -1, 0), (-1, 0, 0)),
    ((0, 1, 0), (1, 0, 0)), ((0, -1, 0), (0, 0, -1)), ((0, 1, 0), (0, 0, 1)),
    ((0, 0, -1), (-1, 0, 0)), ((1, 0, 0), (0, 0, 1)), ((0, 1, 0), (0, 0, -1)),
    ((0, 0, 1), (0, -1, 0)), ((1, 0, 0), (0, 0, -1)), ((0, 0, 1), (-1, 0, 0)),
)


def _shifted(padded: torch.Tensor, offset: tuple[int, int, int], pad: int,
             shape: tuple[int, int, int]) -> torch.Tensor:
    """``img[x + offset]`` for every voxel ``x`` of ``shape``, read from ``img`` padded by ``pad``."""
    s = [slice(pad + o, pad + o + n) for o, n in zip(offset, shape)]
    return padded[:, :, s[0], s[1], s[2]]


def mind_ssc(img: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptor (Heinrich et al., MICCAI 2013) of a single-channel image.

    For each channel ``c`` with offset pair ``(a, b)`` of :data:`MIND_OFFSET_PAIRS` (unit
    offsets scaled by ``dilation`` voxels, so the two sample points are ``sqrt(2) * dilation``
    apart): ``D_c(x) = box_r[(I(x + d a) - I(x + d b))**2]`` with ``box_r`` the mean over the
    ``(2 radius + 1)**3`` cube. Borders are replicate-padded (the image before the shifts, the
    patch distances before the box filter). Then ``D_c <- D_c - min_c D_c`` and
    ``V = mean_c D_c``, clamped per batch item to ``[1e-3, 1e3] * mean_x V``, and
    ``MIND_c = exp(-D_c / V)``. So the descriptor is in (0, 1], unchanged by an intensity map
    ``a * I + b`` with ``a != 0``, and equal to the ``convexAdam`` package's ``MINDSSC`` (same
    channel order) up to float rounding. A CPU image that needs no gradient goes through the
    numba kernels of :mod:`mambamorph.similarity_cpu` (the same numbers to float rounding, ~1.5x
    faster; the result is then channels-last).

    Args:
        img: ``(B, 1, D0, D1, D2)`` image (any intensity range).
        radius: box-filter radius in voxels (>= 0).
        dilation: offset length in voxels (>= 1).
    Returns:
        ``(B, 12, D0, D1, D2)`` descriptor, float32 (float64 for float64 input), differentiable.
    Raises:
        InputError: ``img`` is not ``(B, 1, D0, D1, D2)`` or bad ``radius``/``dilation``.
    """
    if img.dim() != 5 or img.shape[1] != 1:
        raise InputError(f"mind_ssc: expected an image (B, 1, D0, D1, D2), got {tuple(img.shape)}")
    if int(radius) != radius or radius < 0:
        raise InputError(f"mind_ssc: expected radius >= 0, got {radius}")
    if int(dilation) != dilation or dilation < 1:
        raise InputError(f"mind_ssc: expected dilation >= 1, got {dilation}")
    radius, dilation = int(radius), int(dilation)
    if img.device.type == "cpu" and not (torch.is_grad_enabled() and img.requires_grad):
        from mambamorph.similarity_cpu import mind_ssc_cpu  # imports numba on first use

        return mind_ssc_cpu(img, radius, dilation)
    return _mind_ssc_torch(img, radius, dilation)


def _mind_ssc_torch(img: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """:func:`mind_ssc` in torch operations (differentiable; any device): the definition."""
    shape = tuple(img.shape[2:])
    with no_autocast(img.device):
        (x,) = in_work_dtype(img)
        padded = F.pad(x, (dilation,) * 6, mode="replicate")  # (B, 1, D0+2d, D1+2d, D2+2d)
        diffs = []
        for a, b in MIND_OFFSET_PAIRS:
            ia = _shifted(padded, tuple(dilation * v for v in a), dilation, shape)
            ib = _shifted(padded, tuple(dilation * v for v in b), dilation, shape)
            diffs.append((ia - ib).square())
        dist = torch.cat(diffs, dim=1)  # (B, 12, D0, D1, D2)
        if radius:
            k = 2 * radius + 1
            dist = F.avg_pool3d(F.pad(dist, (radius,) * 6, mode="replicate"), k, stride=1)
        dist = dist - dist.min(dim=1, keepdim=True).values
        var = dist.mean(dim=1, keepdim=True)  # (B, 1, D0, D1, D2)
        level = var.mean(dim=(1, 2, 3, 4), keepdim=True)  # (B, 1, 1, 1, 1)
        var = torch.minimum(torch.maximum(var, 1e-3 * level), 1e3 * level)
        # a constant image has var == 0 everywhere: D == 0 too, so the descriptor is exp(0) = 1
        var = torch.where(var > 0, var, torch.ones_like(var))
        return torch.exp(-dist / var)


def mind_ssd_loss(moving_mind: torch.Tensor, fixed_mind: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared difference of two MIND descriptors (summed over channels).

    ``mean_x sum_c (m_c(x) - f_c(x))**2``: 0 for equal descriptors; with 12 channels in (0, 1] it
    equals ConvexAdam's ``12 * mean_{c,x}`` cost.

    Args:
        moving_mind, fixed_mind: ``(B, C, D0, D1, D2)`` descriptors (e.g. :func:`mind_ssc` of the
            warped moving and of the fixed image).
        mask: optional ``(B or 1, 1, D0, D1, D2)`` voxel weights; the mean is then
            ``sum(w * cost) / sum(w)``.
    Returns:
        Scalar tensor (float32, or float64 for float64 input).
    Raises:
        InputError: shapes differ or are not 5-D, or a mask of the wrong shape.
    """
    if moving_mind.shape != fixed_mind.shape or moving_mind.dim() != 5:
        raise InputError(f"mind_ssd_loss: expected two (B, C, D0, D1, D2) descriptors of one "
                         f"shape, got {tuple(moving_mind.shape)} and {tuple(fixed_mind.shape)}")
    with no_autocast(moving_mind.device):
        m, f = in_work_dtype(moving_mind, fixed_mind)
        cost = (m - f).square().sum(dim=1, keepdim=True)  # (B, 1, D0, D1, D2)
        if mask is None:
            return cost.mean()
        if mask.dim() != 5 or mask.shape[1] != 1 or mask.shape[2:] != cost.shape[2:]:
            raise InputError(f"mind_ssd_loss: expected a mask (B, 1, D0, D1, D2) on the "
                             f"descriptor grid, got {tuple(mask.shape)}")
        w = mask.to(cost.dtype).expand_as(cost)
        return (w * cost).sum() / w.sum().clamp_min(1e-12)


def warped_mind_ssd_loss(moving_mind: torch.Tensor, fixed_mind: torch.Tensor, flow: torch.Tensor,
                         padding_mode: str = "border") -> torch.Tensor:
    """``mind_ssd_loss(warp(moving_mind, flow, padding_mode=padding_mode), fixed_mind)``.

    On the CPU, for descriptors that need no gradient (instance optimisation), the warp, the
    difference and the sum over channels are one numba pass that never stores the warped
    descriptors (:func:`mambamorph.nn.warp_cpu.warp_ssd_cpu`; forward + backward for 24
    channels, ``bench/bench_warp.py``: 0.24-0.26 s against 0.54-0.59 s for the composition at
    96x112x96, 20 ms against 31 ms at 48x56x48); elsewhere the
    composition itself. Both give the same value and gradient to float rounding.

    Args:
        moving_mind, fixed_mind: ``(B, C, D0, D1, D2)`` descriptors on one grid.
        flow: ``(B, 3, D0, D1, D2)`` displacement in voxels of that grid (channel ``i`` along
            array axis ``i``), sampled at ``x + flow(x)``.
        padding_mode: ``"border"`` or ``"zeros"`` (as :func:`mambamorph.nn.spatial.warp`).
    Returns:
        Scalar tensor, differentiable with respect to ``flow`` (and to the descriptors on the
        composition path).
    Raises:
        InputError: shapes that do not match.
    """
    if moving_mind.shape != fixed_mind.shape or moving_mind.dim() != 5 or flow.dim() != 5 \
            or flow.shape[1] != 3 or flow.shape[2:] != moving_mind.shape[2:]:
        raise InputError(f"warped_mind_ssd_loss: expected descriptors (B, C, D0, D1, D2) of one "
                         f"shape and a flow (B, 3, D0, D1, D2), got {tuple(moving_mind.shape)}, "
                         f"{tuple(fixed_mind.shape)} and {tuple(flow.shape)}")
    if (moving_mind.device.type == "cpu" and not fixed_mind.requires_grad
            and fixed_mind.dtype == moving_mind.dtype and padding_mode in ("zeros", "border")):
        from mambamorph.nn import warp_cpu  # noqa: PLC0415 - imports numba on first use

        if warp_cpu.supports(moving_mind, flow, "bilinear", padding_mode):
            with no_autocast(flow.device):
                return warp_cpu.warp_ssd_cpu(moving_mind, fixed_mind, flow, padding_mode).mean()
    return mind_ssd_loss(warp(moving_mind, flow, padding_mode=padding_mode), fixed_mind)


def sampled_mind_ssd_loss(moving_mind: torch.Tensor, fixed_at_points: torch.Tensor,
                          points: torch.Tensor) -> torch.Tensor:
    """MIND-SSD at chosen points: ``mean_y sum_c (m_c(points(y)) - f_c(y))**2``.

    The moving descriptors are sampled trilinearly (border padding) at ``points``; ``y`` runs
    over the points' grid, e.g. one sub-lattice of the fixed grid, whose fixed descriptors the
    caller passes. Instance optimisation uses it to evaluate the similarity on a different
    sub-lattice of the image grid at each iteration (:class:`mambamorph.optimize.instance.IOConfig`
    ``sim_strides``). On the CPU, for descriptors without gradient, a fused numba pass
    (:func:`mambamorph.nn.warp_cpu.points_ssd_cpu`); elsewhere ``grid_sample``; both give the same
    value and gradient to float rounding.

    Args:
        moving_mind: ``(B, C, D0, D1, D2)`` descriptors.
        fixed_at_points: ``(B, C, E0, E1, E2)`` the fixed descriptors at the points.
        points: ``(B, 3, E0, E1, E2)`` absolute positions in voxels of ``moving_mind``'s grid
            (channel ``i`` along array axis ``i``).
    Returns:
        Scalar tensor, differentiable with respect to ``points`` (and to the descriptors on the
        ``grid_sample`` path).
    Raises:
        InputError: shapes that do not match.
    """
    if moving_mind.dim() != 5 or fixed_at_points.dim() != 5 or points.dim() != 5 \
            or points.shape[1] != 3 or fixed_at_points.shape[1] != moving_mind.shape[1] \
            or points.shape[2:] != fixed_at_points.shape[2:]:
        raise InputError(f"sampled_mind_ssd_loss: expected descriptors (B, C, D0, D1, D2) and "
                         f"(B, C, E0, E1, E2) with points (B, 3, E0, E1, E2), got "
                         f"{tuple(moving_mind.shape)}, {tuple(fixed_at_points.shape)} and "
                         f"{tuple(points.shape)}")
    from mambamorph.nn import warp_cpu  # noqa: PLC0415 - imports numba on first use

    if (not fixed_at_points.requires_grad and fixed_at_points.dtype == moving_mind.dtype
            and warp_cpu.supports(moving_mind, points, "bilinear", "border")):
        with no_autocast(points.device):
            return warp_cpu.points_ssd_cpu(moving_mind, fixed_at_points, points).mean()
    with no_autocast(points.device):
        m, f, p = in_work_dtype(moving_mind, fixed_at_points, points)
        batch = max(m.shape[0], p.shape[0])
        grid = voxel_to_grid(p, m.shape[2:]).expand(batch, -1, -1, -1, -1)
        sampled = F.grid_sample(m.expand(batch, -1, -1, -1, -1), grid, mode="bilinear",
                                padding_mode="border", align_corners=True)
        return mind_ssd_loss(sampled, f)


def lncc_loss(a: torch.Tensor, b: torch.Tensor, window: int = 9,
              eps: float = 1e-5) -> torch.Tensor:
    """Negative local normalised cross-correlation (squared), voxelmorph style.

    For each voxel, over the cubic ``window`` centred on it, clipped to the volume (border
    windows average over their in-volume voxels only):
    ``cc = cov(a, b)**2 / (var(a) * var(b) + eps)`` with window means, and the loss is
    ``-mean(cc)`` over voxels, channels and batch: ``-1`` for images related by a positive or
    negative affine intensity map wherever the window has contrast, about ``0`` for independent
    noise. Monomodal; not meaningful for MR -> CT (the paper uses no image term).
    Differences from voxelmorph's NCC: voxelmorph zero-pads border windows (which breaks the
    affine invariance near the border) and adds ``eps`` to the product of window *sums* of
    squares, so its effective eps is ``window**6`` times smaller than here.

    Args:
        a, b: ``(B, C, D0, D1, D2)`` images, same shape.
        window: odd window side in voxels (along an axis shorter than it: the largest odd
            length that fits, e.g. at the coarse levels of a pyramid).
        eps: stabiliser of the denominator (in squared variance units).
    Returns:
        Scalar tensor in [-1, 0] (float32, or float64 for float64 input).
    Raises:
        InputError: shapes differ, are not 5-D, or ``window`` is not a positive odd integer.
    """
    if a.shape != b.shape or a.dim() != 5:
        raise InputError(f"lncc_loss: expected two (B, C, D0, D1, D2) images of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if int(window) != window or window < 1 or window % 2 == 0:
        raise InputError(f"lncc_loss: expected a positive odd window, got {window}")
    window = int(window)
    with no_autocast(a.device):
        x, y = in_work_dtype(a, b)
        n_b, n_c = x.shape[:2]
        # one pass of a box filter over the 5 moment images, channels folded into the batch
        stack = torch.stack([x, y, x * x, y * y, x * y], dim=2)  # (B, C, 5, D0, D1, D2)
        stack = stack.reshape(n_b * n_c * 5, 1, *x.shape[2:])  # (B*C*5, 1, D0, D1, D2)
        # an axis shorter than the window gets the largest odd window that fits it
        k = tuple(window if n >= window else n - (n + 1) % 2 for n in x.shape[2:])
        mean = F.avg_pool3d(stack, k, stride=1, padding=tuple(w // 2 for w in k),
                            count_include_pad=False)
        mean = mean.reshape(n_b, n_c, 5, *x.shape[2:])
        mx, my, mxx, myy, mxy = mean.unbind(dim=2)
        cov = mxy - mx * my
        var_x = (mxx - mx * mx).clamp_min(0.0)
        var_y = (myy - my * my).clamp_min(0.0)
        cc = cov * cov / (var_x * var_y + eps)
        return -cc.mean()


def mutual_information(a: torch.Tensor, b: torch.Tensor, bins: int = 32,
                       sigma: float = 0.5, value_range: tuple[float, float] = (0.0, 1.0),
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mutual information of two images from a Gaussian Parzen-window joint histogram, in nats.

    The intensity range ``value_range = (lo, hi)`` is cut into ``bins`` bins of width
    ``w = (hi - lo) / bins`` with centres ``c_k = lo + (k + 1/2) w``; each voxel adds to bin
    ``k`` the weight ``exp(-(v - c_k)**2 / (2 (sigma w)**2))``, normalised to sum 1 over the
    bins (values outside the range are clamped to it first). The joint histogram of ``(a, b)``
    is the mean over voxels of the outer product of the two weight vectors, and
    ``MI = sum p_ab log(p_ab / (p_a p_b))`` (terms with ``p_ab = 0`` count 0). With
    ``sigma -> 0`` this is the MI of hard bins: for ``a == b``, the entropy of ``a``'s binned
    intensities. Memory: ``2 * bins`` floats per voxel (subsample large volumes).

    Args:
        a, b: ``(B, 1, D0, D1, D2)`` images of one shape (any spatial shape; channels > 1 are
            treated as more voxels).
        bins: number of bins (>= 2).
        sigma: kernel width in bins (> 0).
        value_range: intensities mapped to the first and last bin edges.
        mask: optional ``(B, 1, D0, D1, D2)`` voxel weights (>= 0) of the histogram.
    Returns:
        ``(B,)`` mutual information in nats (float32, or float64 for float64 input).
    Raises:
        InputError: shapes differ, bad ``bins``/``sigma``/``value_range``, or a bad mask.
    """
    if a.shape != b.shape or a.dim() < 3:
        raise InputError(f"mutual_information: expected two (B, C, ...) images of one shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if int(bins) != bins or bins < 2:
        raise InputError(f"mutual_information: expected bins >= 2, got {bins}")
    if not sigma > 0:
        raise InputError(f"mutual_information: expected sigma > 0, got {sigma}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise InputError(f"mutual_information: expected value_range lo < hi, got {value_range}")
    if mask is not None and mask.shape != a.shape:
        raise InputError(f"mutual_information: expected a mask of shape {tuple(a.shape)}, got "
                         f"{tuple(mask.shape)}")
    bins = int(bins)
    with no_autocast(a.device):
        x, y = in_work_dtype(a, b)
        n_b = x.shape[0]
        width = (hi - lo) / bins
        centres = lo + width * (torch.arange(bins, dtype=x.dtype, device=x.device) + 0.5)

        def weights(v: torch.Tensor) -> torch.Tensor:
            v = v.reshape(n_b, -1, 1).clamp(lo, hi)  # (B, N, 1)
            logits = -(v - centres).square() / (2.0 * (sigma * width) ** 2)  # (B, N, bins)
            return torch.softmax(logits, dim=-1)

        wa, wb = weights(x), weights(y)  # (B, N, bins) each
        if mask is not None:
            m = mask.to(x.dtype).reshape(n_b, -1, 1)
            wa = wa * m
            total = m.sum(dim=1).clamp_min(1e-12)  # (B, 1)
        else:
            total = torch.full((n_b, 1), float(wa.shape[1]), dtype=x.dtype, device=x.device)
        joint = torch.bmm(wa.transpose(1, 2), wb) / total[:, :, None]  # (B, bins, bins)
        pa = joint.sum(dim=2, keepdim=True)  # (B, bins, 1)
        pb = joint.sum(dim=1, keepdim=True)  # (B, 1, bins)
        ratio = joint / (pa * pb).clamp_min(1e-30)
        terms = torch.where(joint > 0, joint * torch.log(ratio.clamp_min(1e-30)),
                            torch.zeros_like(joint))
        return terms.sum(dim=(1, 2))


def mi_loss(a: torch.Tensor, b: torch.Tensor, **kwargs) -> torch.Tensor:
    """Negative mean (over the batch) of :func:`mutual_information` (keyword arguments passed
    on); a scalar in nats, minimal where the images are most predictable from each other."""
    return -mutual_information(a, b, **kwargs).mean()

