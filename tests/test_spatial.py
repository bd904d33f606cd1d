"""Tests of mambamorph.nn.spatial: warp, integration, resize and composition of fields."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mambamorph.nn.spatial import (SpatialTransformer, VecInt, compose, identity_grid,
                                   integrate_velocity, resize_flow, voxel_to_grid, warp)

SHAPE = (9, 10, 11)


def _smooth_field(shape, amplitude, seed=0, dtype=torch.float32):
    """A smooth (1, 3, *shape) field that vanishes on the border (sum of low sine products)."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.linspace(0, math.pi, n, dtype=torch.float64) for n in shape]
    x0, x1, x2 = torch.meshgrid(*x, indexing="ij")
    bump = torch.sin(x0) * torch.sin(x1) * torch.sin(x2)
    comps = []
    for _ in range(3):
        c = torch.rand(3, generator=g, dtype=torch.float64) * 2 * math.pi
        comps.append(bump * torch.sin(x0 + c[0]) * torch.cos(x1 + c[1]) * torch.sin(2 * x2 + c[2]))
    return (amplitude * torch.stack(comps)[None]).to(dtype)


def _interior(t, m):
    return t[..., m:-m, m:-m, m:-m]


# ---------------------------------------------------------------- identity grid, conversion

def test_identity_grid_values_and_cache():
    g = identity_grid(SHAPE)
    assert g.shape == (3, *SHAPE) and g.dtype == torch.float32 and not g.requires_grad
    assert g[0, 4, 0, 0] == 4 and g[1, 0, 7, 0] == 7 and g[2, 0, 0, 10] == 10
    assert torch.equal(g[0], torch.arange(9.0).view(9, 1, 1).expand(*SHAPE))
    assert identity_grid(SHAPE) is g  # cached
    assert identity_grid(SHAPE, dtype=torch.float64).dtype == torch.float64


def test_identity_grid_made_in_inference_mode_is_usable_by_autograd():
    shape = (3, 4, 6)
    with torch.inference_mode():
        identity_grid(shape)
    flow = torch.zeros(1, 3, *shape, requires_grad=True)
    img = torch.rand(1, 1, *shape)
    warp(img, flow).sum().backward()
    assert flow.grad is not None


@pytest.mark.parametrize("bad", [(4, 4), (0, 3, 3), (2, 2, 2, 2)])
def test_identity_grid_bad_shape(bad):
    with pytest.raises(ValueError, match="identity_grid"):
        identity_grid(bad)


def test_voxel_to_grid_corners_and_axis_order():
    shape = (3, 5, 9)
    pts = identity_grid(shape)[None]
    g = voxel_to_grid(pts)
    assert g.shape == (1, *shape, 3)
    # last dim is (x=D2, y=D1, z=D0); voxel 0 -> -1, voxel D-1 -> +1
    assert torch.allclose(g[0, 0, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))
    assert torch.allclose(g[0, 2, 0, 8], torch.tensor([1.0, -1.0, 1.0]))
    assert torch.allclose(g[0, 0, 4, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert torch.allclose(g[0, 1, 2, 4], torch.tensor([0.0, 0.0, 0.0]))


# ---------------------------------------------------------------- warp

def test_zero_flow_is_identity():
    img = torch.rand(2, 3, *SHAPE)
    zero = torch.zeros(2, 3, *SHAPE)
    assert torch.equal(warp(img, zero, mode="nearest"), img)
    assert torch.allclose(warp(img, zero), img, atol=1e-6, rtol=0)


def test_axis_of_size_one():
    img = torch.rand(1, 1, 1, 5, 6)
    flow = torch.zeros(1, 3, 1, 5, 6)
    assert torch.allclose(warp(img, flow), img, atol=1e-6)
    flow[:, 2] = 1.0
    assert torch.allclose(warp(img, flow)[..., :-1], img[..., 1:], atol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [2, -2])
def test_constant_shift_moves_along_that_axis(axis, shift):
    img = torch.rand(1, 2, *SHAPE)
    flow = torch.zeros(1, 3, *SHAPE)
    flow[:, axis] = shift
    n = SHAPE[axis]
    dim = 2 + axis
    # out(x) = img(x + shift e_axis): compare with a roll on the part that stays inside
    rolled = torch.roll(img, shifts=-shift, dims=dim)
    keep = slice(0, n - shift) if shift > 0 else slice(-shift, n)
    idx = [slice(None)] * 5
    idx[dim] = keep
    lost = [slice(None)] * 5
    lost[dim] = slice(n - shift, n) if shift > 0 else slice(0, -shift)
    for mode, atol in (("nearest", 0.0), ("bilinear", 1e-5)):
        out = warp(img, flow, mode=mode)
        assert torch.allclose(out[tuple(idx)], rolled[tuple(idx)], atol=atol, rtol=0), mode
        assert torch.all(out[tuple(lost)].abs() <= atol), mode  # zero padding outside


def test_warp_matches_scipy_map_coordinates():
    img = torch.rand(1, 1, *SHAPE, dtype=torch.float64)
    flow = 3 * (torch.rand(1, 3, *SHAPE, dtype=torch.float64) - 0.5)
    pts = (identity_grid(SHAPE, dtype=torch.float64) + flow[0]).numpy()
    ref = ndimage.map_coordinates(img[0, 0].numpy(), pts, order=1, mode="grid-constant", cval=0)
    out = warp(img, flow)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-12)


def test_nearest_keeps_integer_labels():
    labels = torch.randint(0, 5, (1, 1, *SHAPE)) * 7 + 2  # values {2, 9, 16, 23, 30}
    flow = _smooth_field(SHAPE, 4.0)
    out = warp(labels, flow, mode="nearest")
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert set(out.unique().tolist()) <= set(labels.unique().tolist()) | {0}
    as_float = warp(labels.float(), flow, mode="nearest")
    assert torch.equal(as_float, out.float())


def test_integer_image_needs_nearest():
    with pytest.raises(ValueError, match="nearest"):
        warp(torch.zeros(1, 1, *SHAPE, dtype=torch.int64), torch.zeros(1, 3, *SHAPE))


@pytest.mark.parametrize("img_shape, flow_shape, match", [
    ((1, 1, 9, 10, 11), (1, 3, 9, 10, 12), "grid"),
    ((1, 1, 9, 10), (1, 3, 9, 10, 11), "image"),
    ((1, 1, 9, 10, 11), (1, 2, 9, 10, 11), "flow"),
    ((2, 1, 9, 10, 11), (3, 3, 9, 10, 11), "batch"),
])
def test_warp_bad_shapes(img_shape, flow_shape, match):
    with pytest.raises(ValueError, match=match):
        warp(torch.zeros(img_shape), torch.zeros(flow_shape))


def test_warp_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        warp(torch.zeros(1, 1, *SHAPE), torch.zeros(1, 3, *SHAPE), mode="bicubic")


def test_warp_broadcasts_batch_of_one():
    img = torch.rand(1, 2, *SHAPE)
    flows = torch.stack([_smooth_field(SHAPE, 2.0, seed=s)[0] for s in range(3)])
    out = warp(img, flows)
    assert out.shape == (3, 2, *SHAPE)
    for b in range(3):
        assert torch.allclose(out[b:b + 1], warp(img, flows[b:b + 1]))


def test_warp_gradcheck_float64():
    shape = (3, 4, 5)
    img = torch.rand(1, 2, *shape, dtype=torch.float64, requires_grad=True)
    # non-integer displacements keep the samples away from trilinear kinks
    flow = (torch.rand(1, 3, *shape, dtype=torch.float64) * 1.4 - 0.7 + 0.13).requires_grad_()
    assert torch.autograd.gradcheck(lambda i, f: warp(i, f), (img, flow))


def test_integrate_gradcheck_float64():
    shape = (4, 4, 5)
    vel = (0.3 * _smooth_field(shape, 1.0, dtype=torch.float64) + 0.011).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: integrate_velocity(v, steps=2), (vel,))


def test_warp_under_bfloat16_autocast():
    img = torch.rand(1, 1, *SHAPE)
    flow = _smooth_field(SHAPE, 3.0)
    ref = warp(img, flow)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = warp(img.bfloat16(), flow.bfloat16())
    assert out.dtype == torch.float32
    # only the bfloat16 rounding of the inputs differs (about 3 significant digits)
    assert (out - ref).abs().max() < 0.05


# ---------------------------------------------------------------- integration

def test_integrate_zero_velocity_is_zero():
    v = torch.zeros(2, 3, *SHAPE)
    assert torch.equal(integrate_velocity(v), v)
    assert torch.equal(VecInt(7)(v), v)


def test_integrate_constant_velocity_gives_constant():
    c = torch.tensor([0.7, -0.4, 1.1])
    shape = (16, 17, 18)
    v = c.view(1, 3, 1, 1, 1).expand(1, 3, *shape).clone()
    u = integrate_velocity(v, steps=7)
    # zero padding corrupts the border; each squaring with a fractional shift spreads that error
    # one voxel inwards while damping it (measured: 3e-4 at 3 voxels, 5e-6 at 4, 1e-7 at 5)
    margin = 5
    assert torch.allclose(_interior(u, margin), _interior(v, margin), atol=1e-6, rtol=0)
    assert (u - v).abs().max() > 0.1  # and the border does see the padding


def test_integrate_steps_zero_and_negative():
    v = torch.rand(1, 3, *SHAPE)
    assert torch.equal(integrate_velocity(v, steps=0), v)
    with pytest.raises(ValueError, match="steps"):
        integrate_velocity(v, steps=-1)


def test_inverse_consistency():
    shape = (24, 24, 24)
    v = _smooth_field(shape, 3.0, seed=3)  # up to ~3 voxels, zero on the border
    phi = integrate_velocity(v)
    psi = integrate_velocity(-v)
    size = phi.norm(dim=1).max()
    assert size > 2.0  # a real deformation
    # the residual is trilinear resampling error (measured 2.6% of the largest displacement at
    # worst, 0.3% on average); composing phi with itself instead is off by about 2 |phi|
    for c in (compose(phi, psi), compose(psi, phi)):
        err = _interior(c, 2).norm(dim=1)
        assert err.max() < 0.04 * size and err.mean() < 0.005 * size
    assert _interior(compose(phi, phi), 2).norm(dim=1).max() > size


# ---------------------------------------------------------------- resize and compose

def test_resize_flow_of_linear_field_is_exact():
    old, new = (5, 6, 7), (9, 11, 13)
    a = torch.tensor([[0.10, -0.20, 0.05], [0.30, 0.00, -0.10], [-0.05, 0.15, 0.20]],
                     dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x = identity_grid(old, dtype=torch.float64)
    u = (torch.einsum("ij,jabc->iabc", a, x) + b.view(3, 1, 1, 1))[None]
    r = torch.tensor([(s - 1) / (d - 1) for s, d in zip(new, old)], dtype=torch.float64)
    y = identity_grid(new, dtype=torch.float64)
    expected = r.view(3, 1, 1, 1) * (torch.einsum("ij,jabc->iabc", a, y / r.view(3, 1, 1, 1))
                                     + b.view(3, 1, 1, 1))
    out = resize_flow(u, new)
    assert out.shape == (1, 3, *new)
    assert torch.allclose(out[0], expected, atol=1e-12)
    # back to the old grid recovers the field
    assert torch.allclose(resize_flow(out, old), u, atol=1e-12)


def test_resize_flow_same_size_and_errors():
    u = torch.rand(1, 3, *SHAPE)
    assert resize_flow(u, SHAPE) is u
    with pytest.raises(ValueError, match="size 1"):
        resize_flow(torch.zeros(1, 3, 1, 4, 4), (2, 4, 4))
    with pytest.raises(ValueError, match="sizes"):
        resize_flow(u, (4, 4))


def test_compose_with_zero_is_identity():
    a = _smooth_field(SHAPE, 2.0)
    zero = torch.zeros_like(a)
    assert torch.allclose(compose(a, zero), a, atol=1e-6)
    assert torch.equal(compose(zero, a), a)


def test_compose_of_constant_shifts_adds():
    a = torch.zeros(1, 3, *SHAPE)
    b = torch.zeros(1, 3, *SHAPE)
    a[:, 0], b[:, 2] = 1.0, -2.0
    c = compose(a, b)
    assert torch.allclose(_interior(c[:, 0], 3), torch.tensor(1.0))
    assert torch.allclose(_interior(c[:, 2], 3), torch.tensor(-2.0))


def test_compose_order_matches_sequential_warps():
    img = _smooth_field((20, 20, 20), 1.0, seed=7)[:, :1] + 1.0  # smooth image
    a = _smooth_field((20, 20, 20), 2.0, seed=1)
    b = _smooth_field((20, 20, 20), 2.0, seed=2)
    twice = warp(warp(img, a), b)
    once = warp(img, compose(a, b))
    wrong = warp(img, compose(b, a))
    err = (_interior(twice, 3) - _interior(once, 3)).abs().max()
    assert err < 0.02
    assert (_interior(twice, 3) - _interior(wrong, 3)).abs().max() > 5 * err


# ---------------------------------------------------------------- modules

def test_modules_have_no_state_and_match_functions():
    st, vi = SpatialTransformer("nearest"), VecInt(5)
    assert st.state_dict() == {} and vi.state_dict() == {}
    img = torch.rand(1, 1, *SHAPE)
    v = _smooth_field(SHAPE, 2.0)
    assert torch.equal(st(img, v), warp(img, v, mode="nearest"))
    assert torch.equal(vi(v), integrate_velocity(v, 5))
    with pytest.raises(ValueError):
        SpatialTransformer("cubic")
    with pytest.raises(ValueError):
        VecInt(-2)


@pytest.mark.gpu
def test_cuda_float16_autocast_matches_cpu():
    dev = torch.device("cuda")
    img = torch.rand(1, 2, 16, 16, 16)
    v = _smooth_field((16, 16, 16), 3.0)
    ref_u = integrate_velocity(v)
    ref = warp(img, ref_u)
    img_c = img.to(dev).requires_grad_()
    v_c = v.to(dev).requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        u = integrate_velocity(v_c.half())
        out = warp(img_c.half(), u)
    assert u.dtype == torch.float32 and out.dtype == torch.float32
    assert (u.cpu() - ref_u).abs().max() < 0.02  # float16 rounding of the inputs only
    assert (out.detach().cpu() - ref).abs().max() < 0.02
    out.sum().backward()
    assert torch.isfinite(img_c.grad).all() and torch.isfinite(v_c.grad).all()
    assert v_c.grad.abs().sum() > 0


# ---------------------------------------------------------------- the CPU squaring kernel

def _warp_by_grid_sample(image, flow, padding_mode="zeros"):
    """The plain reference of warp: grid_sample at the identity grid plus the flow."""
    points = identity_grid(flow.shape[2:], dtype=flow.dtype).unsqueeze(0) + flow
    batch = max(image.shape[0], flow.shape[0])
    return torch.nn.functional.grid_sample(
        image.expand(batch, -1, -1, -1, -1), voxel_to_grid(points).expand(batch, -1, -1, -1, -1),
        mode="bilinear", padding_mode=padding_mode, align_corners=True)


def _squarings_by_grid_sample(disp, steps):
    """The plain reference: ``steps`` times ``u <- u + warp(u, u)`` through ``grid_sample``."""
    for _ in range(steps):
        disp = disp + _warp_by_grid_sample(disp, disp)
    return disp


@pytest.mark.parametrize("shape", [(9, 10, 11), (1, 8, 9), (7, 1, 1), (12, 9, 2)])
def test_cpu_squaring_kernel_matches_grid_sample_float64(shape):
    """The numba kernel (used without autograd on the CPU) against grid_sample, float64: a field
    that reaches out of the volume (zero padding), axes of one and two voxels, batch 2."""
    from mambamorph.nn.squaring_cpu import square_cpu

    g = torch.Generator().manual_seed(1)
    disp = (torch.rand(2, 3, *shape, dtype=torch.float64, generator=g) - 0.5) * 5.0
    ref = _squarings_by_grid_sample(disp, 3)
    out = square_cpu(disp, 3)
    assert out.shape == disp.shape and out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-11, rtol=0)
    assert torch.equal(square_cpu(disp, 0), disp)


@pytest.mark.parametrize("shape", [(9, 10, 11), (1, 8, 9), (7, 1, 1), (12, 9, 2)])
def test_cpu_squaring_gradient_matches_grid_sample_float64(shape):
    """The squarings with autograd on the CPU (SquareSteps: the numba kernel forward, its own
    backward) against autograd through grid_sample, float64: values and gradients, a field
    that reaches out of the volume (zero padding), axes of one and two voxels, batch 2."""
    from mambamorph.nn.squaring_cpu import SquareSteps

    g = torch.Generator().manual_seed(2)
    disp = (torch.rand(2, 3, *shape, dtype=torch.float64, generator=g) - 0.5) * 5.0
    weight = torch.randn(2, 3, *shape, dtype=torch.float64, generator=g)
    a = disp.clone().requires_grad_()
    b = disp.clone().requires_grad_()
    out = SquareSteps.apply(a, 3)
    ref = _squarings_by_grid_sample(b, 3)
    assert torch.allclose(out, ref, atol=1e-11, rtol=0)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-9, rtol=1e-11)
    assert b.grad.abs().max() > 1.0


def test_cpu_squaring_gradient_does_not_depend_on_the_thread_count():
    """A resumed training run on another thread count must reproduce the same weights: the
    backward's scatter runs in a fixed number of chunks, summed in order."""
    from mambamorph.nn.squaring_cpu import SquareSteps

    g = torch.Generator().manual_seed(3)
    disp = torch.randn(1, 3, 13, 10, 9, generator=g)
    weight = torch.randn(1, 3, 13, 10, 9, generator=g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            a = disp.clone().requires_grad_()
            (SquareSteps.apply(a, 4) * weight).sum().backward()
            grads.append(a.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_integrate_velocity_paths_agree():
    """integrate_velocity without autograd (numba kernel), with autograd (numba kernel and its
    backward) and the plain loop over warp give one field: float64 to 1e-11, float32 to
    float rounding amplified by the squarings."""
    v64 = _smooth_field((20, 22, 18), 6.0, seed=4, dtype=torch.float64)
    ref = _squarings_by_grid_sample(v64 / 2 ** 7, 7)
    with torch.no_grad():
        fast = integrate_velocity(v64)
    graded = integrate_velocity(v64.clone().requires_grad_())
    assert graded.requires_grad and not fast.requires_grad
    assert torch.allclose(fast, ref, atol=1e-11, rtol=0)
    assert torch.allclose(graded.detach(), ref, atol=1e-11, rtol=0)
    v32 = v64.float()
    with torch.no_grad():
        fast32 = integrate_velocity(v32)
    assert fast32.dtype == torch.float32
    assert (fast32.double() - ref).abs().max() < 1e-4
    assert ref.abs().max() > 2.0  # the field does move voxels


def test_cpu_squaring_kernel_handles_non_finite_like_grid_sample():
    """A NaN or enormous displacement does not index outside the array: an enormous one samples
    zero (padding), a NaN spreads to the voxels whose trilinear stencil touches it (a zero
    weight times NaN), exactly where grid_sample gives NaN too."""
    from mambamorph.nn.squaring_cpu import square_cpu

    disp = torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64)
    disp[0, 0, 2, 2, 2] = float("nan")
    disp[0, 1, 3, 3, 3] = 1e30
    disp[0, 2, 4, 1, 1] = -1e30
    out, ref = square_cpu(disp, 1), _squarings_by_grid_sample(disp, 1)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out).any() and not torch.isnan(out[0, :, 4:, 4:, 4:]).any()
    # beside the 1e30 voxels, grid_sample's normalised coordinates leave weights of ~1e-16
    # where the kernel's are exactly 0 (1e30 x 1e-16 = 1e14): compare the rest
    tame = ~torch.isnan(ref) & (ref.abs() < 1e6)
    assert torch.allclose(out[tame], ref[tame], atol=1e-12, rtol=0)
    assert out[0, 1, 3, 3, 3] == 1e30 and out[0, 2, 4, 1, 1] == -1e30


# ---------------------------------------------------------------- the CPU warp kernel

@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("shape,batches", [((9, 10, 11), (1, 2)), ((2, 8, 5), (2, 2)),
                                           ((6, 7, 8), (2, 1))])
def test_cpu_warp_kernel_matches_grid_sample_and_its_gradient_float64(padding_mode, shape,
                                                                       batches):
    """warp of a constant image on the CPU (the numba kernel) against grid_sample, float64: a
    field reaching out of the volume, axes of two voxels, a batch of one broadcast either way;
    values and the gradient with respect to the flow to 1e-12."""
    from mambamorph.nn.warp_cpu import supports

    g = torch.Generator().manual_seed(2)
    image = torch.rand(batches[0], 4, *shape, dtype=torch.float64, generator=g)
    flow = ((torch.rand(batches[1], 3, *shape, dtype=torch.float64, generator=g) - 0.5) * 6.0)
    flow.requires_grad_()
    assert supports(image, flow, "bilinear", padding_mode)
    out = warp(image, flow, padding_mode=padding_mode)
    ref = _warp_by_grid_sample(image, flow, padding_mode)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    weights = torch.rand(ref.shape, dtype=torch.float64, generator=g)
    grad, = torch.autograd.grad((out * weights).sum(), flow)
    grad_ref, = torch.autograd.grad((ref * weights).sum(), flow)
    assert torch.allclose(grad, grad_ref, atol=1e-12, rtol=0)
    assert grad.abs().max() > 0.1


def test_cpu_warp_kernel_border_gradient_is_zero_on_and_beyond_the_boundary_like_torch():
    """Border padding clamps each coordinate; torch counts the boundary itself as outside
    (gradient 0 there), and so does the kernel."""
    shape = (5, 6, 7)
    image = torch.rand(1, 2, *shape, dtype=torch.float64)
    flow = torch.full((1, 3, *shape), 0.25, dtype=torch.float64)
    flow[0, 0, 0] = 0.0  # on the lower boundary of axis 0
    flow[0, 1, :, 5] = 0.0  # on the upper boundary of axis 1
    flow[0, 2, :, :, 6] = 3.5  # beyond the upper boundary of axis 2
    flow.requires_grad_()
    out = warp(image, flow, padding_mode="border")
    ref = _warp_by_grid_sample(image, flow, "border")
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    grad, = torch.autograd.grad(out.sum(), flow)
    grad_ref, = torch.autograd.grad(ref.sum(), flow)
    assert torch.allclose(grad, grad_ref, atol=1e-12, rtol=0)
    assert (grad[0, 0, 0] == 0).all() and (grad[0, 1, :, 5] == 0).all()
    assert (grad[0, 2, :, :, 6] == 0).all()


def test_cpu_warp_kernel_non_finite_positions_sample_zero_with_zero_gradient():
    from mambamorph.nn.warp_cpu import warp_cpu

    image = torch.rand(1, 3, 4, 5, 6)
    flow = torch.zeros(1, 3, 4, 5, 6)
    flow[0, 0, 1, 1, 1] = float("nan")
    flow[0, 2, 2, 2, 2] = float("inf")
    flow.requires_grad_()
    for padding_mode in ("zeros", "border"):
        out = warp_cpu(image, flow, padding_mode)
        assert (out[0, :, 1, 1, 1] == 0).all() and (out[0, :, 2, 2, 2] == 0).all()
        assert torch.equal(out[0, :, 3], image[0, :, 3])  # zero displacement elsewhere
        grad, = torch.autograd.grad(out.sum(), flow)
        assert torch.isfinite(grad).all()
        assert (grad[0, :, 1, 1, 1] == 0).all() and (grad[0, :, 2, 2, 2] == 0).all()



@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("shape,batches", [((9, 10, 11), (1, 1, 2)), ((2, 8, 5), (2, 2, 2)),
                                           ((6, 7, 8), (2, 1, 1))])
def test_fused_warp_ssd_kernel_matches_grid_sample_float64(padding_mode, shape, batches):
    """The fused warp + squared difference (per-voxel cost summed over channels) against
    grid_sample followed by torch's arithmetic, float64: values and the gradient with respect
    to the flow to 1e-12, with batches of one broadcast each way."""
    from mambamorph.nn.warp_cpu import warp_ssd_cpu

    g = torch.Generator().manual_seed(5)
    image = torch.rand(batches[0], 5, *shape, dtype=torch.float64, generator=g)
    reference = torch.rand(batches[1], 5, *shape, dtype=torch.float64, generator=g)
    flow = ((torch.rand(batches[2], 3, *shape, dtype=torch.float64, generator=g) - 0.5) * 6.0)
    flow.requires_grad_()
    cost = warp_ssd_cpu(image, reference, flow, padding_mode)
    ref = (_warp_by_grid_sample(image, flow, padding_mode) - reference).square().sum(1, keepdim=True)
    assert cost.shape == ref.shape == (max(batches), 1, *shape)
    assert torch.allclose(cost, ref, atol=1e-12, rtol=0)
    weights = torch.rand(ref.shape, dtype=torch.float64, generator=g)
    grad, = torch.autograd.grad((cost * weights).sum(), flow)
    grad_ref, = torch.autograd.grad((ref * weights).sum(), flow)
    assert grad.shape == flow.shape
    assert torch.allclose(grad, grad_ref, atol=1e-12, rtol=0)
    assert grad.abs().max() > 0.1


def test_fused_warp_ssd_kernel_non_finite_positions_cost_the_reference_with_zero_gradient():
    from mambamorph.nn.warp_cpu import warp_ssd_cpu

    image, reference = torch.rand(1, 3, 4, 5, 6), torch.rand(1, 3, 4, 5, 6)
    flow = torch.zeros(1, 3, 4, 5, 6)
    flow[0, 1, 1, 1, 1] = float("nan")
    flow.requires_grad_()
    for padding_mode in ("zeros", "border"):
        cost = warp_ssd_cpu(image, reference, flow, padding_mode)
        # the sample there is 0, as in warp_cpu, so the cost is the reference's square
        assert torch.allclose(cost[0, 0, 1, 1, 1], reference[0, :, 1, 1, 1].square().sum())
        assert torch.allclose(cost[0, 0, 3], (image - reference)[0, :, 3].square().sum(0))
        grad, = torch.autograd.grad(cost.sum(), flow)
        assert torch.isfinite(grad).all() and (grad[0, :, 1, 1, 1] == 0).all()

def test_warp_takes_grid_sample_where_the_kernel_does_not_apply():
    """An image that needs a gradient, nearest sampling, reflection padding or an axis of one
    voxel go through grid_sample; the gradient then reaches the image too."""
    from mambamorph.nn.warp_cpu import supports

    shape = (4, 5, 6)
    image = torch.rand(1, 2, *shape, requires_grad=True)
    flow = torch.rand(1, 3, *shape) - 0.5
    assert not supports(image, flow, "bilinear", "zeros")
    assert not supports(image.detach(), flow, "nearest", "zeros")
    assert not supports(image.detach(), flow, "bilinear", "reflection")
    assert not supports(torch.rand(1, 2, 1, 5, 6), torch.rand(1, 3, 1, 5, 6), "bilinear", "zeros")
    out = warp(image, flow)
    out.sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert torch.allclose(out.detach(), warp(image.detach(), flow), atol=1e-6)
